"""Checksums of a train state's arrays, computed on the devices: written beside every checkpoint and
verified on restore (jsft/train/checkpoint.py), and hashed into a run's identity (jsft/run.py)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsft.train.restore_errors import CorruptCheckpoint

# Two sets of per-dimension odd multipliers: each array gets two position-weighted sums mod 2**32.
_PRIMES = ((2654435761, 2246822519, 3266489917, 668265263), (374761393, 3550635113, 1500450271, 2870177450))


def _as_uint32(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 8:  # [..., 2] words
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 1: jnp.uint8}[size]).astype(jnp.uint32)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Two position-weighted sums of the bits (uint32, wrapping): order-independent reductions, so the
    value is the same on any mesh, and any changed word changes it (but for a 2**-64 chance)."""
    bits = _as_uint32(x)
    sums = []
    for primes in _PRIMES:
        weight = jnp.ones(bits.shape, jnp.uint32)
        for d in range(bits.ndim):
            iota = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d)
            weight = weight + iota * jnp.uint32(primes[d % len(primes)] + 2 * (d // len(primes)))
        sums.append(jnp.sum(bits * (weight | jnp.uint32(1)), dtype=jnp.uint32))
    return jnp.stack(sums)


_checksums_jit = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def checksums(tree: Any) -> dict[str, list[int]]:
    """{leaf path: [two uint32 sums]} of a pytree of (possibly sharded) arrays; computed on device."""
    sums = jax.device_get(_checksums_jit(tree))
    flat, _ = jax.tree_util.tree_flatten_with_path(sums)
    return {jax.tree_util.keystr(path): [int(v) for v in np.asarray(leaf)] for path, leaf in flat}


def verify(tree: Any, expected: dict[str, list[int]]) -> None:
    actual = checksums(tree)
    bad = sorted(k for k in expected if actual.get(k) != expected[k])
    missing = sorted(set(expected) ^ set(actual))
    if bad or missing:
        raise CorruptCheckpoint(
            f"array contents differ from the checksums written at save time: {(bad + missing)[:4]}"
            + (f" and {len(bad) + len(missing) - 4} more" if len(bad) + len(missing) > 4 else "")
        )
