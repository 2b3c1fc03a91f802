"""bench/quality.py: the cold-start split, the ranking of the baseline, aggregation over seeds.
Pure functions on tiny hand-made inputs (no training, no MovieLens); the whole bench is run by
``python bench/quality.py --dataset ml-100k --quick`` (minutes, needs the dataset)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _raw(tmp: Path, n_users=30, n_items=40, per_user=8, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        items = rng.choice(n_items, size=per_user, replace=False)
        for j, i in enumerate(items):
            # two events share a timestamp per user: the tie is broken by row order (as data_prep does)
            rows.append((u, int(i), 1_000_000 + 60 * min(j, per_user - 2)))
    rows = [rows[k] for k in rng.permutation(len(rows))]  # file order is not time order
    raw = tmp / "raw"
    (raw / "events").mkdir(parents=True)
    (raw / "items").mkdir()
    pq.write_table(pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                             "timestamp": pa.array([r[2] * 1000 for r in rows], pa.timestamp("ms", tz="UTC"))}),
                   raw / "events" / "part-00000.parquet")
    pq.write_table(pa.table({"item_id": list(range(n_items)), "title": [f"t{i}" for i in range(n_items)]}),
                   raw / "items" / "items.parquet")
    return raw


def test_cold_split_keeps_cold_items_only_as_last_events(quality, tmp_path):
    raw = _raw(tmp_path)
    info = quality.make_cold_raw(raw, tmp_path / "cold")
    ev = pq.read_table(raw / "events").to_pandas()
    kept = pq.read_table(tmp_path / "cold" / "events").to_pandas()
    cold = set(info["cold_items"])
    assert info["n_cold_items"] == round(0.1 * ev.item_id.nunique()) == len(cold) > 0
    assert info["events_read"] == len(ev) == info["events_kept"] + info["events_removed_cold_item"]
    assert len(kept) == info["events_kept"]
    # last event of each user in the ORIGINAL data = max timestamp, ties -> later row in the file
    ev["row"] = np.arange(len(ev))
    last = ev.sort_values(["user_id", "timestamp", "row"]).groupby("user_id").tail(1)
    expected_cold_targets = int(last.item_id.isin(cold).sum())
    assert info["cold_test_targets"] == expected_cold_targets
    # every kept cold event is its user's last event; no warm event was removed
    kept_cold = kept[kept.item_id.isin(cold)]
    assert len(kept_cold) == expected_cold_targets
    assert set(zip(kept_cold.user_id, kept_cold.item_id)) <= set(zip(last.user_id, last.item_id))
    assert int((~ev.item_id.isin(cold)).sum()) == int((~kept.item_id.isin(cold)).sum())
    # the catalogue is carried over whole (cold items stay scorable from text)
    assert pq.read_table(tmp_path / "cold" / "items").num_rows == 40
    # a rerun reuses the published split
    assert quality.make_cold_raw(raw, tmp_path / "cold") == json.loads((tmp_path / "cold" / "cold.json").read_text())


def test_rank_users_masks_a_private_copy_and_excludes_non_candidates(quality, monkeypatch):
    """The baseline returns an expanded view of ONE row: masking it in place must not leak the seen
    items of one user into another's ranking (regression: it once did)."""

    class Ex:
        def __init__(self):
            self.n = 2

        def __len__(self):
            return self.n

        def collate(self, idx):
            # user 0 saw items 0,1 and wants 2; user 1 saw item 2 and wants 0
            return {"hist": torch.tensor([[0, 1], [-1, 2]])[idx], "event_types": torch.zeros(len(idx), 2, dtype=torch.long),
                    "target": torch.tensor([2, 0])[idx], "seen": torch.tensor([[0, 1], [2, -1]])[idx],
                    "user_idx": torch.tensor([0, 1])[idx]}

    import train.data

    monkeypatch.setattr(train.data.EvalExamples, "build", classmethod(lambda cls, *a, **k: Ex()))
    counts = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])  # popularity: 0 > 1 > 2 > 3 > 4
    base = counts[None]
    cand = torch.tensor([True, True, True, True, False])

    def score(b):
        return base.expand(b["target"].size(0), -1)

    prep = type("Prep", (), {"sequences": None})()  # EvalExamples.build is replaced above
    r = quality.rank_users(score, prep, "test", 2, cand, "cpu")
    # user 0: 0 and 1 excluded -> target 2 is first; user 1: item 2 excluded, target 0 is first
    assert r["ranks"].tolist() == [1, 1]
    assert torch.equal(counts, base[0])  # the score source was not modified
    # top-10 never holds a seen item, and a non-candidate only after every candidate (it is -inf)
    assert r["top10"].shape == (2, 5)  # k = min(10, items)
    assert r["top10"][0, 0].item() == 2 and r["top10"][1, 0].item() == 0
    m = quality.summarize(r, int(cand.sum()), {"slice": torch.tensor([True, False, False, False, False])})
    assert m["HR@10"] == 1.0 and m["NDCG@10"] == 1.0 and m["n"] == 2
    assert m["slice"]["n"] == 1  # only user 1's target (item 0) is in the slice


def test_aggregate_over_seeds(quality):
    per = [{"test": {"HR@10": 0.2, "NDCG@10": 0.1, "n": 10, "s": {"HR@10": 0.5}}},
           {"test": {"HR@10": 0.4, "NDCG@10": 0.3, "n": 10, "s": {"HR@10": 0.7}}}]
    a = quality.aggregate(per)
    assert a["HR@10"] == {"mean": pytest.approx(0.3), "min": 0.2, "max": 0.4, "n_seeds": 2}
    assert a["NDCG@10"]["mean"] == pytest.approx(0.2)
    s = quality.aggregate(per, "test", "s")
    assert s["HR@10"]["mean"] == pytest.approx(0.6) and "NDCG@10" not in s
    assert quality.fmt_range(a["HR@10"]) == "0.3000 (0.2000-0.4000)"
    assert quality.fmt_range({}) == "-"
    assert not math.isnan(a["HR@10"]["mean"])


def test_seeds_per_variant_and_table(quality):
    assert quality.parse_seeds("0, 1,2", "--seeds") == [0, 1, 2]
    for bad in ("", "0,0", "a"):
        with pytest.raises(SystemExit, match="--seeds"):
            quality.parse_seeds(bad, "--seeds")
    with pytest.raises(SystemExit, match="VARIANT=SEEDS"):
        quality.main(["--dataset", "ml-100k", "--seeds-for", "nosuch=1", "--src", "/nonexistent"])
    # a table over models trained with different seeds names each model's seeds
    agg = lambda v: {"HR@10": {"mean": v, "min": v, "max": v, "n_seeds": 1}}  # noqa: E731
    res = {"dataset": "ml-100k", "command": "c", "precision": "no", "wall_s": 1.0, "n_candidates": 5, "n_test_users": 2,
           "overrides": [], "machine": {"cpu": "x", "cpu_cores": 2, "gpu": None, "torch": "t"},
           "configs": {"id": "a.yaml", "hybrid": "b.yaml"},
           "runs": {"id": {"0": {"wall_s": 1.0}}, "hybrid": {"0": {"wall_s": 1.0}, "1": {"wall_s": 1.0}, "2": {"wall_s": 1.0}}},
           "summary": {"most_popular": agg(0.1), "id": agg(0.2), "hybrid": agg(0.3)}, "summary_valid": {}}
    rows = {r.split(" | ")[0].strip("| "): r.split(" | ") for r in quality.dataset_section(res).splitlines() if r.startswith("| ")}
    assert rows["hybrid"][2] == "0,1,2" and rows["id"][2] == "0" and rows["most_popular"][2] == "-"
    assert rows["hybrid"][3] == "0.3000"
    assert rows["hybrid"][-1] == "0:01/run |" and rows["most_popular"][-1] == "- |"
    # a run resumed before the training loop summed its launches has no whole training time: left out, and said
    res["runs"]["hybrid"]["1"] = {"wall_s": None}
    rows = {r.split(" | ")[0].strip("| "): r.split(" | ") for r in quality.dataset_section(res).splitlines() if r.startswith("| ")}
    assert rows["hybrid"][-1] == "0:01/run (2 of 3 runs timed) |"
    # a run that a deadline (max_train_wall_s) ended before its schedule is marked next to its figures
    res["runs"]["id"]["0"]["trained"] = {"steps": 4750, "max_steps": 5000, "stopped_by": "max_train_wall_s"}
    rows = {r.split(" | ")[0].strip("| "): r.split(" | ") for r in quality.dataset_section(res).splitlines() if r.startswith("| ")}
    assert rows["id"][-1] == "0:01/run (1 ended by max_train_wall_s, at step 4750 of 5000) |"
    # runs of one model trained in another mixed precision are reported beside the others, and say so
    for bad in ("hybrid=fp8", "nosuch=bf16", "hybrid"):
        with pytest.raises(SystemExit, match="--precision-for"):
            quality.main(["--dataset", "ml-100k", "--precision-for", bad, "--src", "/nonexistent"])
    head = quality.dataset_section({**res, "precision_for": {"hybrid": "bf16"}}).splitlines()
    assert any(x.startswith("Machine:") and "precision no (hybrid: bf16)." in x for x in head)


def test_reused_run_must_match_its_settings(quality, tmp_path):
    """A finished run is reused only under the settings it was trained with (a changed --set under the
    same --tag would otherwise report an old model as a new one)."""
    run = tmp_path / "runs" / "hybrid_s1"
    (run / "final").mkdir(parents=True)
    (run / "final" / "export.json").write_text("{}")
    (run / "wall.json").write_text(json.dumps({"wall_s": 12.0}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  dropout: 0.2\n")
    # a record from before config contents were hashed: path, data, seed and overrides are checked
    want = {"config": str(cfg), "data": "p", "seed": 1, "overrides": ["max_steps=5"]}
    (run / "bench_args.json").write_text(json.dumps(want))
    env = {"ACCELERATE_MIXED_PRECISION": "no"}
    final, wall = quality.train_one(cfg, Path("p"), tmp_path / "runs", "hybrid_s1", 1, ["max_steps=5"], env)
    assert final == run / "final" and wall == 12.0
    (run / "wall.json").write_text(json.dumps({"wall_s": 12.0, "partial": True}))  # only its last launch was timed
    assert quality.read_wall(run) is None and quality.fmt_wall(None) == "untimed"
    with pytest.raises(SystemExit, match="max_steps=5"):
        quality.train_one(cfg, Path("p"), tmp_path / "runs", "hybrid_s1", 1, ["max_steps=9"], env)
    # a hashed record: the same path with other contents is another model
    import hashlib

    hashed = {**want, "config_sha256": hashlib.sha256(cfg.read_bytes()).hexdigest()}
    (run / "bench_args.json").write_text(json.dumps(hashed))
    assert quality.train_one(cfg, Path("p"), tmp_path / "runs", "hybrid_s1", 1, ["max_steps=5"], env)[0] == run / "final"
    # a record with the mixed precision: a bf16 run is not reported as an fp32 one
    (run / "bench_args.json").write_text(json.dumps({**hashed, "precision": "bf16"}))
    assert quality.train_one(cfg, Path("p"), tmp_path / "runs", "hybrid_s1", 1, ["max_steps=5"],
                             {"ACCELERATE_MIXED_PRECISION": "bf16"})[0] == run / "final"
    with pytest.raises(SystemExit, match="bf16"):
        quality.train_one(cfg, Path("p"), tmp_path / "runs", "hybrid_s1", 1, ["max_steps=5"], env)
    cfg.write_text("model:\n  dropout: 0.1\n")
    with pytest.raises(SystemExit, match="config_sha256"):
        quality.train_one(cfg, Path("p"), tmp_path / "runs", "hybrid_s1", 1, ["max_steps=5"], {"ACCELERATE_MIXED_PRECISION": "bf16"})


def test_same_split_compares_items_and_sequences(quality, tmp_path):
    """hybrid_ratings trains on its own prepared data: the bench refuses it unless the items and every
    user's sequence (so every validation / test target) are those of the main prepared data."""
    from data_prep.schema import load_prepared
    from fixtures_prepared import write_prepared

    a = load_prepared(write_prepared(tmp_path / "a", seed=3))
    b = load_prepared(write_prepared(tmp_path / "b", seed=3))
    c = load_prepared(write_prepared(tmp_path / "c", seed=4))
    assert quality.same_split(a, b)
    assert not quality.same_split(a, c)
    assert "hybrid_ratings" in quality.ALL_VARIANTS and quality.VARIANT_EXTRA["hybrid_ratings"] == ["model.use_event_types=true"]


def test_reused_run_is_checked_against_its_resolved_config(quality, tmp_path):
    """A run's final/train_config.yaml is compared with what the config + overrides resolve to now: an edited
    setting refuses the run even when its record predates the config hash; an edit that changes no setting
    (a comment) does not, nor do overrides that restate the run's settings."""
    from lmrec_common.config import dump_yaml, load_config
    from train.config import TrainConfig, plain_config

    run = tmp_path / "runs" / "hybrid_s0"
    (run / "final").mkdir(parents=True)
    (run / "final" / "export.json").write_text("{}")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  n_layers: 2\n")
    (run / "final" / "train_config.yaml").write_text(dump_yaml(plain_config(load_config(TrainConfig, cfg, ["max_steps=5"]))))
    (run / "bench_args.json").write_text(json.dumps({"config": str(cfg), "data": "p", "seed": 0, "overrides": ["max_steps=5"],
                                                         "precision": "no"}))
    env = {"ACCELERATE_MIXED_PRECISION": "no"}
    cfg.write_text("# a comment\nmodel:\n  n_layers: 2\n")
    assert quality.train_one(cfg, Path("p"), tmp_path / "runs", "hybrid_s0", 0, ["max_steps=5"], env)[0] == run / "final"
    cfg.write_text("model:\n  n_layers: 4\n")
    with pytest.raises(SystemExit, match=r"model.n_layers: 2 -> 4"):
        quality.train_one(cfg, Path("p"), tmp_path / "runs", "hybrid_s0", 0, ["max_steps=5"], env)
    # overrides that restate what the run was trained with make it reusable again (e.g. an older variant
    # reported beside a new default); the data, seed and precision are still checked
    again = ["max_steps=5", "model.n_layers=2"]
    assert quality.train_one(cfg, Path("p"), tmp_path / "runs", "hybrid_s0", 0, again, env)[0] == run / "final"
    with pytest.raises(SystemExit, match=r"max_steps: 5 -> 6"):
        quality.train_one(cfg, Path("p"), tmp_path / "runs", "hybrid_s0", 0, again + ["max_steps=6"], env)
    with pytest.raises(SystemExit, match="bf16"):
        quality.train_one(cfg, Path("p"), tmp_path / "runs", "hybrid_s0", 0, again, {"ACCELERATE_MIXED_PRECISION": "bf16"})
    with pytest.raises(SystemExit, match='"seed": 1'):
        quality.train_one(cfg, Path("p"), tmp_path / "runs", "hybrid_s0", 1, again, env)
    # a run trained before a key existed had its default: a config that now sets another value refuses it,
    # one that restates the default does not
    trained = (run / "final" / "train_config.yaml")
    trained.write_text(trained.read_text().replace("  exclude_seen_in_loss: false\n", ""))
    assert "exclude_seen_in_loss" not in trained.read_text()
    cfg.write_text("model:\n  n_layers: 2\n  exclude_seen_in_loss: true\n")
    with pytest.raises(SystemExit, match=r"model.exclude_seen_in_loss: False -> True"):
        quality.train_one(cfg, Path("p"), tmp_path / "runs", "hybrid_s0", 0, ["max_steps=5"], env)
    cfg.write_text("model:\n  n_layers: 2\n  exclude_seen_in_loss: false\n")
    assert quality.train_one(cfg, Path("p"), tmp_path / "runs", "hybrid_s0", 0, ["max_steps=5"], env)[0] == run / "final"


def test_paired_rows_compare_models_of_the_same_seed(quality):
    """Every two trained models of one seed are compared user by user (B - A, B the later model); a model
    without that seed, and the most-popular baseline (no runs), are left out; the table shows each pair."""
    r_id, r_hyb = torch.tensor([1, 20, 3, 100]), torch.tensor([1, 2, 3, 200])
    per_seed = {"most_popular": [{"test_ranks": r_id}],
                "id": [{"test_ranks": r_id}],
                "hybrid": [{"test_ranks": r_hyb}, {"test_ranks": r_hyb}]}
    runs = {"id": {0: {}}, "hybrid": {0: {}, 1: {}}}
    rows = quality.paired_rows(per_seed, runs)
    assert [(r["a"], r["b"], r["seed"]) for r in rows] == [("id", "hybrid", 0)]
    hr = rows[0]["HR@10"]
    assert hr["diff"] == pytest.approx(0.25) and (hr["users_b_better"], hr["users_a_better"]) == (1, 0)
    assert hr["ci95"][0] < 0.25 < hr["ci95"][1]
    res = {"dataset": "ml-100k", "command": "c", "precision": "no", "wall_s": 1.0, "n_candidates": 5, "n_test_users": 4,
           "overrides": [], "machine": {"cpu": "x", "cpu_cores": 2, "gpu": None, "torch": "t"}, "configs": {},
           "runs": runs, "summary": {}, "summary_valid": {}, "paired": rows}
    line = [x for x in quality.dataset_section(res).splitlines() if x.startswith("| hybrid | id |")]
    assert line and line[0].startswith("| hybrid | id | 0 | +0.2500 [")


def test_carry_from_keeps_rows_not_rerun_and_says_where_they_ran(quality, tmp_path):
    """--carry-from: models of an earlier results file that this command did not run are copied into the
    table, marked [carried] with the machine, precision and command they ran under; rerun models replace
    theirs; a file of other test data is refused; a row carried twice keeps its first origin."""
    agg = lambda v: {"HR@10": {"mean": v, "min": v, "max": v, "n_seeds": 1}}  # noqa: E731
    old = {"dataset": "ml-1m", "command": "python bench/quality.py --old", "precision": "no", "precision_for": {"hybrid": "bf16"},
           "machine": {"cpu": "Old CPU", "cpu_cores": 2, "gpu": None, "torch": "2.14"}, "n_candidates": 5, "n_test_users": 2,
           "summary": {"most_popular": agg(0.01), "id": agg(0.2), "hybrid": agg(0.3)},
           "summary_valid": {"id": agg(0.21), "hybrid": agg(0.31)},
           "runs": {"id": {"0": {"wall_s": 60.0}}, "hybrid": {"0": {"wall_s": 60.0}}},
           "configs": {"id": "id.yaml", "hybrid": "hybrid.yaml"},
           "cold": {"info": {"n_cold_items": 1, "rated_items": 5, "cold_fraction": 0.2, "cold_seed": 1}, "n_cold_users": 1,
                    "n_users": 2, "seeds": [0], "overrides": [], "summary": {"id": {"cold": agg(0.0), "warm": agg(0.2), "all": agg(0.2)}}},
           "paired": [{"a": "id", "b": "hybrid", "seed": "0"}]}
    new = {"dataset": "ml-1m", "command": "python bench/quality.py --new", "precision": "no", "wall_s": 1.0, "seeds": [0],
           "machine": {"cpu": "New CPU", "cpu_cores": 2, "gpu": None, "torch": "2.13"}, "n_candidates": 5, "n_test_users": 2,
           "overrides": [], "configs": {"hybrid": "hybrid.yaml exclude_seen"}, "runs": {"hybrid": {"0": {"wall_s": 120.0}}},
           "summary": {"most_popular": agg(0.01), "hybrid": agg(0.35)}, "summary_valid": {"most_popular": {}, "hybrid": agg(0.36)},
           "paired": []}
    quality.carry_rows(new, old, "docs/results/ml-1m.json", {"most_popular", "hybrid"})
    assert list(new["summary"]) == ["most_popular", "id", "hybrid"]  # the table's usual order
    assert new["summary"]["hybrid"]["HR@10"]["mean"] == 0.35 and new["summary"]["id"]["HR@10"]["mean"] == 0.2
    assert new["runs"]["id"] == {"0": {"wall_s": 60.0}} and new["runs"]["hybrid"] == {"0": {"wall_s": 120.0}}
    assert set(new["carried"]) == {"id", "cold"} and new["cold"] is old["cold"]
    assert new["carried"]["id"]["machine"]["cpu"] == "Old CPU" and new["carried"]["id"]["precision"] == "no"
    assert new["paired"] == []  # id vs the old hybrid: that hybrid is not in this table any more
    text = quality.dataset_section(new)
    main_table = text.split("### ")[0]  # the cold-start table below has rows of the same names
    rows = {r.split(" | ")[0].strip("| "): r.split(" | ") for r in main_table.splitlines() if r.startswith("| ")}
    assert rows["id"][1] == "id.yaml [carried]" and rows["hybrid"][1] == "hybrid.yaml exclude_seen"
    assert rows["id"][3] == "0.2000" and rows["hybrid"][3] == "0.3500"
    line = [x for x in text.splitlines() if x.startswith("- id, cold:")]
    assert line and "Old CPU" in line[0] and "`python bench/quality.py --old`" in line[0]
    assert "\nRows marked [carried] were not rerun by this command: they are copied with `--carry-from` from" in text
    assert "carried seeds" not in text  # none here
    assert any(x.startswith("### ml-1m: cold start") and x.endswith("[carried]") for x in text.splitlines())
    # carried again from the new file: the origin stays the first run's, not the file it was copied from
    newer = {**new, "summary": {"most_popular": agg(0.01)}, "summary_valid": {}, "runs": {}, "configs": {}, "paired": [],
             "carried": {}, "cold": None}
    quality.carry_rows(newer, new, "x.json", {"most_popular"})
    assert newer["carried"]["id"] == new["carried"]["id"] and newer["carried"]["hybrid"]["machine"]["cpu"] == "New CPU"
    for bad in ({"dataset": "ml-100k"}, {"n_test_users": 3}, {"n_candidates": 4}):
        with pytest.raises(SystemExit, match="--carry-from"):
            quality.carry_rows({**new, "carried": {}}, {**old, **bad}, "old.json", {"hybrid"})
    with pytest.raises(SystemExit, match="--carry-from /nonexistent.json: cannot read"):  # before any work
        quality.main(["--dataset", "ml-100k", "--carry-from", "/nonexistent.json", "--src", "/nonexistent"])
    # every run keeps its validation curve for later plots: read from the training loop's evals.jsonl
    (tmp_path / "evals.jsonl").write_text('{"step": 250, "NDCG@10": 0.1}\n{"step": 500, "NDCG@10": 0.15}\n')
    assert quality.read_valid_curve(tmp_path) == [[250, 0.1], [500, 0.15]]
    assert quality.read_valid_curve(tmp_path / "nosuch") == []


def test_carry_seeds_join_seeds_run_elsewhere_and_refuse_other_settings(quality, tmp_path):
    """--carry-seeds VARIANT=SEEDS:RESULTS_JSON: seeds of a model trained on another machine join this
    command's seeds in one row (the table says which and where); refused, before any work, when the seed
    is also trained here, when its resolved settings differ from this command's, or when the file lacks it."""
    yaml_path = ROOT / "configs" / "train" / "ml100k_hybrid.yaml"
    settings = quality.resolved_settings(yaml_path, [])
    assert "seed" not in settings and "data" not in settings and "model" in settings
    assert quality.setting_changes(settings, settings) == []
    assert any(c.startswith("optim.lr:") for c in quality.setting_changes(settings, quality.resolved_settings(yaml_path, ["optim.lr=0.5"])))
    with pytest.raises(SystemExit, match="dataset .ml-1m., this run is .ml-100k."):
        quality.check_same_data({"dataset": "ml-100k"}, {"dataset": "ml-1m"}, "x", keys=())
    far = {"cpu": "Far CPU", "cpu_cores": 16, "gpu": None, "torch": "2.14"}
    entry = {"metrics": {"test": {"HR@10": 0.3, "NDCG@10": 0.2, "n": 2}, "valid": {"NDCG@10": 0.25, "n": 2}}, "best_step": 100,
             "precision": "bf16", "machine": far, "settings": settings, "wall_s": 60.0, "valid_curve": [[50, 0.2], [100, 0.25]]}
    src = tmp_path / "far.json"
    src.write_text(json.dumps({"dataset": "ml-100k", "command": "python bench/quality.py --seeds 2", "n_candidates": 5,
                               "runs": {"hybrid": {"2": entry, "3": {"wall_s": 1.0}}}}))
    carried = quality.read_carry_seeds([f"hybrid=2:{src}"])
    assert [(s, e["best_step"]) for s, e, _, _ in carried["hybrid"]] == [(2, 100)]
    for spec, msg in ((f"hybrid=5:{src}", "has no hybrid run of seed 5"), ("hybrid=2", "expected VARIANT=SEEDS:RESULTS_JSON"),
                      (f"most_popular=2:{src}", "expected VARIANT"), ("hybrid=2:/nonexistent.json", "cannot read"),
                      (f"hybrid=3:{src}", "before the bench kept each run's metrics and settings")):
        with pytest.raises(SystemExit, match=msg):
            quality.read_carry_seeds([spec])
    base = ["--dataset", "ml-100k", "--variants", "most_popular,hybrid", "--src", str(tmp_path / "nosuch"), "--out", str(tmp_path / "out"),
            "--carry-seeds", f"hybrid=2:{src}"]
    for extra, msg in ((["--seeds", "2"], "seed 2 is trained by this command too"),
                       (["--seeds", "0", "--set", "optim.lr=0.5"], r"other settings .*optim\.lr: "),
                       (["--seeds", "0", "--variants", "most_popular,id"], "hybrid is not among --variants")):
        with pytest.raises(SystemExit, match=msg):
            quality.main(base + extra)
    assert not (tmp_path / "out").exists()  # refused before converting anything
    # joined: this command's seed 0 and the far seed 2 in one row, the far one named with its machine
    m0 = {"test": {"HR@10": 0.4, "NDCG@10": 0.3, "n": 2}, "valid": {"NDCG@10": 0.35, "n": 2}}
    res = {"dataset": "ml-100k", "command": "python bench/quality.py --seeds 0", "precision": "no", "wall_s": 1.0, "seeds": [0],
           "machine": {"cpu": "Near CPU", "cpu_cores": 2, "gpu": None, "torch": "2.13"}, "n_candidates": 5, "n_test_users": 2,
           "overrides": [], "configs": {"hybrid": "ml100k_hybrid.yaml"}, "runs": {"hybrid": {0: {"wall_s": 120.0}}},
           "per_seed": {"hybrid": [m0]}, "paired": []}
    quality.add_carried_seeds(res, "hybrid", carried["hybrid"])
    res["summary"] = {k: quality.aggregate(v, "test") for k, v in res["per_seed"].items()}
    res["summary_valid"] = {k: quality.aggregate(v, "valid") for k, v in res["per_seed"].items()}
    assert res["summary"]["hybrid"]["HR@10"] == {"mean": pytest.approx(0.35), "min": 0.3, "max": 0.4, "n_seeds": 2}
    text = quality.dataset_section(res)
    row = next(r.split(" | ") for r in text.splitlines() if r.startswith("| hybrid "))
    assert row[2] == "0,2 (2 carried)" and row[3] == "0.3500 (0.3000-0.4000)" and row[-1].startswith("1:30")  # wall: mean of both
    line = next(x for x in text.splitlines() if x.startswith("- hybrid seed 2:"))
    assert "Far CPU, 16 cores" in line and "precision bf16" in line and "`python bench/quality.py --seeds 2`" in line
    assert "\nCarried seeds were not rerun by this command: they are copied with `--carry-seeds` from" in text
    # a carried seed below this command's seed is listed in its place, not after the seeds trained here
    later = {**res, "runs": {"hybrid": {5: {"wall_s": 120.0, "valid_curve": [[50, 0.3]]}}}, "per_seed": {"hybrid": [m0]}}
    quality.add_carried_seeds(later, "hybrid", carried["hybrid"])
    row = next(r.split(" | ") for r in quality.dataset_section(later).splitlines() if r.startswith("| hybrid "))
    assert row[2] == "2,5 (2 carried)"
    # the validation plot draws the curves on record and names the runs it has none for (not the whole table)
    pytest.importorskip("matplotlib")
    later["runs"]["id"] = {"0": {"run_name": "id_s0", "run_dir": str(tmp_path / "gone")}}
    later["notes"] = []
    made = quality.plots(later, tmp_path, tmp_path / "ml-100k")
    assert made == ["ml-100k_valid_ndcg.png", "ml-100k_test_metrics.png"] and (tmp_path / made[0]).stat().st_size > 0
    assert len(later["notes"]) == 1 and later["notes"][0].endswith("(no curve on record, e.g. a carried run trained "
                                                                   "before the bench stored curves in the results file): id seed 0.")
    # carried again (the joined file as the source): the seed keeps its first origin
    again = {**res, "runs": {"hybrid": {}}, "per_seed": {}}
    quality.add_carried_seeds(again, "hybrid", [(2, json.loads(json.dumps(res["runs"]["hybrid"][2])), res, "joined.json")])
    assert again["runs"]["hybrid"][2]["carried"]["machine"]["cpu"] == "Far CPU"


def test_raw_layout_datasets_and_arguments(quality, tmp_path):
    """Raw-layout data (the Amazon sets, a user's own) is read where it lies; a folder without events/ and items/
    fails in one line naming what is missing; --dataset and --raw exclude each other; the Amazon sets and --raw
    train with the amazon_* configs, which exist for every default variant but lora."""
    raw = _raw(tmp_path)
    assert quality.raw_layout(raw) == raw
    (tmp_path / "half" / "events").mkdir(parents=True)
    with pytest.raises(SystemExit, match="missing items"):
        quality.raw_layout(tmp_path / "half")
    with pytest.raises(SystemExit, match="not a dataset in the raw input layout"):
        quality.raw_layout(tmp_path / "nowhere")
    for argv in ([], ["--dataset", "ml-1m", "--raw", str(raw)], ["--dataset", "ml-1m", "--name", "x"]):
        with pytest.raises(SystemExit):
            quality.parse_args(argv)
    a = quality.parse_args(["--raw", str(raw), "--name", "shop", "--max-len", "30"])
    assert a.raw == str(raw) and a.name == "shop" and a.max_len == 30
    for name in ("amazon2014-toy", "amazon2018-game"):
        src, prep, prefix = quality.DATASETS[name]
        assert prefix == "amazon" and (ROOT / prep).is_file()
    for variant in ("id", "text", "hybrid", "pool"):
        assert (ROOT / "configs" / "train" / f"amazon_{quality.TRAINED[variant]}.yaml").is_file()
