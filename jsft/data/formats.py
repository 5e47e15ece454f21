"""Record formats: every source record becomes one `Conversation`, or a `BadRecord` saying why not.

  prompt_response  {"prompt": str, "response": str}
  alpaca           {"instruction": str, "input": str (optional), "output": str}
  chat             {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...],
                   "tools": [JSON schema, ...] (optional)}  OpenAI-style tool calling and reasoning:
                   below
  sharegpt         {"conversations": [{"from": "human"|"gpt"|..., "value": str}, ...], "system": str
                   (optional)}  ShareGPT as it comes; roles map by SHAREGPT_ROLES
  text             {"text": str}  (continued pretraining: every token is trained, no template)
  token_ids        {"prompt_ids": [int], "completion_ids": [int]}  pre-tokenized: the completion is
                   trained; no template, no tokenization (ids must be below the tokenizer's size)
  input_ids        {"input_ids": [int], "labels": [int] (optional)}  pre-tokenized, Hugging Face
                   style: labels equal to the input id are trained, -100 is ignored (no labels: all)

A source may rename fields (`fields={"prompt": "question"}`). Either list of turns may hold messages
in either style (`role`/`content` or ShareGPT's `from`/`value`). Roles: system, user, assistant, and
tool (a tool's result, which sits where a user turn would: after an assistant turn that called it).

Tool calling and reasoning, as OpenAI's API, TRL and `transformers`' `apply_chat_template` write them:
  tools            a record's `tools`: a list of function schemas ({"type": "function", "function":
                   {"name", "description", "parameters"}} or the bare function), or a JSON string of
                   one; records without it take their source's (`config.data.sources.<name>.tools`)
  tool_calls       on an assistant message: [{"type": "function", "function": {"name": str,
                   "arguments": object or a JSON string of one}, "id": ...}, ...] (or the bare
                   {"name", "arguments"}); content may then be empty or null
  reasoning_content  on an assistant message: its thinking (`reasoning` and `thinking` are read too).
                   Thinking written inline, `<think>...</think>` before the reply in content, stays
                   content (templates split it themselves), but counts as reasoning for
                   config.data.train_reasoning=False
  name, tool_call_id  on a tool message: the function it answers and the call's id (passed on to HF
                   templates)

Every bad record carries a short, stable reason code (counted in the data stats' `bad_by_reason`)
and a detail for the listing that names its file and line:
  invalid_json, not_utf8     the line (or .json file) is not JSON text          (sources.py)
  not_an_object              valid JSON, but not an object (e.g. an array)      (sources.py, here)
  missing_field, wrong_type, empty_field                                        a field of the format
  bad_role, role_order, empty_response, no_assistant_turn                       chat turns
  bad_tool_call              an assistant's tool_calls: not a list, a call without a function name,
                             or arguments that are not a JSON object
  bad_tools                  the record's `tools` is not a list of function schemas
  unknown_format             the fields match no format
  template                   the chat template could not render it             (templates.py)
  bad_token_id, bad_labels   a pre-tokenized record's ids or labels do not fit
  bad_weight                 the optional `weight` field is not a finite number >= 0
  missing_reward, bad_reward Q-SFT's rewards: none in the record, or one that is not a number in
                             [0, 1] or sits on a non-assistant turn

Any format may carry `weight` (a number >= 0, default 1): the example's weight in the loss
(jsft/train/losses.py: the loss is the weighted mean over trained tokens).

At ~500 lines this is one piece, the one record schema: every format's parsing shares BadRecord, the
field renames and the chat checks. The seam, when it grows, is the pre-tokenized formats and the
per-record fields (weight, Q-SFT's reward), which only read records.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

FORMATS = ("prompt_response", "alpaca", "chat", "sharegpt", "text", "token_ids", "input_ids")
TOKEN_FORMATS = ("token_ids", "input_ids")  # pre-tokenized: records carry ids, not text
CHAT_FORMATS = ("chat", "sharegpt")  # a list of turns; the field that holds it is the first field
IGNORE_LABEL = -100
ROLES = ("system", "user", "assistant", "tool")
CHAT_PARTS = ("tools", "tool_calls", "tool_results", "reasoning")  # beyond plain turns (data report)
# The role names of ShareGPT and its variants (LLaMA-Factory's function calling, Gemini's "model"):
# a function call is the assistant's turn (trained), an observation is the tool's result (not).
SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "function": "tool",
}
# Which roles may follow which (after an optional system message, the first turn is the user's).
NEXT_ROLES = {"user": ("assistant",), "assistant": ("user", "tool"), "tool": ("assistant", "tool")}

# The canonical field names of each format, in the order detection tries them.
FORMAT_FIELDS = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_response": ("prompt", "response"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
    "token_ids": ("prompt_ids", "completion_ids"),
    "input_ids": ("input_ids",),
}


class BadRecord(ValueError):
    """A record that cannot be trained on: the message is the detail, shown with its location, and
    `code` the kind of problem (see the module docstring); reasons raised without one come from
    rendering the conversation with the chat template."""

    def __init__(self, detail: str, code: str = "template"):
        super().__init__(detail)
        self.code = code


JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number"}


def not_an_object(value: Any) -> BadRecord:
    """The reason for a record that is valid JSON but not an object."""
    kind = "true/false" if isinstance(value, bool) else "null" if value is None else None
    kind = kind or JSON_TYPES.get(type(value), type(value).__name__)
    return BadRecord(f"not a JSON object (a JSON {kind})", code="not_an_object")


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str
    reasoning: str | None = None  # an assistant's `reasoning_content` (None: the record has none)
    tool_calls: tuple[Mapping[str, Any], ...] = ()  # an assistant's calls, as the record writes them
    name: str | None = None  # a tool result's function name
    tool_call_id: str | None = None  # the call a tool result answers


@dataclasses.dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    is_text: bool = False  # plain text for continued pretraining: rendered without a template
    tools: tuple[Mapping[str, Any], ...] = ()  # schemas of the functions the assistant may call

    def parts(self) -> list[str]:
        """Which of CHAT_PARTS the conversation holds (for the data report)."""
        found = {
            "tools": bool(self.tools),
            "tool_calls": any(m.tool_calls for m in self.messages),
            "tool_results": any(m.role == "tool" for m in self.messages),
            "reasoning": any(
                m.role == "assistant" and (m.reasoning is not None or split_think(m.content)[0] is not None)
                for m in self.messages
            ),
        }
        return [p for p in CHAT_PARTS if found[p]]

    def without_reasoning(self) -> Conversation:
        """The conversation with every assistant's thinking removed: `reasoning_content` and an inline
        `<think>...</think>` before the reply (config.data.train_reasoning=False)."""
        messages = tuple(
            dataclasses.replace(m, reasoning=None, content=split_think(m.content)[1])
            if m.role == "assistant"
            else m
            for m in self.messages
        )
        return dataclasses.replace(self, messages=messages)

    def split_last_turn(self) -> tuple[Conversation, str]:
        """(everything before the last assistant turn, that turn's content): prompt and reference."""
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i].role == "assistant":
                return dataclasses.replace(self, messages=self.messages[:i]), self.messages[i].content
        raise BadRecord("no assistant turn", code="no_assistant_turn")


def split_think(content: str) -> tuple[str | None, str]:
    """(inline reasoning, reply) of an assistant's content, split as Qwen3's template splits it: the
    text before `</think>` (after `<think>`) is the reasoning; without `</think>`, (None, content)."""
    if "</think>" not in content:
        return None, content
    head, _, reply = content.rpartition("</think>")
    return head.split("<think>")[-1].strip("\n"), reply.lstrip("\n")


def tool_call_parts(call: Mapping[str, Any]) -> tuple[str, dict]:
    """(function name, arguments object) of a tool call that `_tool_calls` accepted."""
    function = call.get("function") if isinstance(call.get("function"), Mapping) else call
    arguments = function["arguments"]
    return function["name"], json.loads(arguments) if isinstance(arguments, str) else dict(arguments)


def _tool_calls(i: int, value: Any) -> tuple[Mapping[str, Any], ...]:
    """Message `i`'s tool calls as written, each checked to name a function and to carry arguments
    that are a JSON object (or a string holding one)."""
    if not isinstance(value, list | tuple):
        got = type(value).__name__
        raise BadRecord(f"message {i} tool_calls must be a list of calls, got {got}", code="bad_tool_call")
    for j, call in enumerate(value):
        where = f"message {i} tool call {j}"
        if not isinstance(call, Mapping):
            raise BadRecord(f"{where} is a {type(call).__name__}, not an object", code="bad_tool_call")
        function = call.get("function", call)
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not name.strip():
            raise BadRecord(
                f"{where} has no function name (expected {{'function': {{'name': ..., 'arguments': ...}}}})",
                code="bad_tool_call",
            )
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise BadRecord(f"{where} ({name}): arguments are not JSON ({e})", "bad_tool_call") from e
        if not isinstance(arguments, Mapping):
            got = "none" if arguments is None else JSON_TYPES.get(type(arguments), type(arguments).__name__)
            raise BadRecord(
                f"{where} ({name}): arguments must be a JSON object (or a string holding one), got {got}",
                code="bad_tool_call",
            )
    return tuple(value)


def _tools(record: Mapping[str, Any], fields: Mapping[str, str], default: tuple) -> tuple:
    """The record's tool schemas (a list, or a JSON string of one), else `default` (its source's)."""
    key = fields.get("tools", "tools")
    value = record.get(key)
    if value is None:
        return default
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as e:
            raise BadRecord(f"field {key!r} is a string but not JSON ({e})", code="bad_tools") from e
    return check_tools(value, f"field {key!r}")


def check_tools(value: Any, where: str) -> tuple:
    """`value` as a tuple of tool schemas, each an object naming its function; BadRecord otherwise."""
    if not isinstance(value, list | tuple):
        got = JSON_TYPES.get(type(value), type(value).__name__)
        raise BadRecord(f"{where} must be a list of tool schemas, got a JSON {got}", code="bad_tools")
    for j, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise BadRecord(
                f"{where}: tool {j} is not a function schema ({{'type': 'function', 'function': "
                "{'name': ..., 'parameters': ...}})",
                code="bad_tools",
            )
    return tuple(value)


def detect_format(columns: list[str], fields: Mapping[str, str]) -> str:
    """The first format whose (possibly renamed) fields are all present."""
    for fmt, names in FORMAT_FIELDS.items():
        if all(fields.get(n, n) in columns for n in names):
            return fmt
    wanted = " or ".join("{" + ", ".join(n) + "}" for n in FORMAT_FIELDS.values())
    raise BadRecord(
        f"cannot tell the record format from the fields {sorted(columns)}; expected {wanted}",
        code="unknown_format",
    )


def _string(
    record: Mapping[str, Any],
    name: str,
    fields: Mapping[str, str],
    required: bool = True,
    allow_empty: bool = False,
) -> str:
    key = fields.get(name, name)
    if key not in record or record[key] is None:
        if required:
            raise BadRecord(f"missing field {key!r}", code="missing_field")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} must be a string, got {type(value).__name__}", code="wrong_type")
    if not allow_empty and not value.strip():
        raise BadRecord(f"field {key!r} is empty", code="empty_field")
    return value


def _chat(record: Mapping[str, Any], fmt: str, fields: Mapping[str, str], tools: tuple = ()) -> Conversation:
    """A chat or ShareGPT record's turns and tools; ShareGPT's optional top-level `system` opens them."""
    key = fields.get(FORMAT_FIELDS[fmt][0], FORMAT_FIELDS[fmt][0])
    raw = record.get(key)
    if raw is None:
        raise BadRecord(f"missing field {key!r}", code="missing_field")
    if not isinstance(raw, list | tuple):
        got = type(raw).__name__
        raise BadRecord(f"field {key!r} must be a list of messages, got {got}", code="wrong_type")
    if not raw:
        raise BadRecord(f"field {key!r} is an empty list of messages", code="empty_field")
    messages = [_message(i, m, fields) for i, m in enumerate(raw)]
    # Many ShareGPT exports write "system": "" on every row: an empty system prompt is no prompt.
    system = _string(record, "system", fields, required=False, allow_empty=True) if fmt == "sharegpt" else ""
    if system.strip() and messages[0].role != "system":
        messages.insert(0, Message("system", system))
    _check_turn_order(messages)
    return Conversation(tuple(messages), tools=_tools(record, fields, tools))


def _optional_string(i: int, m: Mapping[str, Any], key: str) -> str | None:
    value = m.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRecord(f"message {i} {key} must be a string, got {type(value).__name__}", code="wrong_type")
    return value


def _message(i: int, m: Any, fields: Mapping[str, str]) -> Message:
    """Message `i` of a list of turns, written `role`/`content` or ShareGPT's `from`/`value`, with an
    assistant's tool calls and reasoning and a tool result's name and call id."""
    if not isinstance(m, Mapping):
        raise BadRecord(f"message {i} is a {type(m).__name__}, not an object", code="wrong_type")
    role_key, content_key = fields.get("role", "role"), fields.get("content", "content")
    if m.get(role_key) is None and m.get("from") is not None:  # ShareGPT (a table fills absent keys
        role_key, content_key = "from", "value"  # with None, so test values, not keys)
    role, content = m.get(role_key), m.get(content_key)
    role = SHAREGPT_ROLES.get(role, role)
    if role not in ROLES:
        raise BadRecord(
            f"message {i} has role {role!r}; expected one of {', '.join(ROLES)} (or ShareGPT's "
            f"{', '.join(SHAREGPT_ROLES)})",
            code="bad_role",
        )
    calls = m.get(fields.get("tool_calls", "tool_calls"))
    calls = _tool_calls(i, calls) if calls is not None else ()
    if calls and role != "assistant":
        raise BadRecord(f"message {i} ({role}) has tool_calls; only assistants call tools", "bad_tool_call")
    if content is None and calls:  # OpenAI writes "content": null beside tool calls
        content = ""
    if not isinstance(content, str):
        got = type(content).__name__
        raise BadRecord(f"message {i} ({role}) content must be a string, got {got}", code="wrong_type")
    # The names transformers reads a message's reasoning under, the standard one first.
    key = fields.get("reasoning_content", "reasoning_content")
    reasoning = next((m[k] for k in (key, "reasoning", "thinking") if m.get(k) is not None), None)
    if reasoning is not None and (role != "assistant" or not isinstance(reasoning, str)):
        what = "a string" if role == "assistant" else "on an assistant message"
        raise BadRecord(f"message {i} ({role}) reasoning_content must be {what}", code="wrong_type")
    name, call_id = _optional_string(i, m, "name"), _optional_string(i, m, "tool_call_id")
    return Message(role, content, reasoning, calls, name, call_id)


def _check_turn_order(messages: list[Message]) -> None:
    """Optional system first, then turns from the user, each followed by what NEXT_ROLES allows (user
    and assistant alternate; tool results follow an assistant turn), and at least one reply."""
    body = messages[1:] if messages[0].role == "system" else messages
    if not body or body[0].role != "user":
        raise BadRecord("role order: the first non-system message must come from the user", code="role_order")
    for i, m in enumerate(body):
        index = i + len(messages) - len(body)
        expected = NEXT_ROLES[body[i - 1].role] if i else ("user",)
        if m.role not in expected:
            raise BadRecord(
                f"role order: message {index} is {m.role!r}, expected "
                f"{' or '.join(map(repr, expected))} (turns must alternate; system only first)",
                code="role_order",
            )
        if m.role == "assistant" and not m.content.strip() and not m.tool_calls:
            raise BadRecord(f"message {index}: empty assistant reply", code="empty_response")
    if not any(m.role == "assistant" for m in body):
        raise BadRecord("no assistant turn, so there is nothing to train", code="no_assistant_turn")


def to_conversation(
    record: Mapping[str, Any], fmt: str, fields: Mapping[str, str], tools: tuple = ()
) -> Conversation:
    """Parse one record (a mapping of its fields) in the given format; `tools` are its source's tool
    schemas, for a record without its own `tools`."""
    if not isinstance(record, Mapping):  # sources.py finds these first in JSON files
        raise not_an_object(record)
    if fmt == "prompt_response":
        system = _string(record, "system", fields, required=False)
        turns = [
            Message("user", _string(record, "prompt", fields, allow_empty=True)),
            Message("assistant", _string(record, "response", fields)),
        ]
        messages = tuple([Message("system", system)] if system else []) + tuple(turns)
        return Conversation(messages, tools=_tools(record, fields, tools))
    if fmt == "alpaca":
        instruction = _string(record, "instruction", fields)
        extra = _string(record, "input", fields, required=False, allow_empty=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Conversation(
            (Message("user", prompt), Message("assistant", _string(record, "output", fields))),
            tools=_tools(record, fields, tools),
        )
    if fmt in CHAT_FORMATS:
        return _chat(record, fmt, fields, tools)
    if fmt == "text":
        return Conversation((Message("assistant", _string(record, "text", fields)),), is_text=True)
    raise BadRecord(f"unknown format {fmt!r}; expected one of {FORMATS}", code="unknown_format")


def _id_list(
    record: Mapping[str, Any], name: str, fields: Mapping[str, str], required: bool = True
) -> list[int]:
    key = fields.get(name, name)
    value = record.get(key)
    if value is None:
        if required:
            raise BadRecord(f"missing field {key!r}", code="missing_field")
        return []
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise BadRecord(f"field {key!r} must be a list of integer token ids", code="wrong_type")
    return [int(v) for v in value]


def token_ids(
    record: Mapping[str, Any], fmt: str, fields: Mapping[str, str], vocab_size: int | None = None
) -> tuple[list[int], list[bool]]:
    """(ids, trained mask) of a pre-tokenized record; ids outside [0, vocab_size) are bad records."""
    if not isinstance(record, Mapping):
        raise not_an_object(record)
    if fmt == "token_ids":
        prompt, completion = (
            _id_list(record, "prompt_ids", fields),
            _id_list(record, "completion_ids", fields),
        )
        if not completion:
            raise BadRecord("field 'completion_ids' is empty: nothing to train", code="empty_response")
        ids, mask = prompt + completion, [False] * len(prompt) + [True] * len(completion)
    elif fmt == "input_ids":
        ids, labels = (
            _id_list(record, "input_ids", fields),
            _id_list(record, "labels", fields, required=False),
        )
        if not ids:
            raise BadRecord("field 'input_ids' is empty", code="empty_field")
        labels = labels or ids
        if len(labels) != len(ids):
            raise BadRecord(f"{len(labels)} labels for {len(ids)} input ids", code="bad_labels")
        wrong = [i for i, (x, y) in enumerate(zip(ids, labels, strict=True)) if y not in (x, IGNORE_LABEL)]
        if wrong:
            raise BadRecord(
                f"labels[{wrong[0]}]={labels[wrong[0]]} is neither input_ids[{wrong[0]}]={ids[wrong[0]]} nor "
                f"{IGNORE_LABEL} (labels are unshifted, as in Hugging Face)",
                code="bad_labels",
            )
        mask = [y != IGNORE_LABEL for y in labels]
    else:
        raise BadRecord(f"format {fmt!r} is not pre-tokenized ({TOKEN_FORMATS})", code="unknown_format")
    out_of_range = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if out_of_range:
        limit = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise BadRecord(
            f"token id {out_of_range[0]} is outside the tokenizer's range {limit}", code="bad_token_id"
        )
    return ids, mask


def record_weight(record: Mapping[str, Any], fields: Mapping[str, str]) -> float:
    """The record's `weight` field (renameable), 1.0 when absent; BadRecord unless finite and >= 0."""
    key = fields.get("weight", "weight")
    value = record.get(key) if isinstance(record, Mapping) else None
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise BadRecord(f"field {key!r} must be a finite number >= 0, got {value!r}", code="bad_weight")
    return float(value)


def _reward_value(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRecord(f"{where} must be a number in [0, 1], got {value!r}", code="bad_reward")
    if not 0.0 <= value <= 1.0:
        raise BadRecord(
            f"{where}={value!r} is outside [0, 1] (Q-SFT's targets are probabilities)", code="bad_reward"
        )
    return float(value)


def record_rewards(record: Mapping[str, Any], fmt: str, fields: Mapping[str, str]) -> list[float]:
    """Q-SFT: the reward of each assistant turn, in order. Chat records put `reward` on assistant
    messages (a turn without one gets 0; a record-level `reward` is the last turn's); other formats
    have one record-level `reward`. A record with no reward at all is a bad record."""
    key = fields.get("reward", "reward")
    top = record.get(key) if isinstance(record, Mapping) else None
    if fmt not in CHAT_FORMATS:
        if top is None:
            raise BadRecord(f"missing field {key!r} (Q-SFT needs a reward per record)", code="missing_reward")
        return [_reward_value(top, f"field {key!r}")]
    conv = _chat(record, fmt, fields)
    raw = list(record[fields.get(FORMAT_FIELDS[fmt][0], FORMAT_FIELDS[fmt][0])])
    if len(conv.messages) > len(raw):  # ShareGPT's top-level system message opens the turns
        raw.insert(0, {})
    rewards, found = [], top is not None
    for i, (m, msg) in enumerate(zip(raw, conv.messages, strict=True)):
        if key in m:
            if msg.role != "assistant":
                raise BadRecord(
                    f"message {i} ({msg.role}) has a reward; rewards go on assistant turns", code="bad_reward"
                )
            found = True
        if msg.role == "assistant":
            rewards.append(_reward_value(m[key], f"message {i} {key!r}") if key in m else 0.0)
    if not found:
        raise BadRecord(
            f"no {key!r} on any assistant message or on the record (Q-SFT)", code="missing_reward"
        )
    if top is not None:
        rewards[-1] = _reward_value(top, f"field {key!r}")
    return rewards


def check_record(record: Mapping[str, Any], fmt: str, fields: Mapping[str, str]) -> None:
    """Raise BadRecord if `record` cannot be read in `fmt` (text or pre-tokenized)."""
    if fmt in TOKEN_FORMATS:
        token_ids(record, fmt, fields)
    else:
        to_conversation(record, fmt, fields)
    record_weight(record, fields)
