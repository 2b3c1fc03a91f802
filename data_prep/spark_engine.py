"""data_prep's global part on Apache Spark (``engine: spark``; docs/SPARK.md).

    python -m data_prep --config configs/data_prep/sample.yaml engine=spark                           # local[2]
    python -m data_prep --config configs/data_prep/<job>.yaml engine=spark spark_master=spark://head:7077
    sbatch --nodes=4 launch/slurm/data_prep_spark.sh configs/data_prep/<job>.yaml    # a Spark cluster inside a SLURM job

Where what runs. The driver (this process) lists and fingerprints the inputs, checks their schemas, reads the
catalogue, tokenizes each distinct item text once (HF tokenizers, cached) and writes and publishes prepared/<version>/
with the local engine's code (pipeline.py). Spark runs what grows with the raw log:

1. validation: one task per events file reads it with pyarrow on the executor and runs data_prep.validate's
   ``validate_batch`` over its batches, the very function of the local engine (same reasons, counts, normalised ids,
   pseudonyms, epoch-unit detection per file); rows of users in the forget ledger are dropped there too;
2. item codes (a join with the item vocabulary), ``item_not_in_catalogue``, dedup (the first of equal
   (user, item, timestamp, event_type) in (file, row) order is kept: ``row_number`` over that window);
3. per-user histories: ``collect_list`` of (timestamp, file, row, item, type) structs sorted by ``sort_array``
   (collect_list alone keeps no order): the local engine's (timestamp, source file, row) order, ties included;
4. the original values of the rows quarantined in 2, re-read from their files on the executors.

The driver collects one row per user (the history) and the quarantined rows (``toArrow``), orders users with
``sequences.sorted_vocab`` and hands the same arrays as the local engine's global stage to pipeline.py, which does the
single-event filter, serving/, splits, counts and the write. So the driver needs memory for the OUTPUT (about 13 bytes
per kept event plus the ids and the quarantine), not for the raw log, its strings, duplicates and bad rows.

Executors need the driver's Python environment with lmrec importable (a venv on a shared filesystem) and read access
to the input files by the same paths; with ``pseudonymize_user_ids_key_env`` the key's variable must be set in their
environment too (it is read there, never shipped in a task).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep import sequences as seq
from data_prep.config import DataPrepConfig
from data_prep.inputs import InputFile, check_id_values
from data_prep.pseudonym import Pseudonymizer, load_key
from data_prep.schema import EVENT_QUARANTINE_REASONS, QUARANTINE_EVENT_COLUMNS, DataPrepError
from data_prep.validate import ValidationSpec, normalize_ids, validate_batch
from lmrec_common.log import fmt_count, print0, verbose

MIN_JAVA = 17  # Spark 4 runs on Java 17 and 21
INSTALL_HINT = "pip install 'lmrec[spark]' and a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless), or set engine=local"

# One output row per kept event (kind 0), quarantined row (kind 1) or file (kind 2: its meta.json as the local engine
# writes it, or {"error": ...}): mapInArrow returns one schema.
KIND_KEPT, KIND_QUARANTINE, KIND_META = 0, 1, 2
Q_COLS = ["q_user_id", "q_item_id", "q_timestamp", "q_event_type", "q_value", "source_file", "reason"]
VALIDATED_DDL = ("kind byte, file_idx int, row long, user_id string, item_id string, ts long, etype byte, "
                 + ", ".join(f"{c} string" for c in Q_COLS) + ", meta string")
_OUT_TYPES = {"kind": pa.int8(), "file_idx": pa.int32(), "row": pa.int64(), "user_id": pa.string(), "item_id": pa.string(),
              "ts": pa.int64(), "etype": pa.int8(), **{c: pa.string() for c in Q_COLS}, "meta": pa.string()}
OUT_SCHEMA = pa.schema(list(_OUT_TYPES.items()))
# quarantine file columns <- validated columns
_Q_RENAME = dict(zip(QUARANTINE_EVENT_COLUMNS[:5], Q_COLS[:5]))
LATE_DDL = "phase byte, file_idx int, " + ", ".join(f"{c} string" for c in QUARANTINE_EVENT_COLUMNS[:6]) + ", source_row long, reason string"
LATE_SCHEMA = pa.schema([("phase", pa.int8()), ("file_idx", pa.int32())] + [(c, pa.string()) for c in QUARANTINE_EVENT_COLUMNS[:6]]
                        + [("source_row", pa.int64()), ("reason", pa.string())])


def _log(msg: str) -> None:
    print0(f"[data_prep] {msg}")


# ----------------------------------------------------------------------------- availability


def java_executable() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and Path(home, "bin", "java").is_file():
        return str(Path(home, "bin", "java"))
    return shutil.which("java")


def java_major(java: str) -> int | None:
    """17 for 'openjdk version "17.0.15"', 8 for '"1.8.0_392"'; None when it cannot be told."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def unavailable_reason() -> str | None:
    """Why engine=spark cannot run here (one line), or None. Also what the tests skip on."""
    if importlib.util.find_spec("pyspark") is None:
        return f"engine=spark needs pyspark, which is not installed: {INSTALL_HINT}"
    java = java_executable()
    if java is None:
        return f"engine=spark needs Java {MIN_JAVA}+ and finds none (no java on PATH, JAVA_HOME unset): {INSTALL_HINT}"
    major = java_major(java)
    if major is not None and major < MIN_JAVA:
        return f"engine=spark needs Java {MIN_JAVA}+, {java} is Java {major}: install openjdk-17-jre-headless or point JAVA_HOME at a newer one"
    return None


# ----------------------------------------------------------------------------- executor side (pickled by reference)


def _executor_pz(key_env: str, fingerprint: str) -> Pseudonymizer | None:
    if not key_env:
        return None
    pz = Pseudonymizer(key_env, load_key(key_env, f"Spark executor on {socket.gethostname()}"))
    if pz.fingerprint != fingerprint:
        raise DataPrepError(f"Spark executor on {socket.gethostname()}: the key in {key_env} has fingerprint {pz.fingerprint}, "
                            f"the driver's has {fingerprint}: set the same key on every node")
    return pz


def _batch(kind: int, file_idx: int, n: int, cols: dict) -> pa.RecordBatch:
    arrays = []
    for name, t in _OUT_TYPES.items():
        if name == "kind":
            arrays.append(pa.array(np.full(n, kind, np.int8)))
        elif name == "file_idx":
            arrays.append(pa.array(np.full(n, file_idx, np.int32)))
        elif name in cols:
            arrays.append(pa.array(cols[name], t) if not isinstance(cols[name], (pa.Array, pa.ChunkedArray)) else cols[name].cast(t))
        else:
            arrays.append(pa.nulls(n, t))
    arrays = [a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in arrays]
    return pa.RecordBatch.from_arrays(arrays, schema=OUT_SCHEMA)


def _meta_batch(file_idx: int, meta: dict) -> pa.RecordBatch:
    return _batch(KIND_META, file_idx, 1, {"meta": [json.dumps(meta)]})


def _validate_file(file_idx: int, path: str, task: dict, cfg: DataPrepConfig, forget_ids: pa.Array | None, forget_sha: str,
                   pz: Pseudonymizer | None):
    """One events file -> batches of kept rows, quarantined rows and, last, its meta: what pipeline._validate_file
    (+ forget_in_entry) writes into a cache entry, computed with the same functions."""
    from data_prep.pipeline import KEPT_COLUMNS, _id_flag_counts, _quarantine_rows, _user_key, with_detected_unit

    t0 = time.time()
    spec = ValidationSpec(**{**task["spec"], "event_types": tuple(task["spec"]["event_types"])})
    cols = task["columns"]
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        for c in (spec.user_col, spec.item_col):
            if pa.types.is_uint64(schema.field(c).type):
                check_id_values(pf.read(columns=[c]).column(c), Path(path), c, "events")
        if spec.ts_kind in ("number", "string") and cfg.timestamp_unit == "auto" and task["rows"]:
            spec = with_detected_unit(spec, pf.read(columns=[spec.ts_col]).column(spec.ts_col))
        batches = pf.iter_batches(batch_size=cfg.batch_size, columns=cols)
    except DataPrepError:
        raise
    except Exception as e:  # corrupt pages behind a valid footer: the local engine's message and on_bad_file rule
        raise _CannotRead(f"events file {path}: cannot read (corrupt or truncated Parquet?): {e}") from None
    user_key = pz.key if pz is not None else None
    quarantined: dict[str, int] = {}
    n_kept = latin1 = ws = zero = forgotten = 0
    example_row = None
    forgotten_users: set[str] = set()
    first = 0
    q_mode = cfg.id_normalization if pz is None else "exact"  # forget_in_entry's rule for quarantined raw ids
    while True:
        try:
            rb = next(batches, None)
        except Exception as e:
            raise _CannotRead(f"events file {path}: cannot read (corrupt or truncated Parquet?): {e}") from None
        if rb is None:
            break
        src = pa.Table.from_batches([rb])
        val = validate_batch(src, first, spec, user_key)
        ok = pc.is_null(val.column("reason"))
        kept = val.filter(ok).select(KEPT_COLUMNS)
        bad = val.filter(pc.invert(ok))
        rows = bad.column("row").combine_chunks()
        q = _quarantine_rows(src.take(pc.subtract(rows, first)), rows.to_numpy(zero_copy_only=False),
                             bad.column("reason").combine_chunks(), path, cfg, spec, pz)
        latin1 += int(pc.sum(val.column("n_decoded_latin1")).as_py() or 0)
        fl = _id_flag_counts(val)
        ws += fl["ids_whitespace"]
        zero += fl["ids_leading_zero"]
        if example_row is None and "ids_example_row" in fl:
            example_row = fl["ids_example_row"]
        if forget_ids is not None:
            dk = pc.is_in(kept.column("user_id"), value_set=forget_ids).fill_null(False)
            qu = q.column("user_id").combine_chunks()
            dq = pc.is_in(normalize_ids(qu, q_mode)[0] if q_mode != "exact" else qu, value_set=forget_ids).fill_null(False)
            gone = pa.chunked_array([kept.column("user_id").filter(dk), q.column("user_id").filter(dq)], pa.string()).combine_chunks()
            if len(gone):
                forgotten += len(gone)
                forgotten_users |= {_user_key(u) for u in pc.unique(gone).to_pylist()}
                kept = kept.filter(pc.invert(dk))
                q = q.filter(pc.invert(dq))
        for d in (pc.value_counts(q.column("reason").combine_chunks()).to_pylist() if q.num_rows else []):
            quarantined[d["values"]] = quarantined.get(d["values"], 0) + d["counts"]
        n_kept += kept.num_rows
        if kept.num_rows:
            yield _batch(KIND_KEPT, file_idx, kept.num_rows, {c: kept.column(c) for c in ("user_id", "item_id", "ts", "etype", "row")})
        if q.num_rows:
            yield _batch(KIND_QUARANTINE, file_idx, q.num_rows, {"row": q.column("source_row"), "source_file": q.column("source_file"),
                                                                 "reason": q.column("reason"),
                                                                 **{_Q_RENAME[c]: q.column(c) for c in _Q_RENAME}})
        first += rb.num_rows
    meta = {"rows": task["rows"], "kept": n_kept, "quarantined": quarantined, "decoded_latin1": latin1,
            "ids_whitespace": ws, "ids_leading_zero": zero, **({"ids_example_row": example_row} if example_row is not None else {}),
            "id_kinds": task["kinds"], "ts_unit": spec.ts_unit if spec.ts_kind in ("number", "string") else spec.ts_kind,
            "seconds": round(time.time() - t0, 3)}
    if forget_ids is not None:
        meta["forget_applied"] = forget_sha
        if forgotten:
            meta.update(forgotten_events=forgotten, forgotten_users=sorted(forgotten_users))
    if first != task["rows"]:  # the footer promised another row count: a damaged file
        raise _CannotRead(f"events file {path}: cannot read (corrupt or truncated Parquet?): read {first} rows, its footer says {task['rows']}")
    yield _meta_batch(file_idx, meta)


class _CannotRead(DataPrepError):
    """An unreadable file: skipped under on_bad_file=skip, as in the local engine."""


def validate_partition(batches, cfg: DataPrepConfig, forget_ids, forget_sha: str, key_env: str, fingerprint: str):
    """mapInArrow function: rows (file_idx, path, task JSON) -> OUT_SCHEMA batches. An error becomes the file's meta
    {"error": ..., "cannot_read": bool} (the driver raises it as one line, or skips the file), never a Python traceback
    inside a Spark stack trace."""
    for b in batches:
        for file_idx, path, task in zip(b.column("file_idx").to_pylist(), b.column("path").to_pylist(), b.column("task").to_pylist()):
            try:
                pz = _executor_pz(key_env, fingerprint)
                yield from _validate_file(file_idx, path, json.loads(task), cfg, forget_ids, forget_sha, pz)
            except DataPrepError as e:
                yield _meta_batch(file_idx, {"error": str(e), "cannot_read": isinstance(e, _CannotRead)})


def reread_partition(batches, cfg: DataPrepConfig, files: dict, key_env: str, fingerprint: str):
    """mapInArrow function: rows (phase, file_idx, row, reason) quarantined at the global stage -> their original values
    re-read from the source file (pipeline._reread_quarantine on the executors), LATE_SCHEMA batches."""
    from data_prep.pipeline import _quarantine_rows

    batches = [b for b in batches if b.num_rows]
    if not batches:  # a partition without late rows
        return
    t = pa.Table.from_batches(batches)
    pz = _executor_pz(key_env, fingerprint)
    fidx = t.column("file_idx").to_numpy()
    for f in np.unique(fidx):
        sub = t.filter(pa.array(fidx == f))
        path, task = files[int(f)]
        spec = ValidationSpec(**{**task["spec"], "event_types": tuple(task["spec"]["event_types"])})
        rows = sub.column("row").to_numpy()
        src = pq.read_table(path, columns=task["columns"]).take(pa.array(rows))
        q = _quarantine_rows(src, rows, sub.column("reason").combine_chunks(), path, cfg, spec, pz)
        n = q.num_rows
        yield pa.RecordBatch.from_arrays([sub.column("phase").combine_chunks().cast(pa.int8()), pa.array(np.full(n, f, np.int32))]
                                         + [q.column(c).combine_chunks() for c in LATE_SCHEMA.names[2:]], schema=LATE_SCHEMA)


# ----------------------------------------------------------------------------- driver side


def _spark_error(e: BaseException) -> DataPrepError:
    """A failed Spark job -> one line: the DataPrepError an executor raised, else the exception's first line."""
    text = str(e)
    m = re.search(r"DataPrepError: (.+)", text)
    if m:
        return DataPrepError(m.group(1).strip())
    # a Python worker's traceback ends with "SomeError: what": that line says more than Spark's wrapper text
    errs = re.findall(r"^(\w+(?:Error|Exception)\b.*)$", text, flags=re.M)
    what = errs[-1] if errs else next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return DataPrepError(f"engine=spark: a Spark job failed: {what.strip()[:500]} (LMREC_TRACEBACK=1 shows the whole trace)")


class SparkEngine:
    """``engine: spark`` for one data_prep run: checks pyspark and Java at construction (before anything is written),
    starts (or joins) a Spark session on first use and, as a context manager, stops the session it started."""

    def __init__(self, cfg: DataPrepConfig):
        why = unavailable_reason()
        if why:
            raise DataPrepError(why)
        self.cfg = cfg
        self.spark = None
        self.owned = False
        self.scratch: Path | None = None
        self._persisted: list = []
        self._validated = None
        self._tasks: dict[int, tuple[str, dict]] = {}

    def __enter__(self) -> SparkEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- session
    def session(self):
        if self.spark is None:
            self._start()
        return self.spark

    def _start(self) -> None:
        from pyspark.sql import SparkSession

        active = SparkSession.getActiveSession()
        if active is not None:  # a session this process already runs (tests, a notebook, spark-submit's): join it
            self.spark, self.owned = active, False
            _log(f"spark: joined the running session (master {active.sparkContext.master}, Spark {active.version})")
            return
        under_submit = "PYSPARK_GATEWAY_PORT" in os.environ  # spark-submit started this process: its --master wins
        master = self.cfg.spark_master or (None if under_submit else "local[2]")
        b = SparkSession.builder.appName("lmrec data_prep")
        if master:
            b = b.master(master)
        if master and master.startswith("local"):
            # shuffle and spill files hold raw ids: keep them under output_dir/_cache (removed at the end; a killed run's
            # by the next run, pipeline.clean_killed_runs)
            self.scratch = Path(self.cfg.output_dir).expanduser().resolve() / "_cache" / f"spark-{os.getpid()}"
            self.scratch.mkdir(parents=True, exist_ok=True)
            b = b.config("spark.local.dir", str(self.scratch)).config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
        if not under_submit and "PYSPARK_PYTHON" not in os.environ:
            # Python workers run this interpreter (a shared venv on a cluster); pyspark reads the variable, not a conf
            os.environ["PYSPARK_PYTHON"] = sys.executable
        # the driver collects the prepared output (one row per user) by design: no 1 GiB cap on collected results
        b = b.config("spark.ui.showConsoleProgress", "false").config("spark.sql.session.timeZone", "UTC").config("spark.driver.maxResultSize", "0")
        t0 = time.time()
        try:
            self.spark = b.getOrCreate()
        except Exception as e:
            raise DataPrepError(f"engine=spark: cannot start Spark (master {master or 'from spark-submit'}): "
                                f"{next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)}") from None
        self.owned = True
        self.spark.sparkContext.setLogLevel("ERROR")
        sc = self.spark.sparkContext
        _log(f"spark: started master {sc.master} (Spark {self.spark.version}, default parallelism {sc.defaultParallelism}) in {time.time() - t0:.1f}s")

    def close(self) -> None:
        for df in self._persisted:
            try:
                df.unpersist()
            except Exception:  # a session already gone: nothing left to free
                pass
        self._persisted = []
        if self.spark is not None and self.owned:
            self.spark.stop()
        self.spark = None
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def manifest_entry(self) -> dict:
        if self.spark is None:
            return {"name": "spark"}
        sc = self.spark.sparkContext
        return {"name": "spark", "master": sc.master, "spark_version": self.spark.version, "default_parallelism": sc.defaultParallelism}

    def _persist(self, df):
        from pyspark import StorageLevel

        df = df.persist(StorageLevel.MEMORY_AND_DISK)
        self._persisted.append(df)
        return df

    # -- step 2: validation
    def validate_events(self, files: list[InputFile], bounds: tuple[int, int], forget, pz: Pseudonymizer | None):
        """-> (results, skipped) like pipeline.validate_events: FileResult per readable file with the meta the local
        engine would cache (entry None: nothing is cached), and the files skipped as unreadable."""
        from data_prep.pipeline import FileResult, _rel, _spec_for

        cfg = self.cfg
        tasks = []
        for idx, inp in enumerate(files):  # schema errors stop here, on the driver, naming file and column
            spec, kinds = _spec_for(inp, cfg, bounds, pz)
            if inp.rows == 0:
                _log(f"warning: events file {inp.path} has a schema but 0 rows")
            cols = [spec.user_col, spec.item_col, spec.ts_col] + ([spec.etype_col] if spec.etype_col else []) + \
                ([cfg.columns.value] if cfg.columns.value in inp.schema.names else [])
            task = {"spec": spec.to_dict(), "kinds": kinds, "rows": inp.rows, "columns": cols}
            self._tasks[idx] = (str(inp.path), task)
            tasks.append((idx, str(inp.path), json.dumps(task)))
        spark = self.session()
        t0 = time.time()
        forget_ids = forget.user_ids if forget is not None and len(forget.user_ids) else None
        fn = _bind(validate_partition, cfg=cfg, forget_ids=forget_ids, forget_sha=forget.sha256 if forget_ids is not None else "",
                   key_env=pz.key_env if pz is not None else "", fingerprint=pz.fingerprint if pz is not None else "")
        # a file is one unit of work (the local engine's memory unit): its rows keep their order and numbering; at most
        # 4 tasks per core, as each Python task pays the worker's imports
        rdd = spark.sparkContext.parallelize(tasks, max(1, min(len(tasks), 4 * spark.sparkContext.defaultParallelism)))
        tdf = spark.createDataFrame(rdd, "file_idx int, path string, task string")
        try:
            v = self._persist(tdf.mapInArrow(fn, VALIDATED_DDL))
            metas = v.where(f"kind = {KIND_META}").select("file_idx", "meta").toArrow()
        except Exception as e:
            raise _spark_error(e) from None
        by_file = dict(zip(metas.column("file_idx").to_pylist(), (json.loads(m) for m in metas.column("meta").to_pylist())))
        results, skipped = [], []
        root = Path(os.path.commonpath([str(f.path.parent) for f in files])) if files else None
        done = 0
        for idx, inp in enumerate(files):
            meta = by_file.get(idx)
            if meta is None:
                raise DataPrepError(f"engine=spark: no validation result for events file {inp.path} (a lost Spark task?)")
            if "error" in meta:
                if cfg.on_bad_file == "skip" and meta.get("cannot_read"):
                    skipped.append({**inp.fingerprint, "reason": meta["error"]})
                    _log(f"skipped unreadable file {inp.path}")
                    continue
                raise DataPrepError(meta["error"])
            meta = {"file": inp.fingerprint, **meta}
            done += inp.rows
            q = sum(meta["quarantined"].values())
            if len(files) <= 12 or idx == len(files) - 1 or q or verbose():
                _log(f"events {idx + 1}/{len(files)} validated {_rel(inp.path, root)}: {fmt_count(meta['rows'])} rows, "
                     f"{fmt_count(q)} quarantined | {fmt_count(done)}/{fmt_count(sum(f.rows for f in files))} rows (spark)")
            results.append(FileResult(inp=inp, file_idx=idx, entry=None, meta=meta, reused=False))
        self._validated = v
        _log(f"spark: validated {len(results)} events file(s) in {time.time() - t0:.1f}s")
        return results, skipped

    # -- step 4: global stage
    def global_stage(self, results: list, cat, id_kind_user: str, id_kind_item: str) -> tuple:
        """-> the tuple pipeline._global_local returns (keep None: duplicates are already dropped)."""
        try:
            return self._global_stage(results, cat, id_kind_user, id_kind_item)
        except DataPrepError:
            raise
        except Exception as e:
            if type(e).__module__.startswith(("pyspark", "py4j")):
                raise _spark_error(e) from None
            raise

    def _global_stage(self, results: list, cat, id_kind_user: str, id_kind_item: str) -> tuple:
        from pyspark.sql import Window
        from pyspark.sql import functions as F

        cfg, spark = self.cfg, self.session()
        t0 = time.time()
        good = [r.file_idx for r in results]
        v = self._validated.where(F.col("file_idx").isin(good))
        kept = v.where(F.col("kind") == KIND_KEPT).select("user_id", "item_id", "ts", "etype", "file_idx", "row")

        # item vocabulary: catalogue items (+ kept items missing from it, with unknown_items=keep) in sorted_vocab order
        cat_ids = cat.item_id
        if cfg.unknown_items == "keep":
            cat_df = spark.createDataFrame(pa.table({"item_id": cat.item_id.cast(pa.string())}))
            extra = kept.select("item_id").distinct().join(cat_df, "item_id", "left_anti").toArrow().column("item_id")
            if len(extra):
                cat_ids = pa.concat_arrays([cat_ids.cast(pa.string()), extra.combine_chunks().cast(pa.string())])
        item_vocab = seq.sorted_vocab(cat_ids, id_kind_item == "int")
        vocab_df = spark.createDataFrame(pa.table({"item_id": item_vocab.cast(pa.string()),
                                                   "item_idx": pa.array(np.arange(len(item_vocab), dtype=np.int32))}))
        j = kept.join(vocab_df, "item_id", "left")  # item_idx null: no catalogue row (quarantined; the user stays active)
        known = F.col("item_idx").isNotNull()
        usable = known
        if cfg.dedup:
            # duplicate = same (user, item, timestamp, event_type); the first in (file, row) order is kept
            w = Window.partitionBy("user_id", "item_idx", "ts", "etype").orderBy("file_idx", "row")
            j = j.withColumn("_nth", F.row_number().over(w))
            usable = known & (F.col("_nth") == 1)
        j = self._persist(j)
        late = []
        if cfg.unknown_items == "quarantine":  # (with keep every item is in the vocabulary)
            late.append(j.where(~known).select(F.lit(1).cast("byte").alias("phase"), "file_idx", "row", F.lit("item_not_in_catalogue").alias("reason")))
        if cfg.dedup:
            late.append(j.where(known & (F.col("_nth") > 1)).select(F.lit(2).cast("byte").alias("phase"), "file_idx", "row", F.lit("duplicate").alias("reason")))

        # one row per user: the usable history sorted by (timestamp, file, row) -- unique per event, so no tie is left to
        # chance (collect_list skips the nulls of unusable rows) -- and the latest event on an item missing from the catalogue
        ev = F.struct("ts", "file_idx", "row", "item_idx", "etype")
        users = j.groupBy("user_id").agg(
            F.sort_array(F.collect_list(F.when(usable, ev))).alias("ev"),
            F.max(F.when(~known, F.col("ts"))).alias("last_unknown"),
        ).select("user_id", F.col("ev.item_idx").alias("item_idx"), F.col("ev.ts").alias("ts"), F.col("ev.etype").alias("etype"), "last_unknown")
        t = users.toArrow()

        # quarantined rows in the local engine's order: validation (file, row), then catalogue, then duplicates
        q0 = v.where(F.col("kind") == KIND_QUARANTINE).select(
            F.lit(0).cast("byte").alias("phase"), "file_idx",
            *[F.col(_Q_RENAME[c]).alias(c) for c in QUARANTINE_EVENT_COLUMNS[:5]], "source_file", F.col("row").alias("source_row"), "reason")
        qdf = q0
        if late:
            lrows = late[0]
            for x in late[1:]:
                lrows = lrows.unionByName(x)
            fn = _bind(reread_partition, cfg=cfg, files={i: self._tasks[i] for i in good},
                       key_env=self.cfg.pseudonymize_user_ids_key_env, fingerprint=_fingerprint_of(cfg))
            n_part = max(1, min(len(good), spark.sparkContext.defaultParallelism))
            lq = lrows.repartition(n_part, "file_idx").mapInArrow(fn, LATE_DDL)  # a file's rows in one task: read once
            qdf = q0.unionByName(lq)
        # sorted here rather than by Spark (no sampling job): the driver holds the quarantine file anyway
        qt = qdf.toArrow().sort_by([("phase", "ascending"), ("file_idx", "ascending"), ("source_row", "ascending")])
        t_spark = time.time() - t0

        quarantined = {r_: 0 for r_ in EVENT_QUARANTINE_REASONS}
        for r in results:
            for k_, n_ in r.meta["quarantined"].items():
                quarantined[k_] = quarantined.get(k_, 0) + n_
        phase = qt.column("phase").to_numpy()
        for name, ph in (("item_not_in_catalogue", 1), ("duplicate", 2)):
            quarantined[name] += int((phase == ph).sum())
        from data_prep.pipeline import QUARANTINE_SCHEMA

        q_all = qt.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)

        # users in sorted_vocab order (the local engine's user codes), histories flattened in that order
        uid = t.column("user_id").combine_chunks().cast(pa.string())
        all_users = seq.sorted_vocab(uid, id_kind_user == "int")
        order = np.argsort(seq.codes(uid, all_users), kind="stable")
        t = t.take(pa.array(order))
        lists = t.column("item_idx").combine_chunks()
        n_per = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        user = np.repeat(np.arange(len(all_users), dtype=np.int32), n_per)
        item = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int32)
        ts = pc.list_flatten(t.column("ts").combine_chunks()).to_numpy(zero_copy_only=False).astype(np.int64)
        etype = pc.list_flatten(t.column("etype").combine_chunks()).to_numpy(zero_copy_only=False).astype(np.int8)
        last_unknown = t.column("last_unknown").combine_chunks().fill_null(np.iinfo(np.int64).min).to_numpy(zero_copy_only=False).astype(np.int64)
        _log(f"spark: global stage in {t_spark:.1f}s: {fmt_count(len(item))} events, {fmt_count(len(all_users))} users, "
             f"{fmt_count(len(item_vocab))} items, {fmt_count(q_all.num_rows)} quarantined rows collected")
        return all_users, item_vocab, user, item, ts, etype, None, last_unknown, quarantined, [q_all]


def _fingerprint_of(cfg: DataPrepConfig) -> str:
    if not cfg.pseudonymize_user_ids_key_env:
        return ""
    return Pseudonymizer(cfg.pseudonymize_user_ids_key_env, load_key(cfg.pseudonymize_user_ids_key_env, "pseudonymize_user_ids_key_env")).fingerprint


def _bind(fn, **kwargs):
    """functools.partial, spelled out: Spark pickles the returned closure (fn by reference, kwargs by value)."""

    def bound(batches):
        return fn(batches, **kwargs)

    return bound
