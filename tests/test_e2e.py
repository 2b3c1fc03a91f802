"""The CPU backbone (STYLE.md #10): the real entry points as subprocesses, the way users run them.

    synthetic log -> python -m data_prep -> accelerate launch -m train (stopped after step 3 like a
    pre-emption, then relaunched to the end) -> accelerate launch -m inference -> check the table.

Small sizes (150 users, 80 items, bundled MiniLM item tower, 8 optimizer steps); about a minute on
2 idle cores. Everything is written under pytest's tmp_path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"
CPU_1PROC = "launch/accelerate/cpu_1proc.yaml"
RUN_DATE = "2026-11-27"
K = 10

pytestmark = pytest.mark.slow


def sh(args: list[str], expect_ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DS_ACCELERATOR": "cpu"}
    p = subprocess.run([str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if expect_ok and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n"
                             f"--- stderr\n{p.stderr[-4000:]}")
    return p


def test_prep_train_preempt_resume_infer(tmp_path):
    raw, prep, ck, recs = tmp_path / "raw", tmp_path / "prepared", tmp_path / "checkpoints", tmp_path / "recs"
    cache = tmp_path / "textcache"  # the text-feature cache, shared by training and inference as in the quickstart

    # ---- 1. raw logs
    sh([sys.executable, "-m", "data_prep.synthetic", "--out", raw, "n_users=150", "n_items=80", "n_events=2500",
        "n_topics=8", "n_days=10", "max_user_events=30"])

    # ---- 2. data_prep (the sample job with its paths moved under tmp)
    sh([sys.executable, "-m", "data_prep", "--config", "configs/data_prep/sample.yaml", f"events_path={raw}/events",
        f"items_path={raw}/items", f"output_dir={prep}", "num_shards=2", "num_proc=1"])
    version = (prep / "LATEST").read_text().strip()
    pman = json.loads((prep / version / "manifest.json").read_text())
    n_users = pman["counts"]["users"]
    c = pman["counts"]
    assert n_users > 100, c
    assert c["events_read"] == c["events_kept"] + sum(c["events_quarantined"].values()) + sum(c["events_filtered"].values())

    # ---- 3. train, pre-empted after step 3, then the same command again resumes to the end
    train = [ACCELERATE, "launch", "--config_file", CPU_1PROC, "-m", "train", "--config", "configs/train/sample.yaml",
             f"data={prep}", f"output_dir={ck}", "run_name=e2e", "max_steps=8", "eval_every=4", "save_every=0",
             "batch_size=32", "model.d_model=32", "model.max_len=20", "optim.warmup_steps=2", "log_every=2",
             "eval_batch_size=64", "tracker=none", f"text_feature_cache={cache}"]
    first = sh(train + ["stop_after_steps=3"], expect_ok=False)
    rd = ck / "e2e"
    # torchrun/accelerate turn the worker's 124 into a launcher failure: the marker file is the contract
    assert first.returncode != 0, first.stdout[-2000:]
    pre = json.loads((rd / "PREEMPTED.json").read_text())
    assert pre["step"] == 3 and (rd / "step_3" / "COMPLETE").is_file() and not (rd / "final").exists()
    second = sh(train)
    assert "resumed from" in second.stdout + second.stderr
    assert "frozen item tower: encoded 0 of 80 items" in second.stdout  # the first launch filled the cache
    assert not (rd / "PREEMPTED.json").exists()
    steps = [json.loads(x)["step"] for x in (rd / "losses.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    final = rd / "final"
    export = json.loads((final / "export.json").read_text())
    assert export["data_version"] == version and (final / "model.safetensors").is_file()
    # the same command once more: the run is finished with these settings, nothing is trained and final/ stays
    third = sh(train)
    assert "already finished with these settings" in third.stdout, third.stdout[-2000:]
    assert json.loads((final / "export.json").read_text()) == export
    assert [json.loads(x)["step"] for x in (rd / "losses.jsonl").read_text().splitlines()] == steps

    # ---- 4. nightly inference
    sh([ACCELERATE, "launch", "--config_file", CPU_1PROC, "-m", "inference", "--config", "configs/inference/nightly.yaml",
        f"model_dir={final}", f"prepared_dir={prep}", f"output_dir={recs}", f"run_date={RUN_DATE}", f"k={K}",
        "num_threads=1", f"text_feature_cache={cache}"])
    # the table serves the users of sequences/ and those of serving/ (one usable event: not trained on, still served)
    check_table(recs / f"dt={RUN_DATE}", prep / version, n_users + sum(c["serving_only_users"].values()), export["model_version"])
    # the exported encoder is training's, on the same kind of device: no item went through it again
    assert json.loads((recs / f"dt={RUN_DATE}" / "_manifest.json").read_text())["catalogue"]["items_text_encoded"] == 0


def check_table(out: Path, version_dir: Path, n_users: int, model_version: str) -> None:
    import datasets
    import numpy as np
    import pandas as pd
    import pyarrow.dataset as pads

    assert (out / "_SUCCESS").is_file()
    assert not list(out.parent.glob(".stage-*")) and not list(out.parent.glob(".tmp-*"))
    man = json.loads((out / "_manifest.json").read_text())
    # sidecar files start with "_": the folder itself reads as one Parquet dataset
    parts = sorted(str(f) for f in out.glob("part-*.parquet"))
    assert [Path(f).name for f in parts] == [p["file"] for p in man["parts"]]
    t = pads.dataset(str(out), format="parquet").to_table().to_pandas()  # the folder is the table
    assert man["counts"]["users_scored"] == n_users == t["user_id"].nunique()
    assert man["counts"]["rows"] == len(t) == sum(p["rows"] for p in man["parts"]) == n_users * K
    assert man["k"] == K and set(t["model_version"]) == {model_version} and set(t["run_date"].astype(str)) == {RUN_DATE}

    items = datasets.load_from_disk(str(version_dir / "items")).to_pandas()
    seqs = pd.concat([datasets.load_from_disk(str(version_dir / d)).to_pandas()[["user_id", "item_idx"]] for d in ("sequences", "serving")])
    item_id = items["item_id"].to_numpy()  # row i = item_idx i
    unavailable = set(items.loc[~items["available"], "item_id"])
    seen = {str(u): set(item_id[np.asarray(h, dtype=np.int64)]) for u, h in zip(seqs["user_id"], seqs["item_idx"])}
    assert set(t["user_id"].astype(str)) == set(seen)
    for uid, g in t.groupby("user_id"):
        g = g.sort_values("rank")
        assert g["rank"].tolist() == list(range(1, K + 1)), uid
        recs = set(g["item_id"].astype(str))
        assert len(recs) == K, uid  # no duplicates
        assert not recs & seen[str(uid)], (uid, recs & seen[str(uid)])
        assert not recs & unavailable, uid
        s = g["score"].to_numpy()
        assert np.all(np.isfinite(s)) and np.all(s[:-1] >= s[1:]), (uid, s)
