"""Weighted mixtures of sources: sampling probabilities and a deterministic, resumable sampler.

Rules for turning sources into probabilities (config.data.mixture):
  weights      proportional to each source's `weight`, as given
  examples     proportional to each source's size, capped at `mixture_cap` examples (FLAN's
               examples-proportional mixing: a huge source cannot drown the small ones)
  temperature  proportional to size ** (1 / mixture_temperature) (T = 1: by size; larger T: flatter)

The sampler's whole state is a draw counter and, per source, (epoch, position): source choices for
draw k come from a generator seeded by (seed, k // CHUNK), and each source walks a permutation seeded
by (seed, source, epoch) (or, with a `window`, the windowed shuffle of shuffle.py, which needs no
permutation in memory). Any state can be rebuilt from those integers alone.
"""

from __future__ import annotations

import numpy as np

from jsft.data import shuffle

RULES = ("weights", "examples", "temperature")
CHUNK = 4096


def mixture_probabilities(
    sizes: list[int], weights: list[float], rule: str, cap: int = 0, temperature: float = 1.0
) -> np.ndarray:
    sizes_a = np.asarray(sizes, np.float64)
    if rule == "weights":
        raw = np.asarray(weights, np.float64)
    elif rule == "examples":
        raw = np.minimum(sizes_a, cap) if cap > 0 else sizes_a
    elif rule == "temperature":
        if temperature <= 0:
            raise ValueError(f"config.data.mixture_temperature={temperature} must be > 0")
        raw = sizes_a ** (1.0 / temperature)
    else:
        raise ValueError(f"config.data.mixture={rule!r} is not one of {RULES}")
    raw = np.where(sizes_a > 0, raw, 0.0)  # an empty source (e.g. in a small shard) is never drawn
    if np.any(raw < 0) or raw.sum() <= 0:
        raise ValueError(
            f"mixture weights {raw.tolist()} must be >= 0 with a positive sum over non-empty sources"
        )
    return raw / raw.sum()


class MixtureSampler:
    """Draws (source index, example index) pairs; every source is walked epoch by epoch."""

    def __init__(
        self, sizes: list[int], probs: np.ndarray, seed: int, stream: int = 0, window: int | None = None
    ):
        """`stream`: which logical data shard this sampler serves (each draws independently);
        `window`: None walks a whole-source permutation per epoch, else the windowed shuffle
        (0: one window of the whole source)."""
        self.sizes, self.probs, self.seed, self.stream = list(sizes), np.asarray(probs), seed, stream
        self.window = window
        self.draws = 0
        self.positions = [[0, 0] for _ in sizes]  # per source: [epoch, index in that epoch's order]
        self._choices_chunk, self._choices = None, None
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def _source_at(self, draw: int) -> int:
        chunk = draw // CHUNK
        if self._choices_chunk != chunk:
            rng = np.random.default_rng([self.seed, self.stream, 1, chunk])
            self._choices = rng.choice(len(self.sizes), size=CHUNK, p=self.probs)
            self._choices_chunk = chunk
        return int(self._choices[draw % CHUNK])

    def _order(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != source}  # keep one per source
            self._orders[key] = np.random.default_rng([self.seed, self.stream, 2, source, epoch]).permutation(
                self.sizes[source]
            )
        return self._orders[key]

    def next(self) -> tuple[int, int]:
        source, epoch, pos = self._step()
        if self.window is None:
            return source, int(self._order(source, epoch)[pos])
        parts = (self.seed, self.stream, source, epoch)
        return source, shuffle.windowed_index(pos, self.sizes[source], self.window, parts)

    def advance(self, n: int) -> None:
        """Skip n draws (counters only: nothing is looked up)."""
        for _ in range(n):
            self._step()

    def _step(self) -> tuple[int, int, int]:
        source = self._source_at(self.draws)
        self.draws += 1
        epoch, pos = self.positions[source]
        self.positions[source] = [epoch + 1, 0] if pos + 1 == self.sizes[source] else [epoch, pos + 1]
        return source, epoch, pos

    def state(self) -> dict:
        return {"draws": self.draws, "positions": [list(p) for p in self.positions]}

    def restore(self, state: dict) -> None:
        if len(state["positions"]) != len(self.sizes):
            raise ValueError(
                f"the checkpoint's data state has {len(state['positions'])} sources, the "
                f"config {len(self.sizes)}"
            )
        self.draws = int(state["draws"])
        self.positions = [[int(e), int(p)] for e, p in state["positions"]]
