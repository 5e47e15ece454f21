"""Shared fixtures: tiny data, a tiny tokenizer and a tiny config, all built on the spot."""

from __future__ import annotations

import json
import os
import random
import socket
import tempfile

import pytest

# One persistent XLA compilation cache for this test session, inherited by every subprocess run: the
# many tiny runs compile the same steps, and a cached executable is the same program (same results).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jsft-test-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The tests' programs are tiny and compiled once: LLVM's optimisations cost more than they save. At
# level 0 a cold (2,2,2)-mesh tiny run used 19.4 s of CPU against 29.9 s, with the same losses
# (BUILD_NOTES, "Test suite time"). Every test process and subprocess compiles this way (`cpu_env`).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def cpu_env(devices: int, **extra: str) -> dict[str, str]:
    """The environment of a subprocess with `devices` simulated CPU devices (and the test session's
    XLA flags, set above), plus `extra` variables."""
    return dict(
        os.environ,
        XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        **extra,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for local multi-process coordinators)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def packed_row(*examples, pad: int = 0):
    """(tokens [1, T], segment ids, positions) of one row packing `examples` (token arrays) one after
    another, then `pad` padding tokens (segment 0, position 0)."""
    import numpy as np  # noqa: PLC0415

    tokens = np.concatenate([*examples, np.zeros(pad, np.int64)])[None]
    segs = np.array([[i + 1 for i, e in enumerate(examples) for _ in e] + [0] * pad])
    pos = np.array([[p for e in examples for p in range(len(e))] + [0] * pad])
    return tokens, segs, pos


def make_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 5)))
        out.append({"prompt": f"upper: {' '.join(w)}", "response": " ".join(w.upper())})
    return out


def save_chatml_bpe_tokenizer(directory, extra_special_tokens=()) -> None:
    """A small byte-level BPE `tokenizer.json` trained on the test records, with ChatML's special
    tokens (and `extra_special_tokens`) and a `tokenizer_config.json` holding the ChatML template:
    the tokenizer files of the tiny Hugging Face checkpoints the tests save with transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    from tests.data.test_templates import CHATML_JINJA  # noqa: PLC0415

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [r["prompt"] + " " + r["response"] for r in make_records(300, 0)] + ["system user assistant"]
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra_special_tokens]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": CHATML_JINJA,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_data")
    write_jsonl(d / "train.jsonl", make_records(400, 0))
    write_jsonl(d / "val.jsonl", make_records(24, 1))
    return d


@pytest.fixture
def tiny_config(tiny_data_dir):
    from tests import tiny_config as tiny  # noqa: PLC0415

    return tiny.get_config(str(tiny_data_dir))


def pytest_collection_modifyitems(config, items):
    """The slow (end-to-end, multi-second) tests first, in their collected order: under pytest-xdist
    the workers then finish together instead of one running a long test while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
