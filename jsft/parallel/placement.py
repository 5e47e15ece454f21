"""Putting a host batch that every process holds whole onto the mesh: each device takes its rows.

Evaluation batches are built the same on every process (no per-host reading), so a batch is placed
with `jax.make_array_from_callback`: each device copies the rows its shard of `batch_sharding` names.
Results come back with the `replicated` sharding so every process can read them. Without a sharding
(one device, tests) arrays pass through unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class BatchPlacement:
    """`put_batch(batch)` places one host batch; batches have a multiple of `divisor` rows.

    `before_batch`, when set, is called before every batch is placed: the one place an evaluation
    polls for a stop request (it may raise to leave the evaluation early).
    """

    batch_sharding: jax.sharding.Sharding | None = None
    replicated: jax.sharding.Sharding | None = None
    divisor: int = 1  # devices the batch axis is split over
    before_batch: Callable[[], None] | None = None

    def __post_init__(self):
        if self.divisor < 1:
            raise ValueError(f"BatchPlacement.divisor={self.divisor} must be at least 1")

    def round_up(self, batch_size: int) -> int:
        """The smallest multiple of `divisor` that is at least `batch_size`: rows split evenly."""
        return -(-batch_size // self.divisor) * self.divisor

    def put(self, array: np.ndarray) -> jax.Array | np.ndarray:
        """One array whose first axis is the batch; `before_batch` is not called."""
        if self.batch_sharding is None:
            return array
        return jax.make_array_from_callback(array.shape, self.batch_sharding, lambda index: array[index])

    def put_batch(self, batch: Mapping[str, np.ndarray]) -> dict:
        """{name: array} with every array placed, after calling `before_batch`."""
        if self.before_batch is not None:
            self.before_batch()
        return {k: self.put(v) for k, v in batch.items()}
