"""One tokenizer interface; a SentencePiece implementation and a trainer for it.

Everything downstream (templates, packing, generation) sees only `Tokenizer`: ids in, ids out, and
the special ids. A Hugging Face `tokenizer.json` implementation slots in beside SentencePiece later.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from typing import Protocol

import sentencepiece as spm


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class SentencePieceTokenizer:
    """A SentencePiece `.model` file; special ids are read from the model itself."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"{path}: the SentencePiece model defines no EOS id; SFT needs one")
        # Padding positions are never trained or attended to, so any valid id will do.
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def train_sentencepiece(texts: Iterable[str], vocab_size: int, path: str) -> SentencePieceTokenizer:
    """Train a BPE model on `texts` and write it to `path` (deterministic for the same texts).

    Digits are split so numbers tokenize one digit at a time, which small models learn far better.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a tiny corpus may not support the requested size; take fewer
        split_digits=True,
        byte_fallback=True,  # any UTF-8 text at generation or eval time stays representable
        character_coverage=1.0,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        num_threads=1,  # one thread keeps the merges identical from run to run
        minloglevel=2,
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, path)  # a crash mid-write never leaves a half tokenizer behind
    return SentencePieceTokenizer(path)
