"""Sources cut into shards before anything is parsed, shards dealt to logical streams, and the records
of a stream's shards indexed and read one at a time (the streaming engine's file layer).

  .jsonl     byte ranges of `shard_bytes`: a record belongs to the range holding its first byte
  .parquet   row groups (counts from the file's metadata: nothing is read to plan or index them)
  other      the whole file (or directory, hub name) is one shard, read by `sources.read_table`
             (memory-mapped Arrow) only by the process whose stream owns it

A source's shards are permuted with the seed and dealt strided to the streams (stream s gets shards
s, s + S, s + 2S, ... of the permutation), so every stream samples the whole file, not a contiguous
slice of a sorted one. A process indexes only its own streams' shards: for JSONL the byte offset of
each record (8 bytes per record, the only per-record memory), found with numpy in 8 MB blocks and
cached on disk (`cached_offsets`), so a restarted run does not scan again.
A bad record's `file:line` is computed when it is met, by counting the newlines before it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os

import numpy as np

from jsft.data import sources

BLOCK = 8 << 20  # bytes read at a time while indexing a JSONL range
GROUPS_KEPT = 4  # decoded Parquet row groups a reader keeps (a shuffle window may straddle groups)


@dataclasses.dataclass(frozen=True)
class Shard:
    """A part of one source file that is parsed on its own."""

    path: str
    kind: str  # "jsonl" (byte range), "parquet" (row group) or "table" (the whole file)
    start: int  # jsonl: first byte; parquet: row group; table: 0
    end: int  # jsonl: end byte (exclusive); parquet: row group + 1; table: 0
    first_row: int = 0  # parquet: the file row number of the group's first row
    rows: int = -1  # parquet: rows in the group (-1: found by indexing)


def plan(path: str, shard_bytes: int) -> list[Shard]:
    """The source's shards in file order; reads only sizes and Parquet metadata."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl" and os.path.isfile(path):
        size = os.path.getsize(path)
        if size == 0:
            raise sources.DataError(
                f"{path}: the file holds no records; add records to it or point the source elsewhere"
            )
        return [Shard(path, "jsonl", a, min(a + shard_bytes, size)) for a in range(0, size, shard_bytes)]
    if ext == ".parquet" and os.path.isfile(path):
        import pyarrow.parquet as pq  # noqa: PLC0415

        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a broken file
            raise sources.DataError(
                f"{path}: cannot be read as a parquet file ({type(e).__name__}: {e})"
            ) from e
        out, first = [], 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if n:
                out.append(Shard(path, "parquet", g, g + 1, first, n))
            first += n
        if not out:
            raise sources.DataError(
                f"{path}: the file holds no records; add records to it or point the source elsewhere"
            )
        return out
    return [Shard(path, "table", 0, 0)]


def deal(shards: list[Shard], num_streams: int, seed: int, source: int) -> list[list[Shard]]:
    """Each stream's shards: a seed-fixed permutation of the source's shards, dealt strided."""
    order = np.random.default_rng([seed, source, 3]).permutation(len(shards))
    return [[shards[i] for i in order[s::num_streams]] for s in range(num_streams)]


def jsonl_offsets(shard: Shard) -> np.ndarray:
    """Byte offsets of the non-blank lines that start in the shard's byte range."""
    out = []
    with open(shard.path, "rb") as f:
        pos = max(shard.start - 1, 0)  # a newline just before the range starts its first line
        while pos < shard.end:
            n = min(BLOCK, shard.end - pos)
            f.seek(pos)
            a = np.frombuffer(f.read(n + 2), np.uint8)  # bytes pos .. pos + n + 1 (two to look ahead)
            starts = np.flatnonzero(a[:n] == 10) + 1  # relative to pos
            if pos == 0:
                starts = np.concatenate([[0], starts])
            starts = starts[(starts + pos >= shard.start) & (starts + pos < shard.end)]
            first = a[np.minimum(starts, len(a) - 1)]
            second = a[np.minimum(starts + 1, len(a) - 1)]
            blank = (first == 10) | ((first == 13) & (second == 10))
            out.append(starts[~blank] + pos)
            pos += n
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def cached_offsets(shard: Shard, cache_dir: str | None) -> np.ndarray:
    """`jsonl_offsets`, kept in `cache_dir/index/` under the file's path, size, mtime and the range, so
    a restart (a resume) skips the scan; loaded memory-mapped."""
    if not cache_dir:
        return jsonl_offsets(shard)
    st = os.stat(shard.path)
    key = f"{os.path.abspath(shard.path)}|{st.st_size}|{st.st_mtime_ns}|{shard.start}|{shard.end}"
    path = os.path.join(cache_dir, "index", hashlib.sha256(key.encode()).hexdigest()[:24] + ".npy")
    if os.path.exists(path):
        return np.load(path, mmap_mode="r")
    offsets = jsonl_offsets(shard)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, offsets)
    os.replace(tmp, path)  # whole or absent: a concurrent or interrupted writer leaves no half file
    return offsets


class Reader:
    """Reads single records of shards; holds open files and one decoded Parquet row group per file.
    Made lazily in each worker process (open files do not travel)."""

    def __init__(self, cache_dir: str | None):
        self.cache_dir = cache_dir
        self._files: dict[str, object] = {}
        self._groups: dict[tuple[str, int], object] = {}  # decoded row groups, least recent first
        self._tables: dict[str, object] = {}

    def count(self, shard: Shard) -> int:
        if shard.kind == "parquet":
            return shard.rows
        return len(self._table(shard.path))

    def _table(self, path: str):
        if path not in self._tables:
            self._tables[path] = sources.read_table(path, "train", self.cache_dir)
        return self._tables[path]

    def read(self, shard: Shard, r: int, offset: int) -> tuple[str, dict | None, object]:
        """(where, record or None, why it is bad or None) of record r of the shard (at `offset` in
        a JSONL file); (where, None, None) for a blank line."""
        if shard.kind == "jsonl":
            f = self._files.get(shard.path)
            if f is None:
                f = self._files[shard.path] = open(shard.path, "rb")  # noqa: SIM115 - kept open
            f.seek(offset)
            record, _, bad = sources.parse_json_line(f.readline())
            where = f"{shard.path}:{line_number(shard.path, offset)}" if bad is not None else shard.path
            return where, record, bad
        if shard.kind == "parquet":
            group = self._groups.pop((shard.path, shard.start), None)
            if group is None:
                import pyarrow.parquet as pq  # noqa: PLC0415

                group = pq.ParquetFile(shard.path).read_row_group(shard.start)
            self._groups[(shard.path, shard.start)] = group  # the newest last
            while len(self._groups) > GROUPS_KEPT:
                del self._groups[next(iter(self._groups))]
            record = group.slice(r, 1).to_pylist()[0]
            return f"{shard.path}:row {shard.first_row + r}", record, None
        table = self._table(shard.path)
        return sources.read_row(table[r], r, shard.path)


@functools.lru_cache(maxsize=256)
def _newlines_before(path: str, offset: int) -> int:
    count = 0
    with open(path, "rb") as f:
        while offset > 0:
            buf = f.read(min(BLOCK, offset))
            if not buf:
                break
            count += buf.count(b"\n")
            offset -= len(buf)
    return count


def line_number(path: str, offset: int) -> int:
    """The 1-based line of the byte at `offset` (counted from the file start, so only for bad
    records: cost O(offset); block starts are cached)."""
    base = offset - offset % BLOCK
    with open(path, "rb") as f:
        f.seek(base)
        tail = f.read(offset - base).count(b"\n")
    return 1 + _newlines_before(path, base) + tail
