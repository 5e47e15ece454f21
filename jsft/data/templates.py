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
          conversation (with and without the generation prompt) and taking the differences. A
          reply's trained span ends at the first special token after its content (its end-of-turn
          token, e.g. `<|im_end|>`); what the template writes after that (a newline) is not trained,
          exactly as in the built-in templates.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from typing import Any

from jsft.data.formats import BadRecord, Conversation, Message
from jsft.data.sources import DataError
from jsft.data.tokenizer import CHAT_TEMPLATE_FILES, Tokenizer

Segment = tuple[str | list[int], bool]  # (text or literal ids, trained)
TRAIN_ON = ("all_assistant", "last_assistant")


@dataclasses.dataclass(frozen=True)
class PlainTemplate:
    separator: str = "\n"
    special_tokens: tuple[str, ...] = ()
    end_of_turn: str | None = None  # EOS ends a reply

    def segments(self, conv: Conversation, tok: Tokenizer, generation_prompt: bool = False) -> list[Segment]:
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

    def segments(self, conv: Conversation, tok: Tokenizer, generation_prompt: bool = False) -> list[Segment]:
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

    def segments(self, conv: Conversation, tok: Tokenizer, generation_prompt: bool = False) -> list[Segment]:
        segs: list[Segment] = [("<|begin_of_text|>", False)]
        for m in conv.messages:
            segs.append((f"<|start_header_id|>{m.role}<|end_header_id|>\n\n", False))
            segs.append((m.content.strip() + "<|eot_id|>", m.role == "assistant"))
        if generation_prompt:
            segs.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
        return segs


class JinjaTemplate:
    """A Hugging Face `chat_template` (Jinja2, sandboxed, as `transformers` renders it).

    `end_tokens` are the tokens a reply can end with (the tokenizer's special tokens); EOS and
    `end_of_turn` always count.
    """

    special_tokens: tuple[str, ...] = ()

    def __init__(
        self,
        source: str,
        bos_token: str = "",
        eos_token: str = "",
        end_of_turn: str | None = None,
        end_tokens: tuple[str, ...] = (),
    ):
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
        self.end_tokens = tuple(end_tokens)

    def __getstate__(self):  # compiled Jinja templates do not pickle; worker processes recompile
        return (self.source, self.bos_token, self.eos_token, self.end_of_turn, self.end_tokens)

    def __setstate__(self, state):
        self.__init__(*state)

    def __repr__(self):  # part of the tokenized-data cache key: names the template by its content
        digest = hashlib.sha256(self.source.encode()).hexdigest()[:16]
        return (
            f"JinjaTemplate(sha256={digest}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"end_of_turn={self.end_of_turn!r}, end_tokens={self.end_tokens!r})"
        )

    def render_text(self, messages: list[Message], add_generation_prompt: bool) -> str:
        return self._template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def reply_end(self, reply: str, content: str) -> int:
        """Where the trained part of a rendered reply ends: just after the first end token that
        follows the content (the whole reply if the template closes it with no such token)."""
        ends = {t for t in (self.end_of_turn, self.eos_token, *self.end_tokens) if t}
        # Search after the content (as written, or trimmed as many templates do), so a reply that
        # quotes a special token is not cut short.
        text = next((c for c in (content, content.strip()) if c and c in reply), "")
        start = reply.rfind(text) + len(text) if text else 0
        found = [(reply.find(t, start), t) for t in ends if reply.find(t, start) >= 0]
        if not found:
            return len(reply)
        pos, token = min(found, key=lambda x: (x[0], -len(x[1])))
        return pos + len(token)

    def segments(self, conv: Conversation, tok: Tokenizer, generation_prompt: bool = False) -> list[Segment]:
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
            reply = with_reply[len(prompt) :]
            cut = self.reply_end(reply, m.content)
            segs += [(prompt[len(done) :], False), (reply[:cut], True), (reply[cut:], False)]
            done = with_reply
        full = self.render_text(msgs, add_generation_prompt=generation_prompt)
        if not full.startswith(done):
            raise BadRecord("the chat template is not prefix-stable for this conversation")
        segs.append((full[len(done) :], False))
        return [(text, trained) for text, trained in segs if text]


# What build_template returns; render, prompt_ids and stop_ids take any of them.
Template = PlainTemplate | ChatMLTemplate | Llama3Template | JinjaTemplate


def _detect_end_of_turn(template: JinjaTemplate) -> str | None:
    """The token that closes an assistant turn in `template` (found by rendering a probe), so that
    generation stops there and choice scores leave it out; None if the probe cannot tell."""
    probe = Conversation((Message("user", "Hi"), Message("assistant", "Hello")))
    try:
        prompt = template.render_text(list(probe.messages[:1]), add_generation_prompt=True)
        full = template.render_text(list(probe.messages), add_generation_prompt=False)
    except Exception:  # noqa: BLE001  (a template may refuse a bare probe; generation then stops at EOS)
        return None
    if not full.startswith(prompt):
        return None
    reply = full[len(prompt) :]
    trained = reply[: template.reply_end(reply, "Hello")]
    ends = [t for t in (template.eos_token, *template.end_tokens) if t and trained.endswith(t)]
    return max(ends, key=len) if ends else None


def _encode(tok: Tokenizer, piece: str | list[int]) -> list[int]:
    return list(piece) if isinstance(piece, list) else tok.encode(piece)


def render(
    template: Template, tok: Tokenizer, conv: Conversation, train_on: str = "all_assistant"
) -> tuple[list[int], list[bool]]:
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


def prompt_ids(template: Template, tok: Tokenizer, conv: Conversation) -> list[int]:
    """Token ids of a conversation (ending before a reply) plus the generation prompt."""
    return [
        i for piece, _ in template.segments(conv, tok, generation_prompt=True) for i in _encode(tok, piece)
    ]


def stop_ids(template: Template, tok: Tokenizer) -> list[int]:
    """Token ids that end a generated reply: EOS and the template's end-of-turn token."""
    ids = {tok.eos_id}
    eot = tok.token_id(template.end_of_turn) if template.end_of_turn else None
    if eot is not None:
        ids.add(eot)
    return sorted(ids)


BUILTIN = {"plain": PlainTemplate, "chatml": ChatMLTemplate, "llama3": Llama3Template}


def build_template(name: str, separator: str = "\n", tokenizer: Any = None) -> Template:
    """`name`: plain | chatml | llama3 | hf (the tokenizer's own Jinja chat template)."""
    if name == "plain":
        return PlainTemplate(separator=separator)
    if name in BUILTIN:
        return BUILTIN[name]()
    if name == "hf":
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            where = getattr(tokenizer, "path", None) or "(none)"
            raise DataError(
                f"config.data.template='hf': the tokenizer {where} has no chat template (looked in "
                f"{', '.join(CHAT_TEMPLATE_FILES)}); set config.data.template to a built-in "
                "template (chatml, llama3 or plain), or use a tokenizer that has a chat template"
            )
        template = JinjaTemplate(
            source,
            tokenizer.bos_token or "",
            tokenizer.eos_token or "",
            tokenizer.end_of_turn,
            getattr(tokenizer, "special_tokens", ()),
        )
        template.end_of_turn = tokenizer.end_of_turn or _detect_end_of_turn(template)
        return template
    raise ValueError(f"config.data.template={name!r} is not one of {sorted(BUILTIN) + ['hf']}")
