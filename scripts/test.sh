#!/usr/bin/env bash
# Run the test suite (the README's test command; .ci/run calls this same script).
# Tiers: units, config loading, CPU end-to-end, 2-process DDP / DeepSpeed ZeRO (marked slow),
# SLURM (marked slurm: skipped unless sbatch answers), MovieLens (marked data: skipped without ../shared/data).
# Usage: bash scripts/test.sh [pytest args]      e.g. bash scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
exec .venv/bin/python -m pytest -q "$@"
