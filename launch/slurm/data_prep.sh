#!/bin/bash
# Data prep: raw Parquet logs -> prepared/<version>/ (HF Datasets shards + manifest), on ONE node.
# Nodes x GPUs: 1 x 0 (CPU only; parallel inside the node with num_proc = --cpus-per-task).
# Expected time: synthetic sample ~1 min; MovieLens-1M ~2 min on 16 cores; 10M events ~10 min.
# One node on purpose: data_prep already parallelises over files and batches with num_proc, reuses
# unchanged work across nights (incremental), and must write ONE manifest that accounts for every row.
#   sbatch --cpus-per-task=16 launch/slurm/data_prep.sh configs/data_prep/sample.yaml [key=value ...]
#SBATCH --job-name=lmrec-prep
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
source "${LMREC_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/launch/slurm/_common.sh"
need_config "${1:-}"
CONFIG=$1; shift
NPROC_ARG=()
[[ " $* " == *" num_proc="* ]] || NPROC_ARG=("num_proc=${SLURM_CPUS_PER_TASK:-1}")
log "data_prep --config $CONFIG $* ${NPROC_ARG[*]}"
srun --kill-on-bad-exit=1 --ntasks=1 python -m data_prep --config "$CONFIG" "${NPROC_ARG[@]}" "$@"
log "data_prep done"
