"""From configured sources to this host's slice of each global batch: deterministic and resumable.

  sources.read_table ─► shard per host ─► tokenize (formats + template + overlong policy; batched,
  multi-process, cached on disk) ─► TokenizedSource (flat id arrays) ─► MixtureSampler ─► PackedStream
  (packs a chunk of draws at a time) ─► TrainBatches ─► Prefetcher (a thread running ahead of the step)

The iterator's state is small JSON: the sampler state at the start of the current pack chunk and the
number of rows of that chunk already handed out. Restoring rebuilds the chunk and skips those rows, so
a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import queue
import threading

import datasets
import ml_collections
import numpy as np

from jsft.data import formats, mixture, packing, sources, templates
from jsft.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

TOKENIZED_FEATURES = datasets.Features(
    {
        "ids": datasets.Sequence(datasets.Value("int32")),
        "mask": datasets.Sequence(datasets.Value("int8")),
        "where": datasets.Value("string"),
        "error": datasets.Value("string"),  # why the record is bad ("" for a good one) ...
        "code": datasets.Value("string"),  # ... and that reason's code (formats.BadRecord.code)
        "truncated": datasets.Value("bool"),
        "dropped": datasets.Value("bool"),
        "full_length": datasets.Value("int32"),  # tokens before the overlong policy
    }
)
TOKENIZED_VERSION = "2"  # bump when TOKENIZED_FEATURES or their meaning change: old caches are stale
ON_BAD_RECORD = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class TokenizeSpec:
    """Everything that decides the tokens of a record (and so the tokenization cache key)."""

    fmt: str
    fields: dict
    template: object
    tokenizer: Tokenizer
    train_on: str
    seq_len: int
    overlong: str

    def cache_key(self, data_fingerprint: str) -> str:
        parts = [
            TOKENIZED_VERSION,
            data_fingerprint,
            self.fmt,
            json.dumps(self.fields, sort_keys=True),
            repr(self.template),
            self.tokenizer.fingerprint(),
            self.train_on,
            str(self.seq_len),
            self.overlong,
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _tokenize_batch(batch: dict, indices: list[int], *, spec: TokenizeSpec, path: str) -> dict:
    out = {k: [] for k in TOKENIZED_FEATURES}
    for j, index in enumerate(indices):
        where, record, bad = sources.read_row({k: v[j] for k, v in batch.items()}, index, path)
        ids, mask, truncated, full_length = [], [], False, 0
        if bad is None:
            try:
                conv = formats.to_conversation(record, spec.fmt, spec.fields)
                ids, mask = templates.render(spec.template, spec.tokenizer, conv, spec.train_on)
                full_length = len(ids)
                ids, mask, truncated = packing.fit_ids(ids, mask, spec.seq_len, spec.overlong)
            except formats.BadRecord as e:
                bad = e
        out["ids"].append(ids)
        out["mask"].append([int(m) for m in mask])
        out["where"].append(where)
        out["error"].append(str(bad or ""))
        out["code"].append(bad.code if bad else "")
        out["truncated"].append(truncated)
        out["dropped"].append(bad is None and not ids)
        out["full_length"].append(full_length)
    return out


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

    def __len__(self) -> int:
        return len(self.kept)

    def example(self, i: int) -> packing.Example:
        r = self.kept[i]
        sl = slice(self.offsets[r], self.offsets[r + 1])
        return packing.Example(self.ids[sl], self.mask[sl].astype(np.bool_), self.index)

    def examples(self) -> list[packing.Example]:
        return [self.example(i) for i in range(len(self))]


def tokenize_table(
    table: datasets.Dataset, path: str, spec: TokenizeSpec, cache_dir: str, num_proc: int
) -> datasets.Dataset:
    """Batched (and, for large tables, multi-process) tokenization, cached in `cache_dir`."""
    os.makedirs(cache_dir, exist_ok=True)
    key = spec.cache_key(table._fingerprint)
    procs = num_proc or max(1, min(os.cpu_count() or 1, len(table) // 50_000))
    return table.map(
        _tokenize_batch,
        with_indices=True,
        batched=True,
        batch_size=1000,
        fn_kwargs={"spec": spec, "path": path},
        remove_columns=table.column_names,
        features=TOKENIZED_FEATURES,
        num_proc=procs if procs > 1 else None,
        cache_file_name=os.path.join(cache_dir, f"tokenized-{key}.arrow"),
        load_from_cache_file=True,
        desc=f"tokenize {os.path.basename(path)}",
    )


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
    return TokenizedSource(name, index, tokenized, ids, mask, offsets, kept, bad, stats, bad_codes)


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


def eval_batches(
    examples: list[packing.Example], seq_len: int, batch_size: int, mode: str = "best_fit"
) -> list[dict]:
    """Pack once, in order, and pad the last batch with empty rows (loss mask 0) to a full batch.
    `mode="pad"` keeps one example per row, in order (for per-example scores)."""
    rows = packing.pack(examples, seq_len, mode)
    n = len(rows["inputs"])
    padded = -(-n // batch_size) * batch_size
    rows = {k: np.pad(v, ((0, padded - n), (0, 0))) for k, v in rows.items()}
    return [{k: v[i : i + batch_size] for k, v in rows.items()} for i in range(0, padded, batch_size)]


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    prompt_ids: list[int]
    prompt_text: str
    reference: str
    source: int


@dataclasses.dataclass
class Data:
    tokenizer: Tokenizer
    template: object
    source_names: list[str]
    train: TrainBatches
    train_sources: list[TokenizedSource]
    val_sources: list[TokenizedSource]
    eval_prompts: list[EvalPrompt]
    stop_ids: list[int]
    mixture: dict[str, float]

    @property
    def val_examples(self) -> list[packing.Example]:
        return [ex for s in self.val_sources for ex in s.examples()]

    def epochs(self, state: dict) -> dict[str, float]:
        """Epochs of each source drawn by a data state (counted at the start of its pack chunk), in
        the first shard of this process."""
        shard = min(self.train.streams)
        positions = state["shards"][str(shard)]["sampler"]["positions"]
        sizes = self.train.streams[shard].sampler.sizes
        return {
            n: e + p / max(size, 1)
            for n, size, (e, p) in zip(self.source_names, sizes, positions, strict=True)
        }


def source_specs(data_cfg: ml_collections.ConfigDict) -> list[sources.SourceSpec]:
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
    key = f"config.data.sources.{spec.name}"
    if fmt != "auto" and fmt not in formats.FORMATS:
        raise sources.DataError(f"{key}.format={fmt!r} is not one of {('auto',) + formats.FORMATS}")
    columns = [c for c in table.column_names if c != sources.ROW_COLUMN]
    if fmt != "auto" and sources.ROW_COLUMN in table.column_names:  # a table with named columns
        missing = [spec.fields.get(n, n) for n in formats.FORMAT_FIELDS[fmt]]
        missing = [c for c in missing if c not in columns]
        if missing:
            raise sources.DataError(
                f"source {spec.name!r} ({path}): format {fmt!r} needs the column(s) {missing}, but the "
                f"table has {columns}; name the columns to read with {key}.fields (e.g. "
                f"{{{formats.FORMAT_FIELDS[fmt][0]!r}: <column>}}) or set {key}.format"
            )
    bad = []
    for where, record, why in _rows(table, path):
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
                formats.to_conversation(record, fmt, spec.fields)
                return fmt
            except formats.BadRecord as e:
                why = e
        if len(bad) < 10:
            bad.append((where, why))
    raise all_bad_error(spec.name, path, bad, len(table))


def _conversations(table: datasets.Dataset, path: str, fmt: str, fields: dict, limit: int):
    """Up to `limit` parsed conversations (bad records skipped: they are reported elsewhere)."""
    out = []
    for _, record, why in _rows(table, path):
        if len(out) >= limit:
            break
        if why is None:
            try:
                out.append(formats.to_conversation(record, fmt, fields))
            except formats.BadRecord:
                continue
    return out


def _read_source(spec: sources.SourceSpec, seed: int, cache_dir: str):
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


def build_tokenizer(data_cfg, workdir: str, template_name: str, texts, hf_path: str = "") -> Tokenizer:
    """The configured tokenizer, else the HF checkpoint's own, else a SentencePiece model trained on
    the training data and cached in the workdir."""
    if data_cfg.tokenizer:
        return load_tokenizer(data_cfg.tokenizer)
    if hf_path:
        return load_tokenizer(hf_path, key="config.model.hf_path")
    path = os.path.join(workdir, "tokenizer.model")
    if os.path.exists(path):
        return load_tokenizer(path)
    special = templates.BUILTIN[template_name]().special_tokens if template_name in templates.BUILTIN else ()
    logging.info("Training a %d-piece SentencePiece tokenizer on the training data", data_cfg.vocab_size)
    return train_sentencepiece(texts(), data_cfg.vocab_size, path, special_tokens=special)


def build_data(
    data_cfg: ml_collections.ConfigDict,
    seed: int,
    workdir: str,
    process_index: int = 0,
    process_count: int = 1,
    eval_prompt_limit: int = 0,
    hf_path: str = "",
) -> Data:
    """Read, validate, tokenize and mix the configured sources; nothing is written to checkpoints."""
    cache_dir = data_cfg.cache_dir or os.path.join(workdir, "cache")
    if process_count > 1:  # processes tokenize different shards; keep their cache writers apart
        cache_dir = os.path.join(cache_dir, f"process_{process_index}")
    specs = source_specs(data_cfg)
    # ---- raw tables and their formats, each checked to hold a usable record
    raw = []
    for spec in specs:
        train, val, val_path = _read_source(spec, seed, cache_dir)
        fmt = _check_format(spec, spec.format, train, spec.path)
        if val is not None:
            _check_format(spec, fmt, val, val_path)
        raw.append((spec, fmt, train, val, val_path))

    # ---- tokenizer (from the full data, so every process trains the same one) and template
    def texts():
        for spec, fmt, train, _, _ in raw:
            for conv in _conversations(train, spec.path, fmt, dict(spec.fields), 100_000):
                # Role names appear in chat templates' headers: let them become pieces too.
                yield from (f"{m.role}\n{m.content}" for m in conv.messages)

    tok = build_tokenizer(data_cfg, workdir, data_cfg.template, texts, hf_path)
    template = templates.build_template(data_cfg.template, data_cfg.separator, tok)

    # ---- this process's logical shards: it reads and tokenizes only their rows
    num_shards = data_cfg.num_shards or process_count
    if num_shards % process_count:
        raise ValueError(
            f"config.data.num_shards={num_shards} must be a multiple of the {process_count} processes"
        )
    per_process = num_shards // process_count
    my_shards = range(process_index * per_process, (process_index + 1) * per_process)
    host_rows = []
    for k, (spec, fmt, train, val, val_path) in enumerate(raw):
        bounds = shard_bounds(len(train), num_shards)
        lo, hi = bounds[my_shards[0]][0], bounds[my_shards[-1]][1]
        if num_shards > 1:
            raw[k] = (spec, fmt, train.select(range(lo, hi)), val, val_path)
        host_rows.append([(a - lo, b - lo) for a, b in (bounds[s] for s in my_shards)])

    # ---- tokenize, validate
    train_srcs, val_srcs, prompts = [], [], []
    for i, (spec, fmt, train, val, val_path) in enumerate(raw):
        tspec = TokenizeSpec(
            fmt, dict(spec.fields), template, tok, data_cfg.train_on, data_cfg.seq_len, data_cfg.overlong
        )
        src = collect(spec.name, i, tokenize_table(train, spec.path, tspec, cache_dir, data_cfg.num_proc))
        if src.bad and data_cfg.on_bad_record == "error":
            raise bad_records_error(src)
        if not len(src):
            raise no_examples_error(src, spec.path, data_cfg.seq_len, data_cfg.overlong)
        train_srcs.append(src)
        if val is not None:
            vsrc = collect(spec.name, i, tokenize_table(val, val_path, tspec, cache_dir, data_cfg.num_proc))
            if vsrc.bad and data_cfg.on_bad_record == "error":
                raise bad_records_error(vsrc)
            val_srcs.append(vsrc)
            if eval_prompt_limit and fmt != "text":
                per_source = -(-eval_prompt_limit // len(specs))
                for conv in _conversations(val, val_path, fmt, dict(spec.fields), per_source):
                    context, reference = conv.split_last_turn()
                    ids = templates.prompt_ids(template, tok, context)
                    prompts.append(EvalPrompt(ids, tok.decode(ids), reference, i))

    # ---- mixture and packing, one stream per logical shard
    streams, probs = {}, None
    for j, shard in enumerate(my_shards):
        # Examples of source k in this shard: the kept rows inside the shard's row range.
        first, sizes = [], []
        for k, src in enumerate(train_srcs):
            a, b = np.searchsorted(src.kept, host_rows[k][j])
            first.append(int(a))
            sizes.append(int(b - a))
        shard_probs = mixture.mixture_probabilities(
            sizes,
            [spec.weight for spec in specs],
            data_cfg.mixture,
            data_cfg.mixture_cap,
            data_cfg.mixture_temperature,
        )
        probs = shard_probs if probs is None else probs
        sampler = mixture.MixtureSampler(sizes, shard_probs, seed, stream=shard)
        streams[shard] = PackedStream(
            train_srcs, sampler, data_cfg.seq_len, data_cfg.packing, data_cfg.pack_chunk_examples, first
        )
    train_batches = TrainBatches(streams, data_cfg.batch_size, seed, num_shards)
    return Data(
        tokenizer=tok,
        template=template,
        source_names=[s.name for s in specs],
        train=train_batches,
        train_sources=train_srcs,
        val_sources=val_srcs,
        eval_prompts=prompts[:eval_prompt_limit],
        stop_ids=templates.stop_ids(template, tok),
        mixture={s.name: float(p) for s, p in zip(specs, probs, strict=True)},
    )
