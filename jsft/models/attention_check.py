"""Every attention kernel this device runs, against the reference: outputs and gradients on packed rows
with grouped-query heads, with and without a sliding window, in float32 and bfloat16, and each kernel's
forward + backward time. The first step of the accelerator check (launch/gpu_check.sh); the CPU tests
run it too (the Pallas GPU kernel in interpret mode).

    python -m jsft.models.attention_check OUT_DIR [--dry-run]

Writes OUT_DIR/attention_check.json, prints one line per kernel, exits 1 if any kernel disagrees or
fails. The error is max |kernel - reference| / (1 + |reference|) over the loss and the three gradients,
against the float32 reference with float32 matmuls (no TF32). Tolerances: float32 kernels 1e-4;
bfloat16 kernels twice the bfloat16 reference's own error (bf16 rounding of the inputs, probabilities
and outputs, ~2% of a gradient on the dry-run shape; the budget follows it to larger shapes).
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jsft.models import attention

DTYPES = ("float32", "bfloat16")
FLOAT32_TOLERANCE = 1e-4
BF16_BUDGET = 2.0  # x the bfloat16 reference's error
DRY_SHAPE = (2, 64, 4, 2, 16)  # batch, tokens, query heads, key/value heads, head size
DEVICE_SHAPE = (2, 4096, 32, 8, 128)


def kernels_for(platform: str) -> list[tuple[str, str]]:
    """(kernel, dtype) pairs to check on `platform`: the portable kernels, then the platform's own."""
    pairs = [(k, d) for k in ("flash", "chunked", "xla_sdpa") for d in DTYPES]
    if platform == "gpu":
        pairs += [("pallas_gpu", d) for d in DTYPES] + [("cudnn", "bfloat16")]  # cuDNN: no float32
    if platform == "tpu":
        pairs += [("splash", d) for d in DTYPES]
    return pairs


def _inputs(shape):
    b, t, n, k, h = shape
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32)
    kk, v = (jax.random.normal(key, (b, t, k, h), jnp.float32) for key in keys[1:])
    seg = np.zeros((b, t), np.int32)  # three examples and some padding per row
    seg[:, : t // 3], seg[:, t // 3 : t - t // 2], seg[:, t - t // 2 : t - 5] = 1, 2, 3
    return q, kk, v, jnp.asarray(seg)


def _loss_and_grads(name, dtype, q, k, v, mask, window):
    h = q.shape[-1]

    def loss(q, k, v):
        out = attention.attend(name, *(x.astype(dtype) for x in (q, k, v)), mask, h**-0.5, 0.0, 128, window)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))


def _error(got, ref) -> float:
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True)
    return max(float(jnp.max(jnp.abs(a - b) / (1 + jnp.abs(b)))) for a, b in pairs)


def check(
    pairs: list[tuple[str, str]],
    shape: tuple[int, ...] = DRY_SHAPE,
    windows: tuple[int, ...] = (0, 13),
    repeats: int = 3,
) -> list[dict]:
    """One row per (kernel, dtype, window): its error against the float32 reference, the tolerance,
    whether it is within it, and milliseconds per forward + backward (or the error a kernel raised)."""
    q, k, v, seg = _inputs(shape)
    rows = []
    with jax.default_matmul_precision("float32"):
        for window in windows:
            mask = attention.Mask.from_segments(seg, window)
            ref = _loss_and_grads("reference", "float32", q, k, v, mask, window)(q, k, v)
            ref_bf16 = _loss_and_grads("reference", "bfloat16", q, k, v, mask, window)(q, k, v)
            tolerance = {"float32": FLOAT32_TOLERANCE, "bfloat16": BF16_BUDGET * _error(ref_bf16, ref)}
            for name, dtype in pairs:
                row = {"kernel": name, "dtype": dtype, "window": window, "tolerance": tolerance[dtype]}
                try:
                    step = _loss_and_grads(name, dtype, q, k, v, mask, window)
                    got = jax.block_until_ready(step(q, k, v))
                    start = time.perf_counter()
                    for _ in range(repeats):
                        jax.block_until_ready(step(q, k, v))
                    if repeats:
                        row["ms_fwd_bwd"] = 1e3 * (time.perf_counter() - start) / repeats
                except Exception as e:  # reported in its row (and fails the check), not raised
                    rows.append({**row, "error": f"{type(e).__name__}: {str(e)[:300]}", "ok": False})
                    continue
                err = _error(got, ref)
                rows.append({**row, "max_rel_err": err, "ok": err <= tolerance[dtype]})
    return rows


def main(argv: list[str]) -> int:
    dry = "--dry-run" in argv
    out_dir = next(a for a in argv if a != "--dry-run")
    shape = DRY_SHAPE if dry else DEVICE_SHAPE
    windows = (0, shape[1] // 5)
    rows = check(kernels_for(jax.default_backend()), shape, windows)
    with open(f"{out_dir}/attention_check.json", "w") as f:
        json.dump(
            {"device": jax.devices()[0].device_kind, "shape": list(shape), "results": rows}, f, indent=1
        )
    for row in rows:
        print("attention", row)
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
