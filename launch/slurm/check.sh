#!/bin/bash
# Morning check of a published table (python -m inference.check): is recs/dt=<run_date> there, computed from
# tonight's prepared data, with every prepared user's K rows, ranked, unseen, available, in the catalogue, and not
# unlike last night's table (users, distinct items, fallback share, top-10 overlap)?
# Reads the table's files and the prepared data itself; writes <output_dir>/_checks/dt=<run_date>.json.
# Nodes x GPUs: 1 x 0 (one process, CPU). Expected time: ~90 s and ~1.7 GB per 100M rows with last night's table to
# compare (1M users x 100; linear in rows; bench/check_bench.py), a few seconds for the CI table.
#   sbatch launch/slurm/check.sh configs/inference/nightly.yaml run_date=2026-11-27
# Exit 0: the table holds; 1: it does not (absent, stale, incomplete or wrong: the job FAILS, alert on it);
# 2: bad config.
#SBATCH --job-name=lmrec-check
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
source "${LMREC_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/launch/slurm/_common.sh"
need_config "${1:-}"
CONFIG=$1; shift
[[ " $* " == *" run_date="* ]] || { echo "ERROR: pass run_date=YYYY-MM-DD (the table to check)" >&2; exit 2; }
log "check --config $CONFIG $*"
srun --kill-on-bad-exit=1 --ntasks=1 python -m inference.check --config "$CONFIG" "$@"
log "check done"
