"""Flash attention for GPUs as Pallas kernels (lowered to Triton): packed rows, causal masking, sliding
windows (per layer too), logit soft-capping and grouped-query heads, in the forward and the backward
pass, with no [T, S] array anywhere.

Why our own kernel: `jax.experimental.pallas.ops.gpu.attention` (jax 0.10) takes segment ids and a
causal flag but neither windows, soft-caps nor grouped-query heads, and skips no block for packing;
cuDNN takes neither float32 nor soft-caps (attention.py chooses between them).

The mask is one bound per query: query t sees keys `first[t] <= s <= t`, where `first[t]` is its
example's first position (attention.Mask's `start`), raised to `t - window + 1` under a sliding window.
Starts are non-decreasing along a row and so is `first`, which gives each block its loop bounds: a
query block reads key blocks from its first query's `first` to the diagonal, and a key block is read by
query blocks from the diagonal to the last query whose `first` is at or before the block's last key.
Bounds are per row (one program handles one row, head and block), so packing skips whole blocks.

Three Pallas kernels, as in FlashAttention-2 (Dao, 2023): the forward (output and log-sum-exp), then
for the backward one kernel per key block and key/value head that loops over its query blocks and the
head's G query heads (dk, dv finished in registers, no atomics), and one per query block and head for
dq. Layouts stay [B, T, N, H] (no transposes); T is padded to the block and H to a power of two (Triton
needs power-of-two tiles, at least 16 for its matmuls). Scores, softmax and accumulators are float32;
float32 inputs multiply in IEEE float32 (Triton's default would be TF32, 1e-3 off), bf16/fp16 on the
tensor cores with float32 accumulation. Off GPUs the kernels run in Pallas interpret mode (the CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jsft.parallel import sharding

_NEG = -0.7 * float(np.finfo(np.float32).max)  # finite: a block row with no visible key stays NaN-free


def first_visible(start_bt: jax.Array, window: jax.Array | int) -> jax.Array:
    """[B, T] int32: each query's first visible key (its example's start, or `t - window + 1`)."""
    t = jnp.arange(start_bt.shape[1], dtype=jnp.int32)
    window = jnp.asarray(window, jnp.int32)
    start = start_bt.astype(jnp.int32)
    return jnp.where(window > 0, jnp.maximum(start, t - window + 1), start)


def _logits(q, k, scale: float, softcap: float, precision):
    """[bq, bk] float32 scaled (and soft-capped) scores, and the tanh of the cap (None without one)."""
    s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale
    if not softcap:
        return s, None
    capped = jnp.tanh(s / softcap)
    return capped * softcap, capped


def _visible(t0, s0, first_q, bq: int, bk: int):
    """[bq, bk] bool: may query t0 + i see key s0 + j (causal, and at or after its first key)."""
    t = t0 + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    s = s0 + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    return (s <= t) & (s >= first_q[:, None])


def _forward_kernel(q_ref, k_ref, v_ref, first_ref, o_ref, lse_ref, *, scale, softcap, bq, bk, precision):
    t0 = pl.program_id(0) * bq
    q = q_ref[...]
    first_q = first_ref[pl.ds(t0, bq)]

    def key_block(j, carry):
        m, denom, acc = carry
        s0 = j * bk
        k, v = k_ref[pl.ds(s0, bk), :], v_ref[pl.ds(s0, bk), :]
        visible = _visible(t0, s0, first_q, bq, bk)
        s = jnp.where(visible, _logits(q, k, scale, softcap, precision)[0], _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        correction = jnp.exp(m - m_new)
        pv = plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return m_new, denom * correction + jnp.sum(p, axis=1), acc * correction[:, None] + pv

    init = (
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq, q.shape[1]), jnp.float32),
    )
    lo, hi = jnp.min(first_q) // bk, (t0 + bq - 1) // bk + 1
    m, denom, acc = jax.lax.fori_loop(lo, hi, key_block, init)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(denom)


def _grad_logits(q, k, v, do, lse, delta, visible, scale, softcap, precision):
    """(p, dS) for one block: probabilities from the saved log-sum-exp, and the gradient of the
    (pre-scale, pre-cap) scores, float32."""
    s, capped = _logits(q, k, scale, softcap, precision)
    p = jnp.where(visible, jnp.exp(s - lse[:, None]), 0.0)
    dp = plgpu.dot(do, v, trans_b=True, precision=precision)
    ds = p * (dp - delta[:, None])
    if capped is not None:
        ds = ds * (1.0 - capped * capped)
    return p, ds * scale


def _dkdv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, first_ref, q_end_ref, dk_ref, dv_ref,
    *, scale, softcap, bq, bk, groups, precision,
):  # fmt: skip
    j = pl.program_id(0)
    s0 = j * bk
    k, v = k_ref[...], v_ref[...]

    def query_head(g, carry):
        def query_block(i, carry):
            dk, dv = carry
            t0 = i * bq
            q, do = q_ref[pl.ds(t0, bq), g, :], do_ref[pl.ds(t0, bq), g, :]
            lse, delta = lse_ref[g, pl.ds(t0, bq)], delta_ref[g, pl.ds(t0, bq)]
            visible = _visible(t0, s0, first_ref[pl.ds(t0, bq)], bq, bk)
            p, ds = _grad_logits(q, k, v, do, lse, delta, visible, scale, softcap, precision)
            dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
            dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True, precision=precision)
            return dk, dv

        return jax.lax.fori_loop(s0 // bq, q_end_ref[j], query_block, carry)

    zeros = jnp.zeros((bk, k.shape[1]), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, groups, query_head, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, first_ref, dq_ref, *, scale, softcap, bq, bk, precision
):
    t0 = pl.program_id(0) * bq
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    first_q = first_ref[pl.ds(t0, bq)]

    def key_block(j, dq):
        s0 = j * bk
        k, v = k_ref[pl.ds(s0, bk), :], v_ref[pl.ds(s0, bk), :]
        visible = _visible(t0, s0, first_q, bq, bk)
        _, ds = _grad_logits(q, k, v, do, lse, delta, visible, scale, softcap, precision)
        return dq + plgpu.dot(ds.astype(k.dtype), k, precision=precision)

    lo, hi = jnp.min(first_q) // bk, (t0 + bq - 1) // bk + 1
    dq = jax.lax.fori_loop(lo, hi, key_block, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret, name, **params):
    warps = 4 if in_specs[0].block_shape[-1] <= 64 else 8  # wide heads: more threads per tile (as JAX's)
    return pl.pallas_call(
        functools.partial(kernel, **params),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=2),
        interpret=interpret,
        name=name,
    )


def _precision(dtype) -> jax.lax.Precision | None:
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _forward(q, k, v, first, scale, softcap, block, interpret):
    """q [B, T, N, H], k/v [B, T, K, H], first [B, T] -> (out like q, lse [B, N, T] float32)."""
    b, t, n, h = q.shape
    groups = n // k.shape[2]
    q_spec = pl.BlockSpec((None, block, None, h), lambda i, r, m: (r, i, m, 0))
    kv_spec = pl.BlockSpec((None, t, None, h), lambda i, r, m: (r, 0, m // groups, 0))
    row_spec = pl.BlockSpec((None, t), lambda i, r, m: (r, 0))
    lse_spec = pl.BlockSpec((None, None, block), lambda i, r, m: (r, m, i))
    return _call(
        _forward_kernel,
        (t // block, b, n),
        [q_spec, kv_spec, kv_spec, row_spec],
        [q_spec, lse_spec],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        interpret,
        "jsft_attention_forward",
        scale=scale,
        softcap=softcap,
        bq=block,
        bk=block,
        precision=_precision(q.dtype),
    )(q, k, v, first)


def _query_ends(first, block: int) -> jax.Array:
    """[B, T / block] int32: for each key block, one past the last query block that sees any of its keys
    (`first` is non-decreasing: the queries whose first key is at or before the block's last key)."""
    last_keys = jnp.arange(block - 1, first.shape[1], block, dtype=jnp.int32)
    counts = jax.vmap(lambda row: jnp.searchsorted(row, last_keys, side="right"))(first)
    return ((counts + block - 1) // block).astype(jnp.int32)


def _backward(q, k, v, first, out, lse, d_out, scale, softcap, block, interpret):
    b, t, n, h = q.shape
    kh = k.shape[2]
    groups = n // kh
    delta = jnp.einsum("BTNH,BTNH->BNT", out.astype(jnp.float32), d_out.astype(jnp.float32))
    params = dict(scale=scale, softcap=softcap, bq=block, bk=block, precision=_precision(q.dtype))

    # dk, dv: one program per key block, row and key/value head, over that head's G query heads.
    heads_spec = pl.BlockSpec((None, t, groups, h), lambda j, r, m: (r, 0, m, 0))
    kv_block_spec = pl.BlockSpec((None, block, None, h), lambda j, r, m: (r, j, m, 0))
    stats_spec = pl.BlockSpec((None, groups, t), lambda j, r, m: (r, m, 0))
    row_spec = pl.BlockSpec((None, t), lambda j, r, m: (r, 0))
    ends_spec = pl.BlockSpec((None, t // block), lambda j, r, m: (r, 0))
    dk, dv = _call(
        _dkdv_kernel,
        (t // block, b, kh),
        [heads_spec, kv_block_spec, kv_block_spec, heads_spec, stats_spec, stats_spec, row_spec, ends_spec],
        [kv_block_spec, kv_block_spec],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret,
        "jsft_attention_dkdv",
        groups=groups,
        **params,
    )(q, k, v, d_out, lse, delta, first, _query_ends(first, block))

    # dq: one program per query block, row and query head (the forward's grid).
    q_spec = pl.BlockSpec((None, block, None, h), lambda i, r, m: (r, i, m, 0))
    kv_spec = pl.BlockSpec((None, t, None, h), lambda i, r, m: (r, 0, m // groups, 0))
    stat_spec = pl.BlockSpec((None, None, block), lambda i, r, m: (r, m, i))
    row_spec = pl.BlockSpec((None, t), lambda i, r, m: (r, 0))
    dq = _call(
        _dq_kernel,
        (t // block, b, n),
        [q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec, row_spec],
        q_spec,
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret,
        "jsft_attention_dq",
        **params,
    )(q, k, v, d_out, lse, delta, first)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(q, k, v, first, scale, softcap, block, interpret):
    return _forward(q, k, v, first, scale, softcap, block, interpret)[0]


def _attention_fwd(q, k, v, first, scale, softcap, block, interpret):
    out, lse = _forward(q, k, v, first, scale, softcap, block, interpret)
    return out, (q, k, v, first, out, lse)


def _attention_bwd(scale, softcap, block, interpret, residuals, d_out):
    q, k, v, first, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, first, out, lse, d_out, scale, softcap, block, interpret)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_size(chunk: int, t: int, head_dim: int) -> int:
    """The kernels' square block: a power of two from 16 (Triton's smallest matmul) to 64 (32 past
    128-wide heads, to stay inside a multiprocessor's registers), at most `chunk`, at most the row."""
    cap = 64 if head_dim <= 128 else 32
    block = 1 << max(int(chunk).bit_length() - 1, 4)
    return max(16, min(block, cap, 1 << max(t - 1, 1).bit_length()))


def pallas_gpu_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    start_bt: jax.Array,
    window: jax.Array | int = 0,
    scale: float | None = None,
    softcap: float = 0.0,
    chunk: int = 64,
    interpret: bool | None = None,
) -> jax.Array:
    """Self-attention over packed rows (`start_bt`: each query's example start, see attention.Mask);
    `window` may be traced (per-layer windows under scan). The row is padded to the block (each padding
    position an example of its own) and the head to a power of two; both are cut off again."""
    b, t, n, h = q_btnh.shape
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    block = block_size(chunk, t, h)
    pad_t, pad_h = -t % block, max(16, 1 << (h - 1).bit_length()) - h
    widths = ((0, 0), (0, pad_t), (0, 0), (0, pad_h))
    q, k, v = (jnp.pad(x, widths) for x in (q_btnh, k_bskh, v_bskh))
    first = first_visible(start_bt, window)
    if pad_t:
        first = jnp.concatenate(
            [first, jnp.broadcast_to(jnp.arange(t, t + pad_t, dtype=jnp.int32), (b, pad_t))], 1
        )
    scale = float(scale or h**-0.5)

    def run(q, k, v, first):
        return _attention(q, k, v, first, scale, float(softcap), block, interpret)

    active = sharding.active()
    if active is not None:  # Pallas calls are not partitioned by XLA: one call per shard
        mesh, rules = active
        kh = k.shape[2]
        spec = functools.partial(sharding.spec_for, mesh=mesh, rules=rules)
        q5_spec = spec((b, q.shape[1], kh, n // kh, q.shape[3]), ("batch", None, "kv_heads", None, None))
        kv_spec = spec(k.shape, ("batch", None, "kv_heads", None))
        row_spec = spec(first.shape, ("batch", None))

        def sharded(q5, k, v, first):
            return run(q5.reshape(*q5.shape[:2], -1, q5.shape[4]), k, v, first).reshape(q5.shape)

        out = jax.shard_map(
            sharded,
            mesh=mesh,
            in_specs=(q5_spec, kv_spec, kv_spec, row_spec),
            out_specs=q5_spec,
            check_vma=False,
        )(q.reshape(b, q.shape[1], kh, n // kh, q.shape[3]), k, v, first)
        out = out.reshape(q.shape)
    else:
        out = run(q, k, v, first)
    return out[:, :t, :, :h]
