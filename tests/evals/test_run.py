"""`--mode eval` and `--mode generate` on a checkpoint trained by the test itself."""

import json
import os
import sys

import pytest

from tests import zygote
from tests.conftest import write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "tests", "tiny_config.py")


def _run(args, **kw):
    return zygote.run(
        [sys.executable, "-m", "jsft.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


@pytest.mark.slow
def test_eval_and_generate_modes_on_a_trained_checkpoint(tiny_data_dir, tmp_path):
    wd = tmp_path / "wd"
    base = [f"--config={TINY}:{tiny_data_dir}", f"--workdir={wd}"]
    r = _run(base + ["--config.train.steps=6"])
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    last_eval = [m for m in metrics if "eval/loss" in m][-1]
    assert last_eval["step"] == 6

    r = _run(base + ["--mode=eval", "--checkpoint=latest"])
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((wd / "eval_latest_step_6.json").read_text())
    # The same checkpoint and data give the numbers the training run logged at that step.
    for key in ("eval/loss", "eval/exact_match", "eval/parity/accuracy", "eval/words/exact_match"):
        assert results[key] == pytest.approx(last_eval[key], rel=1e-6), key
    assert "eval/parity/accuracy" in r.stdout and (wd / "eval_latest_step_6" / "words.jsonl").exists()

    r = _run(base + ["--mode=eval", "--checkpoint=best"])
    assert r.returncode == 0, r.stderr[-2000:]
    (best_file,) = wd.glob("eval_best_step_*.json")
    best = json.loads((wd / "checkpoints" / "best.json").read_text())["step"]
    assert best_file.name == f"eval_best_step_{best}.json"
    # A workdir written before the best became a kept regular checkpoint: checkpoints_best/<step>,
    # while the regular checkpoints' records still name that step.
    os.makedirs(wd / "checkpoints_best")
    os.rename(wd / "checkpoints" / str(best), wd / "checkpoints_best" / str(best))
    first = json.loads(best_file.read_text())
    best_file.unlink()
    r = _run(base + ["--mode=eval", "--checkpoint=best"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(best_file.read_text()) == first
    os.rename(wd / "checkpoints_best" / str(best), wd / "checkpoints" / str(best))

    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": "upper: a b"}, {"messages": [{"role": "user", "content": "upper: c"}]}])
    r = _run(base + ["--mode=generate", f"--prompts={prompts}", "--max_new_tokens=5"])
    assert r.returncode == 0, r.stderr[-3000:]
    outputs = [json.loads(x) for x in (tmp_path / "prompts.outputs.jsonl").read_text().splitlines()]
    assert [o.get("prompt") for o in outputs] == ["upper: a b", None] and all("output" in o for o in outputs)

    r = _run(base + ["--mode=generate", "--max_new_tokens=5"], input="upper: a b\nupper: c\n")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stdout.splitlines()) == 2  # one streamed line per prompt
    r = _run(base + ["--mode=eval", "--checkpoint=77"])
    assert r.returncode != 0 and "no checkpoint '77'" in r.stderr
