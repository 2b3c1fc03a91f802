"""engine: spark (data_prep/spark_engine.py) against the local engine: on the same dirty logs both publish the same
prepared/<version>/ (sequences, items, serving, quarantine rows in the same order, manifest counts and vocabularies).

    python -m pytest tests/test_data_prep_spark.py -q       # ~1-2 min on 2 cores; skipped without pyspark or Java

One Spark session (local[2]) for the module; data_prep joins it instead of starting its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import synthetic
from data_prep.config import DataPrepConfig
from data_prep.forget import record_requests
from data_prep.pipeline import run
from data_prep.schema import DataPrepError
from data_prep.spark_engine import unavailable_reason
from lmrec_common.config import load_config
from test_data_prep import T0, check_identity, events_table

ROOT = Path(__file__).resolve().parent.parent
ENV = "LMREC_SPARK_TEST_USER_KEY"  # set before the session starts: executors read the key from their environment
KEY = "spark-test-key-" + "7c" * 16
WHY = unavailable_reason()


def needs_spark(fn):
    """Marked ``spark`` and skipped, with the reason, where pyspark or Java 17+ is missing."""
    return pytest.mark.spark(pytest.mark.skipif(WHY is not None, reason=f"Spark unavailable: {WHY}")(fn))


# manifest fields that must agree between the engines (the rest names the run: version, paths, times, engine)
SAME_MANIFEST = ["kind", "schema_version", "counts", "event_types", "user_id_type", "item_id_type", "vocab", "num_shards",
                 "split", "timestamp_bounds", "quarantine_check_order", "tokenizer"]


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    if WHY is not None:
        pytest.skip(f"Spark unavailable: {WHY}")
    from pyspark.sql import SparkSession

    os.environ[ENV] = KEY
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # Python workers: this interpreter (pyarrow, lmrec)
    s = (SparkSession.builder.master("local[2]").appName("lmrec-tests")
         .config("spark.local.dir", str(tmp_path_factory.mktemp("spark-local")))
         .config("spark.sql.shuffle.partitions", "4")
         .config("spark.default.parallelism", "2")
         .config("spark.ui.enabled", "false")
         .config("spark.ui.showConsoleProgress", "false")
         .config("spark.driver.host", "127.0.0.1")
         .getOrCreate())
    s.sparkContext.setLogLevel("ERROR")
    yield s
    s.stop()
    os.environ.pop(ENV, None)


def cfg_for(raw: Path, out: Path, **over) -> DataPrepConfig:
    ov = {"events_path": str(raw / "events"), "items_path": str(raw / "items"), "output_dir": str(out), "num_shards": 2,
          "num_proc": 1, "item_text_template": "{title}", "max_quarantined_share": 1}
    ov.update(over)
    return load_config(DataPrepConfig, None, [f"{k}={v}" for k, v in ov.items()])


def write(raw: Path, rel: str, t: pa.Table) -> None:
    p = raw / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, p)


def table(path: Path) -> pa.Table:
    import datasets

    return datasets.load_from_disk(str(path)).data.table.combine_chunks()


def assert_same(v_local: Path, v_spark: Path) -> dict:
    """Both versions hold the same contract; returns the local manifest."""
    ml, ms = (json.loads((v / "manifest.json").read_text()) for v in (v_local, v_spark))
    # texts_tokenized says how many texts this output_dir's token cache lacked: a property of the run, not the data
    for m in (ml, ms):
        m["counts"].pop("texts_tokenized")
    for k in SAME_MANIFEST:
        assert ml[k] == ms[k], f"manifest {k}: local {ml[k]} != spark {ms[k]}"
    assert ml["inputs"] == ms["inputs"]
    # the reason of a skipped file quotes the reader's own error (HF Datasets' locally, pyarrow's on Spark)
    assert [{k: v for k, v in f.items() if k != "reason"} for f in ml["skipped_files"]] == \
        [{k: v for k, v in f.items() if k != "reason"} for f in ms["skipped_files"]]
    assert (ml["pseudonymization"].get("key_fingerprint"), ml["forget"]["users_sha256"], ml["forget"]["events_forgotten"]) == \
        (ms["pseudonymization"].get("key_fingerprint"), ms["forget"]["users_sha256"], ms["forget"]["events_forgotten"])
    assert ml["engine"] == {"name": "local"} and ms["engine"]["name"] == "spark" and ms["config"]["engine"] == "spark"
    check_identity(ms)
    for part in ("items", "sequences", "serving"):
        a, b = table(v_local / part), table(v_spark / part)
        assert a.schema == b.schema, part
        assert a.equals(b), f"{part}/ differs"
        assert sorted(p.name for p in (v_local / part).glob("*.arrow")) == sorted(p.name for p in (v_spark / part).glob("*.arrow"))
    for q in ("events", "items"):
        a, b = (pq.read_table(v / "quarantine" / f"{q}.parquet") for v in (v_local, v_spark))
        assert a.schema == b.schema and a.equals(b), f"quarantine/{q}.parquet differs"  # same rows, same order
    return ml


def both(raw: Path, tmp: Path, name: str, **over) -> tuple[Path, Path]:
    v_local = run(cfg_for(raw, tmp / f"{name}-local", **over))
    v_spark = run(cfg_for(raw, tmp / f"{name}-spark", engine="spark", **over))
    return v_local, v_spark


@pytest.fixture(scope="module")
def dirty_raw(tmp_path_factory) -> Path:
    """The synthetic generator's dirty log (null ids, duplicates, epoch 0 / year 2100, unknown items and event types,
    a file of unparsable string timestamps, a dirty catalogue; int ids, Parquet timestamp[ms]) plus a file of hand-made
    cases: equal timestamps within and across files, duplicates across files, single-event users, a user whose only
    events are on items missing from the catalogue, ids 9 < 10 < 100 (numeric order), epoch seconds (unit detection)."""
    raw = tmp_path_factory.mktemp("dirty") / "raw"
    synthetic.generate(raw, synthetic.config(n_users=150, n_items=80, n_events=2400, n_days=3, n_topics=4, dirty=True,
                                             dirty_frac=0.01, min_user_events=1, max_user_events=200, seed=3))
    day = sorted(p.name for p in (raw / "events").iterdir())[-1]
    t0 = int(pq.read_table(next((raw / "events" / day).glob("part-00000.parquet"))).column("timestamp")[0].as_py().timestamp())
    rows = [(1009, 1, t0, "view"), (1009, 2, t0, "click"), (1009, 3, t0, "view"),  # a tie of three, in row order
            (1010, 4, t0 + 5, "view"), (1010, 4, t0 + 5, "view"), (1010, 5, t0 + 5, "view"),  # duplicate + tie
            (1100, 6, t0 + 1, "view"),  # single event
            (1101, 99_999, t0 + 2, "view"), (1101, 99_998, t0 + 3, "cart"),  # only items missing from the catalogue
            (1102, 7, t0 + 4, "purchase"), (1102, 99_997, t0 + 9, "view"),  # one usable event + one unknown item
            (1009, 2, t0 - 7, "teleport"), (None, 3, t0, "view"), (1010, None, t0, "view"), (1009, 8, 5, "view")]
    write(raw, f"events/{day}/part-00002.parquet", events_table(rows))
    # a later file: a duplicate of an earlier file's row, a tie with earlier files' rows, a single-event user
    write(raw, "events/dt=9999-12-31/late.parquet", events_table([(1009, 1, t0, "view"), (1010, 6, t0 + 5, "view"), (1103, 6, t0, "view")]))
    return raw


@needs_spark
def test_dirty_synthetic_log_same_contract(spark, dirty_raw, tmp_path):
    v_local, v_spark = both(dirty_raw, tmp_path, "dirty")
    m = assert_same(v_local, v_spark)
    c = m["counts"]
    # the log really is dirty: every event quarantine reason the local engine has occurs, and users are filtered
    assert all(c["events_quarantined"][r] > 0 for r in ("null_user_id", "null_item_id", "bad_timestamp", "timestamp_out_of_range",
                                                        "unknown_event_type", "item_not_in_catalogue", "duplicate")), c["events_quarantined"]
    assert c["events_filtered"]["single_event"] > 0 and c["serving_only_users"]["items_not_in_catalogue"] == 1
    assert m["user_id_type"] == "int64"
    seq = {r["user_id"]: r for r in table(v_spark / "sequences").to_pylist()}
    # ties are broken by (timestamp, file, row); the later file's copy of (1009, 1, t0) is a duplicate
    assert seq["1009"]["item_idx"] == [0, 1, 2] and len(set(seq["1009"]["timestamp"])) == 1
    assert seq["1010"]["item_idx"] == [3, 4, 5] and seq["1010"]["event_type"][0] == m["event_types"].index("view")


@needs_spark
def test_string_ids_pseudonyms_forget_time_split(spark, tmp_path, monkeypatch):
    """String ids with whitespace, leading zeros and latin-1 bytes under trim_zeros, ISO/epoch string timestamps with
    bad ones, event types in odd case and null, unknown items kept, split=time, duplicates across files, user ids
    pseudonymised (the key read from the executors' environment) and a forget request: the same contract again."""
    monkeypatch.setenv(ENV, KEY)
    raw = tmp_path / "raw"
    users = [b" 007", b"7", b"J\xfcrgen", b"J\xfcrgen", b"u1", b"u1 ", b"u1", b"u2", b"u2", b"u2", b"", b"u3", b"u3", b"u3", b"u4", b"u4"]
    items = ["a", "b", "c", "a", "0042", "42", "zz-new", "b", "b", "c", "a", "a", "b", "zz-new", "a", "c"]
    ts = ["2026-11-24T10:00:00Z", "2026-11-24 10:00:00", "1764000000", "2026-11-25T09:00:00+02:00", "not a time", "2026-11-26",
          "2026-11-26", "2026-11-24T00:00:00Z", "2026-11-24T00:00:00Z", "2026-11-26T08:00:00Z", "2026-11-24", "2026-11-23",
          "2026-11-24 12:00", "2026-11-26 01:00", "2026-11-22", "2026-11-26 03:00"]
    et = ["VIEW ", "click", None, "cart", "view", "view", "view", "view", "view", "purchase", "view", "view", "Click", "view", "view", "cart"]
    t = pa.table({"user_id": pa.array(users, pa.binary()), "item_id": items, "timestamp": ts, "event_type": et})
    write(raw, "events/dt=2026-11-24/part-0.parquet", t)
    write(raw, "events/dt=2026-11-25/part-0.parquet", t.slice(7, 5))  # again: duplicates of another file's rows
    write(raw, "items/items.parquet", pa.table({"item_id": ["a", "b", "c", "42", " b", None], "title": ["A", "B &amp; C", None, "Forty", "dup?", "x"]}))
    over = {"id_normalization": "trim_zeros", "unknown_items": "keep", "split": "time", "time_cutoff": "2026-11-26", "num_shards": 1,
            "pseudonymize_user_ids_key_env": ENV}
    first = run(cfg_for(raw, tmp_path / "s-local", **over))
    (tmp_path / "ids.txt").write_text("7\nu3\n")  # raw ids, as the events have them (" 007" is user 7 under trim_zeros)
    record_requests(tmp_path / "s-local", tmp_path / "ids.txt", reason="test")
    (tmp_path / "s-spark" / "forget").mkdir(parents=True)
    (tmp_path / "s-spark" / "forget" / "requests.parquet").write_bytes((tmp_path / "s-local" / "forget" / "requests.parquet").read_bytes())
    v_local = run(cfg_for(raw, tmp_path / "s-local", **over))
    v_spark = run(cfg_for(raw, tmp_path / "s-spark", engine="spark", **over))
    assert v_local != first
    m = assert_same(v_local, v_spark)
    c = m["counts"]
    assert m["user_id_type"] == "string" and m["pseudonymization"]["enabled"] and c["ids_decoded_latin1"] > 0
    assert c["items_not_in_catalogue_kept"] == 1 and c["events_quarantined"]["duplicate"] > 0 and c["events_quarantined"]["bad_timestamp"] == 1
    assert c["ids_whitespace_events"] > 0 and c["ids_leading_zero_events"] > 0
    assert c["users_forgotten"] == 2 and c["events_filtered"]["forgotten"] == 6  # 2 of user 7, 4 of u3 (one in each file's copy)
    assert not list((tmp_path / "s-spark" / "_cache").glob("spark-*"))  # no scratch folder left behind


@needs_spark
def test_bad_files_same_rules(spark, tmp_path):
    """A file whose footer reads but whose pages do not (caught on the executor): skipped and listed under
    on_bad_file=skip, one error naming it otherwise; a uint64 id beyond int64: the local engine's error, word for word."""
    raw = tmp_path / "raw"
    write(raw, "events/a.parquet", events_table([(u, 1 + (u + k) % 5, T0 + k, "view") for u in range(1, 6) for k in range(3)]))
    n = 2000
    bad = pa.table({"user_id": pa.array(np.arange(n) % 50, pa.int64()), "item_id": pa.array(np.arange(n) % 5 + 1, pa.int64()),
                    "timestamp": pa.array(T0 + np.arange(n), pa.int64()), "event_type": ["view"] * n})
    pq.write_table(bad, raw / "events" / "b.parquet", compression="snappy")
    b = bytearray((raw / "events" / "b.parquet").read_bytes())
    for i in range(40, 400):  # inside the first data pages; the footer stays readable
        b[i] ^= 0x5A
    (raw / "events" / "b.parquet").write_bytes(bytes(b))
    write(raw, "items/items.parquet", pa.table({"item_id": [1, 2, 3, 4, 5], "title": ["a", "b", "c", "d", "e"]}))
    v_local, v_spark = both(raw, tmp_path, "skip", on_bad_file="skip", num_shards=1)
    m = assert_same(v_local, v_spark)
    assert [Path(f["path"]).name for f in m["skipped_files"]] == ["b.parquet"]
    for engine in ("local", "spark"):
        with pytest.raises(DataPrepError, match=r"b\.parquet: cannot read \(corrupt or truncated Parquet\?\)"):
            run(cfg_for(raw, tmp_path / f"err-{engine}", engine=engine, num_shards=1))
    (raw / "events" / "b.parquet").unlink()
    write(raw, "events/c.parquet", events_table([(1, 1, T0, "view")]).set_column(0, "user_id", pa.array([2**63 + 5], pa.uint64())))
    errors = []
    for engine in ("local", "spark"):
        with pytest.raises(DataPrepError) as e:
            run(cfg_for(raw, tmp_path / f"u64-{engine}", engine=engine, num_shards=1))
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "overflow int64" in errors[0]


def test_engine_spark_without_java_is_one_error_line(tmp_path):
    """No Java (or no pyspark): `engine: spark` stops at once with one line saying what to install; nothing written."""
    raw = tmp_path / "raw"
    write(raw, "events/a.parquet", events_table([(1, 1, T0, "view"), (1, 2, T0 + 1, "view")]))
    write(raw, "items/items.parquet", pa.table({"item_id": [1, 2], "title": ["a", "b"]}))
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"}
    env["PATH"] = os.path.dirname(sys.executable)  # python, but no java
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "data_prep", f"events_path={raw / 'events'}", f"items_path={raw / 'items'}",
                        f"output_dir={out}", "engine=spark"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: engine=spark needs") and "lmrec[spark]" in lines[0], p.stderr
    assert not out.exists()


def test_unknown_engine_is_refused():
    with pytest.raises(Exception, match="engine"):
        load_config(DataPrepConfig, None, ["engine=dask"])


def test_missing_pyspark_message(monkeypatch):
    import importlib.util

    from data_prep import spark_engine

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyspark" else real(name, *a))
    why = spark_engine.unavailable_reason()
    assert why.startswith("engine=spark needs pyspark") and "pip install 'lmrec[spark]'" in why
    with pytest.raises(DataPrepError, match="needs pyspark"):
        spark_engine.SparkEngine(DataPrepConfig(engine="spark"))
