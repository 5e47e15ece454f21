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


def test_format_detection():
    assert detect_format(["messages", "id"], {}) == "chat"
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
