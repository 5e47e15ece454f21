"""Orbax checkpoints of the train state plus the data iterator's position.

Each checkpoint is a step directory holding `state` (the TrainState pytree) and `data` (JSON).
Orbax writes into a temporary directory and renames it when complete, so a crash or SIGTERM during
a save leaves the previous checkpoint as the latest one, never a half-written one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.directory = directory
        self._manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """`abstract_state`: a pytree of jax.ShapeDtypeStruct with shardings (the restore target)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


class BestCheckpoint:
    """Keeps the checkpoint with the best value of one metric, apart from the keep-K rotation.

    `best.json` beside it records the step, the value and how many evaluations have passed without
    improvement (for early stopping), so a resumed run carries on comparing against the same best.
    """

    def __init__(self, directory: str, metric: str, mode: str, is_main: bool = True, record_path: str = ""):
        """`record_path`: where best.json lives (default: inside `directory`; a remote directory needs a
        local one)."""
        if mode not in ("max", "min"):
            raise ValueError(f"config.train.best_mode={mode!r} must be 'max' or 'min'")
        self.metric, self.mode, self.is_main = metric, mode, is_main
        self.checkpointer = Checkpointer(directory, keep=1, async_save=False)
        self.record_path = record_path or os.path.join(directory, "best.json")
        self.record = {"step": None, "value": None, "evals_since_best": 0}
        if os.path.exists(self.record_path):
            with open(self.record_path) as f:
                self.record = json.load(f)

    def _better(self, value: float) -> bool:
        best = self.record["value"]
        return best is None or (value > best if self.mode == "max" else value < best)

    def update(self, step: int, metrics: dict, state: Any, data_state: dict) -> bool:
        """Save `state` if `metrics[metric]` beats the best so far; True if it did."""
        if self.metric not in metrics:
            raise KeyError(
                f"config.train.best_metric={self.metric!r} is not among the eval metrics {sorted(metrics)}"
            )
        value = float(metrics[self.metric])
        improved = self._better(value)
        if improved:
            self.checkpointer.save(step, state, data_state)
            self.checkpointer.wait()
            self.record = {"step": step, "value": value, "evals_since_best": 0}
        else:
            self.record["evals_since_best"] += 1
        if self.is_main:
            tmp = f"{self.record_path}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.record, f)
            os.replace(tmp, self.record_path)
        return improved

    def close(self) -> None:
        self.checkpointer.close()
