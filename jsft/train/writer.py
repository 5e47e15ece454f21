"""Metric sinks: `metrics.jsonl` (one JSON object per line) and TensorBoard; process 0 only."""

from __future__ import annotations

import json
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
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(f"{path}.tmp", "w") as f:
            f.writelines(kept)
        os.replace(f"{path}.tmp", path)
        self._jsonl = open(path, "a", buffering=1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": int(step), **metrics}) + "\n")
        for key, value in metrics.items():
            self._tb.add_scalar(key, value, int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
