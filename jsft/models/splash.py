"""TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) behind jsft's kernel
interface: block-sparse flash attention whose mask (causal, or a causal sliding window) is known when
the step is traced, so empty blocks are skipped on the chip, with packing through segment ids.

Mapping: grouped-query heads run as one multi-query kernel per key/value head (its G query heads share
the keys), vmapped over the key/value heads and the batch; each query's example start is its segment
id (distinct per example, padding included). The query is pre-scaled (the kernel does not scale);
soft-capping is the kernel's own `attn_logits_soft_cap`. Pallas kernels are not partitioned by XLA:
under a mesh the kernel runs inside `shard_map` over the batch and key/value-head axes.

Off TPU the kernel runs in Pallas interpret mode (slow; what the CPU tests check against the
reference). It needs a window known at trace time: a model with per-layer windows runs one kernel
per distinct window, each layer switching to its own (`attention.attend`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from jsft.models.flash import from_blocks, to_blocks
from jsft.parallel import sharding


def _kernel(t: int, groups: int, window: int, softcap: float, block: int, interpret: bool):
    # Built at every trace, never cached: the kernel holds its mask's block tables as arrays, which
    # would be a leaked tracer in the next trace.
    one = sm.LocalMask((t, t), (window - 1, 0), 0) if window else sm.CausalMask((t, t))
    sizes = dict.fromkeys(
        (
            "block_q",
            "block_kv",
            "block_kv_compute",
            "block_q_dkv",
            "block_kv_dkv",
            "block_kv_dkv_compute",
            "block_q_dq",
            "block_kv_dq",
        ),
        block,
    )
    return sk.make_splash_mqa_single_device(
        sm.MultiHeadMask([one] * groups),
        block_sizes=sk.BlockSizes(**sizes),
        attn_logits_soft_cap=softcap or None,
        interpret=interpret,
    )


def splash_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    start_bt: jax.Array,
    window: int = 0,
    scale: float | None = None,
    softcap: float = 0.0,
    block: int = 128,
    interpret: bool | None = None,
) -> jax.Array:
    """Self-attention over packed rows (`start_bt`: each query's example start); `window` static.
    `block` is rounded up to a multiple of 128 and the row padded to a multiple of it."""
    t, n, h = q_btnh.shape[1:]
    kh = k_bskh.shape[2]
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    block = -(-max(block, 128) // 128) * 128  # the kernel's blocks are multiples of 128 (lanes)
    q, k, v, segments = to_blocks(q_btnh, k_bskh, v_bskh, start_bt, block)  # starts as segment ids
    q = q * jnp.asarray(scale or h**-0.5, q.dtype)
    kernel = _kernel(q.shape[3], n // kh, int(window), float(softcap), block, interpret)

    def run(q, k, v, segments):
        def one_row(q_kgth, k_kth, v_kth, seg_t):
            ids = sk.SegmentIds(q=seg_t, kv=seg_t)
            return jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1, segment_ids=ids))(q_kgth, k_kth, v_kth)

        return jax.vmap(one_row)(q, k, v, segments)

    active = sharding.active()
    if active is not None:
        mesh, rules = active
        spec = functools.partial(sharding.spec_for, mesh=mesh, rules=rules)
        q_spec = spec(q.shape, ("batch", "kv_heads", None, None, None))
        kv_spec = spec(k.shape, ("batch", "kv_heads", None, None))
        seg_spec = spec(segments.shape, ("batch", None))
        run = jax.shard_map(
            run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False
        )
    return from_blocks(run(q, k, v, segments), t)
