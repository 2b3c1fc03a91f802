"""Is tonight's table there, complete and correct? An independent check of a published table, for the morning alert.

    python -m inference.check --config configs/inference/nightly.yaml run_date=2026-11-27 [check.report=FILE]

Reads the same inference config and overrides as the table's run (output_dir, run_date, prepared_dir, k, exclusions)
and checks ``<output_dir>/dt=<run_date>`` from the outside, reading the Parquet files and tonight's prepared data
itself rather than trusting the manifest's counts:

1. published: the link resolves to a run folder with ``_SUCCESS`` and a readable ``_manifest.json`` of this date;
2. tonight's data: the table was computed from the prepared version ``prepared_dir`` names now (LATEST), with this
   config's K and exclusions; with ``check.expect_events_through`` (a date), that data reaches that day (a table made
   from last night's data because tonight's log had not landed is stale, though whole);
3. files: every part file the manifest lists is there with the row count it records, and no other;
4. rows: no nulls; ``run_date`` is the date; every user's rows are together, ranked 1..n without gaps, n = K (fewer
   only where fewer items are allowed: as many users as the manifest's ``users_fewer_than_k``), scores non-increasing,
   one source, variant and model_version per user, ``source`` model or fallback;
5. items: every item is in tonight's catalogue, none twice for a user, none unavailable (``exclude_unavailable``),
   none the user has seen (``exclude_seen``: every item of the user's prepared history);
6. users: every user of tonight's prepared data (sequences and serving) has rows, except the manifest's inactive
   ones when ``active_since_days`` > 0, and no one else; each user in one place only;
7. content, against the previous night's table (the newest earlier ``dt=`` within ``check.previous_max_age_days``,
   read from its files too): tonight's serves at least ``min_users_ratio`` of its users, holds at least
   ``min_items_ratio`` of its distinct items (same K), serves at most ``max_fallback_rise`` more of the users from the
   popularity fallback, and the users served by the model on both nights keep on average at least
   ``min_top10_overlap`` of their top-10 items beyond chance; in an A/B test each variant alone as well. A table can
   pass 1-6 and still be wrong in what it holds: a model
   that learned nothing or collapsed onto a few items, a model and catalogue whose ids do not match, a log that lost
   users. The figures (users, fallback share, distinct items, coverage and Gini of tonight's catalogue, the
   overlap) go to the report's ``content`` and ``previous`` either way.

Prints one line per problem (the first few offending users or items named) and a summary; writes the report as JSON
(``check.report``; default ``<output_dir>/_checks/dt=<run_date>.json``). Exit 0 = the table holds; 1 = it does not
(absent, stale, incomplete or wrong: alert); 2 = a bad config. Memory: one record batch of one part file at a time,
plus tonight's user ids, item ids and (with exclude_seen) history keys; on one core a table of 100M rows (1M users)
takes 45 s and 1.4 GB (bench/check_bench.py, docs/BENCH_INFERENCE.md), linear in the rows; comparing with the
previous night reads that table's user, item, rank, source and variant columns once more (87 s and 1.7 GB in all).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from inference.config import InferenceConfig
from lmrec_common.log import fmt_count, fmt_secs, print0
from lmrec_common.publish import atomic_write_json, atomic_write_text

REPORT_KIND = "lmrec.check"
COLUMNS = ("user_id", "rank", "item_id", "score", "model_version", "run_date", "source", "variant")
SHOW = 5  # offending users / items named per problem
BATCH_ROWS = 1 << 20
TOP = 10  # the list head whose overlap with the previous night's is measured


def report_path(output_dir: str | os.PathLike, run_date: str) -> Path:
    """Where the check of ``<output_dir>/dt=<run_date>`` writes its report by default (and the service looks for it)."""
    return Path(output_dir) / "_checks" / f"dt={run_date}.json"


class CheckError(RuntimeError):
    """The check cannot run (a bad config): one line, exit 2."""


ITEM_PROBLEMS = ("catalogue", "duplicate", "unavailable", "seen")
PROBLEM_TEXT = {
    "nulls": "rows with a null value", "date": "rows whose run_date is not the table's date",
    "rank": "users whose ranks are not 1..n in file order", "k": "users with more than K rows",
    "order": "users whose scores rise with rank", "constant": "users whose rows mix sources, variants or model versions",
    "source": "rows whose source is neither model nor fallback", "catalogue": "rows whose item is not in tonight's catalogue",
    "duplicate": "users recommended one item twice", "unavailable": "rows of unavailable items (exclude_unavailable)",
    "seen": "rows of items the user has seen (exclude_seen)",
}


class _Problems:
    def __init__(self):
        self.items: list[dict] = []

    def add(self, check: str, what: str, examples: list | None = None, count: int | None = None) -> None:
        ex = [str(x) for x in (examples or [])][:SHOW]
        self.items.append(dict(check=check, what=what, count=count, examples=ex))
        tail = f" (e.g. {', '.join(ex)})" if ex else ""
        print0(f"[check] PROBLEM {check}: {what}{tail}")


class _State:
    """What the streamed parts accumulate: one user's unfinished rows carried between batches, the users seen."""

    def __init__(self):
        self.carry: pa.Table | None = None
        self.user_firsts: list[pa.Array] = []  # one id per group of consecutive rows (a user, once per place it appears)
        self.rows = 0
        self.groups = 0
        self.fewer = 0
        self.bad = {k: 0 for k in PROBLEM_TEXT}
        self.examples: dict[str, list] = {k: [] for k in self.bad}
        self.sources: dict[str, int] = {}
        self.user_sources: dict[tuple[str, str], int] = {}  # users (groups) per (variant, source)
        self.exposure: dict[str, np.ndarray] = {}  # per variant: rows per catalogue item (tonight's catalogue index)
        self.top_keys: dict[str, list[np.ndarray]] = {}  # per variant: user row * n_items + item index of model-served rows ranked <= TOP

    def flag(self, key: str, n: int, examples) -> None:
        if n:
            self.bad[key] += int(n)
            room = SHOW - len(self.examples[key])
            if room > 0:
                self.examples[key].extend(list(examples)[:room])


def _as_str(a) -> pa.Array:
    a = a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
    if pa.types.is_dictionary(a.type):
        a = a.dictionary_decode()
    return a.cast(pa.string())


class _Tonight:
    """Tonight's prepared data as the check needs it: user ids, item ids, unavailable items, history pairs."""

    def __init__(self, prepared, need_seen: bool):
        import pandas as pd

        items = prepared.items.data.table
        self.item_ids = _as_str(items.column("item_id"))
        # lookups built once and reused by every batch (pyarrow's index_in would hash the value set again each call)
        self.item_index = pd.Index(self.item_ids.to_numpy(zero_copy_only=False))
        self.n_items = len(self.item_ids)
        avail = np.asarray(items.column("available").to_numpy(zero_copy_only=False), dtype=bool)
        self.unavailable = np.flatnonzero(~avail)
        from inference.run import serving_users

        users = serving_users(prepared)  # who the table serves: sequences/ then serving/, one row each
        self.user_ids = _as_str(users.column("user_id"))
        self.user_index = pd.Index(self.user_ids.to_numpy(zero_copy_only=False))
        self.seen_keys = None
        self._distinct_seen: np.ndarray | None = None  # per prepared user: distinct history items (distinct_seen)
        if need_seen:  # key = user row * n_items + item index, for every (user, history item)
            col = users.column("item_idx").combine_chunks()
            key = np.array(pc.list_parent_indices(col).to_numpy(), dtype=np.int64)  # a copy, changed in place
            key *= self.n_items
            key += np.asarray(pc.list_flatten(col).to_numpy(), dtype=np.int64)
            key.sort()  # repeats kept: searchsorted finds them all the same, without unique's extra copies
            self.seen_keys = key

    def distinct_seen(self, rows: np.ndarray) -> np.ndarray:
        """Distinct history items of prepared user rows ``rows`` (from the sorted seen keys, in blocks: no copy of them;
        counted once per check, whatever the number of variants asking)."""
        if self._distinct_seen is None:
            n_users = len(self.user_ids)
            per_user = np.zeros(n_users, np.int64)
            keys, block = self.seen_keys, 1 << 22
            for s in range(0, len(keys), block):
                k = keys[s : s + block]
                new = np.empty(len(k), bool)
                new[0] = s == 0 or k[0] != keys[s - 1]
                new[1:] = k[1:] != k[:-1]
                per_user += np.bincount(k[new] // self.n_items, minlength=n_users)
            self._distinct_seen = per_user
        return self._distinct_seen[rows]

    def seen(self, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Whether item ``items[i]`` is in the history of prepared user row ``rows[i]``."""
        q = rows * self.n_items + items
        pos = np.minimum(np.searchsorted(self.seen_keys, q), max(len(self.seen_keys) - 1, 0))
        return self.seen_keys[pos] == q if len(self.seen_keys) else np.zeros(len(q), dtype=bool)


def _check_batch(t: pa.Table, final: bool, st: _State, night: _Tonight, k: int, run_date: _dt.date, cfg: InferenceConfig) -> None:
    """Check the complete users of ``t`` (rows in file order); the last user's rows are carried to the next batch
    unless ``final``."""
    if st.carry is not None:
        t = pa.concat_tables([st.carry, t])
        st.carry = None
    n = t.num_rows
    if n == 0:
        return
    users = _as_str(t.column("user_id"))
    change = np.ones(n, dtype=bool)
    if n > 1:
        change[1:] = pc.not_equal(users[1:], users[:-1]).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(change)
    if not final:  # keep the last user's rows for the next batch: its rows may continue there
        cut = int(starts[-1])
        if cut == 0:
            st.carry = t
            return
        st.carry = t.slice(cut)
        t, users, change, starts, n = t.slice(0, cut), users.slice(0, cut), change[:cut], starts[:-1], cut
    st.rows += n
    st.groups += len(starts)
    st.user_firsts.append(users.take(pa.array(starts)))
    counts = np.diff(np.append(starts, n))
    group = np.repeat(np.arange(len(starts)), counts)
    first_user = lambda mask: users.filter(pa.array(mask)).to_pylist()  # noqa: E731

    def groups_with(bad: np.ndarray) -> tuple[int, list]:
        """(how many users have a row in ``bad``, the first few of them)."""
        if not bad.any():
            return 0, []
        g = np.unique(group[bad])
        return g.size, users.take(pa.array(starts[g[:SHOW]])).to_pylist()

    nulls = np.zeros(n, dtype=bool)
    for c in COLUMNS:
        nulls |= t.column(c).is_null().to_numpy(zero_copy_only=False)
    st.flag("nulls", nulls.sum(), first_user(nulls))
    dates = t.column("run_date").cast(pa.date32()).to_numpy(zero_copy_only=False)
    wrong_date = dates != np.datetime64(run_date)
    st.flag("date", wrong_date.sum(), [str(d) for d in dates[wrong_date][:SHOW]])

    rank = np.asarray(t.column("rank").fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
    pos = np.arange(n) - np.repeat(starts, counts) + 1
    bad_rank = rank != pos
    st.flag("rank", *groups_with(bad_rank))
    over = counts > k
    st.flag("k", over.sum(), users.take(pa.array(starts[over])).to_pylist())
    st.fewer += int((counts < k).sum())
    score = np.asarray(t.column("score").cast(pa.float64()).fill_null(float("nan")).to_numpy(zero_copy_only=False))
    rising = np.zeros(n, dtype=bool)
    rising[1:] = ~change[1:] & ~(score[1:] <= score[:-1])  # NaN counts as out of order
    st.flag("order", *groups_with(rising))
    varies = np.zeros(n, dtype=bool)
    for c in ("source", "variant", "model_version"):
        v = _as_str(t.column(c))
        if n > 1:
            varies[1:] |= ~change[1:] & pc.not_equal(v[1:], v[:-1]).fill_null(True).to_numpy(zero_copy_only=False)
    st.flag("constant", *groups_with(varies))
    src = _as_str(t.column("source")).fill_null("<null>")
    vc = pc.value_counts(src)
    for value, cnt in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
        st.sources[value] = st.sources.get(value, 0) + int(cnt)
    bad_src = pc.invert(pc.is_in(src, value_set=pa.array(["model", "fallback"]))).to_numpy(zero_copy_only=False)
    st.flag("source", bad_src.sum(), first_user(bad_src))
    var = _as_str(t.column("variant")).fill_null("")
    at = pa.array(starts)
    for r in pa.table({"v": var.take(at), "s": src.take(at)}).group_by(["v", "s"]).aggregate([("s", "count")]).to_pylist():
        st.user_sources[r["v"], r["s"]] = st.user_sources.get((r["v"], r["s"]), 0) + int(r["s_count"])

    items = _as_str(t.column("item_id"))

    def user_item(mask):  # "user: item" of the rows in mask (the first few)
        m = pa.array(mask)
        return [f"{u}: {i}" for u, i in zip(users.filter(m).to_pylist()[:SHOW], items.filter(m).to_pylist()[:SHOW])]
    enc = pc.dictionary_encode(items)  # the batch's distinct items looked up once each
    ix = night.item_index.get_indexer(enc.dictionary.to_numpy(zero_copy_only=False)).astype(np.int64)
    ix = ix[enc.indices.to_numpy(zero_copy_only=False)] if len(enc.dictionary) else np.zeros(n, np.int64)  # -1: unknown
    unknown = ix < 0
    st.flag("catalogue", unknown.sum(), user_item(unknown))
    known = ix >= 0
    per_user = night.user_index.get_indexer(users.take(pa.array(starts)).to_numpy(zero_copy_only=False))
    row = np.repeat(per_user.astype(np.int64), counts)  # each row's prepared user (-1: not prepared); users looked up once
    head = known & (row >= 0) & (pos <= TOP) & pc.equal(src, "model").fill_null(False).to_numpy(zero_copy_only=False)
    for v in pc.unique(var).to_pylist():  # one variant per table, a few in an A/B test
        mine = pc.equal(var, v).to_numpy(zero_copy_only=False)
        e = st.exposure.setdefault(v, np.zeros(night.n_items, np.int64))
        e += np.bincount(ix[known & mine], minlength=night.n_items)
        h = head & mine
        st.top_keys.setdefault(v, []).append(row[h] * night.n_items + ix[h])
    key = group[known].astype(np.int64) * night.n_items + ix[known]
    sk = np.sort(key)
    twice = sk[1:][sk[1:] == sk[:-1]]
    dup = np.zeros(n, dtype=bool)
    if twice.size:
        dup[np.flatnonzero(known)[np.isin(key, twice)]] = True
    st.flag("duplicate", *groups_with(dup))
    if cfg.exclude_unavailable and night.unavailable.size:
        un = known & np.isin(ix, night.unavailable)
        st.flag("unavailable", un.sum(), user_item(un))
    if night.seen_keys is not None:
        ok = known & (row >= 0)
        seen = np.zeros(n, dtype=bool)
        seen[ok] = night.seen(row[ok], ix[ok])
        st.flag("seen", seen.sum(), user_item(seen))


def _check_data_through(prepared, want: str, probs: _Problems, report: dict) -> None:
    """Tonight's prepared data reaches ``want`` (its manifest's newest usable event, counted by data_prep)."""
    try:
        want_day = _dt.date.fromisoformat(want)
    except ValueError:
        raise CheckError(f"check.expect_events_through {want!r} is not YYYY-MM-DD") from None
    newest = (prepared.manifest.get("counts") or {}).get("events_newest_utc")
    report["data_through"] = newest
    if newest is None:
        probs.add("fresh", f"prepared version {prepared.version!r} does not record its newest event (prepared before "
                           f"lmrec counted events per day): cannot tell whether it reaches {want_day}")
    elif _dt.datetime.fromisoformat(newest).date() < want_day:
        probs.add("fresh", f"tonight's prepared data (version {prepared.version!r}) ends on {newest[:10]}, before "
                           f"{want_day}: that day's events had not landed when data_prep ran (it kept the previous "
                           f"version); rerun data_prep and inference once they are there")


def _previous_table(cfg: InferenceConfig, day: _dt.date) -> tuple[str, Path] | None:
    """The newest ``dt=`` link under output_dir before ``day``, at most ``check.previous_max_age_days`` earlier."""
    for back in range(1, cfg.check.previous_max_age_days + 1):
        d = (day - _dt.timedelta(days=back)).isoformat()
        link = Path(cfg.output_dir) / f"dt={d}"
        if os.path.lexists(link):
            return d, link
    return None


def _sorted_unique(parts: list[np.ndarray]) -> np.ndarray:
    """The distinct values of ``parts``, sorted (sorted in place: one copy of the keys, not np.unique's three)."""
    if not parts:
        return np.zeros(0, np.int64)
    a = np.concatenate(parts)
    parts.clear()
    a.sort()
    if len(a) > 1:
        keep = np.empty(len(a), bool)
        keep[0] = True
        np.not_equal(a[1:], a[:-1], out=keep[1:])
        if not keep.all():
            a = a[keep]
    return a


def _in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Whether each of ``values`` is in ``sorted_set`` (sorted, distinct): a binary search, no sort of the values."""
    if not len(sorted_set):
        return np.zeros(len(values), bool)
    pos = np.searchsorted(sorted_set, values)
    np.minimum(pos, len(sorted_set) - 1, out=pos)
    return sorted_set[pos] == values


def _read_previous(folder: Path, night: _Tonight) -> dict:
    """What section 7 compares, from the previous table's part files (user, rank, item, source and variant columns,
    one record batch at a time): its users and users per (variant, source), distinct items per variant, the keys of
    its model-served top-10 rows on tonight's user rows and catalogue indexes, and the rows of the users it served by
    the model."""
    firsts, keys, model_rows = [], [], []
    exposure: dict[str, np.ndarray] = {}  # per variant: tonight's catalogue items in its lists
    gone: dict[str, set] = {}  # per variant: items no longer in the catalogue
    cols = ["user_id", "rank", "item_id", "source", "variant"]
    for f in sorted(folder.glob("part-*.parquet")):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=cols):
            u = _as_str(batch.column("user_id"))
            src, var = _as_str(batch.column("source")), _as_str(batch.column("variant")).fill_null("")
            rank = np.asarray(batch.column("rank").fill_null(0).to_numpy(zero_copy_only=False), np.int64)
            first = pa.array(rank == 1)
            firsts.append(pa.table({"user_id": u.filter(first), "source": src.filter(first), "variant": var.filter(first)}))
            items = _as_str(batch.column("item_id"))
            enc = pc.dictionary_encode(items)
            dix = night.item_index.get_indexer(enc.dictionary.to_numpy(zero_copy_only=False)).astype(np.int64)
            ix = dix[enc.indices.to_numpy(zero_copy_only=False)] if len(dix) else np.zeros(0, np.int64)
            for v in pc.unique(var).to_pylist():
                rows = pc.equal(var, v).to_numpy(zero_copy_only=False)
                exposure.setdefault(v, np.zeros(night.n_items, bool))[ix[rows & (ix >= 0)]] = True
                if (ix[rows] < 0).any():  # that variant's own items no longer in the catalogue
                    gone.setdefault(v, set()).update(pc.unique(items.filter(pa.array(rows & (ix < 0)))).to_pylist())
            model = pc.equal(src, "model").fill_null(False).to_numpy(zero_copy_only=False)
            head = (ix >= 0) & (rank >= 1) & (rank <= TOP) & model
            row = night.user_index.get_indexer(u.filter(pa.array(head)).to_numpy(zero_copy_only=False)).astype(np.int64)
            keys.append(row[row >= 0] * night.n_items + ix[head][row >= 0])
            mrow = night.user_index.get_indexer(u.filter(pa.array((rank == 1) & model)).to_numpy(zero_copy_only=False))
            model_rows.append(mrow[mrow >= 0].astype(np.int64))
    t = pa.concat_tables(firsts) if firsts else pa.table({"user_id": pa.array([], pa.string()), "source": pa.array([], pa.string()),
                                                         "variant": pa.array([], pa.string())})
    by = t.group_by(["variant", "source"]).aggregate([("user_id", "count_distinct")]).to_pylist()
    variants = {}
    for v in sorted({r["variant"] for r in by} | set(exposure)):
        users = sum(r["user_id_count_distinct"] for r in by if r["variant"] == v)
        fb = sum(r["user_id_count_distinct"] for r in by if r["variant"] == v and r["source"] == "fallback")
        variants[v] = dict(users=users, users_fallback=fb, fallback_share=fb / users if users else 0.0,
                           items_recommended=int(exposure.get(v, np.zeros(0, bool)).sum()) + len(gone.get(v, ())))
    all_items = np.zeros(night.n_items, bool)
    for e in exposure.values():
        all_items |= e
    users = len(pc.unique(t.column("user_id")))
    fb = len(pc.unique(t.filter(pc.equal(t.column("source"), "fallback")).column("user_id")))
    return dict(users=users, users_fallback=fb, fallback_share=fb / users if users else 0.0,
                items_recommended=int(all_items.sum()) + len(set().union(*gone.values())),
                variants=variants, keys=_sorted_unique(keys), model_rows=_sorted_unique(model_rows))


def _overlap(top_keys: np.ndarray, prev: dict, night: _Tonight, t: int, n_eligible: int) -> dict:
    """Tonight's model-served top-``t`` rows (sorted keys) of the users served by the model on both nights: the share
    found in the same user's top-10 last night, the share expected by chance and the overlap beyond it."""
    users_of = top_keys // max(night.n_items, 1)  # sorted, as top_keys is
    both = np.intersect1d(_sorted_unique([users_of]), prev["model_rows"], assume_unique=True)
    mine = top_keys[_in_sorted(users_of, both)]
    del users_of
    overlap = float(_in_sorted(mine, prev["keys"]).mean()) if len(mine) else None
    # two unrelated lists of t = min(K, TOP) items drawn from the n items a user may be shown share t / n of them by
    # chance (n = eligible items less the user's distinct history items with exclude_seen; averaged over the users):
    # the rule reads the overlap beyond that (1 = the same lists, 0 = chance), so that a small catalogue or long
    # histories' chance is not taken for agreement
    pool = np.full(len(both), n_eligible, np.int64)
    if night.seen_keys is not None and len(both):
        pool -= night.distinct_seen(both)
    chance = float(np.mean(t / np.maximum(pool, t))) if len(both) else t / max(n_eligible, t)
    beyond = None if overlap is None else (overlap - chance) / (1 - chance) if chance < 1 else 1.0
    return dict(users_in_both_by_model=len(both), top10_overlap=None if overlap is None else round(overlap, 6),
                top10_overlap_chance=round(chance, 6), top10_overlap_beyond_chance=None if beyond is None else round(beyond, 6))


def _content_rules(c, probs: _Problems, was: str, who: str, now: dict, then: dict | None, ov: dict, same_k: bool,
                   users_rule: bool) -> None:
    """The four rules of section 7 for ``who`` ("the table" or "variant 'b'"): ``now`` tonight's figures, ``then``
    last night's (None: a variant new tonight, only the overlap is judged), ``ov`` the overlap."""
    if then is not None and users_rule and then["users"] and c.min_users_ratio and now["users"] < c.min_users_ratio * then["users"]:
        probs.add("content", f"{who} serves {fmt_count(now['users'])} users, {now['users'] / then['users']:.0%} of the "
                             f"{fmt_count(then['users'])} in {was} (check.min_users_ratio {c.min_users_ratio:g}): users "
                             "lost from the log or by data_prep?")
    if then is not None and same_k and then["items_recommended"] and c.min_items_ratio and (
            now["items_recommended"] < c.min_items_ratio * then["items_recommended"]):
        probs.add("content", f"{who}: the lists hold {fmt_count(now['items_recommended'])} distinct items, "
                             f"{now['items_recommended'] / then['items_recommended']:.0%} of the "
                             f"{fmt_count(then['items_recommended'])} in {was} (check.min_items_ratio {c.min_items_ratio:g}): "
                             "a model that collapsed onto a few items?")
    if then is not None and c.max_fallback_rise < 1 and now["fallback_share"] > then["fallback_share"] + c.max_fallback_rise:
        probs.add("content", f"{who}: {now['fallback_share']:.1%} of the users get the popularity fallback, against "
                             f"{then['fallback_share']:.1%} in {was} (check.max_fallback_rise {c.max_fallback_rise:g}): the "
                             "model does not know their history items (a model and catalogue whose ids do not match?)")
    b = ov["top10_overlap_beyond_chance"]
    if b is not None and c.min_top10_overlap and b < c.min_top10_overlap:
        probs.add("content", f"{who}: the {fmt_count(ov['users_in_both_by_model'])} users served by the model on both "
                             f"nights keep {ov['top10_overlap']:.1%} of their top-{TOP} items from {was} on average, "
                             f"{b:.1%} beyond the {ov['top10_overlap_chance']:.1%} two unrelated lists share "
                             f"(check.min_top10_overlap {c.min_top10_overlap:g}): lists unrelated to last night's (a model "
                             "that learned nothing, a mixed-up export?)")


def _compare_previous(cfg: InferenceConfig, day: _dt.date, k: int, content: dict, top_keys: dict[str, np.ndarray],
                      night: _Tonight, probs: _Problems, report: dict) -> None:
    """Section 7: tonight's table against the previous night's (``report["previous"]``; problems "content"). With
    several variants tonight (an A/B test) the rules also hold for each variant alone: a new model serving a tenth of
    the users would hardly move the whole table's figures."""
    c = cfg.check
    found = _previous_table(cfg, day)
    if found is None:
        report["previous"] = None
        print0(f"[check] no table in the {c.previous_max_age_days} days before {day} under {cfg.output_dir}: "
               "nothing to compare tonight's with")
        return
    date, link = found
    folder = Path(os.path.realpath(link))
    try:
        man = json.loads((folder / "_manifest.json").read_text()) if (folder / "_SUCCESS").is_file() else None
    except (OSError, ValueError):
        man = None
    if man is None:
        report["previous"] = dict(run_date=date, table=str(link), compared=False)
        print0(f"[check] the previous table {link} is not whole (no _SUCCESS or manifest): not compared")
        return
    t0 = time.time()
    try:
        prev = _read_previous(folder, night)
    except (OSError, pa.ArrowInvalid, KeyError) as e:
        report["previous"] = dict(run_date=date, table=str(link), compared=False)
        print0(f"[check] the previous table {folder} is not readable ({type(e).__name__}: {e}): not compared")
        return
    prev_k = int(man.get("k", -1))
    t, n_eligible = min(k, TOP), content["items_eligible"]
    ov = _overlap(_sorted_unique([a for a in top_keys.values() if len(a)]), prev, night, t, n_eligible)
    figs = ("users", "users_fallback", "fallback_share", "items_recommended")
    out = dict(run_date=date, table=str(link), run_folder=str(folder), run_id=man.get("run_id"), k=prev_k,
               model_version=(man.get("model") or {}).get("model_version"), compared=True,
               **{f: round(prev[f], 6) for f in figs}, **ov)
    was = f"dt={date}'s table"
    if prev_k != k:
        print0(f"[check] {was} has K = {prev_k}, tonight's {k}: distinct items not compared")
    o = ov["top10_overlap"]
    print0(f"[check] against {was}: users {fmt_count(content['users'])} / {fmt_count(prev['users'])}, distinct items "
           f"{fmt_count(content['items_recommended'])} / {fmt_count(prev['items_recommended'])}, fallback "
           f"{content['fallback_share']:.1%} / {prev['fallback_share']:.1%}, top-{TOP} overlap "
           + ("n/a" if o is None else f"{o:.1%} ({ov['top10_overlap_beyond_chance']:.1%} beyond chance)")
           + f" ({fmt_count(ov['users_in_both_by_model'])} users)")
    _content_rules(c, probs, was, "the table", content, prev, ov, prev_k == k, users_rule=True)
    if len(content.get("by_variant") or {}) > 1:
        out["by_variant"] = {}
        for v, now in content["by_variant"].items():
            then = prev["variants"].get(v)
            vov = _overlap(top_keys.get(v, np.zeros(0, np.int64)), prev, night, t, n_eligible)
            out["by_variant"][v] = dict(previous=None if then is None else {f: round(then[f], 6) for f in figs}, **vov)
            # a variant's users follow its traffic share, and its distinct items with them: compared only while its
            # users stay within 0.8-1.25x of last night's (a share changed on purpose is not a collapse)
            steady = then is not None and then["users"] and 0.8 <= now["users"] / then["users"] <= 1.25
            _content_rules(c, probs, was, f"variant {v!r}", now, then, vov, prev_k == k and steady, users_rule=False)
    out["seconds"] = round(time.time() - t0, 2)
    report["previous"] = out


def _utc_seconds(text: str | None) -> float | None:
    """An ISO date or datetime (UTC when naive) -> epoch seconds; None stays None."""
    if not text:
        return None
    t = _dt.datetime.fromisoformat(text)
    return (t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)).timestamp()


# (name, help, where in the report); gauges, each labelled with table = output_dir
METRICS = (
    ("lmrec_check_ok", "1 when the morning check found no problem in the table, else 0", lambda r: int(bool(r["ok"]))),
    ("lmrec_check_completed_timestamp_seconds", "when the check finished (Unix time)", lambda r: _utc_seconds(r["checked_utc"])),
    ("lmrec_check_duration_seconds", "how long the check took", lambda r: r.get("seconds")),
    ("lmrec_table_run_date_timestamp_seconds", "the checked table's date, 00:00 UTC (Unix time)", lambda r: _utc_seconds(r["run_date"])),
    ("lmrec_table_data_through_timestamp_seconds", "the newest usable event of the table's prepared data (Unix time; "
     "with check.expect_events_through)", lambda r: _utc_seconds(r.get("data_through"))),
    ("lmrec_table_rows", "rows in the table's part files", lambda r: (r.get("counts") or {}).get("rows")),
    ("lmrec_table_users", "users with rows", lambda r: (r.get("counts") or {}).get("users")),
    ("lmrec_table_users_without_rows", "prepared users without rows", lambda r: (r.get("counts") or {}).get("users_without_rows")),
    ("lmrec_table_fallback_share", "share of the users served the popularity fallback", lambda r: (r.get("content") or {}).get("fallback_share")),
    ("lmrec_table_items_recommended", "distinct items in the lists", lambda r: (r.get("content") or {}).get("items_recommended")),
    ("lmrec_table_coverage", "share of the eligible items in at least one list", lambda r: (r.get("content") or {}).get("coverage")),
    ("lmrec_table_gini", "Gini index of the items' exposure (0 = even, 1 = a few items)", lambda r: (r.get("content") or {}).get("gini")),
    ("lmrec_table_top10_overlap", "share of the top-10 items kept from the previous night's table (users served by "
     "the model on both nights)", lambda r: (r.get("previous") or {}).get("top10_overlap")),
    ("lmrec_table_top10_overlap_beyond_chance", "that overlap beyond what unrelated lists share by chance (1 = the same "
     "lists, 0 = chance)", lambda r: (r.get("previous") or {}).get("top10_overlap_beyond_chance")),
)


def prometheus_text(report: dict, table: str) -> str:
    """The report as Prometheus text exposition (gauges; a figure the report lacks is left out; problems counted per
    check)."""
    esc = table.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    lines = []
    for name, text, get in METRICS:
        value = get(report)
        if value is not None:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f'{name}{{table="{esc}"}} {float(value):.10g}']
    per_check: dict[str, int] = {}
    for p in report.get("problems") or []:
        per_check[p["check"]] = per_check.get(p["check"], 0) + 1
    lines += ["# HELP lmrec_check_problems problems the morning check found, per check (section of inference/check.py)",
              "# TYPE lmrec_check_problems gauge"]
    lines += [f'lmrec_check_problems{{table="{esc}",check="{c}"}} {per_check.get(c, 0)}'
              for c in ("published", "fresh", "settings", "files", "rows", "items", "users", "content")]
    return "\n".join(lines) + "\n"


def check_table(cfg: InferenceConfig) -> dict:
    """Check ``<output_dir>/dt=<run_date>``; returns the report (``ok`` false when a problem was found)."""
    from data_prep.schema import PreparedDataError, load_prepared

    t0 = time.time()
    run_date = cfg.run_date or _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    try:
        day = _dt.date.fromisoformat(run_date)
    except ValueError:
        raise CheckError(f"run_date {run_date!r} is not YYYY-MM-DD") from None
    if not cfg.output_dir:
        raise CheckError("output_dir is empty: set it to the tables' folder (the inference config's output_dir)")
    link = Path(cfg.output_dir) / f"dt={run_date}"
    out = Path(cfg.check.report) if cfg.check.report else report_path(cfg.output_dir, run_date)
    probs = _Problems()
    report = dict(kind=REPORT_KIND, table=str(link), run_date=run_date,
                  checked_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def finish() -> dict:
        report.update(ok=not probs.items, problems=probs.items, seconds=round(time.time() - t0, 2))
        atomic_write_json(out, report)
        if cfg.check.metrics_file:
            atomic_write_text(cfg.check.metrics_file, prometheus_text(report, str(cfg.output_dir)))
        verdict = "OK" if report["ok"] else f"{len(probs.items)} PROBLEM(S)"
        print0(f"[check] {link}: {verdict} | {report.get('summary', '')} | {fmt_secs(time.time() - t0)} | report {out}")
        return report

    # ---- 1. published
    folder = Path(os.path.realpath(link))
    if not os.path.lexists(link):
        probs.add("published", f"no table: {link} does not exist (did tonight's inference run?)")
        return finish()
    if not (folder / "_SUCCESS").is_file():
        probs.add("published", f"{link} -> {folder} has no _SUCCESS: not a whole table")
        return finish()
    try:
        man = json.loads((folder / "_manifest.json").read_text())
    except (OSError, ValueError) as e:
        probs.add("published", f"{folder / '_manifest.json'}: not readable ({type(e).__name__}: {e})")
        return finish()
    report.update(run_folder=str(folder), run_id=man.get("run_id"), model=(man.get("model") or {}).get("path"),
                  data_version=(man.get("data") or {}).get("version"))
    if man.get("run_date") != run_date:
        probs.add("published", f"the manifest's run_date is {man.get('run_date')!r}, not {run_date}")

    # ---- 2. tonight's data and settings
    if not cfg.prepared_dir:
        raise CheckError("prepared_dir is empty: set it to tonight's prepared data (the inference config's prepared_dir)")
    try:
        prepared = load_prepared(cfg.prepared_dir)
    except PreparedDataError as e:
        raise CheckError(str(e)) from None
    report["tonight_data_version"] = prepared.version
    if man.get("data", {}).get("version") != prepared.version:
        probs.add("fresh", f"the table was computed from prepared version {man.get('data', {}).get('version')!r}, but "
                           f"{cfg.prepared_dir} holds {prepared.version!r} tonight")
    if cfg.check.expect_events_through:
        _check_data_through(prepared, cfg.check.expect_events_through, probs, report)
    known = (prepared.manifest.get("completeness") or {}).get("problem")
    if known:  # published although its log was incomplete (forget requests outranked keeping the previous version)
        probs.add("fresh", f"tonight's prepared data (version {prepared.version!r}) was published incomplete: {known}")
    k = int(man.get("k", -1))
    if k != cfg.k:
        probs.add("settings", f"the table has K = {k}, the config asks for {cfg.k}")
    excl = man.get("exclusions") or {}
    for key, want in (("seen", cfg.exclude_seen), ("unavailable", cfg.exclude_unavailable),
                      ("active_since_days", cfg.active_since_days)):
        if excl.get(key) != want:
            probs.add("settings", f"the table was written with {key} = {excl.get(key)!r}, the config says {want!r}")

    # ---- 3. files
    listed = {p["file"]: int(p["rows"]) for p in man.get("parts", [])}
    present = sorted(p.name for p in folder.glob("part-*.parquet"))
    missing = sorted(set(listed) - set(present))
    extra = sorted(set(present) - set(listed))
    if missing:
        probs.add("files", f"{len(missing)} part file(s) the manifest lists are missing", missing, len(missing))
    if extra:
        probs.add("files", f"{len(extra)} part file(s) the manifest does not list", extra, len(extra))
    files = [f for f in present if f in listed]
    for f in files:
        try:
            rows = pq.ParquetFile(folder / f).metadata.num_rows
        except (OSError, pa.ArrowInvalid) as e:
            probs.add("files", f"{folder / f}: not readable Parquet ({type(e).__name__}: {e})")
            files = [x for x in files if x != f]
            continue
        if rows != listed[f]:
            probs.add("files", f"{folder / f}: {rows} rows, the manifest records {listed[f]}")

    # ---- 4-5. rows and items, streamed
    night = _Tonight(prepared, need_seen=cfg.exclude_seen)
    st = _State()
    for f in files:
        pf = pq.ParquetFile(folder / f)
        names = pf.schema_arrow.names
        lacking = [c for c in COLUMNS if c not in names]
        if lacking:
            probs.add("rows", f"{folder / f}: columns {lacking} missing")
            continue
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=list(COLUMNS)):
            _check_batch(pa.Table.from_batches([batch]), False, st, night, k, day, cfg)
        if st.carry is not None:  # the file's last user: a user's rows never continue into another file
            _check_batch(st.carry.slice(0, 0), True, st, night, k, day, cfg)
    for key, n in st.bad.items():
        if n:
            probs.add("items" if key in ITEM_PROBLEMS else "rows",
                      f"{n} {PROBLEM_TEXT[key]}", st.examples[key], n)

    # ---- 6. users
    counts = man.get("counts") or {}
    table_users = pa.concat_arrays(st.user_firsts) if st.user_firsts else pa.array([], pa.string())
    distinct = pc.unique(table_users)
    if len(distinct) != st.groups:
        vc = pc.value_counts(table_users)
        twice = vc.filter(pc.greater(vc.field("counts"), 1)).field("values")
        probs.add("users", f"{len(twice)} users have rows in more than one place (not together, or in two parts)",
                  twice.to_pylist(), len(twice))
    absent = pc.invert(pc.is_in(night.user_ids, value_set=distinct))
    n_absent = int(pc.sum(absent).as_py() or 0)
    inactive = int(counts.get("users_inactive", 0)) if cfg.active_since_days else 0
    if n_absent != inactive:
        probs.add("users", f"{n_absent} of tonight's {fmt_count(len(night.user_ids))} prepared users have no rows"
                           + (f" (the manifest counts {inactive} inactive)" if cfg.active_since_days else ""),
                  night.user_ids.filter(absent).to_pylist()[:SHOW], n_absent)
    strangers = pc.invert(pc.is_in(distinct, value_set=night.user_ids))
    n_strangers = int(pc.sum(strangers).as_py() or 0)
    if n_strangers:
        probs.add("users", f"{n_strangers} users in the table are not in tonight's prepared data",
                  distinct.filter(strangers).to_pylist(), n_strangers)
    if st.fewer != int(counts.get("users_fewer_than_k", 0)):
        probs.add("rows", f"{st.fewer} users have fewer than K = {k} rows; the manifest says "
                          f"{counts.get('users_fewer_than_k', 0)} have fewer items allowed")
    if st.rows != int(counts.get("rows", -1)):
        probs.add("files", f"the parts hold {st.rows} rows, the manifest's counts.rows is {counts.get('rows')}")
    report["counts"] = dict(rows=st.rows, users=len(distinct), users_prepared=len(night.user_ids),
                            users_without_rows=n_absent, users_fewer_than_k=st.fewer, rows_by_source=st.sources)

    # ---- 7. content, against the previous night's table
    from train.metrics import beyond_accuracy

    items_t = prepared.items.data.table
    pop = np.asarray(items_t.column("n_train_events").to_numpy(zero_copy_only=False), np.float64)
    eligible = (np.asarray(items_t.column("available").to_numpy(zero_copy_only=False), bool)
                if cfg.exclude_unavailable else None)
    exposure = sum(st.exposure.values()) if st.exposure else np.zeros(night.n_items, np.int64)
    n_fallback = sum(n for (_, src), n in st.user_sources.items() if src == "fallback")
    content = dict(users=len(distinct), users_fallback=n_fallback,
                   fallback_share=round(n_fallback / len(distinct), 6) if len(distinct) else 0.0,
                   items_recommended=int((exposure > 0).sum()),
                   **{key: beyond_accuracy(exposure, pop, eligible)[key] for key in ("items_eligible", "coverage", "gini")})
    if len(st.exposure) > 1:  # an A/B test: the same figures per variant
        content["by_variant"] = {}
        for v in sorted(st.exposure):
            users_v = sum(n for (var, _), n in st.user_sources.items() if var == v)
            fb_v = st.user_sources.get((v, "fallback"), 0)
            content["by_variant"][v] = dict(users=users_v, users_fallback=fb_v,
                                            fallback_share=round(fb_v / users_v, 6) if users_v else 0.0,
                                            items_recommended=int((st.exposure[v] > 0).sum()))
    report["content"] = content
    if cfg.check.compare_previous:
        keys = {v: _sorted_unique(parts) for v, parts in st.top_keys.items()}
        _compare_previous(cfg, day, k, content, keys, night, probs, report)
    report["summary"] = (f"{fmt_count(len(distinct))} users x {k} rows ({fmt_count(st.rows)} rows), data {prepared.version}, "
                         f"model {(man.get('model') or {}).get('model_version')}")
    return finish()


def main() -> None:
    import sys

    from lmrec_common.config import cli_args, load_config

    path, overrides = cli_args(sys.argv[1:], InferenceConfig, "python -m inference.check")
    cfg = load_config(InferenceConfig, path, overrides)
    rep = check_table(cfg)
    sys.exit(0 if rep["ok"] else 1)


if __name__ == "__main__":
    from lmrec_common.config import ConfigError
    from lmrec_common.log import user_errors

    user_errors(main, (CheckError, ConfigError))
