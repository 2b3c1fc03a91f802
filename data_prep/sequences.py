"""Columnar sequence building: vocabularies, per-user chronological order, list arrays, splits.

Everything here is numpy/pyarrow over whole columns (no Python loop per event or per user), so
ML-1M takes well under a second and 10M events a few seconds. Shapes: E = events, U = users.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.pseudonym import pseudonymize
from data_prep.validate import normalize_ids, to_utf8

DAY = 86_400


def sorted_vocab(ids: pa.Array, numeric: bool) -> pa.Array:
    """Distinct ids (strings) sorted: numerically when ``numeric`` (ids came as integers), else by
    code point. Deterministic for any input order."""
    u = pc.unique(ids.cast(pa.string()) if ids.type != pa.string() else ids)
    u = u.filter(pc.is_valid(u))
    if numeric:
        order = np.argsort(pc.cast(u, pa.int64()).to_numpy(zero_copy_only=False), kind="stable")
    else:
        order = pc.sort_indices(u).to_numpy()
    return u.take(pa.array(order))


def codes(ids: pa.Array, vocab: pa.Array) -> np.ndarray:
    """(E,) int32 position of each id in ``vocab``; -1 where absent."""
    c = pc.index_in(ids, value_set=vocab)
    return c.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)


def chronological_order(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """(E,) int64 permutation sorting events by (user, timestamp), ties kept in input order.

    The sort is stable and the input is the concatenation of files in path order with rows in
    file order, so equal timestamps are ordered by (source file, row) as the contract requires.
    When the timestamp range fits in 32 bits (136 years) one stable argsort of a packed int64 key
    (user << 32 | ts - min) replaces np.lexsort: about half the temporary memory and time."""
    if len(ts) == 0:
        return np.zeros(0, np.int64)
    lo, hi = int(ts.min()), int(ts.max())
    if hi - lo < 2**32 and int(user.max()) < 2**31 and int(user.min()) >= 0:
        key = (user.astype(np.int64) << 32) | (ts - lo)
        order = np.argsort(key, kind="stable")
        del key
        return order
    return np.lexsort((ts, user))


def duplicates_sorted(user: np.ndarray, ts: np.ndarray, item: np.ndarray, etype: np.ndarray) -> np.ndarray:
    """(E,) bool: True for an event equal in (user, item, ts, etype) to an EARLIER one, for events
    already in chronological_order. Duplicates share (user, ts), so only the C rows inside runs of
    equal (user, ts) are candidates; they are sorted stably by (run, item, etype), so within equal
    keys the (file, row) order is kept and the first occurrence survives. Memory: 3 bytes per event
    plus about 30 bytes per candidate (one packed int64 key instead of a 3-key lexsort)."""
    E = len(user)
    dup = np.zeros(E, bool)
    if E < 2:
        return dup
    tied_prev = np.zeros(E, bool)  # row i has the same (user, ts) as row i-1
    tied_prev[1:] = user[1:] == user[:-1]
    tied_prev[1:] &= ts[1:] == ts[:-1]
    if not tied_prev.any():
        return dup
    cand = tied_prev.copy()
    cand[:-1] |= tied_prev[1:]
    idx = np.flatnonzero(cand)  # (C,) rows in a tie run, in sorted (= file, row) order
    del cand
    run = np.cumsum(~tied_prev[idx], dtype=np.int64)  # (C,) run id, 1..R
    del tied_prev
    n_items = int(item.max()) + 1
    if int(run[-1]) < (2**62) // (max(n_items, 1) * 256):
        key = (run * n_items + item[idx]) * 256 + (etype[idx].astype(np.int64) + 128)
        del run
        o = np.argsort(key, kind="stable")
        k = key[o]
        del key
        eq = k[1:] == k[:-1]
    else:  # astronomically many runs x items: fall back to a 3-key lexsort
        o = np.lexsort((etype[idx], item[idx], run))
        r, i, e = run[o], item[idx][o], etype[idx][o]
        eq = (r[1:] == r[:-1]) & (i[1:] == i[:-1]) & (e[1:] == e[:-1])
    dup[idx[o[1:][eq]]] = True
    return dup


def offsets_from_sorted(user_sorted: np.ndarray, num_users: int) -> np.ndarray:
    """(U+1,) int64 list offsets for events already sorted by user code 0..U-1."""
    counts = np.bincount(user_sorted, minlength=num_users)
    off = np.zeros(num_users + 1, np.int64)
    np.cumsum(counts, out=off[1:])
    return off


def list_array(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    if offsets[-1] >= 2**31:
        return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values, value_type))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, value_type))


def split_leave_last_out(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n>=3: train_len=n-2, valid=n-2, test=n-1; n==2: train_len=1, valid=-1, test=1 (CONTRACTS.md)."""
    n = np.diff(offsets)
    train_len = np.where(n >= 3, n - 2, np.minimum(n, 1))
    valid_pos = np.where(n >= 3, n - 2, -1)
    test_pos = np.where(n >= 2, n - 1, -1)
    return train_len.astype(np.int32), valid_pos.astype(np.int32), test_pos.astype(np.int32)


def split_time(offsets: np.ndarray, ts_sorted: np.ndarray, cutoff: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Time split at ``cutoff`` (epoch s, start of the cut-off day, UTC). Per user, k = events before it:
    test target = the user's first event in [cutoff, cutoff + 1 day) if k >= 1 (it needs a history);
    valid target = event k-1 (the last one before the cut-off) if k >= 2, with events 0..k-2 as
    history; train_len = k-1 when there is a valid target (held out of training, as in
    leave_last_out) else k. Events after the cut-off day stay in the history (inference uses it)."""
    before = (ts_sorted < cutoff).astype(np.int64)
    csum = np.zeros(len(ts_sorted) + 1, np.int64)
    np.cumsum(before, out=csum[1:])
    del before
    k = csum[offsets[1:]] - csum[offsets[:-1]]  # (U,) events before the cut-off (sorted by ts: a prefix)
    n = np.diff(offsets)
    first_after = np.minimum(offsets[:-1] + k, max(len(ts_sorted) - 1, 0))  # (U,) index of the first event at/after the cut-off
    has_after = k < n
    ts_after = ts_sorted[first_after] if len(ts_sorted) else np.zeros(len(n), np.int64)
    test_ok = has_after & (ts_after < cutoff + DAY) & (k >= 1)
    test_pos = np.where(test_ok, k, -1)
    valid_pos = np.where(k >= 2, k - 1, -1)
    train_len = np.where(k >= 2, k - 1, k)
    return train_len.astype(np.int32), valid_pos.astype(np.int32), test_pos.astype(np.int32)


def train_mask(offsets: np.ndarray, train_len: np.ndarray) -> np.ndarray:
    """(E,) bool: event is inside its user's first train_len events (events sorted by user).
    Built from +1/-1 marks at each user's start and train end (1 byte per event, no (E,) int64)."""
    E = int(offsets[-1])
    d = np.zeros(E + 1, np.int8)
    np.add.at(d, offsets[:-1], 1)
    np.add.at(d, offsets[:-1] + train_len, -1)
    return np.cumsum(d[:-1], dtype=np.int8).astype(bool)


def serving_table(all_users: pa.Array, per_user: np.ndarray, last_unknown: np.ndarray, s_user: np.ndarray, s_item: np.ndarray,
                  s_ts: np.ndarray, s_etype: np.ndarray) -> pa.Table:
    """serving/ (docs/CONTRACTS.md section 2): one row per user who is served but has no row in sequences/.

    ``all_users`` (U,) every user with a valid event, ``per_user`` (U,) their usable events (catalogue items, after
    dedup), ``last_unknown`` (U,) int64 the latest event on an item missing from the catalogue (int64 min = none),
    ``s_*`` (S,) the events of the single-event users, sorted by user code. A user with one usable event
    (why = single_event) has it as a one-item history; a user whose every event was on an unknown item
    (why = items_not_in_catalogue) has an empty one. last_timestamp = the user's latest event, either kind."""
    no_event = np.iinfo(np.int64).min
    serve = (per_user == 1) | ((per_user == 0) & (last_unknown > no_event))
    codes_ = np.flatnonzero(serve)
    remap = np.cumsum(serve) - 1
    s_row = remap[s_user] if len(s_user) else np.zeros(0, np.int64)
    off = offsets_from_sorted(s_row, len(codes_))
    last = last_unknown[codes_].copy()
    np.maximum.at(last, s_row, s_ts)
    why = pa.array(["items_not_in_catalogue", "single_event"]).take(pa.array((per_user[codes_] == 1).astype(np.int8)))
    return pa.table({
        "user_id": all_users.take(pa.array(codes_, pa.int64())),
        "item_idx": list_array(off, s_item.astype(np.int32), pa.int32()),
        "timestamp": list_array(off, s_ts.astype(np.int64), pa.int64()),
        "event_type": list_array(off, s_etype.astype(np.int8), pa.int8()),
        "last_timestamp": pa.array(last, pa.int64()),
        "why": why,
    })


def encode_histories(item_vocab: pa.Array, user_ids, item_ids, timestamps, id_normalization: str = "exact",
                     user_key: bytes | None = None) -> tuple[pa.Table, int]:
    """Raw events -> one row per user: user_id, item_idx list<int32>, timestamp list<int64>.

    Same ordering rule as data_prep (timestamp, then input order), the same id normalisation and, with
    ``user_key``, the same user id pseudonyms (data_prep/pseudonym.py); unknown items dropped and counted.
    ``item_vocab`` is the prepared items' item_id column (row i == item_idx i)."""
    u, _ = to_utf8(pa.array(user_ids) if not isinstance(user_ids, (pa.Array, pa.ChunkedArray)) else user_ids)
    i, _ = to_utf8(pa.array(item_ids) if not isinstance(item_ids, (pa.Array, pa.ChunkedArray)) else item_ids)
    u, _ = normalize_ids(u, id_normalization)
    if user_key is not None:
        u = pseudonymize(u, user_key)
    i, _ = normalize_ids(i, id_normalization)
    ts = np.asarray(timestamps if not isinstance(timestamps, (pa.Array, pa.ChunkedArray)) else timestamps.to_numpy(zero_copy_only=False), np.int64)
    item = codes(i, item_vocab)
    known = (item >= 0) & pc.is_valid(u).to_numpy(zero_copy_only=False)
    n_unknown = int((~known).sum())
    u, item, ts = u.filter(pa.array(known)), item[known], ts[known]
    users = sorted_vocab(u, numeric=False)
    user = codes(u, users)
    order = chronological_order(user, ts)
    off = offsets_from_sorted(user[order], len(users))
    table = pa.table(
        {
            "user_id": users,
            "item_idx": list_array(off, item[order], pa.int32()),
            "timestamp": list_array(off, ts[order], pa.int64()),
        }
    )
    return table, n_unknown
