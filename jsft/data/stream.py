"""The streaming engine's training stream: one logical stream's records read, parsed, tokenized and
packed a chunk at a time by grain workers, resumable from a small JSON state.

  shards.deal (this stream's shards) ─► StreamSource.index (record offsets, nothing parsed)
  ─► MixtureSampler (windowed shuffle) ─► grain MapDataset.range(chunks).map(ChunkWorker)
  ─► mp_prefetch(K workers) ─► GrainStream.next_rows (what batches.TrainBatches asks for)

Chunk c is a pure function of (the sampler state at the stream's start or last restore, c): a worker
advances its own copy of the sampler from there (counters only) and then draws, reads, tokenizes and
packs `chunk` records. Grain deals chunk indices to workers round-robin and reads them back in order,
and the map is 1:1 (a bad or over-long record is an empty draw, not a filtered element), so the rows
are the same for every K. The state is what batches.PackedStream keeps (the sampler state at the
current chunk's start and the rows of it handed out) plus the chunk index and the bad records met:
restoring rebuilds that chunk, so a resumed run is bitwise the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grain
import numpy as np

from jsft.data import formats, mixture, packing, shards, sources, tokenizing
from jsft.data.examples import all_bad_error, check_format_and_columns, first_good_format

CHUNKS_AHEAD = 1 << 40  # the chunk range grain walks: endless in practice


@dataclasses.dataclass
class StreamSource:
    """One source's records in one stream: its shards in dealt order and where each record starts."""

    shards: list[shards.Shard]
    counts: np.ndarray  # records per shard
    offsets: list[np.ndarray | None]  # JSONL: each record's byte offset; None for other kinds

    def __post_init__(self):
        self.ends = np.cumsum(self.counts)

    @classmethod
    def index(cls, shard_list: list[shards.Shard], reader: shards.Reader) -> StreamSource:
        offsets = [
            shards.cached_offsets(s, reader.cache_dir) if s.kind == "jsonl" else None for s in shard_list
        ]
        counts = [
            len(o) if o is not None else reader.count(s) for s, o in zip(shard_list, offsets, strict=True)
        ]
        return cls(shard_list, np.asarray(counts, np.int64), offsets)

    def __len__(self) -> int:
        return int(self.counts.sum())

    def locate(self, i: int) -> tuple[shards.Shard, int, int]:
        """(shard, record within it, byte offset or -1) of the stream's record i."""
        j = int(np.searchsorted(self.ends, i, side="right"))
        r = i - (int(self.ends[j - 1]) if j else 0)
        offsets = self.offsets[j]
        return self.shards[j], r, int(offsets[r]) if offsets is not None else -1


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs to make any chunk of one stream (picklable)."""

    sources: tuple[StreamSource, ...]
    tokenize: tuple[tokenizing.TokenizeSpec, ...]
    probs: tuple[float, ...]
    seed: int
    stream: int
    window: int
    chunk: int
    seq_len: int
    packing: str
    cache_dir: str

    def sampler(self) -> mixture.MixtureSampler:
        sizes = [len(s) for s in self.sources]
        return mixture.MixtureSampler(sizes, np.asarray(self.probs), self.seed, self.stream, self.window)


class ChunkWorker:
    """chunk index -> {"chunk", "start" (sampler state), "rows", "bad"}; deterministic in the index."""

    def __init__(self, spec: StreamSpec, start_state: dict, base: int):
        self.spec, self.start_state, self.base = spec, start_state, base
        self._sampler, self._next = None, None  # the sampler positioned at chunk self._next
        self._reader = None

    def _sampler_at(self, c: int) -> mixture.MixtureSampler:
        if self._sampler is None or self._next > c:
            self._sampler, self._next = self.spec.sampler(), self.base
            self._sampler.restore(self.start_state)
        self._sampler.advance((c - self._next) * self.spec.chunk)
        self._next = c
        return self._sampler

    def __call__(self, c: int) -> dict:
        spec = self.spec
        if self._reader is None:
            self._reader = shards.Reader(spec.cache_dir)
        sampler = self._sampler_at(c)
        start = sampler.state()
        examples, bad = [], []
        for _ in range(spec.chunk):
            k, i = sampler.next()
            example, why = self._example(k, i)
            if example is not None:
                examples.append(example)
            elif why is not None:
                bad.append([k, *why])
        self._next = c + 1
        rows = packing.pack(examples, spec.seq_len, spec.packing) if examples else _no_rows(spec.seq_len)
        return {"chunk": c, "start": start, "rows": rows, "bad": bad}

    def _example(self, k: int, i: int) -> tuple[packing.Example | None, tuple[str, str, str] | None]:
        """(example, None), (None, (where, reason, code)) for a bad record, (None, None) for an
        empty draw (a blank line, an over-long record dropped by the overlong policy)."""
        shard, r, offset = self.spec.sources[k].locate(i)
        where, record, bad = self._reader.read(shard, r, offset)
        if bad is None and record is None:
            return None, None
        if bad is None:
            try:
                ids, mask, _, _, weight, rewards, _ = tokenizing.encode_record(record, self.spec.tokenize[k])
            except formats.BadRecord as e:
                bad = e
                if shard.kind == "jsonl":  # the line is only worked out for a bad record
                    where = f"{shard.path}:{shards.line_number(shard.path, offset)}"
        if bad is not None:
            return None, (where, str(bad), bad.code)
        if not ids:
            return None, None
        reward = None
        if rewards is not None:
            reward = np.asarray(
                tokenizing.place_rewards(mask, rewards, self.spec.tokenize[k].train_on), np.float32
            )
        return packing.Example(np.asarray(ids, np.int32), np.asarray(mask, np.bool_), k, weight, reward), None


def _no_rows(seq_len: int) -> dict[str, np.ndarray]:
    return {
        k: np.zeros((0, seq_len), np.float32 if k in packing.FLOAT_KEYS else np.int32)
        for k in packing.ROW_KEYS
    }


class GrainStream:
    """Endless packed rows of one logical stream (the interface of batches.PackedStream)."""

    def __init__(self, spec: StreamSpec, workers: int = 0, on_bad_record: str = "error", names=()):
        self.spec, self.workers, self.on_bad_record, self.names = spec, workers, on_bad_record, list(names)
        self.sampler = spec.sampler()  # its sizes tell epochs; it never draws here
        self._begin(self.sampler.state(), 0, [0] * len(spec.sources))

    def _begin(self, sampler_state: dict, chunk: int, bad_before: list[int]) -> None:
        self._start, self._base, self._bad_before = sampler_state, chunk, list(bad_before)
        self._it, self._chunk, self._row = None, None, 0

    def _iterator(self):
        worker = ChunkWorker(self.spec, self._start, self._base)
        ds = grain.MapDataset.range(self._base, self._base + CHUNKS_AHEAD).map(worker)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if self.workers:
            from absl import flags  # noqa: PLC0415

            if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside main.py none were parsed
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(num_workers=self.workers))
        return iter(ds)

    def _next_chunk(self) -> None:
        if self._it is None:
            self._it = self._iterator()
        if self._chunk is not None:
            for k, *_ in self._chunk["bad"]:
                self._bad_before[k] += 1
        self._chunk, self._row = next(self._it), 0
        if self._chunk["bad"] and self.on_bad_record == "error":
            raise self._bad_error(self._chunk["bad"])

    def _bad_error(self, bad: list) -> sources.DataError:
        lines = [f"  {where}: {reason}" for _, where, reason, _ in bad[:10]]
        more = [f"  ... and {len(bad) - 10} more in this chunk"] if len(bad) > 10 else []
        names = sorted({self.names[k] if k < len(self.names) else str(k) for k, *_ in bad})
        return sources.DataError(
            f"source(s) {names}: bad record(s) met while streaming (data stream {self.spec.stream}):\n"
            + "\n".join(lines + more)
            + "\nFix them, or set config.data.on_bad_record='skip' to train without them (they are "
            "counted and reported)."
        )

    def next_rows(self, n: int) -> dict[str, np.ndarray]:
        parts = []
        while n:
            if self._chunk is None or self._row == len(self._chunk["rows"]["inputs"]):
                self._next_chunk()
            rows = self._chunk["rows"]
            take = min(n, len(rows["inputs"]) - self._row)
            parts.append({k: v[self._row : self._row + take] for k, v in rows.items()})
            self._row, n = self._row + take, n - take
        return {k: np.concatenate([p[k] for p in parts]) for k in packing.ROW_KEYS}

    def bad_records(self) -> list[int]:
        """Bad records met so far, per source (the current chunk's included)."""
        out = list(self._bad_before)
        for k, *_ in self._chunk["bad"] if self._chunk else []:
            out[k] += 1
        return out

    def state(self) -> dict:
        if self._chunk is None:
            return {"sampler": self._start, "chunk": self._base, "row": 0, "bad": list(self._bad_before)}
        return {
            "sampler": self._chunk["start"],
            "chunk": self._chunk["chunk"],
            "row": self._row,
            "bad": list(self._bad_before),
        }

    def restore(self, state: dict) -> None:
        self.close()
        self._begin(state["sampler"], int(state["chunk"]), state["bad"])
        self._next_chunk()
        self._row = int(state["row"])

    def close(self) -> None:
        """Stop the grain workers (a fresh iterator starts on the next rows)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()


def records(
    shard_list: list[shards.Shard], reader: shards.Reader
) -> Iterator[tuple[str, dict | None, object]]:
    """(where, record, why bad or None) of every record of the shards, in order (blank lines left out)."""
    for shard in shard_list:
        if shard.kind == "jsonl":
            for offset in shards.jsonl_offsets(shard):
                where, record, bad = reader.read(shard, 0, int(offset))
                if bad is not None or record is not None:
                    yield where, record, bad
        else:
            for r in range(reader.count(shard)):
                yield reader.read(shard, r, -1)


def check_format(spec: sources.SourceSpec, planned: list[shards.Shard], reader: shards.Reader) -> str:
    """The source's format (detected from its first readable record when "auto"), once a record parses
    in it; reads the file from its start up to that record (all of it only when none is good)."""
    fmt, columns = spec.format, None
    if fmt in formats.FORMATS and planned[0].kind == "parquet":  # named columns: checked before any row
        import pyarrow.parquet as pq  # noqa: PLC0415

        columns = pq.ParquetFile(spec.path).schema_arrow.names
    check_format_and_columns(spec, fmt, columns, spec.path)
    found, bad, count = first_good_format(spec, fmt, records(planned, reader))
    if found is not None:
        return found
    if not count:
        raise sources.DataError(
            f"{spec.path}: the file holds no records; add records to it or point the source elsewhere"
        )
    raise all_bad_error(spec.name, spec.path, bad, count)


def conversations(
    spec: sources.SourceSpec,
    fmt: str,
    planned: list[shards.Shard],
    reader: shards.Reader,
    limit: int,
    tools: tuple,
) -> Iterator[formats.Conversation]:
    """Up to `limit` conversations from the start of the source (file order: the same on every
    process), bad records skipped."""
    if fmt in formats.TOKEN_FORMATS:
        return
    n = 0
    for _, record, why in records(planned, reader):
        if n >= limit:
            return
        if why is None:
            try:
                conv = formats.to_conversation(record, fmt, dict(spec.fields), tools)
            except formats.BadRecord:
                continue
            n += 1
            yield conv
