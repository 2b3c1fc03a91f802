#!/bin/bash
# Nightly chain, submitted with job dependencies (run on a login node, NOT with sbatch):
#   data_prep -> [optional fine-tune of last night's model on the new data -> optional promotion gate] -> inference
#   -> check (python -m inference.check: the table is there, fresh, complete and correct; its job FAILS otherwise)
# Each step is one of the sbatch scripts next to this file; a failed step cancels the rest
# (--dependency=afterok + --kill-on-invalid-dep=yes), except a failed fine-tune under GATE=1: the gate still runs and
# keeps the serving model, so tonight's table is written. Prints the job ids; `squeue -u $USER` to follow.
# Nodes x GPUs: those of each step (see data_prep.sh, train.sh, inference.sh). Expected time: the sum.
#   bash launch/slurm/nightly_chain.sh 2026-11-27
#   FINETUNE=1 PREV_FINAL=work/checkpoints/nightly-2026-11-26/final bash launch/slurm/nightly_chain.sh 2026-11-27
#   FINETUNE=1 GATE=1 PREV_FINAL=work/checkpoints/serving bash launch/slurm/nightly_chain.sh 2026-11-27
# Settings (environment; hyperparameters stay in the configs):
#   PREP_CONFIG, TRAIN_CONFIG, INFER_CONFIG   job configs (defaults below)
#   PREP_ARGS, TRAIN_ARGS, INFER_ARGS         extra key=value overrides per step (space separated);
#                                             TRAIN_ARGS="max_train_wall_s=5400" ends the fine-tune after 1.5 h of
#                                             training (all requeues together) and still exports its best checkpoint;
#                                             TRAIN_ARGS="train_through=test max_steps=N" trains through every user's
#                                             latest event (nothing held out or validated: N from a validated run)
#   FINETUNE=0|1                              1 = train tonight's model (warm-started from PREV_FINAL when given)
#   PREV_FINAL                                last night's final/ (warm start: train's init_from)
#   GATE=0|1                                  FINETUNE=1: 1 = tonight's model serves only if it holds up against the
#                                             one serving now (launch/slurm/gate.sh, python -m inference.gate); the
#                                             table is then written by whichever model the serving link names; a
#                                             fine-tune that fails leaves the serving model writing tonight's table
#   SERVING                                   GATE=1: the serving link (default $CKPT_ROOT/serving); created by the
#                                             first promotion; PREV_FINAL=$SERVING warm-starts from the serving model
#   GATE_ARGS                                 extra gate.KEY=VALUE overrides (e.g. gate.max_relative_drop=0.01)
#   CHECK=1|0                                 1 (default) = a last job checks tonight's table (launch/slurm/check.sh),
#                                             against last night's too (check.* keys of INFER_CONFIG)
#   CHECK_METRICS_FILE                        the check also writes its verdict and figures there as Prometheus
#                                             gauges (e.g. node_exporter's textfile dir: .../lmrec_nightly.prom)
#   CHECK_ARGS                                extra check.KEY=VALUE overrides (e.g. check.min_top10_overlap=0 on the
#                                             night a planned new model replaces the old one)
#   EVENTS_LAG_DAYS=N | EVENTS_THROUGH=DATE   tonight's log must reach RUN_DATE - N days (or DATE): data_prep's
#                                             expect_events_through, and the check's. A day missing, or landed in part
#                                             (below half its usual volume), publishes no new data version: with
#                                             ON_INCOMPLETE=keep_previous (the default here) tonight's table is made from
#                                             last night's data and the check job FAILS naming the day; with
#                                             ON_INCOMPLETE=error data_prep FAILS (exit 3) and nothing after it runs.
#                                             Unset (the default): no check (the bundled sample's dates are fixed)
#   MODEL_DIR                                 FINETUNE=0: the model inference uses (default from INFER_CONFIG)
#   CKPT_ROOT                                 FINETUNE=1: checkpoints root (default work/checkpoints)
#   PREP_SBATCH, TRAIN_SBATCH, GATE_SBATCH, INFER_SBATCH, CHECK_SBATCH   extra sbatch options per step
#   TRAIN_ACCEL, INFER_ACCEL                  accelerate configs (exported as ACCEL_CONFIG to the step)
set -euo pipefail
RUN_DATE=${1:?usage: nightly_chain.sh YYYY-MM-DD}
[[ $RUN_DATE =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}$ ]] || { echo "ERROR: run date must be YYYY-MM-DD, got $RUN_DATE" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=${LMREC_ROOT:-$(cd "$HERE/../.." && pwd)}
cd "$ROOT"
PREP_CONFIG=${PREP_CONFIG:-configs/data_prep/sample.yaml}
TRAIN_CONFIG=${TRAIN_CONFIG:-configs/train/sample.yaml}
INFER_CONFIG=${INFER_CONFIG:-configs/inference/nightly.yaml}
FINETUNE=${FINETUNE:-0}
GATE=${GATE:-0}
[[ $GATE == 0 || $FINETUNE == 1 ]] || { echo "ERROR: GATE=1 gates tonight's fine-tune: set FINETUNE=1 too" >&2; exit 2; }
THROUGH=${EVENTS_THROUGH:-}
if [[ -z $THROUGH && -n ${EVENTS_LAG_DAYS:-} ]]; then
  [[ $EVENTS_LAG_DAYS =~ ^[0-9]+$ ]] || { echo "ERROR: EVENTS_LAG_DAYS must be a number of days, got $EVENTS_LAG_DAYS" >&2; exit 2; }
  THROUGH=$(date -u -d "$RUN_DATE - $EVENTS_LAG_DAYS days" +%F)
fi
PREP_COMPLETE=()
CHECK_COMPLETE=()
if [[ -n $THROUGH ]]; then
  [[ $THROUGH =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}$ ]] || { echo "ERROR: EVENTS_THROUGH must be YYYY-MM-DD, got $THROUGH" >&2; exit 2; }
  [[ ${ON_INCOMPLETE:-keep_previous} =~ ^(keep_previous|error)$ ]] || { echo "ERROR: ON_INCOMPLETE must be keep_previous or error, got $ON_INCOMPLETE" >&2; exit 2; }
  PREP_COMPLETE=("expect_events_through=$THROUGH" "on_incomplete=${ON_INCOMPLETE:-keep_previous}")
  CHECK_COMPLETE=("check.expect_events_through=$THROUGH")
fi

for f in "$PREP_CONFIG" "$INFER_CONFIG"; do [[ -f $f ]] || { echo "ERROR: config $f not found" >&2; exit 2; }; done
command -v sbatch >/dev/null || { echo "ERROR: sbatch not found (is SLURM_CONF set? bash scripts/slurm_local.sh start for a local cluster)" >&2; exit 2; }

submit() {  # submit <name> <extra sbatch opts> <script> args... -> job id
  local name=$1 opts=$2; shift 2
  # shellcheck disable=SC2086
  sbatch --parsable --job-name="$name" --kill-on-invalid-dep=yes $opts "$@" | cut -d';' -f1
}
export LMREC_ROOT=$ROOT

# shellcheck disable=SC2086
PREP=$(submit "lmrec-prep-$RUN_DATE" "${PREP_SBATCH:-}" "$HERE/data_prep.sh" "$PREP_CONFIG" "${PREP_COMPLETE[@]}" ${PREP_ARGS:-})
DEP=$PREP
INFER_MODEL=()
TRAIN=none
GATE_JOB=none
if [[ $FINETUNE == 1 ]]; then
  [[ -f $TRAIN_CONFIG ]] || { echo "ERROR: config $TRAIN_CONFIG not found" >&2; exit 2; }
  RUN_NAME="nightly-$RUN_DATE"
  CKPT_ROOT=${CKPT_ROOT:-work/checkpoints}
  WARM=()
  if [[ -n ${PREV_FINAL:-} ]]; then
    [[ -f $PREV_FINAL/export.json ]] || { echo "ERROR: PREV_FINAL $PREV_FINAL is not a final/ export" >&2; exit 2; }
    WARM=("init_from=$(realpath "$PREV_FINAL")")  # a link (the serving link) resolved now: the run records the folder
  fi
  # shellcheck disable=SC2086
  TRAIN=$(ACCEL_CONFIG=${TRAIN_ACCEL:-launch/accelerate/multinode_zero3.yaml} submit "lmrec-train-$RUN_DATE" \
          "--dependency=afterok:$DEP ${TRAIN_SBATCH:-}" "$HERE/train.sh" "$TRAIN_CONFIG" \
          "run_name=$RUN_NAME" "output_dir=$CKPT_ROOT" "${WARM[@]}" ${TRAIN_ARGS:-})
  DEP=$TRAIN
  INFER_MODEL=("model_dir=$CKPT_ROOT/$RUN_NAME/final")
  if [[ $GATE == 1 ]]; then
    SERVING=${SERVING:-$CKPT_ROOT/serving}
    # the gate reads the inference config and overrides (what the table will do), then the serving link. It starts
    # once tonight's data is published and training has ended, however it ended: a failed, timed-out or cancelled
    # fine-tune leaves no final/, and the model serving now writes tonight's table (gate.unusable_candidate)
    # shellcheck disable=SC2086
    GATE_JOB=$(submit "lmrec-gate-$RUN_DATE" "--dependency=afterok:$PREP,afterany:$TRAIN ${GATE_SBATCH:-}" "$HERE/gate.sh" \
               "$INFER_CONFIG" ${INFER_ARGS:-} "model_dir=$SERVING" "gate.candidate=$CKPT_ROOT/$RUN_NAME/final" \
               gate.unusable_candidate=keep_incumbent ${GATE_ARGS:-})
    DEP=$GATE_JOB
    INFER_MODEL=("model_dir=$SERVING")
  fi
elif [[ -n ${MODEL_DIR:-} ]]; then
  INFER_MODEL=("model_dir=$MODEL_DIR")
fi
# shellcheck disable=SC2086
INFER=$(ACCEL_CONFIG=${INFER_ACCEL:-launch/accelerate/gpu_1.yaml} submit "lmrec-infer-$RUN_DATE" \
        "--dependency=afterok:$DEP ${INFER_SBATCH:-}" "$HERE/inference.sh" "$INFER_CONFIG" \
        "run_date=$RUN_DATE" "${INFER_MODEL[@]}" ${INFER_ARGS:-})
CHECK_JOB=none
if [[ ${CHECK:-1} == 1 ]]; then
  # the table's own config and overrides: the check reads output_dir, prepared_dir, k and the exclusions from them
  # shellcheck disable=SC2086
  [[ -z ${CHECK_METRICS_FILE:-} ]] || CHECK_COMPLETE+=("check.metrics_file=$CHECK_METRICS_FILE")
  CHECK_JOB=$(submit "lmrec-check-$RUN_DATE" "--dependency=afterok:$INFER ${CHECK_SBATCH:-}" "$HERE/check.sh" \
              "$INFER_CONFIG" "run_date=$RUN_DATE" ${INFER_ARGS:-} "${CHECK_COMPLETE[@]}" ${CHECK_ARGS:-})
fi
echo "[nightly_chain] $RUN_DATE: prep $PREP -> train $TRAIN -> gate $GATE_JOB -> inference $INFER -> check $CHECK_JOB"
echo "CHAIN_JOBS prep=$PREP train=$TRAIN gate=$GATE_JOB infer=$INFER check=$CHECK_JOB"
