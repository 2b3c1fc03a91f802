"""data_prep: bad input (one test per case), accounting identity, splits, tokenize-once, shards,
incremental reuse, determinism. Fixtures are tiny Parquet files written here with pyarrow."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import items as items_mod
from data_prep.config import DataPrepConfig
from data_prep.items import TextTemplate
from data_prep.pipeline import run
from data_prep.schema import (
    SEQUENCE_COLUMNS,
    DataPrepError,
    PreparedDataError,
    encode_histories,
    load_prepared,
    resolve_prepared,
)
from data_prep.sequences import split_leave_last_out, split_time
from lmrec_common.config import ConfigError, load_config

T0 = 1_700_000_000  # 2023-11-14, epoch seconds


def events_table(rows):
    """rows: (user, item, ts, event_type) tuples -> a raw events table (ints, epoch seconds)."""
    u, i, t, e = zip(*rows)
    return pa.table({"user_id": pa.array(u, pa.int64()), "item_id": pa.array(i, pa.int64()), "timestamp": pa.array(t, pa.int64()), "event_type": pa.array(e, pa.string())})


def catalogue(ids=range(1, 11), titles=None):
    ids = list(ids)
    titles = titles if titles is not None else [f"Item {k}" for k in ids]
    return pa.table({"item_id": pa.array(ids, pa.int64()), "title": pa.array(titles, pa.string()), "genres": pa.array(["Drama"] * len(ids))})


BASE = [(u, 1 + (u * 3 + k) % 10, T0 + 100 * k + u, "view") for u in range(1, 5) for k in range(4)]  # 4 users x 4 events


def setup(tmp_path: Path, files: dict[str, pa.Table] | None = None, items: pa.Table | None = None, **over) -> DataPrepConfig:
    files = files if files is not None else {"dt=2023-11-14/part-0.parquet": events_table(BASE)}
    for rel, t in files.items():
        p = tmp_path / "raw" / "events" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(t, bytes):
            p.write_bytes(t)
        else:
            pq.write_table(t, p)
    (tmp_path / "raw" / "items").mkdir(parents=True, exist_ok=True)
    pq.write_table(items if items is not None else catalogue(), tmp_path / "raw" / "items" / "items.parquet")
    ov = {"events_path": str(tmp_path / "raw" / "events"), "items_path": str(tmp_path / "raw" / "items"), "output_dir": str(tmp_path / "out"), "num_shards": 2, "num_proc": 1, "item_text_template": "{title}. {genres}"}
    ov.update(over)
    return load_config(DataPrepConfig, None, [f"{k}={v}" for k, v in ov.items()])


def quarantine(path: Path) -> pa.Table:
    return pq.read_table(path / "quarantine" / "events.parquet")


def check_identity(m: dict) -> None:
    c = m["counts"]
    assert c["events_read"] == c["events_kept"] + sum(c["events_quarantined"].values()) + sum(c["events_filtered"].values())


# ----------------------------------------------------------------------------- happy path + contract


def test_contract_layout_and_counts(tmp_path):
    v = run(setup(tmp_path))
    assert resolve_prepared(tmp_path / "out") == v
    d = load_prepared(tmp_path / "out")
    assert d.sequences.column_names == SEQUENCE_COLUMNS
    assert d.items["item_idx"] == list(range(10))
    assert d.items["item_id"] == [str(k) for k in range(1, 11)]  # numeric order of integer ids
    assert d.manifest["item_id_type"] == "int64" and d.manifest["user_id_type"] == "int64"
    c = d.manifest["counts"]
    assert (c["events_read"], c["events_kept"], c["users"], c["items"]) == (16, 16, 4, 10)
    check_identity(d.manifest)
    assert sorted(p.name for p in (v / "sequences").glob("data-*.arrow")) == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    assert d.manifest["num_shards"] == 2
    # ties and order: each history is sorted by timestamp
    for ts in d.sequences["timestamp"]:
        assert ts == sorted(ts)
    # n_train_events counts exactly the training part
    n = np.zeros(10, int)
    for row in d.sequences:
        for k in row["item_idx"][: row["train_len"]]:
            n[k] += 1
    assert d.items["n_train_events"] == n.tolist()
    assert (v / "config.yaml").is_file() and (v / "quarantine" / "items.parquet").is_file()


def test_num_shards_rules(tmp_path):
    with pytest.raises(ConfigError, match="num_shards"):
        setup(tmp_path, num_shards=0)
    with pytest.raises(DataPrepError, match="num_shards=8 but only 4 users"):
        run(setup(tmp_path, num_shards=8))
    v = run(setup(tmp_path, num_shards=4))
    assert len(list((v / "sequences").glob("data-*.arrow"))) == 4


# ----------------------------------------------------------------------------- bad input: errors


def test_missing_column_names_file_and_column(tmp_path):
    t = events_table(BASE).drop_columns(["timestamp"])
    cfg = setup(tmp_path, {"dt=2023-11-14/a.parquet": t})
    with pytest.raises(DataPrepError, match=r"a\.parquet.*missing column 'timestamp'"):
        run(cfg)


def test_renamed_columns_via_config(tmp_path):
    t = events_table(BASE).rename_columns(["uid", "sku", "ts", "kind"])
    v = run(setup(tmp_path, {"a.parquet": t}, **{"columns.user_id": "uid", "columns.item_id": "sku", "columns.timestamp": "ts", "columns.event_type": "kind"}))
    assert json.loads((v / "manifest.json").read_text())["counts"]["events_kept"] == 16


@pytest.mark.parametrize(
    "col,arr,match",
    [
        ("user_id", pa.array([1.5] * 16), r"column 'user_id' has type double"),
        ("timestamp", pa.array([{"s": 1}] * 16), r"column 'timestamp' has type struct"),
    ],
)
def test_wrong_column_type(tmp_path, col, arr, match):
    t = events_table(BASE)
    t = t.set_column(t.schema.get_field_index(col), col, arr)
    with pytest.raises(DataPrepError, match=r"bad\.parquet.*" + match):
        run(setup(tmp_path, {"bad.parquet": t}))


def test_empty_file_errors_or_is_skipped(tmp_path):
    files = {"dt=2023-11-14/part-0.parquet": events_table(BASE), "dt=2023-11-15/empty.parquet": b""}
    with pytest.raises(DataPrepError, match=r"empty\.parquet is empty \(0 bytes\)"):
        run(setup(tmp_path, files))
    v = run(setup(tmp_path, files, on_bad_file="skip"))
    m = json.loads((v / "manifest.json").read_text())
    assert [Path(s["path"]).name for s in m["skipped_files"]] == ["empty.parquet"]
    assert m["counts"]["events_read"] == 16


def test_zero_row_file_is_fine(tmp_path):
    files = {"a.parquet": events_table(BASE), "b.parquet": events_table(BASE).slice(0, 0)}
    m = json.loads((run(setup(tmp_path, files)) / "manifest.json").read_text())
    assert m["counts"]["events_read"] == 16 and m["counts"]["empty_event_files"] == 1


def test_truncated_parquet_names_the_file(tmp_path):
    sink = pa.BufferOutputStream()
    pq.write_table(events_table(BASE), sink)
    data = sink.getvalue().to_pybytes()
    with pytest.raises(DataPrepError, match=r"trunc\.parquet is corrupt or truncated"):
        run(setup(tmp_path, {"ok.parquet": events_table(BASE), "trunc.parquet": data[: len(data) // 2]}))


def test_config_path_that_does_not_exist(tmp_path):
    cfg = setup(tmp_path)
    cfg.events_path = str(tmp_path / "nope" / "events")
    with pytest.raises(DataPrepError, match=r"events: path .*nope/events does not exist"):
        run(cfg)
    cfg = setup(tmp_path, tokenizer=str(tmp_path / "no-model"))
    with pytest.raises(FileNotFoundError, match="no-model"):
        run(cfg)


def test_unknown_config_key_is_an_error():
    with pytest.raises(ConfigError, match="num_shard"):
        load_config(DataPrepConfig, None, ["num_shard=3"])


# ----------------------------------------------------------------------------- bad input: quarantine


def test_null_ids_are_quarantined(tmp_path):
    t = pa.table({"user_id": pa.array(["a", "a", None, "b", "b", ""]), "item_id": pa.array(["1", None, "2", "1", "2", "3"]), "timestamp": pa.array([T0 + i for i in range(6)])})
    v = run(setup(tmp_path, {"a.parquet": t}, items=pa.table({"item_id": pa.array(["1", "2", "3"]), "title": ["x", "y", "z"]}), num_shards=1, item_text_template="{title}"))
    m = json.loads((v / "manifest.json").read_text())
    q = m["counts"]["events_quarantined"]
    assert (q["null_user_id"], q["null_item_id"]) == (2, 1)  # "" counts as null
    assert m["counts"]["events_filtered"]["single_event"] == 1  # user a keeps one event
    qt = quarantine(v).to_pylist()
    assert sorted((r["source_row"], r["reason"]) for r in qt) == [(1, "null_item_id"), (2, "null_user_id"), (5, "null_user_id")]
    assert all(Path(r["source_file"]).name == "a.parquet" for r in qt)
    assert m["user_id_type"] == "string"
    check_identity(m)


def test_bad_and_out_of_range_timestamps(tmp_path):
    ts = ["2023-11-14T10:00:00Z", "2023-11-14 11:00:00", "not a date", None, "1970-01-01", "2200-05-05", str(T0 + 5), "2023-11-14T12:00:00+02:00"]
    t = pa.table({"user_id": [1] * 8, "item_id": [1, 2, 3, 4, 5, 6, 7, 8], "timestamp": ts})
    v = run(setup(tmp_path, {"a.parquet": t}, num_shards=1))
    m = json.loads((v / "manifest.json").read_text())
    q = m["counts"]["events_quarantined"]
    assert (q["bad_timestamp"], q["null_timestamp"], q["timestamp_out_of_range"]) == (1, 1, 2)
    reasons = {r["timestamp"]: r["reason"] for r in quarantine(v).to_pylist()}
    assert reasons == {"not a date": "bad_timestamp", None: "null_timestamp", "1970-01-01": "timestamp_out_of_range", "2200-05-05": "timestamp_out_of_range"}
    seq = load_prepared(v).sequences[0]
    ts10 = int(dt.datetime(2023, 11, 14, 10, tzinfo=dt.timezone.utc).timestamp())
    assert seq["timestamp"] == sorted([ts10, ts10 + 3600, T0 + 5, ts10])  # 12:00+02:00 == 10:00Z
    check_identity(m)


def test_timestamp_encodings_agree(tmp_path):
    """Epoch s / ms (auto-detected) / Parquet timestamp[us, tz] give the same prepared sequences."""
    secs = [T0 + 17 * k for k in range(16)]
    base = events_table([(r[0], r[1], s, r[3]) for r, s in zip(BASE, secs)])
    variants = {
        "s": base,
        "ms": base.set_column(2, "timestamp", pa.array([s * 1000 + 999 for s in secs], pa.int64())),
        "ts": base.set_column(2, "timestamp", pa.array([s * 1_000_000 for s in secs], pa.timestamp("us", tz="Europe/Paris"))),
    }
    got = {}
    for name, t in variants.items():
        v = run(setup(tmp_path / name, {"a.parquet": t}))
        got[name] = load_prepared(v).sequences.to_dict()
    assert got["s"] == got["ms"] == got["ts"]


def test_unknown_event_type_is_quarantined_and_missing_column_means_interaction(tmp_path):
    rows = [(1, 1, T0, "VIEW "), (1, 2, T0 + 1, "click"), (1, 3, T0 + 2, "teleport"), (1, 4, T0 + 3, None)]
    v = run(setup(tmp_path / "a", {"a.parquet": events_table(rows)}, num_shards=1))
    m = json.loads((v / "manifest.json").read_text())
    assert m["counts"]["events_quarantined"]["unknown_event_type"] == 2
    assert load_prepared(v).sequences[0]["event_type"] == [m["event_types"].index("view"), m["event_types"].index("click")]
    v = run(setup(tmp_path / "b", {"a.parquet": events_table(rows).drop_columns(["event_type"])}, num_shards=1))
    m = json.loads((v / "manifest.json").read_text())
    assert set(load_prepared(v).sequences[0]["event_type"]) == {m["event_types"].index("interaction")}


def test_duplicate_events_first_kept(tmp_path):
    rows = BASE + [BASE[0], BASE[5]]  # exact re-deliveries in the same file
    files = {"dt=2023-11-14/a.parquet": events_table(rows), "dt=2023-11-15/b.parquet": events_table([BASE[6]])}  # and one in a later file
    v = run(setup(tmp_path, files))
    m = json.loads((v / "manifest.json").read_text())
    assert m["counts"]["events_quarantined"]["duplicate"] == 3
    q = quarantine(v).to_pylist()
    assert sorted((Path(r["source_file"]).name, r["source_row"]) for r in q) == [("a.parquet", 16), ("a.parquet", 17), ("b.parquet", 0)]
    assert {r["reason"] for r in q} == {"duplicate"} and q[0]["event_type"] == "view"
    assert m["counts"]["events_kept"] == 16
    v2 = run(setup(tmp_path / "nodedup", files, dedup=False))
    assert json.loads((v2 / "manifest.json").read_text())["counts"]["events_kept"] == 19


def test_events_for_items_missing_from_catalogue(tmp_path):
    rows = BASE + [(1, 77, T0 + 999, "view"), (2, 77, T0 + 999, "view")]
    v = run(setup(tmp_path / "q", {"a.parquet": events_table(rows)}))
    m = json.loads((v / "manifest.json").read_text())
    assert m["counts"]["events_quarantined"]["item_not_in_catalogue"] == 2
    assert [(r["item_id"], r["timestamp"]) for r in quarantine(v).to_pylist()] == [("77", str(T0 + 999))] * 2
    v = run(setup(tmp_path / "k", {"a.parquet": events_table(rows)}, unknown_items="keep"))
    d = load_prepared(v)
    k = d.items["item_id"].index("77")
    assert d.items[k]["in_catalogue"] is False and d.items[k]["text"] == "" and k == 10  # numeric order: after "10"
    assert d.manifest["counts"]["items_not_in_catalogue_kept"] == 1 and d.manifest["counts"]["events_kept"] == 18


def test_catalogue_items_without_text_and_bad_catalogue_rows(tmp_path):
    items = pa.table({"item_id": pa.array([1, 2, 3, None, 3, 4, 5, 6, 7, 8, 9, 10]), "title": ["A", None, "", "x", "dup", "D", "E", "F", "G", "H", "I", "J"]})
    v = run(setup(tmp_path, items=items, item_text_template="{title}"))
    d = load_prepared(v)
    c = d.manifest["counts"]
    assert d.items["text"][:3] == ["A", "", ""] and c["items_without_text"] == 2 and c["items"] == 10
    assert c["items_quarantined"] == {"null_item_id": 1, "duplicate_item_id": 1}
    qi = pq.read_table(v / "quarantine" / "items.parquet").to_pylist()
    assert [(r["source_row"], r["reason"], r["title"]) for r in qi] == [(3, "null_item_id", "x"), (4, "duplicate_item_id", "dup")]
    assert d.items[1]["input_ids"] == [101, 102]  # empty text -> [CLS] [SEP]


def test_single_event_users_are_filtered_and_counted(tmp_path):
    rows = BASE + [(9, 1, T0, "view")]
    v = run(setup(tmp_path, {"a.parquet": events_table(rows)}))
    m = json.loads((v / "manifest.json").read_text())
    assert m["counts"]["events_filtered"] == {"single_event": 1, "forgotten": 0} and m["counts"]["users"] == 4
    assert "9" not in load_prepared(v).sequences["user_id"]
    check_identity(m)


def test_single_event_and_unknown_item_users_are_kept_for_serving_only(tmp_path):
    """Users with one usable event, or only events on items missing from the catalogue, are in serving/ (the nightly
    table serves them) and nowhere in sequences/: training and evaluation data are those of the same log without them."""
    extra = [(9, 1, T0 + 5, "view"),  # one usable event
             (8, 99, T0 + 7, "view"), (8, 98, T0 + 9, "click"),  # only items missing from the catalogue
             (7, 3, T0 + 11, "click"), (7, 97, T0 + 50, "view")]  # one usable event + one on an unknown item
    v = run(setup(tmp_path / "with", {"a.parquet": events_table(BASE + extra)}))
    ref = run(setup(tmp_path / "without", {"a.parquet": events_table(BASE)}))
    d, r = load_prepared(v), load_prepared(ref)
    c = d.manifest["counts"]
    assert d.manifest["schema_version"] == 2
    check_identity(d.manifest)
    assert c["events_filtered"] == {"single_event": 2, "forgotten": 0} and c["events_quarantined"]["item_not_in_catalogue"] == 3
    assert c["serving_only_users"] == {"single_event": 2, "items_not_in_catalogue": 1}
    assert d.sequences.data.table.equals(r.sequences.data.table)  # training/evaluation data unchanged
    assert d.items["n_train_events"] == r.items["n_train_events"] and c["users"] == r.manifest["counts"]["users"]
    s = d.serving.data.table.to_pylist()
    assert [(x["user_id"], x["item_idx"], x["timestamp"], x["last_timestamp"], x["why"]) for x in s] == [
        ("7", [2], [T0 + 11], T0 + 50, "single_event"),  # item 3 is item_idx 2
        ("8", [], [], T0 + 9, "items_not_in_catalogue"),
        ("9", [0], [T0 + 5], T0 + 5, "single_event")]
    assert s[0]["event_type"] == [d.event_types.index("click")]
    assert r.serving.num_rows == 0 and r.manifest["counts"]["serving_only_users"] == {"single_event": 0, "items_not_in_catalogue": 0}


def test_latin1_bytes_in_text_and_ids(tmp_path):
    title = pa.array([b"Mis\xe9rables", "Café".encode()] + [f"T{k}".encode() for k in range(3, 11)], pa.binary())
    items = pa.table({"item_id": pa.array(range(1, 11), pa.int64()), "title": title})
    bad_str = pa.array([b"Mis\xe9rables 2"] + [b"ok"] * 9, pa.binary()).view(pa.string())  # a "string" column holding invalid UTF-8
    items2 = pa.table({"item_id": pa.array(range(1, 11), pa.int64()), "title": bad_str})
    users = pa.array([b"J\xfcrgen"] * 4 + [f"u{k // 4}".encode() for k in range(4, 16)], pa.binary())
    ev = events_table(BASE).set_column(0, "user_id", users)
    for name, it in (("bin", items), ("str", items2)):
        v = run(setup(tmp_path / name, {"a.parquet": ev}, items=it, item_text_template="{title}"))
        d = load_prepared(v)
        assert d.items["text"][0].startswith("Misérables")
        assert d.manifest["counts"]["text_decoded_latin1"] == 1
        assert "Jürgen" in d.sequences["user_id"] and d.manifest["counts"]["ids_decoded_latin1"] == 4


def test_id_whitespace_and_leading_zeros_counted_kept_or_normalised(tmp_path, capsys):
    # user 1's events arrive as "1", " 1" and "01"; item 3 as "3", "3 " and "003" (issue 29 item 6)
    forms_u = {0: "1", 1: " 1", 2: "01", 3: "1"}
    forms_i = {0: "3", 1: "3 ", 2: "003", 3: "3"}
    rows = [(u, 3 if u == 1 else i, t, e) for u, i, t, e in BASE]
    ev = events_table(rows)
    users = [forms_u[k % 4] if u == 1 else str(u) for k, (u, *_r) in enumerate(rows)]
    items = [forms_i[k % 4] if u == 1 else str(i) for k, (u, i, *_r) in enumerate(rows)]
    ev = ev.set_column(0, "user_id", pa.array(users)).set_column(1, "item_id", pa.array(items))
    cat = catalogue().set_column(0, "item_id", pa.array([str(k) for k in range(1, 11)]))

    v = run(setup(tmp_path / "exact", {"a.parquet": ev}, items=cat))
    c = load_prepared(v).manifest["counts"]
    assert c["id_normalization"] == "exact"
    assert (c["ids_whitespace_events"], c["ids_leading_zero_events"]) == (1, 1)  # one row each carries both forms
    assert c["events_quarantined"]["item_not_in_catalogue"] == 2  # "3 " and "003" are not catalogue item "3"
    err = capsys.readouterr()
    assert "id_normalization" in err.out + err.err and "row 1" in err.out + err.err

    v = run(setup(tmp_path / "norm", {"a.parquet": ev}, items=cat, id_normalization="trim_zeros"))
    d = load_prepared(v)
    c = d.manifest["counts"]
    assert (c["ids_whitespace_events"], c["ids_leading_zero_events"]) == (1, 1)
    assert c["events_quarantined"].get("item_not_in_catalogue", 0) == 0
    assert sorted(d.sequences["user_id"]) == ["1", "2", "3", "4"]
    one = d.sequences["user_id"].index("1")
    assert len(d.sequences[one]["item_idx"]) == 4  # all four forms are one user's history
    table, unknown = encode_histories(d, [" 01", "2"], ["003 ", "5"], [T0, T0])  # the online path normalises the same way
    assert unknown == 0 and table.column("user_id").to_pylist() == ["1", "2"]


def test_accounting_identity_on_a_dirty_mix(tmp_path):
    rows = BASE + [(None, 1, T0, "view"), (1, None, T0, "view"), (1, 1, 5, "view"), (1, 55, T0, "view"), BASE[3], (8, 1, T0, "view"), (1, 2, T0, "warp")]
    v = run(setup(tmp_path, {"a.parquet": events_table(rows), "b.parquet": events_table(BASE[:3])}))
    m = json.loads((v / "manifest.json").read_text())
    c = m["counts"]
    check_identity(m)
    assert c["events_read"] == 26 and sum(c["events_quarantined"].values()) == len(quarantine(v)) == 9
    assert c["events_filtered"]["single_event"] == 1


# ----------------------------------------------------------------------------- splits


def test_leave_last_out_hand_example():
    off = np.array([0, 1, 3, 8])  # users with 1, 2, 5 events
    tl, vp, tp = split_leave_last_out(off)
    assert tl.tolist() == [1, 1, 3] and vp.tolist() == [-1, -1, 3] and tp.tolist() == [-1, 1, 4]


def test_time_split_hand_example():
    cut = 1000 * 86_400
    day = 86_400
    # u0: 3 before, 1 on the day, 1 after ; u1: 1 before, none on the day ; u2: 1 before, 1 on the day ; u3: none before
    ts = np.array([cut - 30, cut - 20, cut - 10, cut + 5, cut + 2 * day, cut - 1, cut - 1, cut + 10, cut + 1, cut + 2])
    off = np.array([0, 5, 6, 8, 10])
    tl, vp, tp = split_time(off, ts, cut)
    assert tl.tolist() == [2, 1, 1, 0]
    assert vp.tolist() == [2, -1, -1, -1]
    assert tp.tolist() == [3, -1, 1, -1]


def test_time_split_end_to_end(tmp_path):
    day = dt.datetime(2023, 11, 15, tzinfo=dt.timezone.utc).timestamp()
    rows = [(1, 1, day - 300, "view"), (1, 2, day - 200, "view"), (1, 3, day - 100, "view"), (1, 4, day + 100, "view"), (2, 5, day - 50, "view"), (2, 6, day + 86_400 * 3, "view")]
    v = run(setup(tmp_path, {"a.parquet": events_table([(u, i, int(t), e) for u, i, t, e in rows])}, split="time", time_cutoff="2023-11-15", num_shards=1))
    s = load_prepared(v).sequences
    assert (s[0]["train_len"], s[0]["valid_pos"], s[0]["test_pos"]) == (2, 2, 3)
    assert (s[1]["train_len"], s[1]["valid_pos"], s[1]["test_pos"]) == (1, -1, -1)


def test_ties_broken_by_file_then_row(tmp_path):
    a = events_table([(1, 3, T0, "view"), (1, 1, T0, "view"), (2, 1, T0, "view"), (2, 2, T0 + 1, "view")])
    b = events_table([(1, 2, T0, "view")])
    v = run(setup(tmp_path, {"dt=2023-11-14/x.parquet": a, "dt=2023-11-15/a.parquet": b}, num_shards=1))
    assert load_prepared(v).sequences[0]["item_idx"] == [2, 0, 1]  # items 3, 1 (file 1, rows 0,1), then 2 (file 2)


# ----------------------------------------------------------------------------- text + tokenisation


def test_template_tidies_separators():
    t = TextTemplate("{title}. {genres} | {brand}")
    assert t.render(["Toy Story", "Comedy", "Pixar"]) == "Toy Story. Comedy | Pixar"
    assert t.render(["Toy Story", "", "Pixar"]) == "Toy Story | Pixar"
    assert t.render(["", "Comedy", ""]) == "Comedy"
    assert t.render(["", "", ""]) == ""
    with pytest.raises(DataPrepError, match="plain column name"):
        TextTemplate("{a.b}")


def test_list_fields_render_as_one_clean_list(tmp_path):
    """Genres as a list of strings, Amazon categories as a list of category paths (lists of lists): flattened,
    each value once, no Python brackets or quotes in the item text."""
    from data_prep.items import join_list_field

    assert join_list_field(["Comedy", "Drama"]) == "Comedy, Drama"
    assert join_list_field([["Toys & Games", "Puzzles"], ["Toys & Games", "Kids"], []]) == "Toys & Games, Puzzles, Kids"
    assert join_list_field([None, " ", "A", ["A", None]]) == "A" and join_list_field([]) == ""
    items = pa.table({"item_id": list(range(1, 11)), "title": [f"T{i}" for i in range(1, 11)],
                      "category": [[["Toys & Games", "Puzzles"], ["Toys & Games"]]] + [None] * 8 + [[]]},
                     schema=pa.schema([("item_id", pa.int64()), ("title", pa.string()),
                                       ("category", pa.list_(pa.list_(pa.string())))]))
    v = run(setup(tmp_path, items=items, item_text_template="{title}. {category}"))
    d = load_prepared(v).items
    text = dict(zip(d["item_id"], d["text"]))
    assert (text["1"], text["2"], text["10"]) == ("T1. Toys & Games, Puzzles", "T2", "T10")


def test_a_run_that_quarantines_most_events_stops_naming_the_key(tmp_path):
    """A copied config whose event types do not include the log's (the Amazon 'review') quarantined every event and
    published an empty version with exit 0: now it stops before publishing and names the key; the limit is a key."""
    rows = [(u, i, t, "review") for u, i, t, _ in BASE]
    with pytest.raises(DataPrepError, match=r"16 of 16 events \(100%\).*unknown_event_type: check event_types"):
        run(setup(tmp_path / "a", {"a.parquet": events_table(rows)}))
    assert not (tmp_path / "a" / "out" / "LATEST").exists()
    v = run(setup(tmp_path / "b", {"a.parquet": events_table(rows[:4] + BASE[4:])}))  # 25% quarantined: fine
    assert json.loads((v / "manifest.json").read_text())["counts"]["events_quarantined"]["unknown_event_type"] == 4
    v = run(setup(tmp_path / "c", {"a.parquet": events_table(rows[:12] + BASE[12:])}, max_quarantined_share=1, num_shards=1))
    assert json.loads((v / "manifest.json").read_text())["counts"]["events_kept"] == 4


def test_manifest_reports_history_length_percentiles(tmp_path):
    """What model.max_len must cover is printed and kept in the manifest (BASE: 4 users x 4 events)."""
    v = run(setup(tmp_path))
    assert load_prepared(v).manifest["counts"]["history_length"] == {"p50": 4.0, "p95": 4.0, "p99": 4.0, "max": 4}
    from data_prep.pipeline import history_percentiles
    h = history_percentiles(np.array([1, 2, 3, 100]))
    assert h["p50"] == 2.5 and h["max"] == 100 and 85.4 < h["p95"] < 85.5 and 97.0 < h["p99"] < 97.1  # linear interpolation
    assert history_percentiles(np.array([], dtype=np.int64)) == {}


def test_html_entities_in_item_text_are_decoded_and_counted(tmp_path):
    """Scraped catalogues publish titles with HTML entities (15% of the Amazon toy titles): decoded before
    tokenizing, counted in the manifest; a plain '&' is left alone; item_text_unescape_html=false keeps them."""
    assert TextTemplate("{title}").render(["Dungeons &amp; Dragons 1-3/4&quot; &reg;"]) == 'Dungeons & Dragons 1-3/4" ®'
    assert TextTemplate("{title}").render(["Salt & Pepper"]) == "Salt & Pepper"
    assert TextTemplate("{title}", unescape_html=False).render(["A &amp; B"]) == "A &amp; B"
    titles = ["Lords of Waterdeep: A Dungeons &amp; Dragons Board Game", "Salt & Pepper"] + [f"T{k}" for k in range(3, 11)]
    v = run(setup(tmp_path / "on", items=catalogue(titles=titles), item_text_template="{title}"))
    d = load_prepared(v)
    assert d.items["text"][:2] == ["Lords of Waterdeep: A Dungeons & Dragons Board Game", "Salt & Pepper"]
    assert d.manifest["counts"]["text_html_unescaped"] == 1
    v = run(setup(tmp_path / "off", items=catalogue(titles=titles), item_text_template="{title}", item_text_unescape_html="false"))
    assert load_prepared(v).items["text"][0].endswith("&amp; Dragons Board Game")


def test_tokenized_once_per_distinct_text_and_reused(tmp_path, monkeypatch):
    calls = []
    real = items_mod.tokenize_texts

    def counting(tok, texts, *a, **k):
        calls.append(list(texts))
        return real(tok, texts, *a, **k)

    monkeypatch.setattr(items_mod, "tokenize_texts", counting)
    items = catalogue(titles=["Same"] * 5 + [f"T{k}" for k in range(5)])
    v = run(setup(tmp_path, items=items))
    flat = [t for c in calls for t in c]
    assert len(flat) == len(set(flat)) == 6  # 10 items, 6 distinct texts, each tokenized once
    d = load_prepared(v)
    assert d.items[0]["input_ids"] == d.items[4]["input_ids"] and len(d.items[0]["input_ids"]) <= 64
    calls.clear()
    v2 = run(setup(tmp_path, items=items, version="v2"))  # an explicit version is prepared again, from the caches
    assert sum(len(c) for c in calls) == 0
    assert json.loads((v2 / "manifest.json").read_text())["reuse"]["texts_reused"] == 6


def test_max_text_tokens_truncates(tmp_path):
    v = run(setup(tmp_path, items=catalogue(titles=["word " * 100] * 10), max_text_tokens=8))
    assert {len(x) for x in load_prepared(v).items["input_ids"]} == {8}


# ----------------------------------------------------------------------------- incremental + determinism


def _day(k: int) -> pa.Table:
    return events_table([(u, 1 + (u + k + j) % 10, T0 + 86_400 * k + 10 * j + u, "view") for u in range(1, 6) for j in range(3)])


def test_incremental_new_partition_reuses_old_files(tmp_path):
    files = {f"dt=2023-11-1{k}/part-0.parquet": _day(k) for k in range(2)}
    cfg = setup(tmp_path, files)
    v1 = run(cfg)
    new = tmp_path / "raw" / "events" / "dt=2023-11-12" / "part-0.parquet"
    new.parent.mkdir()
    pq.write_table(_day(2), new)
    v2 = run(cfg)
    m = json.loads((v2 / "manifest.json").read_text())
    r = m["reuse"]
    assert r["previous_version"] == v1.name
    assert [Path(p).parent.name for p in r["events_files_reused"]] == ["dt=2023-11-10", "dt=2023-11-11"]
    assert [Path(p).parent.name for p in r["events_files_validated"]] == ["dt=2023-11-12"]
    assert r["texts_tokenized"] == 0
    full = run(setup(tmp_path / "full", {**files, "dt=2023-11-12/part-0.parquet": _day(2)}, incremental=False))
    assert load_prepared(v2).sequences.to_dict() == load_prepared(full).sequences.to_dict()
    assert load_prepared(v2).items.to_dict() == load_prepared(full).items.to_dict()
    assert json.loads((full / "manifest.json").read_text())["reuse"]["events_files_reused"] == []
    # a changed config that affects validation invalidates the per-file cache
    v3 = run(setup(tmp_path, {}, min_timestamp=str(T0 + 86_400)))  # drops the first day (15 events)
    m3 = json.loads((v3 / "manifest.json").read_text())
    assert m3["reuse"]["events_files_reused"] == [] and m3["counts"]["events_quarantined"]["timestamp_out_of_range"] == 15


def test_determinism_two_runs_identical(tmp_path):
    files = {f"dt=2023-11-1{k}/part-0.parquet": _day(k) for k in range(3)}
    a = run(setup(tmp_path / "a", files, incremental=False))
    b = run(setup(tmp_path / "b", files, incremental=False))
    ma, mb = (json.loads((x / "manifest.json").read_text()) for x in (a, b))
    assert ma["vocab"] == mb["vocab"] and ma["counts"] == mb["counts"]
    assert load_prepared(a).sequences.to_dict() == load_prepared(b).sequences.to_dict()


def test_prep_job_holds_no_per_event_array(tmp_path, monkeypatch):
    """Peak RSS at 10M+ events: the per-event arrays (user, item, timestamp, event type, keep flags) are locals of
    pipeline.global_stage, dropped as they are used; no PrepJob field may keep one alive to the end of the run (the
    sequences table, built from them, is the one holder meant to)."""
    import dataclasses

    from data_prep import pipeline

    jobs = []
    real = pipeline.log_summary
    monkeypatch.setattr(pipeline, "log_summary", lambda job: (jobs.append(job), real(job))[1])
    rows = [(u, 1 + (u + k) % 10, T0 + 100 * k + u, "view") for u in range(1, 21) for k in range(30)]  # 20 users x 30 events
    run(setup(tmp_path, {"dt=2023-11-14/part-0.parquet": events_table(rows)}))
    (job,) = jobs
    assert job.counts["events_kept"] == 600 and len(job.users) == 20 and len(job.item_vocab) == 10
    for f in dataclasses.fields(job):
        v = getattr(job, f.name)
        if isinstance(v, (np.ndarray, pa.Array, pa.ChunkedArray, list)):
            assert len(v) <= len(job.users) + 1, f"PrepJob.{f.name} holds {len(v)} values: a per-event array?"


def test_versions_and_latest(tmp_path, capsys):
    """A rerun on the same input files (same bytes, even rewritten with a new mtime) and settings reuses the
    published version instead of publishing a copy (the next stage would take it for new data); new data, other
    settings or an explicit version publish a new one."""
    cfg = setup(tmp_path)
    v1 = run(cfg)
    f = tmp_path / "raw" / "events" / "dt=2023-11-14" / "part-0.parquet"
    f.write_bytes(f.read_bytes())  # the quickstart regenerates its sample: same bytes, new mtime
    assert run(cfg) == v1 and "unchanged since" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("v")] == [v1.name]
    cfg.max_text_tokens = 32  # another setting: a new version
    v2 = run(cfg)
    assert v2 != v1 and v1.is_dir() and v2.is_dir()
    assert (tmp_path / "out" / "LATEST").read_text().strip() == v2.name
    cfg.version = "nightly"
    v3 = run(cfg)
    assert v3.name == "nightly" and resolve_prepared(tmp_path / "out") == v3
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == [".lock"]  # the run lock stays (flock)


# ----------------------------------------------------------------------------- loaders for later stages


def test_load_prepared_rejects_other_schema_version(tmp_path):
    v = run(setup(tmp_path))
    m = json.loads((v / "manifest.json").read_text())
    m["schema_version"] = 99
    (v / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PreparedDataError, match="schema_version 99"):
        load_prepared(v)
    with pytest.raises(PreparedDataError, match="does not exist"):
        load_prepared(tmp_path / "missing")


def test_encode_histories_matches_pipeline(tmp_path):
    v = run(setup(tmp_path))
    d = load_prepared(v)
    u, i, t, _ = zip(*BASE)
    table, unknown = encode_histories(d, list(u) + [1], list(i) + [12345], list(t) + [T0])
    assert unknown == 1
    assert table.column("user_id").to_pylist() == d.sequences["user_id"]
    assert table.column("item_idx").to_pylist() == d.sequences["item_idx"]


@pytest.mark.slow
def test_cli_entry_point(tmp_path):
    import subprocess
    import sys

    cfg = setup(tmp_path)
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "data_prep", "--config", str(root / "configs/data_prep/sample.yaml"), f"events_path={cfg.events_path}", f"items_path={cfg.items_path}", f"output_dir={cfg.output_dir}", "num_shards=2", "item_text_template={title}"]
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "16 kept" in p.stdout + p.stderr
    assert load_prepared(tmp_path / "out").manifest["counts"]["events_kept"] == 16


# ----------------------------------------------------------------------------- real data (skipped when absent)

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize(
    "name,config,expect",
    [
        ("ml-100k", "ml100k.yaml", (100_000, 943, 1_682, 1_682)),
        ("ml-1m", "ml1m.yaml", (1_000_209, 6_040, 3_706, 3_883)),
    ],
)
def test_movielens_exact_counts(tmp_path, name, config, expect):
    src = SHARED / name
    if not src.is_dir():
        pytest.skip(f"{src} is absent (MovieLens is never copied into the repo)")
    convert = pytest.importorskip("data_prep.convert")
    convert.convert_movielens(src, tmp_path / "raw")
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(
        DataPrepConfig,
        root / "configs" / "data_prep" / config,
        [f"events_path={tmp_path / 'raw' / 'events'}", f"items_path={tmp_path / 'raw' / 'items'}", f"output_dir={tmp_path / 'out'}"],
    )
    d = load_prepared(run(cfg))
    c = d.manifest["counts"]
    assert (c["events_read"], c["users"], c["items_with_events"], c["items_in_catalogue"]) == expect
    assert c["events_kept"] == expect[0] and sum(c["events_quarantined"].values()) == 0 and sum(c["events_filtered"].values()) == 0
    assert d.sequences.num_rows == expect[1] and d.items.num_rows == expect[3]
    assert sum(len(x) for x in d.sequences["item_idx"]) == expect[0]
