"""bench/inference_bench.py end to end on a tiny grid point: it must read what inference writes (the
table's side files are `_manifest.json` etc.) and report every column. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_inference_bench_tiny_grid(tmp_path):
    out = tmp_path / "result.json"
    p = subprocess.run([sys.executable, "bench/inference_bench.py", "--grid", "2000:300", "--k", "10", "--batch", "128",
                        "--prefetch", "0,2", "--overlap", "0,1", "--work", str(tmp_path / "work"), "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    row = res["results"][0]
    assert row["items"] == 2000 and row["users"] == 300 and row["rows"] == 300 * 10
    for key in ("end_to_end_users_s", "floor_users_s", "select_topk_users_s", "select_blockmax_users_s",
                "ratio_end_to_end_vs_floor", "peak_rss_mb"):
        assert row[key] > 0, key
    assert set(row["phase_s"]) >= {"read_s", "user_tower_s", "topk_s", "write_s", "read_busy_s"}
    # --prefetch 0,2 --overlap 0,1: every reading and scoring mode timed end to end, keyed by its settings
    assert set(row["end_to_end_by_method"]) == {f"auto/prefetch{p}/overlap{o}" for p in (0, 2) for o in (0, 1)}
    assert row["prefetch_chunks"] == 0 and row["overlap_scoring"] is False
    assert all(v["users_s"] > 0 for v in row["end_to_end_by_method"].values())
