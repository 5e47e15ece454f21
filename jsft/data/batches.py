"""The training batch stream: endless packed rows from a mixture, cut into logical shards, resumable
from a small JSON state, with a thread that prepares batches ahead of the train step.

  MixtureSampler ─► PackedStream (packs a chunk of draws at a time; one per logical shard)
                ─► TrainBatches (this process's rows of each global batch) ─► Prefetcher

The data is cut into `num_shards` logical shards of contiguous rows (`shard_bounds`) and a process
owns a contiguous run of them (`process_shards`), so the batches depend on `num_shards` only, never
on how many processes share them. A shard's state is the sampler state at the start of its current
pack chunk and the number of rows of that chunk already handed out: restoring rebuilds the chunk and
skips those rows, so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import queue
import threading

import numpy as np

from jsft.data import mixture, packing
from jsft.data.examples import TokenizedSource


class PackedStream:
    """Endless packed rows: draw `chunk` examples from the mixture, pack them, hand out rows in order."""

    def __init__(
        self,
        srcs: list[TokenizedSource],
        sampler: mixture.MixtureSampler,
        seq_len: int,
        mode: str = "best_fit",
        chunk: int = 2048,
        first: list[int] | None = None,
    ):
        """`first[k]`: index of source k's first example in this stream's shard (default 0)."""
        self.srcs, self.sampler, self.seq_len, self.mode, self.chunk = srcs, sampler, seq_len, mode, chunk
        self.first = first or [0] * len(srcs)
        self._chunk_start, self._rows, self._row = sampler.state(), None, 0

    def _build_chunk(self) -> None:
        self._chunk_start = self.sampler.state()
        draws = [self.sampler.next() for _ in range(self.chunk)]
        examples = [self.srcs[s].example(self.first[s] + i) for s, i in draws]
        self._rows = packing.pack(examples, self.seq_len, self.mode)
        self._row = 0

    def next_rows(self, n: int) -> dict[str, np.ndarray]:
        parts = []
        while n:
            if self._rows is None or self._row == len(self._rows["inputs"]):
                self._build_chunk()
            take = min(n, len(self._rows["inputs"]) - self._row)
            parts.append({k: v[self._row : self._row + take] for k, v in self._rows.items()})
            self._row, n = self._row + take, n - take
        return {k: np.concatenate([p[k] for p in parts]) for k in packing.ROW_KEYS}

    def state(self) -> dict:
        return {"sampler": self._chunk_start, "row": self._row}

    def restore(self, state: dict) -> None:
        self.sampler.restore(state["sampler"])
        self._build_chunk()
        self._row = int(state["row"])


class TrainBatches:
    """This process's rows of each global batch, with a resumable state.

    The data is cut into `num_shards` logical shards, each with its own sampler and packer; a global
    batch is the concatenation of every shard's rows, in shard order, and a process owns a contiguous
    run of shards. The batches depend on `num_shards` only, never on how many processes share them.
    """

    def __init__(
        self, streams: dict[int, PackedStream], global_batch_size: int, seed: int, num_shards: int = 1
    ):
        if global_batch_size % num_shards:
            raise ValueError(
                f"config.data.batch_size={global_batch_size} must divide evenly over "
                f"{num_shards} data shards (config.data.num_shards, default one per process)"
            )
        self.streams, self.seed, self.num_shards = streams, seed, num_shards
        self.rows_per_shard = global_batch_size // num_shards

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [self.streams[s].next_rows(self.rows_per_shard) for s in sorted(self.streams)]
        return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def state(self) -> dict:
        """The position *after* the last batch handed out (this process's shards only)."""
        return {
            "seed": self.seed,
            "num_shards": self.num_shards,
            "shards": {str(s): stream.state() for s, stream in self.streams.items()},
        }

    def restore(self, state: dict) -> None:
        """Restore from a state holding (at least) this process's shards."""
        if state.get("seed") != self.seed:
            raise ValueError(
                f"the checkpoint's data seed {state.get('seed')} differs from config.seed="
                f"{self.seed}; resuming with another seed would replay a different data order"
            )
        if state.get("num_shards") != self.num_shards:
            raise ValueError(
                f"the checkpoint's data has {state.get('num_shards')} shards, this run "
                f"{self.num_shards}; set config.data.num_shards={state.get('num_shards')}"
            )
        for s, stream in self.streams.items():
            stream.restore(state["shards"][str(s)])

    def close(self) -> None:
        """Stop any worker processes the streams hold (the streaming engine's grain workers)."""
        for stream in self.streams.values():
            if hasattr(stream, "close"):
                stream.close()


def merge_states(states: list[dict]) -> dict:
    """One data state from every process's own (they differ only in their shards)."""
    merged = dict(states[0], shards={})
    for st in states:
        merged["shards"].update(st["shards"])
    return merged


def shard_bounds(n: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous, nearly equal [start, end) row ranges (the first n % num_shards get one more)."""
    div, mod = divmod(n, num_shards)
    bounds, start = [], 0
    for s in range(num_shards):
        end = start + div + (s < mod)
        bounds.append((start, end))
        start = end
    return bounds


def process_shards(num_shards: int, process_index: int, process_count: int) -> range:
    """The logical shards one process owns: a contiguous run of num_shards / process_count."""
    if num_shards % process_count:
        raise ValueError(
            f"config.data.num_shards={num_shards} must be a multiple of the {process_count} processes"
        )
    per_process = num_shards // process_count
    return range(process_index * per_process, (process_index + 1) * per_process)


class Prefetcher:
    """Runs `TrainBatches` in a background thread, `depth` batches ahead; yields (batch, state_after)."""

    def __init__(self, batches: TrainBatches, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(batches,), daemon=True)
        self._thread.start()

    def _run(self, batches: TrainBatches) -> None:
        try:
            while not self._stop.is_set():
                item = (next(batches), batches.state())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._queue.put(e)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
