#!/bin/bash
# Data prep on Apache Spark (engine=spark, docs/SPARK.md): a Spark standalone cluster lives inside this job, the
# driver (python -m data_prep) runs on the first node. For logs that outgrow one node; below that, data_prep.sh
# (engine=local) is faster and simpler.
# Nodes x GPUs: N x 0 (CPU only): node 0 runs the Spark master and the driver, every node one Spark worker with
# all its --cpus-per-task cores and SPARK_WORKER_MEMORY (default 80% of the node's --mem).
# Expected time: Spark start ~1 min, then the run; not measured on a cluster yet (one 2-core node: docs/SPARK.md).
# Needs on every node: Java 17+, the lmrec venv with the spark extra (pip install -e '.[spark]') and the inputs and
# output_dir on a shared filesystem, by the same paths; with pseudonymize_user_ids_key_env, the key's variable exported
# before sbatch (the workers inherit the job's environment).
#   sbatch --nodes=4 --cpus-per-task=32 --mem=200G launch/slurm/data_prep_spark.sh configs/data_prep/sample.yaml [key=value ...]
#SBATCH --job-name=lmrec-prep-spark
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
source "${LMREC_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/launch/slurm/_common.sh"
need_config "${1:-}"
CONFIG=$1; shift
SPARK_HOME=$(python -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))' 2>/dev/null) || {
  echo "ERROR: pyspark is not installed in $(command -v python): pip install -e '.[spark]'" >&2; exit 2; }
export SPARK_HOME
export PYSPARK_PYTHON=${PYSPARK_PYTHON:-$(command -v python)}  # executors run the venv's Python (shared filesystem)
MASTER_HOST=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" | head -n1)
MASTER_PORT=${SPARK_MASTER_PORT:-7077}
MASTER_URL="spark://$MASTER_HOST:$MASTER_PORT"
# scratch of the workers (shuffle files hold raw ids): node-local, removed with the job's tmp
export SPARK_WORKER_DIR=${SPARK_WORKER_DIR:-${TMPDIR:-/tmp}/lmrec-spark-$SLURM_JOB_ID}
export SPARK_LOCAL_DIRS=${SPARK_LOCAL_DIRS:-$SPARK_WORKER_DIR}
MEM_MB=${SLURM_MEM_PER_NODE:-0}
WORKER_MEM=${SPARK_WORKER_MEMORY:-$(( MEM_MB > 0 ? MEM_MB * 8 / 10 : 8192 ))m}
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

log "spark master $MASTER_URL, ${SLURM_NNODES:-1} worker(s) x ${SLURM_CPUS_PER_TASK:-1} cores x $WORKER_MEM"
srun --overlap --nodes=1 --ntasks=1 -w "$MASTER_HOST" --kill-on-bad-exit=1 \
  "$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.master.Master --host "$MASTER_HOST" --port "$MASTER_PORT" --webui-port 0 &
for _ in $(seq 60); do (exec 3<>"/dev/tcp/$MASTER_HOST/$MASTER_PORT") 2>/dev/null && break; sleep 2; done
srun --overlap --nodes="${SLURM_NNODES:-1}" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  "$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.worker.Worker --cores "${SLURM_CPUS_PER_TASK:-1}" \
  --memory "$WORKER_MEM" --webui-port 0 "$MASTER_URL" &

# the driver: everything per event runs on the workers; the driver needs memory for the prepared output
# (docs/SPARK.md); spark-submit options reach a pyspark driver through PYSPARK_SUBMIT_ARGS
export PYSPARK_SUBMIT_ARGS=${PYSPARK_SUBMIT_ARGS:-"--driver-memory ${SPARK_DRIVER_MEMORY:-$WORKER_MEM} --executor-memory ${SPARK_EXECUTOR_MEMORY:-$WORKER_MEM} pyspark-shell"}
log "data_prep --config $CONFIG engine=spark spark_master=$MASTER_URL $* ($PYSPARK_SUBMIT_ARGS)"
python -m data_prep --config "$CONFIG" engine=spark "spark_master=$MASTER_URL" "$@"
log "data_prep done"
