#!/usr/bin/env bash
# Evaluate weights: bash evaluate.sh <nproc> <config> <checkpoint> [extra main.py args...]
# The checkpoint may be ours or a released weight file (weights under 'model',
# 'state_dict', 'model_ema' or at the top level). Prints "* Acc@1 <x> Acc@5 <y>" last.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash evaluate.sh <nproc> <config> <checkpoint> [extra main.py args...]" >&2
  exit 2
fi
NPROC=$1; CONFIG=$2; CKPT=$3; shift 3
PYTHON=${PYTHON:-python}
DATA_ARGS=()
if [ -n "${DATA_PATH:-}" ]; then DATA_ARGS=(--data-path "$DATA_PATH"); fi
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$NPROC" \
  main.py --cfg "$CONFIG" --eval --resume "$CKPT" --tag eval "${DATA_ARGS[@]}" "$@"
