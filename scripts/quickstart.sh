#!/usr/bin/env bash
# The main job end to end on the embedded default: install, then
#   synthetic sample log -> data_prep -> train (bundled all-MiniLM-L6-v2 item tower, CPU) -> nightly inference.
# Everything is written under ./work/ (raw/, prepared/, checkpoints/, recs/). A few minutes on a 2-core laptop.
# Usage: bash scripts/quickstart.sh [run_date=YYYY-MM-DD]     (SKIP_INSTALL=1 to reuse an existing .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_INSTALL:-0}" = 1 ] || bash scripts/install.sh
PY=.venv/bin/python
ACC=.venv/bin/accelerate
RUN_DATE=${1:-}; RUN_DATE=${RUN_DATE#run_date=}
[ -n "$RUN_DATE" ] || RUN_DATE=$(date -u +%F)
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

echo "== 1/4 sample behaviour log -> work/raw/sample"
$PY -m data_prep.synthetic --out work/raw/sample
echo "== 2/4 data_prep -> work/prepared/sample"
$PY -m data_prep --config configs/data_prep/sample.yaml
echo "== 3/4 train -> work/checkpoints/sample"
$ACC launch --config_file launch/accelerate/cpu_1proc.yaml -m train --config configs/train/sample.yaml
echo "== 4/4 inference -> work/recs/sample/dt=$RUN_DATE"
$ACC launch --config_file launch/accelerate/cpu_1proc.yaml -m inference --config configs/inference/nightly.yaml run_date="$RUN_DATE"

$PY - "$RUN_DATE" <<'PY'
import json, sys
from pathlib import Path
import pyarrow.dataset as ds
out = Path("work/recs/sample") / f"dt={sys.argv[1]}"
assert (out / "_SUCCESS").exists(), f"no _SUCCESS in {out}"
t = ds.dataset(str(out), format="parquet").to_table()
m = json.loads((out / "manifest.json").read_text())
print(f"\nThe table is at {out.resolve()}  ({t.num_rows} rows, {len(set(t.column('user_id').to_pylist()))} users)")
print(t.slice(0, 10).to_pandas().to_string(index=False))
PY
