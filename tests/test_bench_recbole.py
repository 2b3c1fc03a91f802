"""bench/recbole_sasrec.py: RecBole's SASRec as the ids-only model's standard peer, fed exactly this project's split.

The parts that decide whether the two models see the same data run without RecBole (it is not a project
dependency); the end-to-end run, with its check that our windows give RecBole's own scores, only where it is installed.
"""

from __future__ import annotations

import builtins
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import recbole_sasrec  # noqa: E402
from fixtures_prepared import write_prepared  # noqa: E402


def test_left_padded_windows_become_left_aligned_sequences():
    hist = torch.tensor([[-1, -1, 5, 6], [1, 2, 3, 4], [-1, -1, -1, 9]])
    seq, n = recbole_sasrec.left_aligned(hist)
    assert n.tolist() == [2, 4, 1]
    assert seq.tolist() == [[5, 6, -1, -1], [1, 2, 3, 4], [9, -1, -1, -1]]


def test_atomic_rows_are_each_users_events_in_data_prep_order(tmp_path):
    from train.data import open_prepared

    prep = open_prepared(str(write_prepared(tmp_path / "prepared", num_users=12, num_items=20, min_len=5, max_len=9)))
    path = tmp_path / "rb" / "x.inter"
    counts = recbole_sasrec.write_atomic_inter(prep, path)
    lines = path.read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
    rows = [tuple(int(float(x)) for x in ln.split("\t")) for ln in lines[1:]]
    seqs = prep.sequences
    want = [(u, i, t) for u, items, tp in zip(seqs["user_idx"], seqs["item_idx"], seqs["test_pos"])
            for t, i in enumerate(items[: tp + 1])]
    assert rows == want  # the position is the timestamp: RecBole's time order is data_prep's order, ties included
    assert counts == {"users": 12, "events": len(want), "users_without_test": 0}
    assert not list(path.parent.glob("*.tmp"))


def test_without_recbole_the_message_says_how_to_install_it(monkeypatch):
    real_import = builtins.__import__

    def no_recbole(name, *a, **k):
        if name == "recbole" or name.startswith("recbole."):
            raise ImportError("No module named 'recbole'")
        return real_import(name, *a, **k)

    monkeypatch.delitem(sys.modules, "recbole", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_recbole)
    with pytest.raises(SystemExit, match=r"RecBole is not installed.*recbole==1\.2\.1"):
        recbole_sasrec.import_recbole()


def test_a_pair_without_a_record_fails_before_training(tmp_path):
    prep = write_prepared(tmp_path / "prepared", num_users=8, num_items=12)
    with pytest.raises(SystemExit, match="--pair .*no record.json"):
        recbole_sasrec.main(["--prepared", str(prep), "--pair", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_end_to_end_with_recbole(tmp_path):
    pytest.importorskip("recbole")
    prep = write_prepared(tmp_path / "prepared", num_users=60, num_items=30, min_len=5, max_len=12)
    res = recbole_sasrec.main(["--prepared", str(prep), "--name", "tiny", "--epochs", "2", "--out", str(tmp_path / "o")])
    on_disk = json.loads((tmp_path / "o" / "result.json").read_text())
    assert on_disk["metrics"] == res["metrics"] and on_disk["best_epoch"] in (0, 1)
    ranks = np.load(tmp_path / "o" / "record.npz")["test_ranks"]
    assert len(ranks) == 60 and ranks.min() >= 1
    assert res["metrics"]["test"]["HR@10"] == pytest.approx(float((ranks <= 10).mean()))
