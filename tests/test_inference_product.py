"""The nightly table as a product (issue 28): every active user gets K rows (model or a marked fallback), A/B
variants by a salted hash of the user id.

    python -m pytest tests/test_inference_product.py -q

A raw log goes through the real data_prep (users with one event, users whose only events are on items missing from
the catalogue, users whose only events are on unavailable items), two tiny untrained hybrid models are exported on
its catalogue, and inference runs in-process (1 rank); the salted-hash assignment is checked for rank-count and
row-order independence directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fixtures_prepared import write_tiny_text_model
from inference.config import InferenceConfig, VariantConfig
from inference.run import assign_variants, fallback_order, fallback_topk, run, serving_users
from lmrec_common.config import ConfigError, load_config

DATE = "2026-11-27"
K = 5
T0 = 1_700_000_000
N_ITEMS = 40
UNAVAILABLE = {f"i{i}" for i in range(35, 40)}


def _raw_log() -> list[tuple[str, str, int, str]]:
    rng = np.random.default_rng(0)
    rows = []
    for u in range(24):  # regular users: 4..8 events on available items
        for k in range(int(rng.integers(4, 9))):
            rows.append((f"u{u:02d}", f"i{int(rng.integers(0, 35))}", T0 + 600 * k + u, "view" if k % 2 else "click"))
    for s, item in enumerate(["i3", "i7", "i7", "i20", "i34", "i36"]):  # one event (s5: on an unavailable item)
        rows.append((f"s{s}", item, T0 + 50 + s, "view"))
    for x in range(3):  # only items missing from the catalogue: no usable history
        rows += [(f"x{x}", "zz1", T0 + 70 + x, "view"), (f"x{x}", "zz2", T0 + 80 + x, "click")]
    for n in range(2):  # only unavailable items
        rows += [(f"n{n}", f"i{35 + j + n}", T0 + 90 + 10 * j, "view") for j in range(3)]
    rows += [("m0", "i12", T0 + 95, "view"), ("m0", "zz3", T0 + 99, "view")]  # one usable event + one unknown item
    return rows


@pytest.fixture(scope="module")
def product(tmp_path_factory):
    """prepared/<v> from a raw log through data_prep, and two hybrid models exported on its catalogue."""
    from data_prep.config import DataPrepConfig
    from data_prep.pipeline import run as prep_run
    from data_prep.schema import load_prepared
    from train.export import export_final
    from train.model import RecModelConfig, SeqRecModel

    root = tmp_path_factory.mktemp("product")
    rows = _raw_log()
    (root / "raw" / "events").mkdir(parents=True)
    (root / "raw" / "items").mkdir(parents=True)
    u, i, t, e = zip(*rows)
    pq.write_table(pa.table({"user_id": list(u), "item_id": list(i), "timestamp": pa.array(t, pa.int64()), "event_type": list(e)}),
                   root / "raw" / "events" / "part-0.parquet")
    ids = [f"i{k}" for k in range(N_ITEMS)]
    pq.write_table(pa.table({"item_id": ids, "title": [f"thing {k} {'red' if k % 2 else 'blue'}" for k in range(N_ITEMS)],
                             "available": [x not in UNAVAILABLE for x in ids]}), root / "raw" / "items" / "items.parquet")
    cfg = load_config(DataPrepConfig, None, [f"events_path={root / 'raw' / 'events'}", f"items_path={root / 'raw' / 'items'}",
                                             f"output_dir={root / 'prepared'}", "num_shards=2", "num_proc=1"])
    v = prep_run(cfg)
    prep = load_prepared(v)
    tiny = write_tiny_text_model(root / "tiny_bert")
    finals = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        mcfg = RecModelConfig(num_items=len(prep.items), num_event_types=len(prep.event_types), item_tower="hybrid",
                              text_model_path=str(tiny), d_model=16, n_layers=1, n_heads=1, max_len=8, dropout=0.0)
        export_final(root / f"final_{name}", SeqRecModel(mcfg, text_model_path=str(tiny)).state_dict(), mcfg, tiny, {"test": True},
                     prep.manifest, {}, item_ids=prep.items["item_id"])
        finals[name] = root / f"final_{name}"
    return {"root": root, "prepared": v, "finals": finals, "rows": rows}


def _cfg(product, out, **kw) -> InferenceConfig:
    base = dict(model_dir=str(product["finals"]["a"]), prepared_dir=str(product["prepared"]), output_dir=str(out), run_date=DATE,
                k=K, user_batch_size=7, num_threads=1)
    base.update(kw)
    return InferenceConfig(**base)


def _read(table_dir: Path):
    parts = sorted(table_dir.glob("part-*.parquet"))
    return pq.read_table(parts, partitioning=None).to_pandas(), json.loads((table_dir / "_manifest.json").read_text())


def _reference(final: Path, prepared_dir: Path, k: int, max_len: int = 8) -> dict:
    """Brute force over every served user with a history: all scores, seen = whole history, ranked by score."""
    from data_prep.schema import load_prepared
    from train.catalogue import Catalogue
    from train.export import load_final

    model, _ = load_final(final)
    prep = load_prepared(prepared_dir)
    cat = Catalogue.build(prep.items, model)
    V = cat.item_vectors(model).numpy()
    ids = prep.items["item_id"]
    avail = np.array(prep.items["available"])
    out = {}
    for row in serving_users(prep).to_pylist():
        if not row["item_idx"]:
            continue
        h, e = row["item_idx"][-max_len:], row["event_type"][-max_len:]
        hist = torch.full((1, max_len), -1, dtype=torch.long)
        et = torch.zeros((1, max_len), dtype=torch.long)
        hist[0, max_len - len(h):] = torch.tensor(h)
        et[0, max_len - len(e):] = torch.tensor(e)
        with torch.no_grad():
            s = V @ model.user_vectors(hist, et, catalogue=cat).numpy()[0]
        s[list(set(row["item_idx"]))] = -np.inf
        s[~avail] = -np.inf
        order = [i for i in np.argsort(-s, kind="stable") if np.isfinite(s[i])][:k]
        out[row["user_id"]] = ([ids[i] for i in order], s[order])
    return out


# ----------------------------------------------------------------------------- 1. every active user gets K rows


def test_every_user_with_an_event_gets_k_rows_model_or_fallback(product, tmp_path):
    from data_prep.schema import load_prepared

    df, man = _read(run(_cfg(product, tmp_path / "recs")))
    users = {r[0] for r in product["rows"]}
    seen: dict[str, set] = {}
    for u, i, _, _ in product["rows"]:
        seen.setdefault(u, set()).add(i)
    assert set(df["user_id"]) == users  # every user with an event, whatever its items
    for uid, g in df.groupby("user_id"):
        g = g.sort_values("rank")
        assert g["rank"].tolist() == list(range(1, K + 1)), uid  # exactly K rows
        assert g["item_id"].nunique() == K
        assert not set(g["item_id"]) & seen[uid], uid  # nothing seen
        assert not set(g["item_id"]) & UNAVAILABLE, uid  # nothing unavailable
        assert g["source"].nunique() == 1 and g["variant"].nunique() == 1 and g["model_version"].nunique() == 1
    source = df.groupby("user_id")["source"].first()
    fallback_users = {"x0", "x1", "x2"}  # no usable history: every event on an item missing from the catalogue
    assert set(source[source == "fallback"].index) == fallback_users
    assert set(source[source == "model"].index) == users - fallback_users
    # the fallback list: most training events first (ties by item index), unavailable items excluded
    prep = load_prepared(product["prepared"])
    n_train = np.array(prep.items["n_train_events"])
    ids = np.array(prep.items["item_id"])
    order = [i for i in np.lexsort((np.arange(len(ids)), -n_train)) if ids[i] not in UNAVAILABLE][:K]
    for uid in fallback_users:
        g = df[df["user_id"] == uid].sort_values("rank")
        assert g["item_id"].tolist() == ids[order].tolist()
        assert g["score"].tolist() == n_train[order].astype(np.float32).tolist()
    # model rows (single-event and unavailable-only users included) are the model's exact top-K of their history
    ref = _reference(product["finals"]["a"], product["prepared"], K)
    for uid in users - fallback_users:
        g = df[df["user_id"] == uid].sort_values("rank")
        assert g["item_id"].tolist() == ref[uid][0], uid
        np.testing.assert_allclose(g["score"].to_numpy(), ref[uid][1], rtol=1e-4, atol=1e-5)
    n = len(users)
    assert man["sources"] == {"model": {"users": n - 3, "rows": (n - 3) * K}, "fallback": {"users": 3, "rows": 3 * K}}
    assert man["counts"]["users_scored"] == n and man["counts"]["users_no_usable_history"] == 3
    assert man["data"]["users_served_only"] == 6 + 3 + 1 and man["data"]["users_in_sequences"] == n - 10
    from data_prep.schema import load_prepared  # how fresh the table's data is: the prepared data's newest usable event

    pm = load_prepared(product["prepared"]).manifest
    assert man["data"]["events_newest_utc"] == pm["counts"]["events_newest_utc"] is not None
    assert man["fallback"]["popularity"].startswith("training events")
    # beyond accuracy of the table, recomputed from its rows (popularity = training events, eligible = available)
    b = man["beyond_accuracy"]
    assert b == {**_beyond(df, prep), "k": K, "popularity": b["popularity"], "eligible": "available items"}
    assert b["items_eligible"] == N_ITEMS - len(UNAVAILABLE) and b["recommendations"] == n * K and 0 < b["coverage"] <= 1
    # the morning check (inference/check.py) passes this table: serving-only and fallback users, unavailable items
    from inference.check import check_table

    rep = check_table(_cfg(product, tmp_path / "recs"))
    assert rep["ok"], rep["problems"]
    assert rep["counts"]["users"] == n and rep["counts"]["rows_by_source"] == {"model": (n - 3) * K, "fallback": 3 * K}


def _beyond(df, prep) -> dict:
    from train.metrics import beyond_accuracy

    ids = list(prep.items["item_id"])
    exposure = np.bincount([ids.index(i) for i in df["item_id"]], minlength=len(ids))
    return beyond_accuracy(exposure, np.array(prep.items["n_train_events"]), np.array(prep.items["available"]))


def test_fallback_topk_hand_example():
    pop = np.array([5, 9, 9, 1, 0, 7], np.float64)
    excluded = np.array([False, False, False, True, False, False])
    order, pos = fallback_order(pop, excluded)
    assert order.tolist() == [1, 2, 5, 0, 4] and pos.tolist() == [3, 0, 1, -1, 4, 2]
    offs = np.array([0, 2, 2, 6])  # A saw items 2 and 3 (3 is excluded anyway), B nothing, C saw 1, 2, 5, 0
    vals = np.array([2, 3, 1, 2, 5, 0])
    idx, sc = fallback_topk(order, pos, pop, 3, offs, vals)
    assert idx.tolist() == [[1, 5, 0], [1, 2, 5], [4, -1, -1]]
    assert sc.tolist() == [[9, 7, 5], [9, 9, 7], [0, 0, 0]]


def test_fallback_days_counts_recent_events(product, tmp_path):
    """fallback_days=N: popularity = events of every prepared history in the N days ending with run_date."""
    from data_prep.schema import load_prepared
    from inference.run import fallback_popularity

    prep = load_prepared(product["prepared"])
    users = serving_users(prep)
    day = "2023-11-14"  # T0's day (UTC): every event of the log
    pop, what = fallback_popularity(prep, users, _cfg(product, tmp_path, fallback_days=1, run_date=day), day)
    ids = prep.items["item_id"]
    want = np.zeros(len(ids))
    for _, i, _, _ in product["rows"]:
        if i in ids:
            want[ids.index(i)] += 1
    assert pop.tolist() == want.tolist() and "fallback_days=1" in what
    pop, _ = fallback_popularity(prep, users, _cfg(product, tmp_path, fallback_days=1, run_date="2023-11-13"), "2023-11-13")
    assert pop.sum() == 0


def test_active_since_days_counts_unknown_item_events_as_activity(product, tmp_path):
    """The unknown-item-only users are active on the day of their (unusable) events like everyone else."""
    df, man = _read(run(_cfg(product, tmp_path / "recs", run_date="2023-11-14", active_since_days=1)))
    assert set(df["user_id"]) == {r[0] for r in product["rows"]} and man["counts"]["users_inactive"] == 0
    _, man = _read(run(_cfg(product, tmp_path / "later", run_date="2023-11-20", active_since_days=1)))
    assert man["counts"]["rows"] == 0 and man["counts"]["users_inactive"] == man["counts"]["users"]


# ----------------------------------------------------------------------------- 2. A/B variants


def _ab(product, out, run_date=DATE, shares=(0.5, 0.5), salt="exp-2026-12") -> InferenceConfig:
    variants = [VariantConfig(name="control", model_dir=str(product["finals"]["a"]), share=shares[0]),
                VariantConfig(name="treatment", model_dir=str(product["finals"]["b"]), share=shares[1])]
    return _cfg(product, out, model_dir="", variants=variants, bucket_salt=salt, run_date=run_date)


def test_ab_each_user_served_by_one_model_stable_across_nights(product, tmp_path):
    single = {name: _read(run(_cfg(product, tmp_path / f"only_{name}", model_dir=str(p))))[0]
              for name, p in product["finals"].items()}
    night1, man = _read(run(_ab(product, tmp_path / "recs")))
    night2, _ = _read(run(_ab(product, tmp_path / "recs", run_date="2026-11-28")))
    versions = {v["name"]: v["model"]["model_version"] for v in man["variants"]}
    assert len(set(versions.values())) == 2
    assign1 = night1.groupby("user_id")["variant"].agg(lambda s: sorted(set(s)))
    assign2 = night2.groupby("user_id")["variant"].agg(lambda s: sorted(set(s)))
    assert all(len(v) == 1 for v in assign1) and assign1.to_dict() == assign2.to_dict()  # one variant per user, both nights
    uids = list(assign1.index)
    want = assign_variants(pa.array(uids), "exp-2026-12", [0.5, 0.5])
    assert [["control", "treatment"][w] for w in want] == [v[0] for v in assign1]
    assert set(assign1.map(lambda v: v[0])) == {"control", "treatment"}
    # each user's rows come from exactly one model: the variant's, and equal that model's own table
    per_user = night1.groupby("user_id")["model_version"].nunique()
    assert (per_user == 1).all()
    assert (night1["model_version"] == night1["variant"].map(versions)).all()
    key = ["user_id", "rank"]
    cols = ["user_id", "rank", "item_id", "score", "source", "model_version"]
    for variant, name in (("control", "a"), ("treatment", "b")):
        got = night1[night1["variant"] == variant][cols].sort_values(key).reset_index(drop=True)
        ref = single[name][single[name]["user_id"].isin(got["user_id"])][cols].sort_values(key).reset_index(drop=True)
        assert got.drop(columns="score").equals(ref.drop(columns="score")), variant
        # the same users in other chunks and length buckets: equal up to float summation order
        np.testing.assert_allclose(got["score"], ref["score"], rtol=1e-5, atol=1e-6)
    # manifest: salt, shares, counts per variant summing to the totals
    assert man["bucketing"]["salt"] == "exp-2026-12" and man["bucketing"]["shares"] == {"control": 0.5, "treatment": 0.5}
    assert "sha256" in man["bucketing"]["hash"]
    for v in man["variants"]:
        assert v["counts"]["users_scored"] == int((assign1.map(lambda x: x[0]) == v["name"]).sum())
    for k in ("users_scored", "rows", "users_model", "users_fallback"):
        assert sum(v["counts"][k] for v in man["variants"]) == man["counts"][k]
    from data_prep.schema import load_prepared

    prep = load_prepared(product["prepared"])
    b = man["beyond_accuracy"]
    assert {k: b[k] for k in ("coverage", "gini", "tail_share", "popularity_percentile")} == \
        {k: _beyond(night1, prep)[k] for k in ("coverage", "gini", "tail_share", "popularity_percentile")}
    for name in ("control", "treatment"):
        assert b["by_variant"][name] == _beyond(night1[night1["variant"] == name], prep), name


def test_assignment_is_independent_of_rank_count_and_row_order():
    ids = [f"user-{i}" for i in range(3000)] + [str(i) for i in range(1000)]
    shares = [0.2, 0.3, 0.5]
    whole = assign_variants(pa.array(ids), "salt-1", shares)
    for world in (2, 3, 8):  # each rank assigns its contiguous slice of users alone
        parts = [assign_variants(pa.array(list(p)), "salt-1", shares) for p in np.array_split(np.array(ids, dtype=object), world)]
        assert np.concatenate(parts).tolist() == whole.tolist()
    perm = np.random.default_rng(0).permutation(len(ids))
    shuffled = assign_variants([ids[p] for p in perm], "salt-1", shares)
    assert shuffled.tolist() == whole[perm].tolist()
    assert assign_variants(ids, "salt-1", shares).tolist() == whole.tolist()  # a list or an Arrow array
    assert assign_variants(pa.array(ids), "salt-2", shares).tolist() != whole.tolist()  # the salt reshuffles
    assert assign_variants(pa.array(ids), "salt-1", [1.0]).tolist() == [0] * len(ids)


def test_assignment_shares_within_binomial_noise_and_ramp_up_keeps_users():
    n = 20_000
    ids = pa.array([f"{i:08d}" for i in range(n)])
    shares = [0.1, 0.3, 0.6]
    got = np.bincount(assign_variants(ids, "exp", shares), minlength=3)
    for c, p in zip(got, shares):
        assert abs(c - n * p) < 4 * np.sqrt(n * p * (1 - p)), (got, shares)
    # growing the first variant from 10% to 20% keeps every user it had
    small = assign_variants(ids, "exp", [0.1, 0.9]) == 0
    big = assign_variants(ids, "exp", [0.2, 0.8]) == 0
    assert big[small].all() and abs(big.sum() - 0.2 * n) < 4 * np.sqrt(n * 0.16)


def test_bad_bucket_config_is_one_clear_error_and_publishes_nothing(product, tmp_path):
    a, b = product["finals"]["a"], product["finals"]["b"]
    two = f"variants=[{{name: control, model_dir: {a}, share: 0.5}}, {{name: treatment, model_dir: {b}, share: 0.4}}]"
    with pytest.raises(ConfigError, match=r"variants: the shares must sum to 1, got 0.9 \(control 0.5 \+ treatment 0.4\)"):
        load_config(InferenceConfig, None, [two, "bucket_salt=s"])
    with pytest.raises(ConfigError, match=r"variants\[1\]\.share must be in \(0, 1\]"):
        load_config(InferenceConfig, None, [two.replace("0.4", "0"), "bucket_salt=s"])
    ok = two.replace("0.4", "0.5")
    with pytest.raises(ConfigError, match="bucket_salt is empty"):
        load_config(InferenceConfig, None, [ok])
    with pytest.raises(ConfigError, match="model_dir .* and variants are both set"):
        load_config(InferenceConfig, None, [ok, "bucket_salt=s", f"model_dir={a}"])
    with pytest.raises(ConfigError, match="name 'control' is used twice"):
        load_config(InferenceConfig, None, [ok.replace("treatment", "control"), "bucket_salt=s"])
    cfg = load_config(InferenceConfig, None, [ok, "bucket_salt=s"])
    assert [v.name for v in cfg.variants] == ["control", "treatment"]
    # an unknown model folder: named by its key, before anything is staged
    out = tmp_path / "recs"
    bad = _ab(product, out)
    bad.variants[1].model_dir = str(tmp_path / "no_such_final")
    with pytest.raises(ConfigError, match=r"variants\[1\]\.model_dir: .*no_such_final does not exist"):
        run(bad)
    bad.variants[1].model_dir = str(tmp_path)  # a folder, but not an export
    with pytest.raises(ConfigError, match=r"variants\[1\]\.model_dir: .* has no export.json"):
        run(bad)
    bad = _ab(product, out, shares=(0.7, 0.7))  # built in code, not loaded: run() checks it too
    with pytest.raises(ConfigError, match="shares must sum to 1"):
        run(bad)
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".lock")]
