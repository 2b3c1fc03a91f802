"""bench/reader_during_rerun.py on a short run: readers polling while a writer republishes one date and is
kill -9'd at random moments never fail, never mix two runs, never find no table; the report has every count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_reader_during_rerun_bench_short(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "bench/reader_during_rerun.py", "--seconds", "4", "--legacy-seconds", "0",
                        "--inference-reruns", "0", "--readers", "careful,naive,probe", "--work", str(tmp_path / "w"),
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    s = res["summary"]["runs"]
    assert s["reruns"] > 0 and all(n > 0 for n in s["reads"].values()), s
    assert all(v == 0 for f in s["failures"].values() for v in f.values()), s
    after = res["phases"]["runs"]["after_clean_publish"]
    assert after["exit"] == 0 and after["run_folders"] == 1 and after["leftovers"] == [] and after["current_is_last_published"]
