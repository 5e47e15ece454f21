"""The command line: config overrides, clear errors, resume and SIGTERM, as a user runs them."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import zygote

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "tiny_config.py")


def _cmd(data_dir, workdir, *overrides):
    return [
        sys.executable,
        "-m",
        "jsft.main",
        f"--config={TINY}:{data_dir}",
        f"--workdir={workdir}",
        *overrides,
    ]


def _run(*args, **kw):
    return zygote.run(*args, capture_output=True, text=True, cwd=REPO, timeout=300, **kw)


@pytest.mark.slow
def test_overrides_reach_the_run_and_a_rerun_resumes(tiny_data_dir, tmp_path):
    wd = tmp_path / "wd"
    r = _run(
        _cmd(
            tiny_data_dir,
            wd,
            "--config.optim.lr=0.0123",
            "--config.train.steps=4",
            "--config.train.eval_every_steps=0",
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads((wd / "config.json").read_text())
    assert saved["optim"]["lr"] == 0.0123 and saved["train"]["steps"] == 4
    assert "Summary" in r.stderr + r.stdout and "steps: 4" in r.stderr + r.stdout

    r = _run(
        _cmd(
            tiny_data_dir,
            wd,
            "--config.optim.lr=0.0123",
            "--config.train.steps=6",
            "--config.train.eval_every_steps=0",
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resuming from the checkpoint at step 4" in r.stderr + r.stdout
    steps = [json.loads(line)["step"] for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 6]  # step 0: data counts


def test_a_misspelled_config_field_fails_with_its_name(tiny_data_dir, tmp_path):
    r = _run(_cmd(tiny_data_dir, tmp_path / "wd", "--config.optim.lrr=1e-3"))
    assert r.returncode != 0
    assert "lrr" in r.stderr
    assert not (tmp_path / "wd").exists()


def test_an_invalid_config_value_names_the_key(tiny_data_dir, tmp_path):
    r = _run(_cmd(tiny_data_dir, tmp_path / "wd", "--config.loss.normalization=per_row"))
    assert r.returncode != 0
    assert "config.loss.normalization='per_row'" in r.stderr


def test_a_malformed_data_line_stops_the_run_naming_file_and_line(tiny_data_dir, tmp_path):
    bad = tmp_path / "data"
    bad.mkdir()
    lines = (tiny_data_dir / "train.jsonl").read_text().splitlines()
    lines[6] = '{"prompt": "x", "response": '
    (bad / "train.jsonl").write_text("\n".join(lines) + "\n")
    (bad / "val.jsonl").write_text((tiny_data_dir / "val.jsonl").read_text())
    r = _run(_cmd(bad, tmp_path / "wd"))
    assert r.returncode != 0
    assert f"{bad / 'train.jsonl'}:7: invalid JSON" in r.stderr
    assert not (tmp_path / "wd" / "checkpoints").exists()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes(tiny_data_dir, tmp_path):
    wd = tmp_path / "wd"
    cmd = _cmd(
        tiny_data_dir,
        wd,
        "--config.train.steps=100000",
        "--config.train.eval_every_steps=0",
        "--config.train.checkpoint_every_steps=100000",
        "--config.train.log_every_steps=1",
    )
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until training is under way
        if (wd / "metrics.jsonl").exists() and len((wd / "metrics.jsonl").read_text().splitlines()) >= 5:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Signal 15: saved a checkpoint at step" in out + err
    saved = [int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit()]
    assert len(saved) == 1 and saved[0] >= 5
    r = _run(
        _cmd(tiny_data_dir, wd, f"--config.train.steps={saved[0] + 2}", "--config.train.eval_every_steps=0")
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Resuming from the checkpoint at step {saved[0]}" in r.stderr + r.stdout
