#!/usr/bin/env bash
# The accelerator check: every attention kernel against the reference on this device (outputs and
# gradients, fp32 and bf16, with each kernel's time; jsft/models/attention_check.py), then the train
# step of a Llama-shape 1B model (4096-token packed rows, bf16 compute, `auto` attention) with its MFU.
#
#   launch/gpu_check.sh [OUT_DIR]            # on a GPU (or TPU) host with jsft installed
#   launch/gpu_check.sh --dry-run [OUT_DIR]  # tiny shapes on the CPU: checks the script itself
#
# Writes OUT_DIR/attention_check.json and OUT_DIR/bench_llama1b.json (default OUT_DIR: $OUT or
# ./gpu_check_out) and prints both tables. Exits non-zero if a kernel disagrees with the reference or
# fails (the benchmark still runs, so one session on the device reports both).
set -euo pipefail
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY=1
  shift
fi
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.."

# Every attention kernel this device runs (GPU: pallas_gpu in float32 and bfloat16, cudnn in bfloat16,
# and the portable ones) against the reference, before the benchmark; its verdict is the exit status.
CHECK=("$OUT_DIR")
if [[ $DRY -eq 1 ]]; then CHECK+=(--dry-run); fi
CHECK_RC=0
"$PYTHON" -m jsft.models.attention_check "${CHECK[@]}" || CHECK_RC=$?

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
exit $CHECK_RC
