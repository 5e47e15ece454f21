"""One source's examples as flat token arrays, with its counts and the errors that explain bad
records or a source left without examples.

`collect` turns a tokenized table (see tokenizing.py) into a TokenizedSource: every example's ids and
mask in two flat arrays with row offsets (memory-mapped where Arrow allows), the indices of the rows
that are examples, the bad records with their locations and reasons, and the statistics that the
training log and `--mode inspect` report. The errors list the first bad records as `file:line: reason`
lines and name the config key to change.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable
from typing import Any

import datasets
import numpy as np

from jsft.data import formats, packing, sources

ON_BAD_RECORD = ("error", "skip")


@dataclasses.dataclass
class TokenizedSource:
    """One source's kept examples as flat arrays (memory-mapped where Arrow allows) plus its stats."""

    name: str
    index: int
    table: datasets.Dataset  # the tokenized table, bad and dropped rows included (for reports)
    ids: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray  # row r's tokens are ids[offsets[r]:offsets[r + 1]]
    kept: np.ndarray  # table rows that are examples
    bad: list[tuple[str, str]]  # (where, reason)
    stats: dict
    bad_codes: list[str] = dataclasses.field(default_factory=list)  # the short reason code of each bad
    weights: np.ndarray | None = None  # each table row's `weight` (None: all 1)
    rewards: np.ndarray | None = None  # Q-SFT: per token, aligned with `ids` (None: no rewards)

    def __len__(self) -> int:
        return len(self.kept)

    def example(self, i: int) -> packing.Example:
        r = self.kept[i]
        sl = slice(self.offsets[r], self.offsets[r + 1])
        weight = 1.0 if self.weights is None else float(self.weights[r])
        reward = None if self.rewards is None else self.rewards[sl]
        return packing.Example(self.ids[sl], self.mask[sl].astype(np.bool_), self.index, weight, reward)

    def examples(self) -> list[packing.Example]:
        return [self.example(i) for i in range(len(self))]


def collect(name: str, index: int, tokenized: datasets.Dataset) -> TokenizedSource:
    tbl = tokenized.with_format("arrow")[:]
    ids_col, mask_col = tbl.column("ids").combine_chunks(), tbl.column("mask").combine_chunks()
    offsets = ids_col.offsets.to_numpy()
    ids = ids_col.values.to_numpy(zero_copy_only=False)
    mask = mask_col.values.to_numpy(zero_copy_only=False)
    errors = np.asarray(tbl.column("error").to_pylist(), dtype=object)
    codes = tbl.column("code").to_pylist()
    dropped = tbl.column("dropped").to_numpy(zero_copy_only=False)
    truncated = tbl.column("truncated").to_numpy(zero_copy_only=False)
    is_bad = errors != ""
    kept = np.flatnonzero(~is_bad & ~dropped)
    where = tbl.column("where").to_pylist()
    bad = [(where[i], errors[i]) for i in np.flatnonzero(is_bad)]
    lengths = np.diff(offsets)[kept]
    stats = {
        "records": int(len(tbl)),
        "examples": int(len(kept)),
        "bad": int(is_bad.sum()),
        "bad_by_reason": dict(collections.Counter(codes[i] for i in np.flatnonzero(is_bad))),
        "truncated": int((truncated & ~dropped).sum()),
        "dropped_overlong": int(dropped.sum()),
        "tokens": int(lengths.sum()),
    }
    bad_codes = [codes[i] for i in np.flatnonzero(is_bad)]
    weights = tbl.column("weight").to_numpy(zero_copy_only=False)
    reward_col = tbl.column("reward").combine_chunks()
    rewards = None
    if len(reward_col.values) == len(ids) and len(ids):  # every kept row has its per-token rewards
        rewards = reward_col.values.to_numpy(zero_copy_only=False)
    return TokenizedSource(
        name,
        index,
        tokenized,
        ids,
        mask,
        offsets,
        kept,
        bad,
        stats,
        bad_codes,
        None if np.all(weights == 1) else weights,
        rewards,
    )


def _listing(bad: list[tuple[str, object]], count: int, limit: int = 10) -> str:
    """The first bad records, one `  file:line: reason` line each."""
    lines = [f"  {where}: {reason}" for where, reason in bad[:limit]]
    more = [f"  ... and {count - limit} more"] if count > limit else []
    return "\n".join(lines + more)


def bad_records_error(src: TokenizedSource, limit: int = 10) -> sources.DataError:
    return sources.DataError(
        f"source {src.name!r}: {len(src.bad)} bad record(s) of {src.stats['records']}:\n"
        + _listing(src.bad, len(src.bad), limit)
        + "\nFix them, or set config.data.on_bad_record='skip' to train without them (they are "
        "counted and reported)."
    )


def all_bad_error(name: str, path: str, bad: list[tuple[str, object]], count: int) -> sources.DataError:
    return sources.DataError(
        f"source {name!r} ({path}): all {count} record(s) are bad, so there is nothing to train on:\n"
        + _listing(bad, count)
        + "\nFix them (config.data.on_bad_record='skip' cannot help when every record is bad), or "
        f"check config.data.sources.{name}.format and .fields."
    )


def check_format_and_columns(
    spec: sources.SourceSpec, fmt: str, columns: list[str] | None, path: str
) -> None:
    """DataError unless `fmt` is "auto" or a known format whose fields are among a table's named
    `columns` (None: the records are not a table of named columns, so each record is checked alone)."""
    key = f"config.data.sources.{spec.name}"
    if fmt != "auto" and fmt not in formats.FORMATS:
        raise sources.DataError(f"{key}.format={fmt!r} is not one of {('auto',) + formats.FORMATS}")
    if fmt == "auto" or columns is None:
        return
    missing = [c for c in (spec.fields.get(n, n) for n in formats.FORMAT_FIELDS[fmt]) if c not in columns]
    if missing:
        raise sources.DataError(
            f"source {spec.name!r} ({path}): format {fmt!r} needs the column(s) {missing}, but the "
            f"table has {columns}; name the columns to read with {key}.fields (e.g. "
            f"{{{formats.FORMAT_FIELDS[fmt][0]!r}: <column>}}) or set {key}.format"
        )


def first_good_format(
    spec: sources.SourceSpec, fmt: str, rows: Iterable[tuple[str, Any, object]]
) -> tuple[str | None, list[tuple[str, object]], int]:
    """Walk a source's (where, record, why-bad) rows up to the first record that parses in `fmt`
    (detected from the first readable record when "auto"): (that format, [], rows read), or, when no
    record is good, (None, the first 10 bad rows' (where, why), rows read)."""
    key = f"config.data.sources.{spec.name}"
    bad, count = [], 0
    for where, record, why in rows:
        count += 1
        if why is None and fmt == "auto":
            try:
                fmt = formats.detect_format(list(record), spec.fields)
            except formats.BadRecord as e:
                raise sources.DataError(
                    f"source {spec.name!r} ({where}): {e}; name the format with {key}.format and the "
                    f"columns it reads with {key}.fields"
                ) from e
        if why is None:
            try:
                formats.check_record(record, fmt, spec.fields)
                return fmt, [], count
            except formats.BadRecord as e:
                why = e
        if len(bad) < 10:
            bad.append((where, why))
    return None, bad, count


def no_examples_error(src: TokenizedSource, path: str, seq_len: int, overlong: str) -> sources.DataError:
    """Why a source kept no example: every record bad, or the good ones all dropped as over-long."""
    st = src.stats
    good = st["records"] - st["bad"]
    if not st["records"]:
        return sources.DataError(
            f"source {src.name!r} ({path}): this process's data shards hold none of its records (it has "
            "fewer records than config.data.num_shards); add records or lower config.data.num_shards"
        )
    if not good:
        return all_bad_error(src.name, path, src.bad, st["bad"])
    shortest = int(np.asarray(src.table["full_length"])[np.asarray(src.table["dropped"], bool)].min())
    if overlong == "drop":
        policy, other = "config.data.overlong='drop' dropped them", "truncate"
    else:
        policy = (
            f"config.data.overlong={overlong!r} cut them to {seq_len + 1} tokens, which left no trained "
            "(response) token"
        )
        other = "truncate_prompt" if overlong == "truncate" else ""
    fix = f"raise config.data.seq_len (the shortest example has {shortest} tokens)"
    fix += f" or set config.data.overlong={other!r}" if other else ""
    which = f"all {good}"
    if st["bad"]:
        which = f"{st['bad']} of {st['records']} records are bad (skipped; listed below) and the other {good}"
    msg = (
        f"source {src.name!r} ({path}): no usable examples: {which} examples have more than "
        f"config.data.seq_len + 1 = {seq_len + 1} tokens and {policy}; {fix}"
    )
    return sources.DataError(msg + ("\n" + _listing(src.bad, st["bad"]) if st["bad"] else ""))
