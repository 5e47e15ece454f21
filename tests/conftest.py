"""Shared fixtures: tiny data, a tiny tokenizer and a tiny config, all built on the spot."""

from __future__ import annotations

import json
import os
import random
import tempfile

import pytest

# One persistent XLA compilation cache for this test session, inherited by every subprocess run: the
# many tiny runs compile the same steps, and a cached executable is the same program (same results).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jsft-test-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def make_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 5)))
        out.append({"prompt": f"upper: {' '.join(w)}", "response": " ".join(w.upper())})
    return out


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
