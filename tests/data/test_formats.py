import json
import re

import pytest

from jsft.data.formats import (
    BadRecord,
    Conversation,
    Message,
    detect_format,
    split_think,
    to_conversation,
    tool_call_parts,
)


def test_every_format_becomes_a_conversation():
    assert to_conversation({"prompt": "p", "response": "r"}, "prompt_response", {}) == Conversation(
        (Message("user", "p"), Message("assistant", "r"))
    )
    alpaca = to_conversation({"instruction": "do", "input": "this", "output": "done"}, "alpaca", {})
    assert alpaca.messages == (Message("user", "do\n\nthis"), Message("assistant", "done"))
    assert to_conversation({"instruction": "do", "output": "x"}, "alpaca", {}).messages[0].content == "do"
    chat = to_conversation(
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"},
            ]
        },
        "chat",
        {},
    )
    assert [m.role for m in chat.messages] == ["system", "user", "assistant"]
    text = to_conversation({"text": "hello"}, "text", {})
    assert text.is_text and text.messages[0].content == "hello"


def test_renamed_fields_and_sharegpt_messages():
    rec = {"question": "q", "answer": "a"}
    conv = to_conversation(rec, "prompt_response", {"prompt": "question", "response": "answer"})
    assert conv.messages[1].content == "a"
    assert (
        detect_format(["question", "answer"], {"prompt": "question", "response": "answer"})
        == "prompt_response"
    )
    share = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    conv = to_conversation(share, "chat", {"messages": "conversations"})
    assert conv.messages == (Message("user", "hi"), Message("assistant", "yo"))


def test_raw_sharegpt_is_detected_and_read_with_its_own_role_names():
    record = {
        "id": "identity_0",
        "system": "Be brief.",
        "conversations": [
            {"from": "human", "value": "What is 6 x 7?"},
            {"from": "function_call", "value": '{"name": "mul", "arguments": {"a": 6, "b": 7}}'},
            {"from": "observation", "value": "42"},
            {"from": "gpt", "value": "42."},
            {"from": "user", "value": "Thanks"},
            {"from": "model", "value": "You're welcome."},
        ],
    }
    assert detect_format(list(record), {}) == "sharegpt"
    conv = to_conversation(record, "sharegpt", {})
    assert [m.role for m in conv.messages] == [
        "system", "user", "assistant", "tool", "assistant", "user", "assistant"
    ]  # fmt: skip
    assert conv.messages[0].content == "Be brief." and conv.messages[3].content == "42"
    # A system turn in the list wins over the top-level field; role/content messages read too.
    record["conversations"].insert(0, {"from": "system", "value": "Inline."})
    assert [m.content for m in to_conversation(record, "sharegpt", {}).messages[:2]] == [
        "Inline.",
        "What is 6 x 7?",
    ]
    plain = {"conversations": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    assert to_conversation(plain, "sharegpt", {}).messages == (
        Message("user", "u"),
        Message("assistant", "a"),
    )
    # Exports that write "system": "" (or null) on every row: no system turn, not a bad record.
    for empty in ("", "  ", None):
        assert to_conversation(dict(plain, system=empty), "sharegpt", {}).messages == (
            Message("user", "u"),
            Message("assistant", "a"),
        )


@pytest.mark.parametrize(
    "turns,reason",
    [
        ([("human", "u"), ("wizard", "a")], "message 1 has role 'wizard'; expected one of system, user, "),
        ([("gpt", "a"), ("human", "u")], "role order: the first non-system message must come from the user"),
        ([("human", "u"), ("observation", "o")], "message 1 is 'tool', expected 'assistant'"),
        ([("human", "u"), ("gpt", "a"), ("gpt", "b")], "message 2 is 'assistant', expected 'user' or 'tool'"),
    ],
)
def test_bad_sharegpt_records_say_why(turns, reason):
    record = {"conversations": [{"from": r, "value": v} for r, v in turns]}
    with pytest.raises(BadRecord, match=re.escape(reason)):
        to_conversation(record, "sharegpt", {})


def test_format_detection():
    assert detect_format(["messages", "id"], {}) == "chat"
    assert detect_format(["conversations", "id"], {}) == "sharegpt"
    assert detect_format(["instruction", "input", "output"], {}) == "alpaca"
    assert detect_format(["text"], {}) == "text"
    with pytest.raises(BadRecord, match="cannot tell the record format"):
        detect_format(["foo"], {})


@pytest.mark.parametrize(
    "record,fmt,reason",
    [
        ({"prompt": "p"}, "prompt_response", "missing field 'response'"),
        ({"prompt": "p", "response": 3}, "prompt_response", "field 'response' must be a string, got int"),
        ({"prompt": "p", "response": " "}, "prompt_response", "field 'response' is empty"),
        ({"instruction": "", "output": "o"}, "alpaca", "field 'instruction' is empty"),
        ({"messages": []}, "chat", "empty list of messages"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "chat", "role order: the first non-system"),
        (
            {"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "u"}]},
            "chat",
            "role order: message 1 is 'user', expected 'assistant'",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"},
                    {"role": "system", "content": "s"},
                ]
            },
            "chat",
            "role order: message 2 is 'system'",
        ),
        ({"messages": [{"role": "user", "content": "u"}]}, "chat", "no assistant turn"),
        (
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": ""}]},
            "chat",
            "empty assistant reply",
        ),
        ({"messages": [{"role": "wizard", "content": "u"}]}, "chat", "role 'wizard'"),
        ({"messages": [{"role": "user", "content": ["u"]}]}, "chat", "content must be a string"),
        ({"text": ""}, "text", "field 'text' is empty"),
        (["not", "an", "object"], "prompt_response", "not a JSON object (a JSON array)"),
    ],
)
def test_bad_records_say_why(record, fmt, reason):
    with pytest.raises(BadRecord, match=re.escape(reason)):
        to_conversation(record, fmt, {})


def test_split_last_turn_gives_prompt_context_and_reference():
    conv = to_conversation(
        {
            "messages": [
                {"role": "user", "content": "1"},
                {"role": "assistant", "content": "2"},
                {"role": "user", "content": "3"},
                {"role": "assistant", "content": "4"},
            ]
        },
        "chat",
        {},
    )
    context, ref = conv.split_last_turn()
    assert ref == "4" and [m.content for m in context.messages] == ["1", "2", "3"]


CALL = {"id": "c0", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def _tool_record(**assistant):
    return {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL], **assistant},
            {"role": "tool", "name": "get_weather", "tool_call_id": "c0", "content": "21"},
            {"role": "assistant", "content": "<think>\nwarm\n</think>\n\n21 degrees."},
        ]
    }


def test_tool_calls_reasoning_and_tools_are_read_as_openai_writes_them():
    conv = to_conversation(_tool_record(reasoning_content="Call it."), "chat", {})
    call, tool, reply = conv.messages[1:]
    assert (call.content, call.reasoning, call.tool_calls) == ("", "Call it.", (CALL,))
    assert (tool.role, tool.name, tool.tool_call_id, tool.content) == ("tool", "get_weather", "c0", "21")
    assert reply.reasoning is None  # inline thinking stays content (HF templates split it themselves)
    assert conv.tools == () and conv.parts() == ["tool_calls", "tool_results", "reasoning"]
    # Tools: the record's (a list, or a JSON string of one) win over the source's; [] means none.
    source_tools = (WEATHER,)
    assert to_conversation(_tool_record(), "chat", {}, source_tools).tools == source_tools
    for tools in ([WEATHER], json.dumps([WEATHER])):
        assert to_conversation(dict(_tool_record(), tools=tools), "chat", {}).tools == (WEATHER,)
    assert to_conversation(dict(_tool_record(), tools=[]), "chat", {}, source_tools).tools == ()
    # Bare calls ({"name", "arguments"}) with JSON-string arguments, and the older reasoning names.
    bare = {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    conv = to_conversation(_tool_record(tool_calls=[bare], thinking="Rome."), "chat", {})
    assert conv.messages[1].tool_calls == (bare,) and conv.messages[1].reasoning == "Rome."
    assert tool_call_parts(bare) == ("get_weather", {"city": "Rome"})


def test_without_reasoning_removes_reasoning_content_and_inline_thinking():
    conv = to_conversation(_tool_record(reasoning_content="Call it."), "chat", {}).without_reasoning()
    assert [m.reasoning for m in conv.messages] == [None] * 4
    assert conv.messages[3].content == "21 degrees." and conv.messages[1].tool_calls == (CALL,)
    assert split_think("no thinking") == (None, "no thinking")
    assert split_think("<think>\na\n</think>\n\nb") == ("a", "b")


@pytest.mark.parametrize(
    "change,code,reason",
    [
        ({"tool_calls": CALL}, "bad_tool_call", "message 1 tool_calls must be a list of calls, got dict"),
        ({"tool_calls": ["get_weather"]}, "bad_tool_call", "message 1 tool call 0 is a str, not an object"),
        (
            {"tool_calls": [{"type": "function", "function": {"arguments": {}}}]},
            "bad_tool_call",
            "message 1 tool call 0 has no function name",
        ),
        (
            {"tool_calls": [{"function": {"name": "f", "arguments": "{city: Paris}"}}]},
            "bad_tool_call",
            "message 1 tool call 0 (f): arguments are not JSON (Expecting property name",
        ),
        (
            {"tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}]},
            "bad_tool_call",
            "message 1 tool call 0 (f): arguments must be a JSON object (or a string holding one), got array",
        ),
        (
            {"tool_calls": [{"function": {"name": "f"}}]},
            "bad_tool_call",
            "message 1 tool call 0 (f): arguments must be a JSON object (or a string holding one), got none",
        ),
        (
            {"reasoning_content": ["x"]},
            "wrong_type",
            "message 1 (assistant) reasoning_content must be a string",
        ),
        (
            {"tool_calls": None, "content": None},
            "wrong_type",
            "message 1 (assistant) content must be a string",
        ),
        ({"tool_calls": [], "content": ""}, "empty_response", "message 1: empty assistant reply"),
        ({"role": "ipython"}, "bad_role", "message 1 has role 'ipython'; expected one of system, user,"),
    ],
)
def test_malformed_tool_calls_and_unknown_roles_are_bad_records(change, code, reason):
    record = _tool_record()
    record["messages"][1].update(change)
    with pytest.raises(BadRecord, match=re.escape(reason)) as e:
        to_conversation(record, "chat", {})
    assert e.value.code == code


@pytest.mark.parametrize(
    "tools,reason",
    [
        ({"type": "function"}, "field 'tools' must be a list of tool schemas, got a JSON object"),
        ("[{]", "field 'tools' is a string but not JSON (Expecting property name"),
        (
            [{"type": "function", "function": {"parameters": {}}}],
            "field 'tools': tool 0 is not a function schema",
        ),
    ],
)
def test_tools_that_are_not_a_list_of_schemas_are_bad_records(tools, reason):
    with pytest.raises(BadRecord, match=re.escape(reason)) as e:
        to_conversation(dict(_tool_record(), tools=tools), "chat", {})
    assert e.value.code == "bad_tools"
    record = _tool_record()
    record["messages"][0]["tool_calls"] = [CALL]
    with pytest.raises(
        BadRecord, match=re.escape("message 0 (user) has tool_calls; only assistants call tools")
    ):
        to_conversation(record, "chat", {})
