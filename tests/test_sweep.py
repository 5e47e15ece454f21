"""Sweeps: two workers share the store and run each trial once; kill -9 mid-sweep and the rerun
finishes without redoing finished trials (the interrupted one resumes) with the same results; bad sweep
files and stores are one line before any trial."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests import zygote

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEP = """
import ml_collections

def get_sweep():
    s = ml_collections.ConfigDict()
    s.config = "{config}"
    s.overrides = {{"train": {{"steps": 6, "eval_every_steps": 3, "checkpoint_every_steps": 3}}}}
    s.space = {space}
    s.sampler = "grid"
    s.objective = "{objective}"
{extra}
    return s
"""
SPACE = '{"optim": {"lr": ("grid", [0.001, 0.003])}, "seed": ("grid", [0, 1])}'


def _sweep_file(tmp_path, data_dir, space=SPACE, objective="eval/loss", name="sweep.py", extra=""):
    config = f"{os.path.join(REPO, 'tests', 'tiny_config.py')}:{data_dir}"
    path = tmp_path / name
    path.write_text(SWEEP.format(config=config, space=space, objective=objective, extra=extra))
    return str(path)


def _sweep(sweep_file, root, *extra, **kw):
    cmd = [sys.executable, "-m", "jsft.sweep", f"--sweep={sweep_file}", f"--dir={root}", *extra]
    return zygote.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, **kw)


def _trials(root):
    import optuna  # noqa: PLC0415

    backend = optuna.storages.journal.JournalFileBackend(os.path.join(root, "study.journal"))
    study = optuna.load_study(study_name="sweep", storage=optuna.storages.journal.JournalStorage(backend))
    return study.get_trials()


def _starts(root):
    out = {}
    for d in sorted(os.listdir(os.path.join(root, "trials"))):
        with open(os.path.join(root, "trials", d, "trial.log")) as f:
            out[d] = sum(line.startswith("start") for line in f)
    return out


@pytest.mark.slow
def test_two_workers_then_a_kill_9_and_a_rerun_give_the_same_table(tiny_data_dir, tmp_path):
    sweep_file = _sweep_file(tmp_path, tiny_data_dir)
    shared = tmp_path / "shared"
    r = _sweep(sweep_file, shared, "--workers=2")
    assert r.returncode == 0, r.stderr[-3000:]
    trials = _trials(shared)
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    assert set(_starts(shared).values()) == {1}  # no trial ran twice
    assert (shared / "report.md").exists() and (shared / "curves.png").exists()
    # The same command again: everything is finished, nothing reruns.
    assert _sweep(sweep_file, shared, "--workers=2").returncode == 0
    assert set(_starts(shared).values()) == {1}

    # One worker, killed with -9 (the whole process group) while its second trial runs.
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jsft.sweep", f"--sweep={sweep_file}", f"--dir={killed}"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 600
    while time.time() < deadline:
        time.sleep(1.0)
        done = (killed / "study.journal").exists() and sum(
            t.state.name == "COMPLETE" for t in _trials(killed)
        )
        second = killed / "trials"
        if done and second.exists() and len(os.listdir(second)) >= 2:
            ckpt = [os.path.join(second, d, "checkpoints") for d in sorted(os.listdir(second))][1]
            if os.path.exists(ckpt) and any(s.isdigit() for s in os.listdir(ckpt)):
                break  # the second trial has a checkpoint: kill it mid-run
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _starts(killed)
    r = _sweep(sweep_file, killed)
    assert r.returncode == 0, r.stderr[-3000:]
    after = _starts(killed)
    assert len(after) == 4 and all(t.state.name == "COMPLETE" for t in _trials(killed))
    first = sorted(before)[0]
    assert after[first] == 1  # finished before the kill: not redone
    assert after[sorted(before)[1]] == 2  # interrupted: taken over once, resumed from its checkpoint
    values = lambda root: {tuple(sorted(t.params.items())): t.value for t in _trials(root)}  # noqa: E731
    assert values(killed) == values(shared)  # the same table, bitwise


@pytest.mark.parametrize(
    "space,objective,extra,message",
    [
        (
            '{"optim": {"lrr": ("grid", [0.1])}}',
            "eval/loss",
            [],
            "sweep.space: 'optim.lrr' is not a field of",
        ),
        ("{}", "eval/loss", [], "sweep.space is empty"),
        (SPACE, "eval/accuracy", [], "sweep.objective='eval/accuracy' is not a metric the runs log"),
        (SPACE, "eval/loss", ["--storage=nosuchdb://x"], "--storage=nosuchdb://x: cannot open it"),
    ],
)
def test_a_bad_sweep_is_one_line_before_any_trial(tiny_data_dir, tmp_path, space, objective, extra, message):
    sweep_file = _sweep_file(tmp_path, tiny_data_dir, space=space, objective=objective)
    r = _sweep(sweep_file, tmp_path / "dir", *extra)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("jsft: error: ") and message in last, last
    assert not (tmp_path / "dir" / "trials").exists()


@pytest.mark.slow
def test_the_median_pruner_stops_a_trial_worse_than_the_finished_ones(tiny_data_dir, tmp_path):
    # lr 1e-9 does not learn: its step-3 eval loss is above the median of the two trials that finished
    # before it (one worker: the order, and so the verdict, is fixed), so it is pruned there.
    extra = "    s.pruner = 'median'\n    s.pruner_startup_trials = 2\n"
    extra += "    s.overrides['logging'] = {'wandb': {'mode': 'offline'}}"
    space = '{"optim": {"lr": ("grid", [0.003, 0.001, 1e-9])}}'
    sweep_file = _sweep_file(tmp_path, tiny_data_dir, space=space, extra=extra)
    root = tmp_path / "pruned"
    r = _sweep(sweep_file, root)
    assert r.returncode == 0, r.stderr[-3000:]
    states = {t.params["optim.lr"]: t.state.name for t in _trials(root)}
    assert states == {0.003: "COMPLETE", 0.001: "COMPLETE", 1e-9: "PRUNED"}, states
    pruned = next(t for t in _trials(root) if t.state.name == "PRUNED")
    assert set(pruned.intermediate_values) == {3}  # stopped at its first evaluation after step 0
    assert "PRUNED" in (root / "report.md").read_text()
    # Every trial's W&B run (offline) is grouped by the sweep and labelled with its trial.
    with open(os.path.join(root, "trials", sorted(os.listdir(root / "trials"))[2], "command.txt")) as f:
        cmd = f.read()
    assert "--config.logging.wandb.group=sweep" in cmd and "--config.logging.wandb.trial=sweep/2" in cmd
    assert os.path.isdir(os.path.join(root, "trials", sorted(os.listdir(root / "trials"))[2], "wandb"))


def test_a_pruner_on_a_train_metric_is_one_line(tiny_data_dir, tmp_path):
    sweep_file = _sweep_file(tmp_path, tiny_data_dir, objective="train/loss", extra="    s.pruner = 'median'")
    r = _sweep(sweep_file, tmp_path / "dir")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "the objective must be an eval/ metric" in r.stderr.strip().splitlines()[-1]


def _bash(*args, **env):
    """A launch script's --dry-run, with only `env` (and PATH) set."""
    env = {"PATH": os.environ["PATH"], **env}
    return zygote.run(["bash", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_the_cluster_launchers_dry_run_print_what_they_would_submit(tmp_path):
    # launch/lib.sh gives every script the same --dry-run, run() and missing-variable message.
    sweep = dict(SWEEP="configs/sweeps/demo_lr.py", DIR=str(tmp_path), WORKERS="3")
    r = _bash("launch/slurm_sweep.sbatch", "--dry-run", "--gpus-per-node=8", **sweep)
    assert r.returncode == 0, r.stderr
    assert (
        "+ sbatch --array=0-2 --export=ALL --gpus-per-node=8" in r.stdout and "slurm_sweep.sbatch" in r.stdout
    )
    r = _bash("launch/slurm_sweep.sbatch", "--dry-run", SLURM_ARRAY_TASK_ID="1", **sweep)
    assert r.returncode == 0 and "-m jsft.sweep --sweep configs/sweeps/demo_lr.py" in r.stdout, r.stderr
    assert "--workers 1" in r.stdout
    # A task runs sbatch's spooled copy of the script: the submit step exported REPO, so the copy finds
    # the repository (and launch/lib.sh) whatever directory the job was submitted from.
    spooled = tmp_path / "slurm_script"
    spooled.write_text(open(os.path.join(REPO, "launch", "slurm_sweep.sbatch")).read())
    r = _bash(str(spooled), "--dry-run", SLURM_ARRAY_TASK_ID="0", SLURM_SUBMIT_DIR="/", REPO=REPO, **sweep)
    assert r.returncode == 0 and "-m jsft.sweep" in r.stdout, r.stderr
    tpu = dict(SLICES="a b", ZONE="z", PROJECT="p", STORAGE="sqlite:///x.db", DIR=str(tmp_path))
    r = _bash("launch/tpu_sweep.sh", "--dry-run", "--sweep", "configs/sweeps/demo_lr.py", **tpu)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("python\\ -m\\ jsft.sweep") + r.stdout.count("python -m jsft.sweep") == 2
    install = "pip\\ install\\ -q\\ -e\\ \\'.\\[gcs\\]\\'"  # the extra a gs:// workdir needs
    assert r.stdout.count(install) == 2, r.stdout
    missing = _bash("launch/tpu_sweep.sh", "--dry-run")
    assert missing.returncode == 2 and "set SLICES ZONE PROJECT STORAGE DIR" in missing.stderr
    pod = dict(TPU_NAME="v5p", ZONE="z", PROJECT="p")
    r = _bash("launch/tpu_pod.sh", "--dry-run", "--config", "configs/demo.py", "--workdir", "gs://b/r", **pod)
    assert r.returncode == 0, r.stderr
    assert "ssh v5p --zone=z --project=p --worker=all" in r.stdout and "jsft.main\\ --config" in r.stdout
    assert r.stdout.count(install) == 1, r.stdout
    missing = _bash("launch/tpu_pod.sh", "--dry-run", ZONE="z")
    assert missing.returncode == 2 and "set TPU_NAME PROJECT (e.g." in missing.stderr


@pytest.mark.parametrize(
    "name",
    sorted(n for n in os.listdir(os.path.join(REPO, "configs", "sweeps")) if n.endswith(".py")),
    ids=lambda n: n.removesuffix(".py"),
)
def test_every_shipped_sweep_file_passes_its_checks(name):
    from jsft.sweep import lib as sweep_lib  # noqa: PLC0415

    path = os.path.join(REPO, "configs", "sweeps", name)
    sweep = sweep_lib.load_sweep(path)
    config = sweep_lib.base_config(sweep, path)
    sweep_lib.check(sweep, config)
    planned = sweep_lib.planned_trials(sweep)
    assert planned and len({tuple(sorted(p.items())) for p in planned}) == len(planned)
    for params in planned:  # every file a trial would read exists
        assert all(os.path.exists(v) for k, v in params.items() if k.endswith(".path")), params


def test_the_knowledge_data_regenerates_byte_for_byte(tmp_path):
    here = os.path.join(REPO, "data", "knowledge")
    r = zygote.run(
        [sys.executable, os.path.join(here, "make_knowledge_data.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    made = sorted(os.listdir(tmp_path))
    files = [f for f in os.listdir(here) if os.path.isfile(os.path.join(here, f))]
    assert made == sorted(f for f in files if not f.endswith(".py"))
    for f in made:
        with open(tmp_path / f, "rb") as a, open(os.path.join(here, f), "rb") as b:
            assert a.read() == b.read(), f
