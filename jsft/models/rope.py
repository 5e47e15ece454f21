"""Rotary position embeddings, with the frequency scalings of Hugging Face checkpoints computed as
`transformers` (5.24, `modeling_rope_utils.py`) computes them.

A scaling is a tuple of (key, value) pairs named as in a config.json's `rope_scaling`, e.g.
(("rope_type", "yarn"), ("factor", 4.0), ("original_max_position_embeddings", 32768)). Each type
needs some keys and may have others (ROPE_SCALINGS); any other key is refused by name, so a field
that would change the math in `transformers` is never silently dropped here.

`dynamic` (NTK-aware) scaling recomputes the RoPE base from a sequence length. transformers takes
it as the largest position id of the whole call, plus one, and keeps the largest such length it has
seen in the module until a call shorter than `max_position_embeddings` resets it. jsft is stateless
and takes each example's own length: the largest position among the tokens of its example (a run of
equal segment ids in a packed row; the whole row when unpacked), plus one. The two agree for one
sequence per call, which is the unpacked forward and generation with a KV cache for one prompt (a
prefill from the prompt's length, then each decode step from its own position + 1, the cached keys
keeping the rotation they were written with, as in transformers). They differ when transformers sees
rows of unequal lengths in one call (it uses the longest for all of them, jsft each row its own) and
after transformers has seen a longer call (its cached length); a packed row gives each example what
it would get alone.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# rope_type -> (keys it needs, keys it may have), as transformers validates them. `dynamic` reads the
# config's top-level max_position_embeddings in transformers; jsft keeps that value with the scaling.
ROPE_SCALINGS = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (
        ("factor", "original_max_position_embeddings"),
        ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    ),
    "dynamic": (("factor", "max_position_embeddings"), ()),
}


def rope_scaling_problems(scaling: tuple) -> list[str]:
    """What jsft cannot compute in `scaling` (an unknown type, a missing or unknown key); [] if none."""
    s = dict(scaling)
    kind = s.pop("rope_type", "default")
    if kind not in ROPE_SCALINGS:
        return [f"rope_type={kind!r} is not supported (one of {', '.join(ROPE_SCALINGS)})"]
    required, optional = ROPE_SCALINGS[kind]
    problems = [f"{kind} needs {k!r}" for k in required if s.get(k) is None]
    problems += [f"{k!r} is not a field of {kind} scaling" for k in sorted(set(s) - {*required, *optional})]
    return problems


def rope_frequencies(
    head_dim: int, theta: float, scaling: tuple = (), lengths_bt: jax.Array | None = None
) -> tuple[jax.Array, float]:
    """(inverse frequencies, factor on cos/sin) for `scaling`. The frequencies are [H/2], or [B, T, H/2]
    for `dynamic`, which needs `lengths_bt` (each token's sequence length, see the module docstring)."""
    exponents_h = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents_h)
    s = dict(scaling)
    kind = s.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / s["factor"], 1.0
    if kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * jnp.pi / inv_freq
        scaled = jnp.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return jnp.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, s)
    if kind == "dynamic":
        # The base grows with the length past max_position_embeddings (from the theta given below it).
        factor, old = s["factor"], s["max_position_embeddings"]
        length = jnp.maximum(lengths_bt.astype(jnp.float32), old)[..., None]
        base = theta * ((factor * length / old) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return jnp.where(length > old, 1.0 / (base**exponents_h), inv_freq), 1.0
    return inv_freq, 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(head_dim: int, theta: float, s: dict) -> tuple[jax.Array, float]:
    """YaRN (Peng et al., arXiv 2309.00071): frequencies that turn fewer than `beta_slow` times over
    the original context are interpolated by `factor`, those turning more than `beta_fast` times are
    kept, a linear ramp between; cos/sin are scaled by the attention factor. Defaults and rounding
    follow transformers, falsy values included (a `beta_fast` of 0 means 32, `truncate` null means no
    rounding of the ramp's ends)."""
    factor, old = s["factor"], s["original_max_position_embeddings"]
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    def dim_turning(rotations):  # the (fractional) dimension that turns `rotations` times over `old`
        return head_dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_turning(s.get("beta_fast") or 32), dim_turning(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers does, against a division by zero
    ramp_h = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    keep_h = 1 - ramp_h  # 1: the original frequency, 0: interpolated by `factor`
    pos_freqs = theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep_h) + (1.0 / pos_freqs) * keep_h
    return inv_freq, float(attention_factor)


def example_lengths(positions_bt: jax.Array, start_bt: jax.Array) -> jax.Array:
    """[B, T] each token's example length as transformers' dynamic scaling counts it: the largest
    position among the tokens sharing its example start (`start_bt`, attention.Mask's), plus one."""
    b, t = positions_bt.shape
    key = (jnp.arange(b)[:, None] * t + start_bt).reshape(-1)  # one id per (row, example)
    largest = jax.ops.segment_max(positions_bt.reshape(-1), key, num_segments=b * t)
    return largest[key].reshape(b, t) + 1


def rope_tables(
    positions_bt: jax.Array,
    head_dim: int,
    theta: float,
    scaling: tuple = (),
    start_bt: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, H/2] for the 'rotate half' layout used by Llama and HF checkpoints.
    `start_bt` (each token's example start; default: one example per row) only matters to `dynamic`
    scaling, whose base follows each example's length (module docstring)."""
    lengths_bt = None
    if dict(scaling).get("rope_type") == "dynamic":
        start_bt = jnp.zeros_like(positions_bt) if start_bt is None else start_bt
        lengths_bt = example_lengths(positions_bt, start_bt)
    inv_freq, attention_factor = rope_frequencies(head_dim, theta, scaling, lengths_bt)
    angles_bth = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    cos_bth, sin_bth = jnp.cos(angles_bth), jnp.sin(angles_bth)
    if attention_factor != 1.0:  # YaRN: transformers scales cos and sin, so q.k gains its square
        cos_bth, sin_bth = cos_bth * attention_factor, sin_bth * attention_factor
    return cos_bth, sin_bth


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)
