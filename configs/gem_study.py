"""GEM vs cross-entropy on prompts with many correct answers (issue 13's study; BUILD_NOTES.md).

    python -m jsft.main --config configs/demo.py --workdir /tmp/jsft_demo       # the base, then export:
    python -m jsft.main --config configs/demo.py --workdir /tmp/jsft_demo --mode export \\
        --export_dir /tmp/jsft_demo/hf --export_dtype float32
    python -m jsft.study gem --config configs/gem_study.py --workdir /tmp/gem_study \\
        --config.model.hf_path=/tmp/jsft_demo/hf

The demo model is fine-tuned on `data/gem/` (48 prompts, 3 answers each, many epochs) with GEM
(default: beta 0.7, h = log_sigmoid, as the paper's scripts) or, with `:ce`, plain cross-entropy;
`jsft.study gem` runs both and samples 16 answers per held-out prompt at temperature 1.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import demo  # noqa: E402
from jsft.config import REQUIRED  # noqa: E402

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "gem")
ARGS = (None, "ce")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = demo.get_config()
    config.model.hf_path = REQUIRED  # the demo's export
    config.data.sources = ml_collections.ConfigDict(
        {"gem": demo.source(os.path.join(DATA_DIR, "train.jsonl"), os.path.join(DATA_DIR, "val.jsonl"))}
    )
    config.data.seq_len = 64
    config.data.batch_size = 4  # ~30 examples a step: 400 steps are ~80 epochs of the 144 records
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 20
    config.train.steps = 400
    config.train.eval_every_steps = 100
    config.train.checkpoint_every_steps = 100
    config.train.best_metric = "eval/loss"
    config.train.best_mode = "min"
    config.eval.exact_match_examples = 0  # many answers are right: the study checks validity instead
    config.eval.tasks = ml_collections.ConfigDict()
    config.loss.objective = "gem"
    config.loss.gem_beta = 0.7
    config.loss.gem_h = "log_sigmoid"
    config.study = ml_collections.ConfigDict(
        dict(prompts=os.path.normpath(os.path.join(DATA_DIR, "prompts.jsonl")), samples=16, temperature=1.0)
    )
    if arg == "ce":
        config.loss.objective = "ce"
    elif arg:
        raise ValueError(f"configs/gem_study.py: unknown argument {arg!r} (known: 'ce')")
    return config
