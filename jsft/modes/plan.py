"""The memory planner: per-device bytes of a config's train step on its mesh, without the model.

`python -m jsft.main --config CFG --mode plan --workdir DIR` runs on simulated CPU devices (as many as
the mesh names; main.py sets that up before JAX starts). Parameters, optimizer state and gradients are
counted exactly from their shapes and shardings; activations come from XLA itself: the train step is
lowered and compiled for abstract inputs (`jax.ShapeDtypeStruct`s, never allocated) and
`compiled.memory_analysis()` reports its temporary buffers. XLA's CPU backend fuses differently from
TPU/GPU backends, so the activation figure is an estimate of the same order, not a promise.

Attention: the step is compiled with the kernel the config names on a CPU (`auto` is `flash` there);
a GPU or TPU kernel (pallas_gpu, cudnn, splash) cannot be compiled here, so `flash`, the same
block-at-a-time memory, stands in. The report names the kernel in its figures and the kernels a GPU and
a TPU would run.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jsft.models import attention
from jsft.models.llama import LlamaConfig
from jsft.parallel import sharding
from jsft.parallel.mesh import resolve_shape
from jsft.run import Run
from jsft.train.trainable import count, split

GB = 1e9
ACCELERATOR_KERNELS = ("pallas_gpu", "cudnn", "splash")  # not compiled here: `flash` stands in
# Memory per device (bytes) of accelerators people fine-tune on.
ACCELERATORS = {
    "TPU v5e (16 GB)": 16 * GB,
    "TPU v4 (32 GB)": 32 * GB,
    "TPU v6e (32 GB)": 32 * GB,
    "TPU v5p (95 GB)": 95 * GB,
    "A100 (80 GB)": 80 * GB,
    "H100 (80 GB)": 80 * GB,
    "H200 (141 GB)": 141 * GB,
}


def devices_needed(mesh_cfg: ml_collections.ConfigDict) -> int:
    """Devices the configured mesh names; -1 ("the rest") is refused: a plan needs exact sizes."""
    if -1 in tuple(mesh_cfg.shape):
        raise ValueError(
            f"config.mesh.shape={tuple(mesh_cfg.shape)}: --mode plan needs explicit sizes, no -1"
        )
    return math.prod(resolve_shape(mesh_cfg.shape, math.prod(mesh_cfg.shape))) * mesh_cfg.get("expert", 1)


def simulate_devices(config: ml_collections.ConfigDict) -> None:
    """Before JAX's first use: as many simulated CPU devices as the mesh names, and the shapes from
    the config (a required `model.hf_path` is not needed). ValueError for a mesh with -1."""
    from jsft.config import REQUIRED  # noqa: PLC0415

    if config.model.hf_path == REQUIRED:
        config.model.hf_path = ""
    n = devices_needed(config.mesh)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    jax.config.update("jax_platforms", "cpu")


def per_device_bytes(abstract_tree: Any, shardings_tree: Any) -> int:
    """Bytes one device holds of a sharded pytree (the largest shard of each leaf)."""
    total = 0
    for leaf, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings_tree), strict=True):
        shard_shape = s.shard_shape(leaf.shape)
        total += math.prod(shard_shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def attention_line(asked: str, arch: Any) -> str:
    """Which kernel the figures assume, and what a GPU and a TPU would run (`asked`: the config's
    `model.attention`; `arch`: the planned model's LlamaConfig)."""
    model = dict(dtype=arch.compute_dtype, head_dim=arch.head_dim)
    planned = attention.resolve(arch.attention, arch.attn_softcap, "cpu", bool(arch.layer_windows), **model)
    targets = []
    for platform in ("gpu", "tpu"):
        try:
            kernel = attention.resolve(
                asked, arch.attn_softcap, platform, bool(arch.layer_windows), **model, interpret_ok=False
            )
        except ValueError:
            kernel = "refused"
        targets.append(f"{kernel} on {platform.upper()}s")
    return (
        f"attention: figures with {planned} (compiled for the CPU); model.attention={asked} is "
        + ", ".join(targets)
    )


def _compile_step(run: Run, model, tx, schedule, state, state_sharding):
    """XLA's memory analysis of the train step for abstract inputs (`state`: abstract, sharded)."""
    config, mesh, rules = run.config, run.mesh, run.rules
    batch_sharding = run.batch_sharding
    shape = (config.data.batch_size, config.data.seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding)
        for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions", "source_ids")
    }
    replicated = run.replicated
    step = jax.jit(
        run.train_step(model, tx, schedule),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )
    with sharding.use_rules(mesh, rules):
        return step.lower(state, batch).compile().memory_analysis()


def offloaded_bytes(cfg: LlamaConfig, tokens: int, devices: int) -> int:
    """Per-device bytes that `model.remat=offload` keeps in host memory for one micro-batch of
    `tokens` tokens: the activations save_dots keeps (the projections' outputs but down_proj's, and the
    attention output: tests/models/test_llama.py checks that set), counted from their shapes, spread over
    `devices` (batch over data/fsdp, heads and MLP features over tensor)."""
    heads = 2 * cfg.n_heads * cfg.head_dim + 2 * cfg.n_kv_heads * cfg.head_dim  # q, attention out, k, v
    per_token = heads + cfg.d_model + 2 * cfg.mlp_dim  # + o_proj, gate, up
    total = cfg.n_layers * per_token
    if cfg.n_experts:  # a MoE layer keeps router logits and k rows of expert gate, up and down instead
        sparse = cfg.n_layers - len(cfg.dense_layers)
        moe_per_token = cfg.n_experts + cfg.experts_per_token * (2 * cfg.moe_mlp_dim + cfg.d_model)
        total += sparse * (moe_per_token - 2 * cfg.mlp_dim)
    return total * tokens * jnp.dtype(cfg.compute_dtype).itemsize // devices


def run_plan(
    config: ml_collections.ConfigDict, compile_step: bool = True, plan_rows: dict | None = None
) -> str:
    """Print (and return) the per-device memory table for the config's model, optimizer and mesh.

    `plan_rows`, if given, receives the table's numbers (bytes per device by row name)."""
    plan_rows = {} if plan_rows is None else plan_rows
    start = time.time()
    if not config.model.vocab_size:
        raise ValueError("config.model.vocab_size=0: a plan needs the vocabulary size (no tokenizer is read)")
    asked = config.model.attention
    if asked in ACCELERATOR_KERNELS:
        config = config.copy_and_resolve_references()
        config.model.attention = "flash"
    run = Run.create(config)
    model = run.model(config.model.vocab_size)
    tx, schedule = run.optimizer()
    abstract, state_sharding, dropped = run.state_layout(model, tx)
    mesh = run.mesh

    params = per_device_bytes(abstract.params, state_sharding.params)
    opt = per_device_bytes(abstract.opt_state, state_sharding.opt_state)
    mask = run.trainable_mask(model)
    grads = per_device_bytes(
        jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32), split(abstract.params, mask)[0]),
        split(state_sharding.params, mask)[0],
    )  # accumulated in float32 by the step, for the trainable parameters only
    rows = [("parameters", params), ("optimizer state", opt), ("gradients (float32)", grads)]
    # With accumulation, one micro-batch's gradients exist beside the accumulator until they are added.
    micro = grads if config.optim.grad_accum_steps > 1 else 0
    if micro:
        rows.append(("micro-batch gradients (float32, accumulation)", micro))
    analysis = _compile_step(run, model, tx, schedule, abstract, state_sharding) if compile_step else None
    if analysis is not None:
        temp = int(analysis.temp_size_in_bytes)
        if config.model.remat == "offload":
            # XLA's CPU compiler puts pinned_host buffers in the same memory and counts them in temp;
            # on a GPU or TPU they live in host memory.
            tokens = config.data.batch_size // config.optim.grad_accum_steps * config.data.seq_len
            host = min(offloaded_bytes(model.config, tokens, mesh.size), temp)
            temp -= host
        rows.append(("activations + workspace (XLA temp - gradients)", max(temp - grads - micro, 0)))
        peak = int(
            analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes
            + temp
        )
    else:
        peak = params + opt + grads + micro
    rows.append(("peak per device", peak))
    if analysis is not None and config.model.remat == "offload":
        rows.append(("host memory: offloaded activations (from shapes)", host))
    plan_rows.clear()
    plan_rows.update(rows)

    n_train, n_params = count(abstract.params, mask)
    if model.config.is_peft:  # quantized codes pack several weights per element: count the weights
        n_params = model.config.num_params() + n_train
    lines = [
        f"jsft memory plan: {n_params / 1e9:.2f}B parameters ({config.model.param_dtype}, compute "
        f"{config.model.compute_dtype}, remat {config.model.remat!r}), mesh {dict(mesh.shape)} = "
        f"{mesh.size} devices, batch {config.data.batch_size} x {config.data.seq_len} tokens, "
        f"grad accumulation {config.optim.grad_accum_steps}",
    ]
    if mask is not None:
        lines.append(f"  trainable: {n_train / 1e9:.3f}B of {n_params / 1e9:.2f}B parameters")
    lines += [f"  {name:<50} {value / GB:>9.2f} GB" for name, value in rows]
    lines.append(f"  {attention_line(asked, model.config)}")
    if dropped:
        lines.append(f"  replicated for divisibility: {sorted({d[0] for d in dropped})}")
    lines.append("  fits on (peak with 10% headroom):")
    lines += [f"    {name:<20} {'yes' if peak * 1.1 <= mem else 'NO'}" for name, mem in ACCELERATORS.items()]
    lines.append(f"  (planned in {time.time() - start:.1f} s on {jax.device_count()} simulated devices)")
    report = "\n".join(lines)
    print(report)
    return report
