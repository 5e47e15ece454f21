"""Attention kernels, chosen by name (`config.model.attention`), and the packing-aware mask.

Every kernel takes q [B, T, N, H], k and v [B, S, K, H] (grouped-query: N = K * G) and a `Mask`, and
returns [B, T, N, H]. Packed examples are contiguous in a row, so "query t may see key s" is
`start[t] <= s <= t` (plus `t - s < window` with a sliding window), where `start[t]` is the first
position of t's example: no [T, S] array is needed to say it.

  reference   plain XLA over the whole row: [B, K, G, T, S] float32 scores (the oracle)
  chunked     queries in chunks of `chunk` rows; each chunk attends only to the keys up to its last
              row (the causal triangle's empty blocks are never computed), and is rematerialised in
              the backward pass. Runs everywhere, but XLA may schedule several chunks' [B, K, G, chunk,
              S] scores at once (the 8B planner's activations were 4 GB higher than with `flash`).
  flash       blocks of queries x blocks of keys with an online softmax and a hand-written backward
              (jsft/models/flash.py): one [B, K, G, chunk, chunk] block at a time, empty blocks skipped.
              Runs everywhere; the default on CPUs (on the shared CPU benchmark within 3% of `chunked`).
  pallas_gpu  GPU flash attention as Pallas (Triton) kernels, forward and backward (jsft/models/
              pallas_gpu.py): packing, causal, windows (per layer too), soft-cap, GQA, any dtype.
  cudnn       cuDNN's fused kernel through jax.nn.dot_product_attention: its own causal mask and
              sliding window; float16/bfloat16 only, heads up to 128 wide, no soft-cap, one window for
              all layers. Packed rows add a boolean [B, 1, T, S] same-example mask: JAX's public API has
              no segment form (the private packed layout of jax 0.10 needs a Hopper GPU and mis-strides
              grouped-query keys, jax-ml/jax#39521).
  xla_sdpa    jax.nn.dot_product_attention's XLA path over a dense [B, 1, T, S] mask; no soft-cap.
  splash      TPU splash attention (Pallas, block-sparse; jsft/models/splash.py); per-layer windows
              (Gemma 2, 3) as one kernel per distinct window, each layer switching to its own.
  auto        TPU: splash. GPU: cudnn where it takes the model and the
              rows (half-precision compute, head size <= 128 and a multiple of 8, no soft-cap, one
              window, unpacked rows), else pallas_gpu. Elsewhere: flash.

The Pallas kernels run off their platform only in interpret mode (the CPU tests); a run refuses them
there (`resolve(..., interpret_ok=False)`). Scores and softmax are float32 in every kernel but cudnn
(cuDNN's own); q.k and p.v accumulate in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jsft.models.flash import flash_attention
from jsft.models.pallas_gpu import pallas_gpu_attention
from jsft.models.splash import splash_attention

IMPLEMENTATIONS = ("auto", "reference", "chunked", "flash", "pallas_gpu", "splash", "xla_sdpa", "cudnn")
_NATIVE_PLATFORM = {"splash": "tpu", "pallas_gpu": "gpu", "cudnn": "gpu"}  # the others run everywhere
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128  # 256 on Hopper and later; 128 holds on every GPU cuDNN's flash kernel runs on


@dataclasses.dataclass(frozen=True)
class Mask:
    """Which keys each query sees, for rows of packed examples (contiguous segments).

    `start_bt`: the first position of each query's example (padding, segment 0 at the row's end, is
    an example of its own, so no query row is empty). `window`: a sliding window (0: none); it may be a
    traced scalar (per-layer windows under scan). `packed`: False when every row is known to hold one
    example (no segment ids were given), so causality alone is the mask.
    """

    start_bt: jax.Array
    window: jax.Array | int = 0
    packed: bool = True

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
    """jax.nn.dot_product_attention's XLA path (`implementation` None or 'xla') over the dense mask."""
    dense = mask.dense()[:, None]  # [B, 1, T, S]: packed rows need more than is_causal
    return jax.nn.dot_product_attention(
        q_btnh, k_bskh, v_bskh, mask=dense, scale=scale, implementation=implementation
    )


def cudnn_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    mask: Mask,
    scale: float | None = None,
    static_window: int = 0,
    implementation: str = "cudnn",
) -> jax.Array:
    """cuDNN's fused attention: causality and the sliding window as cuDNN's own masks (empty blocks
    skipped); packed rows add a boolean [B, 1, T, S] same-example mask (cuDNN turns it into a bias).
    `implementation='xla'` runs the same arguments through XLA (how the CPU tests check them)."""
    same_example = None
    if mask.packed:
        s = jnp.arange(mask.start_bt.shape[1])
        same_example = (s[None, None, :] >= mask.start_bt[:, :, None])[:, None]
    return jax.nn.dot_product_attention(
        q_btnh,
        k_bskh,
        v_bskh,
        mask=same_example,
        scale=scale,
        is_causal=True,
        local_window_size=(static_window - 1, 0) if static_window else None,
        implementation=implementation,
    )


def unusable(
    name: str,
    platform: str,
    softcap: float = 0.0,
    per_layer_windows: bool = False,
    dtype: Any = None,
    head_dim: int | None = None,
    interpret_ok: bool = True,
) -> str:
    """Why kernel `name` cannot run this model on `platform` ('' when it can). `dtype` and `head_dim`
    (compute dtype, head size) are checked when given; `interpret_ok`: a Pallas kernel may run off its
    platform in interpret mode (tests), else it is refused there."""
    native = _NATIVE_PLATFORM.get(name)
    if native and platform != native and (name == "cudnn" or not interpret_ok):
        interpreted = "" if name == "cudnn" else ", elsewhere only in Pallas interpret mode (very slow)"
        return f"runs on {native.upper()}s{interpreted}; this is {platform}: use 'auto' or 'flash'"
    if name in ("xla_sdpa", "cudnn") and softcap:
        return (
            f"does not soft-cap attention logits (this model has attn_softcap={softcap}); use 'auto', "
            "'flash' or 'pallas_gpu'"
        )
    if name == "cudnn" and per_layer_windows:
        return (
            "needs one attention window for every layer (its mask is fixed when the step is traced; this "
            "model has per-layer windows); use 'auto' or 'pallas_gpu'"
        )
    if name == "cudnn" and dtype is not None and jnp.dtype(dtype).name not in CUDNN_DTYPES:
        return (
            f"takes {'/'.join(CUDNN_DTYPES)} only (this model computes in {jnp.dtype(dtype).name}); use "
            "'auto' or 'pallas_gpu', or config.model.compute_dtype=bfloat16"
        )
    if name == "cudnn" and head_dim is not None and (head_dim > CUDNN_MAX_HEAD_DIM or head_dim % 8):
        return (
            f"takes heads up to {CUDNN_MAX_HEAD_DIM} wide in multiples of 8 (this model's are {head_dim}); "
            "use 'auto' or 'pallas_gpu'"
        )
    return ""


def resolve(
    name: str,
    softcap: float,
    platform: str | None = None,
    per_layer_windows: bool = False,
    *,
    dtype: Any = None,
    head_dim: int | None = None,
    packed: bool = True,
    interpret_ok: bool = True,
) -> str:
    """The kernel `name` stands for on `platform` (default: this one); ValueError for a kernel the
    model or the platform cannot use. `auto` takes cuDNN only when the compute dtype and head size are
    given and it takes them, and the rows are unpacked (`packed=False`); see the module docstring."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention={name!r} is not one of {IMPLEMENTATIONS}")
    platform = platform or jax.default_backend()
    model = dict(softcap=softcap, per_layer_windows=per_layer_windows, dtype=dtype, head_dim=head_dim)
    if name == "auto":
        if platform == "gpu":
            known = dtype is not None and head_dim is not None
            return (
                "cudnn" if known and not packed and not unusable("cudnn", platform, **model) else "pallas_gpu"
            )
        return "splash" if platform == "tpu" else "flash"
    why = unusable(name, platform, **model, interpret_ok=interpret_ok)
    if why:
        raise ValueError(f"config.model.attention={name!r} {why}")
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
    layer_windows: tuple = (),
) -> jax.Array:
    """Self-attention with the kernel `name` (already resolved). `static_window`: the model's one
    sliding window as a Python int (splash builds its mask from it; the others read `mask.window`).
    `layer_windows`: a model's per-layer windows; splash then builds one kernel per distinct window
    (per layer type: Gemma's sliding and global layers) and each layer runs the one its traced
    `mask.window` names, through `lax.switch` (only the chosen branch executes)."""
    if name == "splash" and len(set(layer_windows)) > 1:
        windows = sorted(set(layer_windows))
        index = sum(jnp.where(jnp.asarray(mask.window) == w, i, 0) for i, w in enumerate(windows))

        def one_window(w):
            return lambda q, k, v, start: splash_attention(q, k, v, start, w, scale, softcap, chunk)

        branches = [one_window(w) for w in windows]
        return jax.lax.switch(index, branches, q_btnh, k_bskh, v_bskh, mask.start_bt)
    if name == "splash" and layer_windows:
        static_window = layer_windows[0]
    if name == "reference":
        return reference_attention(q_btnh, k_bskh, v_bskh, mask.dense(), scale, softcap)
    if name == "chunked":
        return chunked_attention(q_btnh, k_bskh, v_bskh, mask, scale, softcap, chunk)
    if name == "flash":
        return flash_attention(q_btnh, k_bskh, v_bskh, mask.start_bt, mask.window, scale, softcap, chunk)
    if name == "pallas_gpu":
        return pallas_gpu_attention(q_btnh, k_bskh, v_bskh, mask.start_bt, mask.window, scale, softcap, chunk)
    if name == "splash":
        return splash_attention(q_btnh, k_bskh, v_bskh, mask.start_bt, static_window, scale, softcap, chunk)
    if name == "cudnn":
        return cudnn_attention(q_btnh, k_bskh, v_bskh, mask, scale, static_window)
    return sdpa_attention(q_btnh, k_bskh, v_bskh, mask, scale)
