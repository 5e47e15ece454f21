"""Export: jsft params as a Hugging Face model directory, gathered and written one tensor at a time.

Every HF tensor's name, shape and dtype follows from the params' shapes and the key specs, so the
safetensors files are planned before any data moves. Then, tensor by tensor, a jitted function
computes it in HF layout and the export dtype with a replicated output: only that tensor is gathered,
from whichever devices and processes hold its pieces, and process 0 appends its bytes to the open
file. No host ever holds more than one tensor, so a model larger than any host's memory exports from a
multi-host run. Every process must call `save_pretrained` (each gather is a collective); only process 0
writes, into a staging directory that is renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jsft.interop.hf_config import config_to_hf
from jsft.interop.hf_files import copy_tokenizer_files, publish, staging_dir, write_json
from jsft.interop.hf_keys import FAMILY_MOE_LAYOUT, Spec, get_path, specs
from jsft.interop.safetensors_writer import SafetensorsWriter, TensorInfo
from jsft.models.llama import LlamaConfig
from jsft.parallel import multihost


@dataclasses.dataclass(frozen=True)
class ExportTensor:
    """One HF tensor of an export: what it is (`info`) and where it comes from (`spec`, `index`)."""

    info: TensorInfo
    spec: Spec
    index: tuple[int, ...]  # into the stacked parameter: (), (layer,) or (layer, expert)
    layout: str = "mlp"  # the MoE key layout of hf_keys.specs


def export_plan(params: dict, cfg: LlamaConfig, dtype: str, family: str = "") -> list[ExportTensor]:
    """Every HF tensor of `params` in file order (embeddings, then layer by layer, then the final norm
    and head, as transformers orders them), from shapes alone: nothing is computed or moved."""
    dtype = jnp.dtype(dtype).name
    layout = FAMILY_MOE_LAYOUT.get(family, "mlp")
    first, layered, last = [], [], []
    for spec in specs(cfg, layout):
        leaf = get_path(params, spec.path)
        one = jax.ShapeDtypeStruct(leaf.shape[spec.per_layer + spec.per_expert :], leaf.dtype)
        shape = tuple(jax.eval_shape(lambda x, s=spec: s.to_hf(x, cfg), one).shape)
        for name, index in spec.tensors(cfg.n_experts):
            item = ExportTensor(TensorInfo(name, dtype, shape), spec, index, layout)
            if spec.per_layer:
                layered.append((spec.layers[index[0]], len(layered), item))
            else:
                (first if spec.path == ("embed",) else last).append(item)
    return first + [item for *_, item in sorted(layered, key=lambda x: x[:2])] + last


def _replicated(spec: Spec, leaf) -> jax.sharding.Sharding | None:
    """Where a gathered tensor goes: every device of the leaf's mesh (so each process holds a copy)."""
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    if sharding is None or sharding.is_fully_addressable:
        return None  # host or single-process arrays: XLA's default placement is fetchable
    raise ValueError(f"{'/'.join(spec.path)}: export needs params with a NamedSharding, got {sharding}")


@functools.lru_cache(maxsize=512)
def _gather_fn(
    path: tuple,
    hf_name: str,
    layout: str,
    cfg: LlamaConfig,
    dtype: str,
    replicated: jax.sharding.Sharding | None,
):
    """jit of (leaf, *index) -> one HF tensor of the spec (`path`, `hf_name`) in HF layout and
    `dtype`, placed `replicated`; cached, so exporting again (or another model of the same shapes)
    does not trace again."""
    spec = next(s for s in specs(cfg, layout) if (s.path, s.hf) == (path, hf_name))

    def one(x, *index):
        for i in index:  # a layer, then an expert
            x = jax.lax.dynamic_index_in_dim(x, i, keepdims=False)
        # cast before the layout change: the gather then moves export-dtype bytes (exact either way)
        return spec.to_hf(x.astype(dtype), cfg)

    return jax.jit(one, out_shardings=replicated)


def hf_arrays(
    params: dict, cfg: LlamaConfig, dtype: str, plan: list[ExportTensor] | None = None
) -> Iterator[tuple[TensorInfo, jax.Array]]:
    """(info, tensor) for every HF tensor in plan order, each computed when asked for and replicated.
    Every process must iterate it to the end, in step (each tensor is a collective)."""
    plan = export_plan(params, cfg, dtype) if plan is None else plan
    for item in plan:
        spec = item.spec
        leaf = get_path(params, spec.path)
        gather = _gather_fn(spec.path, spec.hf, item.layout, cfg, item.info.dtype, _replicated(spec, leaf))
        yield item.info, gather(leaf, *(np.int32(i) for i in item.index))


def host_copy(value: jax.Array | np.ndarray) -> np.ndarray:
    """This process's copy of a replicated tensor: one device's buffer, never a sharded tree."""
    if isinstance(value, jax.Array) and value.is_fully_replicated:
        return np.asarray(value.addressable_data(0))
    return np.asarray(value)


def hf_tensors(params: dict, cfg: LlamaConfig, dtype: str, family: str = "") -> dict[str, np.ndarray]:
    """Every HF-named tensor on this host at once (small models and tests; exports stream instead)."""
    plan = export_plan(params, cfg, dtype, family)
    return {info.name: np.array(host_copy(value)) for info, value in hf_arrays(params, cfg, dtype, plan)}


def save_pretrained(
    out_dir: str,
    params: dict,
    cfg: LlamaConfig,
    family: str,
    dtype: str = "float32",
    bos_id: int | None = None,
    eos_id: int | list[int] = 0,
    max_shard_bytes: int = 2 * 1024**3,
    tokenizer_dir: str | None = None,
    pad_id: int | None = None,
    max_position_embeddings: int = 8192,
    generation_config: dict | None = None,
) -> list[str]:
    """Write `params` to `out_dir` as a Hugging Face model: safetensors files of at most
    `max_shard_bytes` each (with `model.safetensors.index.json` when there are several), config.json,
    generation_config.json (`generation_config` as given, else one from the ids) and the tokenizer
    files of `tokenizer_dir`. Call it on every process; process 0 writes and returns the file names,
    the others return []. `params` may be sharded over any mesh, across processes."""
    config = config_to_hf(cfg, family, dtype, bos_id, eos_id, pad_id, max_position_embeddings)
    if generation_config is None:
        generation_config = {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": False}
        if pad_id is not None:
            generation_config["pad_token_id"] = pad_id
    writes = jax.process_index() == 0
    staging = staging_dir(out_dir) if writes else ""
    files = []
    try:
        files = _write_weights(staging if writes else None, params, cfg, dtype, max_shard_bytes, family)
        if writes:
            write_json(os.path.join(staging, "generation_config.json"), generation_config)
            files.append("generation_config.json")
            if tokenizer_dir:
                files += copy_tokenizer_files(tokenizer_dir, staging)
            write_json(os.path.join(staging, "config.json"), config)  # last: what makes the directory a model
            files.append("config.json")
            publish(staging, out_dir)
    except BaseException:
        if writes:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    multihost.barrier("jsft_hf_export")
    return files


def _write_weights(
    directory: str | None, params: dict, cfg: LlamaConfig, dtype: str, max_file_bytes: int, family: str
):
    """Gather every tensor (on every process) and write them into `directory` (None: gather only)."""
    plan = export_plan(params, cfg, dtype, family)
    infos = [item.info for item in plan]
    with SafetensorsWriter(directory, infos, max_file_bytes) if directory else contextlib.nullcontext() as w:
        for info, value in hf_arrays(params, cfg, dtype, plan):
            if w is not None:
                w.write(info.name, host_copy(value))
            del value  # before the next gather: one tensor on the devices at a time
    return w.files_written if w is not None else []
