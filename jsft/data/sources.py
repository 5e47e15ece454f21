"""Read SFT records from local files; every problem names the file and line.

The core supports JSONL `{"prompt": ..., "response": ...}`; more formats and sources read through
Hugging Face `datasets` extend `read_records` without changing its callers.
"""

from __future__ import annotations

import dataclasses
import json


class DataError(ValueError):
    """A problem with input data; the message names the source and the line."""


@dataclasses.dataclass(frozen=True)
class Record:
    prompt: str
    response: str
    source: str  # "path:line", so later errors (e.g. an empty loss mask) can point back here


def read_jsonl(path: str, prompt_key: str = "prompt", response_key: str = "response") -> list[Record]:
    """All records of a JSONL file, or a DataError naming the first bad line and why it is bad."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot open data file {path}: {e.strerror}") from e
    records = []
    with f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in (prompt_key, response_key):
            if key not in obj:
                raise DataError(f"{where}: missing field {key!r} (fields present: {sorted(obj)})")
            if not isinstance(obj[key], str):
                raise DataError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
        if not obj[response_key].strip():
            raise DataError(f"{where}: field {response_key!r} is empty, so there is nothing to train on")
        records.append(Record(obj[prompt_key], obj[response_key], where))
    if not records:
        raise DataError(f"{path}: no records found")
    return records
