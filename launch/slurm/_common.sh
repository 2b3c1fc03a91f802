# Sourced by every launch/slurm/*.sh job script (not a job itself). Fail-fast environment:
# repo root, venv, offline Hugging Face, signal forwarding for torchrun, CPU DeepSpeed when no GPU.
set -euo pipefail
ROOT="${LMREC_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$ROOT"
[[ -f pyproject.toml && -d inference && -d train ]] || { echo "ERROR: $ROOT is not the lmrec repository (set LMREC_ROOT or sbatch from the repo root)" >&2; exit 2; }
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
command -v accelerate >/dev/null || { echo "ERROR: accelerate not on PATH (activate the lmrec venv or set LMREC_ROOT)" >&2; exit 2; }
# torchrun (inside accelerate launch) dies on USR1 and orphans its workers unless told to forward it
# (notes/distributed-cpu-recipes.md); TORCHELASTIC_SIGNALS_TO_HANDLE has no effect, the PET_ form does.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
log() { echo "[$(date +%T)] [${SLURM_JOB_NAME:-job} ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}] $*"; }
need_config() {
  [[ -n "${1:-}" && -f "$1" ]] || { echo "ERROR: first argument must be a config file, got '${1:-}'" >&2; exit 2; }
}
# processes per node: the GPUs SLURM gave us, else $PROCS_PER_NODE (CPU runs), else 1
procs_per_node() {
  if [[ -n "${PROCS_PER_NODE:-}" ]]; then echo "$PROCS_PER_NODE"
  elif [[ -n "${SLURM_GPUS_ON_NODE:-}" && "${SLURM_GPUS_ON_NODE}" != 0 ]]; then echo "$SLURM_GPUS_ON_NODE"
  else echo 1; fi
}
# the arguments, shell-quoted, for use inside `bash -c "..."`
quote_args() { local out="" a; for a in "$@"; do out+=" $(printf '%q' "$a")"; done; echo "$out"; }
