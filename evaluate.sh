#!/usr/bin/env bash
# Evaluate weights: bash evaluate.sh <nproc> <config> <checkpoint> [extra main.py args...]
# The checkpoint may be ours or a released weight file (weights under 'model',
# 'state_dict', 'model_ema' or at the top level). Prints "* Acc@1 <x> Acc@5 <y> ... on N images"
# last; with --eval-sets a "* Acc@1 ... (<set>)" line per set, then
# "evaluation table: sets.md, sets.json, sets.png in <folder>" last.
# The report goes to a folder of its own per weights, dataset, size and crop,
# output/<MODEL.NAME>/eval-<weights>-<dataset>-<size>px-crop<pct>/ (or --tag NAME).
# Exit code as train.sh's: 0, or 2 with one line for a user mistake.
set -euo pipefail
USAGE="usage: bash evaluate.sh <nproc> <config> <checkpoint> [extra main.py args...]"
source "$(dirname "$0")/tools/launch_env.sh"
[ $# -ge 3 ] || usage_error "needs <nproc>, <config> and <checkpoint>"
require_count "<nproc>" "$1"
NPROC=$1; CONFIG=$2; CKPT=$3; shift 3
DATA_ARGS=()
if [ -n "${DATA_PATH:-}" ]; then DATA_ARGS=(--data-path "$DATA_PATH"); fi
exec "$PYTHON" "$REPO/tools/torchrun.py" --standalone --nnodes 1 --nproc_per_node "$NPROC" \
  "$REPO/main.py" --cfg "$CONFIG" --eval --resume "$CKPT" "${DATA_ARGS[@]}" "$@"
