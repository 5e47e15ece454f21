"""Chat templates: a Conversation becomes token ids and a loss mask, computed on ids.

A template renders a conversation as *segments*, each a piece of text (or literal ids such as BOS)
that is either trained or not. Segments are tokenized one by one and concatenated, so the mask is
exact by construction: no decoding, no re-tokenizing. Trained segments are the assistant replies
(their reasoning, content and tool calls) *including* their end-of-turn token (or EOS), so the model
learns to stop; tool results are never trained.

  plain   `<bos> prompt + separator` then `reply <eos>` (multi-turn: turns joined the same way); it
          has no way to write tools or tool calls and refuses records that carry them
  chatml  `<|im_start|>role\ncontent<|im_end|>\n` per message (Qwen and many others); tools are listed
          in the system turn inside `<tools></tools>`, calls written as `<tool_call>\n{"name": ...,
          "arguments": ...}\n</tool_call>` after the content, tool results as `tool` turns
  llama3  `<|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>`; tools in
          the system turn, calls as Llama 3.1's `{"name": ..., "parameters": ...}`, results as
          `ipython` turns
  gemma   `<bos><start_of_turn>user\ncontent<end_of_turn>\n<start_of_turn>model\nreply<end_of_turn>\n`
          (Gemma 2, 3): no system role, so a system prompt opens the first user turn followed by a
          blank line, as Gemma's own template does; turn contents are stripped; it has no tool format and
          refuses records with tools, tool calls or tool turns
  hf      the Jinja2 `chat_template` of a Hugging Face tokenizer, rendered as `transformers` renders
          it; trained spans from its `{% generation %}` markers, else located (jinja_template.py)

The built-in templates write an assistant's reasoning as `<think>\nreasoning\n</think>\n\n` before its
content in every turn (and train it); thinking already inline in the content is written as it is.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from jsft.data.formats import BadRecord, Conversation, Message, tool_call_parts
from jsft.data.jinja_template import JinjaTemplate, Segment, detect_end_of_turn
from jsft.data.sources import DataError
from jsft.data.tokenizer import CHAT_TEMPLATE_FILES, Tokenizer

TRAIN_ON = ("all_assistant", "last_assistant")
CHATML_TOOLS = (
    "# Tools\n\nYou may call the functions whose signatures are listed within <tools></tools>:\n<tools>\n"
    "{tools}\n</tools>\n\nTo call one, write a JSON object with its name and arguments within "
    '<tool_call></tool_call> tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}'
    "\n</tool_call>"
)
LLAMA3_TOOLS = (
    "You have access to the following functions. To call one, reply with a JSON object of the form "
    '{{"name": function name, "parameters": dictionary of argument name and its value}}.\n\n{tools}'
)


def _thinking(m: Message) -> str:
    """An assistant's reasoning as the built-in templates write it before the content."""
    return "" if m.reasoning is None else f"<think>\n{m.reasoning.strip(chr(10))}\n</think>\n\n"


def _call_json(call: Mapping[str, Any], arguments_key: str) -> str:
    name, arguments = tool_call_parts(call)
    return json.dumps({"name": name, arguments_key: arguments}, ensure_ascii=False)


def _tools_json(tools: Sequence[Mapping[str, Any]], separator: str) -> str:
    return separator.join(json.dumps(t, ensure_ascii=False) for t in tools)


def _system_with_tools(conv: Conversation, tools_text: str) -> tuple[str | None, tuple[Message, ...]]:
    """(system text with the tools appended, or None without either; the other messages)."""
    msgs = conv.messages
    system = msgs[0].content if msgs and msgs[0].role == "system" else None
    rest = msgs[1:] if system is not None else msgs
    if conv.tools:
        system = f"{system.strip()}\n\n{tools_text}" if system and system.strip() else tools_text
    return system, rest


@dataclasses.dataclass(frozen=True)
class PlainTemplate:
    separator: str = "\n"
    special_tokens: tuple[str, ...] = ()
    end_of_turn: str | None = None  # EOS ends a reply

    def segments(self, conv: Conversation, tok: Tokenizer, generation_prompt: bool = False) -> list[Segment]:
        if conv.tools or any(m.tool_calls for m in conv.messages):
            raise BadRecord(
                "the record has tools or tool calls, which config.data.template='plain' cannot write; set "
                "config.data.template to 'chatml', 'llama3' or 'hf' (the tokenizer's own chat template)"
            )
        segs: list[Segment] = [([tok.bos_id], False)] if tok.bos_id is not None else []
        for m in conv.messages:
            if m.role == "assistant":
                segs += [(_thinking(m) + m.content, True), ([tok.eos_id], True)]
            else:
                segs.append((m.content + self.separator, False))
        return segs


@dataclasses.dataclass(frozen=True)
class ChatMLTemplate:
    special_tokens: tuple[str, ...] = ("<|im_start|>", "<|im_end|>")
    end_of_turn: str | None = "<|im_end|>"

    def segments(self, conv: Conversation, tok: Tokenizer, generation_prompt: bool = False) -> list[Segment]:
        system, msgs = _system_with_tools(conv, CHATML_TOOLS.format(tools=_tools_json(conv.tools, "\n")))
        segs: list[Segment] = [] if system is None else [("<|im_start|>system\n", False)]
        segs += [] if system is None else [(system + "<|im_end|>\n", False)]
        for m in msgs:
            segs.append((f"<|im_start|>{m.role}\n", False))
            if m.role == "assistant":
                calls = [f"<tool_call>\n{_call_json(c, 'arguments')}\n</tool_call>" for c in m.tool_calls]
                reply = "\n".join(([m.content] if m.content else []) + calls)
                segs += [(_thinking(m) + reply + "<|im_end|>", True), ("\n", False)]
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
        system, msgs = _system_with_tools(conv, LLAMA3_TOOLS.format(tools=_tools_json(conv.tools, "\n\n")))
        segs: list[Segment] = [("<|begin_of_text|>", False)]
        if system is not None:
            segs.append(("<|start_header_id|>system<|end_header_id|>\n\n", False))
            segs.append((system.strip() + "<|eot_id|>", False))
        for m in msgs:
            role = "ipython" if m.role == "tool" else m.role  # Llama 3.1's name for a tool's output
            segs.append((f"<|start_header_id|>{role}<|end_header_id|>\n\n", False))
            if m.role == "assistant":
                calls = [_call_json(c, "parameters") for c in m.tool_calls]
                reply = "\n".join(([m.content.strip()] if m.content.strip() else []) + calls)
                segs.append((_thinking(m) + reply + "<|eot_id|>", True))
            else:
                segs.append((m.content.strip() + "<|eot_id|>", False))
        if generation_prompt:
            segs.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
        return segs


@dataclasses.dataclass(frozen=True)
class GemmaTemplate:
    special_tokens: tuple[str, ...] = ("<start_of_turn>", "<end_of_turn>")
    end_of_turn: str | None = "<end_of_turn>"

    def segments(self, conv: Conversation, tok: Tokenizer, generation_prompt: bool = False) -> list[Segment]:
        if conv.tools or any(m.tool_calls or m.role == "tool" for m in conv.messages):
            raise BadRecord(
                "the record has tools, tool calls or tool turns, which config.data.template='gemma' cannot "
                "write (Gemma has no tool format); set config.data.template to 'chatml', 'llama3' or 'hf'"
            )
        msgs = conv.messages
        has_system = bool(msgs) and msgs[0].role == "system"
        system = msgs[0].content + "\n\n" if has_system else ""  # not stripped, as Gemma's template
        msgs = msgs[1:] if has_system else msgs
        segs: list[Segment] = [([tok.bos_id], False)] if tok.bos_id is not None else []
        for i, m in enumerate(msgs):
            role = "model" if m.role == "assistant" else m.role
            prefix = system if i == 0 else ""
            segs.append((f"<start_of_turn>{role}\n{prefix}", False))
            if m.role == "assistant":
                segs += [(_thinking(m) + m.content.strip() + "<end_of_turn>", True), ("\n", False)]
            else:
                segs.append((m.content.strip() + "<end_of_turn>\n", False))
        if generation_prompt:
            segs.append(("<start_of_turn>model\n", False))
        return segs


# What build_template returns; render, prompt_ids and stop_ids take any of them.
Template = PlainTemplate | ChatMLTemplate | Llama3Template | GemmaTemplate | JinjaTemplate


def _encode(tok: Tokenizer, piece: str | list[int]) -> list[int]:
    return list(piece) if isinstance(piece, list) else tok.encode(piece)


def render(
    template: Template,
    tok: Tokenizer,
    conv: Conversation,
    train_on: str = "all_assistant",
    train_reasoning: bool = True,
) -> tuple[list[int], list[bool]]:
    """(ids, mask): mask[i] says whether ids[i] is trained. Raises BadRecord if nothing is trained.
    `train_reasoning=False` removes the assistants' thinking before templating (see
    Conversation.without_reasoning): the model learns to reply without it."""
    if not train_reasoning:
        conv = conv.without_reasoning()
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


BUILTIN = {"plain": PlainTemplate, "chatml": ChatMLTemplate, "llama3": Llama3Template, "gemma": GemmaTemplate}


def build_template(name: str, separator: str = "\n", tokenizer: Any = None) -> Template:
    """`name`: plain | chatml | llama3 | gemma | hf (the tokenizer's own Jinja chat template)."""
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
                "template (chatml, gemma, llama3 or plain), or use a tokenizer that has a chat template"
            )
        template = JinjaTemplate(
            source,
            tokenizer.bos_token or "",
            tokenizer.eos_token or "",
            tokenizer.end_of_turn,
            getattr(tokenizer, "special_tokens", ()),
            getattr(tokenizer, "tool_use_template", None),
        )
        template.end_of_turn = tokenizer.end_of_turn or detect_end_of_turn(template)
        return template
    raise ValueError(f"config.data.template={name!r} is not one of {sorted(BUILTIN) + ['hf']}")
