"""Which tokenizer a run uses: the configured one, else the HF checkpoint's own, else a SentencePiece
model trained on the training data's text and cached in the workdir.

Training reads the whole of every source (not this process's shard), so every process of a
multi-process run trains the same tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator

import ml_collections

from jsft.data import raw, templates
from jsft.data.tokenizer import (
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
    trained_source,
)

TEXT_CONVERSATIONS = 100_000  # conversations per source that a trained tokenizer learns from


def build_tokenizer(
    data_cfg: ml_collections.ConfigDict,
    workdir: str,
    template_name: str,
    texts: Callable[[], Iterable[str]],
    hf_path: str = "",
) -> Tokenizer:
    """The configured tokenizer, else the HF checkpoint's own, else a SentencePiece model trained on
    the training data and cached in the workdir."""
    if data_cfg.tokenizer:
        return load_tokenizer(data_cfg.tokenizer)
    if hf_path:
        return load_tokenizer(hf_path, key="config.model.hf_path")
    path = os.path.join(workdir, "tokenizer.model")
    if os.path.exists(path):  # trained by an earlier start of this run
        return SentencePieceTokenizer(path, trained_source(path))
    special = templates.BUILTIN[template_name]().special_tokens if template_name in templates.BUILTIN else ()
    logging.info("Training a %d-piece SentencePiece tokenizer on the training data", data_cfg.vocab_size)
    return train_sentencepiece(texts(), data_cfg.vocab_size, path, special_tokens=special)


def training_texts(raw_sources: list[raw.RawSource]) -> Iterator[str]:
    """The text a tokenizer is trained on: each message of the sources' first conversations."""
    for r in raw_sources:
        fields = dict(r.spec.fields)
        yield from conversation_texts(
            raw.conversations(r.train, r.spec.path, r.fmt, fields, TEXT_CONVERSATIONS, r.tools)
        )


def conversation_texts(convs: Iterable) -> Iterator[str]:
    """Each conversation's messages, reasoning, tool calls and tools as tokenizer training text."""
    for conv in convs:
        # Role names appear in chat templates' headers: let them become pieces too.
        yield from (f"{m.role}\n{m.content}" for m in conv.messages)
        # What the templates write of reasoning, tool calls and tools.
        yield from (m.reasoning for m in conv.messages if m.reasoning)
        yield from (json.dumps(c, ensure_ascii=False) for m in conv.messages for c in m.tool_calls)
        yield from (json.dumps(t, ensure_ascii=False) for t in conv.tools)
