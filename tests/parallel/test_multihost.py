"""Two processes on 127.0.0.1 (2 CPU devices each, gloo collectives) train, checkpoint, resume, and
match one process with 4 devices on the same logical data shards."""

import json
import os
import sys

import numpy as np
import pytest

from tests import zygote
from tests.conftest import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "tests", "tiny_config.py")
COMMON = [
    "--config.train.eval_every_steps=3",
    "--config.train.log_every_steps=1",
    "--config.mesh.shape=(2,2,1)",
]


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _by_step(rows, key):
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.mark.slow
def test_two_processes_checkpoint_resume_and_match_one_process(tiny_data_dir, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, LOCAL_DEVICES="2", JAX_PLATFORMS="cpu")
    launch = [
        os.path.join(REPO, "launch", "local_multihost.sh"),
        "2",
        f"--config={TINY}:{tiny_data_dir}",
        f"--workdir={tmp_path / 'multi'}",
        *COMMON,
    ]
    first = zygote.run(
        launch + ["--config.train.stop_after_steps=3"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "over 4 devices, 2 process(es)" in first.stdout + first.stderr
    second = zygote.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert "Resuming from the checkpoint at step 3" in second.stdout + second.stderr

    single_env = cpu_env(4)
    single = zygote.run(
        [
            sys.executable,
            "-m",
            "jsft.main",
            f"--config={TINY}:{tiny_data_dir}",
            f"--workdir={tmp_path / 'single'}",
            "--config.data.num_shards=2",
            *COMMON,
        ],
        cwd=REPO,
        env=single_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    multi, one = _metrics(tmp_path / "multi"), _metrics(tmp_path / "single")
    for key in ("train/loss", "eval/loss", "eval/exact_match"):
        a, b = _by_step(multi, key), _by_step(one, key)
        assert sorted(a) == sorted(b) and a, key
        np.testing.assert_allclose(
            [a[s] for s in sorted(a)], [b[s] for s in sorted(b)], rtol=1e-5, err_msg=key
        )
    assert sorted(_by_step(multi, "train/loss")) == list(range(1, 7))
    assert not os.path.exists(tmp_path / "multi" / "process_1" / "metrics.jsonl")  # process 0 writes


@pytest.mark.slow
def test_a_streamed_run_checkpointed_on_two_processes_resumes_on_one_and_back(tiny_data_dir, tmp_path):
    # Elastic resume (engine="stream"): the two logical streams move whole between processes, so
    # 2 -> 1 and 1 -> 2 resumes log the losses of an uninterrupted one-process run.
    stream = ["--config.data.engine=stream", "--config.data.num_shards=2", "--config.data.shard_bytes=512"]
    env2 = dict(os.environ, PYTHON=sys.executable, LOCAL_DEVICES="2", JAX_PLATFORMS="cpu")

    def two(workdir, *extra):
        cmd = [os.path.join(REPO, "launch", "local_multihost.sh"), "2", f"--config={TINY}:{tiny_data_dir}"]
        cmd += [f"--workdir={workdir}", *COMMON, *stream, *extra]
        out = zygote.run(cmd, cwd=REPO, env=env2, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        return out.stdout + out.stderr

    def one(workdir, *extra):
        cmd = [sys.executable, "-m", "jsft.main", f"--config={TINY}:{tiny_data_dir}", f"--workdir={workdir}"]
        out = zygote.run(
            cmd + [*COMMON, *stream, *extra],
            cwd=REPO,
            env=cpu_env(4),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout + out.stderr

    one(tmp_path / "whole")
    two(tmp_path / "down", "--config.train.stop_after_steps=3")
    assert "Resuming from the checkpoint at step 3" in one(tmp_path / "down")
    one(tmp_path / "up", "--config.train.stop_after_steps=3")
    assert "Resuming from the checkpoint at step 3" in two(tmp_path / "up")
    whole = _by_step(_metrics(tmp_path / "whole"), "train/loss")
    assert sorted(whole) == list(range(1, 7))
    for name in ("down", "up"):
        resumed = _by_step(_metrics(tmp_path / name), "train/loss")
        assert sorted(resumed) == sorted(whole), name
        np.testing.assert_allclose(
            [resumed[s] for s in whole], [whole[s] for s in whole], rtol=1e-5, err_msg=name
        )
