"""Full fine-tuning of a Llama 3 70B-shaped model: FSDP over a TPU v5p-128 slice or 4 nodes of 8 H200s.

    python -m jsft.main --config configs/llama3_70b_sft.py --mode plan              # 4 x 8 H200 (DCN 4)
    python -m jsft.main --config configs/llama3_70b_sft.py:v5p-128 --mode plan     # 64 v5p chips

Shapes are those of the public Llama 3 70B (80 layers; width 8192; GQA 64/8 heads; MLP 28,672).
Parameters and AdamW moments in bfloat16 would halve the state; this config keeps float32 and shards it
over more devices instead.
"""

import os
import sys

import ml_collections

# Configs are loaded by path; make their sibling modules importable from any working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs.llama3_8b_sft import large_model_config  # noqa: E402
from jsft.models.llama import LlamaConfig  # noqa: E402

MESHES = {
    "gpu8x4": dict(shape=(1, 32, 1), dcn_shape=(1, 4, 1), batch_size=32, grad_accum_steps=1),
    "v5p-128": dict(shape=(1, 64, 1), dcn_shape=(1, 1, 1), batch_size=64, grad_accum_steps=1),
    "gpu1": dict(shape=(1, 1, 1), dcn_shape=(1, 1, 1), batch_size=8, grad_accum_steps=8),
}
MODEL = LlamaConfig.llama3_70b().shape_fields()
ARGS = (None, *MESHES)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return large_model_config(MODEL, MESHES, arg or "gpu8x4")
