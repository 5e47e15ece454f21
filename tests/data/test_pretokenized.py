"""Pre-tokenized records ({"prompt_ids", "completion_ids"} and Hugging Face {"input_ids", "labels"})
go through the packer as they are; ids the tokenizer cannot have are bad records with file:line."""

import pytest

from jsft.data import formats
from jsft.data.pipeline import build_data
from jsft.data.sources import DataError
from jsft.data.tokenizer import train_sentencepiece
from tests import tiny_config
from tests.conftest import make_records, write_jsonl


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    texts = [r["prompt"] + " " + r["response"] for r in make_records(300, 0)]
    return train_sentencepiece(texts, 300, str(d / "tok.model")).path


def _config(tmp_path, tokenizer, records, name="pre.jsonl", **data):
    write_jsonl(tmp_path / name, records)
    config = tiny_config.get_config(str(tmp_path))
    config.data.sources.demo.path, config.data.sources.demo.val_path = str(tmp_path / name), ""
    config.data.tokenizer = tokenizer
    config.data.update(data)
    return config


def test_prompt_and_completion_ids_train_the_completion_only(tmp_path, tokenizer_path):
    records = [
        {"prompt_ids": [5, 6, 7], "completion_ids": [8, 9]},
        {"prompt_ids": [10], "completion_ids": [11, 12, 13]},
    ]
    data = build_data(_config(tmp_path, tokenizer_path, records).data, 0, str(tmp_path / "wd"))
    (src,) = data.train_sources
    examples = src.examples()
    assert [list(e.ids) for e in examples] == [[5, 6, 7, 8, 9], [10, 11, 12, 13]]
    assert [list(e.mask) for e in examples] == [[False, False, False, True, True], [False, True, True, True]]
    batch = next(data.train)
    trained = batch["targets"][batch["loss_mask"] == 1]
    assert set(trained.tolist()) == {8, 9, 11, 12, 13}  # completion tokens are the targets, no prompt token


def test_hugging_face_input_ids_with_labels(tmp_path, tokenizer_path):
    records = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, {"input_ids": [9, 10, 11]}]
    data = build_data(_config(tmp_path, tokenizer_path, records).data, 0, str(tmp_path / "wd"))
    masks = [list(e.mask) for e in data.train_sources[0].examples()]
    assert masks == [[False, False, True, True], [True, True, True]]  # no labels: every token


def test_bad_ids_and_labels_are_bad_records_naming_file_and_line(tmp_path, tokenizer_path):
    records = [{"prompt_ids": [5], "completion_ids": [6, 7]}] * 3 + [
        {"prompt_ids": [5], "completion_ids": [6, 999]},  # line 4: beyond the 300-piece vocabulary
        {"prompt_ids": [5], "completion_ids": ["x"]},  # line 5
    ]
    config = _config(tmp_path, tokenizer_path, records)
    with pytest.raises(DataError) as e:
        build_data(config.data, 0, str(tmp_path / "wd"))
    assert f"{tmp_path / 'pre.jsonl'}:4: token id 999 is outside the tokenizer's range [0, 300)" in str(
        e.value
    )
    assert f"{tmp_path / 'pre.jsonl'}:5: field 'completion_ids' must be a list of integer token ids" in str(
        e.value
    )
    config.data.on_bad_record = "skip"
    data = build_data(config.data, 0, str(tmp_path / "wd2"))
    assert data.train_sources[0].stats["bad_by_reason"] == {"bad_token_id": 1, "wrong_type": 1}
    with pytest.raises(formats.BadRecord, match="neither input_ids"):
        formats.token_ids({"input_ids": [1, 2], "labels": [1, 3]}, "input_ids", {})


def test_token_ids_need_the_tokenizer_they_came_from(tmp_path):
    config = _config(tmp_path, "", [{"prompt_ids": [5], "completion_ids": [6, 7]}] * 3)
    with pytest.raises(DataError, match="hold token ids: set config.data.tokenizer"):
        build_data(config.data, 0, str(tmp_path / "wd"))
    assert not (tmp_path / "wd" / "tokenizer.model").exists()  # refused before any training
