"""End-to-end tests of the nightly inference stage on a tiny prepared folder and a tiny exported model.

    python -m pytest tests/test_inference.py -q            # (-m "not slow" skips the subprocess ones)

Covered: exact top-K against a brute-force reference built from the same model; seen/unavailable
exclusions; new (cold-start) catalogue items scored from text; typed ids; rerun replaces the table
whole; readers polling while a date is published again and again always read one whole run, never fail
and never find no table; kill -9 at several moments leaves the old table and the next run completes;
the per-date lock; 2 processes give the same table as 1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fixtures_prepared import write_prepared, write_tiny_text_model
from inference.config import InferenceConfig
from inference.run import DateLock, InferenceError, _recover_and_clean, history_windows, run
from lmrec_common.config import ConfigError, load_config
from lmrec_common.manifest import sha256_strings

ROOT = Path(__file__).resolve().parent.parent
DATE = "2026-11-27"
K = 5


def _fix_vocab_hash(version_dir: Path) -> dict:
    """The fixture writes placeholder vocab hashes; make them the real hash of the item ids."""
    import datasets

    m = json.loads((version_dir / "manifest.json").read_text())
    ids = datasets.load_from_disk(str(version_dir / "items")).data.table.column("item_id").to_pylist()
    m["vocab"]["items_sha256"] = sha256_strings(ids)
    (version_dir / "manifest.json").write_text(json.dumps(m))
    return m


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """prepared/v1 (40 items, 30 users) + a hybrid model exported as final/ (untrained, deterministic)."""
    from train.export import export_final
    from train.model import RecModelConfig, SeqRecModel

    root = tmp_path_factory.mktemp("inf")
    tiny = write_tiny_text_model(root / "tiny_bert")
    v1 = write_prepared(root / "prepared", num_users=30, num_items=40, version="v1")
    manifest = _fix_vocab_hash(v1)
    torch.manual_seed(0)
    mcfg = RecModelConfig(num_items=40, num_event_types=2, item_tower="hybrid", text_model_path=str(tiny), d_model=16,
                          n_layers=1, n_heads=1, max_len=8, dropout=0.0)
    model = SeqRecModel(mcfg, text_model_path=str(tiny))
    export_final(root / "final", model.state_dict(), mcfg, tiny, {"test": True}, manifest, {},
                 item_ids=[f"i{i}" for i in range(40)])  # -> final/item_ids.parquet: maps a newer catalogue by item_id
    return {"root": root, "final": root / "final", "v1": v1, "prepared_root": root / "prepared"}


def _cfg(world, out, **kw) -> InferenceConfig:
    base = dict(model_dir=str(world["final"]), prepared_dir=str(world["v1"]), output_dir=str(out), run_date=DATE, k=K,
                user_batch_size=7, num_threads=1)
    base.update(kw)
    return InferenceConfig(**base)


def _read(table_dir: Path):
    parts = sorted(table_dir.glob("part-*.parquet"))
    return pq.read_table(parts, partitioning=None).to_pandas(), json.loads((table_dir / "_manifest.json").read_text())


def _reference(world, prepared_dir, k, max_len=8, borrow=False):
    """Brute force with the same exported model: all scores, seen = whole history, ranked by score."""
    from data_prep.schema import load_prepared
    from train.catalogue import Catalogue
    from train.export import load_final

    model, _ = load_final(world["final"])
    prep = load_prepared(prepared_dir)
    cat = Catalogue.build(prep.items, model)
    if borrow:
        model.eval()
        cat.borrow_cold_ids(model)
    V = cat.item_vectors(model).numpy()
    ids = prep.items["item_id"]
    avail = np.array(prep.items["available"])
    out = {}
    for row in prep.sequences:
        h = row["item_idx"][-max_len:]
        e = row["event_type"][-max_len:]
        hist = torch.full((1, max_len), -1, dtype=torch.long)
        et = torch.zeros((1, max_len), dtype=torch.long)
        hist[0, max_len - len(h):] = torch.tensor(h)
        et[0, max_len - len(e):] = torch.tensor(e)
        with torch.no_grad():
            u = model.user_vectors(hist, et, catalogue=cat).numpy()[0]
        s = V @ u
        s[list(set(row["item_idx"]))] = -np.inf
        s[~avail] = -np.inf
        order = [i for i in np.argsort(-s, kind="stable") if np.isfinite(s[i])][:k]
        out[row["user_id"]] = ([ids[i] for i in order], s[order])
    return out


def test_config_yaml_and_errors(tmp_path):
    n = 0
    for p in sorted((ROOT / "configs" / "inference").glob("*.yaml")):
        load_config(InferenceConfig, p)
        n += 1
    assert n >= 2
    with pytest.raises(ConfigError, match="run_date"):
        load_config(InferenceConfig, None, ["run_date=2026-13-01"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(InferenceConfig, None, ["top_k=3"])
    with pytest.raises(ConfigError, match="model_dir is empty"):
        run(InferenceConfig(prepared_dir="x", output_dir=str(tmp_path)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_device_cuda_without_gpu_is_a_clear_error(world, tmp_path):
    with pytest.raises(InferenceError, match="device: cuda"):
        run(_cfg(world, tmp_path / "recs", device="cuda"))
    assert not (tmp_path / "recs" / f"dt={DATE}").exists()


def test_history_windows_left_padded_latest_events():
    vals = np.array([1, 2, 3, 4, 5, 6, 7], np.int64)
    offs = np.array([0, 5, 5, 7])
    ets = np.array([0, 1, 0, 1, 0, 1, 1])
    to_model = np.array([0, 10, 11, -1, 13, 14, 15, 16])  # item 3 unknown to the model
    hist, et, w, unm = history_windows(vals, offs, ets, to_model, T=3)
    assert hist.tolist() == [[11, 13, 14], [-1, -1, -1], [-1, 15, 16]]
    assert et.tolist() == [[1, 1, 0], [0, 0, 0], [0, 1, 1]]
    assert w.tolist() == [3, 0, 2] and unm == 1
    # the same windows as rows of tonight's catalogue (what the user tower gathers from)
    hist_t, et_t, w_t, _ = history_windows(vals, offs, ets, to_model, T=3, space="tonight")
    assert hist_t.tolist() == [[2, 4, 5], [-1, -1, -1], [-1, 6, 7]]
    assert torch.equal(et_t, et) and w_t.tolist() == w.tolist()


def test_single_process_matches_bruteforce(world, tmp_path):
    out = run(_cfg(world, tmp_path / "recs"))
    assert out == tmp_path / "recs" / f"dt={DATE}"
    assert (out / "_SUCCESS").is_file() and (out / "_config.yaml").is_file()
    df, man = _read(out)
    assert man["counts"]["users_scored"] == 30 and man["counts"]["rows"] == len(df) == 30 * K
    assert man["k"] == K and man["catalogue"]["items_new_text_only"] == 0
    assert list(df.columns) == ["user_id", "rank", "item_id", "score", "model_version", "run_date", "source", "variant"]
    assert set(df["source"]) == {"model"} and set(df["variant"]) == {"default"}
    assert man["sources"] == {"model": {"users": 30, "rows": 30 * K}, "fallback": {"users": 0, "rows": 0}}
    assert str(df["rank"].dtype) == "int16" and str(df["score"].dtype) == "float32"
    assert (df["model_version"] == man["model"]["model_version"]).all()
    assert str(df["run_date"].iloc[0]) == DATE
    ref = _reference(world, world["v1"], K)
    for uid, g in df.groupby("user_id"):
        g = g.sort_values("rank")
        assert g["rank"].tolist() == list(range(1, K + 1))
        assert g["item_id"].tolist() == ref[uid][0], uid
        np.testing.assert_allclose(g["score"].to_numpy(), ref[uid][1], rtol=1e-4, atol=1e-5)
    # no leftovers next to the table: dt=<date> is the link to the one run folder under _runs/
    assert sorted(p.name for p in (tmp_path / "recs").iterdir() if not p.name.startswith(".lock")) == ["_runs", f"dt={DATE}"]
    assert out.is_symlink() and os.readlink(out) == man["run_dir"] == f"_runs/dt={DATE}/run={man['run_id']}"
    assert [p.name for p in (tmp_path / "recs" / "_runs" / f"dt={DATE}").iterdir()] == [f"run={man['run_id']}"]
    assert man["schema_version"] == 3 and [p["file"] for p in man["parts"]] == [f"part-00000-{man['run_id']}.parquet"]


def test_write_streams_split_the_same_table_over_files(world, tmp_path):
    """write_streams=3: chunks dealt round-robin to 3 part files, each with its own writer thread; the
    rows are exactly those of one stream, and the manifest accounts for every file."""
    one, m_one = _read(run(_cfg(world, tmp_path / "one", write_streams=1)))
    out = run(_cfg(world, tmp_path / "three", write_streams=3))  # 30 users in chunks of 7: 5 chunks
    df, man = _read(out)
    names = [f"part-00000-{j:02d}-{man['run_id']}.parquet" for j in range(3)]
    assert sorted(p.name for p in out.glob("part-*.parquet")) == names
    assert [p["file"] for p in man["parts"]] == names
    assert [p["users"] for p in man["parts"]] == [14, 9, 7]  # chunks 0+3, 1+4, 2 (the last chunk holds 2 users)
    assert sum(p["rows"] for p in man["parts"]) == man["counts"]["rows"] == len(df) == 30 * K
    assert all(p["bytes"] == (out / p["file"]).stat().st_size for p in man["parts"])
    assert man["config"]["write_streams"] == 3 and man["devices"] == ["cpu"]
    key = ["user_id", "rank"]
    a = one.drop(columns="model_version").sort_values(key).reset_index(drop=True)
    b = df.drop(columns="model_version").sort_values(key).reset_index(drop=True)
    assert a.equals(b)
    # a file is whole chunks in sequence order: file 0 holds users 0-6 then 21-27 of the single-stream order
    order = list(dict.fromkeys(pq.read_table(tmp_path / "one" / f"dt={DATE}" / f"part-00000-{m_one['run_id']}.parquet")
                               .column("user_id").to_pylist()))
    f0 = list(dict.fromkeys(pq.read_table(out / names[0]).column("user_id").to_pylist()))
    assert f0 == order[0:7] + order[21:28]


def test_prefetch_reader_gives_the_same_table_and_its_errors_publish_nothing(world, tmp_path, monkeypatch):
    """prefetch_chunks: a reader thread builds the next chunks' windows while the main thread scores; the
    table and counts equal the in-line reads', also when every user is filtered out, and with
    overlap_scoring. A reader error ends the run with that error and no table."""
    import inference.run as inference_run

    key = ["user_id", "rank"]
    tables = {}
    for ahead in (0, 1, 3):
        df, man = _read(run(_cfg(world, tmp_path / f"p{ahead}", prefetch_chunks=ahead)))
        tables[ahead] = (df.drop(columns="model_version").sort_values(key).reset_index(drop=True),
                         {k: v for k, v in man["counts"].items() if k != "timings_s"})
        assert man["config"]["prefetch_chunks"] == ahead
    # overlap_scoring: each chunk collected after the next one is launched (on CPU: the order logic alone)
    df, man = _read(run(_cfg(world, tmp_path / "overlap", prefetch_chunks=2, overlap_scoring=True, write_streams=2)))
    tables["overlap"] = (df.drop(columns="model_version").sort_values(key).reset_index(drop=True),
                         {k: v for k, v in man["counts"].items() if k != "timings_s"})
    assert [p["users"] for p in man["parts"]] == [16, 14]  # chunks of 7 dealt in order: 0, 2, 4 (2 users) / 1, 3
    assert tables[0][0].equals(tables[1][0]) and tables[0][0].equals(tables[3][0]) and tables[0][0].equals(tables["overlap"][0])
    assert tables["overlap"][1] == tables[0][1]
    assert tables[0][1] == tables[1][1] == tables[3][1] and tables[0][1]["users_scored"] == 30
    _, man = _read(run(_cfg(world, tmp_path / "idle", prefetch_chunks=2, active_since_days=10)))
    assert man["counts"]["users_inactive"] == 30 and man["counts"]["rows"] == 0

    real, calls = inference_run._read_chunk, []

    def flaky(seq, s, *a):
        calls.append(s)
        if s >= 14:  # the third chunk of 7 users
            raise OSError(f"disk read failed at user {s}")
        return real(seq, s, *a)

    monkeypatch.setattr(inference_run, "_read_chunk", flaky)
    with pytest.raises(OSError, match="disk read failed at user 14"):
        run(_cfg(world, tmp_path / "bad", prefetch_chunks=2))
    assert not (tmp_path / "bad" / f"dt={DATE}").exists()
    assert [p.name for p in (tmp_path / "bad").iterdir() if not p.name.startswith(".lock")] == []


def test_rerun_replaces_whole_table(world, tmp_path):
    out = run(_cfg(world, tmp_path / "recs"))
    _, m1 = _read(out)
    (out / "part-00099.parquet").write_bytes(b"junk from an older layout")  # must disappear with the old table
    run(_cfg(world, tmp_path / "recs", k=3))
    df, m2 = _read(out)
    assert m2["run_id"] != m1["run_id"] and m2["k"] == 3 and len(df) == 30 * 3
    assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS", "_config.yaml", "_manifest.json", f"part-00000-{m2['run_id']}.parquet"]


def _read_resolved(table: Path):
    """What docs/CONTRACTS.md section 4 tells a reader to do: resolve the dt= link once, check _SUCCESS there,
    then list and read that folder. Returns the folder, its manifest and its part files (not yet read)."""
    d = Path(os.path.realpath(table))
    if not (d / "_SUCCESS").is_file():
        raise FileNotFoundError(f"no table at {table}")
    return d, json.loads((d / "_manifest.json").read_text()), sorted(d.glob("part-*.parquet"))


def _assert_one_whole_run(man: dict, files: list[Path], t) -> None:
    """The rows are exactly the table that manifest describes: its part files, its row count, K rows per user."""
    assert sorted(f.name for f in files) == sorted(p["file"] for p in man["parts"])
    assert t.num_rows == man["counts"]["rows"] == 30 * man["k"]
    users = t.column("user_id").value_counts()
    assert len(users) == 30 and set(users.field("counts").to_pylist()) == {man["k"]}


def test_readers_during_reruns_read_one_whole_run(world, tmp_path):
    """Issue 29 item 2: a rerun of a date used to replace recs/dt=<date>/ whole, so a reader that had listed the
    old table's files got FileNotFoundError (or, rarely, a manifest of one run with parts of another, or no table
    at all). Now: a reader that started on a table finishes it after a rerun; readers polling while the date is
    published again and again always read one whole run, never fail, never find no table."""
    out = tmp_path / "recs"
    table = run(_cfg(world, out, k=2, write_streams=2))
    # 1. a reader that listed the table before a rerun reads it after the rerun: the old run, whole
    _, man, files = _read_resolved(table)
    run(_cfg(world, out, k=3, write_streams=2))
    _assert_one_whole_run(man, files, pq.read_table(files, partitioning=None))
    assert man["k"] == 2 and _read(table)[1]["k"] == 3
    # 2. readers polling in a thread while the same date is published 4 more times (K changes each time)
    stop, stats = threading.Event(), {"reads": 0, "runs": set(), "errors": [], "naive_reads": 0, "naive_not_found": 0}

    def reader():
        while not stop.is_set():
            try:
                _, man, files = _read_resolved(table)
                time.sleep(0.002)  # a slow reader: a rerun may publish between the listing and the read
                _assert_one_whole_run(man, files, pq.read_table(files, partitioning=None))
                stats["reads"] += 1
                stats["runs"].add(man["run_id"])
            except BaseException as e:  # noqa: BLE001 - every failure is a finding
                stats["errors"].append(f"{type(e).__name__}: {e}")
            # a reader that does not resolve the link (lists dt=<date>/part-*, then opens them): it may have to
            # retry (FileNotFoundError: run ids in the file names), but its parts never come from two runs
            try:
                parts = sorted(table.glob("part-*.parquet"))
                t = pq.read_table(parts, partitioning=None)
                assert len({re.search(r"-(\d{8}T\d{6}-[0-9a-f]+)\.parquet$", p.name).group(1) for p in parts}) == 1
                assert t.num_rows == 30 * len(set(t.column("rank").to_pylist())) and len(parts) == 2
                stats["naive_reads"] += 1
            except FileNotFoundError:
                stats["naive_not_found"] += 1
            except BaseException as e:  # noqa: BLE001
                stats["errors"].append(f"naive: {type(e).__name__}: {e}")

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        for k in (4, 5, 2, 3):
            run(_cfg(world, out, k=k, write_streams=2))
    finally:
        stop.set()
        th.join(timeout=60)
    assert stats["errors"] == [], stats["errors"][:5]
    assert stats["reads"] > 0 and len(stats["runs"]) >= 2, stats  # the reads spanned reruns
    # every replaced run is still there (grace period: 24 h by default), each whole
    runs = sorted((out / "_runs" / f"dt={DATE}").iterdir())
    assert len(runs) == 6 and all((r / "_SUCCESS").is_file() for r in runs)


def test_replaced_runs_are_kept_for_the_grace_period_then_removed(world, tmp_path):
    """replaced_run_grace_s: a replaced run folder stays until a later run finds it replaced that long ago; a later
    run of another date removes it too, unless that date's lock is held (a rerun of it in flight)."""
    out = tmp_path / "recs"
    runs = out / "_runs" / f"dt={DATE}"
    run(_cfg(world, out))
    _, m2 = _read(run(_cfg(world, out)))
    assert len(list(runs.iterdir())) == 2  # within the grace period (default 24 h)
    other = "2026-11-28"
    held = DateLock(out, f"dt={DATE}")  # a run of DATE in flight: its folders are left to it
    try:
        run(_cfg(world, out, run_date=other, replaced_run_grace_s=0))
    finally:
        held.release()
    assert len(list(runs.iterdir())) == 2
    run(_cfg(world, out, run_date=other, replaced_run_grace_s=0))  # replaces other's run at once, and DATE's old one
    assert [p.name for p in runs.iterdir()] == [f"run={m2['run_id']}"]
    assert len(list((out / "_runs" / f"dt={other}").iterdir())) == 1
    assert _read(out / f"dt={DATE}")[1]["run_id"] == m2["run_id"]
    with pytest.raises(ConfigError, match="replaced_run_grace_s must be >= 0"):
        load_config(InferenceConfig, None, ["replaced_run_grace_s=-1"])


@pytest.mark.parametrize("exchange", [True, False])
def test_table_of_the_old_layout_is_replaced_by_the_link(world, tmp_path, monkeypatch, exchange):
    """A table published before run folders (a real folder recs/dt=<date>/) is swapped for the link in one step
    (renameat2 RENAME_EXCHANGE; two renames where the filesystem has none) and kept under _runs/ like a replaced run."""
    import lmrec_common.publish as publish

    if not exchange:
        monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    out = tmp_path / "recs"
    m1 = _read(run(_cfg(world, out)))[1]
    legacy = out / f"dt={DATE}"
    target = Path(os.path.realpath(legacy))
    legacy.unlink()
    shutil.copytree(target, legacy)  # the old layout: the table's files directly in dt=<date>/
    shutil.rmtree(out / "_runs")
    m2 = _read(run(_cfg(world, out, k=3)))[1]
    assert legacy.is_symlink() and os.readlink(legacy) == m2["run_dir"]
    kept = out / "_runs" / f"dt={DATE}" / f"run=legacy-{m1['run_id']}"
    assert _read(kept)[1]["run_id"] == m1["run_id"] and len(_read(kept)[0]) == 30 * K
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".lock")) == ["_runs", f"dt={DATE}"]


def test_damaged_final_publishes_nothing(world, tmp_path):
    """Flipped bytes in final/model.safetensors (the header intact: safetensors still loads it) or a permuted
    item_ids.parquet used to publish a wrong table with exit 0 and the same model_version: now the run stops,
    naming the file, and the old table stays."""
    import pyarrow as pa

    from train.export import ExportIntegrityError

    out = run(_cfg(world, tmp_path / "recs"))
    _, m1 = _read(out)
    for name in ("model.safetensors", "item_ids.parquet"):
        bad = tmp_path / f"final_{name}"
        shutil.copytree(world["final"], bad)
        f = bad / name
        if name == "model.safetensors":
            b = bytearray(f.read_bytes())
            b[-8:] = bytes(x ^ 0x55 for x in b[-8:])
            f.write_bytes(bytes(b))
        else:
            ids = pq.read_table(str(f)).column("item_id").to_pylist()
            pq.write_table(pa.table({"item_id": pa.array(ids[1:] + ids[:1], pa.string())}), str(f))
        with pytest.raises(ExportIntegrityError, match=f"{name}: sha256 differs"):
            run(_cfg(world, tmp_path / "recs", model_dir=str(bad)))
        assert _read(out)[1]["run_id"] == m1["run_id"]


def test_text_feature_cache_gives_the_same_table(world, tmp_path):
    """text_feature_cache: the second night reads every item's text features instead of encoding them, and
    writes the same table; the manifest counts the items that went through the encoder."""
    cache = tmp_path / "textcache"
    df0, man0 = _read(run(_cfg(world, tmp_path / "plain")))
    df1, man1 = _read(run(_cfg(world, tmp_path / "first", text_feature_cache=str(cache))))
    df2, man2 = _read(run(_cfg(world, tmp_path / "second", text_feature_cache=str(cache))))
    n = man0["catalogue"]["items"]
    assert man0["catalogue"]["items_text_encoded"] >= n and man1["catalogue"]["items_text_encoded"] >= n
    assert man2["catalogue"]["items_text_encoded"] == 0
    cols = ["user_id", "rank", "item_id", "score"]
    want = df0.sort_values(["user_id", "rank"])[cols].values.tolist()
    assert len(want) == 30 * K
    for df in (df1, df2):
        assert df.sort_values(["user_id", "rank"])[cols].values.tolist() == want


def test_cold_start_items_unavailable_and_int_ids(world, tmp_path):
    """Tonight's data has 6 new items (never seen by the model: scored from text) and 3 unavailable ones."""
    import datasets

    v2 = write_prepared(world["prepared_root"], num_users=30, num_items=46, cold_items=8, version="v2")
    items = datasets.load_from_disk(str(v2 / "items"))
    unavailable = {"i0", "i5", "i41"}
    items = items.map(lambda r: {"available": r["item_id"] not in unavailable})
    tmp_items = v2 / "items_new"
    items.save_to_disk(str(tmp_items))
    shutil.rmtree(v2 / "items")
    tmp_items.rename(v2 / "items")
    _fix_vocab_hash(v2)
    out = run(_cfg(world, tmp_path / "recs", prepared_dir=str(world["prepared_root"] / "v2"), k=45))
    df, man = _read(out)
    cat = man["catalogue"]
    assert cat["items"] == 46 and cat["items_known_to_model"] == 40 and cat["items_new_text_only"] == 6
    assert cat["items_unavailable"] == 3 and cat["candidates"] == 43
    assert not set(df["item_id"]) & unavailable
    new_items = {f"i{i}" for i in range(40, 46)} - unavailable
    assert new_items <= set(df["item_id"])  # k=45 > catalogue: every allowed new item appears for someone
    # each user gets every allowed item they have not seen: fewer than k rows
    assert man["counts"]["users_fewer_than_k"] == 30
    ref = _reference(world, v2, 45)
    for uid, g in df.groupby("user_id"):
        g = g.sort_values("rank")
        assert set(g["item_id"]) == set(ref[uid][0])
        np.testing.assert_allclose(g["score"].to_numpy(), ref[uid][1], rtol=1e-4, atol=1e-5)
    # a final without its item ids cannot be mapped onto another catalogue: a clear error, no table. Today's
    # exports list item_ids.parquet in export.json (the load itself refuses the folder); older ones did not
    bare = tmp_path / "final_without_ids"
    shutil.copytree(world["final"], bare)
    (bare / "item_ids.parquet").unlink()
    from train.export import ExportIntegrityError

    with pytest.raises(ExportIntegrityError, match="item_ids.parquet: missing"):
        run(_cfg(world, tmp_path / "recs2", model_dir=str(bare), prepared_dir=str(v2)))
    export = json.loads((bare / "export.json").read_text())
    del export["files_sha256"]  # an export written before item_ids.parquet and files_sha256 existed: refused by
    (bare / "export.json").write_text(json.dumps(export))  # name (no fallback to the training data's folder)
    with pytest.raises(ExportIntegrityError, match="item_ids.parquet: missing: this export has no item ids"):
        run(_cfg(world, tmp_path / "recs2", model_dir=str(bare), prepared_dir=str(v2)))
    assert not (tmp_path / "recs2" / f"dt={DATE}").exists()


def test_cold_item_ids_nearest_borrows_for_new_items(world, tmp_path):
    """cold_item_ids=nearest: the 6 new items borrow a warm item's id row; the table equals the brute-force
    ranking of the same model with borrow_cold_ids, and the manifest says how many borrowed."""
    v2 = world["prepared_root"] / "v2n"
    if not v2.is_dir():
        write_prepared(world["prepared_root"], num_users=30, num_items=46, cold_items=8, version="v2n")
        _fix_vocab_hash(v2)
    out = run(_cfg(world, tmp_path / "recs", prepared_dir=str(v2), k=10, cold_item_ids="nearest"))
    df, man = _read(out)
    assert man["catalogue"]["items_new_text_only"] == 6 and man["catalogue"]["items_borrowing_id_row"] == 6
    assert man["config"]["cold_item_ids"] == "nearest"
    ref, plain = _reference(world, v2, 10, borrow=True), _reference(world, v2, 10)
    assert any(ref[u][0] != plain[u][0] for u in ref)  # borrowing changes some lists
    for uid, g in df.groupby("user_id"):
        g = g.sort_values("rank")
        assert list(g["item_id"]) == ref[uid][0]
        np.testing.assert_allclose(g["score"].to_numpy(), ref[uid][1], rtol=1e-4, atol=1e-5)
    # a model without both id rows and text cannot borrow: a clear error, no table
    from train.export import export_final
    from train.model import RecModelConfig, SeqRecModel

    mcfg = RecModelConfig(num_items=40, num_event_types=2, item_tower="id", d_model=16, n_layers=1, n_heads=1, max_len=8)
    manifest = json.loads((world["v1"] / "manifest.json").read_text())
    export_final(tmp_path / "final_id", SeqRecModel(mcfg).state_dict(), mcfg, None, {"test": True}, manifest, {},
                 item_ids=[f"i{i}" for i in range(40)])
    with pytest.raises(InferenceError, match="cold_item_ids=nearest needs a hybrid"):
        run(_cfg(world, tmp_path / "recs_id", model_dir=str(tmp_path / "final_id"), cold_item_ids="nearest"))
    assert not (tmp_path / "recs_id" / f"dt={DATE}").exists()


def test_active_since_days_filters_users(world, tmp_path):
    # fixture timestamps are 1_700_000_000 (2023-11-14) + minutes: nobody is active within 10 days of DATE
    out = run(_cfg(world, tmp_path / "recs", active_since_days=10))
    _, man = _read(out)
    assert man["counts"]["users_inactive"] == 30 and man["counts"]["rows"] == 0
    out = run(_cfg(world, tmp_path / "recs", run_date="2023-11-20", active_since_days=7))
    _, man = _read(out)
    assert man["counts"]["users_inactive"] == 0 and man["counts"]["users_scored"] == 30


def test_lock_and_recovery(tmp_path):
    out = tmp_path / "recs"
    lock = DateLock(out, f"dt={DATE}")
    with pytest.raises(InferenceError, match="another inference run"):
        DateLock(out, f"dt={DATE}")
    lock.release()
    DateLock(out, f"dt={DATE}").release()
    # a kill between the two renames of a publish: no table, the old one aside -> put back, stale stage removed
    old = out / f".old-dt={DATE}-123-abcd"
    old.mkdir()
    (old / "_SUCCESS").write_text("")
    (out / f".stage-dt={DATE}-x").mkdir()
    notes = _recover_and_clean(out, f"dt={DATE}")
    assert (out / f"dt={DATE}" / "_SUCCESS").is_file()
    assert not old.exists() and not (out / f".stage-dt={DATE}-x").exists() and len(notes) == 2
    # a kill inside point_to leaves its new link unused: removed, and the run folder it points at is not touched
    run_folder = out / "_runs" / f"dt={DATE}" / "run=x"
    run_folder.mkdir(parents=True)
    (run_folder / "_SUCCESS").write_text("")
    os.symlink(f"_runs/dt={DATE}/run=x", out / f".tmp-dt={DATE}-1-ab")
    assert _recover_and_clean(out, f"dt={DATE}") == [f"removed stale .tmp-dt={DATE}-1-ab"]
    assert not os.path.lexists(out / f".tmp-dt={DATE}-1-ab") and (run_folder / "_SUCCESS").is_file()


def _cli(world, out, extra=(), env_extra=None, launcher=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
    args = [f"model_dir={world['final']}", f"prepared_dir={world['v1']}", f"output_dir={out}", f"run_date={DATE}", f"k={K}",
            "user_batch_size=7", *extra]
    cmd = (launcher or [sys.executable, "-m", "inference"]) + ["--config", str(ROOT / "configs/inference/ci.yaml"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after_first_batch", "after_part", "before_publish", "before_pointer"])
def test_kill9_leaves_old_table_and_rerun_completes(world, tmp_path, point):
    out = tmp_path / "recs"
    first = run(_cfg(world, out))
    _, m_old = _read(first)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    r = _cli(world, out, extra=["k=3"], env_extra={"LMREC_TEST_KILL_AT": point})
    assert r.returncode == -9, r.stderr[-2000:]
    # a reader still sees the whole old table, byte for byte
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert os.readlink(first) == m_old["run_dir"]
    # the killed run's leftovers: its staging folder, or (killed after placing it) a run folder nothing points at
    runs = out / "_runs" / f"dt={DATE}"
    if point == "before_pointer":
        assert len(list(runs.iterdir())) == 2
    else:
        assert any(p.name.startswith(f".stage-dt={DATE}-") for p in out.iterdir())
    run(_cfg(world, out, k=3))
    df, m_new = _read(first)
    assert m_new["k"] == 3 and len(df) == 30 * 3 and m_new["run_id"] != m_old["run_id"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".lock")) == ["_runs", f"dt={DATE}"]
    assert os.readlink(first) == m_new["run_dir"]


@pytest.mark.slow
def test_kill9_on_first_run_leaves_no_table(world, tmp_path):
    out = tmp_path / "recs"
    r = _cli(world, out, env_extra={"LMREC_TEST_KILL_AT": "before_publish"})
    assert r.returncode == -9, r.stderr[-2000:]
    assert not (out / f"dt={DATE}").exists()
    r = _cli(world, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / f"dt={DATE}" / "_SUCCESS").is_file()
    assert "[recommend]" in r.stderr and "published" in r.stdout


@pytest.mark.slow
def test_two_processes_equal_one(world, tmp_path):
    one = run(_cfg(world, tmp_path / "one"))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "inference"]
    r = _cli(world, tmp_path / "two", launcher=launcher, env_extra={"ACCELERATE_USE_CPU": "true", "MASTER_PORT": "29731"})
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two" / f"dt={DATE}"
    df2, m2 = _read(two)
    assert m2["world_size"] == 2 and [p["file"] for p in m2["parts"]] == [f"part-0000{r}-{m2['run_id']}.parquet" for r in (0, 1)]
    assert all(p["users"] > 0 for p in m2["parts"])
    df1, _ = _read(one)
    key = ["user_id", "rank"]
    a, b = df1.sort_values(key).reset_index(drop=True), df2.sort_values(key).reset_index(drop=True)
    assert a["item_id"].tolist() == b["item_id"].tolist()
    np.testing.assert_allclose(a["score"], b["score"], rtol=1e-5, atol=1e-6)


def test_bucketed_user_vectors_equal_full_width(world):
    """Trimming left padding per length bucket gives the same user vectors as the full window."""
    from data_prep.schema import load_prepared
    from inference.run import user_vectors_bucketed
    from train.catalogue import Catalogue
    from train.export import load_final

    model, _ = load_final(world["final"])
    cat = Catalogue.build(load_prepared(world["v1"]).items, model)
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([1, 8, 3, 5, 2, 8, 4, 7, 6])
    hist = torch.full((9, 8), -1, dtype=torch.long)
    et = torch.zeros((9, 8), dtype=torch.long)
    for b, n in enumerate(lens.tolist()):
        hist[b, 8 - n:] = torch.randint(0, 40, (n,), generator=g)
        et[b, 8 - n:] = torch.randint(0, 2, (n,), generator=g)
    with torch.inference_mode():
        V = cat.item_vectors(model)  # the encoded catalogue, which inference gathers history items from
        full = model.user_vectors(hist, et, catalogue=cat)
        bucketed = user_vectors_bucketed(model, hist, et, torch.device("cpu"), buckets=3, item_table=V)
        one = user_vectors_bucketed(model, hist, et, torch.device("cpu"), buckets=1, item_table=V)  # the GPU's setting
        short = user_vectors_bucketed(model, hist[lens < 8], et[lens < 8], torch.device("cpu"), buckets=1,
                                      item_table=V)  # trimmed to 7
    torch.testing.assert_close(bucketed, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(short, full[lens < 8], rtol=1e-5, atol=1e-5)


def test_bfloat16_scoring_close_to_float32(world, tmp_path):
    """score_dtype=bfloat16 (meant for GPU tensor cores) gives a complete table whose scores agree
    with float32 to bf16 precision for the items both lists hold."""
    a = run(_cfg(world, tmp_path / "f32"))
    b = run(_cfg(world, tmp_path / "bf16", score_dtype="bfloat16"))
    da, _ = _read(a)
    db, mb = _read(b)
    assert mb["counts"]["rows"] == len(da) and mb["config"]["score_dtype"] == "bfloat16"
    m = da.merge(db, on=["user_id", "item_id"], suffixes=("_a", "_b"))
    assert len(m) >= 0.6 * len(da)  # near-ties may swap across the K-th place
    np.testing.assert_allclose(m["score_a"], m["score_b"], rtol=0.05, atol=0.05)
