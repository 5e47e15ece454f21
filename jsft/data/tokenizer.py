"""One tokenizer interface over SentencePiece `.model` files and Hugging Face `tokenizer.json` files.

Everything downstream (templates, packing, generation) sees only `Tokenizer`: text in, ids out, and
the special ids, which are always read from the tokenizer's own files. `encode` never adds BOS/EOS:
templates place special tokens explicitly.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable
from typing import Protocol

import sentencepiece as spm

from jsft.data.sources import DataError


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    pad_token: str | None  # None: the tokenizer defines no padding token (pad_id is then EOS)
    source: str  # where the tokenizer comes from, for reports ("SentencePiece model X, trained on ...")

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_id(self, token: str) -> int | None: ...

    def fingerprint(self) -> str: ...


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


class SentencePieceTokenizer:
    """A SentencePiece `.model` file; special ids are read from the model itself."""

    chat_template = None
    tool_use_template = None
    end_of_turn = None

    def __init__(self, path: str, source: str = ""):
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        self.path = path
        self.source = source or f"SentencePiece model {path}"
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise DataError(f"{path}: the SentencePiece model defines no EOS id; SFT needs one")
        # Padding positions are never trained or attended to, so any valid id will do.
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        self.pad_token = self._sp.id_to_piece(self.pad_id) if self._sp.pad_id() >= 0 else None
        self.bos_token = self._sp.id_to_piece(self.bos_id) if self.bos_id is not None else None
        self.eos_token = self._sp.id_to_piece(self.eos_id)

    def __getstate__(self):  # worker processes reload from the file
        return (self.path, self.source)

    def __setstate__(self, state):
        self.__init__(*state)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_id(self, token: str) -> int | None:
        """The id of a single piece (e.g. a special token), or None if the vocabulary lacks it."""
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    def fingerprint(self) -> str:
        return "sp-" + _file_digest(self.path)


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value


# Where `transformers` finds a tokenizer directory's chat template, highest precedence first
# (AutoTokenizer: the .jinja files override tokenizer_config.json; chat_template.json is the older
# processor file). `read_chat_template` follows this order and error messages quote it.
CHAT_TEMPLATE_FILES = (
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/default.jinja",
    "tokenizer_config.json",
)


def _default_template(value) -> str | None:
    """tokenizer_config.json's `chat_template`: a string, or named templates where "default" is used."""
    if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(value, dict):
        value = value.get("default")
    return value if isinstance(value, str) and value else None


def read_chat_template(directory: str) -> str | None:
    """The default chat template of a Hugging Face tokenizer directory, read from the first of
    CHAT_TEMPLATE_FILES that has one; None if none does."""
    for name in CHAT_TEMPLATE_FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            if name.endswith(".jinja"):
                return f.read()
            try:
                template = _default_template(json.load(f).get("chat_template"))
            except (json.JSONDecodeError, AttributeError) as e:
                raise DataError(f"{path}: not a JSON object ({e}); fix or delete the file") from e
        if template:
            return template
    return None


def read_tool_use_template(directory: str) -> str | None:
    """The named `tool_use` template that transformers renders instead of the default one when tools
    are passed: additional_chat_templates/tool_use.jinja, or, in a directory without .jinja templates
    (they replace tokenizer_config.json's), tokenizer_config.json's template named "tool_use"."""
    jinja = os.path.join(directory, "additional_chat_templates", "tool_use.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    extra = os.path.join(directory, "additional_chat_templates")
    has_jinja = os.path.isfile(os.path.join(directory, "chat_template.jinja")) or (
        os.path.isdir(extra) and any(n.endswith(".jinja") for n in os.listdir(extra))
    )
    config = os.path.join(directory, "tokenizer_config.json")
    if has_jinja or not os.path.isfile(config):
        return None
    with open(config, encoding="utf-8") as f:
        try:
            value = json.load(f).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            return None  # read_chat_template names the broken file
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    template = value.get("tool_use") if isinstance(value, dict) else None
    return template if isinstance(template, str) and template else None


def _json_file(path: str, what: str) -> dict:
    """A JSON object file of a tokenizer directory ({} when absent); `what` names it in errors."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{what}: {path} is not valid JSON ({e})") from e


_WARNED: set[str] = set()  # tokenizer files already warned about in this process


class HFTokenizer:
    """A Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json), via `tokenizers`,
    tokenized as `transformers` 5's AutoTokenizer tokenizes it (jsft/data/hf_pipeline.py): for some
    families that is not tokenizer.json as written.

    Special tokens come from tokenizer_config.json and the chat template from where `transformers`
    reads it (`read_chat_template`); without a config, BOS/EOS are looked up among the tokenizer's
    added special tokens by their usual names.
    """

    def __init__(self, path: str, key: str = "config.data.tokenizer"):
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise DataError(f"{key}={path!r}: no tokenizer.json there")
        self.path, self.file, self._key = path, file, key
        config_path = os.path.join(directory, "tokenizer_config.json")
        config = _json_file(config_path, f"{key}={path!r}")
        self.config_path = config_path if config else None
        self._tok, self.transformers_class, self._rebuilt = self._load(directory, config)
        kind = "the checkpoint's tokenizer.json" if key == "config.model.hf_path" else "tokenizer.json"
        self.source = f"{kind} {file} ({key}), tokenized as transformers' {self.transformers_class}"
        self.chat_template = read_chat_template(directory)
        self.tool_use_template = read_tool_use_template(directory)
        # Added tokens marked special (<|im_end|>, <|eot_id|>, ...): where a templated reply can end.
        self.special_tokens = tuple(
            t.content for _, t in sorted(self._tok.get_added_tokens_decoder().items()) if t.special
        )
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        pad_token = _token_text(config.get("pad_token"))
        self.bos_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        if self.eos_token is None:
            self.eos_token = next(
                (
                    t
                    for t in ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")
                    if self._tok.token_to_id(t) is not None
                ),
                None,
            )
        if self.eos_token is None or self._tok.token_to_id(self.eos_token) is None:
            raise DataError(
                f"{key}={path!r}: cannot find the EOS token; set eos_token in tokenizer_config.json"
            )
        self.eos_id = self._tok.token_to_id(self.eos_token)
        pad_id = self._tok.token_to_id(pad_token) if pad_token else None
        self.pad_token = pad_token if pad_id is not None else None
        self.pad_id = pad_id if pad_id is not None else self.eos_id
        self.end_of_turn = None  # HF templates end replies with EOS or a token named by the template

    def _load(self, directory: str, config: dict):
        """(the tokenizer as transformers builds it, its transformers class, whether jsft changed the
        file's pipeline); warns once per file when the two differ or the class is unknown to jsft."""
        from tokenizers import Tokenizer as _Tokenizer  # noqa: PLC0415

        from jsft.data import hf_pipeline  # noqa: PLC0415  (imports tokenizers)

        where = f"{self._key}={self.path!r}"
        try:
            with open(self.file, encoding="utf-8") as f:
                text = f.read()
            tok = _Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise DataError(f"{where}: {self.file} is not a tokenizers JSON file ({e})") from e
        model_config = _json_file(os.path.join(directory, "config.json"), where)
        cls = hf_pipeline.transformers_class(model_config, config, text)
        changed = hf_pipeline.rebuild(tok, cls, config)
        chosen_by = (
            f"model_type {model_config.get('model_type')!r}, tokenizer_class "
            f"{config.get('tokenizer_class') or model_config.get('tokenizer_class')!r}"
        )
        if changed is None and self.file not in _WARNED:
            _WARNED.add(self.file)
            logging.warning(
                "%s: transformers 5 loads this tokenizer as %s (%s), whose pipeline jsft does not "
                "rebuild; jsft reads tokenizer.json as written, so its ids may differ from transformers'",
                self.file,
                cls,
                chosen_by,
            )
        elif changed and self.file not in _WARNED:
            _WARNED.add(self.file)
            example = hf_pipeline.first_difference(_Tokenizer.from_str(text), tok)
            # A warning when the change shows on the probe texts; otherwise it is likely cosmetic.
            logging.log(
                logging.WARNING if example else logging.INFO,
                "%s: transformers 5 loads this tokenizer as %s (%s), which replaces tokenizer.json's %s "
                "with its own; jsft tokenizes as transformers does, so training sees the ids inference "
                "sees (%s)",
                self.file,
                cls,
                chosen_by,
                ", ".join(changed),
                example or "no difference on jsft's probe texts",
            )
        return tok, cls, bool(changed)

    def __getstate__(self):
        return (self.path, self._key)

    def __setstate__(self, state):
        self.__init__(*state)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def fingerprint(self) -> str:
        parts = [_file_digest(self.file)] + ([_file_digest(self.config_path)] if self.config_path else [])
        # The class's own pipeline (chosen by config.json too) decides the ids where jsft rebuilt one.
        return "hf-" + "-".join(parts + ([self.transformers_class] if self._rebuilt else []))


def load_tokenizer(path: str, key: str = "config.data.tokenizer") -> Tokenizer:
    """A `.model` file is SentencePiece; a directory or `.json` file is a Hugging Face tokenizer.

    `key` is the config key that named `path` (errors quote it): config.data.tokenizer, or
    config.model.hf_path when the tokenizer is the checkpoint's own.
    """
    if not os.path.exists(path):
        raise DataError(f"{key}={path!r}: no such file or directory")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            return HFTokenizer(path, key)
        if os.path.exists(os.path.join(path, "tokenizer.model")):  # a SentencePiece-only HF directory
            model = os.path.join(path, "tokenizer.model")
            tok = SentencePieceTokenizer(model, f"SentencePiece model {model} ({key})")
            tok.chat_template = read_chat_template(path)
            tok.tool_use_template = read_tool_use_template(path)
            return tok
        raise DataError(
            f"{key}={path!r}: the directory has neither tokenizer.json (Hugging Face) nor "
            "tokenizer.model (SentencePiece); point it at a directory or file that has one"
        )
    if path.endswith(".model"):
        return SentencePieceTokenizer(path, f"SentencePiece model {path} ({key})")
    if path.endswith(".json"):
        return HFTokenizer(path, key)
    raise DataError(
        f"{key}={path!r}: expected a SentencePiece .model file, a tokenizer.json file or a "
        "Hugging Face tokenizer directory"
    )


def train_sentencepiece(
    texts: Iterable[str], vocab_size: int, path: str, special_tokens: Iterable[str] = ()
) -> SentencePieceTokenizer:
    """Train a BPE model on `texts` and write it to `path` (deterministic for the same texts).

    Digits are split so numbers tokenize one digit at a time, which small models learn far better;
    `special_tokens` (a chat template's markers) stay whole.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a tiny corpus may not support the requested size; take fewer
        split_digits=True,
        byte_fallback=True,  # any UTF-8 text at generation or eval time stays representable
        character_coverage=1.0,
        # Keep text as written (newlines, repeated spaces): chat templates depend on it, and
        # decode(encode(text)) == text makes generated outputs comparable with references.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=list(special_tokens),
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        num_threads=1,  # one thread keeps the merges identical from run to run
        minloglevel=2,
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Per-process temporary name: the processes of a multi-process run train the same model (same
    # data, deterministic) into one workdir; each renames its own complete copy into place.
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, path)  # a crash mid-write never leaves a half tokenizer behind
    return SentencePieceTokenizer(path, trained_source(path))


def trained_source(path: str) -> str:
    """The `source` of a tokenizer `train_sentencepiece` wrote to `path`."""
    return f"SentencePiece model {path}, trained on the training data"
