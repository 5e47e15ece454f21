"""Chat templates: a Conversation becomes token ids and a loss mask, computed on ids.

A template renders a conversation as *segments*, each a piece of text (or literal ids such as BOS)
that is either trained or not. Segments are tokenized one by one and concatenated, so the mask is
exact by construction: no decoding, no re-tokenizing, no searching for the reply in the text.
Trained segments are the assistant replies *including* their end-of-turn token (or EOS), so the model
learns to stop.

  plain   `<bos> prompt + separator` then `reply <eos>` (multi-turn: turns joined the same way)
  chatml  `<|im_start|>role\\ncontent<|im_end|>\\n` per message (Qwen and many others)
  llama3  `<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>`
  hf      the Jinja2 `chat_template` of a Hugging Face tokenizer; stock templates have no
          `{% generation %}` markers, so replies are located by rendering growing prefixes of the
          conversation (with and without the generation prompt) and taking the differences.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

from jsft.data.formats import BadRecord, Conversation, Message
from jsft.data.tokenizer import Tokenizer

Segment = tuple[str | list[int], bool]  # (text or literal ids, trained)
TRAIN_ON = ("all_assistant", "last_assistant")


@dataclasses.dataclass(frozen=True)
class PlainTemplate:
    separator: str = "\n"
    special_tokens: tuple[str, ...] = ()
    end_of_turn: str | None = None  # EOS ends a reply

    def segments(self, conv: Conversation, tok: Tokenizer, generation_prompt: bool = False):
        segs: list[Segment] = [([tok.bos_id], False)] if tok.bos_id is not None else []
        for m in conv.messages:
            if m.role == "assistant":
                segs += [(m.content, True), ([tok.eos_id], True)]
            else:
                segs.append((m.content + self.separator, False))
        return segs


@dataclasses.dataclass(frozen=True)
class ChatMLTemplate:
    special_tokens: tuple[str, ...] = ("<|im_start|>", "<|im_end|>")
    end_of_turn: str | None = "<|im_end|>"

    def segments(self, conv: Conversation, tok: Tokenizer, generation_prompt: bool = False):
        segs: list[Segment] = []
        for m in conv.messages:
            segs.append((f"<|im_start|>{m.role}\n", False))
            if m.role == "assistant":
                segs += [(m.content + "<|im_end|>", True), ("\n", False)]
            else:
                segs.append((m.content + "<|im_end|>\n", False))
        if generation_prompt:
            segs.append(("<|im_start|>assistant\n", False))
        return segs


@dataclasses.dataclass(frozen=True)
class Llama3Template:
    special_tokens: tuple[str, ...] = (
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    )
    end_of_turn: str | None = "<|eot_id|>"

    def segments(self, conv: Conversation, tok: Tokenizer, generation_prompt: bool = False):
        segs: list[Segment] = [("<|begin_of_text|>", False)]
        for m in conv.messages:
            segs.append((f"<|start_header_id|>{m.role}<|end_header_id|>\n\n", False))
            segs.append((m.content.strip() + "<|eot_id|>", m.role == "assistant"))
        if generation_prompt:
            segs.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
        return segs


class JinjaTemplate:
    """A Hugging Face `chat_template` (Jinja2, sandboxed, as `transformers` renders it)."""

    special_tokens: tuple[str, ...] = ()

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", end_of_turn: str | None = None):
        import jinja2.sandbox  # noqa: PLC0415  (only HF templates need jinja2)

        def raise_exception(message):
            raise BadRecord(f"chat template refused the conversation: {message}")

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None, **kw: __import__("json").dumps(
            x, indent=indent, ensure_ascii=False
        )
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        self.source = source
        self._template = env.from_string(source)
        self.bos_token, self.eos_token, self.end_of_turn = bos_token, eos_token, end_of_turn

    def __getstate__(self):  # compiled Jinja templates do not pickle; worker processes recompile
        return (self.source, self.bos_token, self.eos_token, self.end_of_turn)

    def __setstate__(self, state):
        self.__init__(*state)

    def render_text(self, messages: list[Message], add_generation_prompt: bool) -> str:
        return self._template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def segments(self, conv: Conversation, tok: Tokenizer, generation_prompt: bool = False):
        msgs, segs, done = list(conv.messages), [], ""
        for i, m in enumerate(msgs):
            if m.role != "assistant":
                continue
            prompt = self.render_text(msgs[:i], add_generation_prompt=True)
            with_reply = self.render_text(msgs[: i + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not with_reply.startswith(prompt):
                raise BadRecord(
                    "the chat template renders earlier turns differently once later turns follow, so "
                    "replies cannot be located by prefix; use a built-in template (data.template)"
                )
            segs += [(prompt[len(done) :], False), (with_reply[len(prompt) :], True)]
            done = with_reply
        full = self.render_text(msgs, add_generation_prompt=generation_prompt)
        if not full.startswith(done):
            raise BadRecord("the chat template is not prefix-stable for this conversation")
        segs.append((full[len(done) :], False))
        return [(text, trained) for text, trained in segs if text]


def _encode(tok: Tokenizer, piece: str | list[int]) -> list[int]:
    return list(piece) if isinstance(piece, list) else tok.encode(piece)


def render(template, tok: Tokenizer, conv: Conversation, train_on: str = "all_assistant"):
    """(ids, mask): mask[i] says whether ids[i] is trained. Raises BadRecord if nothing is trained."""
    if conv.is_text:
        segs: list[Segment] = [([tok.bos_id], False)] if tok.bos_id is not None else []
        segs += [(conv.messages[0].content, True), ([tok.eos_id], True)]
    else:
        segs = template.segments(conv, tok)
        if train_on == "last_assistant":
            last = max(i for i, (_, trained) in enumerate(segs) if trained)
            # A reply can span several trained segments (reply text, then its EOS id).
            first_of_last = last
            while first_of_last > 0 and segs[first_of_last - 1][1]:
                first_of_last -= 1
            segs = [(p, t and i >= first_of_last) for i, (p, t) in enumerate(segs)]
    ids, mask = [], []
    for piece, trained in segs:
        piece_ids = _encode(tok, piece)
        ids += piece_ids
        mask += [trained] * len(piece_ids)
    if not any(mask[1:]):
        raise BadRecord("nothing to train: the loss mask is empty after templating")
    return ids, mask


def prompt_ids(template, tok: Tokenizer, conv: Conversation) -> list[int]:
    """Token ids of a conversation (ending before a reply) plus the generation prompt."""
    return [
        i for piece, _ in template.segments(conv, tok, generation_prompt=True) for i in _encode(tok, piece)
    ]


def stop_ids(template, tok: Tokenizer) -> list[int]:
    """Token ids that end a generated reply: EOS and the template's end-of-turn token."""
    ids = {tok.eos_id}
    eot = tok.token_id(template.end_of_turn) if template.end_of_turn else None
    if eot is not None:
        ids.add(eot)
    return sorted(ids)


BUILTIN = {"plain": PlainTemplate, "chatml": ChatMLTemplate, "llama3": Llama3Template}


def build_template(name: str, separator: str = "\n", tokenizer: Any = None):
    """`name`: plain | chatml | llama3 | hf (the tokenizer's own Jinja chat template)."""
    if name == "plain":
        return PlainTemplate(separator=separator)
    if name in BUILTIN:
        return BUILTIN[name]()
    if name == "hf":
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            raise ValueError(
                "config.data.template='hf' needs a Hugging Face tokenizer whose tokenizer_config.json "
                "has a chat_template"
            )
        return JinjaTemplate(
            source, tokenizer.bos_token or "", tokenizer.eos_token or "", tokenizer.end_of_turn
        )
    raise ValueError(f"config.data.template={name!r} is not one of {sorted(BUILTIN) + ['hf']}")
