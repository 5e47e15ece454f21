"""Templates turn a record into token ids and a loss mask, working on ids, never re-tokenized text.

`render` returns `(ids, mask)` where `mask[i]` says whether token `ids[i]` is trained (predicted
from the tokens before it). Prompt tokens are never trained; response tokens and the closing EOS
are, so the model learns both the answer and when to stop.
"""

from __future__ import annotations

import dataclasses

from jsft.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class PlainTemplate:
    """`<bos> prompt + separator` (not trained), then `response <eos>` (trained)."""

    separator: str = "\n"

    def prompt_ids(self, tok: Tokenizer, prompt: str) -> list[int]:
        bos = [tok.bos_id] if tok.bos_id is not None else []
        return bos + tok.encode(prompt + self.separator)

    def render(self, tok: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[bool]]:
        prompt_ids = self.prompt_ids(tok, prompt)
        response_ids = tok.encode(response) + [tok.eos_id]
        return prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids)


TEMPLATES = {"plain": PlainTemplate}


def build_template(name: str, separator: str):
    if name not in TEMPLATES:
        raise ValueError(f"config.data.template={name!r} is not one of {sorted(TEMPLATES)}")
    return TEMPLATES[name](separator=separator)
