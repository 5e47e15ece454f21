"""A config for tests: the demo config shrunk to a model and data that step in milliseconds.

    python -m jsft.main --config tests/tiny_config.py:DATA_DIR --workdir DIR

DATA_DIR holds train.jsonl and val.jsonl (the `tiny_data_dir` fixture writes them).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from configs import demo  # noqa: E402


def get_config(data_dir: str):
    config = demo.get_config("smoke")
    config.data.sources.demo = demo.source(
        os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, "val.jsonl")
    )
    config.data.pack_chunk_examples = 64
    config.data.vocab_size = 300
    config.data.seq_len = 32
    config.data.batch_size = 4
    config.model.d_model = 32
    config.model.n_layers = 2
    config.model.n_heads = 4
    config.model.n_kv_heads = 2
    config.model.head_dim = 8
    config.model.mlp_dim = 64
    config.eval.batch_size = 4
    config.eval.exact_match_examples = 4
    config.eval.max_new_tokens = 6
    return config
