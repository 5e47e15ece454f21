"""config.data.engine="stream": the configured sources as a `pipeline.Data` whose training stream
never reads a source whole.

  shards.plan (sizes, Parquet footers) ─► stream.check_format (each file's first records)
  ─► tokenizer and template ─► shards.deal ─► this process's streams: StreamSource.index, mixture
  ─► stream.GrainStream per stream ─► batches.TrainBatches

Validation comes from `val_path` files only (read whole, as the table engine does: small by
assumption); holding out `val_fraction` or reading a `val_split` would need the whole source and is
refused by name.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import ml_collections

from jsft.data import batches, formats, mixture, raw, shards, sources, stream, templates
from jsft.data.pipeline import Data, _eval_prompts, _tokenize_spec, _tokenized
from jsft.data.tokenizer_choice import TEXT_CONVERSATIONS, build_tokenizer, conversation_texts


@dataclasses.dataclass
class StreamedSource:
    """A streamed training source: what is known before any record is parsed (this process's part)."""

    name: str
    index: int
    stats: dict  # records (indexed in this process's streams), shards


@dataclasses.dataclass
class _Planned:
    """The sources before any is indexed: specs, shards in file order, formats, tool schemas."""

    specs: list[sources.SourceSpec]
    shards: list[list[shards.Shard]]
    fmts: list[str]
    tools: list[tuple]


def build(
    data_cfg: ml_collections.ConfigDict,
    seed: int,
    workdir: str,
    process_index: int,
    process_count: int,
    eval_prompt_limit: int,
    hf_path: str,
) -> Data:
    """Shards planned from sizes and metadata, this process's streams indexed, and records read,
    tokenized and packed only when drawn (stream.GrainStream)."""
    cache_dir = data_cfg.cache_dir or os.path.join(workdir, "cache")
    if process_count > 1:  # validation tables and "table"-kind shards are cached per process
        cache_dir = os.path.join(cache_dir, f"process_{process_index}")
    reader = shards.Reader(cache_dir)
    plan = _plan(data_cfg, reader, hf_path)
    tok = build_tokenizer(data_cfg, workdir, data_cfg.template, lambda: _texts(plan, reader), hf_path)
    template = templates.build_template(data_cfg.template, data_cfg.separator, tok)
    tok_specs = tuple(
        _tokenize_spec(f, s, template, tok, data_cfg, t)
        for s, f, t in zip(plan.specs, plan.fmts, plan.tools, strict=True)
    )
    num_shards = data_cfg.num_shards or process_count
    mine = batches.process_shards(num_shards, process_index, process_count)
    streams, probs, stats = _streams(plan, tok_specs, data_cfg, seed, num_shards, mine, reader, cache_dir)
    val_srcs, raw_vals = _validation(plan, tok_specs, data_cfg, cache_dir)
    train_reasoning = bool(data_cfg.get("train_reasoning", True))
    prompts = _eval_prompts(raw_vals, template, tok, eval_prompt_limit, train_reasoning)
    return Data(
        tokenizer=tok,
        template=template,
        source_names=[s.name for s in plan.specs],
        train=batches.TrainBatches(streams, data_cfg.batch_size, seed, num_shards),
        train_sources=[
            StreamedSource(s.name, k, st) for k, (s, st) in enumerate(zip(plan.specs, stats, strict=True))
        ],
        val_sources=val_srcs,
        eval_prompts=prompts[:eval_prompt_limit],
        stop_ids=templates.stop_ids(template, tok),
        mixture={s.name: float(p) for s, p in zip(plan.specs, probs, strict=True)},
    )


def _plan(data_cfg: ml_collections.ConfigDict, reader: shards.Reader, hf_path: str) -> _Planned:
    """Every source's shards (sizes and metadata only) and format (from the file's first records)."""
    specs = raw.source_specs(data_cfg)
    for spec in specs:
        for key in ("val_fraction", "val_split"):
            if getattr(spec, key):
                raise sources.DataError(
                    f"config.data.sources.{spec.name}.{key}: holding out validation records needs the whole "
                    "source (config.data.engine='table'); with engine='stream' give a val_path"
                )
    plan = _Planned(specs, [], [], [])
    for spec in specs:
        try:
            plan.shards.append(shards.plan(spec.path, int(data_cfg.get("shard_bytes", 64 << 20))))
        except sources.DataError as e:
            raise sources.DataError(
                f"source {spec.name!r} (config.data.sources.{spec.name}.path): {e}"
            ) from e
        plan.tools.append(raw.read_tools(spec))
        plan.fmts.append(stream.check_format(spec, plan.shards[-1], reader))
    pretokenized = [s.name for s, f in zip(specs, plan.fmts, strict=True) if f in formats.TOKEN_FORMATS]
    if pretokenized and not (data_cfg.tokenizer or hf_path):
        raise sources.DataError(
            f"source(s) {pretokenized} hold token ids: set config.data.tokenizer (or config.model.hf_path)"
        )
    return plan


def _texts(plan: _Planned, reader: shards.Reader) -> Iterator[str]:
    """A trained tokenizer's text: the first conversations of each source, in file order."""
    for k, spec in enumerate(plan.specs):
        convs = stream.conversations(
            spec, plan.fmts[k], plan.shards[k], reader, TEXT_CONVERSATIONS, plan.tools[k]
        )
        yield from conversation_texts(convs)


def _streams(
    plan: _Planned,
    tok_specs: tuple,
    data_cfg: ml_collections.ConfigDict,
    seed: int,
    num_shards: int,
    mine: range,
    reader: shards.Reader,
    cache_dir: str,
) -> tuple[dict[int, stream.GrainStream], list[float], list[dict]]:
    """This process's streams (their shards indexed), the first one's mixture probabilities, and
    per source the records and shards this process holds."""
    dealt = [shards.deal(p, num_shards, seed, k) for k, p in enumerate(plan.shards)]
    weights, names = [x.weight for x in plan.specs], [x.name for x in plan.specs]
    streams, probs, records = {}, None, [0] * len(plan.specs)
    for s in mine:
        srcs = tuple(stream.StreamSource.index(dealt[k][s], reader) for k in range(len(plan.specs)))
        sizes = [len(x) for x in srcs]
        if not sum(sizes):
            raise sources.DataError(
                f"data stream {s} of {num_shards} holds no shard of any source: lower "
                "config.data.num_shards or config.data.shard_bytes (JSONL files are cut into shard_bytes "
                "ranges, Parquet files by row group)"
            )
        records = [a + b for a, b in zip(records, sizes, strict=True)]
        p = mixture.mixture_probabilities(
            sizes, weights, data_cfg.mixture, data_cfg.mixture_cap, data_cfg.mixture_temperature
        )
        probs = p if probs is None else probs
        spec = stream.StreamSpec(
            srcs, tok_specs, tuple(float(x) for x in p), seed, s, int(data_cfg.get("shuffle_window", 0)),
            data_cfg.pack_chunk_examples, data_cfg.seq_len, data_cfg.packing, cache_dir,
        )  # fmt: skip
        streams[s] = stream.GrainStream(spec, int(data_cfg.get("workers", 0)), data_cfg.on_bad_record, names)
    stats = [
        {"records": n, "shards": sum(len(d[s]) for s in mine)} for n, d in zip(records, dealt, strict=True)
    ]
    return streams, list(probs), stats


def _validation(
    plan: _Planned, tok_specs: tuple, data_cfg: ml_collections.ConfigDict, cache_dir: str
) -> tuple[list, list[raw.RawSource]]:
    """(tokenized validation sources, their raw tables for generation prompts) from the val_paths."""
    val_srcs, raw_vals = [], []
    for k, spec in enumerate(plan.specs):
        if not spec.val_path:
            continue
        try:
            table = sources.read_table(spec.val_path, spec.split, cache_dir)
        except sources.DataError as e:
            raise sources.DataError(
                f"source {spec.name!r} (config.data.sources.{spec.name}.val_path): {e}"
            ) from e
        raw_vals.append(raw.RawSource(spec, plan.fmts[k], None, table, spec.val_path, plan.tools[k]))
        val_spec = dataclasses.replace(tok_specs[k], rewards=False)
        val_srcs.append(_tokenized(k, spec.name, table, spec.val_path, val_spec, data_cfg, cache_dir))
    return val_srcs, raw_vals
