"""Import: a Hugging Face safetensors checkpoint as jsft params, tensor by tensor, each placed
straight into its sharding."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsft.interop.hf_config import UnsupportedCheckpoint
from jsft.interop.hf_files import weight_files
from jsft.interop.hf_keys import FUSED, Spec, checkpoint_layout, get_path, set_path, specs
from jsft.models.llama import LlamaConfig


def load_params(
    directory: str,
    cfg: LlamaConfig,
    shardings: Mapping[str, Any] | None = None,
    dtype: str | None = None,
    on_leaf: Callable[[tuple, jax.Array], dict[str, jax.Array]] | None = None,
) -> dict:
    """jsft params from a HF safetensors checkpoint, one tensor at a time, each placed straight into
    its sharding (when given). Every tensor in the checkpoint must be used; extra ones are refused.
    `on_leaf(path, array)`, when given, sees each parameter as soon as it is loaded and returns the
    leaves to keep in its place ({name: array} under the same parent; e.g. QLoRA's codes and scales),
    so only one float parameter exists beside what was kept."""
    from safetensors import safe_open  # noqa: PLC0415

    files = weight_files(directory)
    rename, unread = checkpoint_layout(files)
    handles: dict[str, object] = {}

    def tensor(name: str) -> np.ndarray:
        name = rename(name)
        if name not in files:
            raise UnsupportedCheckpoint(f"{directory}: tensor {name!r} is missing")
        path = files[name]
        if path not in handles:
            handles[path] = safe_open(path, "numpy")
        return handles[path].get_tensor(name)

    dtype = jnp.dtype(dtype or cfg.param_dtype)
    params: dict = {}
    used = set()
    # Mixtral's experts as transformers writes them (block_sparse_moe.*), transformers' in-memory fused
    # experts (either family), else one tensor per expert under mlp.* (Qwen3-MoE).
    layout = "block_sparse_moe" if any(".block_sparse_moe." in k for k in files) else "mlp"
    if any(k.endswith(".experts.gate_up_proj") for k in files):
        layout = FUSED
    for spec in specs(cfg, layout):
        sharding = get_path(shardings, spec.path) if shardings is not None else None
        if spec.per_layer:
            names = [name for name, _ in spec.tensors(cfg.n_experts)]
            layers = (_one_layer(spec, i, tensor, cfg).astype(dtype) for i in spec.layers)
            value = _stack_layers(layers, sharding)
        else:
            names = [spec.hf]
            value = spec.to_jsft(tensor(spec.hf), cfg).astype(dtype)
            value = jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)
        used.update(rename(n) for n in names)
        kept = on_leaf(spec.path, value) if on_leaf is not None else {spec.path[-1]: value}
        for name, leaf in kept.items():
            set_path(params, (*spec.path[:-1], name), leaf)
    vision = [k for k in files if k.startswith(unread)]
    if vision:
        logging.warning(  # a warning, so it shows: an export of this model will have no vision tower
            "%s: an image-text checkpoint; its language model is imported, its vision tower and projector "
            "(%d tensors) are not",
            directory,
            len(vision),
        )
    extra = sorted(
        k
        for k in files
        if k not in used and not k.endswith("rotary_emb.inv_freq") and not k.startswith(unread)
    )
    if cfg.tie_embeddings and rename("lm_head.weight") in extra:
        extra.remove(rename("lm_head.weight"))  # some tied checkpoints store the shared matrix twice
    if extra:
        raise UnsupportedCheckpoint(
            f"{directory}: tensors jsft would ignore (they change the model): "
            f"{extra[:8]}{' ...' if len(extra) > 8 else ''}"
        )
    return params


def _one_layer(spec: Spec, i: int, tensor: Callable, cfg: LlamaConfig) -> np.ndarray:
    """HF layer `i` of a stacked parameter in jsft layout ([E, ...]: its experts' tensors stacked)."""
    if not spec.per_expert:
        return spec.to_jsft(tensor(spec.hf.format(i=i)), cfg)
    return np.stack([spec.to_jsft(tensor(spec.hf.format(i=i, e=e)), cfg) for e in range(cfg.n_experts)])


def _stack_layers(layers, sharding) -> jax.Array:
    """[L, ...] from per-layer host arrays. With a sharding whose layer axis is not split, each layer
    goes to the devices as it is read (one layer on the host at a time) and is stacked there."""
    if sharding is None or sharding.spec[:1] not in ((), (None,)):
        stacked = np.stack(list(layers))
        return jax.device_put(stacked, sharding) if sharding is not None else jnp.asarray(stacked)
    per_layer = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    placed = [jax.device_put(layer, per_layer) for layer in layers]
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*placed)
