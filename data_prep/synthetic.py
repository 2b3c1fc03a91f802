"""Synthetic behaviour logs: lmrec's bundled sample data and its benchmark generator.

    python -m data_prep.synthetic --out work/raw/sample                      # ~2k users, 1k items, 60k events
    python -m data_prep.synthetic --out work/raw/sample --dirty              # + realistic dirt (see below)
    python -m data_prep.synthetic --out work/raw/bench10m n_events=10000000 n_users=200000 n_items=50000

Writes exactly the raw inputs of docs/CONTRACTS.md section 1 (built in a temporary sibling folder and
renamed into place, so a reader never sees half a dataset):

    <out>/events/dt=YYYY-MM-DD/part-00000.parquet   user_id, item_id, timestamp, event_type, value
    <out>/items/items.parquet                        item_id, title, description, category, brand, available
    <out>/generation.json                            config, counts, and how many dirty rows of each kind

How the data is made (each part gives a model something to learn, so evaluations mean something):
- Items belong to latent topics. Each topic has its own vocabulary; an item's title/description are
  drawn from a window of its topic's vocabulary centred on the item's place in the topic's sequence,
  so text carries topic AND neighbourhood signal. Category follows topic (90%), brand is per topic.
- Items of a topic are ordered in a hidden sequence (a random permutation, unrelated to item ids).
  Inside a session a user mostly moves 1-3 steps forward in that sequence (``seq_prob``): a strong
  first-order sequential signal that a next-item model exploits and most-popular cannot.
- Otherwise the user jumps: topic from the user's topic mix, which drifts from mix 0 to mix 1 over
  the window (``drift``); item from a Zipf popularity within the topic; topics themselves are Zipf
  popular, so item popularity has a long tail.
- Sessions (mean ``session_len_mean`` events, 20 s - 10 min apart inside, hours-days between),
  event types from a view/click/cart/purchase funnel, value = dwell seconds (view/click) or price.
- ``cold_item_frac`` of the catalogue never gets an event (cold-start items).
- ``--dirty`` adds, as EXTRA rows (each with exactly one defect, clean rows untouched): null
  user_id, null item_id, exact duplicate events, timestamps at epoch 0 and in year 2100, events of
  unknown items, an unknown event type, and (``dirty_string_ts_file``) a second events file whose
  ``timestamp`` column is unparsable strings; in the catalogue: items with empty text, a null
  item_id, duplicated catalogue rows, and latin-1 (non-UTF-8) bytes in ``description`` (the column
  is then written as Parquet binary, as legacy exports do). generation.json counts each kind.

Generation is vectorised numpy over chunks of users (``events_per_chunk`` events at a time), each
chunk appended as row groups to one open writer per day, so memory stays bounded at 10M+ events.
Deterministic: the same config (including ``seed`` and ``events_per_chunk``) gives the same files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmrec_common.config import ConfigError, config_from_dict, load_config, to_dict
from lmrec_common.log import Progress, fmt_count
from lmrec_common.manifest import base_manifest
from lmrec_common.publish import atomic_write_json, staged_dir

EVENT_TYPES = ("view", "click", "cart", "purchase")
# funnel: most events are views, few are purchases (probabilities of each type per event)
EVENT_TYPE_P = np.array([0.65, 0.22, 0.09, 0.04])
UNKNOWN_EVENT_TYPE = "hover"
SECONDS_PER_DAY = 86_400
YEAR_2100_MS = 4_118_083_200_000  # 2100-07-01T00:00:00Z in epoch ms: after any sane max_timestamp (even "2100-01-01")
UNPARSABLE_TS = ("not-a-date", "", "2026-13-45 25:61:00", "31/02/2026", "NaN")
LATIN1_SNIPPETS = ("Misérables édition spéciale", "Crème brûlée façon grand-mère", "Año nuevo: señal añeja", "Über Größe")

CATEGORY_NAMES = (
    "Books", "Electronics", "Home & Kitchen", "Garden", "Toys", "Sports", "Beauty", "Fashion",
    "Grocery", "Music", "Movies", "Automotive", "Office", "Pets", "Health", "Baby", "Tools",
    "Jewelry", "Games", "Travel",
)
COMMON_WORDS = (
    "new", "classic", "premium", "compact", "deluxe", "original", "smart", "light", "pro", "mini",
    "large", "set", "edition", "pack", "series", "plus", "ultra", "essential", "vintage", "modern",
    "with", "and", "for", "the", "of", "in", "easy", "daily", "best", "home",
)


@dataclass
class SyntheticConfig:
    n_users: int = 2000
    n_items: int = 1000
    n_events: int = 60_000
    n_topics: int = 20
    n_categories: int = 10
    n_days: int = 30
    start_date: str = "2026-10-01"  # first dt= partition (UTC)
    seed: int = 0
    cold_item_frac: float = 0.05  # catalogue items that never get an event
    unavailable_frac: float = 0.03  # catalogue items with available=false
    min_user_events: int = 2
    max_user_events: int = 2000
    seq_prob: float = 0.75  # inside a session: P(next item = 1-3 steps forward in the topic sequence)
    session_len_mean: float = 6.0  # events per session (geometric)
    drift: float = 0.5  # weight of the user's second topic mix at the end of the window (0 = no drift)
    topic_concentration: float = 0.5  # Dirichlet concentration of a user's topic mix (small = focused)
    zipf_a: float = 1.1  # popularity exponent within a topic and across topics
    vocab_per_topic: int = 40
    id_type: Literal["int", "str"] = "int"  # int64 ids, or strings "u0000042"/"i000042"
    timestamp_format: Literal["timestamp_ms", "epoch_ms"] = "timestamp_ms"
    events_per_chunk: int = 1_000_000  # bounded memory: users are generated in chunks of ~this many events
    dirty: bool = False
    dirty_frac: float = 0.002  # per event-dirt kind: extra rows = max(1, round(dirty_frac * n_events))
    dirty_items: int = 5  # per catalogue-dirt kind
    dirty_string_ts_file: bool = True  # with dirty: also write events/dt=<last>/part-00001.parquet with string timestamps

    def validate(self) -> None:
        if self.n_users < 1 or self.n_items < 2 or self.n_topics < 1:
            raise ValueError("n_users >= 1, n_items >= 2 and n_topics >= 1 are required")
        if self.n_items < 2 * self.n_topics:
            raise ValueError(f"n_items ({self.n_items}) must be at least 2 * n_topics ({2 * self.n_topics})")
        if not 0 <= self.cold_item_frac < 0.5:
            raise ValueError(f"cold_item_frac must be in [0, 0.5), got {self.cold_item_frac}")
        if self.min_user_events < 1 or self.max_user_events < self.min_user_events:
            raise ValueError("need 1 <= min_user_events <= max_user_events")
        if self.n_events < self.n_users * self.min_user_events:
            raise ValueError(f"n_events ({self.n_events}) < n_users * min_user_events ({self.n_users * self.min_user_events})")
        if self.n_events > self.n_users * self.max_user_events:
            raise ValueError(f"n_events ({self.n_events}) > n_users * max_user_events ({self.n_users * self.max_user_events})")
        if self.n_days < 1:
            raise ValueError("n_days must be >= 1")
        try:
            dt.date.fromisoformat(self.start_date)
        except ValueError:
            raise ValueError(f"start_date {self.start_date!r} is not YYYY-MM-DD") from None
        for name in ("seq_prob", "drift", "unavailable_frac", "dirty_frac"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.session_len_mean < 1:
            raise ValueError("session_len_mean must be >= 1")
        if self.events_per_chunk < 1000:
            raise ValueError("events_per_chunk must be >= 1000")


# ----------------------------------------------------------------------------------------------
# catalogue


@dataclass
class _Catalogue:
    """Arrays over item index 0..n_items-1 plus the walkable topic sequences (cold items left out)."""

    topic: np.ndarray  # (n_items,) int32
    cold: np.ndarray  # (n_items,) bool
    price: np.ndarray  # (n_items,) float64
    # walkable sequences, flattened topic after topic: seq_items[topic_start[t] + p] = item index
    seq_items: np.ndarray  # (n_walkable,) int64
    seq_pos: np.ndarray  # (n_items,) position of the item in its topic's walkable sequence, -1 if cold
    topic_start: np.ndarray  # (n_topics,) int64
    topic_size: np.ndarray  # (n_topics,) int64
    pop_cum: np.ndarray  # (n_walkable,) topic t's entries rise from t to t+1 (cumulative popularity)
    topic_weight: np.ndarray  # (n_topics,) Zipf popularity of each topic, sums to 1
    table: pa.Table  # the catalogue as written (clean rows)


def _pseudo_words(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct pronounceable words (2-3 consonant-vowel syllables), e.g. 'velora'."""
    cons = np.array(list("bcdfghklmnprstvz"))
    vows = np.array(list("aeiou"))
    out: list[str] = []
    seen = set(COMMON_WORDS)
    while len(out) < n:
        m = 2 * (n - len(out)) + 16
        nsyl = rng.integers(2, 4, size=m)
        c = cons[rng.integers(0, len(cons), size=(m, 3))]
        v = vows[rng.integers(0, len(vows), size=(m, 3))]
        for i in range(m):
            w = "".join(c[i, j] + v[i, j] for j in range(nsyl[i]))
            if w not in seen:
                seen.add(w)
                out.append(w)
                if len(out) == n:
                    break
    return out


def _zipf_weights(rng: np.random.Generator, n: int, a: float) -> np.ndarray:
    """Zipf weights 1/rank^a over a random ranking of n things, normalised to sum 1."""
    rank = rng.permutation(n) + 1
    w = 1.0 / rank.astype(np.float64) ** a
    return w / w.sum()


def _item_ids(cfg: SyntheticConfig, idx: np.ndarray) -> np.ndarray:
    """Item index -> the id written to disk (1-based ints, or 'i000042')."""
    if cfg.id_type == "int":
        return idx.astype(np.int64) + 1
    return np.char.add("i", np.char.zfill((idx + 1).astype(str), 6))


def _user_ids(cfg: SyntheticConfig, idx: np.ndarray) -> np.ndarray:
    if cfg.id_type == "int":
        return idx.astype(np.int64) + 1
    return np.char.add("u", np.char.zfill((idx + 1).astype(str), 7))


def _make_catalogue(cfg: SyntheticConfig, rng: np.random.Generator) -> _Catalogue:
    n, T = cfg.n_items, cfg.n_topics
    topic = rng.permutation(np.arange(n) % T).astype(np.int32)  # equal-sized topics, random membership
    # cold items: never walked; keep >= 2 walkable items in every topic
    cold = np.zeros(n, dtype=bool)
    n_cold = int(round(cfg.cold_item_frac * n))
    if n_cold:
        cand = rng.permutation(n)
        per_topic_left = np.bincount(topic, minlength=T)
        for i in cand:
            if n_cold == 0:
                break
            if per_topic_left[topic[i]] > 2:
                cold[i] = True
                per_topic_left[topic[i]] -= 1
                n_cold -= 1
    # hidden order inside each topic (over all items, cold ones included, so text windows are smooth)
    order = np.lexsort((rng.random(n), topic))  # items grouped by topic, random order inside
    full_pos = np.empty(n, dtype=np.int64)
    counts_all = np.bincount(topic, minlength=T)
    starts_all = np.concatenate([[0], np.cumsum(counts_all)[:-1]])
    full_pos[order] = np.arange(n) - starts_all[topic[order]]
    # walkable sequence = the same order without cold items
    walk = order[~cold[order]]
    topic_size = np.bincount(topic[walk], minlength=T).astype(np.int64)
    topic_start = np.concatenate([[0], np.cumsum(topic_size)[:-1]]).astype(np.int64)
    seq_pos = np.full(n, -1, dtype=np.int64)
    seq_pos[walk] = np.arange(len(walk)) - topic_start[topic[walk]]
    # popularity: Zipf over a random ranking inside each topic; pop_cum rises from t to t+1 in topic t
    pop_cum = np.empty(len(walk), dtype=np.float64)
    for t in range(T):
        s, k = topic_start[t], topic_size[t]
        pop_cum[s : s + k] = t + np.cumsum(_zipf_weights(rng, k, cfg.zipf_a))
        pop_cum[s + k - 1] = t + 1.0  # exact end despite float rounding
    topic_weight = _zipf_weights(rng, T, cfg.zipf_a)

    # text: topic vocabularies; an item's words come from a window centred on its place in the topic
    V = cfg.vocab_per_topic
    words = np.array(_pseudo_words(rng, T * V + 2 * T))
    topic_vocab = words[: T * V].reshape(T, V)
    brand_words = words[T * V :].reshape(T, 2)
    common = np.array(COMMON_WORDS)
    centre = full_pos / np.maximum(counts_all[topic], 1) * V  # (n,) position on the vocab axis

    def draw(n_words: int, spread: float, p_common: float) -> np.ndarray:
        off = np.rint(centre[:, None] + rng.normal(0.0, spread, size=(n, n_words))).astype(np.int64) % V
        tw = topic_vocab[topic[:, None], off]  # (n, n_words)
        cw = common[rng.integers(0, len(common), size=(n, n_words))]
        return np.where(rng.random((n, n_words)) < p_common, cw, tw)

    title_w = draw(3, V / 12, 0.15)
    desc_w = draw(14, V / 8, 0.3)
    n_title = rng.integers(2, 4, size=n)
    titles = [" ".join(title_w[i, : n_title[i]]).capitalize() for i in range(n)]
    descs = [" ".join(desc_w[i]).capitalize() + "." for i in range(n)]
    cat_idx = np.where(rng.random(n) < 0.9, topic % cfg.n_categories, rng.integers(0, cfg.n_categories, size=n))
    cat_names = np.array([CATEGORY_NAMES[c % len(CATEGORY_NAMES)] + ("" if c < len(CATEGORY_NAMES) else f" {c}") for c in range(cfg.n_categories)])
    brands = np.char.capitalize(brand_words[topic, rng.integers(0, 2, size=n)])
    available = rng.random(n) >= cfg.unavailable_frac
    price = np.round(np.exp(rng.normal(3.0, 0.8, size=n)), 2)  # ~20 currency units, long tail

    table = pa.table(
        {
            "item_id": _item_ids(cfg, np.arange(n)),
            "title": pa.array(titles, pa.string()),
            "description": pa.array(descs, pa.string()),
            "category": pa.array(cat_names[cat_idx], pa.string()),
            "brand": pa.array(brands, pa.string()),
            "available": pa.array(available, pa.bool_()),
        }
    )
    return _Catalogue(topic, cold, price, walk.astype(np.int64), seq_pos, topic_start, topic_size, pop_cum, topic_weight, table)


def _dirty_catalogue(cfg: SyntheticConfig, table: pa.Table, rng: np.random.Generator, counts: dict) -> pa.Table:
    """Empty text, null ids, duplicated rows, latin-1 bytes in description (column becomes binary)."""
    k = cfg.dirty_items
    n = table.num_rows
    if 4 * k > n:
        raise ValueError(f"dirty_items={k} needs a catalogue of at least {4 * k} items, got {n}")
    pick = rng.choice(n, size=min(n, 2 * k), replace=False)
    empty_rows, latin_rows = pick[:k], pick[k : 2 * k]
    titles = table.column("title").to_pylist()
    descs = table.column("description").to_pylist()
    cats = table.column("category").to_pylist()
    brands = table.column("brand").to_pylist()
    for i in empty_rows:  # no text at all: "" or null in every text field
        titles[i], descs[i], cats[i], brands[i] = "", None, None, ""
    # description as bytes: UTF-8 everywhere except latin_rows, which hold latin-1 bytes (invalid UTF-8)
    desc_bytes = [None if d is None else d.encode("utf-8") for d in descs]
    for j, i in enumerate(latin_rows):
        desc_bytes[i] = (LATIN1_SNIPPETS[j % len(LATIN1_SNIPPETS)] + " " + descs[i]).encode("latin-1")
    table = table.set_column(table.schema.get_field_index("title"), "title", pa.array(titles, pa.string()))
    table = table.set_column(table.schema.get_field_index("category"), "category", pa.array(cats, pa.string()))
    table = table.set_column(table.schema.get_field_index("brand"), "brand", pa.array(brands, pa.string()))
    table = table.set_column(table.schema.get_field_index("description"), "description", pa.array(desc_bytes, pa.binary()))
    # exact duplicate catalogue rows, and rows with a null item_id (copies of real rows otherwise)
    # copies come from untouched rows, so each dirty row has exactly one defect
    others = np.setdiff1d(np.arange(n), pick)
    dup = table.take(pa.array(rng.choice(others, size=k, replace=False)))
    nul = table.take(pa.array(rng.choice(others, size=k, replace=False)))
    nul = nul.set_column(0, "item_id", pa.nulls(k, table.schema.field("item_id").type))
    counts.update(items_empty_text=len(empty_rows), items_latin1_description=len(latin_rows), items_duplicate_rows=k, items_null_item_id=k)
    return pa.concat_tables([table, dup, nul])


# ----------------------------------------------------------------------------------------------
# events


def _split_counts(total: int, n: int, rng: np.random.Generator, cfg: SyntheticConfig) -> np.ndarray:
    """Events per user: min + multinomial over lognormal activity, capped at max, summing to total."""
    act = np.exp(rng.normal(0.0, 1.0, size=n))
    counts = cfg.min_user_events + rng.multinomial(total - n * cfg.min_user_events, act / act.sum())
    while True:  # move the excess of capped users to users with room (a few rounds at most)
        excess = int(np.maximum(counts - cfg.max_user_events, 0).sum())
        if excess == 0:
            return counts.astype(np.int64)
        counts = np.minimum(counts, cfg.max_user_events)
        room = (cfg.max_user_events - counts).astype(np.float64)
        counts = counts + rng.multinomial(excess, room / room.sum())


def _segment_cumsum(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting at each user (starts = first flat index of each user)."""
    c = np.cumsum(x)
    base = np.repeat(c[starts] - x[starts], np.diff(np.append(starts, len(x))))
    return c - base


def _gen_chunk(cfg: SyntheticConfig, cat: _Catalogue, users: np.ndarray, lengths: np.ndarray, rng: np.random.Generator) -> dict:
    """Events of one chunk of users. Returns flat arrays (one entry per event), users contiguous, in time order."""
    T = cfg.n_topics
    nu = len(users)
    # walk in order of decreasing length so the users still active at step s are a prefix
    by_len = np.argsort(-lengths, kind="stable")
    users, lengths = users[by_len], lengths[by_len]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    n = int(lengths.sum())
    uflat = np.repeat(np.arange(nu), lengths)  # (n,) user position in chunk
    k = np.arange(n) - starts[uflat]  # (n,) event index inside its user

    # --- time: sessions; gaps inside a session 20 s - 10 min, between sessions spread over the user's span
    window = cfg.n_days * SECONDS_PER_DAY
    new_sess = (k == 0) | (rng.random(n) < 1.0 / cfg.session_len_mean)
    inner = np.where(new_sess, 0.0, rng.uniform(20.0, 600.0, size=n))
    between = np.where(new_sess & (k > 0), rng.exponential(1.0, size=n), 0.0)
    inner_tot = np.add.reduceat(inner, starts)
    between_tot = np.add.reduceat(between, starts)
    span = rng.uniform(0.3, 1.0, size=nu) * window  # seconds this user is active
    scale = np.maximum(span - inner_tot, 0.0) / np.maximum(between_tot, 1e-9)  # between gaps fill the span
    gaps = inner + between * scale[uflat]
    rel = _segment_cumsum(gaps, starts)  # seconds since the user's first event
    first = rng.uniform(0.0, 1.0, size=nu) * np.maximum(window - rel[starts + lengths - 1] - 1.0, 0.0)
    t = first[uflat] + rel  # (n,) seconds since the window start, < window, increasing per user

    # --- topic mixes (user drifts from mix0 to mix1 over the window)
    alpha = cfg.topic_concentration * T * cat.topic_weight + 1e-3
    mix0 = rng.dirichlet(alpha, size=nu)  # (nu, T)
    mix1 = rng.dirichlet(alpha, size=nu)
    frac = t / window  # (n,) position in the window, drives the drift

    # --- the walk: one vectorised step over all active users at a time
    items = np.empty(n, dtype=np.int64)
    u_jump = rng.random(n)
    seq_p_in_session = cfg.seq_prob
    seq_p_new_session = cfg.seq_prob * 0.5  # a new session resumes the sequence less often
    step = rng.choice(np.array([1, 2, 3]), size=n, p=[0.6, 0.25, 0.15])
    u_topic = rng.random(n)
    u_item = rng.random(n)
    cur = np.zeros(nu, dtype=np.int64)  # current item of each user
    max_len = int(lengths[0]) if nu else 0
    for s in range(max_len):
        na = int(np.searchsorted(-lengths, -s, side="left"))  # users with length > s form the prefix [:na]
        idx = starts[:na] + s  # flat positions of step s
        if s == 0:
            jump = np.ones(na, dtype=bool)
        else:
            p_seq = np.where(new_sess[idx], seq_p_new_session, seq_p_in_session)
            jump = u_jump[idx] >= p_seq
        nxt = np.empty(na, dtype=np.int64)
        # follow: 1-3 steps forward in the current item's topic sequence (wrapping around)
        f = ~jump
        if f.any():
            c = cur[:na][f]
            tp = cat.topic[c]
            pos = (cat.seq_pos[c] + step[idx[f]]) % cat.topic_size[tp]
            nxt[f] = cat.seq_items[cat.topic_start[tp] + pos]
        # jump: topic ~ drifted mix, item ~ Zipf popularity inside the topic
        if jump.any():
            ji = np.nonzero(jump)[0]
            w = frac[idx[ji]][:, None] * cfg.drift
            mix = (1.0 - w) * mix0[ji] + w * mix1[ji]  # (nj, T)
            cum = np.cumsum(mix, axis=1)
            tp = (u_topic[idx[ji]][:, None] * cum[:, -1:] >= cum).sum(axis=1)
            tp = np.minimum(tp, T - 1)
            j = np.searchsorted(cat.pop_cum, tp + u_item[idx[ji]], side="right")
            j = np.minimum(np.maximum(j, cat.topic_start[tp]), cat.topic_start[tp] + cat.topic_size[tp] - 1)
            nxt[ji] = cat.seq_items[j]
        items[idx] = nxt
        cur[:na] = nxt

    etype = rng.choice(len(EVENT_TYPES), size=n, p=EVENT_TYPE_P).astype(np.int8)
    dwell = np.round(rng.lognormal(3.5, 1.0, size=n), 1)  # seconds, for view/click
    value = np.where(etype >= 2, cat.price[items], dwell)
    ts_ms = np.rint(t * 1000.0).astype(np.int64)  # ms since window start
    return {"user": users[uflat], "item": items, "ts_ms": ts_ms, "etype": etype, "value": value}


def _allot(total: int, weights: np.ndarray) -> np.ndarray:
    """Split an integer total over chunks proportionally to weights; the parts sum to total exactly."""
    cum = np.rint(np.cumsum(weights) / weights.sum() * total).astype(np.int64)
    return np.diff(np.concatenate([[0], cum]))


EVENT_DIRT = ("null_user_id", "null_item_id", "duplicate_event", "ts_epoch0", "ts_year2100", "unknown_item", "unknown_event_type")


def _inject_dirt(ev: dict, shares: dict, cfg: SyntheticConfig, rng: np.random.Generator) -> dict:
    """Append dirty copies of random clean rows (each copy has exactly one defect). Adds masks."""
    n = len(ev["item"])
    parts = {k: [v] for k, v in ev.items()}
    parts["null_user"] = [np.zeros(n, bool)]
    parts["null_item"] = [np.zeros(n, bool)]
    parts["etype_unknown"] = [np.zeros(n, bool)]
    parts["dirty_kind"] = [np.full(n, -1, np.int8)]
    for kind_i, kind in enumerate(EVENT_DIRT):
        m = int(shares[kind])
        if m == 0:
            continue
        src = rng.integers(0, n, size=m)
        cp = {k: v[src].copy() for k, v in ev.items()}
        nu_m = np.zeros(m, bool)
        ni_m = np.zeros(m, bool)
        et_m = np.zeros(m, bool)
        if kind == "null_user_id":
            nu_m[:] = True
        elif kind == "null_item_id":
            ni_m[:] = True
        elif kind == "ts_epoch0":
            cp["ts_abs"] = np.zeros(m, np.int64)
        elif kind == "ts_year2100":
            cp["ts_abs"] = np.full(m, YEAR_2100_MS, np.int64)
        elif kind == "unknown_item":
            cp["item"] = cfg.n_items + 1000 + rng.integers(0, 10 * cfg.n_items, size=m)  # never in the catalogue
        elif kind == "unknown_event_type":
            et_m[:] = True
            # +1 ms: not an exact duplicate of its source row on (user, item, timestamp) either
            cp["ts_abs"] = cp["ts_abs"] + 1
        for k in ev:
            parts[k].append(cp[k])
        parts["null_user"].append(nu_m)
        parts["null_item"].append(ni_m)
        parts["etype_unknown"].append(et_m)
        parts["dirty_kind"].append(np.full(m, kind_i, np.int8))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _events_table(cfg: SyntheticConfig, ev: dict) -> pa.Table:
    n = len(ev["item"])
    null_user = ev.get("null_user", np.zeros(n, bool))
    null_item = ev.get("null_item", np.zeros(n, bool))
    et_unknown = ev.get("etype_unknown", np.zeros(n, bool))
    etype_names = np.array(EVENT_TYPES + (UNKNOWN_EVENT_TYPE,))
    et = np.where(et_unknown, len(EVENT_TYPES), ev["etype"])
    ts = ev["ts_abs"]
    if cfg.timestamp_format == "timestamp_ms":
        ts_arr = pa.array(ts, pa.timestamp("ms", tz="UTC"))
    else:
        ts_arr = pa.array(ts, pa.int64())
    return pa.table(
        {
            "user_id": pa.array(_user_ids(cfg, ev["user"]), mask=null_user),
            "item_id": pa.array(_item_ids(cfg, ev["item"]), mask=null_item),
            "timestamp": ts_arr,
            "event_type": pa.array(etype_names[et], pa.string()),
            "value": pa.array(ev["value"], pa.float64()),
        }
    )


def generate(out_dir: str | Path, cfg: SyntheticConfig | None = None) -> dict:
    """Write the synthetic raw inputs under ``out_dir`` (replaced whole, atomically); returns generation.json."""
    cfg = cfg or SyntheticConfig()
    cfg.validate()
    out_dir = Path(out_dir)
    t_start = time.time()
    ss = np.random.SeedSequence(cfg.seed)
    rng_cat, rng_users, rng_dirt_items, rng_chunks = (np.random.default_rng(s) for s in ss.spawn(4))
    cat = _make_catalogue(cfg, rng_cat)
    counts = _split_counts(cfg.n_events, cfg.n_users, rng_users, cfg)  # (n_users,) events per user
    start = dt.datetime.fromisoformat(cfg.start_date).replace(tzinfo=dt.timezone.utc)
    start_ms = int(start.timestamp() * 1000)
    days = [(start + dt.timedelta(days=d)).strftime("%Y-%m-%d") for d in range(cfg.n_days)]

    # chunks of consecutive users holding ~events_per_chunk events each
    bounds = [0]
    csum = np.cumsum(counts)
    while bounds[-1] < cfg.n_users:
        done = csum[bounds[-1] - 1] if bounds[-1] else 0
        nxt = int(np.searchsorted(csum, done + cfg.events_per_chunk, side="right"))
        bounds.append(min(max(nxt, bounds[-1] + 1), cfg.n_users))
    n_chunks = len(bounds) - 1
    chunk_events = np.array([counts[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])], dtype=np.float64)
    chunk_rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(rng_chunks.integers(2**63)).spawn(n_chunks)]

    dirt_total = {k: (max(1, int(round(cfg.dirty_frac * cfg.n_events))) if cfg.dirty else 0) for k in EVENT_DIRT}
    dirt_shares = {k: _allot(v, chunk_events) for k, v in dirt_total.items()}
    summary_counts: dict = {}
    rows_per_day = np.zeros(cfg.n_days, dtype=np.int64)
    clean_per_day = np.zeros(cfg.n_days, dtype=np.int64)
    item_events = np.zeros(cfg.n_items, dtype=np.int64)
    users_with_events = 0

    with staged_dir(out_dir, "tmp") as tmp:
        # ---- catalogue
        items = cat.table
        if cfg.dirty:
            items = _dirty_catalogue(cfg, items, rng_dirt_items, summary_counts)
        (tmp / "items").mkdir()
        pq.write_table(items, tmp / "items" / "items.parquet")

        # ---- events, chunk by chunk, one open writer per day
        writers: dict[int, pq.ParquetWriter] = {}
        prog = Progress("synthetic", total=cfg.n_events, unit="events")
        try:
            for ci, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                rng = chunk_rngs[ci]
                ev = _gen_chunk(cfg, cat, np.arange(a, b), counts[a:b], rng)
                item_events += np.bincount(ev["item"], minlength=cfg.n_items)
                users_with_events += b - a
                ev["day"] = (ev["ts_ms"] // (SECONDS_PER_DAY * 1000)).astype(np.int64)
                ev["ts_abs"] = ev["ts_ms"] + start_ms
                del ev["ts_ms"]
                clean_per_day += np.bincount(ev["day"], minlength=cfg.n_days)
                if cfg.dirty:
                    ev = _inject_dirt(ev, {k: v[ci] for k, v in dirt_shares.items()}, cfg, rng)
                # rows of a day file in (partition day, time) order; dirty timestamps keep their row's day
                order = np.lexsort((rng.random(len(ev["day"])), ev["day"]))
                ev = {k: v[order] for k, v in ev.items()}
                table = _events_table(cfg, ev)
                cuts = np.searchsorted(ev["day"], np.arange(cfg.n_days + 1))
                for d in range(cfg.n_days):
                    lo, hi = int(cuts[d]), int(cuts[d + 1])
                    if hi == lo:
                        continue
                    if d not in writers:
                        p = tmp / "events" / f"dt={days[d]}"
                        p.mkdir(parents=True)
                        writers[d] = pq.ParquetWriter(p / "part-00000.parquet", table.schema)
                    writers[d].write_table(table.slice(lo, hi - lo))
                    rows_per_day[d] += hi - lo
                prog.update(int(counts[a:b].sum()))
        finally:
            for w in writers.values():
                w.close()
        prog.close()

        n_string_ts = 0
        if cfg.dirty and cfg.dirty_string_ts_file:
            # a second file in the last day whose timestamp column is strings nobody can parse
            r = np.random.default_rng(np.random.SeedSequence([cfg.seed, 7]))
            n_string_ts = max(1, int(round(cfg.dirty_frac * cfg.n_events)))
            users = r.integers(0, cfg.n_users, size=n_string_ts)
            its = cat.seq_items[r.integers(0, len(cat.seq_items), size=n_string_ts)]
            st = pa.table(
                {
                    "user_id": pa.array(_user_ids(cfg, users)),
                    "item_id": pa.array(_item_ids(cfg, its)),
                    "timestamp": pa.array([UNPARSABLE_TS[i % len(UNPARSABLE_TS)] for i in range(n_string_ts)], pa.string()),
                    "event_type": pa.array(np.array(EVENT_TYPES)[r.integers(0, len(EVENT_TYPES), size=n_string_ts)], pa.string()),
                    "value": pa.array(np.round(r.lognormal(3.5, 1.0, size=n_string_ts), 1), pa.float64()),
                }
            )
            p = tmp / "events" / f"dt={days[-1]}"
            p.mkdir(parents=True, exist_ok=True)
            pq.write_table(st, p / "part-00001.parquet")
            rows_per_day[-1] += n_string_ts

        dirty_counts = {k: int(v) for k, v in dirt_total.items()} if cfg.dirty else {}
        if cfg.dirty:
            dirty_counts["ts_unparsable_string"] = n_string_ts
            dirty_counts.update(summary_counts)
        n_dirty_events = sum(v for k, v in dirty_counts.items() if not k.startswith("items_"))
        summary = base_manifest("lmrec.synthetic", 1)
        summary.update(
            {
                "config": to_dict(cfg),
                "seconds": round(time.time() - t_start, 2),
                "counts": {
                    "events_total": int(rows_per_day.sum()),  # rows in all events files (clean + dirty)
                    "events_clean": int(cfg.n_events),
                    "events_dirty": int(n_dirty_events),
                    "users": int(users_with_events),
                    "items_catalogue_rows": int(items.num_rows),
                    "items_catalogue": int(cfg.n_items),  # distinct clean catalogue items
                    "items_with_events": int((item_events > 0).sum()),
                    "items_cold": int((item_events == 0).sum()),
                    "items_unavailable": int((~np.asarray(cat.table.column("available"))).sum()),
                    "days": int(cfg.n_days),
                    "events_per_day": {days[d]: int(rows_per_day[d]) for d in range(cfg.n_days) if rows_per_day[d]},
                    "events_clean_per_day": {days[d]: int(clean_per_day[d]) for d in range(cfg.n_days) if clean_per_day[d]},
                },
                "dirty": dirty_counts,
                "event_types": list(EVENT_TYPES),
                "first_date": days[0],
                "last_date": days[-1],
            }
        )
        assert summary["counts"]["events_total"] == cfg.n_events + n_dirty_events, "row accounting broke"
        atomic_write_json(tmp / "generation.json", summary)
    print(
        f"[synthetic] wrote {out_dir}: {fmt_count(summary['counts']['events_total'])} events "
        f"({fmt_count(n_dirty_events)} dirty), {summary['counts']['users']} users, "
        f"{cfg.n_items} items ({summary['counts']['items_cold']} cold) in {summary['seconds']:.1f}s",
        file=sys.stderr,
        flush=True,
    )
    return summary


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        prog="python -m data_prep.synthetic",
        description="Write synthetic raw events + item catalogue (docs/CONTRACTS.md section 1).",
        epilog="Any SyntheticConfig field can be set as key=value, e.g. n_events=10000000 n_users=200000 id_type=str",
    )
    ap.add_argument("--out", required=True, help="output folder (replaced whole, atomically)")
    ap.add_argument("--config", help="optional YAML file with SyntheticConfig fields")
    ap.add_argument("--dirty", action="store_true", help="inject realistic dirt (counted in generation.json)")
    ap.add_argument("--seed", type=int, help="random seed (default 0)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of SyntheticConfig fields")
    args = ap.parse_args(argv)
    overrides = list(args.overrides)
    if args.dirty:
        overrides.append("dirty=true")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    try:
        cfg = load_config(SyntheticConfig, args.config, overrides)
    except ConfigError as e:
        ap.error(str(e))
    return generate(args.out, cfg)


def config(**kw) -> SyntheticConfig:
    """``SyntheticConfig`` with validation and type checks, from keyword arguments (tests, benchmarks)."""
    return config_from_dict(SyntheticConfig, kw)


if __name__ == "__main__":
    main()
