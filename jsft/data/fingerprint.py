"""What defines the training data stream, as a flat dict stored in every checkpoint.

A resumed run compares its own fingerprint with the checkpoint's: a changed batch size, sequence
length, packing chunk, mixture, tokenizer, template or data file would silently replay a different
stream (or fail when a source shrank), so the loop names the changed fields instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ml_collections

STREAM_FIELDS = (
    "batch_size",
    "seq_len",
    "packing",
    "pack_chunk_examples",
    "mixture",
    "mixture_cap",
    "mixture_temperature",
    "template",
    "separator",
    "train_on",
    "overlong",
    "train_reasoning",
    "engine",
    "shuffle_window",
    "shard_bytes",
)
# Validation files are not part of the training stream; val_fraction is (it decides the held-out rows).
SOURCE_FIELDS = ("path", "format", "fields", "weight", "split", "val_fraction", "tools")


def stream_fingerprint(
    data_cfg: ml_collections.ConfigDict,
    seed: int,
    num_shards: int,
    tokenizer_id: str,
    source_counts: Sequence[dict],
) -> dict[str, object]:
    """`source_counts`: per source (in `config.data.sources` order), records/examples/tokens over all
    processes. Values are JSON-able and compared with ==."""
    out: dict[str, object] = {"seed": seed, "data.num_shards": num_shards, "tokenizer": tokenizer_id}
    out.update({f"data.{k}": data_cfg.get(k) for k in STREAM_FIELDS})
    for (name, src), counts in zip(sorted(data_cfg.sources.items()), source_counts, strict=True):
        for k in SOURCE_FIELDS:
            value = src.get(k)
            out[f"data.sources.{name}.{k}"] = value.to_dict() if hasattr(value, "to_dict") else value
        for k, v in counts.items():
            out[f"source {name!r} {k}"] = v
    return _jsonable(out)


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def changes(saved: dict, current: dict) -> list[str]:
    """'key: old -> new' for every field that differs (an empty list when the streams agree). Fields
    only one side has (a checkpoint from another jsft version) are not compared."""
    keys = sorted(set(saved) & set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
