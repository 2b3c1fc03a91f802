"""bench/scale.py --quick end to end (issue 30): 20k synthetic users through data_prep, a few training steps of an id
and a frozen-text tower on 2 processes, and inference of every user on 2 processes; the results JSON holds a wall
time and positive peak memory for every stage and rank, and the published table has k rows for every prepared user.
Marked slow: four stages, three of them 2-process launches (minutes on a loaded 2-core machine).

    python -m pytest tests/test_bench_scale.py -q
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

pytestmark = pytest.mark.slow


def test_quick_scale_bench_runs_every_stage(tmp_path):
    import scale

    out = tmp_path / "scale.json"
    scale.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)])
    doc = json.loads(out.read_text())
    meta = doc["meta"]
    assert meta["machine"]["cpu"] and meta["machine"]["torch"] and meta["date"] and "--quick" in meta["command"]
    (size,) = doc["sizes"]
    assert size["users"] == 20_000 and size["prepared"]["users"] == 20_000
    assert size["prepared"]["events_kept"] == size["events_generated"] == 200_000
    st = size["stages"]
    assert set(st) == set(scale.STAGES)
    assert st["data_prep"]["main"]["peak_rss_mib"] > 0 and st["data_prep"]["tree_peak_pss_mib"] > 0
    for name in ("train_id", "train_hybrid", "inference"):
        assert st[name]["wall_s"] > 0
        assert [r["rank"] for r in st[name]["ranks"]] == [0, 1], name  # one record per process of the 2-process launch
        for r in st[name]["ranks"]:
            assert r["peak_rss_mib"] > 0 and r["peak_anon_mib"] > 0 and r["peak_rss_mib"] >= r["peak_anon_mib"], (name, r)
    for name in ("train_id", "train_hybrid"):
        log = Path(st[name]["log"]).read_text()
        assert "world size 2" in log and "[test] final model" in log and "users 500" in log, name
    # inference: every prepared user has k rows in the published table
    inf = st["inference"]
    assert inf["counts"]["users"] == 20_000 and inf["counts"]["rows"] == 20_000 * inf["k"]
    table = ds.dataset(os.path.realpath(inf["table"]), format="parquet")
    users = table.to_table(columns=["user_id"]).column("user_id")
    assert len(users) == 20_000 * inf["k"] and pc.count_distinct(users).as_py() == 20_000
