"""The tokenizer `transformers` 5 builds for a Hugging Face tokenizer directory, rebuilt with
`tokenizers` alone, so that the ids jsft trains on are the ids the model sees at inference.

`AutoTokenizer` does not always run tokenizer.json as written. It picks a tokenizer class from
tokenizer_config.json's `tokenizer_class` and config.json's `model_type` (`tokenizer_class`), and a
class with its own constructor keeps only tokenizer.json's vocabulary, merges and added tokens: it
builds its own normalizer, pre-tokenizer, decoder and BPE options. For the families jsft imports:

  qwen2, qwen3  Qwen2Tokenizer: NFC, Qwen's split regex (digits one by one), byte-level BPE. A qwen2
                checkpoint always gets it (transformers overrides a hub `tokenizer_class` there); a
                qwen3 one unless tokenizer_config.json names another class.
  gemma2, gemma3, gemma3_text
                GemmaTokenizer: spaces to "▁", byte-fallback BPE with `unk_token`.
  llama         tokenizer.json as written, unless tokenizer_config.json names LlamaTokenizer and the
                file is not byte-level: then Metaspace (prepend "▁" to the first piece only, unless
                `legacy`), byte-fallback BPE, no normalizer.
  mistral       tokenizer.json as written (MistralCommonBackend, which needs mistral-common and a
                tekken.json, is not reproduced).

`transformers_class` follows AutoTokenizer's choice (transformers 5.x, no remote code) and
`rebuild` applies that class's pipeline to a tokenizer loaded from tokenizer.json. A class jsft does
not know is reported, and the file is then read as written.
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers

AS_WRITTEN = "TokenizersBackend"  # transformers' class that runs tokenizer.json as written
# Class names transformers resolves to TokenizersBackend.
AS_WRITTEN_NAMES = {"TokenizersBackend", "PreTrainedTokenizerFast", "PreTrainedTokenizer", "PythonBackend"}
# transformers' TOKENIZER_MAPPING_NAMES for the families (llama has no entry; mistral's
# MistralCommonBackend falls back to TokenizersBackend without mistral-common and tekken.json).
REGISTERED = {
    "qwen2": "Qwen2Tokenizer",
    "qwen3": "Qwen2Tokenizer",
    "gemma": "GemmaTokenizer",
    "gemma2": "GemmaTokenizer",
    "gemma3": "GemmaTokenizer",
    "gemma3_text": "GemmaTokenizer",
    "mistral": AS_WRITTEN,
}
# Model types whose hub `tokenizer_class` transformers overrides with the registered class.
HUB_CLASS_OVERRIDDEN = {"qwen2"}
# Qwen2Tokenizer's split: letters, single digits, punctuation runs, newlines, spaces.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# Text on which a rebuilt pipeline is compared with the file's (the warning quotes the first that differs).
PROBES = (" 37", "2024-11-29: 1,234,567.89", "  two  spaces\n\n\ttab", "café naïve Ｆｕｌｌ ﬁ", "中文 😀")


def _name(cls: str | None) -> str | None:
    """A class name as transformers looks it up: without "Fast" (PreTrainedTokenizerFast is a name)."""
    if not cls:
        return None
    if cls in AS_WRITTEN_NAMES:
        return AS_WRITTEN
    return cls.removesuffix("Fast")


def transformers_class(config: dict, tokenizer_config: dict, tokenizer_json: str) -> str:
    """The tokenizer class AutoTokenizer (transformers 5) loads for this directory: `config` is its
    config.json ({} if none), `tokenizer_json` the text of its tokenizer.json."""
    model_type = config.get("model_type") or ""
    hub = _name(tokenizer_config.get("tokenizer_class") or config.get("tokenizer_class"))
    registered = REGISTERED.get(model_type)
    if hub == "LlamaTokenizer" and model_type not in HUB_CLASS_OVERRIDDEN and '"ByteLevel"' in tokenizer_json:
        return AS_WRITTEN  # a byte-level file declared as LlamaTokenizer (Llama 3 style)
    if hub and registered and hub != registered:
        if registered == AS_WRITTEN:
            return AS_WRITTEN
        chosen = registered if model_type in HUB_CLASS_OVERRIDDEN else hub
        return chosen  # TokenizersBackend when `hub` names it
    if hub:
        return hub
    return registered or AS_WRITTEN


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _bpe_options(tok: Tokenizer, **options: Any) -> None:
    """Set the BPE model's options to those a class's constructor passes (the rest at their defaults)."""
    defaults = dict(
        dropout=None,
        unk_token=None,
        continuing_subword_prefix=None,
        end_of_word_suffix=None,
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=False,
    )
    for name, value in {**defaults, **options}.items():
        setattr(tok.model, name, value)


def _qwen2(tok: Tokenizer, tokenizer_config: dict) -> None:
    prefix = bool(tokenizer_config.get("add_prefix_space"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    _bpe_options(tok, continuing_subword_prefix="", end_of_word_suffix="")


def _llama(tok: Tokenizer, tokenizer_config: dict) -> None:
    prefix = tokenizer_config.get("add_prefix_space")
    prefix = True if prefix is None else bool(prefix)
    scheme = ("always" if tokenizer_config.get("legacy") else "first") if prefix else "never"
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    _bpe_options(tok, fuse_unk=True, byte_fallback=True)


def _gemma(tok: Tokenizer, tokenizer_config: dict) -> None:
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    unk = _token_text(tokenizer_config.get("unk_token")) or "<unk>"
    _bpe_options(tok, fuse_unk=True, byte_fallback=True, unk_token=unk)


REBUILDERS = {"Qwen2Tokenizer": _qwen2, "LlamaTokenizer": _llama, "GemmaTokenizer": _gemma}


def _state(tok: Tokenizer) -> dict[str, str]:
    """The parts of a tokenizer a class rebuilds, each as JSON text (the BPE options without vocab)."""
    parts = {}
    for name in ("normalizer", "pre_tokenizer", "decoder"):
        part = getattr(tok, name)
        parts[name] = part.__getstate__().decode() if part is not None else "null"
    model = tok.model
    keys = ("dropout", "unk_token", "fuse_unk", "byte_fallback", "ignore_merges")
    options = {k: getattr(model, k, None) for k in keys}
    options["continuing_subword_prefix"] = getattr(model, "continuing_subword_prefix", None) or ""
    options["end_of_word_suffix"] = getattr(model, "end_of_word_suffix", None) or ""
    parts["BPE options"] = json.dumps(options, sort_keys=True)
    return parts


def rebuild(tok: Tokenizer, cls: str, tokenizer_config: dict) -> list[str] | None:
    """Give `tok` (loaded from tokenizer.json) the pipeline transformers' `cls` builds; returns the
    parts that changed (empty: the file already matched), or None if jsft does not know `cls` (or
    the file's model is not the BPE the class builds) and left `tok` as written."""
    if cls == AS_WRITTEN:
        return []
    if cls not in REBUILDERS or type(tok.model).__name__ != "BPE":
        return None
    before = _state(tok)
    REBUILDERS[cls](tok, tokenizer_config)
    after = _state(tok)
    return [name for name in before if before[name] != after[name]]


def first_difference(written: Tokenizer, rebuilt: Tokenizer) -> str:
    """The first probe text the two tokenizers split differently, as `text: a ids vs b ids`; ""
    when every probe agrees."""
    for text in PROBES:
        a = written.encode(text, add_special_tokens=False).ids
        try:
            b = rebuilt.encode(text, add_special_tokens=False).ids
        except Exception as e:  # noqa: BLE001  (e.g. an unk_token the vocabulary lacks; transformers fails alike)
            return f"{text!r} cannot be tokenized as transformers loads it: {e}"
        if a != b:
            return f"{text!r} is {len(a)} token(s) {a} as written, {len(b)} {b} as transformers loads it"
    return ""
