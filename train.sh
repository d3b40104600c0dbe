#!/usr/bin/env bash
# Train on one node: bash train.sh <nproc> <config> [tag] [extra main.py args...]
# On a machine without GPUs the processes run on the CPU (gloo).
# If one process fails, torchrun stops the others; SIGTERM to torchrun reaches every process,
# which stop at the next step and save a resumable checkpoint (torchrun then exits nonzero):
# run the same command again to continue.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash train.sh <nproc> <config> [tag] [extra main.py args...]" >&2
  exit 2
fi
NPROC=$1; CONFIG=$2; shift 2
TAG_ARGS=()
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then TAG_ARGS=(--tag "$1"); shift; fi
PYTHON=${PYTHON:-python}
DATA_ARGS=()
if [ -n "${DATA_PATH:-}" ]; then DATA_ARGS=(--data-path "$DATA_PATH"); fi
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$NPROC" \
  main.py --cfg "$CONFIG" "${TAG_ARGS[@]}" "${DATA_ARGS[@]}" "$@"
