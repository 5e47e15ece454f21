"""From files to this host's slice of each global batch, deterministically and resumably.

The train iterator's whole position is two integers, `{"epoch", "batch"}`: every epoch shuffles the
examples with a seed derived from (seed, epoch) and packs them afresh, so any position can be rebuilt
from scratch. That state goes into every checkpoint, and a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import ml_collections
import numpy as np

from jsft.data import packing, sources, templates
from jsft.data.tokenizer import SentencePieceTokenizer, Tokenizer, train_sentencepiece


def tokenize(records: list[sources.Record], tok: Tokenizer, template) -> list[packing.Example]:
    examples = []
    for rec in records:
        ids, mask = template.render(tok, rec.prompt, rec.response)
        examples.append(packing.Example(np.asarray(ids, np.int32), np.asarray(mask, np.bool_)))
    return examples


def fit_all(examples: list[packing.Example], seq_len: int) -> tuple[list[packing.Example], dict]:
    stats = packing.PackStats()
    fitted = [packing.fit_example(ex, seq_len, stats) for ex in examples]
    return [ex for ex in fitted if ex is not None], stats.as_dict()


class TrainBatches:
    """Endless iterator of packed batches: yields this process's rows of each global batch."""

    def __init__(
        self,
        examples: list[packing.Example],
        seq_len: int,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if global_batch_size % process_count:
            raise ValueError(
                f"config.data.batch_size={global_batch_size} must divide evenly over "
                f"{process_count} processes"
            )
        self.examples, self.seq_len, self.seed = examples, seq_len, seed
        self.global_batch_size = global_batch_size
        per_host = global_batch_size // process_count
        self.host_rows = slice(process_index * per_host, (process_index + 1) * per_host)
        self.epoch, self.batch = 0, 0
        self._rows_epoch, self._rows = None, None

    def _epoch_rows(self, epoch: int) -> dict[str, np.ndarray]:
        if self._rows_epoch != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._rows = packing.pack([self.examples[i] for i in order], self.seq_len)
            self._rows_epoch = epoch
            n_rows = len(self._rows["inputs"])
            if n_rows < self.global_batch_size:
                raise ValueError(
                    f"the training data packs into {n_rows} rows of {self.seq_len} tokens, fewer "
                    f"than one batch (config.data.batch_size={self.global_batch_size}); lower the "
                    "batch size or seq_len, or add data"
                )
        return self._rows

    def batches_per_epoch(self) -> int:
        return len(self._epoch_rows(self.epoch)["inputs"]) // self.global_batch_size

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.batch >= self.batches_per_epoch():
            self.epoch, self.batch = self.epoch + 1, 0
        rows = self._epoch_rows(self.epoch)
        start = self.batch * self.global_batch_size
        self.batch += 1
        return {k: v[start : start + self.global_batch_size][self.host_rows] for k, v in rows.items()}

    def state(self) -> dict[str, int]:
        """The position *after* the last batch handed out: restoring it continues from there."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

    def restore(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint's data seed {state['seed']} differs from config.seed={self.seed}; "
                "resuming with another seed would replay a different data order"
            )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def eval_batches(examples: list[packing.Example], seq_len: int, batch_size: int) -> list[dict]:
    """Pack once, in order, and pad the last batch with empty rows (loss mask 0) to a full batch."""
    rows = packing.pack(examples, seq_len)
    n = len(rows["inputs"])
    padded = -(-n // batch_size) * batch_size
    rows = {k: np.pad(v, ((0, padded - n), (0, 0))) for k, v in rows.items()}
    return [{k: v[i : i + batch_size] for k, v in rows.items()} for i in range(0, padded, batch_size)]


@dataclasses.dataclass
class Data:
    tokenizer: Tokenizer
    template: templates.PlainTemplate
    train: TrainBatches
    val_records: list[sources.Record]
    val_examples: list[packing.Example]
    stats: dict


def build_tokenizer(data_cfg: ml_collections.ConfigDict, workdir: str, train_records) -> Tokenizer:
    """The configured tokenizer file, or one trained on the training data and cached in workdir."""
    if data_cfg.tokenizer:
        return SentencePieceTokenizer(data_cfg.tokenizer)
    path = os.path.join(workdir, "tokenizer.model")
    if os.path.exists(path):
        logging.info("Using the tokenizer cached at %s", path)
        return SentencePieceTokenizer(path)
    logging.info("Training a %d-piece SentencePiece tokenizer on the training data", data_cfg.vocab_size)
    texts = (t for r in train_records for t in (r.prompt, r.response))
    return train_sentencepiece(texts, data_cfg.vocab_size, path)


def build_data(
    data_cfg: ml_collections.ConfigDict, seed: int, workdir: str, process_index: int, process_count: int
) -> Data:
    train_records = sources.read_jsonl(data_cfg.train_path)
    val_records = sources.read_jsonl(data_cfg.val_path) if data_cfg.val_path else []
    tok = build_tokenizer(data_cfg, workdir, train_records)
    template = templates.build_template(data_cfg.template, data_cfg.separator)
    train_examples, train_stats = fit_all(tokenize(train_records, tok, template), data_cfg.seq_len)
    val_examples, val_stats = fit_all(tokenize(val_records, tok, template), data_cfg.seq_len)
    train = TrainBatches(
        train_examples, data_cfg.seq_len, data_cfg.batch_size, seed, process_index, process_count
    )
    stats = {"train": train_stats, "val": val_stats}
    return Data(tok, template, train, val_records, val_examples, stats)
