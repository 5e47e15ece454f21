"""LoRA on the CPU in a few minutes: the demo model (configs/demo.py) learns two new tasks.

    python -m jsft.main --config configs/demo.py --workdir /tmp/jsft_demo
    python -m jsft.main --config configs/demo.py --workdir /tmp/jsft_demo --mode export \\
        --export_dir /tmp/jsft_demo/hf --export_dtype float32
    python -m jsft.main --config configs/demo_lora.py --workdir /tmp/jsft_lora \\
        --config.model.hf_path=/tmp/jsft_demo/hf

The base (weights and tokenizer) is the demo's export; `data/demo_lora/` holds `rotate` (the first
letter moves to the end) and `double` (every letter twice), which the demo never saw, so exact match
starts near 0. Only the adapters train (rank 8 on every projection: 77,824 parameters, 8.6% of the
model's 901,248); the
checkpoints hold them and the base's identity. `:qlora` stores the base in NF4. Afterwards:

    --mode export --export_dir DIR                    # the merged model, a plain HF directory
    --mode export --export_adapter --export_dir DIR   # a PEFT adapter for the base (peft loads it)
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import demo  # noqa: E402
from jsft.config import REQUIRED  # noqa: E402

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "demo_lora")
ARGS = (None, "qlora")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = demo.get_config()
    config.model.hf_path = REQUIRED  # the demo's export (see above)
    config.data.sources = ml_collections.ConfigDict(
        {"lora": demo.source(os.path.join(DATA_DIR, "train.jsonl"), os.path.join(DATA_DIR, "val.jsonl"))}
    )
    config.peft.method = "lora"
    config.peft.rank = 8
    config.peft.alpha = 16.0
    config.peft.targets = "all"
    config.optim.lr = 3e-3
    config.optim.warmup_steps = 20
    config.optim.weight_decay = 0.0
    config.train.steps = 300
    config.train.eval_every_steps = 100
    config.train.checkpoint_every_steps = 100
    config.eval.tasks = ml_collections.ConfigDict()  # exact match on the held-out split is the measure
    config.train.best_metric = "eval/exact_match"
    if arg == "qlora":
        config.peft.method = "qlora"
        config.peft.quant = "nf4"
    elif arg:
        raise ValueError(f"configs/demo_lora.py: unknown argument {arg!r} (known: 'qlora')")
    return config
