#!/usr/bin/env bash
# Train on one node or several: bash train.sh <nproc> <config> [tag] [extra main.py args...]
# torchrun starts <nproc> processes per node (CPU with gloo where there is no GPU). Several nodes
# without slurm: the same command on each node with NNODES and either NODE_RANK (0 ..
# NNODES-1), MASTER_ADDR (node 0's address) and MASTER_PORT (default 29500), or
# RDZV_ENDPOINT=host:port (torchrun's c10d rendezvous; RDZV_ID names the job). Exit code as
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
NODES=(--standalone --nnodes 1)
if [ "${NNODES:-1}" != 1 ]; then
  require_count NNODES "$NNODES"
  NODES=(--nnodes "$NNODES")
  if [ -n "${RDZV_ENDPOINT:-}" ]; then
    NODES+=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-train}")
  else
    [[ "${NODE_RANK:-}" =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NNODES" ] \
      || usage_error "NNODES=$NNODES needs NODE_RANK (0 to $((NNODES - 1)), got '${NODE_RANK:-}') and MASTER_ADDR, or RDZV_ENDPOINT"
    [ -n "${MASTER_ADDR:-}" ] || usage_error "NNODES=$NNODES needs MASTER_ADDR (node 0's address), or RDZV_ENDPOINT"
    NODES+=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
  fi
fi
exec "$PYTHON" "$REPO/tools/torchrun.py" "${NODES[@]}" --nproc_per_node "$NPROC" \
  "$REPO/main.py" --cfg "$CONFIG" "${TAG_ARGS[@]}" "${DATA_ARGS[@]}" "$@"
