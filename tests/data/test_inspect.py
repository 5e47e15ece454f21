import json
import re

import pytest

from configs import demo
from jsft.data.inspect import run_inspect

WORDS = ["ab", "cde", "fgh", "bad", "cafe", "head", "deaf", "face", "gab", "bead", "hag", "dab"]


def _write(path, records, bad_line=None):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        if bad_line is not None:
            f.write(bad_line + "\n")
    return str(path)


def _upper(word):
    return {"prompt": f"upper: {' '.join(word)}", "response": " ".join(word.upper())}


@pytest.fixture
def tiny_set(tmp_path):
    """12 distinct records, a repeat of the first (line 13), one over-long (14), one broken line (15)."""
    records = [_upper(w) for w in WORDS]
    records += [records[0], {"prompt": "upper: a b", "response": " ".join("ABCDEFGH" * 5)}]
    train = _write(tmp_path / "train.jsonl", records, bad_line='{"prompt": "upper: a"')
    val = _write(tmp_path / "val.jsonl", [_upper(w) for w in ("hg", "fed", "ace")])
    config = demo.get_config("smoke")
    config.data.sources.demo = demo.source(train, val)
    config.data.update(on_bad_record="skip", seq_len=32, vocab_size=300)
    return config, train, records


def _section(report, title):
    """The report's section for one source, up to the next section."""
    return report.split(f"== {title}")[1].split("\n== ")[0]


@pytest.mark.parametrize("overlong, truncated, dropped", [("truncate", 1, 0), ("drop", 0, 1)])
def test_report_counts_duplicates_bad_records_and_overlong(tiny_set, tmp_path, overlong, truncated, dropped):
    config, train, records = tiny_set
    config.data.overlong = overlong
    workdir = tmp_path / "wd"
    report = run_inspect(config, str(workdir))

    train_section = _section(report, "train 'demo'")
    assert f"records 15 | examples {14 - dropped}" in train_section
    assert "exact duplicates: 1 " in train_section
    assert f"{train}:13 repeats {train}:1" in train_section
    assert re.search(rf"invalid_json: 1\n +{re.escape(train)}:15: invalid JSON", train_section)
    assert f"truncated {truncated} " in train_section and f"dropped {dropped}\n" in train_section
    assert "exact duplicates: 0 " in _section(report, "val 'demo'")
    # The first rendered example: its prompt untrained, its response (and EOS) trained.
    rendered = train_section.split(f"{train}:1 (")[1].split("\n")[1:3]
    assert rendered == [f"    <bos>{records[0]['prompt']}", f"    [[{records[0]['response']}<eos>]]"]

    assert (workdir / "inspect_report.txt").read_text() == report + "\n"
    assert (workdir / "inspect_lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_header_names_the_tokenizers_real_source(tiny_set, tmp_path):
    config, _, _ = tiny_set
    report = run_inspect(config, str(tmp_path / "trained"))
    trained = tmp_path / "trained" / "tokenizer.model"
    assert f"pieces, SentencePiece model {trained}, trained on the training data\n" in report

    from tests.conftest import save_chatml_bpe_tokenizer  # noqa: PLC0415

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    save_chatml_bpe_tokenizer(checkpoint)
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    config.model.hf_path, config.data.template, config.data.seq_len = str(checkpoint), "hf", 128
    report = run_inspect(config, str(tmp_path / "hf"))
    assert (
        f"pieces, the checkpoint's tokenizer.json {checkpoint / 'tokenizer.json'} (config.model.hf_path), "
        "tokenized as transformers' Qwen2Tokenizer\n"
    ) in report


def _tool_chat(city, thinking=True):
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
    return {
        "messages": [
            {"role": "user", "content": f"weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "name": "get_weather", "content": "sunny"},
            {
                "role": "assistant",
                "content": f"sunny in {city}",
                **({"reasoning_content": "it said so"} if thinking else {}),
            },
        ]
    }


def test_tool_calls_and_thinking_are_counted_rendered_and_malformed_ones_listed(tmp_path):
    # The source's tools go to every record without its own `tools`; these plain chats have none.
    plain = [
        {
            "tools": [],
            "messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w.upper()}],
        }
        for w in WORDS
    ]
    bad_call = _tool_chat("rome")
    bad_call["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{city: rome}"
    nameless = _tool_chat("oslo")
    del nameless["messages"][1]["tool_calls"][0]["function"]["name"]
    wizard = _tool_chat("nice")
    wizard["messages"][2]["role"] = "wizard"
    records = plain + [_tool_chat("paris"), _tool_chat("lima", thinking=False), bad_call, nameless, wizard]
    train = _write(tmp_path / "chat.jsonl", records)
    tools = tmp_path / "tools.json"
    schema = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    tools.write_text(json.dumps([schema]))
    config = demo.get_config("smoke")
    config.data.sources.demo = demo.source(train, tools=str(tools))
    config.data.update(on_bad_record="skip", seq_len=1024, vocab_size=300, template="chatml")
    report = run_inspect(config, str(tmp_path / "wd"))

    section = _section(report, "train 'demo'")
    counts = "2 with tools, 2 with tool calls, 2 with tool results, 1 with reasoning (of 14 examples)"
    assert f"\ntool calling and reasoning: {counts}\n" in section
    bad = (
        rf"bad_tool_call: 2\n +{re.escape(train)}:15: message 1 tool call 0 \(get_weather\): arguments are "
        rf"not JSON \(Expecting property name .*\)\n +{re.escape(train)}:16: message 1 tool call 0 has no "
        rf"function name .*\n  bad_role: 1\n +{re.escape(train)}:17: message 2 has role 'wizard'"
    )
    assert re.search(bad, section)
    # The first three examples, then the first with tools (line 13, which also shows tool calls,
    # results and thinking): rendered by the chatml template, the replies trained.
    shown = re.findall(rf"  ({re.escape(train)}:\d+) \(", section)
    assert shown == [f"{train}:1", f"{train}:2", f"{train}:3", f"{train}:13"]
    rendered = "\n".join(line[4:] for line in section.split(f"{train}:13 (")[1].split("\n")[1:])
    assert rendered.startswith("<|im_start|>system\n # Tools") and json.dumps(schema) in rendered
    call = '{"name": "get_weather", "arguments": {"city": "paris"}}'
    assert (
        f"assistant\n[[<tool_call>\n{call}\n</tool_call><|im_end|>]]\n <|im_start|>tool\n sunny" in rendered
    )
    assert "assistant\n[[<think>\nit said so\n</think>\n\nsunny in paris<|im_end|>]]" in rendered


def test_inspect_reads_every_record_even_for_a_streamed_config():
    from jsft.data.inspect import inspect_config
    from tests import tiny_config

    config = tiny_config.get_config("/nonexistent")
    config.data.engine = "stream"
    assert inspect_config(config.data).engine == "table" and config.data.engine == "stream"
