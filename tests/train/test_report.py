"""Run reports: the PNG of a run's curves, several runs overlaid, from metrics.jsonl alone."""

import json
import os
import sys

from jsft.train import report
from tests import zygote
from tests.conftest import write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(directory, scale, best=None):
    rows = [
        {"step": s, "train/loss": scale / s, "train/lr": 1e-3, "train/grad_norm": 1.0} for s in range(1, 21)
    ]
    rows += [
        {"step": s, "eval/loss": scale / s, "eval/exact_match": s / 20, "eval/perplexity": 2.0}
        for s in (10, 20)
    ]
    rows.append({"step": 21, "train/loss": None, "nonfinite": ["train/loss"]})  # strict-JSON null: skipped
    directory.mkdir()
    write_jsonl(directory / "metrics.jsonl", rows)
    if best is not None:
        (directory / "checkpoints_best").mkdir()
        (directory / "checkpoints_best" / "best.json").write_text(json.dumps({"step": best, "value": 1.0}))
    return str(directory)


def test_panels_and_an_overlaid_report(tmp_path):
    a, b = _run(tmp_path / "a", 1.0, best=20), _run(tmp_path / "b", 2.0)
    series = report.read_metrics(a)
    assert len(series["train/loss"]) == 20 and report.best_step(a) == 20 and report.best_step(b) is None
    assert report.panels([series]) == [
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "eval/loss",
        "eval/exact_match",
    ]
    out = report.write_report([a, b], str(tmp_path / "out" / "cmp.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_mode_report_overlays_runs_without_a_config_and_names_a_missing_one(tmp_path):
    a, b = _run(tmp_path / "a", 1.0), _run(tmp_path / "b", 2.0)
    cmd = [sys.executable, "-m", "jsft.main", "--mode=report", f"--workdir={a}", f"--workdir={b}"]
    r = zygote.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.getsize(os.path.join(a, "report_compare.png")) > 1000
    r = zygote.run(
        [*cmd, f"--workdir={tmp_path / 'nothing'}"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith(f"jsft: error: --workdir={tmp_path / 'nothing'}: no metrics.jsonl")
    )
