"""Pack tokenized examples into fixed-length rows without cross-example attention.

A row is five int32 arrays of length `seq_len`:
  inputs      token fed at each position
  targets     token to predict there (the next token of the same example)
  loss_mask   1 where `targets` is a trained (response) token
  segment_ids 1, 2, ... per example in the row; 0 for padding
  positions   0, 1, ... restarting for every example (RoPE sees each example as if alone)
  source_ids  1 + the index of the example's data source; 0 for padding (per-source losses)
  weight      (float32) the example's weight in the loss (its record's `weight`, default 1); 0 padding
  reward      (float32) Q-SFT: the reward for predicting `targets` there (a turn's reward on its last
              token), 0 elsewhere and without rewards

Over-long examples (more than seq_len + 1 tokens) follow a policy:
  truncate         cut the end, keeping the prompt and the start of the response
  truncate_prompt  drop prompt tokens from the left (after the first token, BOS or the template's
                   opening), then cut the end if the response alone is still too long
  drop             leave the example out
Every truncation and drop is counted; an example left with nothing to train is dropped and counted.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ROW_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "source_ids", "weight", "reward")
FLOAT_KEYS = ("weight", "reward")
OVERLONG_POLICIES = ("truncate", "truncate_prompt", "drop")
PACKING_MODES = ("best_fit", "pad")


@dataclasses.dataclass(frozen=True)
class Example:
    ids: np.ndarray  # int32 [n]
    mask: np.ndarray  # bool [n], True where ids[i] is trained
    source: int = 0
    weight: float = 1.0
    reward: np.ndarray | None = None  # float32 [n], aligned with ids (Q-SFT)


def fit_ids(
    ids: list[int], mask: list[bool], seq_len: int, policy: str
) -> tuple[list[int], list[bool], bool]:
    """(ids, mask, truncated) fitted to seq_len + 1 tokens by `policy`; ids empty when dropped."""
    limit = seq_len + 1
    if len(ids) <= limit:
        return ids, mask, False
    if policy == "drop":
        return [], [], True
    if policy == "truncate_prompt":
        first_trained = mask.index(True) if True in mask else len(mask)
        removable = max(first_trained - 1, 0)  # keep token 0
        cut = min(removable, len(ids) - limit)
        ids, mask = ids[:1] + ids[1 + cut :], mask[:1] + mask[1 + cut :]
    elif policy != "truncate":
        raise ValueError(f"config.data.overlong={policy!r} is not one of {OVERLONG_POLICIES}")
    ids, mask = ids[:limit], mask[:limit]
    if not any(mask[1:]):  # nothing left to train
        return [], [], True
    return ids, mask, True


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


def pack(examples: list[Example], seq_len: int, mode: str = "best_fit") -> dict[str, np.ndarray]:
    """Pack examples (already fitted to seq_len) into rows; returns arrays [rows, seq_len].

    `best_fit` shares rows between examples; `pad` gives every example a row of its own.
    """
    if mode == "best_fit":
        bins = best_fit_bins([len(ex.ids) - 1 for ex in examples], seq_len)
    elif mode == "pad":
        bins = [[i] for i in range(len(examples))]
    else:
        raise ValueError(f"config.data.packing={mode!r} is not one of {PACKING_MODES}")
    rows = {k: np.zeros((len(bins), seq_len), np.float32 if k in FLOAT_KEYS else np.int32) for k in ROW_KEYS}
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
            rows["source_ids"][r, sl] = examples[i].source + 1
            rows["weight"][r, sl] = examples[i].weight
            if examples[i].reward is not None:
                rows["reward"][r, sl] = examples[i].reward[1:]
            start += n
    return rows


def packing_stats(rows: dict[str, np.ndarray]) -> dict[str, float]:
    """Efficiency of packed rows: the share of positions holding tokens, and of trained targets."""
    n_rows = len(rows["inputs"])
    positions = max(rows["inputs"].size, 1)
    examples = int(((rows["positions"] == 0) & (rows["segment_ids"] > 0)).sum())
    return {
        "rows": n_rows,
        "examples_per_row": examples / max(n_rows, 1),
        "non_pad_fraction": float((rows["segment_ids"] > 0).sum() / positions),
        "target_fraction": float(rows["loss_mask"].sum() / positions),
    }
