"""Metric sinks: `metrics.jsonl` (one JSON object per line) and TensorBoard; process 0 only.

`metrics.jsonl` is strict JSON: a NaN or infinite value is written as `null`, and the line lists the
keys concerned under `"nonfinite"`, so any JSON reader loads it.
"""

from __future__ import annotations

import json
import math
import numbers
import os


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes

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

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


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
