"""jsft tokenizes a Hugging Face tokenizer directory exactly as transformers' AutoTokenizer does (the
tokenizer inference uses), for every family jsft imports, also where tokenizer.json and the class
transformers picks for the directory disagree."""

import json
import logging

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from jsft.data import tokenizer as tokenizer_lib
from jsft.data.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

CORPUS = [
    "Order 37 shipped on 2024-11-29 for $37.50; 12345 units, 37 left.",
    "The answer is 37. Not 3 or 7 but 37, and 2024 is a year.",
    "  two  spaces\n\nnew  line\ttab café naïve über",
    "user assistant system hello world, how are you today?",
] * 20
TEXTS = [
    " 37",
    "Order 12345 shipped on 2024-11-29 for $37.50",
    "  two  spaces\n\nnew  line\ttab ",
    "café naïve Ｆｕｌｌ ﬁ 中文 😀",
]
BYTES = [f"<0x{i:02X}>" for i in range(256)]


def _byte_level() -> Tokenizer:
    """A GPT-2 style byte-level BPE: its ByteLevel pre-tokenizer keeps " 37" together (one token),
    where Qwen2Tokenizer splits digits one by one."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    assert len(tok.encode(" 37").ids) == 1
    return tok


def _sentencepiece_style(special: list[str], prepend: bool) -> Tokenizer:
    """A byte-fallback BPE over "▁"-joined words, as Llama 2, Mistral 7B and Gemma ship it:
    tokenizer.json's normalizer writes the spaces (Llama 2's also prepends one), no pre-tokenizer."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Prepend("▁")] if prepend else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # words, for training
    trainer = trainers.BpeTrainer(vocab_size=400 + len(BYTES), special_tokens=special + BYTES)
    tok.train_from_iterator(CORPUS, trainer)
    tok.pre_tokenizer = None
    strip = [decoders.Strip(" ", 1, 0)] if prepend else []
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    return tok


def _save(directory, tok: Tokenizer, tokenizer_config: dict, model_type, pre_tokenizer=None):
    """Write the directory; byte tokens live in the vocabulary, not among the added tokens."""
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in BYTES]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if model_type:
        (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
    return directory


CHATML = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}
LLAMA2 = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
GEMMA = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}
GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
METASPACE = pre_tokenizers.Metaspace(prepend_scheme="always")

# id: (model_type, tokenizer_class, tokenizer style, extra tokenizer_config, class transformers picks)
CASES = {
    "qwen2": ("qwen2", "Qwen2Tokenizer", "byte_level", {}, "Qwen2Tokenizer"),
    "qwen2_hub_class_overridden": ("qwen2", "PreTrainedTokenizerFast", "byte_level", {}, "Qwen2Tokenizer"),
    "qwen2_no_class": ("qwen2", None, "byte_level", {}, "Qwen2Tokenizer"),
    "qwen2_prefix_space": (
        "qwen2",
        "Qwen2Tokenizer",
        "byte_level",
        {"add_prefix_space": True},
        "Qwen2Tokenizer",
    ),
    "qwen3": ("qwen3", "Qwen2TokenizerFast", "byte_level", {}, "Qwen2Tokenizer"),
    "qwen3_as_written": ("qwen3", "PreTrainedTokenizerFast", "byte_level", {}, "TokenizersBackend"),
    "tokenizer_only_dir": (None, "Qwen2Tokenizer", "byte_level", {}, "Qwen2Tokenizer"),
    "llama3": ("llama", "PreTrainedTokenizerFast", "byte_level", {}, "TokenizersBackend"),
    "llama3_declared_llama": ("llama", "LlamaTokenizerFast", "byte_level", {}, "TokenizersBackend"),
    "llama2": ("llama", "LlamaTokenizer", "llama2", {"legacy": False}, "LlamaTokenizer"),
    "llama2_legacy": ("llama", "LlamaTokenizerFast", "llama2", {"legacy": True}, "LlamaTokenizer"),
    "llama2_no_prefix": ("llama", "LlamaTokenizer", "llama2", {"add_prefix_space": False}, "LlamaTokenizer"),
    "llama_no_class": ("llama", None, "llama2", {}, "TokenizersBackend"),
    "mistral": ("mistral", "LlamaTokenizer", "llama2", {"legacy": True}, "TokenizersBackend"),
    "mistral_byte_level": ("mistral", "PreTrainedTokenizerFast", "byte_level", {}, "TokenizersBackend"),
    "gemma2": ("gemma2", "GemmaTokenizer", "gemma", {}, "GemmaTokenizer"),
    "gemma2_metaspace_file": ("gemma2", "GemmaTokenizer", "gemma_metaspace", {}, "GemmaTokenizer"),
    "gemma2_as_written": ("gemma2", "PreTrainedTokenizerFast", "gemma_metaspace", {}, "TokenizersBackend"),
    "gemma3": ("gemma3", "GemmaTokenizer", "gemma_metaspace", {}, "GemmaTokenizer"),
    "gemma3_text_no_class": ("gemma3_text", None, "gemma", {}, "GemmaTokenizer"),
}


def _tokenizer_dir(tmp_path, case):
    model_type, cls, style, extra, _ = CASES[case]
    config = {**({"tokenizer_class": cls} if cls else {}), **extra}
    if style == "byte_level":
        return _save(tmp_path, _byte_level(), {**CHATML, **config}, model_type), [
            "<|im_start|>",
            "<|im_end|>",
        ]
    if style == "llama2":
        tok = _sentencepiece_style(["<unk>", "<s>", "</s>"], prepend=True)
        return _save(tmp_path, tok, {**LLAMA2, **config}, model_type), ["<s>", "</s>"]
    pre = METASPACE if style == "gemma_metaspace" else None
    tok = _sentencepiece_style(GEMMA_SPECIAL, prepend=False)
    return _save(tmp_path, tok, {**GEMMA, **config}, model_type, pre), ["<start_of_turn>", "<end_of_turn>"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_ids_equal_auto_tokenizer(tmp_path, case):
    directory, (start, end) = _tokenizer_dir(tmp_path, case)
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    ours = load_tokenizer(str(directory))
    assert type(theirs).__name__ == CASES[case][-1] == ours.transformers_class
    texts = [*TEXTS, f"{start}user\nWhat is 37 + 5?{end}\n{start}assistant\n 42{end}", f"a{end}{end} 37"]
    for text in texts:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False), text
    assert ours.vocab_size == len(theirs)


def test_qwen2_digits_are_split_as_transformers_splits_them_and_the_change_is_named_once(tmp_path, caplog):
    directory, _ = _tokenizer_dir(tmp_path, "qwen2")
    written = Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert len(written.encode(" 37").ids) == 1  # the file alone keeps " 37" whole
    tokenizer_lib._WARNED.discard(str(directory / "tokenizer.json"))
    with caplog.at_level(logging.WARNING):
        ours = load_tokenizer(str(directory), key="config.model.hf_path")
        load_tokenizer(str(directory), key="config.model.hf_path")
    assert len(ours.encode(" 37")) == 3  # " ", "3", "7": the ids a transformers model sees
    (warning,) = [r.getMessage() for r in caplog.records if "transformers 5 loads" in r.getMessage()]
    assert "as Qwen2Tokenizer (model_type 'qwen2', tokenizer_class 'Qwen2Tokenizer')" in warning
    assert "replaces tokenizer.json's normalizer, pre_tokenizer with its own" in warning
    assert "' 37' is 1 token(s)" in warning
    assert ours.source.startswith(f"the checkpoint's tokenizer.json {directory / 'tokenizer.json'}")
    assert ours.source.endswith("tokenized as transformers' Qwen2Tokenizer")


def test_a_rebuilt_pipeline_changes_the_fingerprint_and_a_matching_file_keeps_it(tmp_path):
    qwen = load_tokenizer(str(_tokenizer_dir(tmp_path / "a", "qwen2")[0]))
    llama3 = load_tokenizer(str(_tokenizer_dir(tmp_path / "b", "llama3")[0]))
    assert qwen.fingerprint().endswith("-Qwen2Tokenizer")  # cached tokenizations of the old ids are stale
    assert llama3.fingerprint().count("-") == 2  # "hf-<tokenizer.json>-<tokenizer_config.json>", as before


def test_a_class_jsft_does_not_rebuild_is_read_as_written_with_a_warning(tmp_path, caplog):
    directory, _ = _tokenizer_dir(tmp_path, "qwen3")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(
        json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"})
    )
    with caplog.at_level(logging.WARNING):
        ours = load_tokenizer(str(directory))
    assert ours.transformers_class == "GPT2Tokenizer" and len(ours.encode(" 37")) == 1
    assert any("whose pipeline jsft does not rebuild" in r.getMessage() for r in caplog.records)
