"""Flash attention in plain JAX: blocks of queries against blocks of keys, an online softmax, and a
hand-written backward pass (custom VJP) that recomputes each block's probabilities from the saved
log-sum-exp. Nothing larger than one [B, K, G, block_q, block_k] score block exists at a time, in the
forward or the backward pass, whatever the sequence length (Dao et al., FlashAttention-2, 2023,
Algorithms 1 and 2, here with XLA loops instead of a fused kernel).

Blocks that the mask leaves empty are skipped, not computed: the loops over blocks have dynamic bounds
from causality, the packing starts (a query never sees keys before its example's first position; the
starts are non-decreasing along a row) and the sliding window. The bounds are taken over the whole
batch, so every row of a block runs the same loop. Runs on every backend (CPU included) and under any
sharding of the batch or heads; the loops become XLA while loops, executed one block after another.

Layouts: q [B, T, N, H], k and v [B, S, K, H] with N = K * G (grouped-query), S = T (self-attention).
Scores, the softmax and the accumulators are float32; p.v and the gradients' matmuls take the inputs'
dtype with float32 accumulation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NEG = jnp.finfo(jnp.float32).min


def _visible(t0, s0, start_bq, window, bq: int, bk: int) -> jax.Array:
    """[B, bq, bk]: may query t0 + i see key s0 + j (causal, same example, inside the window)."""
    t = t0 + jnp.arange(bq)[:, None]
    s = s0 + jnp.arange(bk)[None, :]
    in_window = (window == 0) | (t - s < window)
    return ((s <= t) & in_window)[None] & (s[None] >= start_bq[:, :, None])


def _scores(q_i, k_j, scale: float, softcap: float):
    """(scores [B, K, G, bq, bk] float32, tanh of the soft-cap or None)."""
    s = jnp.einsum("BKGTH,BKSH->BKGTS", q_i, k_j, preferred_element_type=jnp.float32) * scale
    if not softcap:
        return s, None
    capped = jnp.tanh(s / softcap)
    return capped * softcap, capped


def _key_block_range(start_bt, window, bq: int, bk: int):
    """For every query block: the first key block any of its queries sees (the last is causal)."""
    t0 = jnp.arange(0, start_bt.shape[1], bq)
    first_key = jnp.min(start_bt[:, ::bq], axis=0)  # starts are non-decreasing: the block's first query
    first_key = jnp.where(window > 0, jnp.maximum(first_key, t0 - window + 1), first_key)
    return first_key // bk, (t0 + bq - 1) // bk + 1


def _query_block_range(start_bt, window, s_len: int, bq: int, bk: int):
    """For every key block: the query blocks that see any of its keys (from causality to the last
    query whose example starts at or before the block's last key, within the window)."""
    s1 = jnp.arange(bk, s_len + 1, bk)  # one past each key block's last key
    last_query = jnp.max(jnp.sum(start_bt[:, None, :] <= (s1 - 1)[None, :, None], axis=-1), axis=0) - 1
    last_query = jnp.where(window > 0, jnp.minimum(last_query, s1 + window - 2), last_query)
    return (s1 - bk) // bq, last_query // bq + 1


def _forward(q, k, v, start_bt, window, scale, softcap, bq, bk):
    """q [B, K, G, T, H], k/v [B, K, S, H] -> (out like q, lse [B, K, G, T] float32)."""
    b, kh, g, t, h = q.shape
    lo, hi = _key_block_range(start_bt, window, bq, bk)

    def query_block(i):
        t0 = i * bq
        q_i = jax.lax.dynamic_slice_in_dim(q, t0, bq, axis=3)
        start_i = jax.lax.dynamic_slice_in_dim(start_bt, t0, bq, axis=1)

        def key_block(j, carry):
            m, denom, acc = carry
            s0 = j * bk
            k_j = jax.lax.dynamic_slice_in_dim(k, s0, bk, axis=2)
            v_j = jax.lax.dynamic_slice_in_dim(v, s0, bk, axis=2)
            visible = _visible(t0, s0, start_i, window, bq, bk)[:, None, None]
            s = jnp.where(visible, _scores(q_i, k_j, scale, softcap)[0], _NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
            correction = jnp.exp(m - m_new)
            pv = jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
            return m_new, denom * correction + jnp.sum(p, axis=-1), acc * correction[..., None] + pv

        init = (
            jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, kh, g, bq), jnp.float32),
            jnp.zeros((b, kh, g, bq, h), jnp.float32),
        )
        m, denom, acc = jax.lax.fori_loop(lo[i], hi[i], key_block, init)
        return (acc / denom[..., None]).astype(q.dtype), m + jnp.log(denom)

    out, lse = jax.lax.map(query_block, jnp.arange(t // bq))  # [nq, B, K, G, bq, ...]
    out = jnp.moveaxis(out, 0, 3).reshape(b, kh, g, t, h)
    return out, jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, t)


def _backward(q, k, v, start_bt, window, out, lse, d_out, scale, softcap, bq, bk):
    """Gradients for q, k, v (layouts as in `_forward`): key blocks outside, their query blocks inside;
    dk and dv of a key block are finished in its inner loop, dq accumulates across key blocks."""
    b, kh, g, t, h = q.shape
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, K, G, T]
    lo, hi = _query_block_range(start_bt, window, k.shape[2], bq, bk)

    def key_block(dq, j):
        s0 = j * bk
        k_j = jax.lax.dynamic_slice_in_dim(k, s0, bk, axis=2)
        v_j = jax.lax.dynamic_slice_in_dim(v, s0, bk, axis=2)

        def query_block(i, carry):
            dk, dv, dq = carry
            t0 = i * bq
            q_i, do_i = (jax.lax.dynamic_slice_in_dim(x, t0, bq, axis=3) for x in (q, d_out))
            lse_i, delta_i = (jax.lax.dynamic_slice_in_dim(x, t0, bq, axis=3) for x in (lse, delta))
            start_i = jax.lax.dynamic_slice_in_dim(start_bt, t0, bq, axis=1)
            visible = _visible(t0, s0, start_i, window, bq, bk)[:, None, None]
            s, capped = _scores(q_i, k_j, scale, softcap)
            p = jnp.where(visible, jnp.exp(s - lse_i[..., None]), 0.0)
            dv = dv + jnp.einsum(
                "BKGTS,BKGTH->BKSH", p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32
            )
            dp = jnp.einsum("BKGTH,BKSH->BKGTS", do_i, v_j, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None])
            if capped is not None:
                ds = ds * (1.0 - capped * capped)
            ds = (ds * scale).astype(q.dtype)
            dk = dk + jnp.einsum("BKGTS,BKGTH->BKSH", ds, q_i, preferred_element_type=jnp.float32)
            dq_i = jnp.einsum("BKGTS,BKSH->BKGTH", ds, k_j, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(
                dq, jax.lax.dynamic_slice_in_dim(dq, t0, bq, axis=3) + dq_i, t0, axis=3
            )
            return dk, dv, dq

        zeros = jnp.zeros((b, kh, bk, h), jnp.float32)
        dk, dv, dq = jax.lax.fori_loop(lo[j], hi[j], query_block, (zeros, zeros, dq))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(k.shape[2] // bk))
    dk, dv = (jnp.moveaxis(x, 0, 2).reshape(b, kh, -1, h) for x in (dk, dv))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def to_blocks(
    q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, start_bt: jax.Array, block: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The kernels' layouts, q [B, K, G, T', H], k and v [B, K, T', H], starts [B, T'] int32, with T'
    the row padded up to a multiple of `block`; each padding position is an example of its own (its
    start is itself), so no real query sees it (causality) and it sees only itself."""
    b, t, n, h = q_btnh.shape
    kh = k_bskh.shape[2]
    pad = -t % block
    q = jnp.moveaxis(q_btnh.reshape(b, t, kh, n // kh, h), 1, 3)
    k, v = (jnp.moveaxis(x, 1, 2) for x in (k_bskh, v_bskh))
    start = start_bt.astype(jnp.int32)
    if pad:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (k, v))
        start = jnp.concatenate([start, jnp.broadcast_to(jnp.arange(t, t + pad), (b, pad))], axis=1)
    return q, k, v, start


def from_blocks(out_bkgth: jax.Array, t: int) -> jax.Array:
    """[B, K, G, T', H] -> [B, t, N, H] without the padding (inverse of `to_blocks` for q)."""
    b, kh, g, _, h = out_bkgth.shape
    return jnp.moveaxis(out_bkgth[:, :, :, :t], 3, 1).reshape(b, t, kh * g, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, start_bt, window, scale, softcap, bq, bk):
    return _forward(q, k, v, start_bt, window, scale, softcap, bq, bk)[0]


def _flash_fwd(q, k, v, start_bt, window, scale, softcap, bq, bk):
    out, lse = _forward(q, k, v, start_bt, window, scale, softcap, bq, bk)
    return out, (q, k, v, start_bt, window, out, lse)


def _flash_bwd(scale, softcap, bq, bk, residuals, d_out):
    q, k, v, start_bt, window, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, start_bt, window, out, lse, d_out, scale, softcap, bq, bk)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    start_bt: jax.Array,
    window: jax.Array | int = 0,
    scale: float | None = None,
    softcap: float = 0.0,
    block: int = 128,
) -> jax.Array:
    """Self-attention over packed rows (`start_bt`: each query's example start, see attention.Mask);
    T need not be a multiple of `block` (the row is padded, the padding sees only itself)."""
    t, h = q_btnh.shape[1], q_btnh.shape[3]
    block = min(block, t)
    q, k, v, start = to_blocks(q_btnh, k_bskh, v_bskh, start_bt, block)
    window = jnp.asarray(window, jnp.int32)
    out = _flash(q, k, v, start, window, float(scale or h**-0.5), float(softcap), block, block)
    return from_blocks(out, t)
