"""Q-SFT vs SFT vs filtered SFT on subtraction data where most replies are wrong (issue 13's study).

    python -m jsft.study qsft --config configs/qsft_study.py --workdir /tmp/qsft_study \\
        --config.model.hf_path=/tmp/jsft_demo/hf

The base is the demo model's export (configs/demo.py). `data/qsft/`: 70% of the replies add instead
of subtracting (reward 0), 30% are right (reward 1). The study trains plain SFT on all of it, then
Q-SFT starting from that SFT model (its behaviour policy), and SFT on the reward-1 records only (the
reference); `multiturn` repeats SFT and Q-SFT on two-turn chats whose only reward is on the last reply.
Arguments: none (Q-SFT on the single-turn data), `sft`, `filtered`, `multiturn`, `multiturn_sft`.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import demo  # noqa: E402
from jsft.config import REQUIRED  # noqa: E402

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "qsft")
ARGS = (None, "sft", "filtered", "multiturn", "multiturn_sft")


def _source(train: str, val: str) -> ml_collections.ConfigDict:
    return demo.source(os.path.join(DATA_DIR, train), os.path.join(DATA_DIR, val))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = demo.get_config()
    config.model.hf_path = REQUIRED  # the demo's export (or, for Q-SFT, the SFT run's export)
    config.data.sources = ml_collections.ConfigDict({"qsft": _source("train.jsonl", "val.jsonl")})
    config.data.seq_len = 64
    config.data.batch_size = 16
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 20
    config.train.steps = 300
    config.train.eval_every_steps = 100
    config.train.checkpoint_every_steps = 100
    config.eval.tasks = ml_collections.ConfigDict()
    config.eval.exact_match_examples = 200
    config.loss.objective = "qsft"
    config.loss.qsft_gamma = 1.0
    config.loss.qsft_polyak = 0.05
    if arg in ("multiturn", "multiturn_sft"):
        config.data.sources.qsft = _source("multiturn.jsonl", "val_chat.jsonl")
    if arg in ("sft", "multiturn_sft"):
        config.loss.objective = "ce"
    elif arg == "filtered":
        config.loss.objective = "ce"
        config.data.sources.qsft = _source("train_filtered.jsonl", "val.jsonl")
    elif arg not in (None, "multiturn"):
        raise ValueError(f"configs/qsft_study.py: unknown argument {arg!r} (known: {ARGS[1:]})")
    return config
