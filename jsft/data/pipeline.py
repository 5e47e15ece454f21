"""From the configured sources to this process's rows of each global batch: `build_data` composes
the data steps, each in its own module, and returns them as one `Data`.

  raw.read_source (read and check every whole file) ─► tokenizer_choice.build_tokenizer
  ─► this process's shards (batches.shard_bounds) ─► tokenizing.tokenize_table (cached on disk)
  ─► examples.collect ─► mixture.MixtureSampler ─► batches.PackedStream ─► batches.TrainBatches

That is config.data.engine="table" (the default). engine="stream" never reads a whole source: it
plans shards (shards.plan: JSONL byte ranges, Parquet row groups), deals them to the logical streams,
indexes only this process's streams' shards and reads, tokenizes and packs on demand in grain workers
(streamed.py, stream.py); see BUILD_NOTES.md, "Streaming data engine".
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np

from jsft.data import batches, eval_data, examples, formats, mixture, packing, raw, templates, tokenizing
from jsft.data.tokenizer import Tokenizer
from jsft.data.tokenizer_choice import build_tokenizer, training_texts
from jsft.errors import DataError

ENGINES = ("table", "stream")


@dataclasses.dataclass
class Data:
    tokenizer: Tokenizer
    template: object
    source_names: list[str]
    train: batches.TrainBatches
    train_sources: list  # examples.TokenizedSource (table engine) or StreamedSource (stream engine)
    val_sources: list[examples.TokenizedSource]
    eval_prompts: list[eval_data.EvalPrompt]
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
    engine = data_cfg.get("engine", "table")
    if engine == "stream":
        from jsft.data import streamed  # noqa: PLC0415  (it builds a Data: imports this module)

        return streamed.build(
            data_cfg, seed, workdir, process_index, process_count, eval_prompt_limit, hf_path
        )
    if engine != "table":
        raise ValueError(f"config.data.engine={engine!r} is not one of {ENGINES}")
    cache_dir = data_cfg.cache_dir or os.path.join(workdir, "cache")
    if process_count > 1:  # processes tokenize different shards; keep their cache writers apart
        cache_dir = os.path.join(cache_dir, f"process_{process_index}")
    specs = raw.source_specs(data_cfg)
    # ---- raw tables and their formats, each checked to hold a usable record
    raw_srcs = [raw.read_source(spec, seed, cache_dir) for spec in specs]
    pretokenized = [r.spec.name for r in raw_srcs if r.fmt in formats.TOKEN_FORMATS]
    if pretokenized and not (data_cfg.tokenizer or hf_path):
        raise DataError(
            f"source(s) {pretokenized} hold token ids: set config.data.tokenizer (or config.model.hf_path) "
            "to the tokenizer they were made with (its vocabulary bounds the ids; nothing is re-tokenized)"
        )
    # ---- tokenizer (from the full data, so every process trains the same one) and template
    tok = build_tokenizer(data_cfg, workdir, data_cfg.template, lambda: training_texts(raw_srcs), hf_path)
    template = templates.build_template(data_cfg.template, data_cfg.separator, tok)
    # ---- this process's logical shards: it tokenizes only their rows
    num_shards = data_cfg.num_shards or process_count
    my_shards = batches.process_shards(num_shards, process_index, process_count)
    host_srcs, host_rows = _select_shards(raw_srcs, num_shards, my_shards)
    # ---- tokenize, validate
    train_srcs, val_srcs = _tokenize_sources(host_srcs, template, tok, data_cfg, cache_dir)
    train_reasoning = bool(data_cfg.get("train_reasoning", True))
    prompts = _eval_prompts(host_srcs, template, tok, eval_prompt_limit, train_reasoning)
    # ---- mixture and packing, one stream per logical shard
    streams, probs = _shard_streams(
        train_srcs, host_rows, my_shards, [s.weight for s in specs], data_cfg, seed
    )
    return Data(
        tokenizer=tok,
        template=template,
        source_names=[s.name for s in specs],
        train=batches.TrainBatches(streams, data_cfg.batch_size, seed, num_shards),
        train_sources=train_srcs,
        val_sources=val_srcs,
        eval_prompts=prompts[:eval_prompt_limit],
        stop_ids=templates.stop_ids(template, tok),
        mixture={s.name: float(p) for s, p in zip(specs, probs, strict=True)},
    )


def _select_shards(
    raw_srcs: list[raw.RawSource], num_shards: int, my_shards: range
) -> tuple[list[raw.RawSource], list[list[tuple[int, int]]]]:
    """Each source with only the training rows of this process's shards, and each of those shards'
    [start, end) rows within them. Every process has read and checked the whole file before this."""
    selected, host_rows = [], []
    for src in raw_srcs:
        bounds = batches.shard_bounds(len(src.train), num_shards)
        lo, hi = bounds[my_shards[0]][0], bounds[my_shards[-1]][1]
        if num_shards > 1:
            src = dataclasses.replace(src, train=src.train.select(range(lo, hi)))
        selected.append(src)
        host_rows.append([(a - lo, b - lo) for a, b in (bounds[s] for s in my_shards)])
    return selected, host_rows


def _tokenize_sources(
    raw_srcs: list[raw.RawSource],
    template: object,
    tok: Tokenizer,
    data_cfg: ml_collections.ConfigDict,
    cache_dir: str,
) -> tuple[list[examples.TokenizedSource], list[examples.TokenizedSource]]:
    """(training raw_srcs, validation raw_srcs), each checked: bad records fail under
    on_bad_record='error', and a training source must keep at least one example."""

    def tokenized(
        i: int, src: raw.RawSource, table: object, path: str, spec: tokenizing.TokenizeSpec
    ) -> examples.TokenizedSource:
        return _tokenized(i, src.spec.name, table, path, spec, data_cfg, cache_dir)

    train_srcs, val_srcs = [], []
    for i, src in enumerate(raw_srcs):
        spec = _tokenize_spec(src.fmt, src.spec, template, tok, data_cfg, src.tools)
        train = tokenized(i, src, src.train, src.spec.path, spec)
        if not len(train):
            raise examples.no_examples_error(train, src.spec.path, data_cfg.seq_len, data_cfg.overlong)
        train_srcs.append(train)
        if src.val is not None:  # evaluation is plain cross-entropy: no rewards needed there
            val_srcs.append(
                tokenized(i, src, src.val, src.val_path, dataclasses.replace(spec, rewards=False))
            )
    return train_srcs, val_srcs


def _tokenize_spec(
    fmt: str, spec, template, tok: Tokenizer, data_cfg, tools: tuple
) -> tokenizing.TokenizeSpec:
    return tokenizing.TokenizeSpec(
        fmt,
        dict(spec.fields),
        template,
        tok,
        data_cfg.train_on,
        data_cfg.seq_len,
        data_cfg.overlong,
        bool(data_cfg.get("rewards", False)),
        bool(data_cfg.get("train_reasoning", True)),
        tools,
    )


def _tokenized(
    i: int, name: str, table, path: str, spec, data_cfg, cache_dir: str
) -> examples.TokenizedSource:
    """A whole table tokenized (cached) and collected; bad records fail under on_bad_record='error'."""
    out = examples.collect(
        name, i, tokenizing.tokenize_table(table, path, spec, cache_dir, data_cfg.num_proc)
    )
    if out.bad and data_cfg.on_bad_record == "error":
        raise examples.bad_records_error(out)
    return out


def _eval_prompts(
    raw_srcs: list[raw.RawSource], template: object, tok: Tokenizer, limit: int, train_reasoning: bool = True
) -> list[eval_data.EvalPrompt]:
    """Up to ceil(limit / sources) generation prompts from each source's validation conversations
    (plain-text raw_srcs have no reply to generate), with their thinking removed where training
    removes it."""
    prompts = []
    for i, src in enumerate(raw_srcs):
        if limit and src.val is not None and src.fmt != "text":
            per_source = -(-limit // len(raw_srcs))
            convs = raw.conversations(
                src.val, src.val_path, src.fmt, dict(src.spec.fields), per_source, src.tools
            )
            convs = convs if train_reasoning else [c.without_reasoning() for c in convs]
            prompts += eval_data.eval_prompts(convs, template, tok, i)
    return prompts


def _shard_streams(
    train_srcs: list[examples.TokenizedSource],
    host_rows: list[list[tuple[int, int]]],
    my_shards: range,
    weights: list[float],
    data_cfg: ml_collections.ConfigDict,
    seed: int,
) -> tuple[dict[int, batches.PackedStream], np.ndarray]:
    """One packed stream per logical shard of this process, and the first shard's mixture
    probabilities (what the log reports)."""
    streams, probs = {}, None
    for j, shard in enumerate(my_shards):
        # Examples of source k in this shard: the kept rows inside the shard's row range.
        first, sizes = [], []
        for k, src in enumerate(train_srcs):
            a, b = np.searchsorted(src.kept, host_rows[k][j])
            first.append(int(a))
            sizes.append(int(b - a))
        shard_probs = mixture.mixture_probabilities(
            sizes, weights, data_cfg.mixture, data_cfg.mixture_cap, data_cfg.mixture_temperature
        )
        probs = shard_probs if probs is None else probs
        sampler = mixture.MixtureSampler(sizes, shard_probs, seed, stream=shard)
        streams[shard] = batches.PackedStream(
            train_srcs, sampler, data_cfg.seq_len, data_cfg.packing, data_cfg.pack_chunk_examples, first
        )
    return streams, probs
