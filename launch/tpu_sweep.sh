#!/usr/bin/env bash
# A sweep on Cloud TPU VMs: one sweep worker per slice (single-host slices such as v5e-8 or v4-8),
# all sharing one study store.
#
#   SLICES="sweep-a sweep-b" ZONE=us-west4-a PROJECT=my-proj STORAGE=postgresql://u:p@10.0.0.2/jsft \
#     DIR=/mnt/shared/sweeps/lr launch/tpu_sweep.sh [--dry-run] --sweep configs/sweeps/demo_lr.py
#
# Each slice gets this repository, installs it (gcs extra, jax[tpu]) and starts `python -m jsft.sweep
# --workers 1` in the background (nohup, log in DIR/worker-<slice>.log). Workers coordinate only
# through the store (STORAGE: an RDB URL the slices can reach) and DIR, which must be a file system
# every slice mounts (Filestore, GCSFuse) so a dead worker's trial can be resumed by another. With
# `s.workdirs = "gs://bucket/sweeps/NAME"` in the sweep file the trials' checkpoints go to the bucket
# instead (the `gcs` extra is installed), their logs and metrics stay in DIR.
# --dry-run prints the commands only.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/launch/lib.sh"
dry_run_switch "$@" && shift
require_env "" SLICES ZONE PROJECT STORAGE DIR
if [[ $# -eq 0 ]]; then
  echo "usage: $0 [--dry-run] --sweep SWEEP_FILE" >&2
  exit 2
fi
REMOTE_DIR=${REMOTE_DIR:-jsft}
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" --project="$PROJECT")

ARCHIVE=/tmp/jsft_src.tar.gz
run tar -czf "$ARCHIVE" -C "$REPO" --exclude=.venv --exclude=.git --exclude=workdirs .
FLAGS=$(printf ' %q' "$@")
for SLICE in $SLICES; do
  run "${GCLOUD[@]}" scp "$ARCHIVE" "$SLICE:/tmp/jsft_src.tar.gz" "${WHERE[@]}" --worker=0
  INSTALL="mkdir -p $REMOTE_DIR && tar -xzf /tmp/jsft_src.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && \
python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[gcs]' 'jax[tpu]'"
  run "${GCLOUD[@]}" ssh "$SLICE" "${WHERE[@]}" --worker=0 --command="$INSTALL"
  WORKER="cd $REMOTE_DIR && . .venv/bin/activate && nohup python -m jsft.sweep$FLAGS --dir $DIR \
--storage '$STORAGE' --workers 1 > $DIR/worker-$SLICE.log 2>&1 &"
  run "${GCLOUD[@]}" ssh "$SLICE" "${WHERE[@]}" --worker=0 --command="$WORKER"
done
