#!/bin/bash
# Promotion gate between a nightly fine-tune and the nightly table (python -m inference.gate): ranks tonight's
# candidate, the model the serving link points at and most-popular on the same users of tonight's prepared data,
# moves the link to the candidate only if it holds up, writes gate.json beside the candidate.
# Nodes x GPUs: 1 x 0-1 (one process; a GPU if the node has one, else CPU).
# Expected time: about what inference spends encoding the catalogue, twice, plus 100k users ranked twice
# (gate.max_users); the CI config ~10 s on 2 CPUs.
#   sbatch launch/slurm/gate.sh configs/inference/nightly.yaml model_dir=work/checkpoints/serving \
#       gate.candidate=work/checkpoints/nightly-2026-11-27/final
# Exit 0: a model serves (promoted or incumbent kept); 2: bad config or input; 3: candidate refused and nothing
# serves yet (the chain's inference, afterok, then does not run).
#SBATCH --job-name=lmrec-gate
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
source "${LMREC_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/launch/slurm/_common.sh"
need_config "${1:-}"
CONFIG=$1; shift
[[ " $* " == *" gate.candidate="* ]] || { echo "ERROR: pass gate.candidate=<tonight's final/>" >&2; exit 2; }
log "gate --config $CONFIG $*"
srun --kill-on-bad-exit=1 --ntasks=1 python -m inference.gate --config "$CONFIG" "$@"
log "gate done"
