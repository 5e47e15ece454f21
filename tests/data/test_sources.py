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
