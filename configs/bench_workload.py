"""The shared peer benchmark's workload (../shared/bench/WORKLOAD.md) as a jsft config.

    python ../shared/bench/make_data.py                     # writes $BENCH_DATA (/tmp/jsft-bench/data)
    python -m jsft.bench train --config configs/bench_workload.py --compare torch
    python -m jsft.bench train --config configs/bench_workload.py:llama1b --rows synthetic   # GPU/TPU

A 7.34M-parameter Llama (vocab 8192, width 256, 4 layers, GQA 4/2 heads of 64, MLP 768, untied), fp32,
initial weights from `$BENCH_DATA/init`; packed rows of 512 tokens, 8 per step, no accumulation;
AdamW lr 1e-4 constant, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on matrices, clip 1.0; loss =
mean cross-entropy over the completion tokens of the batch. `jsft.bench train` feeds the workload's
own rows in order. As a training config (`python -m jsft.main`) it needs a data source
(`--config.data.sources.sft.path=...`, with a tokenizer: the workload ships none).
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import demo  # noqa: E402
from jsft.config import REQUIRED  # noqa: E402

ARGS = (None, "llama1b")
BENCH_DATA = os.environ.get("BENCH_DATA", "/tmp/jsft-bench/data")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in ARGS:
        raise ValueError(f"configs/bench_workload.py: unknown argument {arg!r} (known: 'llama1b')")
    config = demo.get_config()
    config.model.hf_path = os.path.join(BENCH_DATA, "init")
    config.data.sources = ml_collections.ConfigDict({"sft": demo.source(REQUIRED, val_fraction=0.02)})
    config.data.tokenizer = REQUIRED  # the workload is pre-tokenized and ships no tokenizer
    config.data.seq_len = 512
    config.data.batch_size = 8
    config.optim.update(
        lr=1e-4,
        warmup_steps=0,
        decay="constant",
        final_lr_ratio=1.0,
        weight_decay=0.01,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        clip_norm=1.0,
        grad_accum_steps=1,
    )
    config.loss.normalization = "token"
    config.train.steps = 60
    config.train.eval_every_steps = 20
    config.train.checkpoint_every_steps = 20
    config.train.best_metric = "eval/loss"
    config.train.best_mode = "min"
    config.eval.tasks = ml_collections.ConfigDict()
    config.eval.exact_match_examples = 0
    config.bench = ml_collections.ConfigDict({"data_dir": BENCH_DATA})
    if arg == "llama1b":  # the accelerator check: Llama 3.2 1B shapes, 4096-token packed rows, bf16 compute
        config.model.hf_path = ""
        config.model.update(
            vocab_size=128256,
            d_model=2048,
            n_layers=16,
            n_heads=32,
            n_kv_heads=8,
            head_dim=64,
            mlp_dim=8192,
            rope_theta=500000.0,
            tie_embeddings=True,
            compute_dtype="bfloat16",
            remat="dots_no_batch",
        )
        config.data.seq_len, config.data.batch_size = 4096, 8
        config.loss.chunk_len = 512
        config.model.attention_chunk = 512
    return config
