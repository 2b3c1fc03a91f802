#!/usr/bin/env bash
# The main job end to end on the embedded default: install, then
#   synthetic sample log -> data_prep -> train (bundled all-MiniLM-L6-v2 item tower, CPU) -> nightly inference.
# Everything is written under ./work/ (raw/, prepared/, checkpoints/, recs/). A few minutes on a 2-core laptop.
# Run it again and it reuses what is there: data_prep republishes only when the inputs, settings or lmrec's code
# changed, training runs in a folder named by the data version (checkpoints/sample-<version>; a finished one trains
# nothing), and checkpoints/sample-latest points at the newest.
# Usage: bash scripts/quickstart.sh [run_date=YYYY-MM-DD]
#   SKIP_INSTALL=1   reuse an existing .venv
#   WORK=<dir>       write everything under <dir> instead of ./work (relative to the repository root)
#   QUICK=1          tiny sizes at every stage (150 users, 8 training steps, top-10; about a minute):
#                    a smoke test of the whole chain (tests/test_readme.py runs it), not a useful model
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_INSTALL:-0}" = 1 ] || bash scripts/install.sh
PY=.venv/bin/python
ACC=.venv/bin/accelerate
RUN_DATE=${1:-}; RUN_DATE=${RUN_DATE#run_date=}
[ -n "$RUN_DATE" ] || RUN_DATE=$(date -u +%F)
WORK=${WORK:-work}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# one process on CPU: every physical core (what accelerate picks, said here so that it does not warn about it)
THREADS=${OMP_NUM_THREADS:-$($PY -c 'import psutil; print(psutil.cpu_count(logical=False) or 1)')}

# per-stage extra key=value overrides; QUICK=1 shrinks every stage (its own run name, so a QUICK run
# never meets the folder of a full-size one: train refuses a run folder of another configuration or data version)
SYN=() PREP=() TRAIN=() INFER=()
RUN=sample
if [ "${QUICK:-0}" = 1 ]; then
  SYN=(n_users=150 n_items=80 n_events=2500 n_topics=8 n_days=10 max_user_events=30)
  PREP=(num_shards=2 num_proc=1)
  RUN=quick
  TRAIN=(max_steps=8 eval_every=4 save_every=0 batch_size=32 model.d_model=32 model.max_len=20 optim.warmup_steps=2
         eval_batch_size=64 tracker=none)
  INFER=(k=10 num_threads=1)
fi

echo "== 1/4 sample behaviour log -> $WORK/raw/sample"
$PY -m data_prep.synthetic --out "$WORK/raw/sample" ${SYN[@]+"${SYN[@]}"}
echo "== 2/4 data_prep -> $WORK/prepared/sample"
$PY -m data_prep --config configs/data_prep/sample.yaml events_path="$WORK/raw/sample/events" \
  items_path="$WORK/raw/sample/items" output_dir="$WORK/prepared/sample" ${PREP[@]+"${PREP[@]}"}
VERSION=$(cat "$WORK/prepared/sample/LATEST")
RUN=$RUN-$VERSION  # a new data version (new inputs, settings or code) trains a new folder; the same one is reused
echo "== 3/4 train -> $WORK/checkpoints/$RUN (data version $VERSION)"
$ACC launch -q --config_file launch/accelerate/cpu_1proc.yaml --num_cpu_threads_per_process "$THREADS" -m train --config configs/train/sample.yaml \
  data="$WORK/prepared/sample" output_dir="$WORK/checkpoints" run_name="$RUN" text_feature_cache="$WORK/cache/text_features" \
  ${TRAIN[@]+"${TRAIN[@]}"}
ln -sfn "$RUN" "$WORK/checkpoints/.latest.tmp" && mv -T "$WORK/checkpoints/.latest.tmp" "$WORK/checkpoints/${RUN%%-*}-latest"
echo "== 4/4 inference -> $WORK/recs/sample/dt=$RUN_DATE"
$ACC launch -q --config_file launch/accelerate/cpu_1proc.yaml --num_cpu_threads_per_process "$THREADS" -m inference --config configs/inference/nightly.yaml \
  model_dir="$WORK/checkpoints/$RUN/final" prepared_dir="$WORK/prepared/sample" output_dir="$WORK/recs/sample" \
  run_date="$RUN_DATE" text_feature_cache="$WORK/cache/text_features" ${INFER[@]+"${INFER[@]}"}
# the morning check: tonight's table is there, fresh, complete and correct (exit 1 otherwise; what a nightly alerts on)
$PY -m inference.check --config configs/inference/nightly.yaml prepared_dir="$WORK/prepared/sample" \
  output_dir="$WORK/recs/sample" run_date="$RUN_DATE" ${INFER[@]+"${INFER[@]}"}

$PY - "$WORK/recs/sample/dt=$RUN_DATE" <<'PY'
import json, sys
from pathlib import Path
import pyarrow.dataset as ds
out = Path(sys.argv[1]).resolve()  # dt=<date> links to this run's folder: read the folder (a rerun never changes it)
assert (out / "_SUCCESS").exists(), f"no _SUCCESS in {out}"
t = ds.dataset(str(out), format="parquet").to_table()  # _SUCCESS/_manifest.json are skipped by readers
print(f"\nThe table is at {out}  ({t.num_rows} rows, {len(set(t.column('user_id').to_pylist()))} users)")
print(t.slice(0, 10).to_pandas().to_string(index=False))
PY
