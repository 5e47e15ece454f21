"""Block-wise weight quantization for QLoRA: int8 and NF4, dequantized on the fly in the matmul.

A weight keeps its shape and its logical axes; blocks run along its last axis (`block` consecutive
values share one float32 absmax scale), so a quantized weight shards like the float one:

    int8  codes int8 [..., n],      scale [..., n / block]: w ~= code * scale, scale = absmax / 127
    nf4   codes uint8 [..., n / 2], scale [..., n / block]: w ~= NF4[code] * absmax, two codes a byte

NF4 is the 4-bit NormalFloat of QLoRA (Dettmers et al. 2023, table in their appendix; bitsandbytes
uses the same 16 values): quantiles of N(0, 1) scaled to [-1, 1] with an exact zero. Round to the
nearest level, so the error bound per value is half the widest gap times the block's absmax
(`error_bound`). Scales stay float32 (no double quantization): 4.5 bits per weight for NF4 with
blocks of 64, 8.5 for int8.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("int8", "nf4")

NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)


def block_size(last_dim: int, block: int) -> int:
    """The block actually used along an axis of `last_dim`: `block`, or the whole axis when shorter.
    ValueError when it does not divide the axis (or, for NF4's byte pairs, is odd)."""
    b = min(block, last_dim)
    if last_dim % b or b % 2:
        raise ValueError(
            f"config.peft.quant_block: a block of {b} does not divide a weight's last dimension ({last_dim}) "
            "into whole, even blocks"
        )
    return b


def quantize(w: jax.Array, fmt: str, block: int) -> tuple[jax.Array, jax.Array]:
    """(codes, scales) of `w` (any float dtype) in `fmt`, blocks of `block` along the last axis."""
    if fmt not in FORMATS:
        raise ValueError(f"quantization format {fmt!r} is not one of {FORMATS}")
    n = w.shape[-1]
    b = block_size(n, block)
    blocks = w.astype(jnp.float32).reshape(*w.shape[:-1], n // b, b)
    absmax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    if fmt == "int8":
        scale = safe / 127.0
        codes = jnp.clip(jnp.round(blocks / scale), -127, 127).astype(jnp.int8)
        return codes.reshape(w.shape), scale[..., 0]
    normed = blocks / safe  # in [-1, 1]
    # The nearest level: how many midpoints between neighbouring levels lie below the value.
    midpoints = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
    codes = jnp.searchsorted(midpoints, normed).astype(jnp.uint8).reshape(w.shape)
    packed = (codes[..., 0::2] << 4) | codes[..., 1::2]
    return packed, safe[..., 0]


def dequantize(codes: jax.Array, scale: jax.Array, fmt: str, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The float weight [..., n] of `quantize`'s output, in `dtype`."""
    if fmt == "int8":
        values = codes.astype(jnp.float32)
    else:
        hi, lo = codes >> 4, codes & 0x0F
        idx = jnp.stack([hi, lo], axis=-1).reshape(*codes.shape[:-1], codes.shape[-1] * 2)
        values = jnp.asarray(NF4)[idx]
    n, nb = values.shape[-1], scale.shape[-1]
    blocks = values.reshape(*values.shape[:-1], nb, n // nb) * scale[..., None]
    return blocks.reshape(values.shape).astype(dtype)


def stored_shapes(shape: tuple[int, ...], fmt: str, block: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(codes shape, scales shape) of a weight of `shape`."""
    n = shape[-1]
    b = block_size(n, block)
    codes = (*shape[:-1], n // 2) if fmt == "nf4" else tuple(shape)
    return codes, (*shape[:-1], n // b)


def error_bound(fmt: str) -> float:
    """The largest |w - dequantize(quantize(w))| per value, as a fraction of its block's absmax."""
    if fmt == "int8":
        return 0.5 / 127.0
    return float(np.max(np.diff(NF4)) / 2)


def bits_per_weight(fmt: str, block: int) -> float:
    """Storage per weight, the float32 scale included."""
    return (8.0 if fmt == "int8" else 4.0) + 32.0 / block
