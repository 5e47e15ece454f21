"""Every shipped config: loads with each of its named arguments, refuses its unset required fields in
one line, and runs end to end (shrunk) through train, eval, best checkpoint, checkpoint and resume."""

import glob
import importlib.util
import json
import os
import sys

import pytest

from jsft import config as config_lib
from tests import zygote
from tests.conftest import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(
    os.path.basename(p)
    for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
    if not p.endswith("__init__.py")
)


def _module(name):
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(REPO, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cases():
    return [(name, arg) for name in CONFIG_FILES for arg in _module(name).ARGS]


def _fill_required(config, value="/somewhere"):
    for key, v in config.items():
        if isinstance(v, type(config)):
            _fill_required(v, value)
        elif v == config_lib.REQUIRED:
            config[key] = value


@pytest.mark.parametrize("name,arg", _cases())
def test_config_loads_and_validates(name, arg):
    module = _module(name)
    config = module.get_config(arg)
    config_lib.validate(config, "plan")  # a plan needs no checkpoint or data
    _fill_required(config)
    config_lib.validate(config)
    with pytest.raises(ValueError, match="unknown"):
        module.get_config("no-such-argument")


def _run(args, env=None, timeout=600):
    return zygote.run(
        [sys.executable, "-m", "jsft.main", *args],
        cwd=REPO,
        env=env or os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "name", [n for n in CONFIG_FILES if config_lib.REQUIRED in json.dumps(_module(n).get_config().to_dict())]
)
def test_a_config_with_unset_required_fields_refuses_in_one_line(name, tmp_path):
    r = _run([f"--config={os.path.join(REPO, 'configs', name)}", f"--workdir={tmp_path / 'wd'}"], timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("jsft: error: config.")
    assert "must be set" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "wd").exists()


# --------------------------------------------------------------------------- end to end, shrunk

LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A tiny random Llama saved by transformers, with a BPE tokenizer knowing the chat tokens."""
    torch = pytest.importorskip("torch", reason="the hf extra (torch==2.13.0, transformers) is not installed")
    transformers = pytest.importorskip("transformers")
    from tests.conftest import save_chatml_bpe_tokenizer

    d = tmp_path_factory.mktemp("tiny_llama")
    save_chatml_bpe_tokenizer(d, LLAMA3_SPECIAL)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(d), safe_serialization=True)
    return str(d)


def _shrink(config, data_dir, hf_dir) -> list[str]:
    """Overrides that keep a config's structure (sources, template, dtypes, remat, accumulation, best
    metric, eval tasks) but make it step in seconds on 8 CPU devices."""
    over = [
        "--config.train.steps=4",
        "--config.train.eval_every_steps=2",
        "--config.train.checkpoint_every_steps=2",
        "--config.train.log_every_steps=1",
        "--config.optim.warmup_steps=1",
        "--config.data.seq_len=64",
        f"--config.data.batch_size={8 * config.optim.grad_accum_steps}",
        "--config.data.pack_chunk_examples=64",
        "--config.data.num_proc=1",
        "--config.eval.batch_size=8",
        "--config.eval.exact_match_examples=4",
        "--config.eval.max_new_tokens=4",
        "--config.mesh.shape=(1,-1,1)" if config.mesh.shape[1] != 1 else "--config.mesh.shape=(-1,1,1)",
        "--config.mesh.dcn_shape=(1,1,1)",
    ]
    if config.model.hf_path:
        over.append(f"--config.model.hf_path={hf_dir}")
    if config.data.tokenizer == config_lib.REQUIRED:
        over.append(f"--config.data.tokenizer={hf_dir}")
    else:
        over += ["--config.data.vocab_size=300", "--config.model.d_model=32", "--config.model.mlp_dim=64"]
    if config.loss.get("objective") == "qsft":
        return over  # its own (small) data carries the rewards Q-SFT needs
    for name, src in config.data.sources.items():
        over.append(f"--config.data.sources.{name}.path={os.path.join(data_dir, 'train.jsonl')}")
        if src.val_path:
            over.append(f"--config.data.sources.{name}.val_path={os.path.join(data_dir, 'val.jsonl')}")
        elif src.val_fraction:
            over.append(f"--config.data.sources.{name}.val_fraction=0.05")
    for task in config.eval.tasks:
        over += [f"--config.eval.tasks.{task}.max_examples=4", f"--config.eval.tasks.{task}.max_new_tokens=4"]
    return over


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_trains_evaluates_keeps_the_best_checkpoints_and_resumes(
    name, tiny_data_dir, tiny_hf_dir, tmp_path
):
    config = _module(name).get_config()
    env = cpu_env(8)
    wd = tmp_path / "wd"
    args = [f"--config={os.path.join(REPO, 'configs', name)}", f"--workdir={wd}"]
    args += _shrink(config, str(tiny_data_dir), tiny_hf_dir)
    first = _run([*args, "--config.train.stop_after_steps=2"], env)
    assert first.returncode == 0, first.stderr[-4000:]
    second = _run(args, env)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "Resuming from the checkpoint at step 2" in second.stderr + second.stdout

    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if "train/loss" in r) == [1, 2, 3, 4]
    assert {r["step"] for r in rows if config.train.best_metric in r} >= {2, 4}
    assert sorted(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit())[-1] == 4
    best = json.loads((wd / "checkpoints" / "best.json").read_text())
    assert best["step"] in (0, 2, 4) and best["value"] is not None
    assert str(best["step"]) in os.listdir(wd / "checkpoints")  # the best step is kept, whatever keep-N says


@pytest.mark.slow
def test_raw_sharegpt_trains_through_hf_sft_with_no_format_or_fields_override(tiny_hf_dir, tmp_path):
    from tests.conftest import make_records, write_jsonl  # noqa: PLC0415

    def sharegpt(i, r):
        turns = [{"from": "human", "value": r["prompt"]}, {"from": "gpt", "value": r["response"]}]
        return {"id": f"identity_{i}", "conversations": turns}

    write_jsonl(tmp_path / "train.jsonl", [sharegpt(i, r) for i, r in enumerate(make_records(200, 0))])
    config = _module("hf_sft.py").get_config()
    env = cpu_env(8)
    wd = tmp_path / "wd"
    args = [f"--config={os.path.join(REPO, 'configs', 'hf_sft.py')}", f"--workdir={wd}"]
    args += _shrink(config, str(tmp_path), tiny_hf_dir)
    assert not [a for a in args if ".format=" in a or ".fields" in a]
    r = _run(args, env)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if "train/loss" in r) == [1, 2, 3, 4]
    assert all(r.get("data/sft/skipped_records", 0) == 0 for r in rows)
