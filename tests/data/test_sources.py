import json

import datasets
import pytest

from jsft.data.sources import DataError, read_table, row_record

RECORDS = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(5)]


def _records(table, path):
    out = []
    for i in range(len(table)):
        where, rec, err = row_record(table[i], i, path)
        out.append((where, rec, err))
    return out


def test_jsonl_bad_lines_become_rows_that_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "resp\n{"prompt": "\xff"}\n')
    rows = _records(read_table(str(path), "train", str(tmp_path / "cache")), str(path))
    assert rows[0] == (f"{path}:1", {"prompt": "a", "response": "b"}, "")
    assert rows[1][0] == f"{path}:3" and rows[1][2].startswith("invalid JSON")
    assert rows[2][0] == f"{path}:4" and rows[2][2].startswith("not valid UTF-8")


@pytest.mark.parametrize("kind", ["json_array", "parquet", "csv", "arrow", "save_to_disk", "dataset_dict"])
def test_every_file_kind_reads_the_same_records(tmp_path, kind):
    ds = datasets.Dataset.from_list(RECORDS)
    if kind == "json_array":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(RECORDS))
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        ds.to_parquet(str(path))
    elif kind == "csv":
        path = tmp_path / "d.csv"
        ds.to_csv(str(path), index=False)
    elif kind == "arrow":
        ds.save_to_disk(str(tmp_path / "saved"))
        path = next((tmp_path / "saved").glob("*.arrow"))
    elif kind == "save_to_disk":
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    else:
        path = tmp_path / "dd"
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(path))
    rows = _records(read_table(str(path), "train", str(tmp_path / "cache")), str(path))
    assert [r[1] for r in rows] == RECORDS
    assert all(r[2] == "" for r in rows)
    if kind not in ("json_array",):
        assert rows[2][0] == f"{path}:row 2"


def test_missing_and_unsupported_inputs_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="cannot open data file .*nope.jsonl"):
        read_table(str(tmp_path / "nope.jsonl"), "train", None)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported data file"):
        read_table(str(tmp_path / "x.txt"), "train", None)
    path = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(path))
    with pytest.raises(DataError, match="no split 'validation'"):
        read_table(str(path), "validation", None)


def _empty_parquet(path):
    datasets.Dataset.from_list(RECORDS).select([]).to_parquet(str(path))


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.jsonl", b""),
        ("blank.jsonl", b"\n  \n\r\n"),
        ("empty.json", b" [ \n ]\n"),
        ("empty.csv", b""),
        ("header_only.csv", b"prompt,response\n"),
        ("empty.parquet", _empty_parquet),
    ],
)
def test_a_file_without_records_is_an_error_naming_it(tmp_path, name, content):
    path = tmp_path / name
    content(path) if callable(content) else path.write_bytes(content)
    with pytest.raises(DataError) as e:
        read_table(str(path), "train", str(tmp_path / "cache"))
    assert str(e.value) == (
        f"{path}: the file holds no records; add records to it or point the source at another file"
    )


def test_jsonl_lines_that_are_not_objects_are_bad_records_and_the_rest_is_read(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[:2]) + "\n" + json.dumps(RECORDS[2]) + '\n7\nnull\n"text"\n')
    table = read_table(str(path), "train", str(tmp_path / "cache"))
    rows = _records(table, str(path))
    assert rows[0] == (
        f"{path}:1",
        None,
        "not a JSON object (a JSON array); a .jsonl file holds one object per line: name a JSON-array "
        "file .json",
    )
    assert rows[1] == (f"{path}:2", RECORDS[2], "")
    assert [r[2] for r in rows[2:]] == [
        "not a JSON object (a JSON number)",
        "not a JSON object (a JSON null)",
        "not a JSON object (a JSON string)",
    ]
    assert set(table["code"]) == {"not_an_object", ""}


def test_json_is_an_array_or_json_lines_and_non_object_items_are_bad(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([RECORDS[0], [1], RECORDS[1]]))
    rows = _records(read_table(str(array), "train", None), str(array))
    assert rows == [
        (f"{array}:item 0", RECORDS[0], ""),
        (f"{array}:item 1", None, "not a JSON object (a JSON array)"),
        (f"{array}:item 2", RECORDS[1], ""),
    ]
    lines = tmp_path / "l.json"
    lines.write_text("\n".join(json.dumps(r) for r in RECORDS[:2]))
    assert [r[1] for r in _records(read_table(str(lines), "train", None), str(lines))] == RECORDS[:2]


def test_unreadable_paths_say_what_they_are_and_what_to_do(tmp_path, monkeypatch):
    (tmp_path / "shards").mkdir()
    for i in range(2):
        (tmp_path / "shards" / f"part{i}.jsonl").write_text(json.dumps(RECORDS[i]) + "\n")
    with pytest.raises(DataError) as e:
        read_table(str(tmp_path / "shards"), "train", None)
    assert str(e.value) == (
        f"{tmp_path / 'shards'}: a directory not written by datasets.save_to_disk; it holds data files "
        "(part0.jsonl, part1.jsonl), which are not read as one source: name each file as a source of "
        "its own (config.data.sources.<name>.path), or join them into one"
    )
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"broken.parquet: cannot be read as a parquet file \(ArrowInvalid"):
        read_table(str(tmp_path / "broken.parquet"), "train", None)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r'notes.txt: unsupported data file .*\{"text": \.\.\.\}'):
        read_table(str(tmp_path / "notes.txt"), "train", None)
    monkeypatch.chdir(tmp_path)  # `shards/typo` is a local typo, not a hub data set
    with pytest.raises(DataError, match="cannot open data file shards/typo: No such file or directory"):
        read_table("shards/typo", "train", None)
