import re

import pytest

from jsft.data.formats import BadRecord, Conversation, Message, detect_format, to_conversation


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
