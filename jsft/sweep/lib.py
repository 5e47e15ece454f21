"""The sweep library behind `python -m jsft.sweep` (jsft/sweep/__main__.py has the user
documentation): the sweep file and its checks, the planned trials, trial directories and commands, the
Optuna study in its store, file locks, and choosing the next trial."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import numpy as np

from jsft.train import report

KINDS = ("choice", "grid", "uniform", "loguniform", "int")
SAMPLERS = ("grid", "random", "tpe")


class SweepError(ValueError):
    """A sweep file or store that cannot work: one line, before any trial starts."""


# ---------------------------------------------------------------------- the sweep file


def _load_module(path: str):
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flatten(
    tree: dict, prefix: str = "", leaf: Callable[[Any], bool] = lambda v: not isinstance(v, dict)
) -> dict:
    """{"optim": {"lr": x}} -> {"optim.lr": x}; `leaf(v)` says where to stop."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if leaf(value):
            out[name] = value
        else:
            out.update(flatten(value, name + ".", leaf))
    return out


def _is_spec(value) -> bool:
    return isinstance(value, tuple | list) and bool(value) and isinstance(value[0], str)


def load_sweep(path: str) -> ml_collections.ConfigDict:
    """The sweep file's settings, with `space` and `overrides` flattened to dotted field names."""
    if not os.path.isfile(path):
        raise SweepError(f"--sweep={path}: no such file")
    loaded = _load_module(path).get_sweep()
    raw = loaded.to_dict() if isinstance(loaded, ml_collections.ConfigDict) else dict(loaded)
    space = flatten(raw.pop("space", {}) or {}, leaf=lambda v: _is_spec(v) or not isinstance(v, dict))
    overrides = flatten(raw.pop("overrides", {}) or {})
    defaults = dict(
        sampler="grid",
        seed=0,
        direction="minimize",
        trials=0,
        pruner="",
        pruner_startup_trials=5,
        pruner_warmup_steps=0,
        objective="eval/loss",
        workdirs="",
    )
    sweep = ml_collections.ConfigDict({**defaults, **raw})
    sweep.space_items = list(space.items())  # (dotted field, spec) pairs: ConfigDict keys hold no dots
    sweep.override_items = list(overrides.items())
    return sweep


def space_of(sweep: ml_collections.ConfigDict) -> dict:
    return dict(sweep.space_items)


def overrides_of(sweep: ml_collections.ConfigDict) -> dict:
    return dict(sweep.override_items)


def config_path(sweep: ml_collections.ConfigDict, sweep_file: str) -> tuple[str, str | None]:
    """(absolute config file, argument or None) of `sweep.config`."""
    path, _, arg = sweep.config.partition(":")
    for base in (os.getcwd(), os.path.dirname(os.path.abspath(sweep_file))):
        candidate = os.path.join(base, path)
        if os.path.isfile(candidate):
            return os.path.abspath(candidate), arg or None
    raise SweepError(f"sweep.config={sweep.config!r}: no such config file")


def base_config(sweep: ml_collections.ConfigDict, sweep_file: str) -> ml_collections.ConfigDict:
    path, arg = config_path(sweep, sweep_file)
    return _load_module(path).get_config(arg)


def _field(config: ml_collections.ConfigDict, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def check(sweep: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    """Every mistake a sweep file can make that would otherwise show up in a trial, as SweepError."""
    from jsft import config as config_lib  # noqa: PLC0415

    space = space_of(sweep)
    if not space:
        raise SweepError("sweep.space is empty: name at least one field to vary")
    for where, keys in (("sweep.space", space), ("sweep.overrides", overrides_of(sweep))):
        for key in keys:
            try:
                _field(config, key)
            except KeyError:
                raise SweepError(f"{where}: {key!r} is not a field of {sweep.config}") from None
    for key, spec in space.items():
        if not spec or spec[0] not in KINDS:
            raise SweepError(f"sweep.space.{key}: {spec!r}; the kind must be one of {KINDS}")
        if spec[0] in ("choice", "grid") and not list(spec[1]):
            raise SweepError(f"sweep.space.{key}: no values to choose from")
    if sweep.sampler not in SAMPLERS:
        raise SweepError(f"sweep.sampler={sweep.sampler!r} is not one of {SAMPLERS}")
    if sweep.sampler == "grid" and any(s[0] not in ("choice", "grid") for s in space.values()):
        raise SweepError("sweep.sampler='grid' needs every field of sweep.space to be a choice or grid")
    if sweep.pruner not in ("", "median"):
        raise SweepError(f"sweep.pruner={sweep.pruner!r} must be '' (none) or 'median'")
    if sweep.pruner and not sweep.objective.startswith("eval/"):
        raise SweepError(
            f"sweep.pruner={sweep.pruner!r} prunes on intermediate evaluations: the objective "
            f"must be an eval/ metric, not {sweep.objective!r}"
        )
    if sweep.direction not in ("minimize", "maximize"):
        raise SweepError(f"sweep.direction={sweep.direction!r} must be minimize or maximize")
    if sweep.sampler != "grid" and sweep.trials < 1:
        raise SweepError(f"sweep.trials={sweep.trials}: a {sweep.sampler} sweep needs a budget >= 1")
    if not sweep.objective.startswith("train/"):
        probe = ml_collections.ConfigDict(config.to_dict())
        probe.train.best_metric = sweep.objective
        try:
            config_lib._check_best_metric(probe)  # noqa: SLF001 - the one place that knows eval metric names
        except config_lib.ConfigError as e:
            raise SweepError(
                f"sweep.objective={sweep.objective!r} is not a metric the runs log: {e}"
            ) from None


# ---------------------------------------------------------------------- trials


def distributions(space: dict) -> dict:
    import optuna  # noqa: PLC0415

    out = {}
    for key, spec in space.items():
        kind = spec[0]
        if kind in ("choice", "grid"):
            out[key] = optuna.distributions.CategoricalDistribution(list(spec[1]))
        elif kind == "int":
            out[key] = optuna.distributions.IntDistribution(int(spec[1]), int(spec[2]))
        else:
            out[key] = optuna.distributions.FloatDistribution(spec[1], spec[2], log=kind == "loguniform")
    return out


def planned_trials(sweep: ml_collections.ConfigDict) -> list[dict]:
    """Grid and random sweeps: every trial's parameters, drawn from the seed alone (in order)."""
    space = space_of(sweep)
    if sweep.sampler == "grid":
        keys = list(space)
        combos = [
            dict(zip(keys, values, strict=True)) for values in itertools.product(*(space[k][1] for k in keys))
        ]
        return combos[: sweep.trials] if sweep.trials else combos
    if sweep.sampler == "tpe":
        return []
    rng = np.random.default_rng(sweep.seed)
    out = []
    for _ in range(sweep.trials):
        params = {}
        for key, spec in space.items():
            if spec[0] in ("choice", "grid"):
                params[key] = list(spec[1])[int(rng.integers(len(spec[1])))]
            elif spec[0] == "int":
                params[key] = int(rng.integers(int(spec[1]), int(spec[2]) + 1))
            elif spec[0] == "uniform":
                params[key] = float(rng.uniform(spec[1], spec[2]))
            else:
                params[key] = float(np.exp(rng.uniform(np.log(spec[1]), np.log(spec[2]))))
        out.append(params)
    return out


def trial_dir(root: str, number: int, overrides: dict) -> str:
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return os.path.join(root, "trials", f"{number:04d}-{digest}")


@dataclasses.dataclass(frozen=True)
class TrialPaths:
    """Where one trial's pieces live."""

    dir: str  # DIR/trials/<number>-<hash>: command.txt, trial.log, run.log and the trial's lock
    workdir: str  # the run's --workdir: `dir` itself, or <sweep.workdirs>/trials/<number>-<hash>
    metrics: str  # the directory of its metrics.jsonl: the workdir, or a remote one's mirror in `dir`
    env: dict[str, str]  # what the run's environment adds (a remote workdir's JSFT_LOCAL_DIR)


def trial_paths(sweep: ml_collections.ConfigDict, root: str, number: int, overrides: dict) -> TrialPaths:
    """A trial's directories. With `sweep.workdirs` in object storage (gs://...) the checkpoints go
    there, and the run's logs and metrics to a mirror inside the trial directory, so that every
    worker sharing DIR (and the report) reads them."""
    directory = trial_dir(root, number, overrides)
    if not sweep.workdirs:
        return TrialPaths(directory, directory, directory, {})
    name = os.path.basename(directory)
    if "://" not in sweep.workdirs:
        workdir = os.path.join(os.path.abspath(sweep.workdirs), "trials", name)
        return TrialPaths(directory, workdir, workdir, {})
    from jsft.run import local_mirror  # noqa: PLC0415 - jax loads only for sweeps that need it

    workdir = f"{sweep.workdirs.rstrip('/')}/trials/{name}"
    mirrors = os.path.join(directory, "local")
    return TrialPaths(directory, workdir, local_mirror(workdir, mirrors), {"JSFT_LOCAL_DIR": mirrors})


def study_name(sweep_file: str) -> str:
    return os.path.splitext(os.path.basename(sweep_file))[0]


def command(
    sweep: ml_collections.ConfigDict, sweep_file: str, workdir: str, params: dict, number: int | None = None
) -> list[str]:
    """The trial's jsft command; with `number`, and where the config has W&B settings, its W&B run is
    grouped by sweep and labelled with the trial (config.logging.wandb.group/trial)."""
    path, arg = config_path(sweep, sweep_file)
    args = [
        sys.executable,
        "-m",
        "jsft.main",
        f"--config={path}{':' + arg if arg else ''}",
        f"--workdir={workdir}",
    ]
    for key, value in {**overrides_of(sweep), **params}.items():
        args.append(f"--config.{key}={value}")
    try:
        _field(base_config(sweep, sweep_file), "logging.wandb.trial")
    except KeyError:
        number = None
    if number is not None:
        name = study_name(sweep_file)
        args += [f"--config.logging.wandb.group={name}", f"--config.logging.wandb.trial={name}/{number}"]
    return args


def last_value(workdir: str, metric: str) -> tuple[float | None, list[tuple[int, float]]]:
    """(the metric's last value, all its (step, value)) in a trial's metrics.jsonl, which its run may
    still be writing."""
    seen = report.read_metrics(workdir, live=True).get(metric, [])
    return (seen[-1][1] if seen else None), seen


@contextlib.contextmanager
def file_lock(path: str, blocking: bool = True) -> Iterator[bool]:
    """An exclusive flock on `path`; yields False (without waiting) if it is held and not `blocking`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------- the study


def open_study(sweep: ml_collections.ConfigDict, root: str, storage_url: str, sweep_file: str) -> Any:
    """The sweep's study in its store (created, with grid/random trials queued, by the first worker)."""
    import optuna  # noqa: PLC0415

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if storage_url:
            storage = optuna.storages.RDBStorage(storage_url)
        else:
            backend = optuna.storages.journal.JournalFileBackend(os.path.join(root, "study.journal"))
            storage = optuna.storages.journal.JournalStorage(backend)
    except Exception as e:  # noqa: BLE001 - every unusable store is the same one line
        raise SweepError(
            f"--storage={storage_url or os.path.join(root, 'study.journal')}: cannot open it ({e})"
        ) from e
    sampler = optuna.samplers.TPESampler(seed=sweep.seed) if sweep.sampler == "tpe" else None
    pruner = (
        optuna.pruners.MedianPruner(
            n_startup_trials=sweep.pruner_startup_trials, n_warmup_steps=sweep.pruner_warmup_steps
        )
        if sweep.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    name = study_name(sweep_file)
    with file_lock(os.path.join(root, ".sweep.lock")):
        study = optuna.create_study(
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            study_name=name,
            direction=sweep.direction,
            load_if_exists=True,
        )
        if not study.user_attrs.get("queued"):
            for params in planned_trials(sweep):
                study.enqueue_trial(params)
            study.set_user_attr("queued", True)
    return study


def next_trial(
    study: Any, sweep: ml_collections.ConfigDict, root: str, budget: int
) -> tuple[int, dict, int] | None:
    """(trial number, params) for this worker, under the sweep lock: a trial whose worker died first,
    then a new one while the budget lasts; None when there is nothing left."""
    import optuna  # noqa: PLC0415

    TrialState = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.state == TrialState.RUNNING:
            lock = os.path.join(trial_dir(root, t.number, t.params), ".lock")
            with file_lock(lock, blocking=False) as free:
                if free:
                    return t.number, dict(t.params), t._trial_id  # noqa: SLF001
    started = sum(t.state != TrialState.WAITING for t in trials)
    if started >= budget:
        return None
    trial = study.ask(distributions(space_of(sweep)))
    return trial.number, dict(trial.params), trial._trial_id  # noqa: SLF001
