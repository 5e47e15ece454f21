import pytest

from jsft.data.templates import PlainTemplate, build_template
from jsft.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

TEXTS = [f"upper: {' '.join(w)}" for w in ["cat", "dog", "bird", "fish", "a b", "zebra"]] * 20


def test_trained_tokenizer_is_deterministic_and_has_special_ids(tmp_path):
    a = train_sentencepiece(TEXTS, 300, str(tmp_path / "a.model"))
    b = train_sentencepiece(TEXTS, 300, str(tmp_path / "b.model"))
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert (a.pad_id, a.bos_id, a.eos_id) == (0, 2, 3)
    assert a.decode(a.encode("upper: c a t")) == "upper: c a t"
    assert b.encode("12345") == a.encode("12345") and len(a.encode("12345")) >= 5  # digits split
    with pytest.raises(FileNotFoundError, match="missing.model"):
        SentencePieceTokenizer(str(tmp_path / "missing.model"))


def test_plain_template_trains_exactly_the_response_and_eos(tmp_path):
    tok = train_sentencepiece(TEXTS, 300, str(tmp_path / "t.model"))
    ids, mask = PlainTemplate("\n").render(tok, "upper: c a t", "C A T")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assert trained[-1] == tok.eos_id
    assert tok.decode(trained[:-1]) == "C A T"
    untrained = [i for i, m in zip(ids, mask, strict=True) if not m]
    assert untrained == PlainTemplate("\n").prompt_ids(tok, "upper: c a t")
    with pytest.raises(ValueError, match="config.data.template"):
        build_template("nope", "\n")
