"""Nightly batch inference: per-user top-K recommendations, published atomically.

    accelerate launch -m inference --config configs/inference/nightly.yaml run_date=2026-11-27
    python -m inference --config configs/inference/ci.yaml model_dir=... prepared_dir=...   # 1 process

What one run does (docs/CONTRACTS.md section 4):
1. rank 0 takes a per-date lock, restores an old table that a killed publish left aside, removes
   stale staging folders of killed runs, creates ``recs/.stage-dt=<date>-<run_id>/`` and broadcasts
   ``run_id``;
2. every rank loads ``final/`` alone (train.export.load_final: weights only) and tonight's prepared folder
   (data_prep.schema.load_prepared), maps tonight's catalogue into the model's item space by
   item_id (train/catalogue.py Catalogue.for_tonight: items known to the model keep their id embedding, new items
   are appended and scored from text alone) and encodes the whole catalogue once (I, d) (encode_catalogue);
3. the users of ``sequences`` and ``serving`` (users with one usable event, or only events on items missing from
   the catalogue) are split into contiguous slices, one per rank; each rank builds the latest ``max_len`` window
   of every history (the same left-padded layout as training), encodes user vectors in batches and selects the
   exact top-K with inference/topk.py (seen and unavailable items excluded), streaming row groups into its own
   ``part-<rank:05d>-<run_id>.parquet``; a user with no history item the model knows gets the most popular allowed items
   instead (``source`` = fallback). With several ``variants`` (an A/B test) each variant's model is loaded in
   turn and scores the users that assign_variants gives it (a salted hash of the user id);
4. barrier; rank 0 gathers the per-rank counts, writes _manifest.json, _config.yaml and ``_SUCCESS`` (underscore: Spark, Hive and pyarrow.dataset skip them, so the folder reads as a table)
   into the staging folder, renames it to the immutable run folder ``recs/_runs/dt=<date>/run=<run_id>/`` and
   points the symlink ``recs/dt=<date>`` at it with one rename (lmrec_common.publish place_run, point_to); then
   removes run folders replaced more than ``replaced_run_grace_s`` ago (sweep_runs, every date whose lock is free).

A reader resolves ``recs/dt=<date>`` once (os.path.realpath, lmrec_common.publish.resolve_table) and reads that
folder: it is whole (``_SUCCESS`` is written before the link moves), never changes, and stays for the grace period
after a rerun replaces it, so a reader never fails half-way, never mixes two runs and never finds no table where
one was published (docs/CONTRACTS.md section 4). A kill -9 at any moment leaves the old table current, and the
next run completes. Every user with a usable event in tonight's prepared data gets K rows (fewer only when
fewer than K items are allowed for them); users with no usable event at all get none. ``score`` is the inner
product <user, item> that training ranks by (before any temperature) for ``source`` = model rows, and the item's
popularity count (inference.run.fallback_popularity) for ``source`` = fallback rows.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import secrets
import signal
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from inference.config import InferenceConfig, VariantConfig
from inference.topk import resolve_method, topk_exact
from lmrec_common.config import dump_yaml
from lmrec_common.log import Progress, fmt_count, fmt_secs, print0
from lmrec_common.manifest import base_manifest
from lmrec_common.mapped import dataset_files, release_mapped_pages
from lmrec_common.publish import atomic_write_json, atomic_write_text, place_run, point_to, recover_table, run_dir, sweep_runs

KIND = "lmrec.recs"
SCHEMA_VERSION = 3  # 2: columns source and variant; manifest sources, variants, bucketing, fallback; 3: run folders behind the dt= link, run_id in part names
PAD = -1
NO_EVENT = np.iinfo(np.int64).min
SOURCES = ("model", "fallback")
# per-rank and per-variant counts (summed over ranks in the manifest)
COUNT_KEYS = ("users", "users_scored", "users_model", "users_fallback", "users_inactive", "users_no_usable_history",
              "users_fewer_than_k", "rows", "rows_model", "rows_fallback", "history_events_unmapped")
BUCKET_HASH = ("u = int.from_bytes(sha256(salt + '\\x1f' + user_id).digest()[:8], 'big') / 2**64; variant = the first whose "
               "cumulative share (config order) exceeds u; user_id as the table prints it (decimal for integer ids), UTF-8")
RELEASE_EVERY_CHUNKS = 8  # user chunks between two releases of the shards' resident pages (_score_users)
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


class ExclusiveLock:
    """An exclusive, non-blocking flock on ``path`` (released by the kernel when the holder dies, so a kill -9 never
    leaves a stale lock); held already: ``busy(path)`` is raised."""

    def __init__(self, path: Path, busy: Callable[[Path], Exception]):
        self.path = path
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise busy(self.path) from None

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class DateLock(ExclusiveLock):
    """``recs/.lock-dt=<date>``: one run per date at a time."""

    def __init__(self, out_root: Path, name: str):
        out_root.mkdir(parents=True, exist_ok=True)
        super().__init__(out_root / f".lock-{name}", lambda p: InferenceError(
            f"another inference run holds {p} (same run_date); wait for it or kill it"))


def _recover_and_clean(out_root: Path, name: str) -> list[str]:
    """Before a run: a kill between the two renames of an old-layout swap (a filesystem without RENAME_EXCHANGE,
    or a table published before run folders) leaves no table and the old one under ``.old-<name>-*``; put it back
    (readers get the old table again), then remove leftovers (staging folders, unused links)."""
    return recover_table(out_root, name)


def _sweep_replaced(out_root: Path, name: str, grace_s: float) -> list[str]:
    """Rank 0 after publishing, holding ``name``'s lock: remove run folders replaced more than ``grace_s`` ago, of
    this date and of every other date whose lock is free (a date being rerun now is left to that run)."""
    from lmrec_common.publish import RUNS_DIR

    notes = [f"removed replaced run {p.parent.name}/{p.name}" for p in sweep_runs(out_root, name, grace_s)]
    runs = out_root / RUNS_DIR
    for d in sorted(runs.iterdir()) if runs.is_dir() else []:
        if d.name == name or not d.is_dir():
            continue
        try:
            lock = DateLock(out_root, d.name)
        except InferenceError:
            continue
        try:
            notes += [f"removed replaced run {p.parent.name}/{p.name}" for p in sweep_runs(out_root, d.name, grace_s)]
        finally:
            lock.release()
    return notes


# ============================================================================================ A/B buckets
def assign_variants(user_ids, salt: str, shares) -> np.ndarray:
    """(n,) int64 variant index of each user id (BUCKET_HASH): a pure function of (salt, user id, shares), so the
    same on every night, in any row order, on any number of ranks. ``user_ids``: strings (a pyarrow string array or
    a list); ``shares``: the variants' shares in config order, summing to 1. With one variant: all 0, nothing hashed.

    A user's position u in [0, 1) does not depend on the shares: with two variants, moving the split from 10/90 to
    20/80 moves only the users between the two boundaries (a ramp-up keeps the treatment's users)."""
    n = len(user_ids)
    if len(shares) <= 1:
        return np.zeros(n, np.int64)
    if isinstance(user_ids, (pa.Array, pa.ChunkedArray)):
        user_ids = user_ids.cast(pa.string()).to_pylist()
    base = hashlib.sha256(salt.encode("utf-8") + b"\x1f")

    def u64(s: str) -> int:
        h = base.copy()
        h.update(s.encode("utf-8"))
        return int.from_bytes(h.digest()[:8], "big")

    u = np.fromiter((u64(x) for x in user_ids), dtype=np.uint64, count=n).astype(np.float64) / 2.0**64
    edges = np.cumsum(np.asarray(shares, np.float64))
    edges[-1] = np.inf  # rounding (u can round to 1.0 in float64) never leaves a user without a variant
    return np.searchsorted(edges, u, side="right").astype(np.int64)


def check_variants(cfg: InferenceConfig) -> list[VariantConfig]:
    """The variants to run (cfg.resolved_variants), each model_dir an exported final/: a bad bucket config is one
    ConfigError naming the key, raised before anything is staged (nothing is published)."""
    from lmrec_common.config import ConfigError

    keyed = [("variants[%d]." % i, v) for i, v in enumerate(cfg.variants)]
    try:
        for key, v in keyed:
            try:
                v.validate()
            except ValueError as e:
                raise ValueError(f"{key}{e}") from None
        cfg.validate()
    except ValueError as e:
        raise ConfigError(f"inference config: {e}") from None
    variants = cfg.resolved_variants()
    for i, v in enumerate(variants):
        key = f"variants[{i}].model_dir" if cfg.variants else "model_dir"
        p = Path(v.model_dir)
        if not (p / "export.json").is_file():
            what = "does not exist" if not p.exists() else "has no export.json (not a final/ folder written by train)"
            raise ConfigError(f"inference config: {key}: {p} {what}; name a checkpoints/<run>/final folder")
    return variants


# ============================================================================================ fallback
def fallback_popularity(prepared, users: pa.Table, cfg: InferenceConfig, run_date: str) -> tuple[np.ndarray, str]:
    """(N,) float64 popularity of tonight's items for the fallback list, and what it counts: the items' training
    events (items.n_train_events; fallback_days = 0), or every prepared history's events in the fallback_days days
    that end with run_date (UTC)."""
    n = len(prepared.items)
    if not cfg.fallback_days:
        pop = np.asarray(prepared.items.data.table.column("n_train_events").to_numpy(zero_copy_only=False), np.float64)
        return pop, "training events per item (items.n_train_events)"
    day = _dt.date.fromisoformat(run_date)
    start = int(_dt.datetime.combine(day + _dt.timedelta(days=1 - cfg.fallback_days), _dt.time(), _dt.timezone.utc).timestamp())
    end = start + cfg.fallback_days * 86_400
    pop = np.zeros(n, np.float64)
    for batch in users.select(["item_idx", "timestamp"]).to_batches(max_chunksize=1 << 16):  # bounded memory
        t = pa.Table.from_batches([batch])
        vals, _ = _list_col(t, "item_idx")
        ts, _ = _list_col(t, "timestamp")
        inside = (ts >= start) & (ts < end)
        pop += np.bincount(vals[inside].astype(np.int64), minlength=n)[:n]
    return pop, f"events per item from {_dt.datetime.fromtimestamp(start, _dt.timezone.utc).date()} to {run_date} (fallback_days={cfg.fallback_days})"


def fallback_order(pop: np.ndarray, excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Allowed items (not ``excluded``) by popularity, most popular first, ties by item index: (M,) item indices,
    and (N,) each item's position in that order (-1 = excluded)."""
    order = np.lexsort((np.arange(len(pop)), -pop))
    order = order[~excluded[order]]
    pos = np.full(len(pop), -1, np.int64)
    pos[order] = np.arange(len(order))
    return order, pos


def fallback_topk(order: np.ndarray, pos: np.ndarray, pop: np.ndarray, k: int, offs: np.ndarray, vals: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The first k items of ``order`` that each user has not seen: (b, k') item indices (-1 past the allowed
    items) and their popularity as float32 scores; ``offs`` (b+1,) / ``vals``: the users' histories (seen items)."""
    b = len(offs) - 1
    max_seen = int(np.diff(offs).max()) if b else 0
    m = min(len(order), k + max_seen)  # a user's first k unseen items are within the first k + (seen) of the order
    seen = np.zeros((b, m), dtype=bool)
    p = pos[vals.astype(np.int64)] if len(vals) else np.zeros(0, np.int64)
    row = np.repeat(np.arange(b), np.diff(offs))
    hit = (p >= 0) & (p < m)
    seen[row[hit], p[hit]] = True
    take = np.argsort(seen, axis=1, kind="stable")[:, :k]  # (b, k'): unseen positions first, in popularity order
    ok = ~np.take_along_axis(seen, take, 1)
    idx = np.where(ok, order[take] if m else take, -1).astype(np.int64)
    sc = np.where(ok, pop[np.maximum(idx, 0)], 0.0).astype(np.float32)
    return idx, sc


# ============================================================================================ catalogue
def encode_catalogue(model, info: dict, model_dir: str, prepared, tonight_ids: np.ndarray, cfg: InferenceConfig,
                     device: torch.device, write_cache: bool = True, keep_encoder_features: bool = False):
    """Tonight's catalogue in ``model``'s item space (train/catalogue.py Catalogue.for_tonight), its text features
    (cfg.text_feature_cache; write_cache: this rank updates it) and, with cfg.cold_item_ids == "nearest", the cold
    items' borrowed id rows. Returns (the Catalogue, (N, d) float32 vectors of tonight's items in tonight's order on
    ``device``, rows that cannot be scored 0, how many items borrowed, how many went through the text encoder).
    keep_encoder_features: the Catalogue keeps the encoder's pooled outputs (Catalogue.prepare; the online search)."""
    from train.catalogue import Catalogue, CatalogueError

    try:
        cat = Catalogue.for_tonight(model, info, model_dir, prepared, tonight_ids)
    except CatalogueError as e:
        raise InferenceError(str(e)) from None
    encoded = borrowed = 0
    if model.uses_text:
        prog = Progress("encode items", total=cat.size, unit="items")
        encoded = cat.prepare(model, cfg.item_batch_size, progress=prog.update, cache_dir=cfg.text_feature_cache or None,
                              write_cache=write_cache, keep_encoder_features=keep_encoder_features)
        prog.close()
    if cfg.cold_item_ids == "nearest":
        if model.cfg.item_tower != "hybrid":
            raise InferenceError(f"cold_item_ids=nearest needs a hybrid model (id rows + text); {model_dir or cfg.model_dir} is "
                                 f"item_tower {model.cfg.item_tower!r}: use cold_item_ids=text")
        prog = Progress("borrow id rows", total=int(cat.lenders_and_borrowers(model)[1].numel()), unit="items")
        borrowed = cat.borrow_cold_ids(model, progress=prog.update)
        prog.close()
    vecs = cat.item_vectors(model, cfg.item_batch_size if not model.uses_text else None)  # (space, d)
    return cat, cat.in_tonight_order(vecs).to(device).contiguous(), borrowed, encoded


@dataclass
class ModelCatalogue:
    """Tonight's catalogue in one model's item space, encoded once: what the nightly table and the online service
    (inference/serve) score against. Rows are tonight's items (prepared items/ order)."""

    items: Any  # train/catalogue.py Catalogue: the model's item space (tokens, features, borrowed id rows)
    to_model: np.ndarray  # (N,) int64 model row of each item; -1 = cannot be scored (an id-only model's new item)
    vectors: torch.Tensor  # (N, d) float32 on the device; rows that cannot be scored are 0
    unavailable: torch.Tensor  # (N,) bool on the device: never a candidate (unscorable; unavailable with exclude_unavailable)
    excluded: np.ndarray  # (N,) bool, the same on the host (fallback list)
    counts: dict  # the manifest's catalogue counts
    space: int  # model-space size (model items + tonight's new text-only items)


def encode_model_catalogue(model, info: dict, model_dir: str, prepared, tonight_ids: np.ndarray, avail: np.ndarray,
                           cfg: InferenceConfig, device: torch.device, write_cache: bool = True, tag: str = "[inference] ",
                           keep_encoder_features: bool = False) -> ModelCatalogue:
    """Map tonight's catalogue into ``model``'s item space by item_id (items known to the model keep their id row, new
    items are scored from text), encode it once (encode_catalogue) and mark what may never be recommended. Used by
    _run_variant (the nightly table) and by inference.serve (online), so both score against the same vectors."""
    t_load = time.time()
    n_model = int(model.cfg.num_items)
    items, cat_vecs, borrowed, encoded = encode_catalogue(model, info, model_dir, prepared, tonight_ids, cfg, device,
                                                          write_cache=write_cache,
                                                          keep_encoder_features=keep_encoder_features)
    to_model, space = items.to_model, items.size
    unscorable = torch.from_numpy(to_model < 0)
    unavailable = unscorable.clone()
    if cfg.exclude_unavailable:
        unavailable |= torch.from_numpy(~avail)
    excluded = unavailable.numpy().copy()
    unavailable = unavailable.to(device)
    n_new = int((to_model >= n_model).sum()) if model.uses_text else int((to_model < 0).sum())
    items_counts = dict(items=len(tonight_ids), items_known_to_model=int(((to_model >= 0) & (to_model < n_model)).sum()),
                        items_new_text_only=int((to_model >= n_model).sum()), items_unscorable=int(unscorable.sum()),
                        items_unavailable=int((~avail).sum()), candidates=int((~excluded).sum()),
                        items_borrowing_id_row=borrowed, items_text_encoded=encoded)
    print0(f"{tag}catalogue {fmt_count(len(tonight_ids))} items: {items_counts['items_known_to_model']} known to the model, "
           f"{n_new} new ({'text only' if model.uses_text else 'not scorable: id-only model'}), "
           + (f"{borrowed} without training events borrow a warm item's id row (cold_item_ids=nearest), " if borrowed else "")
           + (f"{encoded} through the text encoder ({space - encoded} from {cfg.text_feature_cache}), " if cfg.text_feature_cache and model.uses_text else "")
           + f"{items_counts['items_unavailable']} unavailable -> {items_counts['candidates']} candidates | vectors {tuple(cat_vecs.shape)} "
           f"in {fmt_secs(time.time() - t_load)}")
    return ModelCatalogue(items=items, to_model=to_model, vectors=cat_vecs, unavailable=unavailable, excluded=excluded,
                          counts=items_counts, space=space)


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

    The windows are train.data.latest_windows's, the one builder training and evaluation use too (same
    layout: hist[:, -1] is the newest event, -1 pads on the left), over the user's mappable events."""
    from train.data import latest_windows

    B = len(offs) - 1
    mapped = to_model[vals] if vals.size else vals.astype(np.int64)
    ok = mapped >= 0
    if space == "tonight":
        mapped = vals.astype(np.int64)
    n_unmapped = int((~ok).sum())
    cnt = np.bincount(np.repeat(np.arange(B), np.diff(offs))[ok], minlength=B)  # mappable events per user
    w, (hist, et) = latest_windows(np.cumsum(cnt) - cnt, cnt, T, (mapped[ok], PAD), (etypes[ok], 0))
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


def table_schema(user_type: str, item_type: str) -> pa.Schema:
    t = {"int64": pa.int64(), "string": pa.string()}
    return pa.schema([
        ("user_id", t.get(user_type, pa.string())),
        ("rank", pa.int16()),
        ("item_id", t.get(item_type, pa.string())),
        ("score", pa.float32()),
        ("model_version", pa.string()),
        ("run_date", pa.date32()),
        ("source", pa.string()),  # "model": scored by the model from the user's history; "fallback": most popular
        ("variant", pa.string()),  # the A/B variant the user is assigned to ("default" without variants)
    ])


DICT_COLUMNS = ["model_version", "run_date", "source", "variant"]  # constant per chunk: dictionary pages


def resolve_write_streams(cfg: InferenceConfig, device: torch.device) -> int:
    """Part files (writer threads) per rank. auto (0): 1 on CPU, where the cores score; on a GPU the
    scoring leaves the cores free and one zstd writer (~8M rows/s, 80k users/s at K=100 on one core,
    docs/BENCH_INFERENCE.md) is slower than a GPU's top-K, so up to 4, within the rank's share of cores."""
    if cfg.write_streams:
        return cfg.write_streams
    if device.type == "cpu":
        return 1
    return max(1, min(4, _cores_per_rank() - 1))


def part_names(rank: int, streams: int, run_id: str = "") -> list[str]:
    """``part-<rank:05d>-<run_id>.parquet`` (one stream) or ``part-<rank:05d>-<stream:02d>-<run_id>.parquet``. The
    run id makes every run's file names its own: a reader that listed one run through the ``dt=`` link and opens
    a file after the link moved gets FileNotFoundError, never another run's file under the same name."""
    sfx = f"-{run_id}" if run_id else ""
    if streams == 1:
        return [f"part-{rank:05d}{sfx}.parquet"]
    return [f"part-{rank:05d}-{j:02d}{sfx}.parquet" for j in range(streams)]


def _rows_table(schema: pa.Schema, users: pa.Array, user_type: str, idx_np: np.ndarray, sc_np: np.ndarray, valid: np.ndarray,
                per_user: np.ndarray, item_ids_out: pa.Array, model_version: str, day_num: int, source: str = "model",
                variant: str = "default") -> pa.Table:
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
        "source": _repeat_string(source, n),
        "variant": _repeat_string(variant, n),
    }, schema=schema)


def write_rows(writer: pq.ParquetWriter, *args, **kwargs) -> None:
    tbl = _rows_table(writer.schema, *args, **kwargs)
    writer.write_table(tbl, row_group_size=max(tbl.num_rows, 1))


def sparse_exposure(e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) rows per item -> (items recommended at least once (int32), how often (int64)): what a rank sends to rank 0."""
    nz = np.flatnonzero(e)
    return nz.astype(np.int32), e[nz].astype(np.int64)


def dense_exposure(parts: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """Sum of sparse_exposure() results (ranks, variants) -> (n,) int64."""
    e = np.zeros(n, np.int64)
    for items, cnt in parts:
        np.add.at(e, items.astype(np.int64), cnt)
    return e


def _take_lists(vals: np.ndarray, offs: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``rows`` of a CSR list column (vals, offs (B+1,)) -> (vals, offs) of those rows alone, vectorised."""
    starts, lens = offs[rows], offs[rows + 1] - offs[rows]
    new_offs = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lens, out=new_offs[1:])
    idx = np.repeat(starts - new_offs[:-1], lens) + np.arange(new_offs[-1])
    return vals[idx], new_offs


def _read_chunk(seq: pa.Table, s: int, n: int, cutoff: int | None, to_model: np.ndarray, T: int,
                bucket: tuple[str, list, int] | None = None) -> dict:
    """Users s..s+n-1 of ``seq`` -> what the user tower and the top-K need (CPU only: Arrow and numpy, no
    torch device work, so it can run in the reader thread while the device scores the chunk before):
    the users of this variant (``bucket`` = (salt, shares, variant index); None = every user) that are active, split
    into those with a usable history (their (b, T) windows and CSR histories = seen items) and those without
    (``fallback``: their CSR histories), and this chunk's counts."""
    t0 = time.perf_counter()
    c = dict(users=0, users_inactive=0, users_no_usable_history=0, history_events_unmapped=0)
    t = seq.slice(s, n)
    vals, offs = _list_col(t, "item_idx")
    ets, _ = _list_col(t, "event_type")
    users = t.column("user_id").combine_chunks()
    keep = np.ones(len(offs) - 1, bool)
    if bucket is not None:
        keep &= assign_variants(users, bucket[0], bucket[1]) == bucket[2]
    c["users"] = int(keep.sum())
    if cutoff is not None:
        ts, toffs = _list_col(t, "timestamp")
        last = np.full(len(toffs) - 1, NO_EVENT, np.int64)
        nonempty = np.diff(toffs) > 0
        last[nonempty] = ts[toffs[1:][nonempty] - 1]
        if "last_timestamp" in t.column_names:  # serving users: also their events on items missing from the catalogue
            last = np.maximum(last, t.column("last_timestamp").combine_chunks().fill_null(NO_EVENT).to_numpy(zero_copy_only=False))
        active = last >= cutoff
        c["users_inactive"] = int((keep & ~active).sum())
        keep &= active
    if not keep.all():  # keep only this variant's active users: re-slice the list columns
        sel = np.flatnonzero(keep)
        ets, _ = _take_lists(ets, offs, sel)
        vals, offs = _take_lists(vals, offs, sel)
        users = users.take(pa.array(sel))
    hist = et = fallback = None
    if len(users):
        hist, et, w, unm = history_windows(vals, offs, ets.astype(np.int64), to_model, T, space="tonight")
        c["history_events_unmapped"] = unm
        has = w > 0
        c["users_no_usable_history"] = int((~has).sum())
        if not has.all():
            fb = np.flatnonzero(~has)
            fb_vals, fb_offs = _take_lists(vals, offs, fb)
            fallback = dict(users=users.take(pa.array(fb)), vals=fb_vals, offs=fb_offs)
            keep2 = np.flatnonzero(has)
            hist, et = hist[keep2], et[keep2]
            users = users.take(pa.array(keep2))
            vals, offs = _take_lists(vals, offs, keep2)
    if hist is not None and not hist.shape[0]:
        hist = None
    return dict(n=n, counts=c, users=users, hist=hist, et=et, offs=offs, vals=vals, fallback=fallback,
                busy_s=time.perf_counter() - t0)


def score_windows(model, hist: torch.Tensor, et: torch.Tensor, tower_table: torch.Tensor, cat_vecs: torch.Tensor, k: int,
                  device: torch.device, sdt: torch.dtype, *, seen_offsets: torch.Tensor | None = None,
                  seen_items: torch.Tensor | None = None, unavailable_idx: torch.Tensor | None = None, item_chunk: int,
                  method: str, non_blocking: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One chunk of users: the user tower over their (b, T) left-padded windows (history items gathered from
    ``tower_table``, the float32 catalogue), then the exact top-``k`` over ``cat_vecs`` (the catalogue in the score
    dtype ``sdt``) with the seen CSR and the unavailable items excluded. Returns (scores (b, k), tonight's item indices
    (b, k), -1 past the allowed items; perf_counter after the tower). The nightly table (_score_users) and the online
    service (inference/serve) both score through here, so their answers agree."""
    with torch.inference_mode():
        # length buckets cut padding, which pays on CPU; on a GPU the tower is launch-bound and one bucket
        # ran 1.9x faster (2.4 vs 4.5 ms per 2,048 users, H200, docs/BENCH_INFERENCE.md)
        u = user_vectors_bucketed(model, hist, et, device, buckets=1 if device.type == "cuda" else 4,
                                  item_table=tower_table, non_blocking=non_blocking).to(sdt)  # (b, d)
        t_tower = time.perf_counter()
        scores, idx = topk_exact(u, cat_vecs, k, seen_offsets=seen_offsets, seen_items=seen_items,
                                 unavailable_idx=unavailable_idx, item_chunk=item_chunk, method=method)
    return scores, idx, t_tower


@dataclass
class RowsOut:
    """Where and how one variant's rows are written: this rank's part files (one writer thread each) and the constant
    columns of every row (docs/CONTRACTS.md section 4)."""

    writers: list  # pq.ParquetWriter per part file; chunk j goes to writers[j % len(writers)]
    item_ids_out: pa.Array  # tonight's item ids in the table's type, row = tonight's item index
    user_type: str  # the prepared manifest's user_id_type
    model_version: str
    run_date: str
    variant: str = "default"


def score_users(model, cfg: InferenceConfig, cat: "ModelCatalogue", out: RowsOut, seq: pa.Table, lo: int, hi: int,
                device: torch.device, *, streams: int = 1, bucket: tuple | None = None,
                fallback: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, mapped_files=()) -> dict:
    """Score users lo..hi-1 of ``seq`` against ``cat`` and stream their rows into ``out.writers`` (see _score_users),
    each writer in its own thread. ``mapped_files``: the Arrow files ``seq`` is memory-mapped from (their pages are
    released as the rank reads on)."""
    from concurrent.futures import ThreadPoolExecutor

    with ExitStack() as stack:
        pools = [stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"parquet-writer-{j}"))
                 for j in range(streams)]
        job = _scoring_job(model, cfg, cat, out, pools, device, fallback)
        job.mapped_files = tuple(mapped_files)
        return _score_users(job, seq, lo, hi, bucket)


@dataclass
class _ScoringJob:
    """One rank scoring one variant's users (_score_users): what it scores with, where the rows go, and what it has
    counted so far. Built by _scoring_job; each step below reads and updates it."""

    model: Any
    cfg: InferenceConfig
    device: torch.device
    to_model: np.ndarray  # tonight's item -> model row (-1: cannot be scored)
    tower_table: torch.Tensor  # (N, d) float32, tonight's order: the user tower gathers history items from it
    cat_vecs: torch.Tensor  # (N, d) in the score dtype: what the top-K multiplies
    sdt: torch.dtype
    unavail_idx: torch.Tensor | None  # never candidates, once on the device
    T: int  # history window
    item_chunk: int  # items per top-K block (score_budget_mb)
    method: str  # top-K selection (inference/topk.py)
    cutoff: int | None  # active_since_days: the earliest timestamp of an active user
    overlap: bool  # overlap_scoring on CUDA: a chunk's result is collected after the next chunk is launched
    out: RowsOut
    pools: list  # one single-thread executor per writer
    day_num: int  # run_date as days since 1970-01-01 (the run_date column)
    fallback: tuple | None  # fallback_order(...) + (popularity,), or None: users the model cannot score get no row
    counts: dict = field(default_factory=lambda: {k: 0 for k in COUNT_KEYS})
    # where this rank's time goes, as the main thread sees it: read_s = waiting for (or doing) the reads,
    # write_s = waiting for the writers; read_busy_s = the reads' own time (in the reader thread when prefetching)
    timings: dict = field(default_factory=lambda: dict(read_s=0.0, user_tower_s=0.0, topk_s=0.0, write_s=0.0, read_busy_s=0.0))
    per_file: list = field(default_factory=list)  # rows and users per writer
    exposure: torch.Tensor | None = None  # (N,) rows per item of tonight's catalogue, on the top-K's device
    pending: list = field(default_factory=list)  # per writer: the write in flight (one at a time bounds memory)
    chunk_no: int = 0
    # the memory-mapped Arrow files the users are read from: their pages are released every RELEASE_EVERY_CHUNKS
    # chunks, so the resident set stays flat while a rank reads through its users (lmrec_common/mapped.py)
    mapped_files: tuple = ()


def _scoring_job(model, cfg: InferenceConfig, cat: "ModelCatalogue", out: RowsOut, pools: list, device: torch.device,
                 fallback: tuple | None) -> _ScoringJob:
    """The settings every chunk shares, computed once."""
    sdt = torch.bfloat16 if cfg.score_dtype == "bfloat16" else torch.float32
    cat_vecs = cat.vectors.to(sdt)
    item_chunk = max(cfg.k, (cfg.score_budget_mb << 20) // (4 * cfg.user_batch_size))
    day = _dt.date.fromisoformat(out.run_date)
    cutoff = None
    if cfg.active_since_days:
        # active = an event within the N days that end with run_date (UTC), i.e. ts >= run_date+1 - N days
        start = _dt.datetime.combine(day + _dt.timedelta(days=1 - cfg.active_since_days), _dt.time(), _dt.timezone.utc)
        cutoff = int(start.timestamp())
    return _ScoringJob(
        model=model, cfg=cfg, device=device, to_model=cat.to_model, tower_table=cat.vectors, cat_vecs=cat_vecs, sdt=sdt,
        # the exclusion list once, on the device (torch.nonzero per chunk would wait for the device each time)
        unavail_idx=torch.nonzero(cat.unavailable, as_tuple=False).flatten() if cat.unavailable is not None else None,
        T=min(cfg.max_history or model.cfg.max_len, model.cfg.max_len), item_chunk=item_chunk,
        method=resolve_method(cfg.topk_method, min(item_chunk, cat_vecs.shape[0])), cutoff=cutoff,
        overlap=cfg.overlap_scoring and device.type == "cuda", out=out, pools=pools,
        day_num=day.toordinal() - _dt.date(1970, 1, 1).toordinal(), fallback=fallback,
        per_file=[dict(rows=0, users=0) for _ in out.writers], pending=[None] * len(out.writers),
        # counted on the device where the top-K is: a scatter_add queued after each chunk's top-K, no host sync
        exposure=torch.zeros(cat_vecs.shape[0], dtype=torch.int64, device=cat_vecs.device))


class _ChunkReader:
    """Chunks of ``user_batch_size`` users of seq[lo:hi] in order (_read_chunk). With ``prefetch_chunks`` > 0 a reader
    thread builds the next chunks' history windows (Arrow + numpy) while the caller scores, so reading overlaps
    scoring; chunks are consumed in order, so the output is the same with or without it. A context manager: on exit
    the reads not started are dropped and the one in flight is waited for."""

    def __init__(self, job: _ScoringJob, seq: pa.Table, lo: int, hi: int, bucket: tuple | None):
        from collections import deque

        self.job, self.seq, self.hi, self.bucket = job, seq, hi, bucket
        self.starts = list(range(lo, hi, job.cfg.user_batch_size))
        self.ahead = job.cfg.prefetch_chunks
        self.queued: deque = deque()
        self.stack = ExitStack()

    def __enter__(self) -> "_ChunkReader":
        from concurrent.futures import ThreadPoolExecutor

        self.pool = self.stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="history-reader")) \
            if self.ahead else None
        self.stack.callback(lambda: [f.cancel() for f in self.queued])  # on an error: drop the reads not started (runs first)
        return self

    def __exit__(self, *exc) -> None:
        self.stack.__exit__(*exc)

    def __len__(self) -> int:
        return len(self.starts)

    def _args(self, s: int) -> tuple:
        j = self.job
        return (self.seq, s, min(j.cfg.user_batch_size, self.hi - s), j.cutoff, j.to_model, j.T, self.bucket)

    def chunk(self, i: int) -> dict:
        if self.pool is None:
            return _read_chunk(*self._args(self.starts[i]))
        while len(self.queued) < self.ahead + 1 and i + len(self.queued) < len(self.starts):
            self.queued.append(self.pool.submit(_read_chunk, *self._args(self.starts[i + len(self.queued)])))
        return self.queued.popleft().result()


def _count_exposure(job: _ScoringJob, idx: torch.Tensor) -> None:
    idx = idx.reshape(-1).to(job.exposure.device, torch.int64)
    job.exposure.scatter_add_(0, idx.clamp(min=0), (idx >= 0).to(torch.int64))


def _launch(job: _ScoringJob, r: dict) -> dict:
    """Queue chunk r's user tower and top-K; with overlap, also the copy of its (b, K) result into
    pinned host memory and an event after it, and return without waiting for the device."""
    cfg, overlap = job.cfg, job.overlap
    hist, et = r["hist"], r["et"]  # user_vectors_bucketed pins what it copies when non_blocking
    with torch.inference_mode():
        seen_off = seen_val = None
        if cfg.exclude_seen:
            seen_off, seen_val = torch.from_numpy(r["offs"]), torch.from_numpy(r["vals"].astype(np.int64))
            if overlap:
                seen_off, seen_val = seen_off.pin_memory(), seen_val.pin_memory()
        scores, idx, t_tower = score_windows(job.model, hist, et, job.tower_table, job.cat_vecs, cfg.k, job.device, job.sdt,
                                             seen_offsets=seen_off, seen_items=seen_val, unavailable_idx=job.unavail_idx,
                                             item_chunk=job.item_chunk, method=job.method, non_blocking=overlap)
        _count_exposure(job, idx)
    if not overlap:
        return dict(r=r, idx=idx.cpu(), sc=scores.cpu(), done=None, t_tower=t_tower)
    idx_h = torch.empty(idx.shape, dtype=idx.dtype, pin_memory=True)
    sc_h = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
    idx_h.copy_(idx, non_blocking=True)
    sc_h.copy_(scores, non_blocking=True)
    done = torch.cuda.Event()
    done.record()  # after the copies on this stream: waiting on it waits for this chunk only
    return dict(r=r, idx=idx_h, sc=sc_h, done=done, t_tower=t_tower)


def _write(job: _ScoringJob, users: pa.Array, idx_np: np.ndarray, sc_np: np.ndarray, source: str) -> None:
    """Hand one chunk's (b, k') rows of ``source`` to the next writer (round-robin) and count them."""
    c, out = job.counts, job.out
    valid = idx_np >= 0  # (b, k'); -1 = the user has fewer allowed items than k
    per_user = valid.sum(1)
    b = idx_np.shape[0]
    c["users_scored"] += b
    c[f"users_{source}"] += b
    c["users_fewer_than_k"] += int((per_user < job.cfg.k).sum())
    n = int(per_user.sum())
    j = job.chunk_no % len(out.writers)
    job.chunk_no += 1
    job.per_file[j]["users"] += b
    if n:
        if job.pending[j] is not None:
            job.pending[j].result()
        job.pending[j] = job.pools[j].submit(write_rows, out.writers[j], users, out.user_type, idx_np, sc_np, valid, per_user,
                                             out.item_ids_out, out.model_version, job.day_num, source=source,
                                             variant=out.variant)
        job.per_file[j]["rows"] += n
        c["rows"] += n
        c[f"rows_{source}"] += n


def _collect(job: _ScoringJob, h: dict) -> None:
    """Wait for a launched chunk's result (if it is still on its way) and hand it to its writer."""
    t2 = time.perf_counter()
    if h["done"] is not None:
        h["done"].synchronize()
    idx_np, sc_np = h["idx"].numpy(), h["sc"].numpy()
    t3 = time.perf_counter()
    job.timings["topk_s"] += t3 - t2
    _write(job, h["r"]["users"], idx_np, sc_np, "model")
    job.timings["write_s"] += time.perf_counter() - t3


def _write_fallback(job: _ScoringJob, fb: dict) -> None:
    """Users the model cannot score: the popular list, their own items and unavailable items left out."""
    t3 = time.perf_counter()
    f = job.fallback
    idx_np, sc_np = fallback_topk(*f[:2], f[2], job.cfg.k, fb["offs"], fb["vals"])
    _count_exposure(job, torch.from_numpy(idx_np))
    _write(job, fb["users"], idx_np, sc_np, "fallback")
    job.timings["write_s"] += time.perf_counter() - t3


def _score_users(job: _ScoringJob, seq: pa.Table, lo: int, hi: int, bucket: tuple | None = None) -> dict:
    """Score users lo..hi-1 of ``seq`` (those of ``bucket``, see _read_chunk) and stream their rows into the writers;
    users without a usable history get the first K unseen items of ``job.fallback`` (none when it is None: they get
    no row). Chunk j goes to writers[j % len(writers)], built and written in that writer's own thread (pyarrow
    releases the GIL), so encoding overlaps the next chunks' scoring; one chunk in flight per writer bounds memory;
    reads overlap scoring with ``prefetch_chunks`` (_ChunkReader). Returns this rank's counts (rows and users per
    file in ``files``). On an error the executors' exit waits for the reads and writes in flight before the writers
    are closed."""
    c, tm = job.counts, job.timings
    prog = Progress("recommend", total=hi - lo, unit="users")
    with _ChunkReader(job, seq, lo, hi, bucket) as reader:
        # overlap_scoring: chunk i is collected after chunk i+1 is launched (on CPU the work is done by then:
        # same order, same table); on CUDA the launch returns before the device has finished
        in_flight = None
        for i in range(len(reader)):
            t0 = time.perf_counter()
            r = reader.chunk(i)
            for k, v in r["counts"].items():
                c[k] += v
            tm["read_busy_s"] += r["busy_s"]
            t1 = time.perf_counter()
            tm["read_s"] += t1 - t0
            if r["hist"] is not None:
                h = _launch(job, r)
                t2 = time.perf_counter()
                tm["user_tower_s"] += h["t_tower"] - t1
                tm["topk_s"] += t2 - h["t_tower"]  # queueing (overlap) or the whole top-K with its copy out
                if in_flight is not None:
                    _collect(job, in_flight)  # the previous chunk: the device has been working on it meanwhile
                    in_flight = None
                if job.cfg.overlap_scoring:
                    in_flight = h
                else:
                    _collect(job, h)
            if r["fallback"] is not None and job.fallback is not None:
                _write_fallback(job, r["fallback"])
            prog.update(r["n"])
            if job.mapped_files and (i + 1) % RELEASE_EVERY_CHUNKS == 0:
                release_mapped_pages(job.mapped_files)
            if i == 0:
                _maybe_die("after_first_batch")
        if in_flight is not None:
            _collect(job, in_flight)
    t3 = time.perf_counter()
    for f in job.pending:
        if f is not None:
            f.result()
    tm["write_s"] += time.perf_counter() - t3
    prog.close()
    c["timings_s"] = {k: round(v, 3) for k, v in tm.items()}
    c["files"] = job.per_file
    c["exposure"] = sparse_exposure(job.exposure.cpu().numpy())
    return c


# ============================================================================================ run
def serving_users(prepared) -> pa.Table:
    """Every user tonight's table serves, one row each: sequences/ then serving/ (prepared schema >= 2: one usable
    event, or only events on items missing from the catalogue). Columns user_id, item_idx, timestamp, event_type
    (tonight's item space) and last_timestamp (serving rows: the latest event of either kind; null in sequences rows,
    whose latest event is the last of ``timestamp``). Zero-copy over the memory-mapped shards."""
    cols = ["user_id", "item_idx", "timestamp", "event_type"]
    seq = prepared.sequences.data.table.select(cols).replace_schema_metadata(None)
    seq = seq.append_column("last_timestamp", pa.nulls(seq.num_rows, pa.int64()))
    if prepared.serving is None or prepared.serving.num_rows == 0:
        return seq
    srv = prepared.serving.data.table.select(cols + ["last_timestamp"]).replace_schema_metadata(None)
    return pa.concat_tables([seq, srv.cast(seq.schema)])


def _run_variant(cfg: InferenceConfig, var: VariantConfig, prepared, tonight_ids: np.ndarray, avail: np.ndarray, pop: np.ndarray,
                 users: pa.Table, lo: int, hi: int, item_ids_out: pa.Array, writers: list, run_date: str, device: torch.device,
                 streams: int, rank: int, bucket: tuple | None) -> tuple[dict, dict, dict, dict]:
    """One variant on this rank: load its final/ alone, map tonight's catalogue into its item space (items known to
    the model keep their id row, new items are scored from text), encode it once, and score this rank's users of
    the variant (``bucket``; None = all) into ``writers``. Returns (its model for the manifest, catalogue counts,
    counts, timings)."""
    from train.export import load_final

    t0 = time.time()
    # resolved once: a serving link (inference/gate.py) moved during the run cannot mix two models in one table
    model_dir = os.path.realpath(var.model_dir)
    model, info = load_final(model_dir)
    model.to(device)
    model_version = str(info.get("model_version"))
    n_model = int(model.cfg.num_items)
    tag = f"[inference] variant {var.name}: " if bucket is not None else "[inference] "
    shown = f"{var.model_dir} -> {model_dir}" if os.path.islink(var.model_dir) else var.model_dir
    print0(f"{tag}model {shown} (version {model_version}, item_tower {model.cfg.item_tower}, {n_model} items, "
           f"trained on data {info.get('data_version')})")
    t_load = time.time()
    cat = encode_model_catalogue(model, info, model_dir, prepared, tonight_ids, avail, cfg, device, write_cache=rank == 0,
                                 tag=tag)
    t_enc = time.time()
    rows_out = RowsOut(writers=writers, item_ids_out=item_ids_out, user_type=prepared.manifest.get("user_id_type", "string"),
                       model_version=model_version, run_date=run_date, variant=var.name)
    fallback = (*fallback_order(pop, cat.excluded), pop)
    c = score_users(model, cfg, cat, rows_out, users, lo, hi, device, streams=streams, bucket=bucket, fallback=fallback,
                    mapped_files=dataset_files(prepared.sequences, prepared.serving))
    out = dict(model_dir=model_dir, model_version=model_version, item_tower=model.cfg.item_tower,
               trained_on_data_version=info.get("data_version"))
    return out, cat.counts, c, dict(load=t_load - t0, encode_catalogue=t_enc - t_load, score_and_write_rank0=time.time() - t_enc)


def run(cfg: InferenceConfig) -> Path:
    """Write ``<output_dir>/dt=<run_date>/`` (see module docstring). Returns the published folder."""
    cfg.require_paths()
    variants = check_variants(cfg)  # a bad bucket config or model folder: one error naming the key, nothing staged
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
        # ---- 2. tonight's data: every user prepared (sequences + serving-only), this rank's slice, fallback popularity
        from data_prep.schema import load_prepared

        prepared = load_prepared(cfg.prepared_dir)
        pm = prepared.manifest
        users_tbl = serving_users(prepared)
        n_users = users_tbl.num_rows
        bounds = np.linspace(0, n_users, world + 1).round().astype(np.int64)
        lo, hi = int(bounds[rank]), int(bounds[rank + 1])
        print0(f"[inference] run_date {run_date} | run_id {run_id} | world {world} | device {device} | threads/rank {threads}")
        print0(f"[inference] data {prepared.path} (version {prepared.version}, {len(prepared.items)} items, "
               f"{len(prepared.sequences)} users in sequences + {n_users - len(prepared.sequences)} served only)"
               + (" | user ids are pseudonyms (key fingerprint "
                  f"{pm['pseudonymization']['key_fingerprint']})" if (pm.get("pseudonymization") or {}).get("enabled") else "")
               + (f" | variants {', '.join(f'{v.name} {v.share:g}' for v in variants)} (salt {cfg.bucket_salt!r})"
                  if len(variants) > 1 else ""))
        tonight_ids = np.array(prepared.items.data.table.column("item_id").to_pylist(), dtype=object)
        avail = np.asarray(prepared.items.data.table.column("available").to_numpy(zero_copy_only=False), dtype=bool)
        pop, pop_what = fallback_popularity(prepared, users_tbl, cfg, run_date)
        item_ids_out = _typed_ids(prepared.items.data.table.column("item_id").combine_chunks(), pm.get("item_id_type", "string"), "item")
        schema = table_schema(pm.get("user_id_type", "string"), pm.get("item_id_type", "string"))
        streams = resolve_write_streams(cfg, device)
        names = part_names(rank, streams, run_id)
        comp = None if cfg.compression == "none" else cfg.compression
        shares = [v.share for v in variants]
        tm = dict(data=time.time() - t0, load=0.0, encode_catalogue=0.0, score_and_write_rank0=0.0)
        t_load = time.time()
        counts: dict[str, Any] = {k: 0 for k in COUNT_KEYS}
        counts.update(by_variant={}, exposure={}, files=[dict(rows=0, users=0) for _ in names], timings_s={})
        var_info = []
        with ExitStack() as stack:
            # dictionary pages only for the constant columns: on ids and scores they cost 3x the write
            # time and make files larger (measured in docs/BENCH_INFERENCE.md)
            writers = [stack.enter_context(pq.ParquetWriter(stage / nm, schema, compression=comp, use_dictionary=DICT_COLUMNS))
                       for nm in names]
            # ---- 3. + 4. per variant: its model, tonight's catalogue in its item space, its users -> this rank's part files
            for vi, var in enumerate(variants):
                info, items_counts, cv, tv = _run_variant(cfg, var, prepared, tonight_ids, avail, pop, users_tbl, lo, hi,
                                                          item_ids_out, writers, run_date, device, streams, rank,
                                                          bucket=(cfg.bucket_salt, shares, vi) if len(variants) > 1 else None)
                for k, v in tv.items():
                    tm[k] += v
                var_info.append(dict(name=var.name, share=var.share, **info, catalogue=items_counts))
                counts["by_variant"][var.name] = {k: cv[k] for k in COUNT_KEYS}
                counts["exposure"][var.name] = cv["exposure"]
                for k in COUNT_KEYS:
                    counts[k] += cv[k]
                for f, g in zip(counts["files"], cv["files"]):
                    f["rows"] += g["rows"]
                    f["users"] += g["users"]
                for k, v in cv["timings_s"].items():
                    counts["timings_s"][k] = round(counts["timings_s"].get(k, 0.0) + v, 3)
        for nm, f in zip(names, counts["files"]):
            f.update(file=nm, bytes=(stage / nm).stat().st_size)
        counts.update(rank=rank, user_range=[lo, hi], write_streams=streams, device=str(device))
        _maybe_die("after_part")
        t_score = time.time()
        print(f"[inference] rank {rank}: {counts['users_scored']} users ({counts['users_model']} by the model, "
              f"{counts['users_fallback']} fallback) -> {counts['rows']} rows in {fmt_secs(t_score - t_load)} "
              f"({counts['users_scored'] / max(t_score - t_load, 1e-9):.0f} users/s)", flush=True)
        err = None
    except Exception as e:  # every rank must reach the gather, or the others hang in the barrier
        counts, err = {"rank": rank, "error": f"{type(e).__name__}: {e}"}, e
        tm, var_info, n_users, prepared, pop_what = {}, [], 0, None, ""

    # ---- 5. barrier + gather counts; rank 0 publishes, then tells every rank how it went
    all_counts = gather_object([counts]) if world > 1 else [counts]
    status: list[Any] = [None]
    if rank == 0:
        try:
            _publish(cfg, stage, final, sorted(all_counts, key=lambda c: c["rank"]), run_date=run_date, run_id=run_id, world=world,
                     variants=var_info, prepared=prepared, n_users=n_users, fallback_what=pop_what,
                     timings=tm, t0=t0)
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
             variants: list[dict], prepared, n_users: int, fallback_what: str, timings: dict, t0: float) -> None:
    """Rank 0, after every rank wrote its part: manifest + config + _SUCCESS into the stage, then the stage becomes
    the run folder ``_runs/dt=<date>/run=<run_id>/`` and the ``dt=<date>`` link moves to it.
    ``variants``: rank 0's record of each variant's model and catalogue; the counts are summed over the ranks."""
    errors = [c for c in all_counts if "error" in c]
    if errors:
        raise InferenceError(f"rank(s) {[c['rank'] for c in errors]} failed ({errors[0]['error']}); nothing published")
    missing = [f["file"] for c in all_counts for f in c["files"] if not (stage / f["file"]).is_file()]
    if missing:
        raise InferenceError(f"part files {missing} are missing from {stage}; nothing published")
    pm = prepared.manifest
    totals = {k: int(sum(c[k] for c in all_counts)) for k in COUNT_KEYS}
    per_variant = {v["name"]: {k: int(sum(c["by_variant"][v["name"]][k] for c in all_counts)) for k in COUNT_KEYS} for v in variants}
    schema = table_schema(pm.get("user_id_type", "string"), pm.get("item_id_type", "string"))
    models = [{"path": v["model_dir"], "model_version": v["model_version"], "trained_on_data_version": v["trained_on_data_version"],
               "item_tower": v["item_tower"]} for v in variants]
    several = len(variants) > 1
    # beyond accuracy of tonight's table (train/metrics.py beyond_accuracy): over the items that may be recommended,
    # popularity = training events per item; per variant too (an A/B test compares them)
    from train.metrics import beyond_accuracy

    n_items = len(prepared.items)
    pop = np.asarray(prepared.items.data.table.column("n_train_events").to_numpy(zero_copy_only=False), np.float64)
    eligible = (np.asarray(prepared.items.data.table.column("available").to_numpy(zero_copy_only=False), dtype=bool)
                if cfg.exclude_unavailable else None)
    exp = {v["name"]: dense_exposure([c["exposure"][v["name"]] for c in all_counts], n_items) for v in variants}
    beyond = {"k": cfg.k, "popularity": "training events per item (items.n_train_events)",
              "eligible": "available items" if cfg.exclude_unavailable else "every item",
              **beyond_accuracy(sum(exp.values()), pop, eligible)}
    if several:
        beyond["by_variant"] = {name: beyond_accuracy(e, pop, eligible) for name, e in exp.items()}
    man = base_manifest(KIND, SCHEMA_VERSION)
    man.update({
        "run_date": run_date, "run_id": run_id,
        # this run's immutable folder, relative to output_dir (output_dir/dt=<date> links to the current run's)
        "run_dir": os.path.relpath(run_dir(final.parent, final.name, run_id), final.parent),
        "k": cfg.k, "world_size": world, "devices": [c["device"] for c in all_counts],
        "model": models[0],  # with several variants: the first one's (each variant's is under variants)
        "data": {"path": str(prepared.path.resolve()), "version": prepared.version, "user_id_type": pm.get("user_id_type"),
                 "item_id_type": pm.get("item_id_type"), "users_in_sequences": len(prepared.sequences),
                 "users_served_only": n_users - len(prepared.sequences), "prepared_schema_version": pm.get("schema_version"),
                 # user_id holds keyed pseudonyms when enabled (data_prep/pseudonym.py: map-back writes a raw-id copy)
                 "pseudonymization": pm.get("pseudonymization") or {"enabled": False},
                 # the newest usable event of that data (data_prep's count; None for data prepared before it counted):
                 # how fresh the table is, whatever its run_date says
                 "events_newest_utc": (pm.get("counts") or {}).get("events_newest_utc")},
        "catalogue": variants[0]["catalogue"],  # the first variant's model's view of it (each variant's under variants)
        "counts": totals,
        # users (and rows) per source: model = scored from their history; fallback = the popular list (no usable history)
        "sources": {src: {"users": totals[f"users_{src}"], "rows": totals[f"rows_{src}"]} for src in SOURCES},
        "fallback": {"popularity": fallback_what, "excluded": "the user's seen items and unavailable items",
                     "score": "the item's popularity count"},
        # coverage, popularity_percentile, gini, tail_share of the rows (definitions: train/metrics.py)
        "beyond_accuracy": beyond,
        "bucketing": {"salt": cfg.bucket_salt if several else None, "hash": BUCKET_HASH if several else "none: one variant",
                      "shares": {v["name"]: v["share"] for v in variants}},
        "variants": [{"name": v["name"], "share": v["share"], "model": m, "catalogue": v["catalogue"], "counts": per_variant[v["name"]]}
                     for v, m in zip(variants, models)],
        # one entry per file; a rank's user_range and timings_s are repeated on each of its files
        "parts": [{"file": f["file"], "rank": c["rank"], "rows": f["rows"], "users": f["users"], "bytes": f["bytes"],
                   "user_range": c["user_range"], "timings_s": c["timings_s"]}
                  for c in all_counts for f in c["files"]],
        "columns": {f.name: str(f.type) for f in schema},
        "score": "source model: inner product <user_vector, item_vector>; source fallback: the item's popularity count",
        "exclusions": {"seen": cfg.exclude_seen, "unavailable": cfg.exclude_unavailable, "active_since_days": cfg.active_since_days},
        "timings_s": {**{k: round(v, 2) for k, v in timings.items()}, "total": round(time.time() - t0, 2)},
        "config": asdict(cfg),
    })
    atomic_write_json(stage / "_manifest.json", man)
    atomic_write_text(stage / "_config.yaml", dump_yaml(cfg))
    atomic_write_text(stage / "_SUCCESS", "")  # the last file of the table, written before the swap
    _maybe_die("before_publish")
    folder = place_run(stage, final.parent, final.name, run_id)  # whole and immutable; readers still get the old run
    _maybe_die("before_pointer")
    point_to(final.parent, final.name, folder)  # one rename: readers resolve to the old run or this one
    try:  # housekeeping: a failure here leaves extra folders, never a wrong table
        for note in _sweep_replaced(final.parent, final.name, cfg.replaced_run_grace_s):
            print0(f"[inference] {note}")
    except OSError as e:
        print0(f"[inference] warning: could not remove replaced runs ({type(e).__name__}: {e}); the next run retries")
    print0(f"[inference] published {final} -> {os.readlink(final)}: {totals['users_scored']} users ({totals['users_model']} model, "
           f"{totals['users_fallback']} fallback), {totals['rows']} rows, "
           + ("variants " + ", ".join(f"{n} {c_['users_scored']}" for n, c_ in per_variant.items()) + ", " if several else "")
           + f"{sum(len(c['files']) for c in all_counts)} part file(s) from {world} rank(s), total {fmt_secs(time.time() - t0)}")


def summary(path: Path) -> str:
    m = json.loads((Path(path) / "_manifest.json").read_text())
    return json.dumps({k: m[k] for k in ("run_date", "k", "counts", "catalogue")}, indent=1)
