"""bench/step_time.py runs every (checkout, precision, depth) row and reports them in one JSON (one step each:
this checks the rows and the record, not the speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_rows_for_each_precision_and_depth(tmp_path):
    out = tmp_path / "st.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "step_time.py"), "--rounds", "1", "--steps", "1", "--threads", "1",
                    "--precisions", "no,bf16", "--layers", "1,2", "--out", str(out)], check=True, cwd=REPO,
                   capture_output=True, text=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["precision"], r["layers"]) for r in rows] == [("no", 1), ("no", 2), ("bf16", 1), ("bf16", 2)]
    assert rows[0]["speedup_vs_first"] == 1.0 and all(r["median_s_per_step"] > 0 for r in rows)


def test_unknown_precision_is_refused():
    p = subprocess.run([sys.executable, str(REPO / "bench" / "step_time.py"), "--precisions", "fp8"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "fp8" in p.stderr
