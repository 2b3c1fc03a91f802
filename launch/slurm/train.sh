#!/bin/bash
# Training (multi-node capable): one `accelerate launch` per node, head-node rendezvous, requeue on
# pre-emption. Resumes from the run's last complete checkpoint on every (re)start (resume=auto).
# Nodes x GPUs: N x G from the sbatch line (default config: DeepSpeed ZeRO-3 across nodes).
# Expected time: MovieLens-1M hybrid/frozen ~10 min on 1 x 8 H100; the CI config ~1 min on 2 CPUs.
#   sbatch -N 2 --gpus-per-node=8 --cpus-per-task=64 launch/slurm/train.sh configs/train/<job>.yaml [key=value ...]
#   ACCEL_CONFIG=launch/accelerate/cpu_ddp_2proc.yaml PROCS_PER_NODE=2 sbatch -c 2 launch/slurm/train.sh configs/train/<job>.yaml
# Pre-emption: --signal=USR1@120 (no "B:": it goes to the srun step) reaches torchrun, which forwards
# it (PET_SIGNALS_TO_HANDLE); training saves, rank 0 runs `scontrol requeue`, workers exit 124.
# An admin `scontrol requeue` (SIGTERM, then SIGKILL after KillWait) resumes from the last periodic save.
#SBATCH --job-name=lmrec-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
source "${LMREC_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/launch/slurm/_common.sh"
need_config "${1:-}"
CONFIG=$1; shift
ACCEL_CONFIG=${ACCEL_CONFIG:-launch/accelerate/multinode_zero3.yaml}
[[ -f "$ACCEL_CONFIG" ]] || { echo "ERROR: ACCEL_CONFIG $ACCEL_CONFIG not found" >&2; exit 2; }
NNODES=$SLURM_JOB_NUM_NODES
PPN=$(procs_per_node)
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
PORT=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
ARGS=$(quote_args "$@")
log "train: $NNODES node(s) x $PPN proc(s), head $HEAD:$PORT, accelerate config $ACCEL_CONFIG, config $CONFIG$ARGS"
# \$SLURM_NODEID is escaped: expanded by each node's own shell, so every node gets its own rank
# (an unescaped one is expanded once here and every node believes it is machine 0: accelerate #2816)
set +e
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c "exec accelerate launch -q --config_file $ACCEL_CONFIG \
  --num_machines $NNODES --num_processes $((NNODES * PPN)) --machine_rank \$SLURM_NODEID \
  --main_process_ip $HEAD --main_process_port $PORT -m train --config $CONFIG$ARGS"
rc=$?
set -e
if [[ $rc == 124 ]]; then
  # stopped by a signal after saving (train exits 124); rank 0 normally requeued already: make sure
  log "training stopped after a checkpoint (exit 124): requeue"
  scontrol requeue "$SLURM_JOB_ID" || true
  exit 0
fi
log "train exit $rc"
exit $rc
