#!/usr/bin/env bash
# Install lmrec into ./.venv the way a new user would: the CPU build of torch first (pinned, so pip
# does not pull a multi-GB CUDA build), then the project with its dev and serve (online service) extras.
# Cluster users: install your own CUDA build of torch (2.4 <= torch < 2.15) first, then `pip install -e .`.
# Usage: bash scripts/install.sh            (idempotent; ~1-2 min on a fresh machine)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[install] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[install] torch==2.13.0 (CPU build)"
  .venv/bin/python -m pip install -q torch==2.13.0
fi
# The spark extra (data_prep engine=spark, docs/SPARK.md) needs a Java 17+ runtime, which pip cannot install: it is
# added when java answers (LMREC_SPARK=0 leaves it out, LMREC_SPARK=1 insists); without it the Spark tests skip.
EXTRAS=dev,serve
JAVA=${JAVA_HOME:+$JAVA_HOME/bin/}java
if [ "${LMREC_SPARK:-auto}" = 1 ] || { [ "${LMREC_SPARK:-auto}" = auto ] && "$JAVA" -version >/dev/null 2>&1; }; then
  EXTRAS=$EXTRAS,spark
else
  echo "[install] no Java runtime (or LMREC_SPARK=0): leaving out the spark extra; for data_prep engine=spark install" \
       "openjdk-17-jre-headless (Debian/Ubuntu) and rerun"
fi
echo "[install] lmrec[$EXTRAS]"
# (setuptools warns about same-named folders on every editable install: the repository is that folder, on purpose)
PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
.venv/bin/python - <<'PY'
import torch
from lmrec_common.log import quiet_deepspeed_detection
quiet_deepspeed_detection()  # no "Setting accelerator to CPU" notice from the import below on a machine without a GPU
import transformers, accelerate, datasets, pyarrow, deepspeed, peft, starlette, uvicorn
print(f"[install] ok: torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}, "
      f"deepspeed {deepspeed.__version__}, datasets {datasets.__version__}, pyarrow {pyarrow.__version__}, peft {peft.__version__}, "
      f"starlette {starlette.__version__}, uvicorn {uvicorn.__version__}")
PY
