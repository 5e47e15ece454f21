"""Sweeps: many jsft runs over a search space, on an Optuna study in a real store.

    python -m jsft.sweep --sweep configs/sweeps/demo_lr.py --dir DIR [--workers N] [--storage URL]
    python -m jsft.sweep --sweep configs/sweeps/demo_lr.py --dir DIR --report

A sweep file's `get_sweep()` returns a ConfigDict:

    config      the run config, "path[:arg]" (relative to the working directory or the sweep file)
    overrides   {dotted field: value} applied to every trial
    space       {dotted field: (kind, ...)}: ("choice", [v, ...]), ("grid", [v, ...]), ("uniform", lo, hi),
                ("loguniform", lo, hi), ("int", lo, hi); seeds are a field like any other ("seed")
    sampler     grid | random | tpe (seeded by `seed`)
    objective   a metric of metrics.jsonl (its last value), `direction` minimize | maximize
    trials      the budget (grid: at most the grid's size; 0: the whole grid)
    workdirs    "" (the trials' workdirs are their trial directories) or a root such as
                gs://bucket/sweeps/lr: each trial's checkpoints go to <workdirs>/trials/<number>-<hash>,
                its logs and metrics to a mirror in its trial directory (JSFT_LOCAL_DIR)
    pruner      "" | median: stop a trial whose objective at an evaluation is worse than the median
                of finished trials' at that step (Optuna's MedianPruner; only after
                `pruner_startup_trials` finished trials (5) and `pruner_warmup_steps` steps (0); the
                objective must be an eval/ metric). With one worker the verdicts are reproducible.

The study lives in `DIR/study.journal` (Optuna's journal file store, safe for several processes on one
machine or a shared file system) or in any RDB URL given with `--storage` (PostgreSQL, MySQL, SQLite)
for many machines. Grid and random trials are drawn up front from the seed and queued in the store,
so the same sweep file gives the same trial configs whatever the number of workers (TPE depends on
the order trials finish: reproducible with one worker). Each trial is an ordinary jsft run,
`python -m jsft.main ...`, in `DIR/trials/<number>-<hash of its overrides>/` (the command is printed
and written to `command.txt`), so it reruns alone, and a killed sweep resumes: finished trials are
kept, a trial whose worker died (its lock file is free) is taken over and resumes from its checkpoint.
Workers coordinate only through the store and file locks (`fcntl.flock`) in DIR. Where the run config
has `logging.wandb` (turn it on with `overrides`, e.g. {"logging": {"wandb": {"mode": "offline"}}}),
each trial's W&B run is grouped by the sweep's name and labelled with its trial ("<sweep>/<number>").
`--report` (and the end of every sweep) writes `DIR/report.md`: the trial table; per value of each
swept field but seed, the objective's mean, spread, min, max and the tokens trained; PNGs of the
objective vs each field (seed spread as error bars), every trial's curves and the best trial's.
A field the config lacks, an empty space, an objective no run logs, a pruner on a train/ metric or a
store that cannot be opened is one `jsft: error:` line before any trial starts.

Beyond one machine: launch/slurm_sweep.sbatch (a SLURM job array of workers) and launch/tpu_sweep.sh
(a worker per TPU slice, on an RDB store), both with --dry-run. Showcase: configs/sweeps/
knowledge_injection.py (README, "Sweeps").
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from typing import Any

import ml_collections
from absl import app, flags

from jsft.errors import help_exits_zero
from jsft.sweep import lib as sweep_lib
from jsft.sweep import report as sweep_report

_SWEEP = flags.DEFINE_string("sweep", None, "The sweep file (a Python file with get_sweep()).")
_DIR = flags.DEFINE_string("dir", None, "The sweep directory: store, trials, report.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Worker processes on this machine.")
_STORAGE = flags.DEFINE_string("storage", "", "An Optuna RDB URL (default: DIR/study.journal).")
_REPORT = flags.DEFINE_bool("report", False, "Write DIR/report.md and print the table; run nothing.")


def run_trial(
    study: Any,
    sweep: ml_collections.ConfigDict,
    sweep_file: str,
    root: str,
    number: int,
    params: dict,
    trial_id: int,
) -> str:
    """Run (or resume) one trial as a jsft subprocess, report its evaluations to the pruner, tell
    the store how it ended; returns the final state's name."""
    import optuna  # noqa: PLC0415

    paths = sweep_lib.trial_paths(sweep, root, number, params)
    os.makedirs(paths.dir, exist_ok=True)
    cmd = sweep_lib.command(sweep, sweep_file, paths.workdir, params, number)
    env_text = "".join(f"{k}={v} " for k, v in paths.env.items())
    with open(os.path.join(paths.dir, "command.txt"), "w") as f:
        f.write(env_text + " ".join(cmd) + "\n")
    with open(os.path.join(paths.dir, "trial.log"), "a") as log:
        log.write(f"start {time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()}\n")
    print(f"trial {number}: {env_text}{' '.join(cmd)}", flush=True)
    trial = optuna.trial.Trial(study, trial_id)
    reported: set[int] = set()
    with open(os.path.join(paths.dir, "run.log"), "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **paths.env})
        pruned = False
        while proc.poll() is None and not pruned:
            time.sleep(2.0)
            pruned = _report(trial, sweep, paths.metrics, reported)
        if pruned:
            proc.terminate()  # jsft stops at the next step on SIGTERM
        proc.wait()
    # Evaluations the polling missed are reported too, so the verdict does not depend on timing; a run
    # that failed stays FAIL, and its final evaluation (the objective itself) is never a reason to prune.
    if not pruned and proc.returncode == 0:
        pruned = _report(trial, sweep, paths.metrics, reported, finished=True)
    value, _ = sweep_lib.last_value(paths.metrics, sweep.objective)
    if pruned:
        study.tell(number, state=optuna.trial.TrialState.PRUNED)
        return "PRUNED"
    if proc.returncode != 0 or value is None:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
        print(f"trial {number} failed (exit {proc.returncode}); see {paths.dir}/run.log", flush=True)
        return "FAIL"
    study.tell(number, value)
    return "COMPLETE"


def _report(
    trial: Any, sweep: ml_collections.ConfigDict, metrics_dir: str, reported: set[int], finished: bool = False
) -> bool:
    """Feed the pruner the objective's new evaluations (after step 0); True once it says prune. A
    `finished` run's last evaluation is reported but not judged."""
    if not sweep.pruner or not sweep.objective.startswith("eval/"):
        return False
    seen = sweep_lib.last_value(metrics_dir, sweep.objective)[1]
    for step, value in seen:
        if step not in reported and step > 0:
            trial.report(value, step)
            reported.add(step)
            if not (finished and step == seen[-1][0]) and trial.should_prune():
                return True
    return False


def worker(sweep_file: str, root: str, storage_url: str) -> int:
    """Take trials until none is left; returns how many this worker ran."""
    sweep = sweep_lib.load_sweep(sweep_file)
    study = sweep_lib.open_study(sweep, root, storage_url, sweep_file)
    budget = len(sweep_lib.planned_trials(sweep)) if sweep.sampler != "tpe" else sweep.trials
    ran = 0
    while True:
        with sweep_lib.file_lock(os.path.join(root, ".sweep.lock")):
            chosen = sweep_lib.next_trial(study, sweep, root, budget)
            if chosen is None:
                return ran
            number, params, trial_id = chosen
            lock_path = os.path.join(sweep_lib.trial_dir(root, number, params), ".lock")
            os.makedirs(os.path.dirname(lock_path), exist_ok=True)
            lock = open(lock_path, "a")  # noqa: SIM115 - held for the trial's whole run
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            run_trial(study, sweep, sweep_file, root, number, params, trial_id)
            ran += 1
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()


def run_sweep(sweep_file: str, root: str, workers: int, storage_url: str) -> None:
    """Check the sweep, then run `workers` workers on this machine (this process is one of them)."""
    sweep = sweep_lib.load_sweep(sweep_file)
    sweep_lib.check(sweep, sweep_lib.base_config(sweep, sweep_file))
    os.makedirs(root, exist_ok=True)
    sweep_lib.open_study(
        sweep, root, storage_url, sweep_file
    )  # an unusable store fails here, before any trial
    extra = [
        subprocess.Popen(
            [sys.executable, "-m", "jsft.sweep", f"--sweep={sweep_file}", f"--dir={root}", "--workers=1"]
            + ([f"--storage={storage_url}"] if storage_url else [])
        )
        for _ in range(workers - 1)
    ]
    worker(sweep_file, root, storage_url)
    for p in extra:
        p.wait()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _SWEEP.value or not _DIR.value:
        sys.exit("jsft: error: --sweep and --dir are required (python -m jsft.sweep --help)")
    root = os.path.abspath(_DIR.value)
    try:
        if not _REPORT.value:
            run_sweep(_SWEEP.value, root, _WORKERS.value, _STORAGE.value)
        sweep = sweep_lib.load_sweep(_SWEEP.value)
        study = sweep_lib.open_study(sweep, root, _STORAGE.value, _SWEEP.value)
        print(sweep_report.write(study, sweep, root))
    except sweep_lib.SweepError as e:
        sys.exit(f"jsft: error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=help_exits_zero(app.parse_flags_with_usage))
