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


def test_wall_budget_stops_before_an_epoch_that_would_end_past_it():
    now = [0.0]
    b = recbole_sasrec.WallBudget(max_wall_s=100.0, epochs=300, clock=lambda: now[0])
    for epoch, t in enumerate((30.0, 60.0)):  # 30 s per epoch: the third would end at 90 s, inside the budget
        now[0] = t
        b(epoch, 0.1 * (epoch + 1))
    now[0] = 75.0  # mean 25 s: a fourth epoch would end at 100 s, inside the budget
    b(2, 0.25)
    now[0] = 81.0  # mean 20.25 s: a fifth would end at 101.25 s, past it
    with pytest.raises(recbole_sasrec.WallBudget.Spent):
        b(3, 0.2)
    assert (b.epochs_run, b.stopped_by) == (4, "max_wall_s")
    assert b.curve == [(0, pytest.approx(0.1)), (1, pytest.approx(0.2)), (2, 0.25), (3, 0.2)]
    # a resumed run (epochs 0-9 before) judges by the epochs of this launch only
    now[0] = 0.0
    r = recbole_sasrec.WallBudget(max_wall_s=100.0, epochs=300, clock=lambda: now[0])
    now[0] = 45.0
    r(10, 0.3)  # one epoch of 45 s: a second would end at 90 s, inside
    assert r.epochs_run == 11 and r.stopped_by == "epochs"
    now[0] = 70.0
    with pytest.raises(recbole_sasrec.WallBudget.Spent):
        r(11, 0.31)  # mean 35 s: a third would end at 105 s


def test_wall_budget_names_early_stopping_and_the_end_of_the_epochs():
    count = iter((0, 1, 2, 3))  # RecBole's epochs without a better score; with stopping_step 2 it stops at 3
    b = recbole_sasrec.WallBudget(max_wall_s=1.0, epochs=300, early_stopped=lambda: next(count) > 2,
                                  clock=iter((0.0, 0.1, 0.2, 0.3, 100.0)).__next__)
    for epoch, score in enumerate((0.3, 0.2, 0.25)):
        b(epoch, score)
    assert b.stopped_by == "epochs"
    b(3, 0.28)  # past the budget too, but RecBole stops after this epoch anyway: early stopping, no Spent
    assert (b.epochs_run, b.stopped_by) == (4, "early_stopping")
    last = recbole_sasrec.WallBudget(max_wall_s=12.0, epochs=2, clock=iter((0.0, 5.0, 9.0)).__next__)
    last(0, 0.1)
    last(1, 0.2)  # a third epoch would end past the budget, but there is none: not a budget stop
    assert (last.epochs_run, last.stopped_by) == (2, "epochs")


def test_pair_only_pairs_a_finished_run_without_training(tmp_path):
    import quality
    from train.data import open_prepared

    prep_dir = write_prepared(tmp_path / "prepared", num_users=40, num_items=20, min_len=5, max_len=9)
    prep = open_prepared(str(prep_dir))
    cand = quality.candidate_mask(prep)
    fp = quality.data_fingerprint("tiny", prep, cand)
    n = fp["n_test_users"]
    rng = np.random.default_rng(0)
    ours = rng.integers(1, 20, n)
    (tmp_path / "id_s0").mkdir()
    rec = quality.write_record(tmp_path / "id_s0", {"kind": quality.RECORD_KIND, "variant": "id", "seed": 0,
                                                     "dataset": "tiny", "data": fp}, torch.from_numpy(ours))
    run = tmp_path / "rb"
    run.mkdir()
    theirs = np.maximum(ours - 3, 1)  # RecBole's ranks: better for every user
    np.savez_compressed(run / "record.npz", test_ranks=theirs)
    (run / "result.json").write_text(json.dumps({"kind": "lmrec.recbole_sasrec", "fingerprint": fp, "paired": []}))
    args = ["--prepared", str(prep_dir), "--name", "tiny", "--out", str(run), "--pair-only"]
    for _ in range(2):  # a second pairing with the same run replaces its row
        res = recbole_sasrec.main(args + ["--pair", str(tmp_path / "id_s0")])
    assert [p["a"] for p in res["paired"]] == ["id_s0"] and res["paired"][0]["a_record"] == rec.path
    want = float(np.mean((theirs <= 10).astype(float) - (ours <= 10).astype(float)))
    assert res["paired"][0]["HR@10"]["diff"] == pytest.approx(want)
    assert json.loads((run / "result.json").read_text())["paired"] == res["paired"]
    with pytest.raises(SystemExit, match="--pair-only: name the runs"):
        recbole_sasrec.main(args)
    with pytest.raises(SystemExit, match="holds no finished run"):
        recbole_sasrec.main(["--prepared", str(prep_dir), "--name", "tiny", "--out", str(tmp_path / "none"), "--pair-only",
                             "--pair", str(tmp_path / "id_s0")])


def test_a_non_positive_wall_budget_is_one_message(tmp_path):
    prep = write_prepared(tmp_path / "prepared", num_users=8, num_items=12)
    with pytest.raises(SystemExit, match="--max-wall-s 0: expected a positive"):
        recbole_sasrec.main(["--prepared", str(prep), "--max-wall-s", "0", "--out", str(tmp_path / "o")])


def test_resume_loads_the_newest_checkpoint_and_its_counters(tmp_path):
    import os
    import types

    class Model(torch.nn.Linear):
        def load_other_parameter(self, p):
            self.other = p

    def trainer():
        m = Model(3, 2)
        return types.SimpleNamespace(device="cpu", model=m, optimizer=torch.optim.Adam(m.parameters()))

    with pytest.raises(SystemExit, match="--resume: no checkpoint under"):
        recbole_sasrec.resume(trainer(), tmp_path / "saved")
    src = trainer()
    src.model(torch.ones(1, 3)).sum().backward()
    src.optimizer.step()
    (tmp_path / "saved").mkdir()
    old = tmp_path / "saved" / "SASRec-old.pth"
    torch.save({"epoch": 1, "cur_step": 0, "best_valid_score": 0.1, "state_dict": {}, "optimizer": {}}, old)
    os.utime(old, (1, 1))
    new = tmp_path / "saved" / "SASRec-new.pth"
    torch.save({"epoch": 7, "cur_step": 2, "best_valid_score": 0.25, "state_dict": src.model.state_dict(),
                "other_parameter": None, "optimizer": src.optimizer.state_dict(), "config": {"model": "SASRec"}}, new)
    t = trainer()
    assert recbole_sasrec.resume(t, tmp_path / "saved") == 7
    assert (t.start_epoch, t.cur_step, t.best_valid_score, t.saved_model_file) == (8, 2, 0.25, str(new))
    assert torch.equal(t.model.weight, src.model.weight) and t.optimizer.state_dict()["state"]
