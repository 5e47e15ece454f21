"""What the evaluators read from the data: validation examples packed into full loss batches, and
generation prompts with their reference answers.

Both keep the examples' order, so scores are comparable from one evaluation to the next.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from jsft.data import formats, packing, templates
from jsft.data.tokenizer import Tokenizer


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


def eval_prompts(
    conversations: Iterable[formats.Conversation], template: object, tokenizer: Tokenizer, source: int
) -> list[EvalPrompt]:
    """One prompt per conversation: every turn but the last, rendered up to where the model answers;
    the last turn is the reference."""
    prompts = []
    for conv in conversations:
        context, reference = conv.split_last_turn()
        ids = templates.prompt_ids(template, tokenizer, context)
        prompts.append(EvalPrompt(ids, tokenizer.decode(ids), reference, source))
    return prompts
