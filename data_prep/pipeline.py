"""data_prep: raw Parquet logs + catalogue -> prepared/<version>/ (docs/CONTRACTS.md section 2).

    python -m data_prep --config configs/data_prep/ml1m.yaml [key=value ...]
    from data_prep.pipeline import run; version_dir = run(cfg)

Steps (each prints progress):
  1. list + fingerprint inputs; bad files stop (or are skipped with on_bad_file=skip)
  2. per events FILE (the memory work unit): HF Datasets reads the Parquet (memory-mapped Arrow) and
     ``.map(batched, num_proc)`` runs the columnar validation; usable rows go to an Arrow file and
     unusable ones to a quarantine part, both cached under output_dir/_cache/validated/<key>/ so an
     incremental run re-validates only new or changed files; rows of users in the forget ledger
     (output_dir/forget/requests.parquet, data_prep/forget.py) are dropped from both (forget_in_entry)
  3. catalogue: read, quarantine null/duplicate ids, render text, tokenize each distinct text once
  4. global, columnar: vocabularies, catalogue check, dedup, single-event filter, sort by
     (user, timestamp, file, row), list arrays from offsets, splits
  5. write items/ sequences/ quarantine/ config.yaml manifest.json into a staged folder, publish
     it atomically as output_dir/<version>/, then write output_dir/LATEST

One run is a ``PrepJob`` that ``_run_locked`` passes through its steps, one function each, in this order:
start_job, list_inputs (1), validate_files (2), load_catalogue (3), global_stage and build_items (4), count_events,
publish (5), clean_up, log_summary.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from data_prep import items as items_mod
from data_prep import sequences as seq
from data_prep.sequences import serving_table
from data_prep.config import DataPrepConfig
from data_prep.forget import EMPTY_SHA256, ForgetSet, pseudonymise_ledger, read_ledger
from data_prep.inputs import InputFile, check_id_column, check_id_values, check_optional_column, check_timestamp_column, open_inputs
from data_prep.lock import output_dir_lock
from data_prep.pseudonym import Pseudonymizer, check_same_key, from_config, manifest_entry
from data_prep.schema import (
    EVENT_FILTER_REASONS,
    EVENT_QUARANTINE_REASONS,
    ITEMS_DIR,
    KIND,
    LATEST_FILE,
    QUARANTINE_DIR,
    QUARANTINE_EVENT_COLUMNS,
    SCHEMA_VERSION,
    SEQUENCES_DIR,
    SERVING_DIR,
    SERVING_WHY,
    DataPrepError,
    InputIncomplete,
)
from data_prep.validate import CHECK_ORDER, ID_LEADING_ZERO, ID_WHITESPACE, VALIDATED_SCHEMA, ValidationSpec, detect_unit, normalize_ids, parse_time_bound, stringify, validate_batch
from lmrec_common.config import dump_yaml, save_config, to_dict
from lmrec_common.log import fmt_count, print0, verbose
from lmrec_common.manifest import base_manifest, code_version, sha256_strings
from lmrec_common.publish import atomic_write_json, atomic_write_text, staged_dir

# Bump when validate.py changes what it produces: invalidates every cached per-file result.
# 2: uint64 ids beyond int64 are refused at validation (an entry cached by 1 would crash later, in the global stage)
VALIDATION_CODE_VERSION = 3
CACHE_DIR = "_cache"  # per-file validation results, tokenized texts (incremental runs)
KEPT_COLUMNS = ["user_id", "item_id", "ts", "etype", "row"]
QUARANTINE_SCHEMA = pa.schema(
    [(c, pa.string()) for c in QUARANTINE_EVENT_COLUMNS[:6]] + [("source_row", pa.int64()), ("reason", pa.string())]
)


def _rel(path: Path, root: Path | None) -> str:
    try:
        return path.relative_to(root).as_posix() if root is not None else path.name
    except ValueError:
        return str(path)


def _log(msg: str) -> None:
    print0(f"[data_prep] {msg}")


def _rss() -> str:
    try:
        import psutil

        return f" | rss {psutil.Process().memory_info().rss / 2**30:.2f} GiB"
    except ImportError:  # psutil is a dependency, but the log line must never fail
        return ""


@dataclass
class FileResult:
    inp: InputFile
    file_idx: int
    entry: Path  # cache entry folder: kept.arrow, quarantine.parquet, meta.json
    meta: dict
    reused: bool


# ----------------------------------------------------------------------------- step 2: per-file validation


def _spec_for(inp: InputFile, cfg: DataPrepConfig, bounds: tuple[int, int], pz: Pseudonymizer | None = None) -> tuple[ValidationSpec, dict]:
    c = cfg.columns
    kinds = {
        "user_id": check_id_column(inp, c.user_id, "events"),
        "item_id": check_id_column(inp, c.item_id, "events"),
        "timestamp": check_timestamp_column(inp, c.timestamp, "events"),
    }
    has_etype = check_optional_column(inp, c.event_type, "events", "string")
    check_optional_column(inp, c.value, "events", "number")
    if not has_etype and "interaction" not in cfg.event_types:
        raise DataPrepError(f"events file {inp.path} has no {c.event_type!r} column, so its events are 'interaction', which is not in event_types {cfg.event_types}")
    spec = ValidationSpec(
        user_col=c.user_id,
        item_col=c.item_id,
        ts_col=c.timestamp,
        etype_col=c.event_type if has_etype else None,
        ts_kind=kinds["timestamp"],
        ts_unit="s" if cfg.timestamp_unit == "auto" else cfg.timestamp_unit,  # auto: detected from the data
        min_ts=bounds[0],
        max_ts=bounds[1],
        event_types=tuple(cfg.event_types),
        default_etype=cfg.event_types.index("interaction") if "interaction" in cfg.event_types else 0,
        id_normalization=cfg.id_normalization,
        user_pseudonym=pz.fingerprint if pz is not None else "",
    )
    return spec, kinds


def _cache_key(inp: InputFile, spec: ValidationSpec, cfg: DataPrepConfig) -> str:
    sp = spec.to_dict()
    if not sp["user_pseudonym"]:  # raw ids: the key of entries cached before pseudonymisation existed, unchanged
        del sp["user_pseudonym"]
    blob = json.dumps({"file": inp.fingerprint, "spec": sp, "unit": cfg.timestamp_unit, "v": VALIDATION_CODE_VERSION, "batch": cfg.batch_size}, sort_keys=True)
    return sha256_strings([blob])[:20]


def with_detected_unit(spec: ValidationSpec, col: pa.ChunkedArray | pa.Array) -> ValidationSpec:
    """timestamp_unit=auto: the spec with the epoch unit of this file's numeric timestamps (the whole column; for ISO
    strings, of its all-digit values), detected once per file. Both engines call this."""
    if spec.ts_kind == "string":
        s = pc.utf8_trim_whitespace((col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col).cast(pa.string()))
        col = pc.cast(s.filter(pc.match_substring_regex(s, r"^-?\d+$").fill_null(False)), pa.int64())
    if len(col):
        spec = ValidationSpec(**{**spec.to_dict(), "ts_unit": detect_unit(col), "event_types": spec.event_types})
    return spec


def _validate_fn(batch: pa.Table, indices: list[int], spec: ValidationSpec, user_key: bytes | None = None) -> pa.Table:
    return validate_batch(batch, indices[0] if len(indices) else 0, spec, user_key)


def _validate_file(inp: InputFile, spec: ValidationSpec, kinds: dict, cfg: DataPrepConfig, entry: Path, hf_cache: Path, num_proc: int,
                   pz: Pseudonymizer | None = None) -> dict:
    """Validate one events file into the cache entry folder. Returns its meta dict. With ``pz`` the user ids of
    everything written (kept.arrow, quarantine.parquet) are pseudonyms."""
    user_key = pz.key if pz is not None else None
    import datasets

    cols = [spec.user_col, spec.item_col, spec.ts_col] + ([spec.etype_col] if spec.etype_col else []) + ([cfg.columns.value] if cfg.columns.value in inp.schema.names else [])
    t0 = time.time()
    if inp.rows == 0:
        _log(f"warning: events file {inp.path} has a schema but 0 rows")
        src = pa.table({c: pa.array([], inp.schema.field(c).type) for c in cols})
        out = validate_batch(src, 0, spec, user_key)
        src_table, val_table = src, out
    else:
        try:
            ds = datasets.Dataset.from_parquet(str(inp.path), cache_dir=str(hf_cache), columns=cols)
        except Exception as e:  # corrupt pages behind a valid footer surface here, wrapped by the HF builder
            raise DataPrepError(f"events file {inp.path}: cannot read (corrupt or truncated Parquet?): {e}") from None
        for c in (spec.user_col, spec.item_col):
            check_id_values(ds.data.table.column(c), inp.path, c, "events")
        if spec.ts_kind in ("number", "string") and cfg.timestamp_unit == "auto":
            spec = with_detected_unit(spec, ds.data.table.column(spec.ts_col))
        procs = max(1, min(num_proc, inp.rows // cfg.batch_size))
        # HF map over Arrow batches: columnar validation, output memory-mapped on disk (bounded RAM);
        # num_proc workers each take a contiguous slice of the file.
        val = ds.with_format("arrow").map(
            _validate_fn,
            batched=True,
            batch_size=cfg.batch_size,
            with_indices=True,
            fn_kwargs={"spec": spec, "user_key": user_key},
            # a fresh fingerprint: HF would otherwise hash fn_kwargs (the key among them) into cache file names; the
            # HF cache is per run and deleted after it, so nothing is lost
            new_fingerprint=secrets.token_hex(16),
            num_proc=procs if procs > 1 else None,
            remove_columns=ds.column_names,
            features=datasets.Features.from_arrow_schema(VALIDATED_SCHEMA),
            desc=f"validate {inp.path.name}",
        )
        src_table, val_table = ds.data.table, val.data.table
    reason = val_table.column("reason")
    ok = pc.is_null(reason)
    kept = val_table.filter(ok).select(KEPT_COLUMNS)
    bad = val_table.filter(pc.invert(ok))
    entry.mkdir(parents=True, exist_ok=True)
    with ipc.new_file(str(entry / "kept.arrow"), kept.schema) as w:
        w.write_table(kept, max_chunksize=1 << 20)
    rows = bad.column("row").combine_chunks()
    q = _quarantine_rows(src_table.take(rows), rows.to_numpy(zero_copy_only=False), bad.column("reason").combine_chunks(), str(inp.path), cfg, spec, pz)
    pq.write_table(q, entry / "quarantine.parquet")
    counts = pc.value_counts(bad.column("reason").combine_chunks()).to_pylist() if bad.num_rows else []
    meta = {
        "file": inp.fingerprint,
        "rows": inp.rows,
        "kept": kept.num_rows,
        "quarantined": {d["values"]: d["counts"] for d in counts},
        "decoded_latin1": int(pc.sum(val_table.column("n_decoded_latin1")).as_py() or 0),
        **_id_flag_counts(val_table),
        "id_kinds": kinds,
        "ts_unit": spec.ts_unit if spec.ts_kind in ("number", "string") else spec.ts_kind,
        "seconds": round(time.time() - t0, 3),
    }
    atomic_write_json(entry / "meta.json", meta)
    return meta


def _warn_id_forms(results, cat, mode: str) -> None:
    """Say when ids that look alike (" 42", "042", "42") may be one user or item kept apart, or were merged."""
    ws = sum(r.meta.get("ids_whitespace", 0) for r in results) + cat.ids_whitespace
    zero = sum(r.meta.get("ids_leading_zero", 0) for r in results) + cat.ids_leading_zero
    if not (ws or zero):
        return
    ex = next((r for r in results if "ids_example_row" in r.meta), None)
    where = f" (first in {ex.inp.path} row {ex.meta['ids_example_row']})" if ex else ""
    what = f"{ws:,} rows with leading/trailing whitespace and {zero:,} all-digit ids with leading zeros in user/item ids{where}"
    if mode == "exact":
        print0(f"[data_prep] warning: {what}; they are kept as written (id_normalization: exact), so ' 42', '042' and '42' "
               "are different ids; set id_normalization: trim (or trim_zeros) if your systems mean the same user/item")
    else:
        _log(f"ids normalised ({mode}): {what}")


def _id_flag_counts(val_table: pa.Table) -> dict:
    """Events whose raw user or item id had leading/trailing whitespace / leading zeros (all rows read)."""
    f = val_table.column("id_flags").combine_chunks().to_numpy(zero_copy_only=False)
    out = {"ids_whitespace": int(((f & ID_WHITESPACE) > 0).sum()), "ids_leading_zero": int(((f & ID_LEADING_ZERO) > 0).sum())}
    if out["ids_whitespace"] or out["ids_leading_zero"]:
        i = int(np.flatnonzero(f)[0])
        out["ids_example_row"] = int(val_table.column("row")[i].as_py())
    return out


def _quarantine_rows(src: pa.Table, rows: np.ndarray, reasons: pa.Array, source_file: str, cfg: DataPrepConfig, spec: ValidationSpec,
                     pz: Pseudonymizer | None = None) -> pa.Table:
    c = cfg.columns
    vals = stringify(src, {"user_id": c.user_id, "item_id": c.item_id, "timestamp": c.timestamp, "event_type": spec.etype_col, "value": c.value})
    if pz is not None:  # the pseudonym of the id as validated (normalised), the one sequences/ and the ledger use
        vals["user_id"] = pz(normalize_ids(vals["user_id"], spec.id_normalization)[0])
    vals["source_file"] = pa.array([source_file] * len(rows), pa.string())
    vals["source_row"] = pa.array(rows, pa.int64())
    vals["reason"] = reasons.cast(pa.string())
    return pa.table(vals, schema=QUARANTINE_SCHEMA)


def _user_key(user_id: str) -> str:
    """A forgotten user, as counted in a cache entry's meta.json: a sha256 prefix, not the id itself."""
    return hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:16]


def forget_in_entry(entry: Path, meta: dict, forget: ForgetSet, quarantine_id_mode: str = "exact") -> dict:
    """Drop the rows of forgotten users from one cached validation result (kept.arrow and quarantine.parquet), so that
    neither this run nor the cache under output_dir keeps them; returns the new meta.json: ``kept`` and
    ``quarantined`` lose them, ``forgotten_events`` / ``forgotten_users`` (sha256 prefixes, to count users across
    files) count them, ``forget_applied`` is the ledger applied (an entry is checked again only when it grows). The
    ledger only grows, so a scrubbed entry stays right for every later run: rows + kept + quarantined + forgotten
    still account for every row of the file. Quarantined rows keep their raw ids: ``quarantine_id_mode`` (the run's
    id_normalization, when ids are not pseudonymised) normalises them before matching, as kept rows were."""
    kept = _read_kept(entry)
    q = pq.read_table(entry / "quarantine.parquet")
    dk = pc.is_in(kept.column("user_id"), value_set=forget.user_ids).fill_null(False)
    qu = q.column("user_id").combine_chunks()
    dq = pc.is_in(normalize_ids(qu, quarantine_id_mode)[0] if quarantine_id_mode != "exact" else qu, value_set=forget.user_ids).fill_null(False)
    nk, nq = int(pc.sum(dk).as_py() or 0), int(pc.sum(dq).as_py() or 0)
    meta = {**meta, "forget_applied": forget.sha256}
    if not nk and not nq:
        atomic_write_json(entry / "meta.json", meta)
        return meta
    gone = pa.chunked_array([kept.column("user_id").filter(dk), q.column("user_id").filter(dq)], pa.string())
    quarantined = dict(meta["quarantined"])
    for d in (pc.value_counts(q.column("reason").filter(dq).combine_chunks()).to_pylist() if nq else []):
        quarantined[d["values"]] -= d["counts"]
    meta.update(kept=meta["kept"] - nk, quarantined=quarantined, forgotten_events=meta.get("forgotten_events", 0) + nk + nq,
                forgotten_users=sorted(set(meta.get("forgotten_users", [])) | {_user_key(u) for u in pc.unique(gone.combine_chunks()).to_pylist()}))
    tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with ipc.new_file(str(tmp / "kept.arrow"), kept.schema) as w:
        w.write_table(kept.filter(pc.invert(dk)), max_chunksize=1 << 20)
    pq.write_table(q.filter(pc.invert(dq)), tmp / "quarantine.parquet")
    atomic_write_json(tmp / "meta.json", meta)
    del kept, q
    shutil.rmtree(entry, ignore_errors=True)  # a kill here leaves no entry: the file is validated again next run
    os.replace(tmp, entry)
    return meta


def validate_events(files: list[InputFile], cfg: DataPrepConfig, cache_dir: Path, bounds: tuple[int, int], num_proc: int,
                    forget: ForgetSet | None = None, pz: Pseudonymizer | None = None) -> tuple[list[FileResult], list[dict]]:
    hf_cache = cache_dir / f"hf-{os.getpid()}"
    results, skipped = [], []
    total = sum(f.rows for f in files)
    done = 0
    t0 = last_line = time.time()
    # a file is named by its path under the inputs' common folder (dt=.../part-00000.parquet, not part-00000.parquet);
    # with many files, a line per file only every 10 s, for files with quarantined rows and for the last one
    root = Path(os.path.commonpath([str(f.path.parent) for f in files])) if files else None
    try:
        for idx, inp in enumerate(files):
            spec, kinds = _spec_for(inp, cfg, bounds, pz)
            key = _cache_key(inp, spec, cfg)
            entry = cache_dir / "validated" / key
            meta = None
            if cfg.incremental and (entry / "meta.json").is_file() and (entry / "kept.arrow").is_file():
                try:
                    meta = json.loads((entry / "meta.json").read_text())
                    reused = True
                except (OSError, json.JSONDecodeError):
                    meta = None
            if meta is None:
                reused = False
                tmp = cache_dir / "validated" / f".tmp-{key}-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                try:
                    meta = _validate_file(inp, spec, kinds, cfg, tmp, hf_cache, num_proc, pz)
                except DataPrepError as e:
                    shutil.rmtree(tmp, ignore_errors=True)
                    if cfg.on_bad_file == "skip" and "cannot read" in str(e):
                        skipped.append({**inp.fingerprint, "reason": str(e)})
                        _log(f"skipped unreadable file {inp.path}")
                        continue
                    raise
                shutil.rmtree(entry, ignore_errors=True)
                os.replace(tmp, entry)
            if forget is not None and len(forget.user_ids) and meta.get("forget_applied") != forget.sha256:
                meta = forget_in_entry(entry, meta, forget, cfg.id_normalization if pz is None else "exact")
            done += inp.rows
            rate = done / max(time.time() - t0, 1e-9)
            q = sum(meta["quarantined"].values())
            if len(files) <= 12 or idx == len(files) - 1 or q or verbose() or time.time() - last_line >= 10:
                last_line = time.time()
                _log(
                    f"events {idx + 1}/{len(files)} {'reused   ' if reused else 'validated'} {_rel(inp.path, root)}: "
                    f"{fmt_count(meta['rows'])} rows, {fmt_count(q)} quarantined | {fmt_count(done)}/{fmt_count(total)} rows, {fmt_count(rate)} rows/s"
                )
            results.append(FileResult(inp=inp, file_idx=len(results), entry=entry, meta=meta, reused=reused))
    finally:
        shutil.rmtree(hf_cache, ignore_errors=True)
    return results, skipped


def _read_kept(r: FileResult | Path) -> pa.Table:
    with pa.memory_map(str((r if isinstance(r, Path) else r.entry) / "kept.arrow")) as src:
        return ipc.open_file(src).read_all()


# ----------------------------------------------------------------------------- step 4: global columnar work


def _reread_quarantine(results: list[FileResult], file_idx: np.ndarray, rows: np.ndarray, reason: str, cfg: DataPrepConfig,
                       pz: Pseudonymizer | None = None) -> list[pa.Table]:
    """Rows rejected at the global stage (catalogue, duplicates): original values re-read from the
    source file, only for the files that have such rows."""
    out = []
    for f in np.unique(file_idx):
        r = results[int(f)]
        sel = np.sort(rows[file_idx == f])
        spec, _ = _spec_for(r.inp, cfg, (0, 0))
        cols = [c for c in (cfg.columns.user_id, cfg.columns.item_id, cfg.columns.timestamp, spec.etype_col, cfg.columns.value) if c and c in r.inp.schema.names]
        src = pq.read_table(r.inp.path, columns=cols).take(pa.array(sel))
        out.append(_quarantine_rows(src, sel, pa.array([reason] * len(sel), pa.string()), str(r.inp.path), cfg, spec, pz))
    return out


def _global_local(results: list[FileResult], cat, cfg: DataPrepConfig, pz: Pseudonymizer | None, id_kind_user: str, id_kind_item: str) -> tuple:
    """The global stage of the local engine (step 4 up to the single-event filter), numpy over the cached per-file
    results. Returns (all_users, item_vocab, user, item, ts, etype, keep, last_unknown, quarantined, late_q): every user
    with a valid event (sorted_vocab order), the item vocabulary, the usable events (catalogue items) as codes sorted by
    (user, timestamp, file, row) with ``keep`` False for duplicates, each user's latest event on an item missing from
    the catalogue (int64 min = none), the quarantine counts and the quarantine rows found here (catalogue, duplicates).
    data_prep/spark_engine.py returns the same on Spark."""
    user_parts, extra_items = [], []
    for r in results:
        k = _read_kept(r)
        user_parts.append(pc.unique(k.column("user_id").combine_chunks()))
        if cfg.unknown_items == "keep":
            ii = pc.unique(k.column("item_id").combine_chunks())
            extra_items.append(ii.filter(pc.invert(pc.is_in(ii, value_set=cat.item_id))))
    all_users = seq.sorted_vocab(pa.concat_arrays(user_parts) if user_parts else pa.array([], pa.string()), id_kind_user == "int")
    # Item vocabulary: catalogue items (+ kept unknown items) sorted by id -> item_idx.
    cat_ids = cat.item_id
    if extra_items:
        cat_ids = pa.concat_arrays([cat_ids] + [e.cast(pa.string()) for e in extra_items])
    item_vocab = seq.sorted_vocab(cat_ids, id_kind_item == "int")
    # Pass 2: integer codes, per file, written into preallocated arrays (no concatenate copy).
    # Memory: 21 bytes per kept event (user i32, item i32, ts i64, etype i8, source row i32).
    quarantined = {r_: 0 for r_ in EVENT_QUARANTINE_REASONS}
    for r in results:
        for k_, v in r.meta["quarantined"].items():
            quarantined[k_] = quarantined.get(k_, 0) + v
    late_q: list[pa.Table] = []
    # per user: the latest event on an item missing from the catalogue (a valid event whose item cannot be used);
    # a user with only such events is still an active user and is served a fallback list (serving/)
    no_event = np.iinfo(np.int64).min
    last_unknown = np.full(len(all_users), no_event, np.int64)
    E = sum(r.meta["kept"] for r in results)
    user = np.empty(E, np.int32)
    item = np.empty(E, np.int32)
    ts = np.empty(E, np.int64)
    etype = np.empty(E, np.int8)
    row = np.empty(E, np.int32)
    file_start = np.zeros(len(results) + 1, np.int64)  # events of file f are [file_start[f], file_start[f+1])
    n = 0
    for r in results:
        k = _read_kept(r)
        it = seq.codes(k.column("item_id").combine_chunks(), item_vocab)
        ok = it >= 0  # -1: no catalogue row (with unknown_items=keep every item is in the vocabulary)
        if not ok.all():
            bad_rows = k.column("row").to_numpy()[~ok]
            quarantined["item_not_in_catalogue"] += len(bad_rows)
            late_q += _reread_quarantine(results, np.full(len(bad_rows), r.file_idx), bad_rows, "item_not_in_catalogue", cfg, pz)
            bad = k.filter(pa.array(~ok))
            np.maximum.at(last_unknown, seq.codes(bad.column("user_id").combine_chunks(), all_users), bad.column("ts").to_numpy())
            del bad
            k = k.filter(pa.array(ok))
            it = it[ok]
        m = len(it)
        item[n : n + m] = it
        user[n : n + m] = seq.codes(k.column("user_id").combine_chunks(), all_users)
        ts[n : n + m] = k.column("ts").to_numpy()
        etype[n : n + m] = k.column("etype").to_numpy()
        row[n : n + m] = k.column("row").to_numpy()
        n += m
        file_start[r.file_idx + 1] = n
        del k, it
    user, item, ts, etype, row = user[:n], item[:n], ts[:n], etype[:n], row[:n]  # views, no copy
    _log(f"assembled {fmt_count(n)} events, {fmt_count(len(all_users))} users, {fmt_count(len(item_vocab))} items{_rss()}")
    # Sort by (user, timestamp); ties stay in (file, row) order (stable sort of the file-ordered input).
    order = seq.chronological_order(user, ts)
    pos = order  # original position == (file, row) order, kept to name the source of dropped rows
    # one column at a time, so only one old column is alive next to its permuted copy
    user = user[order]
    item = item[order]
    ts = ts[order]
    etype = etype[order]
    keep = np.ones(n, bool)
    if cfg.dedup and n:
        # duplicate = same (user, item, timestamp, event_type); the first in (file, row) order is kept.
        # in chunks of ~1M events cut at user boundaries (a tie run never spans two users):
        # the candidate arrays stay bounded however many events there are
        dup = np.zeros(n, bool)
        bounds_u = np.flatnonzero(np.diff(user)) + 1  # first row of each user but the first
        cuts = [0] + [int(bounds_u[j]) for j in np.searchsorted(bounds_u, np.arange(1_000_000, n, 1_000_000)) if j < len(bounds_u)] + [n]
        for a, b in zip(cuts[:-1], cuts[1:]):
            if b > a:
                dup[a:b] = seq.duplicates_sorted(user[a:b], ts[a:b], item[a:b], etype[a:b])
        del bounds_u
        if dup.any():
            quarantined["duplicate"] += int(dup.sum())
            dpos = pos[dup]
            dfile = np.searchsorted(file_start, dpos, side="right") - 1
            late_q += _reread_quarantine(results, dfile, row[dpos], "duplicate", cfg, pz)
            keep &= ~dup
        del dup
    del row, pos, order
    return all_users, item_vocab, user, item, ts, etype, keep, last_unknown, quarantined, late_q


def _resolve_version(cfg: DataPrepConfig, out_dir: Path) -> str:
    if cfg.version:
        return cfg.version
    base = "v" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    name, k = base, 0
    while (out_dir / name).exists():
        k += 1
        name = f"{base}-{k}"
    return name


def history_percentiles(lengths: np.ndarray) -> dict:
    """{p50, p95, p99, max} of the events per user ({} without users)."""
    if not len(lengths):
        return {}
    q = np.percentile(lengths, [50, 95, 99])
    return {"p50": float(q[0]), "p95": float(q[1]), "p99": float(q[2]), "max": int(lengths.max())}


# config keys that say where and how data_prep runs, not what it makes (both engines make the same): a rerun that
# differs only in them reuses the previous version. The completeness keys decide WHETHER to publish; a reused version
# is checked against them from its manifest
CONFIG_RUN_ONLY = frozenset({"version", "num_proc", "engine", "spark_master",
                             "expect_events_through", "min_day_share", "baseline_days", "on_incomplete"})
SECONDS_PER_DAY = 86_400
BY_DAY_WINDOW = 63  # days of usable-event counts the manifest keeps (counts.events_by_day), ending at the newest event


def events_by_day(ts: np.ndarray, keep: np.ndarray | None = None, chunk: int = 1 << 20) -> tuple[dict[str, int], int | None]:
    """Usable events per UTC day over the BY_DAY_WINDOW days ending on the newest one ({"YYYY-MM-DD": n}, days
    without events included as 0), and the newest usable event (epoch seconds; None when there is none). ``ts`` are
    epoch seconds, ``keep`` the usable ones (None: all). Chunked: no per-event temporary beyond ``chunk`` events."""
    newest = None
    for a in range(0, len(ts), chunk):
        t = ts[a:a + chunk] if keep is None else ts[a:a + chunk][keep[a:a + chunk]]
        if len(t):
            newest = int(t.max()) if newest is None else max(newest, int(t.max()))
    if newest is None:
        return {}, None
    last = newest // SECONDS_PER_DAY
    first = last - BY_DAY_WINDOW + 1
    n = np.zeros(BY_DAY_WINDOW, np.int64)
    for a in range(0, len(ts), chunk):
        t = ts[a:a + chunk] if keep is None else ts[a:a + chunk][keep[a:a + chunk]]
        d = t // SECONDS_PER_DAY - first
        n += np.bincount(d[d >= 0], minlength=BY_DAY_WINDOW)[:BY_DAY_WINDOW]
    epoch = _dt.date(1970, 1, 1)
    return {(epoch + _dt.timedelta(days=int(first + i))).isoformat(): int(c) for i, c in enumerate(n)}, newest


def completeness_problem(by_day: dict[str, int], newest: int | None, cfg: DataPrepConfig) -> str | None:
    """Why the usable events do not cover ``cfg.expect_events_through`` (None when they do, or when no day is
    expected): no event on that day or later, or that day below ``min_day_share`` x the median of the
    ``baseline_days`` days before it (days without events count as 0; a baseline median of 0 asks only for the
    newest event). ``by_day``/``newest`` as events_by_day returns them (or a manifest's counts)."""
    if not cfg.expect_events_through:
        return None
    want = _dt.date.fromisoformat(cfg.expect_events_through)
    key = f"expect_events_through={want.isoformat()}"
    if newest is None:
        return f"no usable event at all, {key} expects events through {want}"
    newest_day = _dt.datetime.fromtimestamp(newest, _dt.timezone.utc).date()
    if newest_day < want:
        return (f"the newest usable event is on {newest_day} ({_dt.datetime.fromtimestamp(newest, _dt.timezone.utc):%Y-%m-%d %H:%M} "
                f"UTC), but {key}: {want}'s events have not landed in {cfg.events_path}")
    if cfg.min_day_share <= 0:
        return None
    base = [by_day.get((want - _dt.timedelta(days=i)).isoformat(), 0) for i in range(1, cfg.baseline_days + 1)]
    median = float(np.median(base))
    got = by_day.get(want.isoformat(), 0)
    if median > 0 and got < cfg.min_day_share * median:
        return (f"{want} holds {got:,} usable events, {got / median:.0%} of the median of the {cfg.baseline_days} days "
                f"before it ({median:,.0f}; min_day_share={cfg.min_day_share:g}): its events have landed in part "
                f"in {cfg.events_path} ({key})")
    return None


def unchanged_version(out_dir: Path, prev: str | None, cfg: DataPrepConfig, ev_files, it_files, forget_sha256: str = EMPTY_SHA256) -> Path | None:
    """The previous version's folder when it was prepared from the same input files (path, size, content) with the
    same settings and code, and the same forget requests (``forget_sha256``: the ledger's users, data_prep/forget.py):
    rerunning the same command reuses it instead of publishing a copy under a new name (the next stage would take a
    new data version for new data and refuse its own run folder). None otherwise: a version prepared before a newer
    forget request is never reused."""
    f = out_dir / str(prev) / "manifest.json" if prev else None
    if f is None or not f.is_file():
        return None
    try:
        old = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    key = ("path", "size", "sha256")

    def files(entries):
        return [tuple(e.get(k) for k in key) for e in entries]

    now_cfg = {k: v for k, v in json.loads(json.dumps(to_dict(cfg))).items() if k not in CONFIG_RUN_ONLY}
    then_cfg = {k: v for k, v in (old.get("config") or {}).items() if k not in CONFIG_RUN_ONLY}
    same = (old.get("code_version") == code_version()
            and (old.get("forget") or {}).get("users_sha256", EMPTY_SHA256) == forget_sha256
            and old.get("schema_version") == SCHEMA_VERSION and now_cfg == then_cfg
            and files(old.get("inputs", {}).get("events", [])) == files(f_.fingerprint for f_ in ev_files)
            and files(old.get("inputs", {}).get("items", [])) == files(f_.fingerprint for f_ in it_files))
    return out_dir / prev if same else None


def versions_before_forget(out_dir: Path, version: str, forget: ForgetSet) -> list[str]:
    """Published versions (other than ``version``) prepared before the newest forget request: they may still hold the
    data of users forgotten since, until the operator deletes them (data_prep never deletes a published version)."""
    out = []
    for p in sorted(out_dir.glob("*/manifest.json")):
        if p.parent.name == version or p.parent.name.startswith((".", "_")):
            continue
        try:
            applied = (json.loads(p.read_text()).get("forget") or {}).get("users_sha256", EMPTY_SHA256)
        except (OSError, ValueError):
            applied = None
        if applied != forget.sha256:
            out.append(p.parent.name)
    return out


def versions_with_raw_ids(out_dir: Path, version: str) -> list[str]:
    """Published versions (other than ``version``) whose user ids are not pseudonymised (written before it was on)."""
    out = []
    for p in sorted(out_dir.glob("*/manifest.json")):
        if p.parent.name != version and not p.parent.name.startswith((".", "_")):
            m = _read_manifest(p.parent)
            if m is None or not manifest_entry(m).get("enabled"):
                out.append(p.parent.name)
    return out


def _read_manifest(version_dir: Path) -> dict | None:
    try:
        return json.loads((version_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def clean_killed_runs(out_dir: Path) -> list[Path]:
    """Remove what killed runs left in ``out_dir``: staging folders of versions (``.tmp-<version>-<pid>-*``, a whole
    prepared copy each) and of LATEST, ``.old-*`` of an interrupted swap, the datasets cache of a run (``_cache/hf-<pid>``),
    the Spark scratch folder of an engine=spark run on a local master (``_cache/spark-<pid>``) and half-written cache entries. Called under the output_dir lock, so no other run is writing and every such name is
    stale (version names are new each run: removing only the current version's left one copy per killed run)."""
    cache = out_dir / CACHE_DIR
    removed = []
    for parent, patterns in ((out_dir, (".tmp-*", ".old-*")), (cache, ("hf-*", "spark-*")), (cache / "validated", (".tmp-*",)),
                             (cache / "tokens", (".tmp-*",))):
        for pat in patterns:
            for p in sorted(parent.glob(pat)) if parent.is_dir() else []:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _previous_version(out_dir: Path) -> str | None:
    p = out_dir / LATEST_FILE
    return p.read_text().strip() if p.is_file() else None


# the config key a user most likely has to set when most events go to quarantine for a reason
QUARANTINE_HINTS = {
    "unknown_event_type": lambda cfg: f"event_types (known now: {cfg.event_types}; add your log's types)",
    "timestamp_out_of_range": lambda cfg: f"min_timestamp / max_timestamp (now {cfg.min_timestamp} .. {cfg.max_timestamp})",
    "bad_timestamp": lambda cfg: f"columns.timestamp / timestamp_unit (now {cfg.columns.timestamp!r}, {cfg.timestamp_unit})",
    "null_timestamp": lambda cfg: f"columns.timestamp (now {cfg.columns.timestamp!r})",
    "item_not_in_catalogue": lambda cfg: f"items_path (the catalogue: {cfg.items_path}) or unknown_items=keep",
    "null_user_id": lambda cfg: f"columns.user_id (now {cfg.columns.user_id!r})",
    "null_item_id": lambda cfg: f"columns.item_id (now {cfg.columns.item_id!r})",
    "duplicate": lambda cfg: "dedup",
}


def check_quarantine_share(quarantined: dict[str, int], events_read: int, cfg: DataPrepConfig) -> None:
    """A run that quarantines most of its input is a configuration mistake far more often than bad data (a copied
    config's event types or timestamp window): stop before publishing, naming the reason and the key to look at."""
    total = sum(quarantined.values())
    if not events_read or total <= cfg.max_quarantined_share * events_read:
        return
    reason, n = max(quarantined.items(), key=lambda kv: kv[1])
    raise DataPrepError(
        f"{total:,} of {events_read:,} events ({total / events_read:.0%}) would go to quarantine, {n:,} of them as "
        f"{reason}: check {QUARANTINE_HINTS.get(reason, lambda c: 'the input')(cfg)}. Nothing was published; "
        f"max_quarantined_share={cfg.max_quarantined_share:g} is the limit (1 = publish whatever is left)")


def run(cfg: DataPrepConfig) -> Path:
    """Prepare the data described by ``cfg``; returns the published version folder. One run per output_dir at a
    time: a second concurrent run stops at once (DataPrepError naming output_dir/.lock) instead of publishing the
    same version name twice or racing on the cache."""
    cfg.require_paths()
    pz = from_config(cfg.pseudonymize_user_ids_key_env)  # the key, from the variable the config names: before any write
    if cfg.engine == "spark":  # pyspark and Java are checked before anything is written; Spark starts on first use
        from data_prep.spark_engine import SparkEngine

        engine = SparkEngine(cfg)
    else:
        engine = None
    out_dir = Path(cfg.output_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with output_dir_lock(out_dir):
        if engine is None:
            return _run_locked(cfg, out_dir, pz)
        with engine:  # stops the Spark session it started (never one it found running)
            return _run_locked(cfg, out_dir, pz, engine)


# ----------------------------------------------------------------------------- the job: _run_locked and its steps, in order


@dataclass
class PrepJob:
    """One data_prep run under the output_dir lock: what each step of ``_run_locked`` makes, in the order it makes it. A
    step reads the fields the steps before it filled (``start_job`` -> ``list_inputs`` -> ``validate_files`` ->
    ``load_catalogue`` -> ``global_stage`` -> ``build_items`` -> ``count_events`` -> ``publish`` -> ``clean_up`` ->
    ``log_summary``). No field holds a per-event array (user, item, timestamp, event type, keep flags: 21 bytes an
    event): those are locals of ``global_stage``, which drops each as soon as it is used (peak RSS at 10M+ events) and
    hands on only the sequences table built from them."""

    cfg: DataPrepConfig
    out_dir: Path
    pz: Pseudonymizer | None  # user ids pseudonymised (None: raw ids)
    engine: Any  # data_prep.spark_engine.SparkEngine, or None: the local engine
    t_start: float
    cache_dir: Path  # output_dir/_cache
    num_proc: int
    bounds: tuple[int, int]  # (min_timestamp, max_timestamp), parsed
    cutoff: int | None  # split=time: time_cutoff, parsed
    version: str  # the version this run publishes
    prev: str | None  # the version LATEST named when the run started (None: the first run)
    forget: ForgetSet  # the forget ledger, read under the lock
    # list_inputs
    ev_files: list[InputFile] = field(default_factory=list)
    it_files: list[InputFile] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # events files skipped as unreadable (on_bad_file=skip)
    skipped_items: list[dict] = field(default_factory=list)
    tok: Any = None  # the tokenizer of the item texts
    tok_path: Path | None = None
    # validate_files
    results: list[FileResult] = field(default_factory=list)  # one per readable events file
    t_validate: float = 0.0
    # load_catalogue
    cat: items_mod.Catalogue | None = None
    t_global0: float = 0.0  # timings_s.global counts from the catalogue read on
    # global_stage
    raw_kind_user: str = ""  # "int" | "string": the user ids as the events files hold them
    id_kind_user: str = ""  # the user ids of the prepared tables (pseudonyms are strings)
    id_kind_item: str = ""
    item_vocab: pa.Array | None = None  # (I,) item ids, row i = item_idx i
    quarantined: dict[str, int] = field(default_factory=dict)  # events per quarantine reason
    late_q: list[pa.Table] = field(default_factory=list)  # quarantine rows found at the global stage (Spark: all of them)
    filtered: dict[str, int] = field(default_factory=dict)  # events filtered (not quarantined) per reason
    serving: pa.Table | None = None  # serving/: the users served without a row in sequences/
    users: pa.Array | None = None  # (U,) user ids of sequences/, row u = user_idx u
    offsets: np.ndarray | None = None  # (U+1,) user u's events are [offsets[u], offsets[u+1]) of the flattened lists
    train_len: np.ndarray | None = None  # (U,) the split
    valid_pos: np.ndarray | None = None
    test_pos: np.ndarray | None = None
    n_train: np.ndarray | None = None  # (I,) training events per item
    n_events_item: np.ndarray | None = None  # (I,) events per item in sequences/
    by_day: dict = field(default_factory=dict)  # usable events per UTC day, the last BY_DAY_WINDOW days (events_by_day)
    newest_ts: int | None = None  # the newest usable event, epoch seconds
    incomplete: str | None = None  # published although expect_events_through is not met (forget requests came first)
    sequences: pa.Table | None = None
    # build_items
    text: list[str] = field(default_factory=list)  # (I,) rendered item texts ("" for items without a catalogue row)
    in_cat: np.ndarray | None = None  # (I,) bool: the item has a catalogue row
    avail: np.ndarray | None = None  # (I,) the catalogue's availability (True outside it)
    tok_stats: dict = field(default_factory=dict)
    items_table: pa.Table | None = None
    t_global: float = 0.0
    # count_events
    counts: dict = field(default_factory=dict)
    reuse: dict = field(default_factory=dict)
    # publish
    older: list[str] = field(default_factory=list)  # versions prepared before the newest forget request
    raw_versions: list[str] = field(default_factory=list)  # versions with raw user ids (pseudonymisation turned on since)
    final: Path | None = None  # the published version folder
    t_write: float = 0.0


def _run_locked(cfg: DataPrepConfig, out_dir: Path, pz: Pseudonymizer | None = None, engine=None) -> Path:
    job = start_job(cfg, out_dir, pz, engine)
    try:
        same = list_inputs(job)
        if same is not None:  # a rerun on the same inputs: what it would publish is already published
            return same
        validate_files(job)
        load_catalogue(job)
        global_stage(job)
        build_items(job)
        count_events(job)
    except InputIncomplete as e:
        if cfg.on_incomplete != "keep_previous" or job.prev is None or _read_manifest(out_dir / job.prev) is None:
            raise InputIncomplete(f"{e}. Nothing was published" + (f"; {out_dir / LATEST_FILE} stays {job.prev}" if job.prev else "")
                                  + ". Rerun once the events have landed") from None
        print0(f"[data_prep] WARNING: {e}. Nothing was published: {out_dir / LATEST_FILE} stays {job.prev} "
               "(on_incomplete=keep_previous), so tonight's table is made from it")
        return out_dir / job.prev
    publish(job)
    clean_up(job)
    log_summary(job)
    return job.final


def start_job(cfg: DataPrepConfig, out_dir: Path, pz: Pseudonymizer | None, engine) -> PrepJob:
    """The settings checked, the version named, the key checked against the previous version's, the forget ledger
    read, the leftovers of killed runs removed; the first log lines."""
    t_start = time.time()
    # our own fixed-format progress lines replace the per-file HF bars (30 files = 90 bars otherwise)
    import datasets

    datasets.disable_progress_bars()
    cache_dir = out_dir / CACHE_DIR
    cache_dir.mkdir(exist_ok=True)
    num_proc = cfg.num_proc or os.cpu_count() or 1
    bounds = (parse_time_bound(cfg.min_timestamp, "min_timestamp"), parse_time_bound(cfg.max_timestamp, "max_timestamp"))
    if bounds[0] >= bounds[1]:
        raise DataPrepError(f"min_timestamp {cfg.min_timestamp} is not before max_timestamp {cfg.max_timestamp}")
    cutoff = parse_time_bound(cfg.time_cutoff, "time_cutoff") if cfg.split == "time" else None
    version = _resolve_version(cfg, out_dir)
    prev = _previous_version(out_dir)
    check_same_key(_read_manifest(out_dir / prev) if prev else None, prev, pz)  # ids that would not join: refused
    forget = read_ledger(out_dir, pz)  # under the output_dir lock; a forget command may append meanwhile: applied next run
    # leftovers of killed runs: staging folders (whole prepared copies), their HF copies of raw input columns (raw ids),
    # half-written cache entries; ours are made below
    removed = clean_killed_runs(out_dir)
    if removed:
        _log(f"removed {len(removed)} leftover(s) of killed runs: {', '.join(p.relative_to(out_dir).as_posix() for p in removed[:5])}"
             + (" ..." if len(removed) > 5 else ""))
    _log(f"version {version} -> {out_dir / version} (previous: {prev or 'none'}); num_proc={num_proc}")
    if verbose():  # the resolved config is saved as <version>/config.yaml
        _log("config:\n" + dump_yaml(cfg))
    if pz is not None:
        _log(f"user ids pseudonymised: HMAC-SHA256 under the key in {pz.key_env} (fingerprint {pz.fingerprint})")
    return PrepJob(cfg, out_dir, pz, engine, t_start, cache_dir, num_proc, bounds, cutoff, version, prev, forget)


def list_inputs(job: PrepJob) -> Path | None:
    """The input files listed and fingerprinted, then the tokenizer loaded (fail fast on a bad path). Returns the
    previous version's folder when inputs, settings and forget requests are unchanged since it (nothing to prepare),
    else None."""
    cfg, out_dir, forget = job.cfg, job.out_dir, job.forget
    job.ev_files, job.skipped = open_inputs(cfg.events_path, "events", cfg.on_bad_file)
    job.it_files, job.skipped_items = open_inputs(cfg.items_path, "items", cfg.on_bad_file)
    _log(f"inputs: {len(job.ev_files)} events file(s) ({fmt_count(sum(f.rows for f in job.ev_files))} rows), {len(job.it_files)} items file(s)")
    if len(forget.user_ids):
        _log(f"forget: {len(forget.user_ids)} user(s) requested in {forget.path}: their events are dropped everywhere")
    same = (unchanged_version(out_dir, job.prev, cfg, job.ev_files, job.it_files, forget.sha256)
            if not cfg.version and not job.skipped + job.skipped_items else None)
    if same is not None and cfg.expect_events_through:  # no new input since: is what was published complete enough?
        c = (_read_manifest(same) or {}).get("counts") or {}
        if "events_by_day" not in c:  # prepared before the manifest counted events per day: prepare again
            same = None
        else:
            newest = c.get("events_newest_utc")
            newest = int(_dt.datetime.fromisoformat(newest).timestamp()) if newest else None
            why = completeness_problem(c["events_by_day"], newest, cfg)
            if why:  # decided like a full run's: no new file can change it
                raise InputIncomplete(why + f"; the inputs are unchanged since version {job.prev}")
    if same is not None:
        _log(f"inputs and settings unchanged since {job.prev}: nothing to prepare, {out_dir / LATEST_FILE} stays {job.prev}")
        if forget.raw_rows:  # a run killed between publishing and converting the ledger
            pseudonymise_ledger(out_dir, job.pz)
        return same
    job.tok, job.tok_path = items_mod.load_tokenizer(cfg.tokenizer)  # fail fast on a bad tokenizer path
    return None


def validate_files(job: PrepJob) -> None:
    """Every events file validated (cached per file; on Spark one task per file, the same validate_batch, no cache)."""
    t = time.time()
    if job.engine is not None:
        results, skipped_late = job.engine.validate_events(job.ev_files, job.bounds, job.forget, job.pz)
    else:
        results, skipped_late = validate_events(job.ev_files, job.cfg, job.cache_dir, job.bounds, job.num_proc, job.forget, job.pz)
    job.skipped += skipped_late
    if not results:
        raise DataPrepError(f"events: no readable file under {job.cfg.events_path}")
    job.results = results
    job.t_validate = time.time() - t


def load_catalogue(job: PrepJob) -> None:
    """The catalogue read: null/duplicate ids quarantined, texts rendered (tokenized later, in build_items)."""
    cfg = job.cfg
    job.t_global0 = time.time()
    template = items_mod.TextTemplate(cfg.item_text_template, cfg.item_text_unescape_html)
    cat = job.cat = items_mod.read_catalogue(job.it_files, cfg.item_id_column, cfg.available_column, template, cfg.id_normalization)
    _log(f"catalogue: {fmt_count(cat.rows_read)} rows, {fmt_count(len(cat.item_id))} items, quarantined {cat.quarantined}")
    _warn_id_forms(job.results, cat, cfg.id_normalization)


def global_stage(job: PrepJob) -> None:
    """Vocabularies, catalogue check and dedup (_global_local, or the Spark engine's global_stage), the single-event
    filter and serving/, dense user codes, the split, and the sequences table. The per-event arrays are locals here,
    each dropped (or filtered in place) as soon as it has served: only the sequences table's lists outlive the step."""
    cfg, results, cat = job.cfg, job.results, job.cat
    # Pass 1: distinct users (and, with unknown_items=keep, items missing from the catalogue).
    job.raw_kind_user = "int" if all(r.meta["id_kinds"]["user_id"] == "int" for r in results) else "string"
    job.id_kind_user = job.raw_kind_user if job.pz is None else "string"  # pseudonyms are hex strings whatever the raw ids were
    job.id_kind_item = "int" if cat.id_kind == "int" and all(r.meta["id_kinds"]["item_id"] == "int" for r in results) else "string"
    if job.engine is not None:  # engine: spark (data_prep/spark_engine.py): the same arrays, computed on Spark
        g = job.engine.global_stage(results, cat, job.id_kind_user, job.id_kind_item)
    else:
        g = _global_local(results, cat, cfg, job.pz, job.id_kind_user, job.id_kind_item)
    all_users, item_vocab, user, item, ts, etype, keep, last_unknown, job.quarantined, job.late_q = g
    del g  # the tail below drops columns as it goes: no second reference may keep them alive
    job.item_vocab = item_vocab
    if keep is None:  # nothing flagged (Spark drops duplicates itself)
        keep = np.ones(len(user), bool)
    job.by_day, job.newest_ts = events_by_day(ts, keep)  # usable events per day (the completeness check, the manifest)
    # users with a single usable event are filtered from sequences/ (no training target, nothing to evaluate), counted,
    # not quarantined; they and the users whose every event was on an item missing from the catalogue are kept for
    # serving only, in serving/ (the nightly table gives every active user a row)
    per_user = np.bincount(user[keep], minlength=len(all_users))
    single = keep & (per_user[user] < 2)
    # forgotten users' rows left the cached per-file results already (forget_in_entry): counted from their meta
    job.filtered = {"single_event": int(single.sum()), "forgotten": int(sum(r.meta.get("forgotten_events", 0) for r in results))}
    job.serving = serving_table(all_users, per_user, last_unknown, user[single], item[single], ts[single], etype[single])
    keep &= ~single
    del single
    if not keep.all():
        user = user[keep]
        item = item[keep]
        ts = ts[keep]
        etype = etype[keep]
    del keep
    # dense user codes 0..U-1 (old codes are sorted by id, so the order is kept)
    active = per_user >= 2
    remap = (np.cumsum(active) - 1).astype(np.int32)
    users = job.users = all_users.filter(pa.array(active))
    user = remap[user]
    offsets = job.offsets = seq.offsets_from_sorted(user, len(users))
    if cfg.split == "leave_last_out":
        train_len, valid_pos, test_pos = seq.split_leave_last_out(offsets)
    else:
        train_len, valid_pos, test_pos = seq.split_time(offsets, ts, job.cutoff)
    job.train_len, job.valid_pos, job.test_pos = train_len, valid_pos, test_pos
    job.n_train = np.bincount(item[seq.train_mask(offsets, train_len)], minlength=len(item_vocab)).astype(np.int64)
    job.n_events_item = np.bincount(item, minlength=len(item_vocab))
    job.sequences = pa.table(
        {
            "user_idx": pa.array(np.arange(len(users), dtype=np.int32)),
            "user_id": users,
            "item_idx": seq.list_array(offsets, item, pa.int32()),
            "timestamp": seq.list_array(offsets, ts, pa.int64()),
            "event_type": seq.list_array(offsets, etype, pa.int8()),
            "train_len": pa.array(train_len),
            "valid_pos": pa.array(valid_pos),
            "test_pos": pa.array(test_pos),
        }
    )


def build_items(job: PrepJob) -> None:
    """The items table, row i == item_idx i: catalogue text and availability, each distinct text tokenized once
    (cached under output_dir/_cache/tokens), training events per item."""
    cfg, cat, item_vocab = job.cfg, job.cat, job.item_vocab
    pos_in_cat = seq.codes(item_vocab, cat.item_id)  # -1 for kept unknown items
    in_cat = job.in_cat = pos_in_cat >= 0
    text = job.text = [cat.text[p] if p >= 0 else "" for p in pos_in_cat.tolist()]
    avail = job.avail = np.where(in_cat, cat.available[np.maximum(pos_in_cat, 0)] if len(cat.available) else True, True)
    token_cache = items_mod.TokenCache(job.cache_dir, items_mod.tokenizer_fingerprint(job.tok, job.tok_path, cfg.max_text_tokens), cfg.incremental)
    input_ids, job.tok_stats = items_mod.tokenize_items(job.tok, text, cfg.max_text_tokens, token_cache, job.num_proc)
    job.items_table = pa.table(
        {
            "item_idx": pa.array(np.arange(len(item_vocab), dtype=np.int32)),
            "item_id": item_vocab,
            "text": pa.array(text, pa.string()),
            "input_ids": input_ids,
            "n_train_events": pa.array(job.n_train),
            "in_catalogue": pa.array(in_cat),
            "available": pa.array(avail.astype(bool)),
        }
    )
    job.t_global = time.time() - job.t_global0


def count_events(job: PrepJob) -> None:
    """The checks that refuse to publish (quarantine share, no user left, too few users for num_shards), the manifest's
    counts and the accounting identity (read = kept + quarantined + filtered), and the reuse record."""
    cfg, results, cat, quarantined, filtered = job.cfg, job.results, job.cat, job.quarantined, job.filtered
    users, offsets, tok_stats = job.users, job.offsets, job.tok_stats
    check_quarantine_share(quarantined, sum(r.meta["rows"] for r in results), cfg)
    why = completeness_problem(job.by_day, job.newest_ts, cfg)
    if why:
        prev = _read_manifest(job.out_dir / job.prev) if job.prev else None
        forget_newer = prev is not None and (prev.get("forget") or {}).get("users_sha256", EMPTY_SHA256) != job.forget.sha256
        if cfg.on_incomplete != "keep_previous" or not forget_newer:
            raise InputIncomplete(why)
        # forgetting outranks completeness: the previous version holds users forgotten since, so it is not kept
        job.incomplete = why
        print0(f"[data_prep] WARNING: {why}. Published all the same: {job.prev} predates forget requests and cannot be "
               "kept (on_incomplete=keep_previous); the manifest records the problem (completeness) for the morning check")
    if len(users) == 0:
        raise DataPrepError(f"no user has 2 or more usable events (read {sum(r.meta['rows'] for r in results)} events); see the quarantine counts: {quarantined}")
    if len(users) < cfg.num_shards:
        raise DataPrepError(f"num_shards={cfg.num_shards} but only {len(users)} users: lower num_shards (keep it a multiple of your largest world size)")

    # counts + accounting identity (checked here as well as in the tests)
    events_read = sum(r.meta["rows"] for r in results)
    counts = job.counts = {
        "events_read": events_read,
        "events_kept": int(offsets[-1]),
        "events_quarantined": quarantined,
        "events_filtered": {k_: filtered.get(k_, 0) for k_ in EVENT_FILTER_REASONS},
        "users": len(users),
        "items": len(job.item_vocab),
        "items_in_catalogue": int(job.in_cat.sum()),
        "items_with_events": int((job.n_events_item > 0).sum()),
        "items_cold": int((job.n_train == 0).sum()),
        "items_without_text": int(sum(1 for s in job.text if not s)),
        "items_unavailable": int((~job.avail.astype(bool)).sum()),
        "items_not_in_catalogue_kept": int((~job.in_cat).sum()),
        "catalogue_rows_read": cat.rows_read,
        "items_quarantined": cat.quarantined,
        # users of the forget ledger whose events were dropped (their events: events_filtered.forgotten)
        "users_forgotten": len(set().union(*(r.meta.get("forgotten_users", []) for r in results))),
        # served but not in sequences/ (serving/): one usable event, or only events on items missing from the catalogue;
        # their events are counted in events_filtered.single_event / events_quarantined.item_not_in_catalogue
        "serving_only_users": {w: int(pc.sum(pc.equal(job.serving.column("why"), w)).as_py() or 0) for w in SERVING_WHY},
        "users_with_valid": int((job.valid_pos >= 0).sum()),
        "users_with_test": int((job.test_pos >= 0).sum()),
        "train_events": int(job.train_len.sum()),
        # events per user in sequences/: what model.max_len should cover (the recipes use about the 99th percentile)
        "history_length": history_percentiles(np.diff(offsets)),
        # usable events (sequences/ and serving/) per UTC day over the last BY_DAY_WINDOW days, and the newest one:
        # what expect_events_through checks, and a record of how much landed each night
        "events_newest_utc": (_dt.datetime.fromtimestamp(job.newest_ts, _dt.timezone.utc).isoformat(timespec="seconds")
                              if job.newest_ts is not None else None),
        "events_by_day": job.by_day,
        "text_decoded_latin1": cat.decoded_latin1,
        "text_html_unescaped": cat.html_unescaped,
        "ids_decoded_latin1": int(sum(r.meta.get("decoded_latin1", 0) for r in results)),
        # events (rows read) / catalogue rows whose raw user or item id had leading/trailing whitespace or is all digits
        # with a leading zero; id_normalization says whether they were kept as they are (exact) or normalised
        "id_normalization": cfg.id_normalization,
        "ids_whitespace_events": int(sum(r.meta.get("ids_whitespace", 0) for r in results)),
        "ids_leading_zero_events": int(sum(r.meta.get("ids_leading_zero", 0) for r in results)),
        "ids_whitespace_items": cat.ids_whitespace,
        "ids_leading_zero_items": cat.ids_leading_zero,
        "empty_event_files": int(sum(1 for r in results if r.meta["rows"] == 0)),
        "distinct_texts": tok_stats["distinct_texts"],
        "texts_tokenized": tok_stats["texts_tokenized"],
    }
    accounted = counts["events_kept"] + sum(quarantined.values()) + sum(counts["events_filtered"].values())
    if accounted != events_read:  # a bug, never a data problem: refuse to publish
        raise AssertionError(f"accounting identity broken: read {events_read} != kept+quarantined+filtered {accounted}")
    check_quarantine_share(quarantined, events_read, cfg)
    reuse = job.reuse = {
        "previous_version": job.prev,
        "events_files_reused": [str(r.inp.path) for r in results if r.reused],
        "events_files_validated": [str(r.inp.path) for r in results if not r.reused],
        "events_rows_reused": int(sum(r.meta["rows"] for r in results if r.reused)),
        "texts_reused": tok_stats["texts_reused"],
        "texts_tokenized": tok_stats["texts_tokenized"],
    }
    _log(
        f"reuse: {len(reuse['events_files_reused'])}/{len(results)} events files ({fmt_count(reuse['events_rows_reused'])} rows) from cache, "
        f"{tok_stats['texts_reused']}/{tok_stats['distinct_texts']} texts already tokenized"
    )


def publish(job: PrepJob) -> None:
    """items/ sequences/ serving/ quarantine/ config.yaml manifest.json written into a staged folder, published
    atomically as output_dir/<version>/, then output_dir/LATEST."""
    cfg, out_dir, results, version = job.cfg, job.out_dir, job.results, job.version
    job.older = versions_before_forget(out_dir, version, job.forget) if len(job.forget.user_ids) else []
    job.raw_versions = versions_with_raw_ids(out_dir, version) if job.pz is not None else []

    job.t_write = time.time()
    final = job.final = out_dir / version
    with staged_dir(final, tag="tmp") as tmp:
        import datasets

        # An explicit fingerprint: without one, Dataset() hashes the whole table by serialising it,
        # which measured +500 MB peak RSS at 10M events (3.8x the table itself).
        fp = sha256_strings([KIND, version, code_version()])[:16]
        datasets.Dataset(job.items_table, fingerprint=f"{fp}-items").save_to_disk(str(tmp / ITEMS_DIR), num_shards=1)
        datasets.Dataset(job.sequences, fingerprint=f"{fp}-sequences").save_to_disk(str(tmp / SEQUENCES_DIR), num_shards=cfg.num_shards)
        datasets.Dataset(job.serving, fingerprint=f"{fp}-serving").save_to_disk(
            str(tmp / SERVING_DIR), num_shards=cfg.num_shards if job.serving.num_rows >= cfg.num_shards else 1)
        (tmp / QUARANTINE_DIR).mkdir()
        if job.engine is not None:  # Spark collected every quarantined row, in the local engine's order
            q_parts = job.late_q
        else:
            q_parts = [pq.read_table(r.entry / "quarantine.parquet") for r in results if sum(r.meta["quarantined"].values())] + job.late_q
        q_all = pa.concat_tables(q_parts).cast(QUARANTINE_SCHEMA) if q_parts else QUARANTINE_SCHEMA.empty_table()
        pq.write_table(q_all, tmp / QUARANTINE_DIR / "events.parquet")
        cat = job.cat
        q_items = cat.quarantine if cat.quarantine is not None else pa.table({"item_id": pa.array([], pa.string()), "source_file": pa.array([], pa.string()), "source_row": pa.array([], pa.int64()), "reason": pa.array([], pa.string())})
        pq.write_table(q_items, tmp / QUARANTINE_DIR / "items.parquet")
        save_config(cfg, tmp / "config.yaml")
        atomic_write_json(tmp / "manifest.json", build_manifest(job))
    atomic_write_text(out_dir / LATEST_FILE, version + "\n")


def build_manifest(job: PrepJob) -> dict:
    """manifest.json (docs/CONTRACTS.md section 2), made when the tables are written."""
    cfg, results, pz, engine = job.cfg, job.results, job.pz, job.engine
    manifest = base_manifest(KIND, SCHEMA_VERSION)
    manifest.update(
        {
            "version": job.version,
            "config": to_dict(cfg),
            "inputs": {
                "events": [{**r.inp.fingerprint, "mtime": r.inp.mtime_ns / 1e9, "rows": r.meta["rows"], "ts_unit": r.meta["ts_unit"]} for r in results],
                "items": [{**f.fingerprint, "mtime": f.mtime_ns / 1e9, "rows": f.rows} for f in job.it_files],
            },
            "skipped_files": job.skipped + job.skipped_items,
            "counts": job.counts,
            "quarantine_check_order": CHECK_ORDER + ["item_not_in_catalogue", "duplicate"],
            "event_types": list(cfg.event_types),
            "user_id_type": "int64" if job.id_kind_user == "int" else "string",
            # keyed pseudonyms in place of user ids (data_prep/pseudonym.py): the key's variable and fingerprint,
            # never the key; raw_user_id_type = the ids the operator's events, forget requests and map-back use
            "pseudonymization": (pz.manifest_entry("int64" if job.raw_kind_user == "int" else "string") | {"older_raw_versions": job.raw_versions}
                                 if pz is not None else {"enabled": False}),
            "item_id_type": "int64" if job.id_kind_item == "int" else "string",
            "tokenizer": {**items_mod.tokenizer_fingerprint(job.tok, job.tok_path, cfg.max_text_tokens), "spec": cfg.tokenizer},
            "vocab": {"users_sha256": sha256_strings(job.users.to_pylist()), "items_sha256": sha256_strings(job.item_vocab.to_pylist())},
            "num_shards": cfg.num_shards,
            "split": {"kind": cfg.split, "time_cutoff": cfg.time_cutoff or None, "time_cutoff_epoch": job.cutoff},
            "timestamp_bounds": {"min": job.bounds[0], "max": job.bounds[1]},
            # expect_events_through as this run checked it; problem: why it was not met, when published all the same
            "completeness": {"expect_events_through": cfg.expect_events_through or None, "problem": job.incomplete},
            "reuse": job.reuse,
            "engine": engine.manifest_entry() if engine is not None else {"name": "local"},
            # the forget requests applied (users_sha256: what a rerun compares); the ids stay in the ledger only
            "forget": {**job.forget.summary(), "users_forgotten": job.counts["users_forgotten"], "events_forgotten": job.filtered["forgotten"],
                       "older_versions": job.older},
            "timings_s": {"validate": round(job.t_validate, 3), "global": round(job.t_global, 3), "total_before_write": round(time.time() - job.t_start, 3)},
        }
    )
    return manifest


def clean_up(job: PrepJob) -> None:
    """The forget ledger keeps no raw id once pseudonymisation is on; the validation cache keeps only the entries this
    run used (incremental, local engine), else nothing."""
    if job.forget.raw_rows:  # requests recorded before pseudonymisation was turned on: the ledger keeps no raw id after this
        n = pseudonymise_ledger(job.out_dir, job.pz)
        _log(f"forget ledger: {n:,} request row(s) recorded with raw ids rewritten as pseudonyms")
    if job.cfg.incremental and job.engine is None:  # keep only the cache entries this run used (the cache never outgrows the inputs)
        used = {r.entry.name for r in job.results}
        for p in (job.cache_dir / "validated").glob("*"):
            if p.name not in used:
                shutil.rmtree(p, ignore_errors=True)
    else:
        shutil.rmtree(job.cache_dir / "validated", ignore_errors=True)


def log_summary(job: PrepJob) -> None:
    """The closing lines: what was published, the history lengths, and the warnings about older versions."""
    counts, quarantined, filtered, forget, older = job.counts, job.quarantined, job.filtered, job.forget, job.older
    qsum = sum(quarantined.values())
    _log(
        f"published {job.final} in {time.time() - job.t_start:.1f}s (write {time.time() - job.t_write:.1f}s): "
        f"{counts['events_read']:,} events read, {counts['events_kept']:,} kept, {qsum:,} quarantined "
        f"{ {k_: v for k_, v in quarantined.items() if v} }, {sum(filtered.values()):,} filtered; "
        f"{counts['users']:,} users, {counts['items']:,} items ({counts['items_with_events']:,} with events, "
        f"{counts['items_in_catalogue']:,} in catalogue, {counts['items_without_text']:,} without text)"
    )
    h = counts["history_length"]
    if h:
        _log(f"history length per user: median {h['p50']:g}, p95 {h['p95']:g}, p99 {h['p99']:g}, max {h['max']:,} events "
             "(set the train config's model.max_len near the p99)")
    if job.raw_versions:
        print0(f"[data_prep] warning: user ids are pseudonymised from this version on, but versions {job.raw_versions} (and the "
               "checkpoints and tables made from them) hold raw ids until you delete them; tables of new dates carry "
               "pseudonyms (python -m data_prep.pseudonym map-back writes a copy with raw ids where you need one)")
    if len(forget.user_ids):
        _log(f"forget: {filtered['forgotten']:,} events of {counts['users_forgotten']:,} of the {len(forget.user_ids):,} requested users dropped"
             + (f"; versions prepared before the newest request still hold their data until you delete them: {older}" if older else ""))
