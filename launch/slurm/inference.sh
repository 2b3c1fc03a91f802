#!/bin/bash
# Nightly inference: final/ + tonight's prepared data -> recs/dt=<run_date>/ (atomic, idempotent).
# Nodes x GPUs: 1 x G (users split across the ranks; each writes its own part file).
# Expected time: 10M users x 1M items ~5.4 min on one H200, end to end with writing (measured at 200k users,
# id-only tower, docs/BENCH_INFERENCE.md) + catalogue encoding; the CI config ~30 s on 2 CPUs.
# On a GPU give each rank >= 5 cores: write_streams auto = min(4, cores per rank - 1) writer threads.
#   sbatch --gpus-per-node=1 -c 8 launch/slurm/inference.sh configs/inference/nightly_gpu.yaml run_date=2026-11-27
#   ACCEL_CONFIG=launch/accelerate/cpu_ddp_2proc.yaml PROCS_PER_NODE=2 sbatch -c 2 launch/slurm/inference.sh configs/inference/ci.yaml ...
# A rerun (or a requeue) of the same run_date replaces the table whole; a killed run leaves the old one.
#SBATCH --job-name=lmrec-infer
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
source "${LMREC_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/launch/slurm/_common.sh"
need_config "${1:-}"
CONFIG=$1; shift
ACCEL_CONFIG=${ACCEL_CONFIG:-launch/accelerate/gpu_1.yaml}
[[ -f "$ACCEL_CONFIG" ]] || { echo "ERROR: ACCEL_CONFIG $ACCEL_CONFIG not found" >&2; exit 2; }
[[ " $* " == *" run_date="* ]] || { echo "ERROR: pass run_date=YYYY-MM-DD (the nightly table's partition)" >&2; exit 2; }
NNODES=$SLURM_JOB_NUM_NODES
PPN=$(procs_per_node)
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
PORT=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
ARGS=$(quote_args "$@")
log "inference: $NNODES node(s) x $PPN proc(s), accelerate config $ACCEL_CONFIG, config $CONFIG$ARGS"
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c "exec accelerate launch -q --config_file $ACCEL_CONFIG \
  --num_machines $NNODES --num_processes $((NNODES * PPN)) --machine_rank \$SLURM_NODEID \
  --main_process_ip $HEAD --main_process_port $PORT -m inference --config $CONFIG$ARGS"
log "inference done"
