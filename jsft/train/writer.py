"""Metric sinks: `metrics.jsonl` (one JSON object per line), TensorBoard and, optionally, Weights &
Biases; process 0 only.

`metrics.jsonl` is strict JSON: a NaN or infinite value is written as `null`, and the line lists the
keys concerned under `"nonfinite"`, so any JSON reader loads it. It is the exact record (a resumed run
rewrites the lines after its checkpoint); W&B is a view of it for people: its run id is kept in
`WORKDIR/wandb_id`, so a run resumed from a checkpoint goes on in the same W&B run when online (W&B
ignores the steps it already holds; offline, each start is its own offline-run directory under that
id); a fresh start gets a new id.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import secrets

from jsft.errors import ConfigError, import_without

WANDB_MODES = ("disabled", "offline", "online")


class MetricWriter:
    def __init__(
        self, workdir: str, enabled: bool, wandb_settings: dict | None = None, resumed: bool = False
    ):
        """`wandb_settings`: config.logging.wandb plus `config` (the resolved config, as a dict);
        None or mode 'disabled': no W&B. `resumed`: the run goes on from a checkpoint (its W&B run
        id is reused); otherwise a new W&B run starts."""
        self.enabled = enabled
        self._wandb = None
        if not enabled:
            return
        if wandb_settings and wandb_settings.get("mode", "disabled") != "disabled":
            self._wandb = _start_wandb(workdir, wandb_settings, resumed)  # first: it may fail (one line)
        # Imported lazily (only process 0 writes), and without torch: tensorboardX tries it for torch
        # tensors, ~2 s of every start where the hf extra is installed; jsft logs floats.
        SummaryWriter = import_without("tensorboardX", ("torch",)).SummaryWriter
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step`: a resumed run rewrites them, so none appear twice."""
        if not self.enabled:
            return
        path = self._jsonl.name
        self._jsonl.close()
        with open(path) as f:
            kept = [line for line in f if _step_of(line) is not None and _step_of(line) <= step]
        with open(f"{path}.tmp", "w") as f:
            f.writelines(kept)
        os.replace(f"{path}.tmp", path)
        self._jsonl = open(path, "a", buffering=1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json_line(step, metrics) + "\n")
        for key, value in metrics.items():
            self._tb.add_scalar(key, value, int(step))
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            if self._wandb is not None:
                try:
                    self._wandb.finish()
                except Exception as e:  # noqa: BLE001 - the run's own files are complete; W&B is a view
                    logging.warning("W&B did not finish cleanly: %s", e)
                self._wandb = None


def _start_wandb(workdir: str, settings: dict, resumed: bool):
    """A W&B run in WORKDIR/wandb: the workdir's run again (same id) when the run resumes from a
    checkpoint, else a new one (a fresh start in an old workdir does not reopen the old W&B run)."""
    import wandb  # noqa: PLC0415 - an extra: pip install 'jsft[wandb]'

    id_path = os.path.join(workdir, "wandb_id")
    if resumed and os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = secrets.token_hex(6)  # W&B ids: lowercase letters and digits
        with open(f"{id_path}.tmp", "w") as f:
            f.write(run_id + "\n")
        os.replace(f"{id_path}.tmp", id_path)
    config = dict(settings.get("config") or {})
    if settings.get("trial"):
        config["sweep_trial"] = settings["trial"]
    tags = [t for t in str(settings.get("tags", "")).split(",") if t]
    kwargs = dict(
        project=settings.get("project") or "jsft",
        entity=settings.get("entity") or None,
        name=settings.get("name") or os.path.basename(os.path.normpath(workdir)),
        group=settings.get("group") or None,
        tags=tags + ([f"trial-{settings['trial']}"] if settings.get("trial") else []),
        mode=settings["mode"],
        dir=workdir,
        id=run_id,
        resume="allow",
        config=config,
        settings=wandb.Settings(console="off", silent=True),
    )
    try:
        return wandb.init(**kwargs)
    except Exception as e:  # noqa: BLE001 - no API key, no network, a bad entity: one line, not a traceback
        raise ConfigError(
            f"config.logging.wandb (mode {settings['mode']!r}): W&B could not start: "
            f"{str(e).rstrip('.')}. Use mode='offline' (and `wandb sync` later) or 'disabled'"
        ) from e


def json_line(step: int, metrics: dict[str, float]) -> str:
    """One strict-JSON line: non-finite values become null and are named under "nonfinite"."""
    row: dict = {"step": int(step)}
    bad = []
    for key, value in metrics.items():
        if isinstance(value, numbers.Real) and not math.isfinite(value):
            row[key] = None
            bad.append(key)
        else:
            row[key] = value
    if bad:
        row["nonfinite"] = bad
    return json.dumps(row, allow_nan=False)


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a blank line or one cut short by a kill -9."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
