"""The promotion gate (inference/gate.py, ``python -m inference.gate``): tonight's model replaces the serving one only if
it holds up, judged on the same users of tonight's data through the nightly table's own scoring path.

Night 1: prepared v1 (50 users, items i0..i39, a learnable "next = current + stride" pattern); a hybrid model trained on
it ("good") and one barely trained ("poor"). Night 2: v2 (60 users, 46 items, item_idx order reversed) scored by
models trained on v1. Tiny BERT item tower; in-process calls, one CLI call for the exit codes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import reset_accelerate

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_prepared import write_prepared, write_tiny_text_model  # noqa: E402
from test_train_warmstart import make_cfg, reverse_item_order  # noqa: E402

from inference.config import InferenceConfig  # noqa: E402
from inference.gate import GateError, GateRefused, per_user, run_gate  # noqa: E402
from lmrec_common.config import ConfigError, load_config  # noqa: E402
from train.export import ExportIntegrityError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from train.loop import run

    root = tmp_path_factory.mktemp("gate")
    bert = write_tiny_text_model(root / "bert")
    v1 = write_prepared(root / "prepared", version="v1")
    raw2 = write_prepared(root / "raw2", num_users=60, num_items=46, seed=1, version="v2")
    v2 = reverse_item_order(raw2, root / "prepared2" / "v2")
    (root / "prepared2" / "LATEST").write_text("v2\n")
    # v1 again after a forget request (a request for a user without events: the data is the same, the manifest says so)
    v1f = root / "prepared_forget" / "v1f"
    shutil.copytree(v1, v1f)
    m = json.loads((v1f / "manifest.json").read_text())
    m.update(version="v1f", forget={"users_requested": 1, "users_sha256": "f" * 64, "users_forgotten": 0})
    (v1f / "manifest.json").write_text(json.dumps(m))
    out = {"root": root, "v1": v1, "v2": v2, "v1f": v1f}
    for name, data, over in (("good", v1, ["max_steps=60", "optim.lr=1e-2", "eval_every=30"]),
                             ("poor", v1, ["max_steps=1", "optim.lr=1e-6", "eval_every=1"]),
                             ("refit", v1, ["max_steps=2", "train_through=valid"]),
                             ("poor_after_forget", v1f, ["max_steps=1", "optim.lr=1e-6", "eval_every=1"])):
        reset_accelerate()
        assert run(make_cfg(bert, data, root / "ck", f"run_name={name}", *over)) == 0
        out[name] = root / "ck" / name / "final"
    reset_accelerate()
    return out


def _cfg(prepared: Path, link: Path, candidate: Path, *over: str) -> InferenceConfig:
    return load_config(InferenceConfig, ROOT / "configs/inference/ci.yaml",
                       [f"prepared_dir={prepared}", f"model_dir={link}", f"gate.candidate={candidate}", *over])


def test_first_night_promotes_and_scores_as_training_validated(models, tmp_path):
    """No model serves yet: the candidate is judged against most-popular only, and promoted by creating the link. Its
    figures through the table's path equal what training measured on the same validation split (same users, same
    full ranking, seen items excluded): the gate does not judge on numbers of its own making. A rerun decides nothing."""
    link = tmp_path / "serving"
    rep = run_gate(_cfg(models["v1"], link, models["good"], "user_batch_size=7"))  # 8 batches, the last one short
    assert rep["decision"] == "promoted" and rep["reasons"] == [] and rep["serving_before"] is None
    assert os.path.realpath(link) == str(models["good"].resolve())
    trained = json.loads((models["good"] / "metrics.json").read_text())
    for key in ("HR@10", "NDCG@10", "HR@50", "MRR", "n"):
        assert rep["candidate"]["metrics"][key] == pytest.approx(trained["valid"][key], abs=1e-9), key
        assert rep["most_popular"]["metrics"][key] == pytest.approx(trained["valid_most_popular"][key], abs=1e-9), key
    assert rep["candidate"]["metrics"]["NDCG@10"] > 2 * rep["most_popular"]["metrics"]["NDCG@10"]
    assert json.loads((models["good"].parent / "gate.json").read_text()) == rep  # the default report place
    again = run_gate(_cfg(models["v1"], link, models["good"]))
    assert again["decision"] == "already_serving" and os.path.realpath(link) == str(models["good"].resolve())


def test_worse_candidate_keeps_the_incumbent_and_a_better_one_replaces_it(models, tmp_path):
    """On night 2's data (new items, another item order) the barely trained model does not replace the trained one;
    the other way round it is replaced. The report's paired difference is the mean of the per-user differences."""
    link = tmp_path / "serving"
    os.symlink(models["good"].resolve(), link)
    report = tmp_path / "kept.json"
    rep = run_gate(_cfg(models["v2"].parent, link, models["poor"], f"gate.report={report}"))
    assert rep["decision"] == "kept_incumbent" and rep["serving_after"] == str(models["good"].resolve())
    assert os.path.realpath(link) == str(models["good"].resolve())
    c, i = rep["candidate"]["metrics"]["NDCG@10"], rep["incumbent"]["metrics"]["NDCG@10"]
    assert c < i * 0.98 and any("below the incumbent" in r for r in rep["reasons"])
    d = rep["paired_vs_incumbent"]
    assert d["mean"] == pytest.approx(c - i, abs=1e-12) and d["ci95"][1] < 0 and d["n"] == rep["candidate"]["metrics"]["n"]
    assert rep["candidate"]["catalogue"]["items_new_text_only"] == 6  # night 2's new items, scored from text
    assert json.loads(report.read_text()) == rep
    # the lists' breadth is a rule of its own: with both accuracy bars removed, a candidate whose top-10s cover
    # less than 0.9 of what the incumbent's cover is still kept out (the barely trained model covers 0.61 of the items
    # the trained one covers: above the default 0.5, below 0.9)
    cc, ci = rep["candidate"]["beyond"]["coverage@10"], rep["incumbent"]["beyond"]["coverage@10"]
    assert 0.5 * ci < cc < 0.9 * ci and not any("cover" in r for r in rep["reasons"])
    rep = run_gate(_cfg(models["v2"].parent, link, models["poor"], f"gate.report={report}", "gate.max_relative_drop=0.99",
                        "gate.min_ratio_over_popular=0", "gate.min_coverage_ratio=0.9"))
    assert rep["decision"] == "kept_incumbent" and len(rep["reasons"]) == 1 and "gate.min_coverage_ratio" in rep["reasons"][0]

    os.remove(link)
    os.symlink(models["poor"].resolve(), link)
    rep = run_gate(_cfg(models["v2"].parent, link, models["good"], f"gate.report={tmp_path / 'up.json'}"))
    assert rep["decision"] == "promoted" and os.path.realpath(link) == str(models["good"].resolve())
    assert rep["paired_vs_incumbent"]["ci95"][0] > 0


def test_refused_without_incumbent_exits_3_and_leaves_no_link(models, tmp_path):
    link = tmp_path / "serving"
    with pytest.raises(GateRefused, match="nothing is fit to publish"):
        run_gate(_cfg(models["v1"], link, models["good"], "gate.min_ratio_over_popular=1000",
                      f"gate.report={tmp_path / 'r.json'}"))
    assert not os.path.lexists(link)
    assert json.loads((tmp_path / "r.json").read_text())["decision"] == "refused"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "inference.gate", "--config", "configs/inference/ci.yaml",
                        f"prepared_dir={models['v1']}", f"model_dir={link}", f"gate.candidate={models['good']}",
                        "gate.min_ratio_over_popular=1000", f"gate.report={tmp_path / 'cli.json'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 3 and p.stderr.strip().splitlines()[-1].startswith("error: candidate") and "Traceback" not in p.stderr, p.stderr
    assert not os.path.lexists(link)


def test_a_gate_killed_before_the_link_moves_leaves_the_old_one_and_the_rerun_completes(models, tmp_path):
    """kill -9 after the report is written and before the link moves: the link still names the incumbent (a reader of
    it never finds nothing), and the same command again re-decides, moves it and rewrites the report."""
    link = tmp_path / "serving"
    os.symlink(models["poor"].resolve(), link)
    cmd = [sys.executable, "-m", "inference.gate", "--config", "configs/inference/ci.yaml", f"prepared_dir={models['v1']}",
           f"model_dir={link}", f"gate.candidate={models['good']}", f"gate.report={tmp_path / 'g.json'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "LMREC_TEST_KILL_AT": "gate_before_link"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    assert os.path.realpath(link) == str(models["poor"].resolve())
    env.pop("LMREC_TEST_KILL_AT")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert os.path.realpath(link) == str(models["good"].resolve())
    rep = json.loads((tmp_path / "g.json").read_text())
    assert rep["decision"] == "promoted" and rep["serving_before"] == str(models["poor"].resolve())
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".tmp-")] == []  # no stray link beside it


def test_a_model_trained_before_forget_requests_is_never_kept_or_promoted(models, tmp_path):
    """Tonight's data honours a forget request that the serving model's training data did not: the incumbent may not go
    on serving whatever its quality, so a weaker candidate that honours the request replaces it (here it clears the
    popularity bar because the bar is set to 0); a better candidate trained before the request is never promoted; and
    when neither honours it nothing is fit to serve (exit 3, the link left as it was)."""
    link = tmp_path / "serving"
    os.symlink(models["good"].resolve(), link)
    rep = run_gate(_cfg(models["v1f"], link, models["poor_after_forget"], "gate.min_ratio_over_popular=0",
                        f"gate.report={tmp_path / 'a.json'}"))
    assert rep["incumbent"]["honours_forget_requests"] is False and rep["candidate"]["honours_forget_requests"] is True
    assert rep["candidate"]["metrics"]["NDCG@10"] < rep["incumbent"]["metrics"]["NDCG@10"] * 0.98  # kept, but for forgetting
    assert rep["decision"] == "promoted" and "note_forget" in rep
    assert os.path.realpath(link) == str(models["poor_after_forget"].resolve())

    # the better model, trained before the request, does not replace the one that honours it
    rep = run_gate(_cfg(models["v1f"], link, models["good"], f"gate.report={tmp_path / 'b.json'}"))
    assert rep["decision"] == "kept_incumbent" and any("forget" in r for r in rep["reasons"])
    assert rep["paired_vs_incumbent"]["ci95"][0] > 0 and os.path.realpath(link) == str(models["poor_after_forget"].resolve())

    # neither honours it: nothing is fit to serve
    os.remove(link)
    os.symlink(models["good"].resolve(), link)
    with pytest.raises(GateRefused, match="trained before tonight's forget requests"):
        run_gate(_cfg(models["v1f"], link, models["poor"], f"gate.report={tmp_path / 'c.json'}"))
    assert os.path.realpath(link) == str(models["good"].resolve())
    rep = json.loads((tmp_path / "c.json").read_text())
    assert rep["decision"] == "refused" and any("forget" in r for r in rep["reasons"])


def _damaged_copy(final: Path, dst: Path) -> Path:
    """A copy of ``final`` with one weight byte flipped (size kept): it fails load_final's integrity check."""
    shutil.copytree(final, dst)
    f = dst / "model.safetensors"
    b = bytearray(f.read_bytes())
    b[int(len(b) * 0.6)] ^= 0x01
    f.write_bytes(bytes(b))
    return dst


def test_a_failed_fine_tune_leaves_the_incumbent_serving(models, tmp_path):
    """Tonight's training failed (its run folder holds no final/) or exported something damaged. By default that is one
    error (exit 2); with gate.unusable_candidate=keep_incumbent, what the nightly chain sets, the serving model stays
    and writes tonight's table: decision kept_incumbent, the reason and the incumbent's figures on tonight's data in the
    report beside the candidate. With no incumbent nothing is fit to serve (exit 3, no link)."""
    link = tmp_path / "serving"
    os.symlink(models["good"].resolve(), link)
    failed = tmp_path / "ck" / "nightly" / "final"
    (failed.parent / "step_2").mkdir(parents=True)  # what a run killed before its export leaves
    with pytest.raises(GateError, match="not a final export.*did tonight's training finish"):
        run_gate(_cfg(models["v2"].parent, link, failed))
    rep = run_gate(_cfg(models["v2"].parent, link, failed, "gate.unusable_candidate=keep_incumbent"))
    assert rep["decision"] == "kept_incumbent" and rep["serving_after"] == str(models["good"].resolve())
    assert len(rep["reasons"]) == 1 and "cannot be judged" in rep["reasons"][0] and "export.json missing" in rep["reasons"][0]
    assert rep["candidate"]["unusable"] and "paired_vs_incumbent" not in rep
    assert rep["incumbent"]["metrics"]["NDCG@10"] > rep["most_popular"]["metrics"]["NDCG@10"]
    assert json.loads((failed.parent / "gate.json").read_text()) == rep
    assert os.path.realpath(link) == str(models["good"].resolve())

    damaged = _damaged_copy(models["poor"], tmp_path / "damaged" / "final")
    with pytest.raises(ExportIntegrityError, match="model.safetensors"):
        run_gate(_cfg(models["v2"].parent, link, damaged))
    rep = run_gate(_cfg(models["v2"].parent, link, damaged, "gate.unusable_candidate=keep_incumbent"))
    assert rep["decision"] == "kept_incumbent" and "model.safetensors" in rep["reasons"][0]
    assert os.path.realpath(link) == str(models["good"].resolve())

    first = tmp_path / "first_night"
    with pytest.raises(GateRefused, match="no model serves yet"):
        run_gate(_cfg(models["v2"].parent, first, failed, "gate.unusable_candidate=keep_incumbent"))
    assert not os.path.lexists(first)


def test_an_incumbent_that_cannot_serve_is_left_out(models, tmp_path):
    """The serving link names a damaged export or nothing at all: that model could not write tonight's table either, so
    the candidate is judged against most-popular alone, promoted if it beats it (the link is repaired), and refused
    (exit 3, the link left as it was) if it does not."""
    link = tmp_path / "serving"
    damaged = _damaged_copy(models["poor"], tmp_path / "damaged" / "final")
    os.symlink(damaged, link)
    with pytest.raises(GateRefused, match="cannot serve either"):
        run_gate(_cfg(models["v1"], link, models["good"], "gate.min_ratio_over_popular=1000",
                      f"gate.report={tmp_path / 'r.json'}"))
    assert os.path.realpath(link) == str(damaged)
    rep = run_gate(_cfg(models["v1"], link, models["good"], f"gate.report={tmp_path / 'p.json'}"))
    assert rep["decision"] == "promoted" and "model.safetensors" in rep["incumbent"]["unusable"] and "note_incumbent" in rep
    assert os.path.realpath(link) == str(models["good"].resolve())

    dangling = tmp_path / "dangling"
    os.symlink(tmp_path / "gone", dangling)
    rep = run_gate(_cfg(models["v1"], dangling, models["good"], f"gate.report={tmp_path / 'd.json'}"))
    assert rep["decision"] == "promoted" and "not a final export" in rep["incumbent"]["unusable"]
    assert os.path.realpath(dangling) == str(models["good"].resolve())


def test_bad_setups_are_one_clear_error(models, tmp_path):
    folder = tmp_path / "real_folder"
    folder.mkdir()
    with pytest.raises(GateError, match="is a folder, not a link"):
        run_gate(_cfg(models["v1"], folder, models["good"]))
    with pytest.raises(GateError, match="not a final export"):
        run_gate(_cfg(models["v1"], tmp_path / "serving", tmp_path / "nope"))
    with pytest.raises(GateError, match="train_through|trained through 'valid'"):
        run_gate(_cfg(models["v1"], tmp_path / "serving", models["refit"]))
    assert not os.path.lexists(tmp_path / "serving")
    with pytest.raises(GateError, match="variants"):
        run_gate(load_config(InferenceConfig, ROOT / "configs/inference/nightly_ab.yaml", [f"gate.candidate={models['good']}"]))
    with pytest.raises(ConfigError, match="gate.metric"):
        _cfg(models["v1"], tmp_path / "serving", models["good"], "gate.metric=NDCG@7")
    from inference.run import ExclusiveLock

    lock = ExclusiveLock(tmp_path / ".serving.gate.lock", RuntimeError)
    try:
        with pytest.raises(GateError, match="another gate"):
            run_gate(_cfg(models["v1"], tmp_path / "serving", models["good"]))
    finally:
        lock.release()


def test_users_per_batch_keeps_the_scores_within_the_budget():
    from inference.gate import users_per_batch

    cfg = InferenceConfig(user_batch_size=1024, score_budget_mb=1024)
    assert users_per_batch(cfg, 40) == 1024 and users_per_batch(cfg, 1_000_000) == 89
    assert users_per_batch(InferenceConfig(score_budget_mb=1), 10_000_000) == 1


def test_per_user_values_average_to_the_metrics():
    import torch

    from train.metrics import metrics_from_ranks

    r = torch.tensor([1, 2, 5, 11, 60, 300, 3])
    m = metrics_from_ranks(r)
    for key in ("HR@10", "NDCG@10", "HR@50", "NDCG@200", "MRR"):
        assert per_user(r, key).mean() == pytest.approx(m[key], abs=1e-12), key
