"""Attention kernels and the packing-aware causal mask.

Only the reference XLA kernel exists so far; faster kernels (cuDNN via
`jax.nn.dot_product_attention`, TPU splash) will be named choices beside it with the same signature.
"""

import jax
import jax.numpy as jnp


def causal_segment_mask(segment_ids_bt: jax.Array, sliding_window: int = 0) -> jax.Array:
    """[B, T, S] bool: query t may see key s iff s <= t and both belong to the same example
    (and, with a sliding window, t - s < window).

    Packed examples are contiguous in a row, so index-causality inside a segment equals causality in
    the example's own positions. Padding (segment 0) only sees padding, so no query row is empty.
    """
    t = segment_ids_bt.shape[1]
    causal_ts = jnp.tril(jnp.ones((t, t), jnp.bool_))
    if sliding_window:
        causal_ts &= ~jnp.tril(jnp.ones((t, t), jnp.bool_), k=-sliding_window)
    same_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return causal_ts[None] & same_bts


def reference_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    mask_bts: jax.Array,
    scale: float | None = None,
    softcap: float = 0.0,
) -> jax.Array:
    """Grouped-query softmax attention in plain XLA; logits and softmax in float32.

    `scale` defaults to head_dim**-0.5; `softcap` > 0 squashes logits with cap * tanh(logits / cap).
    """
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q_btkgh, k_bskh).astype(jnp.float32) * (scale or h**-0.5)
    if softcap:
        logits = jnp.tanh(logits / softcap) * softcap
    logits = jnp.where(mask_bts[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_bskh.dtype)
    out_btkgh = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_bskh)
    return out_btkgh.reshape(b, t, n, h)
