"""Data a user can get wrong: each mistake is one DataError naming the file (and line or config key),
what is wrong and what to change, raised before any tokenizer is trained or step is taken."""

import json
import re

import datasets
import pytest

from configs.demo import source
from jsft.data.pipeline import build_data
from jsft.data.sources import DataError
from tests import tiny_config
from tests.conftest import make_records, write_jsonl


def _config(tmp_path, train, val="", **data):
    config = tiny_config.get_config(str(tmp_path))
    config.data.sources.demo = source(str(train), str(val) if val else "")
    config.data.update(data)
    return config


def _build_error(config, workdir) -> str:
    with pytest.raises(DataError) as e:
        build_data(config.data, 0, str(workdir))
    return str(e.value)


def test_an_empty_file_names_the_source_key_and_file(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("\n\n")
    msg = _build_error(_config(tmp_path, train), tmp_path / "wd")
    assert msg == (
        f"source 'demo' (config.data.sources.demo.path): {train}: the file holds no records; add "
        "records to it or point the source at another file"
    )
    assert not (tmp_path / "wd" / "tokenizer.model").exists()
    val = tmp_path / "val.json"
    val.write_text("[]")
    msg = _build_error(_config(tmp_path, tmp_path / "ok.jsonl", val), tmp_path / "wd")
    assert msg.startswith("source 'demo' (config.data.sources.demo.path): ")  # train is read first
    write_jsonl(tmp_path / "ok.jsonl", make_records(20, 0))
    msg = _build_error(_config(tmp_path, tmp_path / "ok.jsonl", val), tmp_path / "wd")
    assert msg.startswith(f"source 'demo' (config.data.sources.demo.val_path): {val}: the file holds")


def test_a_jsonl_array_line_is_one_bad_record_and_skip_keeps_the_lines_after_it(tmp_path):
    records = make_records(30, 1)
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join([json.dumps(records[:3])] + [json.dumps(r) for r in records]) + "\n")
    write_jsonl(tmp_path / "val.jsonl", make_records(4, 2))
    config = _config(tmp_path, train, tmp_path / "val.jsonl")
    msg = _build_error(config, tmp_path / "wd")
    assert f"source 'demo': 1 bad record(s) of 31:\n  {train}:1: not a JSON object (a JSON array); " in msg
    config.data.on_bad_record = "skip"
    src = build_data(config.data, 0, str(tmp_path / "wd")).train_sources[0]
    assert len(src) == 30 and src.stats["bad_by_reason"] == {"not_an_object": 1}
    assert src.bad[0][0] == f"{train}:1"


def test_bad_records_are_counted_by_code_and_listed_in_full(tmp_path):
    good = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    wizard = {"messages": [{"role": "wizard", "content": "u"}, {"role": "assistant", "content": "a"}]}
    empty = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": " "}]}
    train = write_jsonl(tmp_path / "chat.jsonl", [good] * 20 + [wizard, empty, wizard])
    config = _config(tmp_path, train, template="chatml")
    msg = _build_error(config, tmp_path / "wd")
    detail = (
        "message 0 has role 'wizard'; expected one of system, user, assistant, tool (or ShareGPT's "
        "human, gpt, model, bot, function_call, observation, function)"
    )
    assert f"  {train}:21: {detail}\n  {train}:22: message 1: empty assistant reply\n" in msg
    config.data.on_bad_record = "skip"
    src = build_data(config.data, 0, str(tmp_path / "wd")).train_sources[0]
    assert src.stats["bad_by_reason"] == {"bad_role": 2, "empty_response": 1}
    assert src.bad[0] == (f"{train}:21", detail)


def test_a_sharegpt_turn_with_an_unknown_role_names_its_file_and_line(tmp_path):
    def record(role):
        return {"id": role, "conversations": [{"from": "human", "value": "u"}, {"from": role, "value": "a"}]}

    train = write_jsonl(tmp_path / "sharegpt.jsonl", [record("gpt")] * 20 + [record("narrator")])
    msg = _build_error(_config(tmp_path, train, template="chatml"), tmp_path / "wd")
    assert (
        f"  {train}:21: message 1 has role 'narrator'; expected one of system, user, assistant, tool" in msg
    )


def test_every_record_bad_fails_before_a_tokenizer_is_trained(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(
        '[{"prompt": "a", "response": "b"}]\n{"prompt": "a", "response": ""}\n{"prompt": "a", "re\n'
    )
    for mode in ("skip", "error"):
        msg = _build_error(_config(tmp_path, train, on_bad_record=mode), tmp_path / "wd")
        assert msg == (
            f"source 'demo' ({train}): all 3 record(s) are bad, so there is nothing to train on:\n"
            f"  {train}:1: not a JSON object (a JSON array); a .jsonl file holds one object per line: "
            "name a JSON-array file .json\n"
            f"  {train}:2: field 'response' is empty\n"
            f"  {train}:3: invalid JSON (Unterminated string starting at: column 17)\n"
            "Fix them (config.data.on_bad_record='skip' cannot help when every record is bad), or check "
            "config.data.sources.demo.format and .fields."
        )
    assert not (tmp_path / "wd" / "tokenizer.model").exists()  # SentencePiece never saw the data


def test_a_seq_len_shorter_than_every_example_says_which_setting_to_change(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_records(40, 3))
    config = _config(tmp_path, train)
    shortest = min(
        len(ex.ids) for ex in build_data(config.data, 0, str(tmp_path / "wd")).train_sources[0].examples()
    )
    config.data.update(seq_len=4, overlong="drop")
    assert _build_error(config, tmp_path / "wd") == (
        f"source 'demo' ({train}): no usable examples: all 40 examples have more than "
        "config.data.seq_len + 1 = 5 tokens and config.data.overlong='drop' dropped them; raise "
        f"config.data.seq_len (the shortest example has {shortest} tokens) or set "
        "config.data.overlong='truncate'"
    )
    config.data.overlong = "truncate"  # the prompts fill the 5 tokens: nothing left to train
    msg = _build_error(config, tmp_path / "wd")
    assert (
        "config.data.overlong='truncate' cut them to 5 tokens, which left no trained (response) token" in msg
    )
    assert msg.endswith("or set config.data.overlong='truncate_prompt'")
    with open(train, "a") as f:
        f.write('{"prompt": "a", "response": 1}\n')
    config.data.on_bad_record = "skip"
    msg = _build_error(config, tmp_path / "wd")
    assert msg.startswith(
        f"source 'demo' ({train}): no usable examples: 1 of 41 records are bad (skipped; listed below) "
        "and the other 40 examples have more than config.data.seq_len + 1 = 5 tokens"
    )
    assert msg.endswith(f"\n  {train}:41: field 'response' must be a string, got int")


def test_table_columns_that_fit_no_format_name_the_fields_setting(tmp_path):
    path = tmp_path / "qa.csv"
    datasets.Dataset.from_list([{"question": "q", "answer": "a"}] * 3).to_csv(str(path), index=False)
    config = _config(tmp_path, path)
    msg = _build_error(config, tmp_path / "wd")
    assert msg.startswith(f"source 'demo' ({path}:row 0): cannot tell the record format from the fields")
    assert msg.endswith(
        "; name the format with config.data.sources.demo.format and the columns it reads with "
        "config.data.sources.demo.fields"
    )
    config.data.sources.demo.format = "prompt_response"
    assert _build_error(config, tmp_path / "wd") == (
        f"source 'demo' ({path}): format 'prompt_response' needs the column(s) ['prompt', 'response'], "
        "but the table has ['question', 'answer']; name the columns to read with "
        "config.data.sources.demo.fields (e.g. {'prompt': <column>}) or set config.data.sources.demo.format"
    )
    config.data.sources.demo.fields = {"prompt": "question", "response": "answer"}
    assert len(build_data(config.data, 0, str(tmp_path / "wd")).train_sources[0]) == 3


def test_a_val_fraction_that_leaves_nothing_to_train_is_an_error(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_records(10, 4))
    config = _config(tmp_path, train)
    config.data.sources.demo.val_fraction = 1.0
    msg = _build_error(config, tmp_path / "wd")
    assert re.match(
        rf"source 'demo' \({re.escape(train)}\): cannot hold out config.data.sources.demo.val_fraction=1.0 "
        r"of its 10 records \(.*\); change it or give a val_path$",
        msg,
    )


def test_example_weights_come_from_the_weight_field_and_bad_ones_name_the_line(tmp_path):
    records = make_records(30, 4)
    for i, r in enumerate(records):
        r["weight"] = [0.5, 2, 1.0][i % 3]
    records[7]["weight"] = -1
    records[9]["weight"] = "heavy"
    train = tmp_path / "train.jsonl"
    write_jsonl(train, records)
    write_jsonl(tmp_path / "val.jsonl", make_records(4, 5))
    config = _config(tmp_path, train, tmp_path / "val.jsonl")
    msg = _build_error(config, tmp_path / "wd")
    assert f"{train}:8: field 'weight' must be a finite number >= 0, got -1" in msg
    assert f"{train}:10: field 'weight' must be a finite number >= 0, got 'heavy'" in msg
    config.data.on_bad_record = "skip"
    src = build_data(config.data, 0, str(tmp_path / "wd")).train_sources[0]
    assert len(src) == 28 and src.stats["bad_by_reason"] == {"bad_weight": 2}
    kept = [r["weight"] for i, r in enumerate(records) if i not in (7, 9)]
    assert [ex.weight for ex in src.examples()] == [float(w) for w in kept]


def test_a_sources_tools_file_reaches_its_records_and_a_bad_one_names_the_key(tmp_path):
    chat = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    train = write_jsonl(tmp_path / "chat.jsonl", [chat] * 20)
    tools = tmp_path / "tools.json"
    config = _config(tmp_path, train, template="chatml", seq_len=512)
    config.data.sources.demo.tools = str(tools)
    key = f"config.data.sources.demo.tools={str(tools)!r}"
    assert _build_error(config, tmp_path / "wd") == f"{key}: cannot read it (No such file or directory)"
    tools.write_text('{"name": "f"}')
    assert _build_error(config, tmp_path / "wd").startswith(
        f"{key}: the file must be a list of tool schemas, got a JSON object; write a JSON list of tool "
        'schemas there, e.g. [{"type": "function", "function": {"name": "get_weather"'
    )
    tools.write_text('[{"name": "f"')
    assert _build_error(config, tmp_path / "wd").startswith(f"{key}: not JSON (Expecting ")
    tools.write_text(json.dumps([{"type": "function", "function": {"name": "lookup_word"}}]))
    data = build_data(config.data, 0, str(tmp_path / "wd"))
    text = data.tokenizer.decode(data.train_sources[0].example(0).ids)
    assert '<tools>\n{"type": "function", "function": {"name": "lookup_word"}}\n</tools>' in text.replace(
        "\n ", "\n"
    )
