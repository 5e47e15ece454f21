"""Cross-entropy fused with the output projection, chunked over the sequence: the [B, T, V] logits
(and log-probabilities) of the whole batch never exist, in the forward or the backward pass.

`chunked_nll(x_btd, head_dv, targets_bt)` equals `token_nll(x_btd @ head_dv, targets_bt)` (to float32
rounding). It scans over chunks of `chunk` positions (every row of the batch at once, so a batch
sharded over devices keeps all of them busy); the forward keeps only the log-sum-exp of each token,
and the backward recomputes each chunk's logits to form `softmax - onehot` and the two gradients
(`dx = d @ head.T`, `dhead += x.T @ d`). Cost: one extra [chunk, D] x [D, V] matmul per chunk; gain:
memory O(B * chunk * V) instead of O(B * T * V), and, on CPUs, a working set that stays in cache (the
fused loss of the shared benchmark model runs ~6x faster than log-softmax-then-gather, BUILD_NOTES).
Logits are computed with float32 accumulation whatever the compute dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jsft.parallel.sharding import constrain

HEAD_AXES = ("embed", "vocab")  # the output projection's logical axes (lm_head, or the tied embedding's .T)
VOCAB_BLOCK = 8192  # columns of the head per backward block (a [B, chunk, VOCAB_BLOCK] float32 logits block)


def _chunks(a: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [T / chunk, B, chunk, ...] (T padded up to a multiple of `chunk`)."""
    b, t = a.shape[:2]
    pad = -t % chunk
    if pad:
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    return jnp.moveaxis(a.reshape(b, (t + pad) // chunk, chunk, *a.shape[2:]), 1, 0)


def _unchunk(a: jax.Array, t: int) -> jax.Array:
    """Inverse of `_chunks` (drops the padding)."""
    n, b, c = a.shape[:3]
    return jnp.moveaxis(a, 0, 1).reshape(b, n * c, *a.shape[3:])[:, :t]


def _logits(x_bcd: jax.Array, head_dv: jax.Array, softcap: float) -> tuple[jax.Array, jax.Array]:
    """(logits, tanh term or None) in float32."""
    raw = jnp.einsum("BCD,DV->BCV", x_bcd, head_dv, preferred_element_type=jnp.float32)
    if not softcap:
        return raw, None
    squashed = jnp.tanh(raw / softcap)
    return squashed * softcap, squashed


def _target_logit(logits_bcv: jax.Array, targets_bc: jax.Array) -> jax.Array:
    # A compare-and-sum fuses into one pass; a gather's gradient would be a scatter.
    hit = jnp.arange(logits_bcv.shape[-1]) == targets_bc[..., None]
    return jnp.sum(jnp.where(hit, logits_bcv, 0.0), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def chunked_nll(
    x_btd: jax.Array, head_dv: jax.Array, targets_bt: jax.Array, softcap: float = 0.0, chunk: int = 128
) -> jax.Array:
    """[B, T] float32 negative log-likelihood of each target under logits = softcap(x @ head)."""
    return _forward(x_btd, head_dv, targets_bt, softcap, chunk)[0]


def _forward(x_btd, head_dv, targets_bt, softcap, chunk):
    def body(_, xs):
        x_bcd, t_bc = xs
        logits, _ = _logits(x_bcd, head_dv, softcap)
        lse = jax.nn.logsumexp(logits, axis=-1)
        return None, (lse - _target_logit(logits, t_bc), lse)

    t = x_btd.shape[1]
    _, (nll, lse) = jax.lax.scan(body, None, (_chunks(x_btd, chunk), _chunks(targets_bt, chunk)))
    return _unchunk(nll, t), (x_btd, head_dv, targets_bt, lse)


def _bwd(softcap, chunk, residuals, g_bt):
    x_btd, head_dv, targets_bt, lse = residuals
    ts, gs = _chunks(targets_bt, chunk), _chunks(g_bt.astype(jnp.float32), chunk)

    def logits_grad(i, logits, columns):
        hit = columns == ts[i][..., None]
        return (jnp.exp(logits - lse[i][..., None]) - hit) * gs[i][..., None]

    return (*block_backward(x_btd, head_dv, softcap, chunk, VOCAB_BLOCK, logits_grad), None)


def block_backward(
    x_btd: jax.Array,
    head_dv: jax.Array,
    softcap: float,
    chunk: int,
    vocab_block: int,
    logits_grad: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
) -> tuple[jax.Array, jax.Array]:
    """(dx, dhead) of a loss over logits = softcap(x @ head), given `logits_grad(i, logits, columns)`:
    d loss / d logits (before the soft-cap) of sequence chunk i for the block of head columns
    `columns` ([B, C, block] float32). Used by the cross-entropy here and by every term of
    jsft/train/token_terms.py.

    Vocabulary blocks outside, sequence chunks inside: each block's [D, vocab_block] gradient is
    summed over every token in float32 and written once into the head's gradient (in the head's
    dtype, one rounding, as the unfused loss's matmul does); dx accumulates in place. No [D, V]
    float32 array and no per-chunk [D, V] partial sum ever exists."""
    vocab = head_dv.shape[1]
    block = min(vocab_block, vocab)
    xs = _chunks(x_btd, chunk)

    def vocab_block_step(v, carry):
        dx, dhead_dv = carry
        # The last block may overlap the one before it (V need not be a multiple of the block): its
        # columns already counted are left out of dx; their head gradient is recomputed identically.
        v0 = jnp.minimum(v * block, vocab - block)
        head_vb = jax.lax.dynamic_slice_in_dim(head_dv, v0, block, axis=1)
        columns = v0 + jnp.arange(block)
        new_column = columns >= v * block

        def token_chunk(i, inner):
            dx, dhead_db = inner
            x_bcd = xs[i]
            logits, squashed = _logits(x_bcd, head_vb, softcap)
            d_bcv = logits_grad(i, logits, columns)
            if softcap:
                d_bcv = d_bcv * (1.0 - squashed * squashed)
            d_bcv = d_bcv.astype(x_bcd.dtype)
            dhead_db = dhead_db + jnp.einsum("BCD,BCV->DV", x_bcd, d_bcv, preferred_element_type=jnp.float32)
            d_new = jnp.where(new_column, d_bcv, jnp.zeros((), d_bcv.dtype))
            dx_bcd = jnp.einsum("BCV,DV->BCD", d_new, head_vb, preferred_element_type=jnp.float32)
            return dx.at[i].add(dx_bcd), dhead_db

        zeros = jnp.zeros((head_dv.shape[0], block), jnp.float32)
        dx, dhead_db = jax.lax.fori_loop(0, xs.shape[0], token_chunk, (dx, zeros))
        dhead_dv = jax.lax.dynamic_update_slice_in_dim(dhead_dv, dhead_db.astype(head_dv.dtype), v0, axis=1)
        return dx, constrain(dhead_dv, HEAD_AXES)

    # The head's gradient keeps the head's own sharding (FSDP: split over devices): each block is
    # reduce-scattered as it is written, so no device ever holds the whole [D, V] gradient.
    init = (jnp.zeros(xs.shape, jnp.float32), constrain(jnp.zeros(head_dv.shape, head_dv.dtype), HEAD_AXES))
    dx, dhead_dv = jax.lax.fori_loop(0, -(-vocab // block), vocab_block_step, init)
    return _unchunk(dx, x_btd.shape[1]).astype(x_btd.dtype), dhead_dv


chunked_nll.defvjp(_forward, _bwd)
