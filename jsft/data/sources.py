"""Read raw records from local files (or the Hugging Face hub) into memory-mapped `datasets` tables.

  *.jsonl              one JSON object per line, always
  *.json               a JSON array of objects, or (when it does not start with `[`) JSON lines
                       both read here, so a broken line becomes a bad-record row naming its file and
                       line instead of failing the whole file; stored as raw JSON strings
  *.parquet / *.csv / *.arrow, `datasets.save_to_disk` directories, hub names
                       read by `datasets` itself; rows are located as `path:row N`

Every table is Arrow on disk (memory-mapped), so a data set larger than RAM works. Parsing a record
into a conversation happens later (formats.py), in the tokenization workers. A file that cannot be
read, or holds no records at all, is a `DataError` here, before anything else runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import datasets
import numpy as np

from jsft.data import formats
from jsft.errors import DataError  # noqa: F401  (with the other user errors; used as sources.DataError)

RAW_JSON_FEATURES = datasets.Features(
    {
        "where": datasets.Value("string"),
        "json": datasets.Value("string"),
        "error": datasets.Value("string"),  # the reason a line is bad; empty when it is a JSON object
        "code": datasets.Value("string"),  # that reason's code (formats.BadRecord.code)
    }
)
LOADERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
DATA_EXTENSIONS = (".jsonl", ".json", *LOADERS)
ROW_COLUMN = "__row__"


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One data source as the config names it (`config.data.sources.<name>`)."""

    name: str
    path: str
    format: str = "auto"  # auto, or one of formats.FORMATS (prompt_response, chat, sharegpt, ...)
    fields: Mapping[str, str] = dataclasses.field(default_factory=dict)  # canonical name -> column
    weight: float = 1.0
    split: str = "train"  # for DatasetDict directories and hub data sets
    val_path: str = ""
    val_split: str = ""
    val_fraction: float = 0.0  # held out from `path` with a fixed seed when no val_path/val_split
    tools: str = ""  # a JSON file holding a list of tool schemas, for records without their own `tools`


def _row(where: str, line: str = "", bad: formats.BadRecord | None = None) -> dict[str, str]:
    return {"where": where, "json": line, "error": str(bad or ""), "code": bad.code if bad else ""}


def _object_row(where: str, line: str, value: Any, hint: str = "") -> dict[str, str]:
    if isinstance(value, dict):
        return _row(where, line)
    bad = formats.not_an_object(value)
    return _row(where, bad=formats.BadRecord(f"{bad}{hint}", code=bad.code) if hint else bad)


def _not_utf8(e: UnicodeDecodeError) -> formats.BadRecord:
    return formats.BadRecord(f"not valid UTF-8 ({e.reason} at byte {e.start})", code="not_utf8")


def _first_char(f) -> bytes:
    """The next byte of `f` that is not whitespace (b"" at the end of the file)."""
    while chunk := f.read(1 << 16):
        if stripped := chunk.lstrip():
            f.seek(f.tell() - len(stripped))
            return stripped[:1]
    return b""


def _json_rows(path: str, stamp: str) -> Iterator[dict[str, str]]:
    del stamp  # part of the cache fingerprint only: a changed file is read again
    with open(path, "rb") as f:
        is_array = path.lower().endswith(".json") and _first_char(f) == b"["
    yield from _json_array(path) if is_array else _json_lines(path)


def _json_array(path: str) -> Iterator[dict[str, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except UnicodeDecodeError as e:
        yield _row(path, bad=_not_utf8(e))
        return
    except json.JSONDecodeError as e:
        yield _row(f"{path}:{e.lineno}", bad=formats.BadRecord(f"invalid JSON ({e.msg})", "invalid_json"))
        return
    for i, item in enumerate(items):
        yield _object_row(f"{path}:item {i}", json.dumps(item), item)


def _json_lines(path: str) -> Iterator[dict[str, str]]:
    # A JSON array on a line is a bad record like any other non-object, with a hint at the likely
    # cause: a JSON-array file named .jsonl (only .json files may hold an array).
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            record, line, bad = parse_json_line(raw)
            if bad is not None:
                yield _row(where, bad=bad)
            elif record is not None:
                yield _row(where, line)


def parse_json_line(raw: bytes) -> tuple[dict | None, str, formats.BadRecord | None]:
    """(record, its text, why it is bad or None) for one JSONL line; (None, "", None) for a blank one."""
    # A JSON array on a line is a bad record like any other non-object, with a hint at the likely
    # cause: a JSON-array file named .jsonl (only .json files may hold an array).
    hint = "; a .jsonl file holds one object per line: name a JSON-array file .json"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, "", _not_utf8(e)
    if not line.strip():
        return None, "", None
    try:
        value = json.loads(line.rstrip("\r\n"))  # without the newline, columns point into the line
    except json.JSONDecodeError as e:
        return None, "", formats.BadRecord(f"invalid JSON ({e.msg}: column {e.colno})", code="invalid_json")
    if isinstance(value, dict):
        return value, line, None
    bad = formats.not_an_object(value)
    if isinstance(value, list):
        bad = formats.BadRecord(f"{bad}{hint}", code=bad.code)
    return None, "", bad


def _holds_no_records(path: str, ext: str) -> bool:
    """Whether a data file is empty (0 bytes, blank lines, `[]`, a bare CSV header, 0 parquet rows);
    reads only as far as the first record."""
    if os.path.getsize(path) == 0:
        return True
    if ext in (".jsonl", ".json"):
        with open(path, "rb") as f:
            first = _first_char(f)
            if ext == ".json" and first == b"[":
                f.read(1)
                return _first_char(f) == b"]"
            return first == b""
    if ext == ".csv":
        import pandas as pd  # noqa: PLC0415  (datasets' own dependency)

        try:
            return len(pd.read_csv(path, nrows=1)) == 0
        except pd.errors.EmptyDataError:  # only blank lines
            return True
    if ext == ".parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415

        return pq.ParquetFile(path).metadata.num_rows == 0
    return False


def read_table(path: str, split: str, cache_dir: str | None) -> datasets.Dataset:
    """The raw table behind `path` (see the module docstring); a `DataError` naming `path` when it
    cannot be read or holds no records.

    Tables other than JSON get a `__row__` column, so a row keeps its original number through
    held-out splits and per-host shards.
    """
    table = _read_table(path, split, cache_dir)
    if len(table) == 0:
        raise DataError(f"{path}: the data set holds no records; point the source at other data")
    if "where" in table.column_names and "json" in table.column_names:
        return table
    return table.add_column(ROW_COLUMN, np.arange(len(table), dtype=np.int64))


def _read_table(path: str, split: str, cache_dir: str | None) -> datasets.Dataset:
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        return _read_directory(path, split)
    if ext in DATA_EXTENSIONS:
        if not os.path.isfile(path):
            raise DataError(f"cannot open data file {path}: No such file or directory")
        try:
            return _read_file(path, ext, cache_dir)
        except DataError:
            raise
        except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as e:  # a broken file
            cause = e.__cause__ or e
            raise DataError(
                f"{path}: cannot be read as a {ext[1:]} file ({type(cause).__name__}: {cause}); "
                "check that the file is complete and that its extension matches its contents"
            ) from e
    local = os.path.exists(path) or path.startswith(("/", ".")) or "/" not in path
    if local or os.path.isdir(os.path.dirname(path)):  # `dir/name` under an existing dir: a typo
        if not os.path.exists(path):
            raise DataError(f"cannot open data file {path}: No such file or directory")
        raise DataError(
            f"{path}: unsupported data file (expected .jsonl, .json, .parquet, .csv, .arrow or a "
            'datasets.save_to_disk directory); for plain text, write one {"text": ...} object per '
            "line to a .jsonl file"
        )
    # An `owner/name` that is not a local path: a hub data set (needs a network; tests never use one).
    try:
        return datasets.load_dataset(path, split=split, cache_dir=cache_dir)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        raise DataError(
            f"{path}: not a local file or directory, and not loadable as a Hugging Face hub data set "
            f"({type(e).__name__}: {e}); check the path"
        ) from e


def _read_file(path: str, ext: str, cache_dir: str | None) -> datasets.Dataset:
    if _holds_no_records(path, ext):
        raise DataError(
            f"{path}: the file holds no records; add records to it or point the source at another file"
        )
    if ext in (".jsonl", ".json"):
        st = os.stat(path)
        return datasets.Dataset.from_generator(
            _json_rows,
            gen_kwargs={"path": os.path.abspath(path), "stamp": f"{st.st_size}-{st.st_mtime_ns}"},
            features=RAW_JSON_FEATURES,
            cache_dir=cache_dir,
        )
    return datasets.load_dataset(LOADERS[ext], data_files=path, split="train", cache_dir=cache_dir)


def _read_directory(path: str, split: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        files = sorted(n for n in os.listdir(path) if n.lower().endswith(DATA_EXTENSIONS))
        if files:
            shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
            fix = (
                f"it holds data files ({shown}), which are not read as one source: name each file "
                "as a source of its own (config.data.sources.<name>.path), or join them into one"
            )
        else:
            fix = "point the source at a data file or a save_to_disk directory"
        raise DataError(f"{path}: a directory not written by datasets.save_to_disk; {fix}") from e
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"{path}: no split {split!r} (splits: {sorted(loaded)}); choose one of them as the split"
            )
        loaded = loaded[split]
    return loaded


def read_row(row: Mapping[str, Any], index: int, path: str) -> tuple[str, Any, formats.BadRecord | None]:
    """(where, record, why the row is unreadable or None) for one row of a table from `read_table`."""
    if set(row) == set(RAW_JSON_FEATURES):
        if row["error"]:
            return row["where"], None, formats.BadRecord(row["error"], code=row["code"])
        return row["where"], json.loads(row["json"]), None
    record = {k: v for k, v in row.items() if k != ROW_COLUMN}
    return f"{path}:row {row.get(ROW_COLUMN, index)}", record, None


def row_record(row: Mapping[str, Any], index: int, path: str) -> tuple[str, Any, str]:
    """(where, record, error) for one row of a table from `read_table`; error is "" when readable."""
    where, record, bad = read_row(row, index, path)
    return where, record, str(bad or "")
