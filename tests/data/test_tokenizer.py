import pickle

import pytest

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
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="config.data.tokenizer"):
        load_tokenizer(str(tmp_path / "vocab.txt"))
