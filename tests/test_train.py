"""The train stage in one process (run(cfg) as __main__ calls it): learning, kill-and-resume equality,
export, and the clear errors for bad input. Tiny prepared folder (50 users, 40 items)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from conftest import reset_accelerate
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_prepared import write_prepared, write_tiny_text_model  # noqa: E402

from data_prep.schema import PreparedDataError  # noqa: E402
from lmrec_common.config import ConfigError, load_config  # noqa: E402
from lmrec_common.models import ModelPathError  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.export import load_final  # noqa: E402
from train.loop import EXIT_REQUEUE, TrainingError, run  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_assets")
    return {"prep": write_prepared(root / "prepared"), "bert": write_tiny_text_model(root / "bert"), "root": root}


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


def make_cfg(assets, tmp_path, *over: str) -> TrainConfig:
    base = [f"data={assets['prep']}", f"output_dir={tmp_path / 'ck'}", "run_name=t", f"model.text_model_path={assets['bert']}",
            "model.d_model=32", "model.max_len=20", "model.dropout=0.1", "batch_size=8", "tracker=none",
            "optim.warmup_steps=3", "log_every=5", "eval_every=0", "save_every=0", "early_stopping_patience=0"]
    return load_config(TrainConfig, None, base + list(over))


def losses(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "losses.jsonl").read_text().splitlines()]


def test_id_model_learns_and_beats_most_popular(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path, "model.item_tower=id", "optim.lr=1e-2", "max_steps=60", "eval_every=20",
                   "model.dropout=0.0")
    assert run(cfg) == 0
    rd = tmp_path / "ck" / "t"
    ls = [x["loss"] for x in losses(rd)]
    assert len(ls) == 60 and [x["step"] for x in losses(rd)] == list(range(1, 61))
    first, last = sum(ls[:5]) / 5, sum(ls[-5:]) / 5
    assert last < first - 0.5, (first, last)
    m = json.loads((rd / "final" / "metrics.json").read_text())
    assert m["valid"]["n"] == 50 and m["test"]["n"] == 50
    # the synthetic walk is learnable: the model must beat most-popular on validation NDCG@10
    assert m["valid"]["NDCG@10"] > m["valid_most_popular"]["NDCG@10"] + 0.05, m
    # beyond accuracy of each top-10 (train/metrics.py beyond_accuracy): most-popular leans on the popular items
    for split in ("valid", "test", "valid_most_popular", "test_most_popular"):
        assert 0 < m[split]["coverage@10"] <= 1 and 0 <= m[split]["gini@10"] < 1 and 0 <= m[split]["tail_share@10"] <= 1
        assert 0 <= m[split]["popularity_percentile@10"] <= 100, (split, m[split])
    assert m["valid_most_popular"]["popularity_percentile@10"] > m["valid"]["popularity_percentile@10"], m
    # HR/NDCG split by whether the held-out item had a training event (cold items are scored from text alone)
    from data_prep.schema import load_prepared
    prep = load_prepared(assets["prep"])
    n_train = prep.items.data.table.column("n_train_events").to_numpy()
    seqs = prep.sequences.data.table
    items, pos = seqs.column("item_idx").to_pylist(), seqs.column("test_pos").to_pylist()
    cold_targets = sum(1 for it, p in zip(items, pos) if p >= 1 and n_train[it[p]] == 0)
    assert m["test"]["cold_items"]["n"] == cold_targets and m["test"]["warm_items"]["n"] == 50 - cold_targets
    assert set(m["test"]["warm_items"]) >= {"HR@10", "NDCG@10"}
    assert m["test"]["warm_items"]["NDCG@10"] == m["test"]["NDCG@10"] or cold_targets > 0
    evals = [json.loads(x) for x in (rd / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [20, 40, 60]
    assert m["steps"] == m["max_steps"] == 60 and m["stopped_by"] is None


def test_wall_time_budget_ends_training_and_still_exports(assets, tmp_path):
    """max_train_wall_s: once spent, training ends as at max_steps (validate, best/ -> final/, test);
    metrics.json says where it stopped and why. A budget smaller than one step stops after step 1."""
    cfg = make_cfg(assets, tmp_path, "model.item_tower=id", "max_steps=50", "eval_every=10", "max_train_wall_s=1e-6")
    assert run(cfg) == 0
    rd = tmp_path / "ck" / "t"
    assert [x["step"] for x in losses(rd)] == [1]
    m = json.loads((rd / "final" / "metrics.json").read_text())
    assert (m["steps"], m["max_steps"], m["stopped_by"], m["best_step"]) == (1, 50, "max_train_wall_s", 1)
    assert m["test"]["n"] == 50 and m["train_wall_s"] is not None  # timed (rounded to 0.1 s: may read 0.0)
    assert [json.loads(x)["step"] for x in (rd / "evals.jsonl").read_text().splitlines()] == [1]  # the final validation
    with pytest.raises(ValueError, match="max_train_wall_s"):
        make_cfg(assets, tmp_path, "max_train_wall_s=-1")


def test_early_stopping_ends_the_run_and_exports_the_best_step_not_the_last(assets, tmp_path, monkeypatch):
    """Validation scripted to peak at step 10 and fall after: with patience 2 the run stops at step 20 (of 60), and
    final/ holds the weights of step 10 -- exactly those of an identical run that ended at step 10 (constant lr, so
    the two share every step up to 10), not those of step 20."""
    import train.loop as loop_mod

    real = loop_mod.run_eval
    script = {5: 0.10, 10: 0.50, 15: 0.20, 20: 0.30}

    def scripted(accelerator, model, dl, catalogue=None):
        m = real(accelerator, model, dl, catalogue)
        step = max(int(json.loads(x)["step"]) for x in (tmp_path / "ck" / cur["run"] / "losses.jsonl").read_text().splitlines())
        return {**m, "NDCG@10": script.get(step, 0.0)}

    monkeypatch.setattr(loop_mod, "run_eval", scripted)
    common = ("model.item_tower=id", "optim.lr=1e-2", "optim.schedule=constant", "eval_every=5", "save_every=5")
    cur = {"run": "t"}
    cfg = make_cfg(assets, tmp_path, *common, "max_steps=60", "early_stopping_patience=2")
    assert run(cfg) == 0
    rd = tmp_path / "ck" / "t"
    m = json.loads((rd / "final" / "metrics.json").read_text())
    assert (m["stopped_by"], m["steps"], m["best_step"], m["max_steps"]) == ("early_stopping", 20, 10, 60), m
    assert [json.loads(x)["step"] for x in (rd / "evals.jsonl").read_text().splitlines()] == [5, 10, 15, 20]
    assert json.loads((rd / "final" / "export.json").read_text())["step"] == 10

    cur["run"] = "t10"
    reset_accelerate()
    assert run(make_cfg(assets, tmp_path, *common, "max_steps=10", "run_name=t10")) == 0
    final = load_file(str(rd / "final" / "model.safetensors"))
    at10 = load_file(str(tmp_path / "ck" / "t10" / "final" / "model.safetensors"))
    last = load_file(str(rd / "step_15" / "model.safetensors"))  # a later checkpoint (the run stopped at step 20)
    assert final.keys() == at10.keys() and all(torch.equal(final[k], at10[k]) for k in final)
    shared = [k for k in final if k in last]
    assert shared and any(not torch.equal(final[k], last[k]) for k in shared)  # later weights moved on


def test_training_windows_and_counts_per_train_through():
    """training_ends / TrainExamples / training_item_counts for each train_through, on a leave-last-out
    user, a user with no validation target (2 events) and a time-split user with no test target whose
    last event lies past the test window (training data in no mode)."""
    import datasets

    from train.data import TrainExamples, held_out_splits, training_ends, training_item_counts

    seqs = datasets.Dataset.from_dict({
        "user_idx": [0, 1, 2], "item_idx": [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9, 1]],
        "event_type": [[0] * 5, [1, 0], [0] * 4], "train_len": [3, 1, 2], "valid_pos": [3, -1, 2], "test_pos": [4, 1, -1]})
    assert {t: training_ends(seqs, t).tolist() for t in ("train", "valid", "test")} == {
        "train": [3, 1, 2], "valid": [4, 1, 3], "test": [5, 2, 3]}
    windows = {t: TrainExamples.build(seqs, max_len=3, through=t) for t in ("train", "valid", "test")}
    assert windows["train"].items.tolist() == [[-1, 0, 1, 2], [-1, -1, 7, 8]]  # user 1: 1 event, no pair
    assert windows["valid"].items.tolist() == [[0, 1, 2, 3], [-1, 7, 8, 9]]
    assert windows["test"].items.tolist() == [[1, 2, 3, 4], [-1, -1, 5, 6], [-1, 7, 8, 9]]
    assert windows["test"].user_idx.tolist() == [0, 1, 2] and windows["test"].etypes[1].tolist() == [0, 0, 1, 0]
    assert training_item_counts(seqs, 11, "train").tolist() == [1, 1, 1, 0, 0, 1, 0, 1, 1, 0, 0]
    assert training_item_counts(seqs, 11, "valid").tolist() == [1, 1, 1, 1, 0, 1, 0, 1, 1, 1, 0]
    assert training_item_counts(seqs, 11, "test").tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]  # user 2's last: never
    assert [held_out_splits(t) for t in ("train", "valid", "test")] == [("valid", "test"), ("test",), ()]
    with pytest.raises(ValueError, match="through must be one of"):
        training_ends(seqs, "all")


def test_refit_trains_through_held_out_targets(assets, tmp_path, capsys):
    """train_through=valid: no validation during training (its targets are training data), so no early
    stopping; final/ = the last step, evaluated on test only. =test: nothing held out, nothing evaluated.
    Another train_through is another run (the run folder refuses a resume across them)."""
    cfg = make_cfg(assets, tmp_path, "model.item_tower=id", "max_steps=12", "eval_every=4", "early_stopping_patience=1",
                   "train_through=valid")
    assert run(cfg) == 0
    rd = tmp_path / "ck" / "t"
    out = capsys.readouterr().out
    assert "train_through=valid: a refit" in out and "[valid]" not in out
    m = json.loads((rd / "final" / "metrics.json").read_text())
    assert (m["steps"], m["best_step"], m["stopped_by"], m["train_through"]) == (12, 12, None, "valid")
    assert "valid" not in m and m["test"]["n"] == 50 and not (rd / "evals.jsonl").exists()
    assert json.loads((rd / "best" / "best.json").read_text())["step"] == 12
    with pytest.raises(TrainingError, match="another run"):
        run(make_cfg(assets, tmp_path, "model.item_tower=id", "max_steps=12", "train_through=test"))
    cfg = make_cfg(assets, tmp_path, "model.item_tower=id", "max_steps=3", "train_through=test", "run_name=t2")
    assert run(cfg) == 0
    m = json.loads((tmp_path / "ck" / "t2" / "final" / "metrics.json").read_text())
    assert (m["best_step"], m["train_through"]) == (3, "test") and not {"valid", "test"} & set(m)


def test_kill_and_resume_is_exact(assets, tmp_path):
    """An uninterrupted run vs one stopped after step 5 (same path as SIGTERM: save, exit 124) and
    relaunched: identical per-step losses and identical final weights. Hybrid frozen text tower, its features whitened
    (model.text_whiten: fitted at the launch, the resumed one loads it), dropout on, gradient accumulation 2 (an epoch
    ends on a half-full accumulation)."""
    common = ["model.item_tower=hybrid", "model.text_whiten=8", "grad_accum=2", "max_steps=12", "optim.lr=3e-3", "save_every=4"]
    a = make_cfg(assets, tmp_path, *common, "run_name=straight")
    assert run(a) == 0
    reset_accelerate()
    b = make_cfg(assets, tmp_path, *common, "run_name=killed", "stop_after_steps=5")
    assert run(b) == EXIT_REQUEUE
    rb = tmp_path / "ck" / "killed"
    assert (rb / "step_5" / "COMPLETE").is_file() and not (rb / "final").exists()
    assert json.loads((rb / "PREEMPTED.json").read_text())["step"] == 5
    assert [x["step"] for x in losses(rb)] == [1, 2, 3, 4, 5]
    wall_before = json.loads((rb / "step_5" / "trainer_state.json").read_text())["wall_s"]
    assert wall_before > 0
    reset_accelerate()
    b2 = make_cfg(assets, tmp_path, *common, "run_name=killed")  # relaunch of the same command
    assert run(b2) == 0
    la, lb = losses(tmp_path / "ck" / "straight"), losses(rb)
    assert [x["step"] for x in lb] == list(range(1, 13))
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]  # bit-exact, not approximately
    wa = load_file(str(tmp_path / "ck" / "straight" / "final" / "model.safetensors"))
    wb = load_file(str(rb / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the run's training time counts both launches (the first up to its save at step 5)
    assert json.loads((rb / "final" / "metrics.json").read_text())["train_wall_s"] > wall_before
    # keep_last=2: only the two newest complete step folders remain
    assert sorted(p.name for p in rb.glob("step_*")) == ["step_12", "step_8"]


# ---------------------------------------------------------------------------------------------- checkpoints (issue 29)
class _RunsCode:
    """Unpickling this creates a file: it stands for whatever code a planted pickle would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rewrite_complete(ck: Path, **changes) -> None:
    """COMPLETE with its hashes recomputed: what someone who can write into the run folder can do."""
    from train.checkpoint import write_complete

    rec = json.loads((ck / "COMPLETE").read_text())
    (ck / "COMPLETE").unlink()
    write_complete(ck, rec["step"], rec["world_size"])
    if changes:
        (ck / "COMPLETE").write_text(json.dumps({**json.loads((ck / "COMPLETE").read_text()), **changes}))


def test_checkpoint_holds_no_pickled_code_and_refuses_files_it_does_not_write(assets, tmp_path):
    """step_N/ holds the LR schedule as JSON (no custom_checkpoint_0.pkl, which accelerate unpickles with
    weights_only=False) and COMPLETE lists every file's sha256. A planted pickle is refused by name and never
    unpickled; one whose hashes were recomputed still runs nothing (every pickle is read with weights_only)."""
    common = ["model.item_tower=id", "max_steps=6", "save_every=2", "keep_last=1"]
    assert run(make_cfg(assets, tmp_path, *common, "stop_after_steps=4")) == EXIT_REQUEUE
    ck = tmp_path / "ck" / "t" / "step_4"
    names = sorted(p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file())
    assert names == ["COMPLETE", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "scheduler.json",
                     "trainer_state.json"]
    assert json.loads((ck / "scheduler.json").read_text())["last_epoch"] == 4
    rec = json.loads((ck / "COMPLETE").read_text())
    assert (rec["step"], rec["world_size"], sorted(rec["files"])) == (4, 1, names[1:])
    marker = tmp_path / "code_ran"
    torch.save({"last_epoch": 4, "x": _RunsCode(str(marker))}, ck / "custom_checkpoint_0.pkl")
    reset_accelerate()
    with pytest.raises(TrainingError, match=r"no checkpoint .* can be resumed: .*step_4/custom_checkpoint_0.pkl: unexpected file"):
        run(make_cfg(assets, tmp_path, *common))
    assert not marker.exists()
    # the same pickle as the RNG state, with COMPLETE rewritten to match: loaded with weights_only, it is refused
    (ck / "custom_checkpoint_0.pkl").replace(ck / "random_states_0.pkl")
    _rewrite_complete(ck)
    reset_accelerate()
    with pytest.raises(TrainingError, match=r"random_states_0.pkl: this rank's RNG state was not restored"):
        run(make_cfg(assets, tmp_path, *common))
    assert not marker.exists()
    # as the optimizer state: load_state fails inside torch, whose error names no file; the message names it
    (ck / "optimizer.bin").write_bytes((ck / "random_states_0.pkl").read_bytes())
    _rewrite_complete(ck)
    reset_accelerate()
    with pytest.raises(TrainingError, match=r"step_4/optimizer.bin: verified but does not load with weights_only "
                                            r"\(UnpicklingError: [^\x1b]*\)"):
        run(make_cfg(assets, tmp_path, *common))
    assert not marker.exists()


def test_deepspeed_checkpoint_engine_reads_with_weights_only(tmp_path):
    """DeepSpeed's TorchCheckpointEngine unpickles with weights_only=False; the swapped one reads DeepSpeed's own
    state (a loss scaler, the ZeRO stage enum) and refuses anything else without running it. The 2-process
    ZeRO-2/3 resumes through it are in tests/test_train_distributed.py."""
    import pickle

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from train.checkpoint import weights_only_deepspeed_engine

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

    eng = Engine()
    weights_only_deepspeed_engine(eng)
    good = tmp_path / "optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.weights,
                                         "fp32": [torch.ones(3)]}}, good)
    sd = eng.checkpoint_engine.load(str(good), map_location="cpu")
    assert isinstance(sd["optimizer_state_dict"]["loss_scaler"], LossScaler)
    marker = tmp_path / "code_ran"
    torch.save({"optimizer_state_dict": _RunsCode(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        eng.checkpoint_engine.load(str(tmp_path / "evil.pt"), map_location="cpu")
    assert not marker.exists()


def test_resume_falls_back_past_a_damaged_checkpoint_and_a_torn_log_line(assets, tmp_path, capsys):
    """A truncated RNG state in the newest step_N/ (Accelerate used to skip it silently: the resume was no longer
    exact) and a torn last line of losses.jsonl: the relaunch warns, naming the file, resumes from the newest
    checkpoint that verifies and ends with the same losses and weights as an uninterrupted run."""
    common = ["model.item_tower=id", "max_steps=8", "save_every=2", "keep_last=3", "optim.lr=3e-3"]
    assert run(make_cfg(assets, tmp_path, *common, "run_name=straight")) == 0
    reset_accelerate()
    assert run(make_cfg(assets, tmp_path, *common, "run_name=killed", "stop_after_steps=6")) == EXIT_REQUEUE
    rb = tmp_path / "ck" / "killed"
    assert sorted(p.name for p in rb.glob("step_*")) == ["step_2", "step_4", "step_6"]
    rng = rb / "step_6" / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[: rng.stat().st_size // 2])
    with open(rb / "losses.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.2')  # a kill in the middle of a write
    reset_accelerate()
    capsys.readouterr()
    assert run(make_cfg(assets, tmp_path, *common, "run_name=killed")) == 0
    out = capsys.readouterr().out
    assert "warning: checkpoint refused: " in out and "step_6/random_states_0.pkl: sha256 differs" in out, out[-3000:]
    assert f"resuming from {rb / 'step_4'}, the newest checkpoint that verifies" in out
    assert "losses.jsonl: dropped line(s) [7]" in out
    la, lb = losses(tmp_path / "ck" / "straight"), losses(rb)
    assert [x["step"] for x in lb] == list(range(1, 9)) and [x["loss"] for x in la] == [x["loss"] for x in lb]
    wa = load_file(str(tmp_path / "ck" / "straight" / "final" / "model.safetensors"))
    wb = load_file(str(rb / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_relaunch_removes_what_a_killed_launch_left(assets, tmp_path, capsys):
    """A launch killed while it exported final/, replaced best/ or rewrote a log leaves temporary files named after its
    pid, which no later write replaces (bench/fault_suite.py kill9_train found best/.tmp-best.json-* piling up): the
    relaunch removes them, and the run ends as usual."""
    common = ["model.item_tower=id", "max_steps=4", "save_every=2"]
    assert run(make_cfg(assets, tmp_path, *common, "stop_after_steps=2")) == EXIT_REQUEUE
    rd = tmp_path / "ck" / "t"
    left = [rd / ".tmp-final-4242-deadbeef" / "model.safetensors", rd / "best" / ".tmp-model-4242.safetensors",
            rd / "best" / ".tmp-best.json-4242-cafe", rd / ".tmp-losses.jsonl-4242-f00d"]
    for p in left:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half written")
    reset_accelerate()
    capsys.readouterr()
    assert run(make_cfg(assets, tmp_path, *common)) == 0
    assert "removed 4 leftover(s) of a killed launch" in capsys.readouterr().out
    assert not [p for p in left if p.exists()] and not list(rd.rglob(".tmp-*"))
    assert (rd / "final" / "model.safetensors").is_file() and [x["step"] for x in losses(rd)] == [1, 2, 3, 4]


def test_resume_with_another_world_size_is_refused(assets, tmp_path):
    """A checkpoint saved by 2 processes, relaunched with 1: the global batch would change, so the resume is
    refused with both figures (no setting allows it)."""
    common = ["model.item_tower=id", "max_steps=6", "save_every=2"]
    assert run(make_cfg(assets, tmp_path, *common, "stop_after_steps=2")) == EXIT_REQUEUE
    _rewrite_complete(tmp_path / "ck" / "t" / "step_2", world_size=2)
    reset_accelerate()
    with pytest.raises(TrainingError, match=r"step_2 was saved by 2 process\(es\) \(global batch 8 x 1 x 2 = 16\); this launch "
                                            r"has 1 \(global batch 8\)\. .*refused"):
        run(make_cfg(assets, tmp_path, *common))


def test_checkpoint_from_before_hashes_resumes_exactly(assets, tmp_path):
    """A step_N/ written by the previous code (COMPLETE = "N", the scheduler pickled by accelerate as
    custom_checkpoint_0.pkl) resumes exactly: its pickle is read with weights_only and load_state never sees it.
    Its world size is the number of random_states files."""
    common = ["model.item_tower=id", "max_steps=6", "save_every=3", "optim.lr=3e-3"]
    assert run(make_cfg(assets, tmp_path, *common, "run_name=straight")) == 0
    reset_accelerate()
    assert run(make_cfg(assets, tmp_path, *common, "run_name=old", "stop_after_steps=3")) == EXIT_REQUEUE
    ck = tmp_path / "ck" / "old" / "step_3"
    torch.save(json.loads((ck / "scheduler.json").read_text()), ck / "custom_checkpoint_0.pkl")
    (ck / "scheduler.json").unlink()
    (ck / "COMPLETE").write_text("3\n")
    from train.checkpoint import verify

    assert verify(ck)["world_size"] == 1
    reset_accelerate()
    assert run(make_cfg(assets, tmp_path, *common, "run_name=old")) == 0
    assert [x["loss"] for x in losses(tmp_path / "ck" / "straight")] == [x["loss"] for x in losses(tmp_path / "ck" / "old")]
    assert not list((tmp_path / "ck" / "old").glob(".resume-*"))


def test_final_export_is_self_describing(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path, "model.item_tower=hybrid", "max_steps=4")
    assert run(cfg) == 0
    final = tmp_path / "ck" / "t" / "final"
    names = {p.name for p in final.iterdir()}
    assert names >= {"model.safetensors", "model_config.json", "item_tower", "train_config.yaml", "data_manifest.json",
                     "metrics.json", "export.json"}
    model, info = load_final(final)
    assert info["kind"] == "lmrec.model" and info["data_version"] == "v1" and len(info["model_version"]) == 12
    assert info["data_manifest"]["kind"] == "lmrec.prepared"
    assert not model.training and model.cfg.text_model_path == "item_tower"
    import datasets

    from train.catalogue import Catalogue

    cat = Catalogue.build(datasets.load_from_disk(str(assets["prep"] / "items")), model)
    assert cat.item_vectors(model).shape == (40, 32)


def test_text_feature_cache_shared_by_runs(assets, tmp_path, capsys):
    """A frozen text tower's features are encoded by the first run only; the second run (same encoder and
    catalogue) reads them all from text_feature_cache and trains the same model."""
    cache = tmp_path / "textcache"
    a = make_cfg(assets, tmp_path, "model.item_tower=hybrid", "max_steps=3", "run_name=a", f"text_feature_cache={cache}")
    b = make_cfg(assets, tmp_path, "model.item_tower=hybrid", "max_steps=3", "run_name=b", f"text_feature_cache={cache}")
    assert run(a) == 0
    assert "encoded 40 of 40 items" in capsys.readouterr().out
    assert run(b) == 0
    assert "encoded 0 of 40 items" in capsys.readouterr().out
    la, lb = losses(tmp_path / "ck" / "a"), losses(tmp_path / "ck" / "b")
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]


def test_lora_sampled_softmax_runs(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path, "model.item_tower=text", "model.text_mode=lora", "model.loss=sampled_softmax",
                   "model.num_negatives=8", "model.lora_target_modules=[query,value]", "max_steps=3", "evaluate_test=false")
    assert run(cfg) == 0
    model, _ = load_final(tmp_path / "ck" / "t" / "final")
    assert not any("lora" in k for k in model.state_dict())


def test_top_layer_mode_trains_the_top_layer_only_and_exports_a_whole_encoder(assets, tmp_path, capsys):
    """text_mode top through the real loop (sampled softmax, hybrid): the lower layers' states are cached once, the
    top layer alone moves, and final/ holds the whole encoder with that layer trained, served as a frozen tower."""
    from safetensors.torch import load_file

    cfg = make_cfg(assets, tmp_path, "model.item_tower=hybrid", "model.text_mode=top", "model.top_layers=1",
                   "model.loss=sampled_softmax", "model.num_negatives=8", "optim.text_lr=1e-2", "max_steps=4",
                   "eval_every=2", "evaluate_test=false")
    assert run(cfg) == 0
    assert "the top 1 encoder layer(s) trained" in capsys.readouterr().out
    model, info = load_final(tmp_path / "ck" / "t" / "final")
    assert model.cfg.text_mode == "frozen" and info["trained_text_mode"] == "top"
    base = load_file(str(assets["bert"] / "model.safetensors"))
    tuned = {k.removeprefix("text_encoder."): v for k, v in model.state_dict().items() if k.startswith("text_encoder.")}
    moved = {k for k, v in base.items() if k in tuned and not torch.equal(v.float(), tuned[k].float())}
    assert moved and all(k.startswith("encoder.layer.1.") for k in moved)  # the top layer of 2, nothing below


# ---------------------------------------------------------------------------------------------- bad input
def test_unknown_config_key_names_it(assets, tmp_path):
    with pytest.raises(ConfigError, match="model.hiden"):
        make_cfg(assets, tmp_path, "model.hiden=3")


def test_model_path_missing_or_not_a_transformer(assets, tmp_path):
    with pytest.raises(ModelPathError, match="does not exist"):
        run(make_cfg(assets, tmp_path, "model.text_model_path=/nonexistent/model"))
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "weights.bin").write_text("x")
    with pytest.raises(ModelPathError, match="not a Hugging Face transformer"):
        run(make_cfg(assets, tmp_path, f"model.text_model_path={tmp_path / 'notamodel'}"))


def test_incompatible_prepared_version(assets, tmp_path):
    old = write_prepared(tmp_path / "old", num_users=5, schema_version=99)
    with pytest.raises(PreparedDataError, match="schema_version 99"):
        run(make_cfg(assets, tmp_path, f"data={old}"))


def test_batch_size_not_divisible(assets, tmp_path):
    with pytest.raises(ConfigError, match="global_batch_size 10"):
        run(make_cfg(assets, tmp_path, "global_batch_size=10", "grad_accum=4"))


def test_checkpoint_folder_of_another_run(assets, tmp_path):
    assert run(make_cfg(assets, tmp_path, "model.item_tower=id", "max_steps=2")) == 0
    with pytest.raises(TrainingError, match=r"another run .*optim.lr: 0.001 -> 0.005"):
        run(make_cfg(assets, tmp_path, "model.item_tower=id", "max_steps=2", "optim.lr=5e-3"))


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(assets, tmp_path, monkeypatch):
    from train.model import SeqRecModel

    orig = SeqRecModel.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = orig(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(SeqRecModel, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss nan at step 3 .*last good checkpoint is .*step_2"):
        run(make_cfg(assets, tmp_path, "model.item_tower=id", "max_steps=6", "save_every=2"))
    rd = tmp_path / "ck" / "t"
    assert (rd / "step_2" / "COMPLETE").is_file() and not (rd / "step_3").exists()


def test_sigterm_saves_and_returns_124(assets, tmp_path, monkeypatch):
    """A real SIGTERM mid-run: the current step finishes, a checkpoint is saved, exit code 124."""
    import os
    import signal

    from train.model import SeqRecModel

    orig = SeqRecModel.forward
    calls = {"n": 0}

    def forward_then_signal(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(self, *a, **k)

    monkeypatch.setattr(SeqRecModel, "forward", forward_then_signal)
    assert run(make_cfg(assets, tmp_path, "model.item_tower=id", "max_steps=6")) == EXIT_REQUEUE
    rd = tmp_path / "ck" / "t"
    assert json.loads((rd / "PREEMPTED.json").read_text()) == {**json.loads((rd / "PREEMPTED.json").read_text()),
                                                               "step": 2, "reason": "SIGTERM"}
    assert (rd / "step_2" / "COMPLETE").is_file()
    # the handler is removed again after run()
    assert signal.getsignal(signal.SIGTERM) is not None and "StopFlag" not in repr(signal.getsignal(signal.SIGTERM))


def test_onednn_cache_bound_unless_the_user_set_one(monkeypatch):
    """bf16 autocast on CPU caches one oneDNN primitive per input shape (GBs at oneDNN's default of 1024):
    training sets a small capacity, but a value the user exported wins."""
    from train.loop import ONEDNN_CACHE_CAPACITY, bound_onednn_cache

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    bound_onednn_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == ONEDNN_CACHE_CAPACITY == "64"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    bound_onednn_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"


def test_trainer_state_wall_time_adds_up_over_launches():
    """wall_s carries the earlier launches' time; the clock itself is not part of the saved state."""
    import time

    from train.loop import TrainerState

    state = TrainerState(step=7, wall_s=100.0)
    state.start_clock(time.time() - 5.0)
    state.tick()
    assert 105.0 <= state.wall_s < 110.0
    saved = state.to_dict()
    assert set(saved) == {"step", "epoch", "batch_in_epoch", "best_metric", "best_step", "bad_evals", "examples_seen",
                          "last_eval_step", "wall_s", "stopped_by", "lr_scale", "plateau_evals", "decay_start", "decay_steps"}
    again = TrainerState(**json.loads(json.dumps(saved)))
    assert again.step == 7 and again.wall_s == state.wall_s
    # a launch that was not timed (a checkpoint from before the field) leaves the whole run untimed
    untimed = TrainerState(wall_s=None)
    untimed.start_clock(time.time() - 5.0)
    untimed.tick()
    assert untimed.wall_s is None


def test_emulated_cpu_precision_is_named(monkeypatch):
    """bf16 autocast on a CPU without AVX512-BF16 / AMX is emulated (~10x slower): training says so up front."""
    from train.loop import emulated_cpu_precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    msg = emulated_cpu_precision("bf16", cpu)
    assert msg and "AVX512-BF16" in msg and "--mixed_precision no" in msg
    assert emulated_cpu_precision("no", cpu) is None
    assert emulated_cpu_precision("bf16", torch.device("cuda", 0)) is None  # GPUs: not this function's business
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert emulated_cpu_precision("bf16", cpu) is None


def test_final_evaluation_splits_cold_and_warm_targets():
    """evaluate(..., beyond=(training events per item, k)) reports HR/NDCG for the users whose held-out item had no
    training event (cold, scored from text alone) and for the rest, beside the overall figures."""
    from train.loop import evaluate

    class Acc:
        def gather_for_metrics(self, x):
            return x

    # 3 users, 5 items; item 4 is cold. Scores put each user's target at rank 1, 3 and 1 (seen items excluded)
    batch = {"target": torch.tensor([4, 1, 2]), "seen": torch.tensor([[0], [-1], [3]])}
    scores = torch.tensor([[9.0, 1, 2, 3, 5], [5, 3, 4, 2, 1], [1, 2, 5, 9, 0]])
    m = evaluate(Acc(), [batch], lambda b: scores, beyond=(torch.tensor([3.0, 5, 2, 1, 0]), 2))
    assert m["cold_items"]["n"] == 1 and m["cold_items"]["HR@10"] == 1.0 and m["cold_items"]["NDCG@10"] == 1.0
    assert m["warm_items"]["n"] == 2 and m["warm_items"]["HR@10"] == 1.0
    assert abs(m["warm_items"]["NDCG@10"] - (1 / math.log2(4) + 1.0) / 2) < 1e-6
    assert m["n"] == 3


# ------------------------------------------------------------------------------------------ plateau schedule (issue 27)
def test_plateau_schedule_anneals_on_validation_and_resumes_exactly(assets, tmp_path, monkeypatch):
    """schedule plateau: the lr drops by plateau_factor after each evaluation without a better NDCG@10 (floor
    min_lr_ratio), and a run killed between two decays resumes with the same lr and the same losses. Validation
    is scripted (every evaluation after the first is worse), so when the decays happen is known."""
    import train.loop as loop

    real = loop.run_eval
    calls = {"n": 0}

    def scripted(*args, **kwargs):
        m = real(*args, **kwargs)
        calls["n"] += 1
        return {**m, "NDCG@10": 1.0 / calls["n"]}  # 1, 0.5, 0.33, ...: only the first evaluation is the best

    monkeypatch.setattr(loop, "run_eval", scripted)
    common = ["model.item_tower=id", "max_steps=12", "optim.lr=1e-2", "optim.warmup_steps=2", "optim.schedule=plateau",
              "optim.plateau_factor=0.5", "optim.min_lr_ratio=0.3", "eval_every=3", "save_every=3", "log_every=1"]
    assert run(make_cfg(assets, tmp_path, *common, "run_name=straight")) == 0
    la = losses(tmp_path / "ck" / "straight")
    lr = {x["step"]: x["lr"] for x in la}
    # evaluations at steps 3 (best), 6 (worse: x0.5), 9 (worse: x0.25 -> the floor 0.3), 12
    assert [round(lr[s] / 1e-2, 6) for s in (3, 4, 6, 7, 9, 10, 12)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.3, 0.3], lr
    st = json.loads((tmp_path / "ck" / "straight" / "final" / "metrics.json").read_text())
    assert st["best_step"] == 3, st.get("best_step")

    reset_accelerate()
    calls["n"] = 0
    b = make_cfg(assets, tmp_path, *common, "run_name=killed", "stop_after_steps=7")
    assert run(b) == EXIT_REQUEUE
    reset_accelerate()
    calls["n"] = 2  # the killed launch evaluated at steps 3 and 6
    assert run(make_cfg(assets, tmp_path, *common, "run_name=killed")) == 0
    lb = losses(tmp_path / "ck" / "killed")
    assert [x["lr"] for x in lb] == [x["lr"] for x in la]
    assert [x["loss"] for x in lb] == [x["loss"] for x in la]


def test_plateau_schedule_needs_validation():
    with pytest.raises(ValueError, match="plateau follows validation"):
        load_config(TrainConfig, None, ["optim.schedule=plateau", "train_through=valid"])
    with pytest.raises(ValueError, match="plateau_factor"):
        load_config(TrainConfig, None, ["optim.schedule=plateau", "optim.plateau_factor=1.5"])


# ------------------------------------------------------------------------------ wsd schedule and the wall budget (issue 27)
def test_wsd_schedule_shape():
    """warmup-stable-decay: linear warm-up, the base lr, then 1 - sqrt(t) down to min_lr_ratio over the last
    decay_fraction of the steps after the warm-up; a placed window (the wall budget's) replaces the default one."""
    from train.loop import lr_lambda, wsd_window

    cfg = load_config(TrainConfig, None, ["optim.schedule=wsd", "optim.warmup_steps=10", "optim.decay_fraction=0.25",
                                          "optim.min_lr_ratio=0.1"])
    assert wsd_window(cfg, 90) == (70, 20)
    f = lr_lambda(cfg, 90)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert [f(s) for s in (10, 40, 69, 70)] == [1.0, 1.0, 1.0, 1.0]
    assert f(75) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.25)))
    assert f(90) == pytest.approx(0.1) and f(200) == pytest.approx(0.1)
    g = lr_lambda(cfg, 90, decay_window=lambda: (30, 5))
    assert g(29) == 1.0 and g(35) == pytest.approx(0.1) and g(31) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.2)))
    with pytest.raises(ValueError, match="decay_fraction"):
        load_config(TrainConfig, None, ["optim.schedule=wsd", "optim.decay_fraction=0"])


def test_wsd_wall_budget_places_the_decay_and_resumes_exactly(assets, tmp_path, monkeypatch):
    """With max_train_wall_s and schedule wsd the budget shortens the schedule: once (1 - decay_fraction) of it is
    spent and max_steps would not fit, the lr decays over the steps that fit and training ends there, annealed
    (metrics.json: stopped_by max_train_wall_s, decay_start); a run killed inside the decay resumes with the same lr
    and losses. The clock is scripted (one second per optimizer step) so the decision is known in advance."""
    import train.loop as loop

    monkeypatch.setattr(loop.TrainerState, "spent_s", lambda self: float(self.step))
    # budget 10.5 s, decay_fraction 0.3: the decay is placed at the first step with 7.35 s spent (step 8), 1 s per
    # step leaves room for int(2.5) = 2 steps, so the lr reaches min_lr_ratio at step 10 and training ends there
    common = ["model.item_tower=id", "max_steps=40", "optim.lr=1e-2", "optim.warmup_steps=2", "optim.schedule=wsd",
              "optim.decay_fraction=0.3", "optim.min_lr_ratio=0.1", "max_train_wall_s=10.5", "save_every=3", "log_every=1"]
    assert run(make_cfg(assets, tmp_path, *common, "run_name=straight")) == 0
    la = losses(tmp_path / "ck" / "straight")
    lr = {x["step"]: x["lr"] for x in la}
    assert max(lr) == 10, sorted(lr)
    assert [round(lr[s] / 1e-2, 6) for s in (2, 5, 8)] == [1.0, 1.0, 1.0], lr
    assert lr[9] / 1e-2 == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    assert lr[10] / 1e-2 == pytest.approx(0.1)
    m = json.loads((tmp_path / "ck" / "straight" / "final" / "metrics.json").read_text())
    assert (m["steps"], m["max_steps"], m["stopped_by"], m["decay_start"]) == (10, 40, "max_train_wall_s", 8), m

    reset_accelerate()
    assert run(make_cfg(assets, tmp_path, *common, "run_name=killed", "stop_after_steps=9")) == EXIT_REQUEUE
    reset_accelerate()
    assert run(make_cfg(assets, tmp_path, *common, "run_name=killed")) == 0
    lb = losses(tmp_path / "ck" / "killed")
    assert [x["lr"] for x in lb] == [x["lr"] for x in la]
    assert [x["loss"] for x in lb] == [x["loss"] for x in la]

    # without a binding budget the decay is the last decay_fraction of max_steps and the run goes to max_steps
    reset_accelerate()
    assert run(make_cfg(assets, tmp_path, *[c for c in common if not c.startswith("max_train")], "run_name=nobudget")) == 0
    m = json.loads((tmp_path / "ck" / "nobudget" / "final" / "metrics.json").read_text())
    assert (m["steps"], m["stopped_by"], m["decay_start"]) == (40, None, 40 - round(0.3 * 38)), m
