"""Attention kernels, chosen by name (`config.model.attention`), and the packing-aware mask.

Every kernel takes q [B, T, N, H], k and v [B, S, K, H] (grouped-query: N = K * G) and a `Mask`, and
returns [B, T, N, H]. Packed examples are contiguous in a row, so "query t may see key s" is
`start[t] <= s <= t` (plus `t - s < window` with a sliding window), where `start[t]` is the first
position of t's example: no [T, S] array is needed to say it.

  reference  plain XLA over the whole row: [B, K, G, T, S] float32 scores (the oracle)
  chunked    queries in chunks of `chunk` rows; each chunk attends only to the keys up to its last
             row (the causal triangle's empty blocks are never computed), and is rematerialised in
             the backward pass. Runs everywhere, but XLA may schedule several chunks' [B, K, G, chunk,
             S] scores at once (the 8B planner's activations were 4 GB higher than with `flash`).
  flash      blocks of queries x blocks of keys with an online softmax and a hand-written backward
             (jsft/models/flash.py): one [B, K, G, chunk, chunk] block at a time, empty blocks skipped.
             Runs everywhere; the default on CPU and TPU (on the shared CPU benchmark within 3% of
             `chunked`'s speed).
  xla_sdpa   jax.nn.dot_product_attention (XLA); on GPUs `cudnn` asks for cuDNN's fused kernel.
             Neither takes soft-capping; both need a [B, 1, T, S] boolean mask for packed rows.
  splash     TPU splash attention (Pallas, block-sparse; jsft/models/splash.py): the default on TPUs
             unless the model has per-layer windows; off TPU it runs in Pallas interpret mode (tests).
  auto       cudnn on GPUs and splash on TPUs when the model allows them, else flash.

Soft-capped logits (Gemma 2) work with reference, chunked and flash. Scores and softmax are float32 in
every kernel; q.k and p.v accumulate in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jsft.models.flash import flash_attention
from jsft.models.splash import splash_attention

IMPLEMENTATIONS = ("auto", "reference", "chunked", "flash", "splash", "xla_sdpa", "cudnn")


@dataclasses.dataclass(frozen=True)
class Mask:
    """Which keys each query sees, for rows of packed examples (contiguous segments).

    `start_bt`: the first position of each query's example (padding, segment 0 at the row's end, is
    an example of its own, so no query row is empty). `window`: a sliding window (0: none); it may be a
    traced scalar (per-layer windows under scan).
    """

    start_bt: jax.Array
    window: jax.Array | int = 0

    @classmethod
    def from_segments(cls, segment_ids_bt: jax.Array, window: jax.Array | int = 0) -> Mask:
        t = segment_ids_bt.shape[1]
        idx = jnp.arange(t)
        new = jnp.concatenate(
            [
                jnp.ones_like(segment_ids_bt[:, :1], jnp.bool_),
                segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1],
            ],
            axis=1,
        )
        start_bt = jax.lax.cummax(jnp.where(new, idx, 0), axis=1)
        return cls(start_bt, window)

    def block(self, t0: int, t1: int, s0: int, s1: int) -> jax.Array:
        """[B, t1 - t0, s1 - s0] bool for queries t0..t1-1 and keys s0..s1-1 (computed, not stored)."""
        t = jnp.arange(t0, t1)[:, None]
        s = jnp.arange(s0, s1)[None, :]
        visible = (s <= t)[None] & (s[None] >= self.start_bt[:, t0:t1, None])
        if isinstance(self.window, int) and not self.window:
            return visible
        window = jnp.asarray(self.window)
        return visible & ((window == 0) | (t - s < window))[None]

    def dense(self) -> jax.Array:
        """[B, T, T] bool (the reference kernel's mask)."""
        t = self.start_bt.shape[1]
        return self.block(0, t, 0, t)


def causal_segment_mask(segment_ids_bt: jax.Array, sliding_window: int = 0) -> jax.Array:
    """[B, T, S] bool: query t may see key s iff s <= t, both in the same example (and t - s < window)."""
    return Mask.from_segments(segment_ids_bt, sliding_window).dense()


def _scores(q_btkgh, k_bskh, scale, softcap):
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q_btkgh, k_bskh, preferred_element_type=jnp.float32) * scale
    if softcap:
        logits = jnp.tanh(logits / softcap) * softcap
    return logits


def _attend(q_btkgh, k_bskh, v_bskh, mask_bts, scale, softcap):
    logits = _scores(q_btkgh, k_bskh, scale, softcap)
    logits = jnp.where(mask_bts[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_bskh.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_bskh, preferred_element_type=jnp.float32).astype(
        v_bskh.dtype
    )


def reference_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    mask_bts: jax.Array,
    scale: float | None = None,
    softcap: float = 0.0,
) -> jax.Array:
    """Grouped-query softmax attention in plain XLA over a dense [B, T, S] mask (also used for
    decoding, where the mask covers the KV cache)."""
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    out = _attend(q_btnh.reshape(b, t, k, n // k, h), k_bskh, v_bskh, mask_bts, scale or h**-0.5, softcap)
    return out.reshape(b, t, n, h)


def chunked_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    mask: Mask,
    scale: float | None = None,
    softcap: float = 0.0,
    chunk: int = 128,
) -> jax.Array:
    """Self-attention (S = T) in query chunks, each over the keys up to its last query only."""
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    scale = scale or h**-0.5

    @jax.checkpoint
    def one_chunk(q_chunk, k_keys, v_keys, mask_chunk):
        return _attend(q_chunk, k_keys, v_keys, mask_chunk, scale, softcap)

    outs = []
    for t0 in range(0, t, chunk):
        t1 = min(t0 + chunk, t)
        # Keys after the chunk's last query are never visible: they are not even read.
        outs.append(one_chunk(q_btkgh[:, t0:t1], k_bskh[:, :t1], v_bskh[:, :t1], mask.block(t0, t1, 0, t1)))
    return jnp.concatenate(outs, axis=1).reshape(b, t, n, h)


def sdpa_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    mask: Mask,
    scale: float | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """jax.nn.dot_product_attention (`implementation`: None/'xla', or 'cudnn' on GPUs)."""
    dense = mask.dense()[:, None]  # [B, 1, T, S]: packed rows need more than is_causal
    return jax.nn.dot_product_attention(
        q_btnh, k_bskh, v_bskh, mask=dense, scale=scale, implementation=implementation
    )


def resolve(name: str, softcap: float, platform: str | None = None, per_layer_windows: bool = False) -> str:
    """The kernel `name` stands for on this platform; refuses a kernel the model cannot use."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention={name!r} is not one of {IMPLEMENTATIONS}")
    platform = platform or jax.default_backend()
    if name == "auto":
        if platform == "gpu" and not softcap:
            return "cudnn"
        return "splash" if platform == "tpu" and not per_layer_windows else "flash"
    if name in ("xla_sdpa", "cudnn") and softcap:
        raise ValueError(
            f"config.model.attention={name!r} does not soft-cap attention logits (this model has "
            f"attn_softcap={softcap}); use 'flash', 'chunked' or 'reference'"
        )
    if name == "cudnn" and platform != "gpu":
        raise ValueError(f"config.model.attention='cudnn' needs a GPU (this is {platform}); use 'auto'")
    if name == "splash" and per_layer_windows:
        raise ValueError(
            "config.model.attention='splash' needs one attention window for every layer (its mask is "
            "fixed when the step is traced; this model has per-layer windows); use 'flash' or 'auto'"
        )
    return name


def attend(
    name: str,
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    mask: Mask,
    scale: float,
    softcap: float = 0.0,
    chunk: int = 128,
    static_window: int = 0,
) -> jax.Array:
    """Self-attention with the kernel `name` (already resolved). `static_window`: the model's one
    sliding window as a Python int (splash builds its mask from it; the others read `mask.window`)."""
    if name == "reference":
        return reference_attention(q_btnh, k_bskh, v_bskh, mask.dense(), scale, softcap)
    if name == "chunked":
        return chunked_attention(q_btnh, k_bskh, v_bskh, mask, scale, softcap, chunk)
    if name == "flash":
        return flash_attention(q_btnh, k_bskh, v_bskh, mask.start_bt, mask.window, scale, softcap, chunk)
    if name == "splash":
        return splash_attention(q_btnh, k_bskh, v_bskh, mask.start_bt, static_window, scale, softcap, chunk)
    return sdpa_attention(q_btnh, k_bskh, v_bskh, mask, scale, "cudnn" if name == "cudnn" else None)
