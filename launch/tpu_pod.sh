#!/usr/bin/env bash
# Run jsft on every worker of a Cloud TPU VM pod slice (one process per host; JAX finds the pod).
#
#   TPU_NAME=my-v5p ZONE=us-east5-a PROJECT=my-proj [ACCELERATOR=v5p-64 CREATE=1] \
#     launch/tpu_pod.sh [--dry-run] --config configs/llama3_8b_sft.py:v5p-64 --workdir gs://bucket/run [...]
#
# Steps: (optionally) create the slice, copy this repository to every worker, install it there, then
# start `python -m jsft.main` with the given flags on all workers at once. A gs:// workdir works (the
# `gcs` extra installs gcsfs): checkpoints go to the bucket through orbax/tensorstore, logs and metrics
# to $JSFT_LOCAL_DIR (default /tmp/jsft) on each worker. --dry-run prints the commands only.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/launch/lib.sh"
dry_run_switch "$@" && shift
require_env "e.g. TPU_NAME=my-v5p ZONE=us-east5-a PROJECT=my-project" TPU_NAME ZONE PROJECT
if [[ $# -eq 0 ]]; then
  echo "usage: $0 [--dry-run] --config CONFIG --workdir DIR [more jsft.main flags]" >&2
  exit 2
fi
ACCELERATOR=${ACCELERATOR:-v5p-64}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
REMOTE_DIR=${REMOTE_DIR:-jsft}
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" --project="$PROJECT")

if [[ "${CREATE:-0}" == "1" ]]; then
  run "${GCLOUD[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
fi
ARCHIVE=/tmp/jsft_src.tar.gz
run tar -czf "$ARCHIVE" -C "$REPO" --exclude=.venv --exclude=.git --exclude=workdirs .
run "${GCLOUD[@]}" scp "$ARCHIVE" "$TPU_NAME:/tmp/jsft_src.tar.gz" "${WHERE[@]}" --worker=all
INSTALL="mkdir -p $REMOTE_DIR && tar -xzf /tmp/jsft_src.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && \
python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[gcs]' 'jax[tpu]'"
run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$INSTALL"
FLAGS=$(printf ' %q' "$@")
TRAIN="cd $REMOTE_DIR && . .venv/bin/activate && python -m jsft.main$FLAGS"
run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$TRAIN"
