import pytest

from jsft.data.sources import DataError, read_jsonl


def _write(tmp_path, text, name="d.jsonl", mode="w"):
    p = tmp_path / name
    if mode == "wb":
        p.write_bytes(text)
    else:
        p.write_text(text)
    return str(p)


def test_reads_records_and_remembers_where_they_came_from(tmp_path):
    path = _write(tmp_path, '{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d"}\n')
    recs = read_jsonl(path)
    assert [(r.prompt, r.response) for r in recs] == [("a", "b"), ("c", "d")]
    assert recs[1].source == f"{path}:3"


@pytest.mark.parametrize(
    "line,reason",
    [
        ('{"prompt": "a", "response": ', "invalid JSON"),
        ('["a", "b"]', "expected a JSON object"),
        ('{"prompt": "a"}', "missing field 'response'"),
        ('{"prompt": 3, "response": "b"}', "field 'prompt' must be a string"),
        ('{"prompt": "a", "response": "  "}', "is empty"),
    ],
)
def test_a_bad_line_is_named_by_file_and_line_number(tmp_path, line, reason):
    path = _write(tmp_path, '{"prompt": "ok", "response": "ok"}\n' + line + "\n")
    with pytest.raises(DataError, match=reason) as e:
        read_jsonl(path)
    assert f"{path}:2" in str(e.value)


def test_missing_file_and_non_utf8_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="cannot open data file .*nope.jsonl"):
        read_jsonl(str(tmp_path / "nope.jsonl"))
    path = _write(tmp_path, b'{"prompt": "\xff", "response": "x"}\n', mode="wb")
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_jsonl(path)
