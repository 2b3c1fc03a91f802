"""Nightly batch inference: per-user top-K recommendations, published atomically.

    accelerate launch -m inference --config configs/inference/nightly.yaml run_date=2026-11-27
    python -m inference --config configs/inference/ci.yaml model_dir=... prepared_dir=...   # 1 process

What one run does (docs/CONTRACTS.md section 4):
1. rank 0 takes a per-date lock, restores an old table that a killed publish left aside, removes
   stale staging folders of killed runs, creates ``recs/.stage-dt=<date>-<run_id>/`` and broadcasts
   ``run_id``;
2. every rank loads ``final/`` alone (train.export.load_final) and tonight's prepared folder
   (data_prep.schema.load_prepared), maps tonight's catalogue into the model's item space by
   item_id (items known to the model keep their id embedding, new items are appended and scored
   from text alone) and encodes the whole catalogue once (I, d);
3. the users of ``sequences`` are split into contiguous slices, one per rank; each rank builds the
   latest ``max_len`` window of every history (the same left-padded layout as training), encodes
   user vectors in batches and selects the exact top-K with inference/topk.py (seen and unavailable
   items excluded), streaming row groups into its own ``part-<rank:05d>.parquet``;
4. barrier; rank 0 gathers the per-rank counts, writes _manifest.json, _config.yaml and ``_SUCCESS`` (underscore: Spark, Hive and pyarrow.dataset skip them, so the folder reads as a table)
   into the staging folder and swaps it into ``recs/dt=<date>/`` (lmrec_common.publish.publish_dir:
   an existing table is replaced whole).

A reader that sees ``dt=<date>/_SUCCESS`` sees the whole table; a kill -9 at any moment leaves the old
table (or, between the two renames of the swap, none: the next run puts the old one back first) and
the next run completes. Users who have no events at all (or were filtered by data_prep, e.g. a single
event) are not in ``sequences`` and get no row; users with fewer than K allowed items get fewer rows.
``score`` is the inner product <user, item> that training ranks by (before any temperature).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import secrets
import signal
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from inference.config import InferenceConfig
from inference.topk import resolve_method, topk_exact
from lmrec_common.config import dump_yaml
from lmrec_common.log import Progress, fmt_count, fmt_secs, print0
from lmrec_common.manifest import base_manifest
from lmrec_common.publish import atomic_write_json, atomic_write_text, clean_stale_temps, publish_dir

KIND = "lmrec.recs"
SCHEMA_VERSION = 1
PAD = -1
KILL_ENV = "LMREC_TEST_KILL_AT"  # tests: SIGKILL this process at a named point (see _maybe_die)


class InferenceError(RuntimeError):
    """A run that cannot produce a correct table (foreign model/data, another run holding the date)."""


def _maybe_die(point: str) -> None:
    """Crash-consistency tests: ``LMREC_TEST_KILL_AT=<point>`` SIGKILLs this process here (no cleanup)."""
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


# ============================================================================================ setup
def _dist_state(cfg: InferenceConfig):
    from accelerate import PartialState

    # Without CUDA, PartialState() under `accelerate launch --multi_gpu` can come up as a single
    # process (DistributedType.NO, measured with accelerate 1.15); cpu=True gives MULTI_CPU + gloo.
    return PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())


def _cores_per_rank() -> int:
    """This process's share of the node's cores (its affinity mask over the ranks on the node)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def _set_threads(cfg: InferenceConfig, device: torch.device) -> int:
    if device.type != "cpu":
        # the CPU side of a GPU rank runs small index ops (history lengths, sorts, gathers) between kernel
        # launches: one thread. With torch's default (one per core) each op was an OpenMP parallel region
        # beside the writer threads: the user tower took ~40 ms per 2,048 users in the pipeline on an H200
        # against 4.5 ms alone; with one thread ~4 ms (0.39 s per 200k users, was 4.01; docs/BENCH_INFERENCE.md)
        torch.set_num_threads(cfg.num_threads or 1)
        return torch.get_num_threads()
    n = cfg.num_threads
    if n == 0:
        n = _cores_per_rank()  # ranks on one node share its cores: no oversubscription
    torch.set_num_threads(n)
    return n


class DateLock:
    """An exclusive flock on ``recs/.lock-dt=<date>``: one run per date at a time (released by the
    kernel when the holder dies, so a kill -9 never leaves a stale lock)."""

    def __init__(self, out_root: Path, name: str):
        out_root.mkdir(parents=True, exist_ok=True)
        self.path = out_root / f".lock-{name}"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise InferenceError(f"another inference run holds {self.path} (same run_date); wait for it or kill it") from None

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _recover_and_clean(out_root: Path, name: str) -> list[str]:
    """Before a run: a kill between the two renames of a publish leaves no table and the old one
    under ``.old-<name>-*``; put it back (readers get the old table again), then remove leftovers."""
    notes = []
    final = out_root / name
    if not final.exists():
        olds = sorted((p for p in out_root.glob(f".old-{name}-*") if (p / "_SUCCESS").is_file()), key=lambda p: p.stat().st_mtime)
        if olds:
            os.replace(olds[-1], final)
            notes.append(f"restored {olds[-1].name} -> {name}")
    for p in clean_stale_temps(out_root, name):
        notes.append(f"removed stale {p.name}")
    return notes


# ============================================================================================ catalogue
def _trained_item_ids(info: dict, prepared, final_dir: Path) -> np.ndarray | None:
    """item_id strings of the model's item space (row i = model item i), or None when tonight's
    catalogue IS that space (same item vocabulary hash). The lookup (final/item_ids.parquet, then
    the training version's items/) is train.export.final_item_ids, shared with warm start."""
    from train.export import final_item_ids

    dm = info.get("data_manifest") or {}
    want = (dm.get("vocab") or {}).get("items_sha256")
    have = (prepared.manifest.get("vocab") or {}).get("items_sha256")
    n_model = int(info["model_config"]["num_items"])
    if want and want == have:
        return None
    if not want and dm.get("version") == prepared.version and len(prepared.items) == n_model:
        return None
    try:
        ids = final_item_ids(final_dir, dm, n_model)
    except Exception as e:  # WarmStartError names every place it looked
        raise InferenceError(
            f"tonight's catalogue ({prepared.path}, items_sha256 {str(have)[:12]}) differs from the one the model in {final_dir} "
            f"was trained on (version {dm.get('version')!r}, items_sha256 {str(want)[:12]}), and the model's item ids "
            f"cannot be found: {e}") from None
    return np.array(ids, dtype=object)


def build_item_space(model_ids: np.ndarray | None, tonight_ids: np.ndarray, n_model: int, text_capable: bool) -> tuple[np.ndarray, int]:
    """Map tonight's items (N,) to model item indices.

    Known items keep their model index; new items get n_model, n_model+1, ... (text-only vectors)
    when the model has a text tower, else -1 (an id-only model cannot score them).
    Returns (to_model (N,) int64, model-space size)."""
    n = len(tonight_ids)
    if model_ids is None:
        if n < n_model:
            raise InferenceError(f"catalogue has {n} items but the model has {n_model} (same vocabulary hash?)")
        to_model = np.arange(n, dtype=np.int64)
        if not text_capable:
            to_model[n_model:] = -1
        return to_model, (n if text_capable else n_model)
    pos = {s: i for i, s in enumerate(model_ids)}
    to_model = np.fromiter((pos.get(s, -1) for s in tonight_ids), dtype=np.int64, count=n)
    new = to_model < 0
    if text_capable:
        to_model[new] = n_model + np.arange(int(new.sum()), dtype=np.int64)
        return to_model, n_model + int(new.sum())
    return to_model, n_model


def encode_catalogue(model, prepared, to_model: np.ndarray, space: int, cfg: InferenceConfig, device: torch.device,
                     write_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(N, d) vectors of tonight's catalogue in tonight's item order + (N,) bool 'cannot be scored'
    + how many items borrowed a warm item's id row (cfg.cold_item_ids == "nearest") + how many items went
    through the text encoder (the others came from cfg.text_feature_cache; write_cache: this rank updates it)."""
    n = len(to_model)
    unscorable = torch.from_numpy(to_model < 0)
    encoded = 0
    if model.uses_text:
        from train.data import item_token_tensors

        ids, lens = item_token_tensors(prepared.items, model.cfg.pad_token_id)  # (N, L), (N,)
        table = torch.full((space, ids.size(1)), model.cfg.pad_token_id, dtype=torch.long)
        tlens = torch.ones(space, dtype=torch.long)  # model items missing tonight: a 1-token stub, never a candidate
        rows = torch.from_numpy(to_model)
        table[rows], tlens[rows] = ids, lens.clamp(min=1)
        model.set_item_tokens(table, tlens)
        prog = Progress("encode items", total=space, unit="items")
        encoded = model.precompute_text_features(cfg.item_batch_size, progress=prog.update,
                                                 cache_dir=cfg.text_feature_cache or None, write_cache=write_cache)
        prog.close()
    borrowed = 0
    if cfg.cold_item_ids == "nearest":
        if model.cfg.item_tower != "hybrid":
            raise InferenceError(f"cold_item_ids=nearest needs a hybrid model (id rows + text); {cfg.model_dir} is "
                                 f"item_tower {model.cfg.item_tower!r}: use cold_item_ids=text")
        present = torch.zeros(space, dtype=torch.bool)
        present[torch.from_numpy(to_model[to_model >= 0])] = True
        prog = Progress("borrow id rows", total=int(model._lenders_and_borrowers(present)[1].numel()), unit="items")
        borrowed = model.borrow_cold_ids(present, progress=prog.update)
        prog.close()
    vecs = model.all_item_vectors(cfg.item_batch_size if not model.uses_text else None)  # (space, d)
    rows = torch.from_numpy(np.where(to_model >= 0, to_model, 0)).to(vecs.device)
    cat = vecs[rows].float()
    cat[unscorable.to(cat.device)] = 0.0
    return cat.to(device).contiguous(), unscorable, borrowed, encoded


# ============================================================================================ users
def _list_col(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """list<int> column -> (flat values, offsets (B+1,) starting at 0)."""
    col = table.column(name).combine_chunks()
    offs = np.asarray(col.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
    vals = np.asarray(col.values.to_numpy(zero_copy_only=False))[offs[0] : offs[-1]]
    return vals, offs - offs[0]


def history_windows(vals: np.ndarray, offs: np.ndarray, etypes: np.ndarray, to_model: np.ndarray, T: int,
                    space: str = "model") -> tuple[torch.Tensor, torch.Tensor, np.ndarray, int]:
    """Users' item_idx lists (tonight's space) -> LEFT-padded (B, T) windows of the latest T mappable
    events + event types, the per-user window length, and how many events could not be mapped (items
    an id-only model does not know). Indices are model-space (``space="model"``) or tonight's
    (``space="tonight"``: rows of the encoded catalogue, which the user tower can gather from).

    Same layout as training (train/data.py): hist[:, -1] is the newest event, -1 pads on the left."""
    B = len(offs) - 1
    mapped = to_model[vals] if vals.size else vals.astype(np.int64)
    ok = mapped >= 0
    if space == "tonight":
        mapped = vals.astype(np.int64)
    n_unmapped = int((~ok).sum())
    row = np.repeat(np.arange(B), np.diff(offs))
    m_row, m_val, m_et = row[ok], mapped[ok], etypes[ok]
    cnt = np.bincount(m_row, minlength=B)
    ends = np.cumsum(cnt)  # exclusive end of each row in the compacted arrays
    w = np.minimum(cnt, T)
    # position of every compacted event counted from its row's end: 0 = newest
    from_end = ends[m_row] - 1 - np.arange(len(m_row))
    keep = from_end < T
    hist = np.full((B, T), PAD, dtype=np.int64)
    et = np.zeros((B, T), dtype=np.int64)
    hist[m_row[keep], T - 1 - from_end[keep]] = m_val[keep]
    et[m_row[keep], T - 1 - from_end[keep]] = m_et[keep]
    return torch.from_numpy(hist), torch.from_numpy(et), w, n_unmapped


def user_vectors_bucketed(model, hist: torch.Tensor, et: torch.Tensor, device: torch.device, buckets: int = 4,
                          item_table: torch.Tensor | None = None, non_blocking: bool = False) -> torch.Tensor:
    """model.user_vectors over (B, T) left-padded windows, in ``buckets`` groups of similar length,
    each trimmed to its longest history: (B, d) float32 in the input order. With ``item_table`` (the
    encoded catalogue, rows = the indices in ``hist``) history items are gathered, not re-encoded.

    Exact: positions count back from the newest event (train/model.py) and padded keys are masked,
    so dropping all-padding columns changes nothing for the real positions, while the user tower's
    cost (linear in T per layer, quadratic in attention) falls with the padding removed."""
    B, T = hist.shape
    lens = (hist != PAD).sum(1)
    if buckets == 1 or B == 1:  # one group: no reordering, and a window that is already tight is not copied
        t = max(int(lens.max()), 1)
        h, e = (hist, et) if t == T else (hist[:, T - t:], et[:, T - t:])
        if non_blocking and not (h.is_contiguous() and h.is_pinned()):
            h, e = h.contiguous().pin_memory(), e.contiguous().pin_memory()
        return model.user_vectors(h.to(device, non_blocking=non_blocking), e.to(device, non_blocking=non_blocking),
                                  item_table=item_table).float()
    order = torch.argsort(lens, stable=True)
    out = None
    for part in torch.tensor_split(order, min(buckets, B)):
        if part.numel() == 0:
            continue
        t = max(int(lens[part].max()), 1)
        v = model.user_vectors(hist[part, T - t:].to(device), et[part, T - t:].to(device), item_table=item_table).float()
        if out is None:
            out = torch.empty(B, v.shape[1], dtype=torch.float32, device=v.device)
        out[part.to(v.device)] = v
    assert out is not None
    return out


def _repeat_string(value: str, n: int) -> pa.Array:
    """A string array of ``n`` copies of ``value``, built from buffers (no n Python objects)."""
    b = value.encode("utf-8")
    offsets = np.arange(n + 1, dtype=np.int32) * len(b)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(b * n))


def _typed_ids(arr: pa.Array, id_type: str, what: str) -> pa.Array:
    if id_type == "int64":
        try:
            return pc.cast(arr, pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise InferenceError(f"manifest says {what}_id_type int64 but an id does not parse as an integer: {e}") from None
    return arr.cast(pa.string())


def _out_schema(user_type: str, item_type: str) -> pa.Schema:
    t = {"int64": pa.int64(), "string": pa.string()}
    return pa.schema([
        ("user_id", t.get(user_type, pa.string())),
        ("rank", pa.int16()),
        ("item_id", t.get(item_type, pa.string())),
        ("score", pa.float32()),
        ("model_version", pa.string()),
        ("run_date", pa.date32()),
    ])


def resolve_write_streams(cfg: InferenceConfig, device: torch.device) -> int:
    """Part files (writer threads) per rank. auto (0): 1 on CPU, where the cores score; on a GPU the
    scoring leaves the cores free and one zstd writer (~8M rows/s, 80k users/s at K=100 on one core,
    docs/BENCH_INFERENCE.md) is slower than a GPU's top-K, so up to 4, within the rank's share of cores."""
    if cfg.write_streams:
        return cfg.write_streams
    if device.type == "cpu":
        return 1
    return max(1, min(4, _cores_per_rank() - 1))


def part_names(rank: int, streams: int) -> list[str]:
    """``part-<rank:05d>.parquet`` (one stream) or ``part-<rank:05d>-<stream:02d>.parquet``."""
    if streams == 1:
        return [f"part-{rank:05d}.parquet"]
    return [f"part-{rank:05d}-{j:02d}.parquet" for j in range(streams)]


def score_users(*args, streams: int = 1, **kwargs) -> dict:
    """Score users lo..hi-1 of ``seq`` and stream their rows into ``writers`` (see _score_users)."""
    from concurrent.futures import ThreadPoolExecutor

    with ExitStack() as stack:
        pools = [stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"parquet-writer-{j}"))
                 for j in range(streams)]
        return _score_users(*args, pools=pools, **kwargs)


def _rows_table(schema: pa.Schema, users: pa.Array, user_type: str, idx_np: np.ndarray, sc_np: np.ndarray, valid: np.ndarray,
                per_user: np.ndarray, item_ids_out: pa.Array, model_version: str, day_num: int) -> pa.Table:
    """One chunk's rows: (b, k') top-K indices/scores -> the output table (valid entries only)."""
    n = int(per_user.sum())
    rows_user = np.repeat(np.arange(idx_np.shape[0]), per_user)
    ranks = np.broadcast_to(np.arange(1, idx_np.shape[1] + 1, dtype=np.int16), idx_np.shape)[valid]
    return pa.table({
        "user_id": _typed_ids(users, user_type, "user").take(pa.array(rows_user)),
        "rank": pa.array(ranks, pa.int16()),
        "item_id": item_ids_out.take(pa.array(idx_np[valid])),
        "score": pa.array(sc_np[valid], pa.float32()),
        "model_version": _repeat_string(model_version, n),
        "run_date": pa.array(np.full(n, day_num, np.int32), pa.date32()),
    }, schema=schema)


def _build_and_write(writer: pq.ParquetWriter, *args) -> None:
    tbl = _rows_table(writer.schema, *args)
    writer.write_table(tbl, row_group_size=max(tbl.num_rows, 1))


def _read_chunk(seq: pa.Table, s: int, n: int, cutoff: int | None, to_model: np.ndarray, T: int) -> dict:
    """Users s..s+n-1 of ``seq`` -> what the user tower and the top-K need (CPU only: Arrow and numpy, no
    torch device work, so it can run in the reader thread while the device scores the chunk before):
    the active users with a usable history, their (b, T) windows, their CSR histories (seen items) and
    this chunk's counts."""
    t0 = time.perf_counter()
    c = dict(users_inactive=0, users_no_usable_history=0, history_events_unmapped=0)
    t = seq.slice(s, n)
    vals, offs = _list_col(t, "item_idx")
    ets, _ = _list_col(t, "event_type")
    users = t.column("user_id").combine_chunks()
    sel = np.arange(len(offs) - 1)
    if cutoff is not None:
        ts, toffs = _list_col(t, "timestamp")
        lens = np.diff(toffs)
        last = np.where(lens > 0, ts[np.maximum(toffs[1:] - 1, 0)], np.iinfo(np.int64).min)
        active = last >= cutoff
        c["users_inactive"] = int((~active).sum())
        sel = np.nonzero(active)[0]
        if len(sel) < len(offs) - 1:
            # keep only active users: re-slice the list columns
            starts, ends = offs[sel], offs[sel + 1]
            take = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)]) if len(sel) else np.zeros(0, np.int64)
            vals, ets = vals[take], ets[take]
            offs = np.concatenate([[0], np.cumsum(ends - starts)])
            users = users.take(pa.array(sel))
    hist = et = None
    if len(sel):
        hist, et, w, unm = history_windows(vals, offs, ets.astype(np.int64), to_model, T, space="tonight")
        c["history_events_unmapped"] = unm
        has = w > 0
        c["users_no_usable_history"] = int((~has).sum())
        if not has.all():
            keep = np.nonzero(has)[0]
            hist, et = hist[keep], et[keep]
            users = users.take(pa.array(keep))
            starts, ends = offs[keep], offs[keep + 1]
            take = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)]) if len(keep) else np.zeros(0, np.int64)
            vals = vals[take]
            offs = np.concatenate([[0], np.cumsum(ends - starts)])
    if hist is not None and not hist.shape[0]:
        hist = None
    return dict(n=n, counts=c, users=users, hist=hist, et=et, offs=offs, vals=vals, busy_s=time.perf_counter() - t0)


def _score_users(model, cfg: InferenceConfig, seq: pa.Table, lo: int, hi: int, cat_vecs: torch.Tensor, unavailable: torch.Tensor,
                to_model: np.ndarray, item_ids_out: pa.Array, user_type: str, writers: list[pq.ParquetWriter], model_version: str,
                run_date: str, device: torch.device, pools) -> dict:
    """Score users lo..hi-1 of ``seq`` and stream their rows into ``writers``: chunk j goes to
    writers[j % len(writers)], built and written in that writer's own thread (pyarrow releases the
    GIL), so encoding overlaps the next chunks' scoring; one chunk in flight per writer bounds memory.
    With ``prefetch_chunks`` > 0 a reader thread builds the next chunks' history windows (Arrow + numpy,
    _read_chunk) while this thread runs the tower and the top-K, so reading overlaps scoring too; chunks
    are consumed in order, so the output is the same with or without it.
    Returns this rank's counts (rows and users per file in ``files``). On an error the executors'
    exit waits for the reads and writes in flight before the writers are closed."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    T = min(cfg.max_history or model.cfg.max_len, model.cfg.max_len)
    B = cfg.user_batch_size
    sdt = torch.bfloat16 if cfg.score_dtype == "bfloat16" else torch.float32
    tower_table = cat_vecs  # float32, tonight's order: the user tower gathers history items from it
    cat_vecs = cat_vecs.to(sdt)
    num_items = cat_vecs.shape[0]
    item_chunk = max(cfg.k, (cfg.score_budget_mb << 20) // (4 * B))
    method = resolve_method(cfg.topk_method, min(item_chunk, num_items))
    day = _dt.date.fromisoformat(run_date)
    cutoff = None
    if cfg.active_since_days:
        # active = an event within the N days that end with run_date (UTC), i.e. ts >= run_date+1 - N days
        start = _dt.datetime.combine(day + _dt.timedelta(days=1 - cfg.active_since_days), _dt.time(), _dt.timezone.utc)
        cutoff = int(start.timestamp())
    c = dict(users=hi - lo, users_scored=0, users_inactive=0, users_no_usable_history=0, users_fewer_than_k=0, rows=0,
             history_events_unmapped=0)
    # where this rank's time goes, as the main thread sees it: read_s = waiting for (or doing) the reads,
    # write_s = waiting for the writers; read_busy_s = the reads' own time (in the reader thread when prefetching)
    tm = dict(read_s=0.0, user_tower_s=0.0, topk_s=0.0, write_s=0.0, read_busy_s=0.0)
    day_num = day.toordinal() - _dt.date(1970, 1, 1).toordinal()
    per_file = [dict(rows=0, users=0) for _ in writers]
    pending = [None] * len(writers)
    chunk_no = 0
    prog = Progress("recommend", total=hi - lo, unit="users")
    starts = list(range(lo, hi, B))
    ahead = cfg.prefetch_chunks
    with ExitStack() as stack:
        reader = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="history-reader")) if ahead else None
        queued: deque = deque()
        stack.callback(lambda: [f.cancel() for f in queued])  # on an error: drop the reads not started (runs first)

        def next_chunk(i: int) -> dict:
            if reader is None:
                return _read_chunk(seq, starts[i], min(B, hi - starts[i]), cutoff, to_model, T)
            while len(queued) < ahead + 1 and i + len(queued) < len(starts):
                k = starts[i + len(queued)]
                queued.append(reader.submit(_read_chunk, seq, k, min(B, hi - k), cutoff, to_model, T))
            return queued.popleft().result()

        # overlap_scoring: chunk i is collected after chunk i+1 is launched (on CPU the work is done by then:
        # same order, same table); on CUDA the launch returns before the device has finished
        pipelined = cfg.overlap_scoring
        overlap = pipelined and device.type == "cuda"
        # the exclusion list once, on the device (torch.nonzero per chunk would wait for the device each time)
        unavail_idx = torch.nonzero(unavailable, as_tuple=False).flatten() if unavailable is not None else None

        def launch(r: dict) -> dict:
            """Queue chunk r's user tower and top-K; with overlap, also the copy of its (b, K) result into
            pinned host memory and an event after it, and return without waiting for the device."""
            hist, et = r["hist"], r["et"]  # user_vectors_bucketed pins what it copies when non_blocking
            with torch.inference_mode():
                # length buckets cut padding, which pays on CPU; on a GPU the tower is launch-bound and one bucket
                # ran 1.9x faster (2.4 vs 4.5 ms per 2,048 users, H200, docs/BENCH_INFERENCE.md)
                u = user_vectors_bucketed(model, hist, et, device, buckets=1 if device.type == "cuda" else 4,
                                          item_table=tower_table, non_blocking=overlap).to(sdt)  # (b, d)
                t_tower = time.perf_counter()
                seen_off = seen_val = None
                if cfg.exclude_seen:
                    seen_off, seen_val = torch.from_numpy(r["offs"]), torch.from_numpy(r["vals"].astype(np.int64))
                    if overlap:
                        seen_off, seen_val = seen_off.pin_memory(), seen_val.pin_memory()
                scores, idx = topk_exact(u, cat_vecs, cfg.k, seen_offsets=seen_off, seen_items=seen_val,
                                         unavailable_idx=unavail_idx, item_chunk=item_chunk, method=method)
            if not overlap:
                return dict(r=r, idx=idx.cpu(), sc=scores.cpu(), done=None, t_tower=t_tower)
            idx_h = torch.empty(idx.shape, dtype=idx.dtype, pin_memory=True)
            sc_h = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
            idx_h.copy_(idx, non_blocking=True)
            sc_h.copy_(scores, non_blocking=True)
            done = torch.cuda.Event()
            done.record()  # after the copies on this stream: waiting on it waits for this chunk only
            return dict(r=r, idx=idx_h, sc=sc_h, done=done, t_tower=t_tower)

        def collect(h: dict) -> None:
            """Wait for a launched chunk's result (if it is still on its way) and hand it to its writer."""
            nonlocal chunk_no
            t2 = time.perf_counter()
            if h["done"] is not None:
                h["done"].synchronize()
            idx_np, sc_np = h["idx"].numpy(), h["sc"].numpy()
            t3 = time.perf_counter()
            tm["topk_s"] += t3 - t2
            valid = idx_np >= 0  # (b, k'); -1 = the user has fewer allowed items than k
            per_user = valid.sum(1)
            b = idx_np.shape[0]
            c["users_scored"] += b
            c["users_fewer_than_k"] += int((per_user < cfg.k).sum())
            n = int(per_user.sum())
            j = chunk_no % len(writers)
            chunk_no += 1
            per_file[j]["users"] += b
            if n:
                if pending[j] is not None:
                    pending[j].result()
                pending[j] = pools[j].submit(_build_and_write, writers[j], h["r"]["users"], user_type, idx_np, sc_np, valid,
                                             per_user, item_ids_out, model_version, day_num)
                per_file[j]["rows"] += n
                c["rows"] += n
            tm["write_s"] += time.perf_counter() - t3

        in_flight = None  # overlap: the chunk launched last, collected after the next one is launched
        for i in range(len(starts)):
            t0 = time.perf_counter()
            r = next_chunk(i)
            for k2, v in r["counts"].items():
                c[k2] += v
            tm["read_busy_s"] += r["busy_s"]
            t1 = time.perf_counter()
            tm["read_s"] += t1 - t0
            if r["hist"] is not None:
                h = launch(r)
                t2 = time.perf_counter()
                tm["user_tower_s"] += h["t_tower"] - t1
                tm["topk_s"] += t2 - h["t_tower"]  # queueing (overlap) or the whole top-K with its copy out
                if in_flight is not None:
                    collect(in_flight)  # the previous chunk: the device has been working on it meanwhile
                    in_flight = None
                if pipelined:
                    in_flight = h
                else:
                    collect(h)
            prog.update(r["n"])
            if i == 0:
                _maybe_die("after_first_batch")
        if in_flight is not None:
            collect(in_flight)
    t3 = time.perf_counter()
    for f in pending:
        if f is not None:
            f.result()
    tm["write_s"] += time.perf_counter() - t3
    prog.close()
    c["timings_s"] = {k: round(v, 3) for k, v in tm.items()}
    c["files"] = per_file
    return c


# ============================================================================================ run
def run(cfg: InferenceConfig) -> Path:
    """Write ``<output_dir>/dt=<run_date>/`` (see module docstring). Returns the published folder."""
    cfg.require_paths()
    t0 = time.time()
    state = _dist_state(cfg)
    rank, world = state.process_index, state.num_processes
    device = torch.device("cpu") if cfg.device == "cpu" else state.device
    if cfg.device == "cuda" and device.type != "cuda":
        raise InferenceError(f"device: cuda, but this process got {device} (torch.cuda.is_available() = "
                             f"{torch.cuda.is_available()}); use device: auto or cpu")
    threads = _set_threads(cfg, device)
    run_date = cfg.resolved_run_date()
    name = f"dt={run_date}"
    out_root = Path(cfg.output_dir)
    final = out_root / name

    # ---- 1. lock, recover, clean, stage (rank 0), agree on run_id
    from accelerate.utils import broadcast_object_list, gather_object

    lock = None
    payload: list[Any] = [None]
    if rank == 0:
        try:
            lock = DateLock(out_root, name)
            for note in _recover_and_clean(out_root, name):
                print0(f"[inference] {note}")
            run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + f"-{secrets.token_hex(3)}"
            stage = out_root / f".stage-{name}-{run_id}"
            stage.mkdir(parents=True)
            payload = [{"run_id": run_id}]
        except Exception as e:  # tell the other ranks instead of leaving them in the broadcast
            payload = [{"error": f"{type(e).__name__}: {e}"}]
    if world > 1:
        broadcast_object_list(payload, from_process=0)
    if "error" in payload[0]:
        raise InferenceError(f"rank 0 could not start the run: {payload[0]['error']}")
    run_id = payload[0]["run_id"]
    stage = out_root / f".stage-{name}-{run_id}"
    if not stage.is_dir():
        raise InferenceError(f"rank {rank}: staging folder {stage} is not visible (output_dir must be on a filesystem shared by all nodes)")

    try:
        # ---- 2. model + data
        from data_prep.schema import load_prepared
        from train.export import load_final

        model, info = load_final(cfg.model_dir)
        model.to(device)
        prepared = load_prepared(cfg.prepared_dir)
        pm = prepared.manifest
        model_version = str(info.get("model_version"))
        n_model = int(model.cfg.num_items)
        print0(f"[inference] run_date {run_date} | run_id {run_id} | world {world} | device {device} | threads/rank {threads}")
        print0(f"[inference] model {cfg.model_dir} (version {model_version}, item_tower {model.cfg.item_tower}, {n_model} items, "
               f"trained on data {info.get('data_version')}) | data {prepared.path} (version {prepared.version}, "
               f"{len(prepared.items)} items, {len(prepared.sequences)} users)")
        t_load = time.time()

        # ---- 3. catalogue: tonight's items in the model's item space, encoded once
        tonight_ids = np.array(prepared.items.data.table.column("item_id").to_pylist(), dtype=object)
        model_ids = _trained_item_ids(info, prepared, Path(cfg.model_dir))
        to_model, space = build_item_space(model_ids, tonight_ids, n_model, model.uses_text)
        cat_vecs, unscorable, borrowed, encoded = encode_catalogue(model, prepared, to_model, space, cfg, device,
                                                                   write_cache=rank == 0)
        avail = np.asarray(prepared.items.data.table.column("available").to_numpy(zero_copy_only=False), dtype=bool)
        unavailable = unscorable.clone()
        if cfg.exclude_unavailable:
            unavailable |= torch.from_numpy(~avail)
        unavailable = unavailable.to(device)
        n_new = int((to_model >= n_model).sum()) if model.uses_text else int((to_model < 0).sum())
        items_counts = dict(items=len(tonight_ids), items_known_to_model=int(((to_model >= 0) & (to_model < n_model)).sum()),
                            items_new_text_only=int((to_model >= n_model).sum()), items_unscorable=int(unscorable.sum()),
                            items_unavailable=int((~avail).sum()), candidates=int((~unavailable).sum()),
                            items_borrowing_id_row=borrowed, items_text_encoded=encoded)
        print0(f"[inference] catalogue {fmt_count(len(tonight_ids))} items: {items_counts['items_known_to_model']} known to the model, "
               f"{n_new} new ({'text only' if model.uses_text else 'not scorable: id-only model'}), "
               + (f"{borrowed} without training events borrow a warm item's id row (cold_item_ids=nearest), " if borrowed else "")
               + (f"{encoded} through the text encoder ({space - encoded} from {cfg.text_feature_cache}), " if cfg.text_feature_cache and model.uses_text else "")
               + f"{items_counts['items_unavailable']} unavailable -> {items_counts['candidates']} candidates | vectors {tuple(cat_vecs.shape)} "
               f"in {fmt_secs(time.time() - t_load)}")
        t_enc = time.time()

        # ---- 4. this rank's users -> its part file
        seq = prepared.sequences.data.table
        n_users = seq.num_rows
        bounds = np.linspace(0, n_users, world + 1).round().astype(np.int64)
        lo, hi = int(bounds[rank]), int(bounds[rank + 1])
        item_ids_out = _typed_ids(prepared.items.data.table.column("item_id").combine_chunks(), pm.get("item_id_type", "string"), "item")
        schema = _out_schema(pm.get("user_id_type", "string"), pm.get("item_id_type", "string"))
        streams = resolve_write_streams(cfg, device)
        names = part_names(rank, streams)
        comp = None if cfg.compression == "none" else cfg.compression
        with ExitStack() as stack:
            # dictionary pages only for the constant columns: on ids and scores they cost 3x the write
            # time and make files larger (measured in docs/BENCH_INFERENCE.md)
            writers = [stack.enter_context(pq.ParquetWriter(stage / nm, schema, compression=comp,
                                                            use_dictionary=["model_version", "run_date"])) for nm in names]
            counts = score_users(model, cfg, seq, lo, hi, cat_vecs, unavailable, to_model, item_ids_out,
                                 pm.get("user_id_type", "string"), writers, model_version, run_date, device, streams=streams)
        for nm, f in zip(names, counts["files"]):
            f.update(file=nm, bytes=(stage / nm).stat().st_size)
        counts.update(rank=rank, user_range=[lo, hi], write_streams=streams, device=str(device))
        _maybe_die("after_part")
        t_score = time.time()
        print(f"[inference] rank {rank}: {counts['users_scored']} users -> {counts['rows']} rows in {fmt_secs(t_score - t_enc)} "
              f"({counts['users_scored'] / max(t_score - t_enc, 1e-9):.0f} users/s)", flush=True)
        err = None
    except Exception as e:  # every rank must reach the gather, or the others hang in the barrier
        counts, err = {"rank": rank, "error": f"{type(e).__name__}: {e}"}, e
        t_load = t_enc = t_score = time.time()
        model_version, items_counts, n_users = "", {}, 0
        info = model = prepared = None

    # ---- 5. barrier + gather counts; rank 0 publishes, then tells every rank how it went
    all_counts = gather_object([counts]) if world > 1 else [counts]
    status: list[Any] = [None]
    if rank == 0:
        try:
            _publish(cfg, stage, final, sorted(all_counts, key=lambda c: c["rank"]), run_date=run_date, run_id=run_id, world=world,
                     info=info if err is None else {}, model=model if err is None else None, prepared=prepared if err is None else None,
                     items_counts=items_counts, n_users=n_users, model_version=model_version,
                     timings={"load": t_load - t0, "encode_catalogue": t_enc - t_load, "score_and_write_rank0": t_score - t_enc}, t0=t0)
        except Exception as e:
            import shutil

            shutil.rmtree(stage, ignore_errors=True)
            status = [f"{type(e).__name__}: {e}"]
            if err is None:
                err = e
        finally:
            if lock is not None:
                lock.release()
    if world > 1:
        broadcast_object_list(status, from_process=0)
    if err is not None:
        raise err
    if status[0] is not None:
        raise InferenceError(f"rank 0 did not publish {final}: {status[0]}")
    return final


def _publish(cfg: InferenceConfig, stage: Path, final: Path, all_counts: list[dict], *, run_date: str, run_id: str, world: int,
             info: dict, model, prepared, items_counts: dict, n_users: int, model_version: str, timings: dict, t0: float) -> None:
    """Rank 0, after every rank wrote its part: manifest + config + _SUCCESS into the stage, then swap."""
    errors = [c for c in all_counts if "error" in c]
    if errors:
        raise InferenceError(f"rank(s) {[c['rank'] for c in errors]} failed ({errors[0]['error']}); nothing published")
    missing = [f["file"] for c in all_counts for f in c["files"] if not (stage / f["file"]).is_file()]
    if missing:
        raise InferenceError(f"part files {missing} are missing from {stage}; nothing published")
    pm = prepared.manifest
    totals = {k: int(sum(c[k] for c in all_counts)) for k in
              ("users", "users_scored", "users_inactive", "users_no_usable_history", "users_fewer_than_k", "rows", "history_events_unmapped")}
    schema = _out_schema(pm.get("user_id_type", "string"), pm.get("item_id_type", "string"))
    man = base_manifest(KIND, SCHEMA_VERSION)
    man.update({
        "run_date": run_date, "run_id": run_id, "k": cfg.k, "world_size": world, "devices": [c["device"] for c in all_counts],
        "model": {"path": str(Path(cfg.model_dir).resolve()), "model_version": model_version,
                  "trained_on_data_version": info.get("data_version"), "item_tower": model.cfg.item_tower},
        "data": {"path": str(prepared.path.resolve()), "version": prepared.version, "user_id_type": pm.get("user_id_type"),
                 "item_id_type": pm.get("item_id_type"), "users_in_sequences": n_users},
        "catalogue": items_counts,
        "counts": totals,
        # one entry per file; a rank's user_range and timings_s are repeated on each of its files
        "parts": [{"file": f["file"], "rank": c["rank"], "rows": f["rows"], "users": f["users"], "bytes": f["bytes"],
                   "user_range": c["user_range"], "timings_s": c["timings_s"]}
                  for c in all_counts for f in c["files"]],
        "columns": {f.name: str(f.type) for f in schema},
        "score": "inner product <user_vector, item_vector>",
        "exclusions": {"seen": cfg.exclude_seen, "unavailable": cfg.exclude_unavailable, "active_since_days": cfg.active_since_days},
        "timings_s": {**{k: round(v, 2) for k, v in timings.items()}, "total": round(time.time() - t0, 2)},
        "config": asdict(cfg),
    })
    atomic_write_json(stage / "_manifest.json", man)
    atomic_write_text(stage / "_config.yaml", dump_yaml(cfg))
    atomic_write_text(stage / "_SUCCESS", "")  # the last file of the table, written before the swap
    _maybe_die("before_publish")
    publish_dir(stage, final)
    print0(f"[inference] published {final}: {totals['users_scored']} users, {totals['rows']} rows, "
           f"{sum(len(c['files']) for c in all_counts)} part file(s) from {world} rank(s), total {fmt_secs(time.time() - t0)}")


def summary(path: Path) -> str:
    m = json.loads((Path(path) / "_manifest.json").read_text())
    return json.dumps({k: m[k] for k in ("run_date", "k", "counts", "catalogue")}, indent=1)
