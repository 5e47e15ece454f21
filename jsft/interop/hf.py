"""Hugging Face checkpoints in and out: one import path for the pieces, kept for compatibility.

The work lives in modules of one idea each; this file only re-exports every name it held before the
split, so `from jsft.interop import hf; hf.load_params(...)` keeps working. New code may import from
the modules directly:

- `hf_config`: config.json <-> LlamaConfig, the supported families, `UnsupportedCheckpoint`.
- `hf_keys`: per-family tensor specs (HF name and layout of every jsft parameter).
- `hf_files`: checkpoint directories: Hub ids, checks, weight files, carried fields, publishing.
- `hf_load`: import, safetensors -> params placed into their shardings tensor by tensor.
- `hf_save`: export, params (sharded, multi-process) -> safetensors gathered tensor by tensor.
- `safetensors_writer`: the streaming safetensors writer (files planned from shapes).
- `hf_metadata`: what an export says besides the weights (special ids, generation config); not
  re-exported here.
"""

from __future__ import annotations

from jsft.interop.hf_config import (
    FAMILIES,
    GEMMA_ACTIVATIONS,
    UnsupportedCheckpoint,
    config_from_hf,
    config_to_hf,
)
from jsft.interop.hf_files import (
    HUB_FILES,
    TOKENIZER_FILES,
    check_directory,
    read_config,
    resolve_path,
    source_fields,
)
from jsft.interop.hf_keys import Spec, specs
from jsft.interop.hf_load import load_params
from jsft.interop.hf_save import hf_tensors, save_pretrained

__all__ = [
    "FAMILIES",
    "GEMMA_ACTIVATIONS",
    "HUB_FILES",
    "TOKENIZER_FILES",
    "Spec",
    "UnsupportedCheckpoint",
    "check_directory",
    "config_from_hf",
    "config_to_hf",
    "hf_tensors",
    "load_params",
    "read_config",
    "resolve_path",
    "save_pretrained",
    "source_fields",
    "specs",
]
