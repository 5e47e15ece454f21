"""Supervised fine-tuning of a local Hugging Face checkpoint (Llama, Mistral, Qwen2/3, Gemma 2/3).

    python -m jsft.main --config configs/hf_sft.py --workdir workdirs/qwen_sft \\
        --config.model.hf_path=/models/Qwen2.5-0.5B-Instruct \\
        --config.data.sources.sft.path=/data/train.jsonl --config.data.sources.sft.val_fraction=0.02
    python -m jsft.main --config configs/hf_sft.py --workdir workdirs/qwen_sft --mode export \\
        --config.model.hf_path=/models/Qwen2.5-0.5B-Instruct --export_dir workdirs/qwen_sft/hf

The architecture, weights, tokenizer and chat template all come from `model.hf_path` (override the
tokenizer with `data.tokenizer`, the template with `data.template`). `:cpu` shrinks batch and length
for a laptop.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import demo  # noqa: E402
from jsft.config import REQUIRED  # noqa: E402

ARGS = (None, "cpu")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = demo.get_config()
    config.model.hf_path = REQUIRED  # a local HF directory or a hub id in the HF cache
    config.model.param_dtype = "float32"
    config.model.compute_dtype = "bfloat16"
    config.model.remat = "full"
    config.data.sources = ml_collections.ConfigDict({"sft": demo.source(REQUIRED, val_fraction=0.02)})
    config.data.template = "hf"  # the checkpoint's own chat template
    config.data.seq_len = 2048
    config.data.batch_size = 16
    config.optim.lr = 2e-5
    config.optim.warmup_steps = 50
    config.optim.weight_decay = 0.0
    config.optim.final_lr_ratio = 0.0
    config.train.steps = 1000
    config.train.eval_every_steps = 200
    config.train.checkpoint_every_steps = 200
    config.eval.at_start = True
    config.eval.max_new_tokens = 256
    config.eval.batch_size = 16
    config.eval.exact_match_examples = 64
    config.eval.tasks = ml_collections.ConfigDict()  # add benchmark tasks here (see configs/demo.py)
    config.train.best_metric = "eval/loss"
    config.train.best_mode = "min"
    if arg == "cpu":
        config.model.compute_dtype = "float32"
        config.data.seq_len, config.data.batch_size = 512, 4
        config.eval.batch_size, config.eval.max_new_tokens = 4, 64
    elif arg:
        raise ValueError(f"configs/hf_sft.py: unknown argument {arg!r} (known: 'cpu')")
    return config
