"""LoRA/QLoRA runs end to end: adapter-only checkpoints that resume bitwise, the base's identity
checked on resume and restore, eval/generate/export of an adapter checkpoint, and bad input as one
`jsft: error:` line before compilation."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from jsft.modes.train import train_and_evaluate
from jsft.run import Run
from jsft.train import trainable
from tests import zygote
from tests.train.test_loop import _losses

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "tests", "tiny_config.py")


def _main(data_dir, workdir, *overrides, mode="train"):
    cmd = [sys.executable, "-m", "jsft.main", f"--config={TINY}:{data_dir}", f"--workdir={workdir}"]
    r = zygote.run(
        [*cmd, f"--mode={mode}", *overrides], capture_output=True, text=True, cwd=REPO, timeout=600
    )
    return r


def _one_error(r):
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("jsft: error:")]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["--config.peft.targets=q,attention"],
            "config.peft.targets: 'attention' matches no linear projection",
        ),
        (
            ["--config.peft.rank=100"],
            "config.peft.rank=100 is larger than layers.attn.q_proj's 32 x 32 matrix",
        ),
        (["--config.peft.method=qlora", "--config.peft.quant=fp4"], "config.peft.quant='fp4' is not a QLoRA"),
        (["--config.peft.method=dora"], "config.peft.method='dora' is not one of"),
        (["--config.train.frozen=embed"], "trains the adapters only; config.train.trainable"),
        (
            ["--config.peft.adapter=/nonexistent"],
            "config.peft.adapter='/nonexistent': no adapter_config.json",
        ),
    ],
)
def test_bad_peft_settings_are_one_line_before_compilation(tiny_data_dir, tmp_path, overrides, message):
    overrides = ["--config.peft.method=lora", *overrides] if "method" not in str(overrides) else overrides
    r = _main(tiny_data_dir, tmp_path, *overrides)
    assert message in _one_error(r)
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_an_adapter_run_resumes_exactly_and_checkpoints_only_the_adapters(tiny_config, tmp_path, method):
    cfg = tiny_config
    cfg.peft.method, cfg.peft.quant, cfg.peft.rank, cfg.peft.dropout = method, "nf4", 4, 0.1
    cfg.optim.lr = 1e-2
    cfg.train.steps, cfg.train.checkpoint_every_steps, cfg.train.eval_every_steps = 10, 5, 5
    full = train_and_evaluate(cfg, str(tmp_path / "full"))
    resumed = str(tmp_path / "resumed")
    cfg.train.stop_after_steps = 5
    assert train_and_evaluate(cfg, resumed)["steps"] == 5
    cfg.train.stop_after_steps = 0
    again = train_and_evaluate(cfg, resumed)
    assert again["steps"] == 10
    assert _losses(resumed) == _losses(tmp_path / "full")  # bitwise, dropout keys included
    assert again["eval/loss"] == full["eval/loss"]
    losses = _losses(resumed)
    assert losses[max(losses)] < losses[min(losses)]

    # The checkpoint holds the adapters and their moments, not the base.
    run = Run.create(cfg, resumed)
    model = run.model(run.tokenizer().vocab_size)
    meta = run.checkpointer().read_meta(10)
    saved = [k for k in meta["checksums"] if k.startswith(".params")]
    assert saved and all("_lora_" in k for k in saved), saved
    assert meta["base"]["source"] == "fresh weights (seed 0)" and len(meta["base"]["hash"]) == 64
    # A params-only restore puts them over the run's base; the base is bitwise the fresh one.
    params, _, step = run.restore_params(model)
    mask = run.trainable_mask(model)
    fresh = run.peft_params(model, run.base_params(model)[0], run.params_layout(model)[1])
    for m, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(fresh), jax.tree.leaves(params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b)) == (not m)
    assert step == 10 and len(jax.tree.leaves(trainable.split(params, mask)[0])) == 14


@pytest.mark.slow
def test_adapters_for_another_base_are_refused_and_the_adapter_checkpoint_evaluates_and_exports(
    tiny_data_dir, tmp_path
):
    lora = ["--config.peft.method=lora", "--config.train.steps=4", "--config.train.eval_every_steps=0"]
    r = _main(tiny_data_dir, tmp_path, *lora)
    assert r.returncode == 0, r.stderr[-3000:]
    # Another base (fresh weights of another seed) under the same adapters: refused, on resume and eval.
    other = ["--config.model.init_std=0.05"]
    for mode in ("train", "eval"):
        error = _one_error(_main(tiny_data_dir, tmp_path, *lora, *other, "--config.train.steps=6", mode=mode))
        assert "holds LoRA adapters trained on the base fresh weights (seed 0)" in error, error
    r = _main(tiny_data_dir, tmp_path, *lora, mode="eval")
    assert r.returncode == 0 and "eval/loss" in r.stdout + r.stderr, r.stderr[-3000:]
    r = _main(tiny_data_dir, tmp_path, *lora, f"--export_dir={tmp_path / 'merged'}", mode="export")
    assert r.returncode == 0 and (tmp_path / "merged" / "config.json").exists(), r.stderr[-3000:]
    r = _main(
        tiny_data_dir, tmp_path, *lora, "--export_adapter", f"--export_dir={tmp_path / 'a'}", mode="export"
    )
    assert r.returncode == 0 and (tmp_path / "a" / "adapter_model.safetensors").exists(), r.stderr[-3000:]
    # Generation from the adapter checkpoint.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "abc"}\n')
    r = _main(tiny_data_dir, tmp_path, *lora, f"--prompts={prompts}", "--max_new_tokens=3", mode="generate")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len((tmp_path / "prompts.outputs.jsonl").read_text().splitlines()) == 2
    # The exported PEFT adapter, loaded by another run over the same base, evaluates the same.
    other = tmp_path / "from_adapter"
    adapter = f"--config.peft.adapter={tmp_path / 'a'}"
    r = _main(tiny_data_dir, other, *lora, adapter, "--checkpoint=hf", mode="eval")
    assert r.returncode == 0, r.stderr[-3000:]
    mine = json.loads((tmp_path / "eval_latest_step_4.json").read_text())
    theirs = json.loads((other / "eval_hf.json").read_text())
    assert abs(mine["eval/loss"] - theirs["eval/loss"]) < 1e-5, (mine, theirs)
