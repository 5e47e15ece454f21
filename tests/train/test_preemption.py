"""SIGTERM: acted on at the next step on every process (also during a long evaluation), saved
together, and the previous handler put back when the run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jsft.evals import validation
from jsft.modes.train import train_and_evaluate
from jsft.train import nonfinite
from jsft.train.checkpoint import Checkpointer
from tests.conftest import cpu_env, free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "tests", "tiny_config.py")


def _handler(*_):
    pass


@pytest.mark.slow
def test_the_previous_sigterm_handler_is_back_after_a_run_however_it_ends(tiny_config, tmp_path):
    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        tiny_config.train.steps = 2
        tiny_config.train.eval_every_steps = 0
        train_and_evaluate(tiny_config, str(tmp_path / "ok"))
        assert signal.getsignal(signal.SIGTERM) is _handler
        tiny_config.optim.lr, tiny_config.optim.clip_norm, tiny_config.train.steps = 1e30, 0.0, 20
        with pytest.raises(nonfinite.NonFiniteError):
            train_and_evaluate(tiny_config, str(tmp_path / "diverges"))
        assert signal.getsignal(signal.SIGTERM) is _handler
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_sigterm_during_an_evaluation_saves_that_step_and_stops(tiny_config, tmp_path, monkeypatch):
    original = validation.ValidationEvaluator._loss
    calls = []

    def loss_then_signal(self, params):
        calls.append(1)
        if len(calls) == 2:  # the evaluation at step 3 (step 0 was the first): a preemption arrives
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, params)

    monkeypatch.setattr(validation.ValidationEvaluator, "_loss", loss_then_signal)
    tiny_config.train.steps, tiny_config.train.eval_every_steps = 9, 3
    tiny_config.train.checkpoint_every_steps = 100
    summary = train_and_evaluate(tiny_config, str(tmp_path))
    assert summary["steps"] == 3
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=5)
    # step 3 saved on the signal; step 0 is the first (so best) evaluation's kept checkpoint
    assert ckpt.all_steps() == [0, 3]
    ckpt.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/loss" in r] == [0]  # the interrupted eval wrote nothing


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tiny_data_dir, tmp_path):
    port = free_port()
    env = cpu_env(2)
    wd = tmp_path / "wd"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jsft.main",
                f"--config={TINY}:{tiny_data_dir}",
                f"--workdir={wd}",
                "--config.train.steps=100000",
                "--config.train.eval_every_steps=0",
                "--config.train.checkpoint_every_steps=100000",
                "--config.train.log_every_steps=1",
                "--config.mesh.shape=(2,2,1)",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # wait until training is under way
            metrics = wd / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
                break
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)  # only the second process is told
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    saved = [int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit()]
    assert len(saved) == 1 and saved[0] >= 3
    assert f"saved a checkpoint at step {saved[0]}" in outs[0]  # process 0 prints for both
