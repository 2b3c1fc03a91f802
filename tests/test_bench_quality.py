"""bench/quality.py: the cold-start split, the ranking of the baseline, aggregation over seeds, records and the
tables made from them. Pure functions on tiny hand-made inputs (no MovieLens), and one slow test that runs the
bench on a tiny synthetic shop (--raw --quick: a few seconds of training per run); the whole bench is run by
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
    return _write_raw(tmp / "raw", rows, [f"t{i}" for i in range(n_items)])


def _write_raw(raw: Path, rows: list[tuple[int, int, int]], titles: list[str]) -> Path:
    """(user_id, item_id, unix seconds) rows and the items' titles (item_id = position) in the raw input layout."""
    (raw / "events").mkdir(parents=True)
    (raw / "items").mkdir()
    pq.write_table(pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                             "timestamp": pa.array([r[2] * 1000 for r in rows], pa.timestamp("ms", tz="UTC"))}),
                   raw / "events" / "part-00000.parquet")
    pq.write_table(pa.table({"item_id": list(range(len(titles))), "title": titles}), raw / "items" / "items.parquet")
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
    for gone in ("--seeds-for", "--tag-for", "--set-for", "--precision-for", "--carry-from", "--carry-seeds", "--results-to"):
        with pytest.raises(SystemExit):  # replaced by one command per setting + --records
            quality.parse_args(["--dataset", "ml-100k", gone, "x"])
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
    head = quality.dataset_section({**res, "precision_for": {"hybrid": "bf16"}}).splitlines()
    assert any(x.startswith("Machine:") and "precision no (hybrid: bf16)." in x for x in head)
    # the model to keep is named from the validation column, whatever the test columns say
    assert quality.validation_choice(res) is None  # no validation figures: no choice
    nd = lambda v: {"NDCG@10": {"mean": v, "min": v, "max": v, "n_seeds": 1}}  # noqa: E731
    res["summary_valid"] = {"most_popular": nd(0.01), "id": nd(0.09), "hybrid": nd(0.08)}
    assert quality.validation_choice(res) == ("id", 0.09, [("hybrid", 0.08), ("most_popular", 0.01)])
    line = [x for x in quality.dataset_section(res).splitlines() if x.startswith("Chosen on validation")]
    assert line == ["Chosen on validation NDCG@10 (mean over seeds): **id** (a.yaml), 0.0900; then hybrid 0.0800, "
                    "most_popular 0.0100."]


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
    r_id, r_hyb = np.array([1, 20, 3, 100]), np.array([1, 2, 3, 200])
    rec = lambda v, seed, ranks: quality.Record(f"{v}_s{seed}", {"variant": v, "seed": seed}, ranks)  # noqa: E731
    rows = quality.paired_rows([rec("hybrid", 0, r_hyb), rec("hybrid", 1, r_hyb), rec("id", 0, r_id)], {})
    assert [(r["a"], r["b"], r["seed"]) for r in rows] == [("id", "hybrid", 0)]  # the table's order, not the records'
    hr = rows[0]["HR@10"]
    assert hr["diff"] == pytest.approx(0.25) and (hr["users_b_better"], hr["users_a_better"]) == (1, 0)
    assert hr["ci95"][0] < 0.25 < hr["ci95"][1]
    res = {"dataset": "ml-100k", "command": "c", "precision": "no", "wall_s": 1.0, "n_candidates": 5, "n_test_users": 4,
           "overrides": [], "machine": {"cpu": "x", "cpu_cores": 2, "gpu": None, "torch": "t"}, "configs": {},
           "runs": {"id": {0: {}}, "hybrid": {0: {}, 1: {}}}, "summary": {}, "summary_valid": {}, "paired": rows}
    line = [x for x in quality.dataset_section(res).splitlines() if x.startswith("| hybrid | id |")]
    assert line and line[0].startswith("| hybrid | id | 0 | +0.2500 [")


def test_paired_rows_pool_the_seeds_two_models_share(quality):
    """Two models with ranks of several seeds get one more row after the per-seed ones: each user's B - A averaged
    over those seeds, labelled with the seeds; a model with a single seed gets none, and the table names the row
    pooled."""
    ra = {0: np.array([1, 20, 3, 100]), 1: np.array([1, 20, 30, 100])}
    rb = {0: np.array([1, 2, 3, 200]), 1: np.array([1, 2, 3, 200])}
    rec = lambda v, seed, ranks: quality.Record(f"{v}_s{seed}", {"variant": v, "seed": seed}, ranks)  # noqa: E731
    rows = quality.paired_rows([rec("hybrid", 0, rb[0]), rec("id", 1, ra[1]), rec("hybrid", 1, rb[1]), rec("id", 0, ra[0]),
                                rec("text", 0, rb[0])], {})
    assert [(r["a"], r["b"], r["seed"]) for r in rows] == [
        ("id", "text", 0), ("id", "hybrid", 0), ("text", "hybrid", 0), ("id", "hybrid", 1), ("id", "hybrid", "0,1")]
    pooled = rows[-1]
    # HR@10 per user: seed 0 differences (0, 1, 0, 0), seed 1 (0, 1, 1, 0): means (0, 1, 0.5, 0) -> 0.375
    assert pooled["seeds"] == [0, 1] and pooled["HR@10"]["diff"] == pytest.approx(0.375)
    assert pooled["HR@10"]["diff"] == pytest.approx((rows[1]["HR@10"]["diff"] + rows[3]["HR@10"]["diff"]) / 2)
    assert (pooled["HR@10"]["users_b_better"], pooled["HR@10"]["users_a_better"]) == (2, 0)
    res = {"dataset": "ml-100k", "command": "c", "precision": "no", "wall_s": 1.0, "n_candidates": 5, "n_test_users": 4,
           "overrides": [], "machine": {"cpu": "x", "cpu_cores": 2, "gpu": None, "torch": "t"}, "configs": {},
           "runs": {"id": {0: {}, 1: {}}, "hybrid": {0: {}, 1: {}}}, "summary": {}, "summary_valid": {}, "paired": rows}
    line = [x for x in quality.dataset_section(res).splitlines() if x.startswith("| hybrid | id | 0,1 pooled |")]
    assert line and line[0].startswith("| hybrid | id | 0,1 pooled | +0.3750 [")


def _rec(quality, path, variant, seed, settings, precision="no", hr=0.3, ranks=None, **data):
    return quality.Record(str(path), {"kind": quality.RECORD_KIND, "dataset": "ml-100k", "data": {"n_candidates": 5, "n_test_users": 4},
                                      "variant": variant, "seed": seed, "settings": settings, "precision": precision,
                                      "metrics": {"test": {"HR@10": hr, "NDCG@10": hr / 2, "n": 4}, "valid": {"NDCG@10": hr, "n": 4}},
                                      **data}, ranks)


def test_a_results_json_holds_records_and_carried_rows(quality, tmp_path):
    """A results JSON read with --records gives its runs' records (seeds that join this command's in one row,
    each keeping where it ran first) and, for models whose runs have no per-seed metrics (tables from before
    records), their whole rows and cold-start table, marked [carried]; its paired rows stand in for the ranks
    its records lack. A file of other data or another dataset is refused, before any work."""
    agg = lambda v: {k: {"mean": v, "min": v, "max": v, "n_seeds": 1} for k in ("HR@10", "NDCG@10")}  # noqa: E731
    settings = quality.resolved_settings(ROOT / "configs" / "train" / "ml100k_hybrid.yaml", [])
    far = {"cpu": "Far CPU", "cpu_cores": 16, "gpu": None, "torch": "2.14"}
    entry = lambda hr, **kw: {"metrics": {"test": {"HR@10": hr, "NDCG@10": hr / 2, "n": 4}, "valid": {"NDCG@10": hr, "n": 4}},  # noqa: E731
                              "best_step": 100, "precision": "bf16", "machine": far, "settings": settings, "wall_s": 60.0,
                              "valid_curve": [[50, 0.2], [100, 0.25]], **kw}
    first = {"source": "elder.json", "command": "python bench/quality.py --elder", "machine": {"cpu": "Elder CPU"}, "precision": "bf16"}
    old = {"dataset": "ml-100k", "command": "python bench/quality.py --old", "precision": "no", "precision_for": {},
           "machine": {"cpu": "Old CPU", "cpu_cores": 2, "gpu": None, "torch": "2.14"}, "n_candidates": 5, "n_test_users": 4,
           "summary": {"most_popular": agg(0.01), "id": agg(0.2), "hybrid": agg(0.3)}, "summary_valid": {"id": agg(0.21)},
           "runs": {"id": {"0": {"wall_s": 60.0}}, "hybrid": {"0": entry(0.3), "2": entry(0.5, carried=first)}},
           "configs": {"id": "configs/train/ml100k_sasrec.yaml", "hybrid": "configs/train/ml100k_hybrid.yaml"},
           "cold": {"info": {"n_cold_items": 1, "rated_items": 5, "cold_fraction": 0.2, "cold_seed": 1}, "n_cold_users": 1,
                    "n_users": 2, "seeds": [0], "overrides": [], "summary": {"id": {"cold": agg(0.0), "warm": agg(0.2), "all": agg(0.2)}}},
           "paired": [{"a": "id", "b": "hybrid", "seed": "0", "HR@10": {"diff": 0.1, "ci95": [0.0, 0.2], "users_b_better": 1, "users_a_better": 0},
                       "NDCG@10": {"diff": 0.05, "ci95": [0.0, 0.1], "users_b_better": 1, "users_a_better": 0}},
                      {"a": "id", "b": "hybrid", "seed": "1"}]}
    src = tmp_path / "old.json"
    src.write_text(json.dumps(old))
    recs, rows = quality.read_records(str(src))
    assert [(r.key, r.source, r.ranks) for r in recs] == [(("hybrid", 0), str(src), None), (("hybrid", 2), str(src), None)]
    assert recs[0].origin["machine"]["cpu"] == "Far CPU" and recs[1].origin == first  # a carried seed keeps its first origin
    assert recs[0].data["command"] == "python bench/quality.py --old" and recs[0].data["config"] == "configs/train/ml100k_hybrid.yaml"
    assert set(rows) == {"most_popular", "id", "cold"} and rows["id"]["origin"]["machine"]["cpu"] == "Old CPU"
    # this command: seed 1 of the hybrid (with ranks) and the baseline; the table joins the file's seeds 0 and 2
    own = _rec(quality, tmp_path / "runs" / "hybrid_s1" / "record.json", "hybrid", 1, settings, "bf16", 0.4, np.array([1, 2, 3, 4]),
               config="configs/train/ml100k_hybrid.yaml", overrides=["max_steps=9"], wall_s=120.0, run_dir=str(tmp_path / "far"))
    res = {"dataset": "ml-100k", "command": "python bench/quality.py --new", "precision": "bf16", "wall_s": 1.0, "seeds": [1],
           "machine": {"cpu": "New CPU", "cpu_cores": 2, "gpu": None, "torch": "2.13"}, "n_candidates": 5, "n_test_users": 4,
           "overrides": ["max_steps=9"], "configs": {"most_popular": "train/baselines.py"}, "runs": {}, "carried": {}, "precision_for": {},
           "per_seed": {"most_popular": [{"test": {"HR@10": 0.02, "NDCG@10": 0.01, "n": 4}, "valid": {}}]}}
    quality.table(res, [own] + recs, rows)
    assert list(res["summary"]) == ["most_popular", "id", "hybrid"]  # the table's usual order
    assert res["summary"]["most_popular"]["HR@10"]["mean"] == 0.02  # measured here: the file's row left out
    assert res["summary"]["hybrid"]["HR@10"] == {"mean": pytest.approx(0.4), "min": 0.3, "max": 0.5, "n_seeds": 3}
    assert set(res["carried"]) == {"id", "cold"} and res["cold"] == old["cold"]
    assert [p["seed"] for p in res["paired"]] == ["0"]  # the file's pair of seed 0; its seed-1 hybrid is not this table's
    text = quality.dataset_section(res)
    main_table = text.split("Paired per-user")[0]  # the paired and cold-start tables below have rows of the same names
    row = {r.split(" | ")[0].strip("| "): r.split(" | ") for r in main_table.splitlines() if r.startswith("| ")}
    assert row["hybrid"][1] == "configs/train/ml100k_hybrid.yaml" and row["hybrid"][2] == "0,1,2 (0,2 carried)"
    assert row["hybrid"][3] == "0.4000 (0.3000-0.5000)" and row["hybrid"][-1].startswith("1:20/run")  # wall: mean of the three
    assert row["id"][1] == "configs/train/ml100k_sasrec.yaml [carried]" and row["id"][3] == "0.2000"
    assert "\nRows marked [carried] and carried seeds were not run by this command: they come from another run" in text
    lines = [x for x in text.splitlines() if x.startswith("- ")]
    assert any(x.startswith("- id, cold: Old CPU") and "`python bench/quality.py --old`" in x for x in lines)
    assert any(x.startswith("- hybrid seed 0: Far CPU, 16 cores") and "precision bf16" in x for x in lines)
    assert any(x.startswith("- hybrid seed 2: Elder CPU") and "`python bench/quality.py --elder`" in x for x in lines)
    assert any(x.startswith("### ml-100k: cold start") and x.endswith("[carried]") for x in text.splitlines())
    # the results JSON of this table holds records again: read back, each seed keeps where it ran first
    again, _ = quality.records_of_results(json.loads(json.dumps(res)), "new.json")
    assert [(r.key, r.origin["machine"]["cpu"] if r.origin else None) for r in again] == \
        [(("hybrid", 0), "Far CPU"), (("hybrid", 1), "New CPU"), (("hybrid", 2), "Elder CPU")]
    # other data is refused in one line, and another dataset before anything runs
    with pytest.raises(SystemExit, match="n_test_users 4 differs from this run's 5 .other prepared data."):
        quality.check_same_data({"dataset": "ml-100k", "n_test_users": 5}, recs[0].fingerprint(), "x")
    with pytest.raises(SystemExit, match="sha256 b differs"):
        quality.check_same_data({"dataset": "ml-100k", "sha256": "a"}, {"dataset": "ml-100k", "sha256": "b"}, "x")
    src.write_text(json.dumps({**old, "dataset": "ml-1m"}))
    with pytest.raises(SystemExit, match=f"--records {src} .hybrid seed 0.: dataset 'ml-1m', this run is 'ml-100k'"):
        quality.main(["--dataset", "ml-100k", "--records", str(src), "--src", str(tmp_path / "nosuch"), "--out", str(tmp_path / "out")])
    for bad, msg in (("/nonexistent.json", "cannot read"), (str(tmp_path), "no record.json in it")):
        with pytest.raises(SystemExit, match=msg):
            quality.read_records(bad)
    assert not (tmp_path / "out").exists()
    # every run keeps its validation curve for later plots: read from the training loop's evals.jsonl
    (tmp_path / "evals.jsonl").write_text('{"step": 250, "NDCG@10": 0.1}\n{"step": 500, "NDCG@10": 0.15}\n')
    assert quality.read_valid_curve(tmp_path) == [[250, 0.1], [500, 0.15]]
    assert quality.read_valid_curve(tmp_path / "nosuch") == []
    # the validation plot draws the curves on record and names the runs it has none for (not the whole table)
    pytest.importorskip("matplotlib")
    res["runs"]["id"] = {"0": {"run_name": "id_s0", "run_dir": str(tmp_path / "gone")}}
    res["notes"] = []
    made = quality.plots(res, tmp_path, tmp_path / "ml-100k")
    assert made == ["ml-100k_valid_ndcg.png", "ml-100k_test_metrics.png"] and (tmp_path / made[0]).stat().st_size > 0
    assert len(res["notes"]) == 1 and res["notes"][0].endswith("(no curve on record, e.g. a carried run trained "
                                                               "before the bench stored curves in the results file): hybrid seed 1, id seed 0.")


def test_records_of_one_table_are_checked_before_training(quality, tmp_path):
    """A (variant, seed) named twice with other settings or results is refused naming both paths (the same run
    reached twice is taken once); so is one that this command trains too, and a row whose records differ in
    settings or precision from each other or from what this command gives that model. The config column names
    the settings of a row beyond the command's --set."""
    yaml_path = ROOT / "configs" / "train" / "ml100k_hybrid.yaml"
    settings = quality.resolved_settings(yaml_path, [])
    assert "seed" not in settings and "data" not in settings and "model" in settings
    assert quality.setting_changes(settings, settings) == []
    lr = quality.resolved_settings(yaml_path, ["optim.lr=0.5"])
    assert any(c.startswith("optim.lr:") for c in quality.setting_changes(settings, lr))
    a = _rec(quality, tmp_path / "a" / "hybrid_s2" / "record.json", "hybrid", 2, settings)
    twin = _rec(quality, tmp_path / "r.json (hybrid seed 2)", "hybrid", 2, settings)  # its record in a results JSON
    twin.source = str(tmp_path / "r.json")
    assert quality.check_records([a, twin], {}) == [a]
    for other, msg in ((_rec(quality, tmp_path / "b.json", "hybrid", 2, lr), r"optim\.lr: "),
                       (_rec(quality, tmp_path / "b.json", "hybrid", 2, settings, "bf16"), "precision: 'no' -> 'bf16'"),
                       (_rec(quality, tmp_path / "b.json", "hybrid", 2, settings, hr=0.9), "same settings, other results")):
        with pytest.raises(SystemExit, match=f"hybrid seed 2 twice, {a.path} and {other.path} .*{msg}"):
            quality.check_records([a, other], {})
    # a committed table's record of it gives way to a record named by its run (refreshing a row with new runs),
    # whichever comes first; two tables disagreeing are still refused, and so is a row left half refreshed
    stale = _rec(quality, tmp_path / "t.json (hybrid seed 2)", "hybrid", 2, lr)
    stale.source = str(tmp_path / "t.json")
    assert quality.check_records([stale, a], {}) == [a] and quality.check_records([a, stale], {}) == [a]
    with pytest.raises(SystemExit, match=r"hybrid seed 2 twice, .*t\.json .*r\.json .*optim\.lr: "):
        quality.check_records([stale, twin], {})
    stale3 = _rec(quality, tmp_path / "t.json (hybrid seed 3)", "hybrid", 3, lr)
    stale3.source = str(tmp_path / "t.json")
    with pytest.raises(SystemExit, match="one row is one model"):
        quality.check_records([stale, stale3, a], {})
    # this command's own run folder is its own record; another folder of the same (variant, seed) is refused
    assert quality.check_records([a], {("hybrid", 2): (tmp_path / "a" / "hybrid_s2", settings, "no")}) == []
    with pytest.raises(SystemExit, match=f"hybrid seed 2: trained by this command in {tmp_path / 'c' / 'hybrid_s2'} and named by --records {a.path}"):
        quality.check_records([a], {("hybrid", 2): (tmp_path / "c" / "hybrid_s2", settings, "no")})
    # a results JSON's record of a (variant, seed) trained here gives way (refreshing a committed table's rows)
    assert quality.check_records([twin], {("hybrid", 2): (tmp_path / "c" / "hybrid_s2", settings, "no")}) == []
    # one row is one model: its records share the settings this command gives it, and each other's
    planned = {("hybrid", 0): (tmp_path / "c" / "hybrid_s0", lr, "no")}
    with pytest.raises(SystemExit, match=rf"--records {a.path}: hybrid was trained with other settings than .*hybrid_s0 .this command. .optim\.lr: 0\.5 -> "):
        quality.check_records([a], planned)
    with pytest.raises(SystemExit, match=r"hybrid was trained with other settings than .*a/hybrid_s2/record.json .precision: 'no' -> 'bf16'"):
        quality.check_records([a, _rec(quality, tmp_path / "b.json", "hybrid", 3, settings, "bf16")], {})
    assert quality.check_records([a, _rec(quality, tmp_path / "b.json", "id", 2, lr)], {("hybrid", 0): (tmp_path, settings, "no")})
    # the config column: the config and the overrides beyond --set, those of --set it lacks, another precision
    rec = {"config": "configs/train/x.yaml", "overrides": ["model.use_event_types=true", "max_steps=9"], "precision": "bf16"}
    assert quality.config_label(rec, ["max_steps=9"], "bf16") == "configs/train/x.yaml model.use_event_types=true"
    assert quality.config_label(rec, ["max_steps=9", "model.dropout=0.1"], "no") == \
        "configs/train/x.yaml model.use_event_types=true (without model.dropout=0.1) (precision bf16)"
    assert quality.config_label({"config": "old label (precision bf16)", "precision": "bf16"}, [], "no") == "old label (precision bf16)"
    # a row whose config file has changed since its run says so (a carried row is not the file's recipe now)
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("model:\n  d_model: 64\n  dropout: 0.1\n")
    rec = {"config": str(cfg), "overrides": ["max_steps=9"], "precision": "no",
           "settings": quality.resolved_settings(cfg, ["max_steps=9"])}
    assert quality.config_label(rec, [], "no") == f"{cfg} max_steps=9"
    cfg.write_text("model:\n  d_model: 128\n  dropout: 0.2\n")
    assert quality.config_label(rec, [], "no") == f"{cfg} max_steps=9 (the file has changed since this row was trained: " \
        "model.d_model: 64 -> 128; model.dropout: 0.1 -> 0.2)"
    cfg.write_text("model:\n  d_model: wide\n")
    assert "it no longer loads with the run's overrides (model.d_model" in quality.config_label(rec, [], "no")
    cfg.unlink()  # a config that is gone: nothing to compare with, the label as recorded
    assert quality.config_label(rec, [], "no") == f"{cfg} max_steps=9"
    # the flags of a report: --report-only makes a table from --records and trains nothing
    one = tmp_path / "one" / "record.json"
    one.parent.mkdir()
    one.write_text(json.dumps(a.data))
    assert [r.key for r in quality.read_records(str(one.parent))[0]] == [("hybrid", 2)]  # a run folder: its record
    # a report of records alone reads no data: the records must agree with each other on theirs
    for name, sha in (("x", "a" * 64), ("y", "b" * 64)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "record.json").write_text(json.dumps({**a.data, "seed": ord(name), "data": {**a.data["data"], "sha256": sha}}))
    with pytest.raises(SystemExit, match=f"--records {tmp_path / 'y' / 'record.json'}: sha256 b+ differs from this run's a+ .other prepared data."):
        quality.main(["--dataset", "ml-100k", "--report-only", "--records", str(one), "--records", str(tmp_path / "x"),
                      "--records", str(tmp_path / "y"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        quality.parse_args(["--dataset", "ml-100k", "--report-only"])
    with pytest.raises(SystemExit, match="--report-only trains nothing: --variants may name most_popular only, not id"):
        quality.main(["--dataset", "ml-100k", "--report-only", "--variants", "most_popular,id", "--records", str(one)])


def _dated_raw(tmp: Path, n_users=40, n_items=30, per_user=8) -> Path:
    """A tiny shop in the raw layout with timestamps data_prep accepts (2020 on)."""
    rng = np.random.default_rng(0)
    rows = [(u, int(i), 1_600_000_000 + 86_400 * j) for u in range(n_users)
            for j, i in enumerate(rng.choice(n_items, size=per_user, replace=False))]
    return _write_raw(tmp / "shop", rows, [f"toy {i}" for i in range(n_items)])


@pytest.mark.slow
def test_a_record_per_run_and_tables_made_from_records(quality, tmp_path, capsys):
    """The whole path on a tiny shop (--raw, --quick: a few seconds of training per run): every run writes its
    record (and its ranks); a second command with other settings reports the first one's runs beside its own
    (paired differences from both records' ranks, the other settings named in the row); a duplicate (variant,
    seed) and a record of other data are refused before training; a report-only run rebuilds the same table
    from the records alone, without reading the data, and so does one from the results JSON."""
    raw, out = _dated_raw(tmp_path), tmp_path / "work"
    base = ["--raw", str(raw), "--name", "shop", "--quick", "--out", str(out)]
    first = quality.main(base + ["--variants", "most_popular,id", "--seeds", "0", "--tag", "a"])
    run = out / "runs-a" / "id_s0"
    rec = json.loads((run / "record.json").read_text())
    ranks = np.load(run / "record.npz")["test_ranks"]
    assert rec["kind"] == quality.RECORD_KIND and (rec["dataset"], rec["variant"], rec["seed"], rec["tag"]) == ("shop", "id", 0, "a")
    assert rec["data"]["n_test_users"] == first["n_test_users"] == len(ranks) == rec["metrics"]["test"]["n"] == 40
    assert len(rec["data"]["sha256"]) == 64 and rec["config"] == "configs/train/amazon_sasrec.yaml" and "max_steps=12" in rec["overrides"]
    assert rec["precision"] == "no" and rec["settings"]["max_steps"] == 12 and rec["best_step"] in (6, 12)
    assert rec["wall_s"] > 0 and rec["peak_rss_mib"] > 50 and rec["command"].endswith("--tag a") and rec["date"] and rec["commit"]
    assert rec["valid_curve"] and rec["machine"]["cpu_cores"] and rec["export_sha256"] == quality.sha256_file(run / "final" / "export.json")
    assert first["runs"]["id"][0]["metrics"] == rec["metrics"]
    # the same command again: the run is reused and its record still describes it (not evaluated again)
    capsys.readouterr()
    quality.main(base + ["--variants", "id", "--seeds", "0", "--tag", "a"])
    assert "id_s0: its record describes this final/, not evaluated again" in capsys.readouterr().out
    # a second command, other settings, reports the first one's run beside its own
    second = quality.main(base + ["--variants", "most_popular,text", "--seeds", "0", "--tag", "b", "--set", "model.dropout=0.3",
                                  "--records", str(out / "runs-a")])
    text = quality.dataset_section(second)
    row = {r.split(" | ")[0].strip("| "): r.split(" | ") for r in text.split("Paired per-user")[0].splitlines() if r.startswith("| ")}
    assert row["id"][1] == "configs/train/amazon_sasrec.yaml (without model.dropout=0.3)" and row["id"][2] == "0 (0 carried)"
    assert row["text"][1] == "configs/train/amazon_text.yaml" and row["text"][2] == "0"
    assert second["summary"]["id"]["HR@10"]["mean"] == rec["metrics"]["test"]["HR@10"]
    assert any(x.startswith("- id seed 0:") and rec["command"] in x for x in text.splitlines())
    from paired import compare

    text_ranks = np.load(out / "runs-b" / "text_s0" / "record.npz")["test_ranks"]
    want = compare(torch.as_tensor(ranks), torch.as_tensor(text_ranks))
    [pair] = second["paired"]
    assert (pair["a"], pair["b"], pair["seed"]) == ("id", "text", 0) and pair["NDCG@10"]["diff"] == want["NDCG@10"]["diff"]
    # refused before any training: the same (variant, seed) trained here and named, twice with other settings,
    # and a record of other data
    with pytest.raises(SystemExit, match=f"id seed 0: trained by this command in {out / 'runs-c' / 'id_s0'} and named by --records"):
        quality.main(base + ["--variants", "id", "--seeds", "0", "--tag", "c", "--records", str(out / "runs-a")])
    other = {**rec, "settings": {**rec["settings"], "max_steps": 99}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match=f"id seed 0 twice, {run / 'record.json'} and {tmp_path / 'other.json'} .max_steps: 12 -> 99."):
        quality.main(base + ["--report-only", "--records", str(out / "runs-a"), "--records", str(tmp_path / "other.json")])
    (tmp_path / "moved.json").write_text(json.dumps({**rec, "seed": 7, "data": {**rec["data"], "sha256": "0" * 64}}))
    with pytest.raises(SystemExit, match=f"--records {tmp_path / 'moved.json'}: sha256 0+ differs from this run's {rec['data']['sha256']}"):
        quality.main(base + ["--variants", "id", "--seeds", "1", "--tag", "d", "--records", str(tmp_path / "moved.json")])
    assert not (out / "runs-c").exists() and not (out / "runs-d").exists()
    # report only: the same table from the records alone (no data read), and from the results JSON that holds them
    for records, where in (([str(out / "runs-a"), str(out / "runs-b" / "text_s0")], tmp_path / "report"),
                           ([str(out / "results.json")], tmp_path / "report2")):
        rep = quality.main(["--raw", str(tmp_path / "nosuch"), "--name", "shop", "--report-only", "--set", "model.dropout=0.3",
                            "--out", str(where), *sum((["--records", r] for r in records), [])])
        assert not (where / "prepared").exists()
        assert {k: v for k, v in rep["summary"].items() if k != "most_popular"} == \
            {k: v for k, v in second["summary"].items() if k != "most_popular"}
        assert rep["seeds"] == [] and second["seeds"] == [0]  # a report trained nothing; its rows list their seeds
        assert rep["paired"][0]["NDCG@10"] == second["paired"][0]["NDCG@10"] and rep["n_test_users"] == 40


def test_raw_layout_datasets_and_arguments(quality, tmp_path):
    """Raw-layout data (the Amazon sets, a user's own) is read where it lies; a folder without events/ and items/
    fails in one line naming what is missing; --dataset and --raw exclude each other; the Amazon sets and --raw
    train with the amazon_* configs, which exist for every trained variant (lora: on a GPU)."""
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
    for variant in ("id", "text", "hybrid", "pool", "lora"):
        assert (ROOT / "configs" / "train" / f"amazon_{quality.TRAINED[variant]}.yaml").is_file()


@pytest.mark.slow
def test_prep_set_measures_another_item_text_in_folders_of_its_own(quality, tmp_path):
    """--prep-set (a template to measure on one's data) prepares into its own folder and trains into its own run
    folder, on the same users and targets (the records pair); its text runs record the item text they read, so
    a table refuses to report runs of two item texts as one model; the ids-only model reads no text and does not
    record one. Prepared data made under other settings is refused, not reused."""
    raw, out = _dated_raw(tmp_path), tmp_path / "work"
    base = ["--raw", str(raw), "--name", "shop", "--quick", "--out", str(out), "--seeds", "0", "--tag", "a"]
    shipped = quality.main(base + ["--variants", "text"])
    title = quality.main(base + ["--variants", "id,text", "--prep-set", "item_text_template=item {title}"])
    [prepared] = [p for p in out.iterdir() if p.name.startswith("prepared-p")]
    [runs] = [p for p in out.iterdir() if p.name.startswith("runs-a-p")]
    assert prepared.name[len("prepared"):] == runs.name[len("runs-a"):] and (out / "prepared" / "v1").is_dir()
    assert title["prepared"] == str(prepared / "v1") and title["prep_set"] == ["item_text_template=item {title}"]
    assert (out / f"results{prepared.name[len('prepared'):]}.json").is_file() and (out / "results.json").is_file()
    rec = {p.parent.name: json.loads(p.read_text()) for p in (runs / "text_s0" / "record.json", runs / "id_s0" / "record.json")}
    assert rec["text_s0"]["settings"]["item_text"]["item_text_template"] == "item {title}"
    assert "item_text" not in rec["id_s0"]["settings"]
    old = json.loads((out / "runs-a" / "text_s0" / "record.json").read_text())
    assert old["settings"]["item_text"]["item_text_template"] == shipped["item_text"]["item_text_template"] != "item {title}"
    assert old["data"]["sha256"] == rec["text_s0"]["data"]["sha256"]  # same users and targets: the two pair
    assert "template `item {title}`" in quality.dataset_section(title)
    with pytest.raises(SystemExit, match=r"text seed 0 twice, .* \(item_text.item_text_template: .* -> .item {title}.\)"):
        quality.main(["--raw", str(raw), "--name", "shop", "--report-only", "--out", str(tmp_path / "rep"),
                      "--records", str(out / "runs-a" / "text_s0"), "--records", str(runs / "text_s0")])
    with pytest.raises(SystemExit, match=r"prepared under other data_prep settings .*max_text_tokens: 64 -> 8"):
        quality.prepare("configs/data_prep/amazon.yaml", raw / "events", raw / "items", out / "prepared", ("max_text_tokens=8",))
    with pytest.raises(SystemExit, match="nokey"):
        quality.main(base + ["--variants", "text", "--prep-set", "nokey=1"])
