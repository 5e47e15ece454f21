"""Full fine-tuning of a Llama 3 8B-shaped model: FSDP over one 8-GPU node or a TPU v5p-64 slice.

    python -m jsft.main --config configs/llama3_8b_sft.py --mode plan               # 8 x H100/H200
    python -m jsft.main --config configs/llama3_8b_sft.py:v5p-64 --mode plan        # 32 v5p chips
    python -m jsft.main --config configs/llama3_8b_sft.py --workdir gs://bucket/run \\
        --config.model.hf_path=/models/Meta-Llama-3-8B-Instruct --config.data.sources.sft.path=/data/sft.jsonl

A fine-tune of a Llama 3 8B checkpoint (`model.hf_path`, required: a local directory or a hub id in the
Hugging Face cache) on one chat or prompt/response data set (`data.sources.sft.path`, required), with
1% of it held out for validation; the best checkpoint is kept by validation loss. The weights, the
architecture and the tokenizer come from `hf_path`; the shapes below are those of the public Llama 3
8B (vocab 128,256; 32 layers; width 4096; GQA 32/8 heads; MLP 14,336; RoPE base 500,000) and are used
by `--mode plan`, which needs no checkpoint. Parameters and AdamW moments in float32, compute in
bfloat16, full remat.
"""

import os
import sys

import ml_collections

# Configs are loaded by path; make their sibling modules importable from any working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import demo  # noqa: E402
from jsft.config import REQUIRED  # noqa: E402
from jsft.models.llama import LlamaConfig  # noqa: E402

MESHES = {
    "gpu8": dict(shape=(1, 8, 1), dcn_shape=(1, 1, 1), batch_size=32, grad_accum_steps=4),
    "gpu1": dict(shape=(1, 1, 1), dcn_shape=(1, 1, 1), batch_size=8, grad_accum_steps=8),
    "v5e-8": dict(shape=(1, 8, 1), dcn_shape=(1, 1, 1), batch_size=16, grad_accum_steps=2),
    "v5p-64": dict(shape=(1, 32, 1), dcn_shape=(1, 1, 1), batch_size=64, grad_accum_steps=2),
}
MODEL = LlamaConfig.llama3_8b().shape_fields()
ARGS = (None, *MESHES)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return large_model_config(MODEL, MESHES, arg or "gpu8")


def large_model_config(model: dict, meshes: dict, name: str) -> ml_collections.ConfigDict:
    """The demo config with a large model from a checkpoint, a named mesh and SFT-scale data settings."""
    if name not in meshes:
        raise ValueError(f"unknown mesh {name!r}; known: {sorted(meshes)}")
    config = demo.get_config()
    config.model.hf_path = REQUIRED
    config.data.sources = ml_collections.ConfigDict({"sft": demo.source(REQUIRED, val_fraction=0.01)})
    config.data.tokenizer = ""  # the checkpoint's own
    config.data.template = "llama3"
    config.data.seq_len = 4096
    config.model.update(model)
    config.model.compute_dtype = "bfloat16"
    config.model.remat = "full"
    mesh = meshes[name]
    config.mesh.shape, config.mesh.dcn_shape = mesh["shape"], mesh["dcn_shape"]
    config.data.batch_size = mesh["batch_size"]
    config.optim.grad_accum_steps = mesh["grad_accum_steps"]
    config.optim.lr = 1e-5
    config.optim.warmup_steps = 100
    config.optim.weight_decay = 0.0
    config.train.steps = 2000
    config.train.eval_every_steps = 500
    config.train.checkpoint_every_steps = 500
    config.train.best_metric = "eval/loss"
    config.train.best_mode = "min"
    config.eval.at_start = False
    config.eval.batch_size = mesh["batch_size"]
    config.eval.max_new_tokens = 256
    config.eval.exact_match_examples = 64  # greedy answers to held-out prompts, in samples/
    config.eval.tasks = ml_collections.ConfigDict()  # add benchmark tasks here (see configs/demo.py)
    return config
