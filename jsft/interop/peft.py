"""Hugging Face PEFT LoRA adapter directories in and out.

A directory holds `adapter_config.json` and `adapter_model.safetensors` with one pair of matrices per
layer and target, named as PEFT names them for a causal LM:

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight    [r, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight    [out, r]

jsft keeps A [L, in..., r] and B [L, r, out...] (heads split out, layers stacked), so the conversion
is a reshape and a transpose per layer, exact in float32. `peft.PeftModel.from_pretrained(base, dir)`
loads what `save_adapter` writes (tested against peft itself), and `load_adapter` reads what peft saves.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsft.interop.hf_files import publish, staging_dir, write_json
from jsft.interop.hf_save import host_copy
from jsft.models import lora
from jsft.models.llama import LlamaConfig
from jsft.parallel import multihost

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _key(layer: int, path: str, which: str) -> str:
    return f"base_model.model.model.layers.{layer}.{lora.PROJECTIONS[path][1]}.lora_{which}.weight"


def read_adapter_config(directory: str) -> dict[str, Any]:
    """{rank, alpha, rslora, dropout, targets (projection paths)} of a PEFT LoRA directory;
    ValueError naming the field for what jsft's LoRA does not do (DoRA, per-module ranks, ...)."""
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"config.peft.adapter={directory!r}: cannot read {CONFIG_FILE}: {e}") from e
    where = f"config.peft.adapter={directory!r} ({CONFIG_FILE})"
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {cfg.get('peft_type')!r}; jsft loads LORA adapters only")
    for field in ("use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"):
        if cfg.get(field):
            raise ValueError(f"{where}: {field}={cfg[field]!r} is not supported by jsft's LoRA")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={cfg['bias']!r}; jsft's LoRA trains no biases")
    modules = cfg.get("target_modules") or []
    if isinstance(modules, str):  # PEFT: a regex fully matched against module names
        targets = tuple(
            p
            for p, (_, hf_name, _) in lora.PROJECTIONS.items()
            if re.fullmatch(modules, f"model.layers.0.{hf_name}")
        )
    else:
        targets = lora.parse_targets(",".join(m.split(".")[-1] for m in modules))
    if not targets:
        raise ValueError(f"{where}: target_modules={modules!r} names no linear projection of the layers")
    return {
        "rank": int(cfg["r"]),
        "alpha": float(cfg.get("lora_alpha", 8)),
        "rslora": bool(cfg.get("use_rslora", False)),
        "dropout": float(cfg.get("lora_dropout", 0.0)),
        "targets": targets,
    }


def _adapters(params: dict, cfg: LlamaConfig):
    """(path, A [L, in..., r], B [L, r, out...]) of every target."""
    for path in cfg.lora_targets:
        group, name = path.split(".")
        parent = params["layers"][group]
        yield path, parent[name + "_lora_a"], parent[name + "_lora_b"]


def save_adapter(
    directory: str, params: dict, cfg: LlamaConfig, base_model: str, rslora: bool, alpha: float
) -> list[str]:
    """Write the adapters of `params` as a PEFT LoRA directory; every process calls it, process 0
    writes (adapters are small: each is gathered whole)."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    tensors: dict[str, np.ndarray] = {}
    for path, a, b in _adapters(params, cfg):
        whole = jax.jit(lambda x: x, out_shardings=_replicated(a))
        a_host, b_host = host_copy(whole(a)), host_copy(whole(b))
        r = a_host.shape[-1]
        for i in range(cfg.n_layers):
            tensors[_key(i, path, "A")] = np.ascontiguousarray(a_host[i].reshape(-1, r).T, np.float32)
            tensors[_key(i, path, "B")] = np.ascontiguousarray(b_host[i].reshape(r, -1).T, np.float32)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.lora_rank,
        "lora_alpha": alpha,
        "lora_dropout": cfg.lora_dropout,
        "use_rslora": rslora,
        "target_modules": sorted(lora.PROJECTIONS[p][1].split(".")[-1] for p in cfg.lora_targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    files = []
    if jax.process_index() == 0:
        staging = staging_dir(directory)
        save_file(tensors, os.path.join(staging, WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(os.path.join(staging, CONFIG_FILE), config)
        publish(staging, directory)
        files = [WEIGHTS_FILE, CONFIG_FILE]
    multihost.barrier("jsft_peft_export")
    return files


def _replicated(x: jax.Array) -> jax.sharding.Sharding | None:
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return None


def load_adapter(
    directory: str, params: dict, cfg: LlamaConfig, shardings: Mapping[str, Any] | None = None
) -> dict:
    """`params` with their adapters replaced by those of a PEFT directory (placed in `shardings`, the
    params' shardings, when given). ValueError naming the tensor for a missing or misshapen one."""
    from safetensors import safe_open  # noqa: PLC0415

    weights = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.exists(weights):
        raise ValueError(
            f"config.peft.adapter={directory!r}: no {WEIGHTS_FILE} (only safetensors adapters load)"
        )
    out = jax.tree.map(lambda x: x, params)
    with safe_open(weights, "numpy") as f:
        names = set(f.keys())
        for path, a, b in _adapters(out, cfg):
            group, name = path.split(".")
            loaded = {}
            for which, like in (("A", a), ("B", b)):
                layers = []
                for i in range(cfg.n_layers):
                    key = _key(i, path, which)
                    if key not in names:
                        raise ValueError(f"config.peft.adapter={directory!r}: tensor {key!r} is missing")
                    t = f.get_tensor(key).astype(np.float32)
                    inner = like.shape[1:]  # A: (in..., r); B: (r, out...)
                    expected = (
                        (inner[-1], int(np.prod(inner[:-1])))
                        if which == "A"
                        else (int(np.prod(inner[1:])), inner[0])
                    )
                    if t.shape != expected:
                        raise ValueError(
                            f"config.peft.adapter={directory!r}: {key} has shape {t.shape}, "
                            "which does not fit "
                            f"this model's layers.{path} (expected {expected})"
                        )
                    layers.append(t.T.reshape(inner))
                stacked = np.stack(layers)
                sharding = shardings["layers"][group][f"{name}_lora_{which.lower()}"] if shardings else None
                loaded[which] = (
                    jax.device_put(stacked, sharding) if sharding is not None else jnp.asarray(stacked)
                )
            out["layers"][group][name + "_lora_a"] = loaded["A"]
            out["layers"][group][name + "_lora_b"] = loaded["B"]
    return out
