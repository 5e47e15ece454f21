"""Read raw records from local files (or the Hugging Face hub) into memory-mapped `datasets` tables.

  *.jsonl / *.json     read line by line here, so a broken line becomes a bad-record row naming its
                       file and line instead of failing the whole file; stored as raw JSON strings
  *.parquet / *.csv / *.arrow, `datasets.save_to_disk` directories, hub names
                       read by `datasets` itself; rows are located as `path:row N`

Every table is Arrow on disk (memory-mapped), so a data set larger than RAM works. Parsing a record
into a conversation happens later (formats.py), in the tokenization workers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import datasets
import numpy as np

RAW_JSON_FEATURES = datasets.Features(
    {"where": datasets.Value("string"), "json": datasets.Value("string"), "error": datasets.Value("string")}
)
LOADERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
ROW_COLUMN = "__row__"


class DataError(ValueError):
    """A problem with input data; the message names the source, the file and the line or row."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One data source as the config names it (`config.data.sources.<name>`)."""

    name: str
    path: str
    format: str = "auto"  # auto | prompt_response | alpaca | chat | text
    fields: Mapping[str, str] = dataclasses.field(default_factory=dict)  # canonical name -> column
    weight: float = 1.0
    split: str = "train"  # for DatasetDict directories and hub data sets
    val_path: str = ""
    val_split: str = ""
    val_fraction: float = 0.0  # held out from `path` with a fixed seed when no val_path/val_split


def _json_lines(path: str, stamp: str) -> Iterator[dict[str, str]]:
    del stamp  # part of the cache fingerprint only: a changed file is read again
    with open(path, "rb") as f:
        head = f.read(1024).lstrip()
    if head.startswith(b"["):  # a JSON array file
        try:
            with open(path, encoding="utf-8") as f:
                items = json.load(f)
        except UnicodeDecodeError as e:
            yield {"where": path, "json": "", "error": f"not valid UTF-8 ({e.reason} at byte {e.start})"}
            return
        except json.JSONDecodeError as e:
            yield {"where": f"{path}:{e.lineno}", "json": "", "error": f"invalid JSON ({e.msg})"}
            return
        for i, item in enumerate(items):
            yield {"where": f"{path}:item {i}", "json": json.dumps(item), "error": ""}
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield {"where": where, "json": "", "error": f"not valid UTF-8 ({e.reason} at byte {e.start})"}
                continue
            if not line.strip():
                continue
            try:
                json.loads(line.rstrip("\r\n"))  # without the newline, columns point into the line
            except json.JSONDecodeError as e:
                yield {"where": where, "json": "", "error": f"invalid JSON ({e.msg} at column {e.colno})"}
                continue
            yield {"where": where, "json": line, "error": ""}


def read_table(path: str, split: str, cache_dir: str | None) -> datasets.Dataset:
    """The raw table behind `path` (see the module docstring).

    Tables other than JSON get a `__row__` column, so a row keeps its original number through
    held-out splits and per-host shards.
    """
    table = _read_table(path, split, cache_dir)
    if "where" in table.column_names and "json" in table.column_names:
        return table
    return table.add_column(ROW_COLUMN, np.arange(len(table), dtype=np.int64))


def _read_table(path: str, split: str, cache_dir: str | None) -> datasets.Dataset:
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        try:
            loaded = datasets.load_from_disk(path)
        except FileNotFoundError as e:
            raise DataError(f"{path}: not a directory written by datasets.save_to_disk ({e})") from e
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path}: no split {split!r} (splits: {sorted(loaded)})")
            loaded = loaded[split]
        return loaded
    if ext in (".jsonl", ".json"):
        if not os.path.exists(path):
            raise DataError(f"cannot open data file {path}: No such file or directory")
        st = os.stat(path)
        return datasets.Dataset.from_generator(
            _json_lines,
            gen_kwargs={"path": os.path.abspath(path), "stamp": f"{st.st_size}-{st.st_mtime_ns}"},
            features=RAW_JSON_FEATURES,
            cache_dir=cache_dir,
        )
    if ext in LOADERS:
        if not os.path.exists(path):
            raise DataError(f"cannot open data file {path}: No such file or directory")
        return datasets.load_dataset(LOADERS[ext], data_files=path, split="train", cache_dir=cache_dir)
    if os.path.exists(path) or "/" not in path or path.startswith(("/", ".")):
        raise DataError(
            f"{path}: unsupported data file (expected .jsonl, .json, .parquet, .csv, .arrow "
            "or a datasets.save_to_disk directory)"
        )
    # An `owner/name` that is not a local path: a hub data set (needs a network; tests never use one).
    return datasets.load_dataset(path, split=split, cache_dir=cache_dir)


def row_record(row: Mapping[str, Any], index: int, path: str) -> tuple[str, Any, str]:
    """(where, record, error) for one row of a table from `read_table`."""
    if "json" in row and "where" in row and "error" in row and len(row) == 3:
        return row["where"], (json.loads(row["json"]) if not row["error"] else None), row["error"]
    record = {k: v for k, v in row.items() if k != ROW_COLUMN}
    return f"{path}:row {row.get(ROW_COLUMN, index)}", record, ""
