"""bench/fault_suite.py on its quick cases (no training run): bad configs (one 'error:' line naming the key, exit 2,
no traceback, nothing written), a duplicated YAML key, a tokenizer folder asking to run its own code, a second
data_prep on a locked output_dir, a uint64 id beyond int64. Every case passes and the report holds every figure.
The whole campaign (checkpoints, final/, kill -9 of each stage, readers during reruns) is
``python bench/fault_suite.py`` (docs/RELIABILITY.md); about 40 s here on 2 busy cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICK = ["config_max_steps_negative", "config_n_heads_zero", "config_mistyped_key", "config_yaml_duplicate_key",
         "tokenizer_auto_map", "concurrent_data_prep_stalled", "uint64_ids_overflow"]


def test_fault_suite_quick_cases_pass(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "bench/fault_suite.py", "--only", ",".join(QUICK), "--work", str(tmp_path / "w"),
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    res = json.loads(out.read_text())
    failed = {c["name"]: [x["check"] for x in c["checks"] if not x["ok"]] or c.get("error") for c in res["cases"] if not c["passed"]}
    assert p.returncode == 0 and not failed, (failed, p.stdout[-3000:], p.stderr[-3000:])
    assert [c["name"] for c in res["cases"]] == QUICK and res["summary"]["passed"] == len(QUICK)
    assert res["command"].startswith("python bench/fault_suite.py") and res["machine"] and res["date"]
    for c in res["cases"]:
        assert c["fault"] and c["expected"] and c["checks"], c["name"]
    second = next(c for c in res["cases"] if c["name"] == "concurrent_data_prep_stalled")["observed"]["second"]
    assert second["exit"] == 2 and ".lock" in second["error_line"] and not second["traceback"]
    assert "| pass" in p.stdout and "7/7 cases pass" in p.stdout  # the printed table


def test_fault_suite_lists_its_cases():
    p = subprocess.run([sys.executable, "bench/fault_suite.py", "--list"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for name in QUICK + ["kill9_data_prep", "kill9_train", "kill9_inference", "final_flipped_weight_byte",
                         "resume_truncated_newest", "readers_during_rerun"]:
        assert f"\n{name}  [item" in "\n" + p.stdout, name
