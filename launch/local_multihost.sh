#!/usr/bin/env bash
# Run jsft as N cooperating processes on this machine (JAX multi-controller over 127.0.0.1).
#
#   launch/local_multihost.sh N --config configs/demo.py --workdir /tmp/run [--config.x=y ...]
#
# Each process gets LOCAL_DEVICES simulated CPU devices (default 2) unless JAX_PLATFORMS says
# otherwise; process 0 prints, the others log to WORKDIR/process_<i>.log. PORT picks the
# coordinator port (default: a free one). Exits non-zero if any process fails.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 N --config CONFIG --workdir DIR [more jsft.main flags]" >&2
  exit 2
fi
N=$1
shift
ARGS=("$@")
WORKDIR=""
for a in "${ARGS[@]}"; do
  case "$a" in --workdir=*) WORKDIR="${a#--workdir=}" ;; esac
done
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  [[ "${ARGS[$i]}" == "--workdir" ]] && WORKDIR="${ARGS[$((i + 1))]:-}"
done
if [[ -z "$WORKDIR" ]]; then
  echo "$0: --workdir is required (the processes share it)" >&2
  exit 2
fi
mkdir -p "$WORKDIR"
PYTHON=${PYTHON:-python}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
LOCAL_DEVICES=${LOCAL_DEVICES:-2}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
if [[ "$JAX_PLATFORMS" == "cpu" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$LOCAL_DEVICES"
fi

echo "+ $N processes, coordinator 127.0.0.1:$PORT, $LOCAL_DEVICES devices each ($JAX_PLATFORMS)"
echo "+ $PYTHON -m jsft.main ${ARGS[*]} --coordinator_address=127.0.0.1:$PORT --num_processes=$N --process_id=<i>"
pids=()
for ((i = 0; i < N; i++)); do
  cmd=("$PYTHON" -m jsft.main "${ARGS[@]}" "--coordinator_address=127.0.0.1:$PORT" "--num_processes=$N"
       "--process_id=$i")
  if [[ $i -eq 0 ]]; then
    "${cmd[@]}" &
  else
    "${cmd[@]}" >"$WORKDIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "$0: process $i failed (see $WORKDIR/process_$i.log for i > 0)" >&2
    status=1
  fi
done
exit $status
