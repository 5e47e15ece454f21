#!/usr/bin/env bash
# The accelerator check: every attention kernel against the reference on this device, then the train
# step of a Llama-shape 1B model (4096-token packed rows, bf16 compute) with its MFU, as JSON.
#
#   launch/gpu_check.sh [OUT_DIR]            # on a GPU (or TPU) host with jsft installed
#   launch/gpu_check.sh --dry-run [OUT_DIR]  # tiny shapes on the CPU: checks the script itself
#
# Writes OUT_DIR/attention_check.json and OUT_DIR/bench_llama1b.json (default OUT_DIR: $OUT or
# ./gpu_check_out) and prints both tables. Exits non-zero if a kernel disagrees with the reference.
set -euo pipefail
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY=1
  shift
fi
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.."

"$PYTHON" - "$OUT_DIR" "$DRY" <<'PY'
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jsft.models import attention

out_dir, dry = sys.argv[1], sys.argv[2] == "1"
b, t, n, k, h = (2, 64, 4, 2, 16) if dry else (2, 4096, 32, 8, 128)
keys = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32)
kk = jax.random.normal(keys[1], (b, t, k, h), jnp.float32)
v = jax.random.normal(keys[2], (b, t, k, h), jnp.float32)
seg = np.zeros((b, t), np.int32)
seg[:, : t // 3], seg[:, t // 3 : t - 5] = 1, 2
mask = attention.Mask.from_segments(jnp.asarray(seg))
platform = jax.default_backend()
kernels = ["flash", "chunked", "xla_sdpa"] + (["cudnn"] if platform == "gpu" else [])
def value_and_grads(name, dtype):
    f = lambda q, kk, v: jnp.sum(attention.attend(name, q.astype(dtype), kk.astype(dtype), v.astype(dtype), mask, h**-0.5).astype(jnp.float32) ** 2)
    return jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, kk, v)
rows, ok = [], True
for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)):
    ref = value_and_grads("reference", dtype)
    for name in kernels:
        try:
            got = value_and_grads(name, dtype)
        except Exception as e:  # a kernel this device or build cannot run is reported, not fatal
            rows.append({"kernel": name, "dtype": str(jnp.dtype(dtype)), "error": str(e)[:200]})
            continue
        err = max(float(jnp.max(jnp.abs(a - b_) / (1 + jnp.abs(b_)))) for a, b_ in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
        rows.append({"kernel": name, "dtype": str(jnp.dtype(dtype)), "max_rel_err": err, "ok": err < tol})
        ok &= err < tol
with open(f"{out_dir}/attention_check.json", "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "shape": [b, t, n, k, h], "results": rows}, f, indent=1)
for r in rows:
    print("attention", r)
sys.exit(0 if ok else 1)
PY

if [[ $DRY -eq 1 ]]; then
  SHRINK=(--config.model.d_model=64 --config.model.n_layers=2 --config.model.n_heads=4 --config.model.n_kv_heads=2
          --config.model.head_dim=16 --config.model.mlp_dim=128 --config.model.vocab_size=512 --config.data.seq_len=128
          --config.data.batch_size=2 --config.loss.chunk_len=64 --config.model.attention_chunk=64
          --config.model.compute_dtype=float32 --train_steps=12)
else
  SHRINK=(--train_steps=30)
fi
"$PYTHON" -m jsft.bench train --config configs/bench_workload.py:llama1b --rows synthetic \
  --json "$OUT_DIR/bench_llama1b.json" "${SHRINK[@]}"
