"""Hugging Face chat templates with tools, tool calls and thinking: jsft's ids and loss mask equal
transformers' `apply_chat_template(..., tools=..., return_assistant_tokens_mask=True)` on templates
with `{% generation %}` markers, and a template without them trains what its marked twin trains.

The two templates are written here in the style of Qwen3's (tools in the system turn, `<tool_call>`
JSON, tool results as `<tool_response>` in a user turn, `<think>` blocks, earlier turns' thinking
dropped) and Llama 3.1's (tools in the first user turn, a JSON call, results as `ipython` turns)."""

import json
import re

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from jsft.data.formats import BadRecord, Conversation, to_conversation
from jsft.data.templates import JinjaTemplate, build_template, prompt_ids, render
from jsft.data.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

QWEN3_STYLE = """
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nFunctions you may call, inside <tools></tools>:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nCall one as <tool_call>\\n{"name": <name>, "arguments": <object>}\\n</tool_call>' }}
{{- '<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query=messages|length - 1, found=false) %}
{%- for message in messages[::-1] %}
{%- if not ns.found and message.role == 'user' %}
{%- set ns.found = true %}{%- set ns.last_query = messages|length - 1 - loop.index0 %}
{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- set content = message.content if message.content is string else '' %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}
{%- if not reasoning and '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{{- '<|im_start|>assistant\\n' }}
{%- generation %}
{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}
{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' }}
{%- endif %}
{{- content.lstrip('\\n') }}
{%- for call in message.tool_calls or [] %}
{%- set fn = call.function if call.function is defined else call %}
{%- if content or not loop.first %}{{- '\\n' }}{%- endif %}
{{- '<tool_call>\\n{"name": "' + fn.name + '", "arguments": ' }}
{%- if fn.arguments is string %}{{- fn.arguments }}{%- else %}{{- fn.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>' }}
{%- endgeneration %}
{{- '\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

LLAMA31_STYLE = """
{{- bos_token }}
{%- if messages[0].role == 'system' %}
{%- set system = messages[0].content | trim %}{%- set messages = messages[1:] %}
{%- else %}{%- set system = '' %}{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{%- if tools %}{{- 'Environment: ipython\\n' }}{%- endif %}
{{- 'Knowledge cutoff: 2023\\n\\n' + system + '<|eot_id|>' }}
{%- if tools %}
{%- set first = messages[0].content | trim %}{%- set messages = messages[1:] %}
{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}
{{- 'Answer with a JSON function call {"name": function name, "parameters": arguments} using:\\n\\n' }}
{%- for tool in tools %}{{- tool | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}
{{- first + '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- generation %}
{%- if message.tool_calls %}
{%- if message.tool_calls | length != 1 %}{{- raise_exception('one tool call per turn') }}{%- endif %}
{%- set fn = message.tool_calls[0].function %}
{{- '{"name": "' + fn.name + '", "parameters": ' + (fn.arguments | tojson) + '}' }}
{%- else %}
{{- message.content | trim }}
{%- endif %}
{{- '<|eot_id|>' }}
{%- endgeneration %}
{%- elif message.role in ['tool', 'ipython'] %}
{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
{%- else %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}
{{- message.content | trim + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


def _call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# Records as a user writes them (OpenAI style): each is rendered by jsft and by transformers.
RECORDS = {
    "tools_thinking_and_a_later_query": {
        "tools": [WEATHER, TIME],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "I should call get_weather.",
                "tool_calls": [_call("get_weather", {"city": "Paris"})],
            },
            {"role": "tool", "name": "get_weather", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "21 degrees.", "reasoning_content": "The tool said 21."},
            {"role": "user", "content": "And the time?"},
            {"role": "assistant", "content": None, "tool_calls": [_call("get_time", "{}")]},
            {"role": "tool", "content": "12:00"},
            {"role": "assistant", "content": "<think>\nIt is noon.\n</think>\n\nNoon."},
        ],
    },
    "two_calls_in_one_turn_string_arguments": {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Paris and Rome?"},
            {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    _call("get_weather", '{"city": "Paris"}'),
                    _call("get_weather", '{"city": "Rome"}'),
                ],
            },
            {"role": "tool", "content": "21"},
            {"role": "tool", "content": "25"},
            {"role": "assistant", "content": "Paris 21, Rome 25.", "reasoning_content": "Both known."},
        ],
    },
    "plain_multi_turn": {
        "messages": [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3 + 3?"},
            {"role": "assistant", "content": "It is 6.", "reasoning_content": "3 + 3 = 6"},
        ]
    },
}
# Llama 3.1's template takes one call per turn and no thinking: the records it can render.
LLAMA_RECORDS = {
    "tools": {
        "tools": [WEATHER],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Paris"})]},
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "21 degrees."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": " You're welcome. "},
        ],
    },
    "plain_multi_turn": {
        "messages": [*RECORDS["plain_multi_turn"]["messages"][:3], {"role": "assistant", "content": " 6 "}]
    },
}
ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>"]
SPECIAL += ["<|end_header_id|>", "<|eot_id|>"]


def _texts():
    out = []
    for record in [*RECORDS.values(), *LLAMA_RECORDS.values()]:
        out += [json.dumps(t) for t in record.get("tools", [])]
        for m in record["messages"]:
            out += [m.get("content") or "", m.get("reasoning_content") or "", json.dumps(m.get("tool_calls"))]
    return out * 5


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """One tiny byte-level BPE (Qwen3's and Llama 3's markers special, and like Qwen3's tokenizer
    `<think>`, `<tool_call>` and `<tool_response>` added but not special) in two directories: one
    per template, each with its tokenizer_config.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_texts(), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    dirs = {}
    for name, template, bos, eos in (
        ("qwen3", QWEN3_STYLE, None, "<|im_end|>"),
        ("llama31", LLAMA31_STYLE, "<|begin_of_text|>", "<|eot_id|>"),
    ):
        d = tmp_path_factory.mktemp(name)
        tok.save(str(d / "tokenizer.json"))
        config = {"bos_token": bos, "eos_token": eos, "pad_token": "<|endoftext|>", "chat_template": template}
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        dirs[name] = d
    return dirs


def _theirs(directory, record, chat_template=None):
    """transformers' (input_ids, assistant_masks) for a record."""
    tok = transformers.AutoTokenizer.from_pretrained(str(directory))
    out = tok.apply_chat_template(
        record["messages"],
        tools=record.get("tools"),
        chat_template=chat_template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]


def _ours(directory, record, **render_kw):
    tok = load_tokenizer(str(directory))
    template = build_template("hf", tokenizer=tok)
    return render(template, tok, to_conversation(record, "chat", {}), **render_kw), tok, template


def _trained_text(tok, ids, mask):
    runs, run = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            run.append(i)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs + ([tok.decode(run)] if run else [])


@pytest.mark.parametrize("case", sorted(RECORDS))
def test_qwen3_style_ids_and_mask_equal_transformers(tokenizer_dirs, case):
    record = RECORDS[case]
    (ids, mask), _, template = _ours(tokenizer_dirs["qwen3"], record)
    assert template.has_markers
    assert (ids, mask) == _theirs(tokenizer_dirs["qwen3"], record)


@pytest.mark.parametrize("case", sorted(LLAMA_RECORDS))
def test_llama31_style_ids_and_mask_equal_transformers(tokenizer_dirs, case):
    record = LLAMA_RECORDS[case]
    (ids, mask), _, _ = _ours(tokenizer_dirs["llama31"], record)
    assert (ids, mask) == _theirs(tokenizer_dirs["llama31"], record)


def test_what_the_qwen3_style_template_trains(tokenizer_dirs):
    record = RECORDS["tools_thinking_and_a_later_query"]
    (ids, mask), tok, _ = _ours(tokenizer_dirs["qwen3"], record)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert _trained_text(tok, ids, mask) == [
        call,  # before the last user query: its thinking is dropped, as the template renders it
        "21 degrees.<|im_end|>",
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>',  # no thinking: none
        "<think>\nIt is noon.\n</think>\n\nNoon.<|im_end|>",
    ]
    text = tok.decode(ids)
    assert "<tools>\n" + json.dumps(WEATHER) in text and "I should call get_weather" not in text
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>' in text  # untrained


def test_train_reasoning_false_drops_the_thinking_as_transformers_renders_a_record_without_it(tokenizer_dirs):
    record = RECORDS["tools_thinking_and_a_later_query"]
    (ids, mask), tok, _ = _ours(tokenizer_dirs["qwen3"], record, train_reasoning=False)
    stripped = json.loads(json.dumps(record))
    for m in stripped["messages"]:
        m.pop("reasoning_content", None)
    stripped["messages"][-1]["content"] = "Noon."
    assert (ids, mask) == _theirs(tokenizer_dirs["qwen3"], stripped)
    assert _trained_text(tok, ids, mask)[-1] == "<think>\n\n</think>\n\nNoon.<|im_end|>"
    assert "It is noon" not in tok.decode(ids)


@pytest.mark.parametrize("name,records", [("qwen3", RECORDS), ("llama31", LLAMA_RECORDS)])
def test_without_generation_markers_replies_are_located_as_the_markers_place_them(
    tokenizer_dirs, name, records
):
    # Qwen3's own template has no markers: the same template without them must train the same tokens,
    # though it renders earlier turns differently once a later query follows.
    tok = load_tokenizer(str(tokenizer_dirs[name]))
    marked = build_template("hf", tokenizer=tok)
    unmarked = JinjaTemplate(
        re.sub(r"\{%-? *(end)?generation *-?%\}", "", marked.source),
        marked.bos_token,
        marked.eos_token,
        marked.end_of_turn,
        marked.end_tokens,
    )
    assert not unmarked.has_markers and marked.end_of_turn == unmarked.end_of_turn
    for record in records.values():
        conv = to_conversation(record, "chat", {})
        for train_reasoning in (True, False):
            ours = render(unmarked, tok, conv, train_reasoning=train_reasoning)
            assert ours == render(marked, tok, conv, train_reasoning=train_reasoning)
        assert render(unmarked, tok, conv, "last_assistant") == render(marked, tok, conv, "last_assistant")


def test_the_generation_prompt_ends_where_the_reply_starts(tokenizer_dirs):
    tok = load_tokenizer(str(tokenizer_dirs["qwen3"]))
    template = build_template("hf", tokenizer=tok)
    record = RECORDS["tools_thinking_and_a_later_query"]
    conv = to_conversation(record, "chat", {})
    context, _ = conv.split_last_turn()
    theirs = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dirs["qwen3"])).apply_chat_template(
        record["messages"][:-1],
        tools=record["tools"],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    assert prompt_ids(template, tok, context) == list(theirs["input_ids"])


def test_a_template_that_refuses_a_record_makes_it_a_bad_record(tokenizer_dirs):
    record = RECORDS["two_calls_in_one_turn_string_arguments"]  # two calls: Llama 3.1's template refuses
    with pytest.raises(BadRecord, match="chat template refused the conversation: one tool call per turn"):
        _ours(tokenizer_dirs["llama31"], record)
    tok = load_tokenizer(str(tokenizer_dirs["qwen3"]))
    broken = JinjaTemplate("{{ messages[0].content.nope() }}")
    with pytest.raises(BadRecord, match="the chat template failed on this record"):
        render(broken, tok, Conversation(to_conversation(record, "chat", {}).messages))


@pytest.mark.parametrize("layout", ["tokenizer_config", "jinja_files"])
def test_a_named_tool_use_template_renders_the_records_with_tools(tokenizer_dirs, tmp_path, layout):
    # As transformers: a tokenizer with named templates renders "tool_use" when tools are passed.
    default = "{{- 'Default. ' }}" + QWEN3_STYLE
    (tmp_path / "tokenizer.json").write_text((tokenizer_dirs["qwen3"] / "tokenizer.json").read_text())
    config = json.loads((tokenizer_dirs["qwen3"] / "tokenizer_config.json").read_text())
    if layout == "tokenizer_config":
        config["chat_template"] = [
            {"name": "default", "template": default},
            {"name": "tool_use", "template": QWEN3_STYLE},
        ]
    else:
        del config["chat_template"]
        (tmp_path / "chat_template.jinja").write_text(default)
        (tmp_path / "additional_chat_templates").mkdir()
        (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text(QWEN3_STYLE)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    record = RECORDS["two_calls_in_one_turn_string_arguments"]
    (ids, mask), tok, template = _ours(tmp_path, record)
    assert (ids, mask) == _theirs(tmp_path, record) and "Default." not in tok.decode(ids)
    without_tools = {"messages": record["messages"], "tools": []}
    (ids, mask), tok, _ = _ours(tmp_path, without_tools)
    assert (ids, mask) == _theirs(tmp_path, {"messages": record["messages"]})
    assert tok.decode(ids).startswith("Default. ")
    assert template.tool_use_source == QWEN3_STYLE and "tool_use_sha256=" in repr(template)
