"""Streaming training / evaluation examples (train.data, issue 30): the windows, targets and seen sets that
``collate`` builds per batch from the memory-mapped Arrow values are bit-identical to the ones the earlier
code materialised for every user up front (kept below as the reference), on ragged multi-chunk data (CPU, seconds).

    python -m pytest tests/test_stream_examples.py -q
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from train.data import (PAD, EvalExamples, FlatValues, TrainExamples, _ragged, flat_list_column, latest_windows, list_column,
                        training_ends, training_item_counts, trim_left_padding)


# ------------------------------------------------------------------------------------------------ the reference
# The materialised construction of train/data.py before issue 30 (every window of every user in memory), verbatim
# but for taking (values, offsets) from list_column.
def old_train(seq, max_len, through):
    vals, offs = list_column(seq, "item_idx")
    ets, _ = list_column(seq, "event_type")
    end = training_ends(seq, through)
    users = np.asarray(seq.data.table.column("user_idx").to_numpy(), np.int64)
    keep = np.nonzero(end >= 2)[0]
    _, (items, etypes) = latest_windows(offs[keep], end[keep], max_len + 1, (vals, PAD), (ets, 0))
    items, etypes, user_idx = torch.from_numpy(items), torch.from_numpy(etypes), torch.from_numpy(users[keep])

    def collate(idx):
        ix = torch.as_tensor(idx, dtype=torch.long)
        w, e = trim_left_padding(items[ix], etypes[ix], keep=2)
        return {"hist": w[:, :-1], "event_types": e[:, :-1], "targets": w[:, 1:], "user_idx": user_idx[ix]}

    t = items[:, 1:]
    return len(items), collate, int((t != PAD).sum()), lambda n: torch.bincount(t[t != PAD], minlength=n).float(), items


def old_eval(seq, split, max_len, max_users):
    vals, offs = list_column(seq, "item_idx")
    ets, _ = list_column(seq, "event_type")
    pos = np.asarray(seq.data.table.column(f"{split}_pos").to_numpy(), np.int64)
    users = np.asarray(seq.data.table.column("user_idx").to_numpy(), np.int64)
    keep = np.nonzero(pos >= 1)[0]
    if max_users and len(keep) > max_users:
        keep = keep[np.linspace(0, len(keep) - 1, max_users).round().astype(np.int64)]
    starts, p = offs[keep], pos[keep]
    _, (hist, etypes) = latest_windows(starts, p, max_len, (vals, PAD), (ets, 0))
    target = torch.from_numpy(vals[starts + p].astype(np.int64))
    row, src = _ragged(starts, p)
    span = int(vals.max()) + 1 if vals.size else 1
    key = np.sort(row * span + vals[src])
    key = key[np.concatenate([[True], key[1:] != key[:-1]])]
    row, seen = np.divmod(key, span)
    seen_offs = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=len(keep)), out=seen_offs[1:])
    hist, etypes, user_idx = torch.from_numpy(hist), torch.from_numpy(etypes), torch.from_numpy(users[keep])
    seen_vals, seen_offs = torch.from_numpy(seen), torch.from_numpy(seen_offs)

    def collate(idx):
        ix = torch.as_tensor(idx, dtype=torch.long)
        lens = seen_offs[ix + 1] - seen_offs[ix]
        S = int(lens.max()) if len(idx) else 0
        out = torch.full((len(idx), max(S, 1)), PAD, dtype=torch.long)
        st = seen_offs[ix].numpy()
        r, s = _ragged(st, lens.numpy())
        out[torch.from_numpy(r), torch.from_numpy(s - st[r])] = seen_vals[torch.from_numpy(s)]
        h, e = trim_left_padding(hist[ix], etypes[ix])
        return {"hist": h, "event_types": e, "target": target[ix], "user_idx": user_idx[ix], "seen": out}

    return len(hist), collate


# ------------------------------------------------------------------------------------------------ data
def ragged_sequences(tmp_path, num_users=300, num_items=97, seed=0, shards=3):
    """A prepared-like sequences dataset: lists of 0..40 events (users with 0, 1 or 2 events included), the
    three split columns as data_prep writes them (some users without a valid / test target), saved in
    ``shards`` Arrow files and memory-mapped back, so each column has several chunks."""
    import datasets

    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 41, num_users)
    lens[:6] = [0, 1, 2, 1, 3, 2]
    rows = {"user_idx": [], "item_idx": [], "event_type": [], "train_len": [], "valid_pos": [], "test_pos": []}
    for u, n in enumerate(lens):
        rows["user_idx"].append(int(1000 + 7 * u))  # not the row number
        rows["item_idx"].append(rng.integers(0, num_items, n).astype(np.int32).tolist())
        rows["event_type"].append(rng.integers(0, 4, n).astype(np.int8).tolist())
        valid, test = (n - 2, n - 1) if n >= 3 else (-1, n - 1 if n >= 2 else -1)
        if rng.random() < 0.1:  # a time split can leave a user without a test target
            test = -1
        rows["train_len"].append(int(valid if valid >= 0 else max(n - (test >= 0), 0)))
        rows["valid_pos"].append(int(valid))
        rows["test_pos"].append(int(test))
    feats = datasets.Features({"user_idx": datasets.Value("int32"), "item_idx": datasets.Sequence(datasets.Value("int32")),
                               "event_type": datasets.Sequence(datasets.Value("int8")), "train_len": datasets.Value("int32"),
                               "valid_pos": datasets.Value("int32"), "test_pos": datasets.Value("int32")})
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "seq"), num_shards=shards)
    return datasets.load_from_disk(str(tmp_path / "seq"))


@pytest.fixture(scope="module")
def seq(tmp_path_factory):
    return ragged_sequences(tmp_path_factory.mktemp("stream"))


def batches(n, seed=1):
    """The whole range in shuffled batches of uneven sizes (one empty), as samplers and eval loaders give them."""
    perm = np.random.default_rng(seed).permutation(n).tolist()
    out, i = [[]], 0
    for size in (1, 7, 32, 5, 64):
        out.append(perm[i : i + size])
        i += size
    out.append(perm[i:])
    out.append(list(range(n)))
    return out


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------ tests
def test_columns_are_zero_copy_views_of_the_memory_mapped_chunks(seq):
    col = seq.data.table.column("item_idx")
    assert col.num_chunks >= 3  # one per shard at least: the streaming code must not need one chunk
    vals, offs = flat_list_column(seq, "item_idx")
    assert len(vals.parts) == sum(len(c) > 0 for c in col.chunks) and all(not p.flags.owndata for p in vals.parts)
    flat, offs2 = list_column(seq, "item_idx")  # the concatenated form (bench/test helper)
    assert (offs == offs2).all() and vals.size == flat.size == offs[-1]
    pos = np.random.default_rng(0).integers(0, flat.size, (13, 5))
    assert (vals[pos] == flat[pos]).all() and vals[pos].dtype == np.int32
    assert vals.min() == flat.min() and vals.max() == flat.max()
    # sliced Arrow chunks (offsets not starting at 0) and empty chunks give the same flat values
    import datasets

    t = pa.Table.from_batches([b for c in seq.data.table.combine_chunks().slice(3).to_batches(max_chunksize=17) for b in (c, c.slice(0, 0))])
    sl = datasets.Dataset(t)
    v2, o2 = flat_list_column(sl, "item_idx")
    assert len(v2.parts) > 3 and (v2[np.arange(v2.size)] == flat[offs[3] :]).all() and (o2 == offs[3:] - offs[3]).all()
    assert FlatValues([])[np.zeros(0, np.int64)].size == 0


@pytest.mark.parametrize("through", ["train", "valid", "test"])
@pytest.mark.parametrize("max_len", [1, 4, 50])
def test_streaming_training_examples_equal_the_materialised_ones(seq, through, max_len):
    ex = TrainExamples.build(seq, max_len, through)
    n, collate, targets, counts, items = old_train(seq, max_len, through)
    assert len(ex) == n and n > 0 and ex.starts.dtype == ex.ends.dtype == ex.user_idx.dtype == np.int32
    for b in batches(n):
        assert_same(ex.collate(b), collate(b))
    assert ex.num_targets() == targets
    assert torch.equal(ex.item_counts(97), counts(97))
    assert torch.equal(ex.items, items)  # the materialised form (tests, small data) is still there


@pytest.mark.parametrize("split", ["valid", "test"])
@pytest.mark.parametrize("max_len,max_users", [(1, 0), (5, 0), (50, 0), (5, 40), (50, 1000)])
def test_streaming_evaluation_examples_equal_the_materialised_ones(seq, split, max_len, max_users):
    ex = EvalExamples.build(seq, split, max_len, max_users)
    n, collate = old_eval(seq, split, max_len, max_users)
    assert len(ex) == n and n > 0 and (n == max_users or not max_users or max_users > n)
    for b in batches(n):
        assert_same(ex.collate(b), collate(b))
    assert torch.equal(ex.target, collate(list(range(n)))["target"])


def test_training_item_counts_are_the_train_mask_counts(seq):
    from data_prep.sequences import train_mask

    vals, offs = list_column(seq, "item_idx")
    for through in ("train", "valid", "test"):
        keep = train_mask(offs, training_ends(seq, through))
        ref = torch.from_numpy(np.bincount(vals[keep], minlength=97).astype(np.float32))
        assert torch.equal(training_item_counts(seq, 97, through), ref)


def test_item_counts_in_blocks(seq, monkeypatch):
    """Counting in blocks smaller than one user's events (every block one user) changes nothing."""
    import train.data

    ex = TrainExamples.build(seq, 8, "train")
    whole, all_train = ex.item_counts(97), training_item_counts(seq, 97)
    monkeypatch.setattr(train.data, "BLOCK_EVENTS", 3)
    assert torch.equal(ex.item_counts(97), whole) and torch.equal(training_item_counts(seq, 97), all_train)
