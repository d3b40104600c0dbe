#!/usr/bin/env bash
# Train on one node: bash train.sh <nproc> <config> [tag] [extra main.py args...]
# torchrun starts <nproc> processes (CPU with gloo where there is no GPU). Exit code as
# main.py's, whichever process it came from: 0 done, 2 a user mistake (its one line is
# printed once), 3 diverged, 75 stopped after saving (SIGTERM or Ctrl-C to this script
# reaches every process; run the same command again to continue); else a crash.
set -euo pipefail
USAGE="usage: bash train.sh <nproc> <config> [tag] [extra main.py args...]"
source "$(dirname "$0")/tools/launch_env.sh"
[ $# -ge 2 ] || usage_error "needs <nproc> and <config>"
require_count "<nproc>" "$1"
NPROC=$1; CONFIG=$2; shift 2
TAG_ARGS=()
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then TAG_ARGS=(--tag "$1"); shift; fi
DATA_ARGS=()
if [ -n "${DATA_PATH:-}" ]; then DATA_ARGS=(--data-path "$DATA_PATH"); fi
exec "$PYTHON" "$REPO/tools/torchrun.py" --standalone --nnodes 1 --nproc_per_node "$NPROC" \
  "$REPO/main.py" --cfg "$CONFIG" "${TAG_ARGS[@]}" "${DATA_ARGS[@]}" "$@"
