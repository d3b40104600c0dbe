#!/usr/bin/env bash
# Multi-node training with slurm:
#   bash train_slurm.sh <total_gpus> <config> <job-name> [extra main.py args...]     (interactive)
#   sbatch --nodes=N --ntasks-per-node=8 --gres=gpu:8 --time=72:00:00 --requeue \
#          train_slurm.sh <total_gpus> <config> <job-name> [extra main.py args...]   (batch job)
# Environment (defaults in brackets; PARTITION and TIME only outside a batch job):
#   PARTITION [gpu]  GPUS_PER_NODE [8]  CPUS_PER_TASK [8]  TIME [72:00:00]
#   SIGNAL_SECONDS [180]  DATA_PATH (or pass --data-path)  SRUN_ARGS (extra srun flags)
#   PYTHON [the repository's .venv/bin/python if present, else python]
# Ranks come from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; main.py finds the master node.
#
# Preemption and time limits: srun --signal=USR1@SIGNAL_SECONDS has slurm send SIGUSR1 to
# every task that long before the time limit (SIGTERM on preemption works the same). The
# ranks stop together at the next step boundary, rank 0 saves a mid-epoch checkpoint and
# main.py exits with 75. Inside a batch job (SLURM_JOB_ID set) this script then runs
# `scontrol requeue $SLURM_JOB_ID`: the job goes back to the queue and, when it starts
# again, the same command auto-resumes from that checkpoint. Interactively there is no job
# to requeue (srun's allocation ends with it): run the same command again to continue.
# srun runs as a child (not exec) so that this script sees its exit code;
# --kill-on-bad-exit stops all ranks as soon as one fails.
set -euo pipefail
USAGE="usage: bash train_slurm.sh <total_gpus> <config> <job-name> [extra main.py args...]"
source "$(dirname "$0")/tools/launch_env.sh"
[ $# -ge 3 ] || usage_error "needs <total_gpus>, <config> and <job-name>"
require_count "<total_gpus>" "$1"
require_count "GPUS_PER_NODE" "${GPUS_PER_NODE:-8}"
GPUS=$1; CONFIG=$2; JOB_NAME=$3; shift 3
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
if [ "$GPUS" -lt "$GPUS_PER_NODE" ]; then GPUS_PER_NODE=$GPUS; fi
NODES=$(( (GPUS + GPUS_PER_NODE - 1) / GPUS_PER_NODE ))
DATA_ARGS=()
if [ -n "${DATA_PATH:-}" ]; then DATA_ARGS=(--data-path "$DATA_PATH"); fi
EXIT_PREEMPTED=75  # main.py: stopped by SIGUSR1/SIGTERM after saving a resumable checkpoint
# outside a job srun allocates one; inside, partition and time limit come from sbatch
ALLOC_ARGS=()
if [ -z "${SLURM_JOB_ID:-}" ]; then
  ALLOC_ARGS=(-p "${PARTITION:-gpu}" --job-name="$JOB_NAME" --time="${TIME:-72:00:00}")
fi
rc=0
# shellcheck disable=SC2086
srun "${ALLOC_ARGS[@]}" --nodes="$NODES" \
  --ntasks="$GPUS" --ntasks-per-node="$GPUS_PER_NODE" --gres="gpu:$GPUS_PER_NODE" \
  --cpus-per-task="${CPUS_PER_TASK:-8}" --kill-on-bad-exit=1 \
  --signal="USR1@${SIGNAL_SECONDS:-180}" \
  ${SRUN_ARGS:-} "$PYTHON" -u "$REPO/main.py" --cfg "$CONFIG" --tag "$JOB_NAME" \
  "${DATA_ARGS[@]}" "$@" || rc=$?
if [ "$rc" -eq "$EXIT_PREEMPTED" ]; then
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "train_slurm.sh: stopped after saving a checkpoint; requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
  else
    echo "train_slurm.sh: stopped after saving a checkpoint; run the same command again to continue" >&2
  fi
fi
exit "$rc"
