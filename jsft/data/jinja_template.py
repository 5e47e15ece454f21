"""A Hugging Face chat template (Jinja2) as a jsft template: the text `transformers`' `apply_chat_template`
renders for a conversation, cut into trained and untrained segments.

Rendering follows transformers 5: a sandboxed environment with its `tojson`, `raise_exception`,
`strftime_now` and `{% generation %}` tag; each message is passed as apply_chat_template passes it
(role, content, `tool_calls` as the record writes them, `reasoning_content` also as `thinking`, `name`,
`tool_call_id`), with `tools` (None without), `documents=None`, `bos_token` and `eos_token`.

What is trained, in the one rendering of the whole conversation (so earlier turns look exactly as the
template renders them, e.g. Qwen3 drops the thinking of turns before the last user query):
  `{% generation %}` markers  exactly the text inside them, as `return_assistant_tokens_mask=True`.
  no markers   each assistant message's reply. It starts where that turn's generation prompt ends:
               where the conversation before it, rendered with `add_generation_prompt`, is a prefix
               of the whole; else after the next occurrence of that prompt's header (what
               `add_generation_prompt` adds) past the previous reply. It ends just after the first
               special token (the end-of-turn token, e.g. `<|im_end|>`) that follows what the message
               says: its reasoning, content and tool calls. What the template writes after that (a
               newline) is not trained, as in the built-in templates. Where neither a generation
               prompt nor the message's own text can be found, the record is refused (a BadRecord
               that suggests adding markers).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

from jsft.data.formats import BadRecord, Conversation, Message, split_think, tool_call_parts
from jsft.data.tokenizer import Tokenizer

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # as transformers looks for it
Segment = tuple[str | list[int], bool]  # (text or literal ids, trained)
Span = tuple[int, int]  # [start, end) characters of a rendered conversation


def _environment():
    """A Jinja2 environment like transformers': sandboxed, trimmed blocks, loop controls, the
    `{% generation %}` tag, and transformers' `tojson`, `raise_exception` and `strftime_now`."""
    import jinja2.ext  # noqa: PLC0415  (only HF templates need jinja2)
    import jinja2.nodes  # noqa: PLC0415
    import jinja2.sandbox  # noqa: PLC0415

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: records where its text lies in the output
        while `blocks` (the output so far) is set, as transformers' AssistantTracker does."""

        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            self.blocks: list[str] | None = None
            self.spans: list[Span] = []

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            if self.blocks is not None:
                start = sum(map(len, self.blocks))
                self.spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise BadRecord(f"chat template refused the conversation: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env, env.extensions[Generation.identifier]


def template_message(m: Message) -> dict[str, Any]:
    """A message as apply_chat_template hands it to a template (absent fields stay absent)."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.reasoning is not None:  # transformers aliases the reasoning as `thinking` (gpt-oss reads it)
        out = {"thinking": m.reasoning, **out, "reasoning_content": m.reasoning}
    if m.tool_calls:
        out["tool_calls"] = list(m.tool_calls)
    for key in ("name", "tool_call_id"):
        if getattr(m, key) is not None:
            out[key] = getattr(m, key)
    return out


def _digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _needles(m: Message) -> list[str]:
    """Texts of an assistant message that a template writes into its reply (when it writes them)."""
    reasoning, reply = split_think(m.content)
    texts = [m.content, m.content.strip(), reply.strip(), (reasoning or "").strip()]
    texts.append((m.reasoning or "").strip())
    for call in m.tool_calls:
        name, arguments = tool_call_parts(call)
        raw = call.get("function", call)["arguments"]
        texts += [name, raw if isinstance(raw, str) else json.dumps(arguments, ensure_ascii=False)]
    return [t for t in texts if t]


def _split(text: str, spans: Sequence[Span]) -> list[Segment]:
    """`text` as alternating untrained and trained segments, the trained ones being `spans`."""
    segs, done = [], 0
    for start, end in sorted(spans):
        start = max(start, done)
        segs += [(text[done:start], False), (text[start:end], True)]
        done = max(done, end)
    segs.append((text[done:], False))
    return [(piece, trained) for piece, trained in segs if piece]


class JinjaTemplate:
    """A Hugging Face `chat_template` (Jinja2, sandboxed, as `transformers` renders it).

    `end_tokens` are the tokens a reply can end with (the tokenizer's special tokens); EOS and
    `end_of_turn` always count. `tool_use_source`: the tokenizer's named `tool_use` template, which
    transformers renders instead of `source` for a conversation with tools.
    """

    special_tokens: tuple[str, ...] = ()

    def __init__(
        self,
        source: str,
        bos_token: str = "",
        eos_token: str = "",
        end_of_turn: str | None = None,
        end_tokens: tuple[str, ...] = (),
        tool_use_source: str | None = None,
    ):
        env, self._tracker = _environment()
        self.source, self.tool_use_source = source, tool_use_source
        self._template = env.from_string(source)
        self._tool_use = env.from_string(tool_use_source) if tool_use_source else self._template
        self.has_markers = bool(GENERATION_TAG.search(source))
        self._tool_use_markers = bool(GENERATION_TAG.search(tool_use_source or source))
        self.bos_token, self.eos_token, self.end_of_turn = bos_token, eos_token, end_of_turn
        self.end_tokens = tuple(end_tokens)

    def __getstate__(self):  # compiled Jinja templates do not pickle; worker processes recompile
        state = (self.source, self.bos_token, self.eos_token, self.end_of_turn, self.end_tokens)
        return (*state, self.tool_use_source)

    def __setstate__(self, state):
        self.__init__(*state)

    def __repr__(self):  # part of the tokenized-data cache key: names the template by its content
        tool_use = f", tool_use_sha256={_digest(self.tool_use_source)}" if self.tool_use_source else ""
        return (
            f"JinjaTemplate(sha256={_digest(self.source)}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"end_of_turn={self.end_of_turn!r}, end_tokens={self.end_tokens!r}{tool_use})"
        )

    # ------------------------------------------------------------------ rendering

    def _variables(self, messages: Sequence[Message], add_generation_prompt: bool, tools) -> dict:
        return dict(
            messages=[template_message(m) for m in messages],
            tools=[dict(t) for t in tools] if tools else None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def render_text(
        self, messages: Sequence[Message], add_generation_prompt: bool, tools: Sequence[dict] = ()
    ) -> str:
        """The template's text for `messages` (what apply_chat_template(tokenize=False) returns)."""
        return self.render_spans(messages, add_generation_prompt, tools)[0]

    def render_spans(
        self, messages: Sequence[Message], add_generation_prompt: bool, tools: Sequence[dict] = ()
    ) -> tuple[str, list[Span]]:
        """(text, the spans inside `{% generation %}` markers); a template error is a BadRecord."""
        import jinja2  # noqa: PLC0415

        variables = self._variables(messages, add_generation_prompt, tools)
        template = self._tool_use if tools else self._template
        self._tracker.blocks, self._tracker.spans = [], []
        try:
            for block in template.generate(**variables):
                self._tracker.blocks.append(block)
            return "".join(self._tracker.blocks), list(self._tracker.spans)
        except BadRecord:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
            raise BadRecord(f"the chat template failed on this record: {type(e).__name__}: {e}") from e
        finally:
            self._tracker.blocks = None

    # ------------------------------------------------------------------ what is trained

    def segments(self, conv: Conversation, tok: Tokenizer, generation_prompt: bool = False) -> list[Segment]:
        msgs = list(conv.messages)
        full, spans = self.render_spans(msgs, generation_prompt, conv.tools)
        if self._tool_use_markers if conv.tools else self.has_markers:
            return _split(full, spans)
        spans, cursor = [], 0
        for i, m in enumerate(msgs):
            if m.role == "assistant":
                spans.append(self._locate_reply(full, msgs, i, conv.tools, cursor))
                cursor = spans[-1][1]
            elif m.content and m.content in full[cursor:]:  # step over what others say, so that it is
                cursor = full.index(m.content, cursor) + len(m.content)  # never taken for a header
        return _split(full, spans)

    def _locate_reply(self, full: str, msgs: list[Message], i: int, tools, cursor: int) -> Span:
        """Where assistant message `i`'s trained reply lies in `full` (see the module docstring)."""
        prompt = self.render_text(msgs[:i], True, tools)
        turn = self.render_text(msgs[: i + 1], False, tools)
        turn = turn[len(prompt) :] if turn.startswith(prompt) else None
        if full.startswith(prompt) and len(prompt) >= cursor:
            start = len(prompt)
        else:  # earlier turns render differently here: find this turn's header after the last reply
            start = self._after_header(full, self._header(msgs[:i], prompt, tools, i), cursor, i)
        if turn is not None and full.startswith(turn, start):  # the turn as it renders when latest
            return start, start + self.reply_end(turn, msgs[i])
        # The turn itself renders differently here (e.g. without its thinking): its reply lies
        # before the next assistant header.
        header = self._header(msgs[:i], prompt, tools, i)
        stop = full.find(header, start)
        region = full[start : stop if stop >= 0 else len(full)]
        return start, start + self.reply_end(region, msgs[i], bounded=False, index=i)

    def _header(self, before: list[Message], prompt: str, tools, i: int) -> str:
        """What the generation prompt adds after the turns `before` assistant message `i`."""
        without = self.render_text(before, False, tools)
        header = prompt[len(without) :] if prompt.startswith(without) else ""
        if not header:
            raise _unlocated(i, "and it writes no generation prompt to find the turn by")
        return header

    def _after_header(self, full: str, header: str, cursor: int, i: int) -> int:
        """Just after the first occurrence of `header` from `cursor` in `full`, or else of its longest
        prefix that ends with a special token (DeepSeek-R1's prompt opens a `<think>` that earlier
        turns lack)."""
        cuts = {header.find(t) + len(t) for t in self._ends() if t in header}
        for cut in sorted(cuts | {len(header)}, reverse=True):
            pos = full.find(header[:cut], cursor)
            if pos >= 0:
                return pos + cut
        raise _unlocated(i, f"and that turn does not start with the generation prompt {header!r}")

    def _ends(self) -> set[str]:
        return {t for t in (self.end_of_turn, self.eos_token, *self.end_tokens) if t}

    def reply_end(self, reply: str, m: Message | str, bounded: bool = True, index: int = 0) -> int:
        """Where the trained part of a rendered reply ends: just after the first end token that
        follows what the message says (its content, reasoning, tool calls). Without one, a `bounded`
        reply (the turn's whole text) is trained whole; an unbounded one is a BadRecord."""
        m = Message("assistant", m) if isinstance(m, str) else m
        # Search after the message's own text, so a reply that quotes a special token is not cut short.
        found = [reply.find(t) + len(t) for t in _needles(m) if t in reply]
        if not found and not bounded:
            raise _unlocated(index, "and that turn shows none of its content, reasoning or tool calls")
        start = max(found, default=0)
        hits = [(reply.find(t, start), -len(t), t) for t in self._ends() if reply.find(t, start) >= 0]
        if hits:
            pos, _, token = min(hits)
            return pos + len(token)
        if not bounded:
            raise _unlocated(index, "and no end-of-turn token follows its reply")
        return len(reply)


def _unlocated(i: int, why: str) -> BadRecord:
    return BadRecord(
        f"the chat template renders earlier turns differently once later turns follow, {why}, so "
        f"assistant message {i}'s reply cannot be located; add {{% generation %}} markers to the "
        "template or use a built-in template (config.data.template)"
    )


def detect_end_of_turn(template: JinjaTemplate) -> str | None:
    """The token that closes an assistant turn in `template` (found by rendering a probe), so that
    generation stops there and choice scores leave it out; None if the probe cannot tell."""
    probe = [Message("user", "Hi"), Message("assistant", "Hello")]
    try:
        prompt = template.render_text(probe[:1], add_generation_prompt=True)
        full = template.render_text(probe, add_generation_prompt=False)
    except Exception:  # noqa: BLE001  (a template may refuse a bare probe; generation then stops at EOS)
        return None
    if not full.startswith(prompt):
        return None
    reply = full[len(prompt) :]
    trained = reply[: template.reply_end(reply, "Hello")]
    ends = [t for t in (template.eos_token, *template.end_tokens) if t and trained.endswith(t)]
    return max(ends, key=len) if ends else None
