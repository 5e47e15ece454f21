import json
import pickle

import pytest

from jsft.data.sources import DataError
from jsft.data.tokenizer import SentencePieceTokenizer, load_tokenizer, train_sentencepiece

TEXTS = [f"upper: {' '.join(w)}" for w in ["cat", "dog", "bird", "fish", "a b", "zebra"]] * 20


def test_trained_tokenizer_is_deterministic_and_has_special_ids(tmp_path):
    a = train_sentencepiece(TEXTS, 300, str(tmp_path / "a.model"), ["<|im_end|>"])
    train_sentencepiece(TEXTS, 300, str(tmp_path / "b.model"), ["<|im_end|>"])
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert (a.pad_id, a.bos_id, a.eos_id) == (0, 2, 3)
    assert a.decode(a.encode("upper: c a t")) == "upper: c a t"
    assert len(a.encode("12345")) >= 5  # digits split
    assert a.token_id("<|im_end|>") in a.encode("x<|im_end|>")  # special tokens stay whole
    b = pickle.loads(pickle.dumps(a))  # tokenization workers receive tokenizers by pickle
    assert b.encode("upper: z") == a.encode("upper: z") and b.fingerprint() == a.fingerprint()


def test_loading_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        SentencePieceTokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(DataError, match="config.data.tokenizer=.*vocab.txt'.*expected a SentencePiece"):
        load_tokenizer(str(tmp_path / "vocab.txt"))


@pytest.mark.parametrize("key", ["config.data.tokenizer", "config.model.hf_path"])
def test_a_missing_tokenizer_path_is_a_data_error_naming_the_key_and_path(tmp_path, key):
    missing = str(tmp_path / "no_such_tokenizer")
    with pytest.raises(DataError) as e:
        load_tokenizer(missing, key=key)
    assert str(e.value) == f"{key}={missing!r}: no such file or directory"


def test_a_directory_without_tokenizer_files_says_which_files_were_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DataError, match=r"config.data.tokenizer=.*tokenizer\.json.*tokenizer\.model"):
        load_tokenizer(str(tmp_path))


def _hf_tokenizer_dir(d, **config):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: PLC0415

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        ["hello world"] * 10,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", **config}))
    return d


def test_chat_template_is_read_from_every_file_transformers_reads(tmp_path):
    d = _hf_tokenizer_dir(
        tmp_path, chat_template=[{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    )
    assert load_tokenizer(str(d)).chat_template == "D"  # named templates: "default" is used
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "default.jinja").write_text("ADDITIONAL")
    assert load_tokenizer(str(d)).chat_template == "ADDITIONAL"
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "LEGACY JSON"}))
    assert load_tokenizer(str(d)).chat_template == "LEGACY JSON"
    (d / "chat_template.jinja").write_text("JINJA")  # what transformers 5 writes: it wins
    assert load_tokenizer(str(d)).chat_template == "JINJA"


def test_a_tokenizer_without_a_pad_token_says_so(tmp_path):
    tok = load_tokenizer(str(_hf_tokenizer_dir(tmp_path)))
    assert tok.pad_token is None and tok.pad_id == tok.eos_id
    assert tok.special_tokens == ("<|im_end|>",)
