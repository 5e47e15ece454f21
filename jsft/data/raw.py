"""The configured sources as raw tables, read and checked before anything is tokenized.

`source_specs` turns config.data.sources into SourceSpecs, `read_source` reads a source's training
table and its validation table (a file, a split or a held-out fraction), and checks that the source's
format, detected from its first readable record when "auto", parses at least one record: a source of
only bad records fails here, before a tokenizer is trained on nothing. Every error names the config
key to change.
"""

from __future__ import annotations

import dataclasses
import json

import datasets
import ml_collections

from jsft.data import formats, sources
from jsft.data.examples import all_bad_error, check_format_and_columns, first_good_format


@dataclasses.dataclass(frozen=True)
class RawSource:
    """One source's raw tables and its checked format."""

    spec: sources.SourceSpec
    fmt: str  # the record format (detected when the spec says "auto")
    train: datasets.Dataset
    val: datasets.Dataset | None  # None: the source has no validation records
    val_path: str  # where the validation records come from ("" without any)
    tools: tuple = ()  # the source's tool schemas (config.data.sources.<name>.tools), for records without


def source_specs(data_cfg: ml_collections.ConfigDict) -> list[sources.SourceSpec]:
    """One SourceSpec per entry of config.data.sources, in name order."""
    specs = []
    for name, cfg in sorted(data_cfg.sources.items()):
        fields = dict(cfg.to_dict())
        fields["fields"] = dict(fields.get("fields") or {})
        unknown = set(fields) - {f.name for f in dataclasses.fields(sources.SourceSpec)}
        if unknown:
            raise ValueError(f"config.data.sources.{name}: unknown field(s) {sorted(unknown)}")
        if not fields.get("path"):
            raise ValueError(f"config.data.sources.{name}.path is empty")
        specs.append(sources.SourceSpec(name=name, **fields))
    if not specs:
        raise ValueError("config.data.sources is empty: name at least one data source")
    return specs


def _rows(table: datasets.Dataset, path: str, batch_size: int = 1000):
    """(where, record, why it is unreadable or None) for each row of a raw table, in order."""
    for start in range(0, len(table), batch_size):
        batch = table[start : start + batch_size]
        for j in range(len(next(iter(batch.values())))):
            yield sources.read_row({k: v[j] for k, v in batch.items()}, start + j, path)


def _check_format(spec: sources.SourceSpec, fmt: str, table: datasets.Dataset, path: str) -> str:
    """The source's format (detected from its first readable record when "auto"), once a record
    parses in it: a source of only bad records fails here, before a tokenizer is trained on nothing.
    Reads up to the first good record (all of them only when none is good)."""
    named = sources.ROW_COLUMN in table.column_names  # a table with named columns
    columns = [c for c in table.column_names if c != sources.ROW_COLUMN] if named else None
    check_format_and_columns(spec, fmt, columns, path)
    found, bad, _ = first_good_format(spec, fmt, _rows(table, path))
    if found is None:
        raise all_bad_error(spec.name, path, bad, len(table))
    return found


def conversations(
    table: datasets.Dataset, path: str, fmt: str, fields: dict, limit: int, tools: tuple = ()
) -> list[formats.Conversation]:
    """Up to `limit` parsed conversations (bad records skipped: they are reported elsewhere; a
    pre-tokenized source has none)."""
    out = []
    if fmt in formats.TOKEN_FORMATS:
        return out
    for _, record, why in _rows(table, path):
        if len(out) >= limit:
            break
        if why is None:
            try:
                out.append(formats.to_conversation(record, fmt, fields, tools))
            except formats.BadRecord:
                continue
    return out


def _read_tables(spec: sources.SourceSpec, seed: int, cache_dir: str):
    """(train table, validation table or None, its path); a read error names the config key."""

    def read(key: str, path: str, split: str) -> datasets.Dataset:
        try:
            return sources.read_table(path, split, cache_dir)
        except sources.DataError as e:
            where = f"config.data.sources.{spec.name}.{key}"
            raise sources.DataError(f"source {spec.name!r} ({where}): {e}") from e

    train = read("path", spec.path, spec.split)
    if spec.val_path:
        return train, read("val_path", spec.val_path, spec.val_split or spec.split), spec.val_path
    if spec.val_split:
        return train, read("val_split", spec.path, spec.val_split), spec.path
    if spec.val_fraction > 0:
        try:
            split = train.train_test_split(test_size=spec.val_fraction, seed=seed, shuffle=True)
        except ValueError as e:
            raise sources.DataError(
                f"source {spec.name!r} ({spec.path}): cannot hold out config.data.sources.{spec.name}"
                f".val_fraction={spec.val_fraction} of its {len(train)} records ({e}); change it or "
                "give a val_path"
            ) from e
        return split["train"], split["test"], spec.path
    return train, None, ""


def read_tools(spec: sources.SourceSpec) -> tuple:
    """The source's tool schemas: the JSON file `config.data.sources.<name>.tools` names (a list of
    schemas, as a record's `tools`), () when unset."""
    if not spec.tools:
        return ()
    key = f"config.data.sources.{spec.name}.tools={spec.tools!r}"
    try:
        with open(spec.tools, encoding="utf-8") as f:
            return formats.check_tools(json.load(f), "the file")
    except OSError as e:
        raise sources.DataError(f"{key}: cannot read it ({e.strerror})") from e
    except (json.JSONDecodeError, formats.BadRecord) as e:
        why = f"not JSON ({e})" if isinstance(e, json.JSONDecodeError) else str(e)
        raise sources.DataError(
            f"{key}: {why}; write a JSON list of tool schemas there, e.g. "
            '[{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}]'
        ) from e


def read_source(spec: sources.SourceSpec, seed: int, cache_dir: str) -> RawSource:
    """The source's tables, each checked to hold a record that parses in the source's format, and
    its tool schemas."""
    tools = read_tools(spec)
    train, val, val_path = _read_tables(spec, seed, cache_dir)
    fmt = _check_format(spec, spec.format, train, spec.path)
    if val is not None:
        _check_format(spec, fmt, val, val_path)
    return RawSource(spec, fmt, train, val, val_path, tools)
