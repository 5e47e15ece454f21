"""Pack tokenized examples into fixed-length rows without cross-example attention.

A row is five int32 arrays of length `seq_len`:
  inputs      token fed at each position
  targets     token to predict there (the next token of the same example)
  loss_mask   1 where `targets` is a trained (response) token
  segment_ids 1, 2, ... per example in the row; 0 for padding
  positions   0, 1, ... restarting for every example (RoPE sees each example as if alone)
"""

from __future__ import annotations

import dataclasses

import numpy as np

ROW_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class Example:
    ids: np.ndarray  # int32 [n]
    mask: np.ndarray  # bool [n], True where ids[i] is trained


@dataclasses.dataclass
class PackStats:
    examples: int = 0
    truncated: int = 0  # longer than seq_len + 1 tokens, cut at the end
    dropped: int = 0  # nothing left to train after truncation

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def fit_example(ex: Example, seq_len: int, stats: PackStats) -> Example | None:
    """Cut an over-long example to seq_len + 1 tokens (seq_len positions), keeping its start."""
    stats.examples += 1
    if len(ex.ids) > seq_len + 1:
        stats.truncated += 1
        ex = Example(ex.ids[: seq_len + 1], ex.mask[: seq_len + 1])
    if not ex.mask[1:].any():
        stats.dropped += 1
        return None
    return ex


def best_fit_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Assign items (in order) to bins: each goes to the open bin with the least room that fits it.

    Open bins are bucketed by remaining room, so each placement costs O(capacity), not O(bins).
    """
    bins: list[list[int]] = []
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]
    for i, n in enumerate(lengths):
        if not 0 < n <= capacity:
            raise ValueError(f"item {i} has length {n}, outside 1..{capacity}")
        room = next((r for r in range(n, capacity + 1) if by_room[r]), None)
        if room is None:
            b, room = len(bins), capacity
            bins.append([])
        else:
            b = by_room[room].pop()
        bins[b].append(i)
        if room - n:
            by_room[room - n].append(b)
    return bins


def pack(examples: list[Example], seq_len: int) -> dict[str, np.ndarray]:
    """Best-fit pack examples (already fitted to seq_len) into rows; returns arrays [rows, seq_len]."""
    bins = best_fit_bins([len(ex.ids) - 1 for ex in examples], seq_len)
    rows = {k: np.zeros((len(bins), seq_len), np.int32) for k in ROW_KEYS}
    for r, members in enumerate(bins):
        start = 0
        for seg, i in enumerate(members, start=1):
            ids, mask = examples[i].ids, examples[i].mask
            n = len(ids) - 1
            sl = slice(start, start + n)
            rows["inputs"][r, sl] = ids[:-1]
            rows["targets"][r, sl] = ids[1:]
            rows["loss_mask"][r, sl] = mask[1:]
            rows["segment_ids"][r, sl] = seg
            rows["positions"][r, sl] = np.arange(n)
            start += n
    return rows
