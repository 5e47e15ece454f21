"""A gs:// workdir against a real GCS server (fake-gcs-server on 127.0.0.1, tests/gcs_emulator.py):
training with checkpoints in the bucket, kill -9 and a bitwise resume, the best checkpoint kept and
evaluated, `--mode export` into the bucket, and a sweep whose trials' workdirs are in the bucket.

Nothing is mocked: orbax's arrays go through tensorstore's GCS driver (TENSORSTORE_GCS_HTTP_URL), its
metadata, best.json and the export through etils.epath / fsspec / gcsfs (STORAGE_EMULATOR_HOST). A
server that does not start fails these tests; it never skips them.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import zygote
from tests.gcs_emulator import GcsEmulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "jsft-test"

# The tiny test config with validation loss as the only evaluation (the storage is under test, not the
# eval suite); the best checkpoint by the *highest* eval/loss is step 0's, so it is a step the keep-1
# rotation would otherwise have deleted.
CONFIG = """
import sys
sys.path.insert(0, {repo!r})
import ml_collections
from tests import tiny_config


def get_config(data_dir):
    config = tiny_config.get_config(data_dir)
    config.eval.tasks = ml_collections.ConfigDict()
    config.eval.exact_match_examples = 0
    config.train.steps = 16
    config.train.log_every_steps = 1
    config.train.eval_every_steps = 8
    config.train.checkpoint_every_steps = 4
    config.train.keep_checkpoints = 1
    config.train.best_metric = "eval/loss"
    config.train.best_mode = "max"
    return config
"""


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator with one bucket; its variables set for this process and every subprocess."""
    server = GcsEmulator(str(tmp_path_factory.mktemp("gcs") / "server.log")).start()
    saved = dict(os.environ)
    try:
        server.create_bucket(BUCKET)
        os.environ.update(server.environment())
        os.environ["JSFT_LOCAL_DIR"] = str(tmp_path_factory.mktemp("jsft_local"))
        import fsspec.config  # noqa: PLC0415 - fsspec read FSSPEC_GCS_TOKEN when it was imported

        fsspec.config.set_conf_env(fsspec.config.conf)
        yield server
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_data_dir):
    path = tmp_path_factory.mktemp("gcs_config") / "gcs_config.py"
    path.write_text(CONFIG.format(repo=REPO))
    return f"{path}:{tiny_data_dir}"


def _config(config_file):
    path, arg = config_file.split(":", 1)
    spec = importlib.util.spec_from_file_location("gcs_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _bucket(gcs):
    """A gcsfs client on the emulator, made explicitly (no environment): what the test itself reads."""
    from gcsfs.core import GCSFileSystem  # noqa: PLC0415

    return GCSFileSystem(
        endpoint_url=gcs.url, token="anon", use_listings_cache=False, skip_instance_cache=True
    )


def _steps(fs, path):
    fs.invalidate_cache()
    return sorted(
        int(p.rsplit("/", 1)[-1]) for p in fs.ls(path, detail=False) if p.rsplit("/", 1)[-1].isdigit()
    )


def _losses(workdir):
    """{step: train/loss} of a gs:// workdir's metrics.jsonl, in its local mirror."""
    from jsft.run import local_mirror  # noqa: PLC0415

    with open(os.path.join(local_mirror(workdir), "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return rows, {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _main(config_file, workdir, *flags, **kw):
    cmd = [sys.executable, "-m", "jsft.main", f"--config={config_file}", f"--workdir={workdir}", *flags]
    return zygote.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.slow
def test_a_gs_workdir_trains_resumes_bitwise_after_kill_9_keeps_the_best_and_exports(
    gcs, config_file, tmp_path
):
    from jsft.modes.evaluate import run_eval  # noqa: PLC0415
    from jsft.modes.export import run_export  # noqa: PLC0415
    from jsft.modes.train import train_and_evaluate  # noqa: PLC0415

    fs = _bucket(gcs)
    config = _config(config_file)
    full = f"gs://{BUCKET}/full"
    summary = train_and_evaluate(config, full)
    assert summary["steps"] == 16 and summary["checkpoint_dir"] == f"{full}/checkpoints"
    # keep 1, plus the best step out of the rotation; best.json beside them in the bucket
    assert _steps(fs, f"{BUCKET}/full/checkpoints") == [0, 16]
    assert json.loads(fs.cat(f"{BUCKET}/full/checkpoints/best.json"))["step"] == 0
    full_rows, full_curve = _losses(full)

    # kill -9 as soon as the step-8 checkpoint starts to appear in the bucket (most likely mid-save)
    killed = f"gs://{BUCKET}/killed"
    cmd = [sys.executable, "-m", "jsft.main", f"--config={config_file}", f"--workdir={killed}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            fs.invalidate_cache()
            if fs.exists(f"{BUCKET}/killed/checkpoints/8"):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    r = _main(config_file, killed)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed_from = [line for line in r.stdout.splitlines() if line.startswith("Resuming from the checkpoint")]
    assert resumed_from and resumed_from[0].split()[6] in ("4", "8"), r.stdout[-3000:]
    print(f"killed as checkpoints/8 appeared; {resumed_from[0]}")  # 4: the kill landed mid-save
    rows, curve = _losses(killed)
    assert sorted(curve) == list(range(1, 17)), "no step is logged twice or lost"
    assert curve == full_curve  # bitwise-equal floats
    assert _steps(fs, f"{BUCKET}/killed/checkpoints") == [0, 16]

    # --checkpoint=best reads step 0 from the bucket: the evaluation logged at step 0, exactly
    results = run_eval(config, full, "best")
    assert results["eval/loss"] == next(
        r["eval/loss"] for r in full_rows if r["step"] == 0 and "eval/loss" in r
    )

    # --mode export into the bucket: the same bytes as an export of the same step to a local directory
    r = _main(
        config_file, full, "--mode=export", f"--export_dir=gs://{BUCKET}/export", "--export_dtype=float32"
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    local = tmp_path / "export"
    files = run_export(config, full, str(local), dtype="float32")
    assert "config.json" in files and "model.safetensors" in files
    fs.invalidate_cache()
    exported = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}/export", detail=False))
    assert exported == sorted(os.listdir(local))
    for name in exported:
        assert fs.cat(f"{BUCKET}/export/{name}") == (local / name).read_bytes(), name


SWEEP = """
import ml_collections

def get_sweep():
    s = ml_collections.ConfigDict()
    s.config = "{config}"
    s.overrides = {{"train": {{"steps": 4, "eval_every_steps": 4, "checkpoint_every_steps": 2}}}}
    s.space = {{"optim": {{"lr": ("grid", [0.001, 0.003])}}}}
    s.objective = "eval/loss"
    s.workdirs = "gs://{bucket}/sweep"
    return s
"""


@pytest.mark.slow
def test_a_sweep_keeps_its_trials_workdirs_in_the_bucket(gcs, config_file, tmp_path):
    from jsft.sweep import lib as sweep_lib  # noqa: PLC0415

    sweep_file = tmp_path / "gcs_sweep.py"
    sweep_file.write_text(SWEEP.format(config=config_file, bucket=BUCKET))
    root = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "jsft.sweep", f"--sweep={sweep_file}", f"--dir={root}", "--workers=2"]
    r = zygote.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    import optuna  # noqa: PLC0415

    backend = optuna.storages.journal.JournalFileBackend(str(root / "study.journal"))
    trials = optuna.load_study(
        study_name="gcs_sweep", storage=optuna.storages.journal.JournalStorage(backend)
    )
    trials = trials.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    fs = _bucket(gcs)
    sweep = sweep_lib.load_sweep(str(sweep_file))
    for t in trials:
        paths = sweep_lib.trial_paths(sweep, str(root), t.number, t.params)
        assert paths.workdir.startswith(f"gs://{BUCKET}/sweep/trials/")
        # checkpoints (keep 1, plus the best step 0) in the bucket, none beside the trial's logs
        assert _steps(fs, paths.workdir.removeprefix("gs://") + "/checkpoints") == [0, 4]
        assert not any(name == "checkpoints" for _, dirs, _ in os.walk(paths.dir) for name in dirs)
        with open(os.path.join(paths.metrics, "metrics.jsonl")) as f:
            last = [json.loads(line) for line in f if "eval/loss" in line][-1]
        assert t.value == last["eval/loss"] and last["step"] == 4
        assert os.path.basename(paths.dir) in (root / "report.md").read_text()
