"""Tokenize a raw table into ids and loss masks, batched, multi-process for large tables, and cached
on disk under a key made of everything that decides the tokens.

Each raw row becomes one row of TOKENIZED_FEATURES: a good record its ids and mask (fitted to
seq_len + 1 tokens by the overlong policy), a bad one its location, reason and reason code, so that
reports can list every record without reading the raw file again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import datasets

from jsft.data import formats, packing, sources, templates
from jsft.data.tokenizer import Tokenizer

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
        "weight": datasets.Value("float32"),  # the record's `weight` field (1 when absent)
        "reward": datasets.Sequence(datasets.Value("float32")),  # Q-SFT: per token ([] without)
        "parts": datasets.Sequence(datasets.Value("string")),  # formats.CHAT_PARTS the record holds
    }
)
TOKENIZED_VERSION = "5"  # bump when TOKENIZED_FEATURES or their meaning change: old caches are stale


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
    rewards: bool = False  # Q-SFT: read each assistant turn's reward and place it on the turn's end
    train_reasoning: bool = True  # False: assistants' thinking is removed before templating
    tools: tuple = ()  # the source's tool schemas, for records without their own `tools`

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
            str(self.rewards),
            str(self.train_reasoning),
            json.dumps(list(self.tools), sort_keys=True),
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _tokenize_batch(batch: dict, indices: list[int], *, spec: TokenizeSpec, path: str) -> dict:
    out = {k: [] for k in TOKENIZED_FEATURES}
    for j, index in enumerate(indices):
        where, record, bad = sources.read_row({k: v[j] for k, v in batch.items()}, index, path)
        ids, mask, truncated, full_length, weight, rewards, parts = [], [], False, 0, 1.0, None, []
        if bad is None:
            try:
                ids, mask, truncated, full_length, weight, rewards, parts = encode_record(record, spec)
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
        out["weight"].append(weight)
        out["parts"].append(parts)
        out["reward"].append(
            place_rewards(mask, rewards, spec.train_on) if rewards is not None and ids else []
        )
    return out


def encode_record(record: dict, spec: TokenizeSpec) -> tuple:
    """(ids, mask, truncated, full_length, weight, rewards or None, parts) of one readable record,
    fitted to seq_len + 1 tokens (ids empty when dropped); a `formats.BadRecord` when it is bad."""
    rewards, parts = None, []
    weight = formats.record_weight(record, spec.fields)
    if spec.rewards:
        rewards = formats.record_rewards(record, spec.fmt, spec.fields)
    if spec.fmt in formats.TOKEN_FORMATS:  # ids as they are: no template, no tokenizer
        ids, mask = formats.token_ids(record, spec.fmt, spec.fields, spec.tokenizer.vocab_size)
    else:
        conv = formats.to_conversation(record, spec.fmt, spec.fields, spec.tools)
        parts = conv.parts()
        ids, mask = templates.render(spec.template, spec.tokenizer, conv, spec.train_on, spec.train_reasoning)
    full_length = len(ids)
    ids, mask, truncated = packing.fit_ids(ids, mask, spec.seq_len, spec.overlong)
    return ids, mask, truncated, full_length, weight, rewards, parts


def place_rewards(mask: list[bool], rewards: list[float], train_on: str) -> list[float]:
    """Per token: each assistant turn's reward on the last trained token of its run of trained tokens
    (its end-of-turn token), 0 elsewhere. With train_on=last_assistant the one run is the last turn;
    a turn cut off by truncation keeps its reward on its last kept token."""
    ends = [i for i, m in enumerate(mask) if m and (i + 1 == len(mask) or not mask[i + 1])]
    turns = rewards[-len(ends) :] if train_on == "last_assistant" else rewards[: len(ends)]
    out = [0.0] * len(mask)
    for i, r in zip(ends, turns, strict=False):
        out[i] = r
    return out


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
