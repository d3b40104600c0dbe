#!/usr/bin/env bash
# Multi-node training with slurm:
#   bash train_slurm.sh <total_gpus> <config> <job-name> [extra main.py args...]
# Environment (defaults in brackets):
#   PARTITION [gpu]  GPUS_PER_NODE [8]  CPUS_PER_TASK [8]  TIME [72:00:00]
#   DATA_PATH (or pass --data-path)  PYTHON [python]  SRUN_ARGS (extra srun flags)
# Ranks come from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; main.py finds the master node.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash train_slurm.sh <total_gpus> <config> <job-name> [extra main.py args...]" >&2
  exit 2
fi
GPUS=$1; CONFIG=$2; JOB_NAME=$3; shift 3
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
if [ "$GPUS" -lt "$GPUS_PER_NODE" ]; then GPUS_PER_NODE=$GPUS; fi
NODES=$(( (GPUS + GPUS_PER_NODE - 1) / GPUS_PER_NODE ))
DATA_ARGS=()
if [ -n "${DATA_PATH:-}" ]; then DATA_ARGS=(--data-path "$DATA_PATH"); fi
# shellcheck disable=SC2086
exec srun -p "${PARTITION:-gpu}" --job-name="$JOB_NAME" --nodes="$NODES" \
  --ntasks="$GPUS" --ntasks-per-node="$GPUS_PER_NODE" --gres="gpu:$GPUS_PER_NODE" \
  --cpus-per-task="${CPUS_PER_TASK:-8}" --time="${TIME:-72:00:00}" --kill-on-bad-exit=1 \
  ${SRUN_ARGS:-} "${PYTHON:-python}" -u main.py --cfg "$CONFIG" --tag "$JOB_NAME" \
  "${DATA_ARGS[@]}" "$@"
