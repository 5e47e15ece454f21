"""`--mode export` from a multi-process run: every process gathers, process 0 writes the same files."""

import os
import sys

import pytest

from tests import zygote

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "tests", "tiny_config.py")


def _files(directory):
    return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory))}


@pytest.mark.slow
def test_a_two_process_export_writes_the_files_of_a_one_process_export(tiny_data_dir, tmp_path):
    base = [f"--config={TINY}:{tiny_data_dir}", f"--workdir={tmp_path / 'wd'}", "--config.train.steps=2"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    train = zygote.run(
        [sys.executable, "-m", "jsft.main", *base],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    export = ["--mode=export", "--config.model.export_family=llama", "--config.mesh.shape=(1,-1,1)"]
    one = zygote.run(
        [sys.executable, "-m", "jsft.main", *base, *export, f"--export_dir={tmp_path / 'one'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [os.path.join(REPO, "launch", "local_multihost.sh"), "2", *base, *export]
    two = zygote.run(
        [*launch, f"--export_dir={tmp_path / 'two'}"],
        cwd=REPO,
        env=dict(env, PYTHON=sys.executable, LOCAL_DEVICES="2"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert two.stdout.startswith("+ 2 processes") and "Exported step 2" in two.stdout  # printed by process 0
    files = _files(tmp_path / "two")  # params sharded over 4 devices in 2 processes (fsdp)
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(files)
    assert files == _files(tmp_path / "one")
