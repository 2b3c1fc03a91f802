"""Training and evaluation examples from the prepared folder of data_prep (docs/CONTRACTS.md section 2).

    prep = open_prepared("work/prepared/sample")
    train = TrainExamples.build(prep.sequences, max_len=200)      # one window per user (SASRec)
    valid = EvalExamples.build(prep.sequences, "valid", max_len=200)

Layout decisions (every window, here and in inference's nightly and online serving, comes from one
vectorised function, ``latest_windows``):
- training example = the last ``max_len + 1`` events of ``item_idx[:end]`` (SASRec), LEFT-padded
  with -1 to max_len + 1; inputs = [:-1], targets = [1:], so the model learns at every position.
  ``end`` = train_len, or with ``through`` = "valid" / "test" the events up to and including that
  split's target (``training_ends``: a refit that learns from the held-out targets too).
  Users with end < 2 give no training example (no (input, next) pair).
- evaluation example (split "valid" / "test") = the last max_len events before the target position,
  left-padded; ``seen`` = the WHOLE history before the target (excluded from the ranking, see
  train/metrics.py); users without a target of that split (pos == -1) or with an empty history are skipped.
All examples are built in memory as int tensors (a few MB for MovieLens-1M); every rank builds the
same tensors and the Accelerate dataloader gives each rank its slice of every batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from data_prep.schema import PreparedData, PreparedDataError, load_prepared
from data_prep.sequences import train_mask

PAD = -1


def open_prepared(path: str) -> PreparedData:
    """The one place the train stage reads the prepared folder (kind/schema/columns are checked
    by data_prep.schema; errors name the folder)."""
    return load_prepared(path)


def list_column(ds, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list<int> column as (flat values, offsets (N+1,)) without Python objects per element."""
    col = ds.data.table.column(name).combine_chunks()
    offsets = np.asarray(col.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
    values = np.asarray(col.values.to_numpy(zero_copy_only=False))
    # offsets of a sliced/filtered array may not start at 0
    return values[offsets[0] : offsets[-1]], offsets - offsets[0]


def _ragged(starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For lists i of lengths lens[i] starting at flat position starts[i]: (row (n,), flat position (n,)) of
    every element, rows in order and positions ascending within a row (n = lens.sum())."""
    lens = np.asarray(lens, np.int64)
    row = np.repeat(np.arange(len(lens)), lens)
    shift = np.asarray(starts, np.int64) - (np.cumsum(lens) - lens)  # flat position - output position, per list
    return row, np.arange(row.size) + np.repeat(shift, lens)


def latest_windows(starts: np.ndarray, ends: np.ndarray, width: int,
                   *columns: tuple[np.ndarray, int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """THE window builder of lmrec: training, evaluation, nightly and online serving all call it.

    Row i is the user whose events are flat positions ``starts[i] .. starts[i] + ends[i] - 1`` of each
    column (a CSR list column's values, from its offsets); its window is the latest ``min(ends[i], width)``
    of them, LEFT-padded to ``width``, so ``[:, -1]`` is the newest event (train/model.py). ``columns``:
    (flat values, pad value) pairs over the same positions (item_idx with -1, event_type with 0).
    Returns (window lengths (B,) int64, one (B, width) int64 array per column). Vectorised (no loop per user)."""
    starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    n = np.minimum(ends, width)
    row, src = _ragged(starts + ends - n, n)
    col = src - np.repeat(starts + ends, n) + width  # the newest event lands in column width - 1
    out = []
    for values, pad in columns:
        a = np.full((len(n), width), pad, dtype=np.int64)
        a[row, col] = values[src]
        out.append(a)
    return n, out


def _int_column(ds, name: str) -> np.ndarray:
    return np.asarray(ds.data.table.column(name).to_numpy(), dtype=np.int64)


def check_sequences(prep: PreparedData, num_items: int) -> None:
    """Cheap consistency checks before any compute (a corrupt or foreign folder fails here)."""
    seq = prep.sequences
    vals, _ = list_column(seq, "item_idx")
    if vals.size and (vals.min() < 0 or vals.max() >= num_items):
        raise PreparedDataError(
            f"{prep.path}/sequences: item_idx outside 0..{num_items - 1} (min {vals.min()}, max {vals.max()}); "
            "items/ and sequences/ do not belong together")
    n_types = max(len(prep.manifest.get("event_types") or []), 1)
    et, _ = list_column(seq, "event_type")
    if et.size and (et.min() < 0 or et.max() >= n_types):
        raise PreparedDataError(f"{prep.path}/sequences: event_type outside 0..{n_types - 1} (manifest event_types {prep.manifest.get('event_types')})")


THROUGH = ("train", "valid", "test")


def _through_index(through: str) -> int:
    if through not in THROUGH:
        raise ValueError(f"through must be one of {THROUGH}, got {through!r}")
    return THROUGH.index(through)


def training_ends(sequences, through: str = "train") -> np.ndarray:
    """(U,) how many leading events of each user are training data. "train": train_len (the split of
    data_prep); "valid": also the validation target (when the user has one); "test": also the test
    target, i.e. every event the split placed (a production refit: nothing held out)."""
    end = _int_column(sequences, "train_len")
    for split in THROUGH[1 : _through_index(through) + 1]:
        end = np.maximum(end, _int_column(sequences, f"{split}_pos") + 1)  # pos -1 (no target) leaves end as it is
    return end


def held_out_splits(through: str = "train") -> tuple[str, ...]:
    """The evaluation splits whose targets a model trained with this ``through`` has NOT trained on."""
    return ("valid", "test")[_through_index(through) :]


def training_item_counts(sequences, num_items: int, through: str = "train") -> torch.Tensor:
    """(I,) float: how often each item occurs among the training events (inputs and targets), the
    n_train_events column of items/ for through="train" and its equivalent for a refit."""
    vals, offs = list_column(sequences, "item_idx")
    keep = train_mask(offs, training_ends(sequences, through))  # data_prep's own mask for n_train_events
    return torch.from_numpy(np.bincount(vals[keep], minlength=num_items).astype(np.float32))


def item_token_tensors(items, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """items.input_ids -> (I, L) right-padded LongTensor and (I,) lengths (L = longest item text)."""
    vals, offs = list_column(items, "input_ids")
    lens = np.diff(offs)
    n, L = len(lens), int(lens.max()) if len(lens) else 1
    out = np.full((n, max(L, 1)), pad_token_id, dtype=np.int64)
    # row i, columns 0..len_i-1 get vals[offs[i]:offs[i+1]]
    rows = np.repeat(np.arange(n), lens)
    cols = np.arange(len(vals)) - np.repeat(offs[:-1], lens)
    out[rows, cols] = vals
    return torch.from_numpy(out), torch.from_numpy(lens.astype(np.int64))


def trim_left_padding(items: torch.Tensor, etypes: torch.Tensor, keep: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Drops the leading columns that are padding in EVERY row of a left-padded batch (B, W), keeping at least
    ``keep`` columns. The model's output does not change (positions count back from the newest event,
    padded keys are masked), but on sparse catalogues, where most histories are a few events long and
    max_len is set for the longest, the user tower stops spending most of each step on padding."""
    real = (items != PAD).any(dim=0)
    first = int(real.to(torch.int8).argmax()) if bool(real.any()) else items.size(1)
    first = min(first, max(items.size(1) - keep, 0))
    return (items, etypes) if first == 0 else (items[:, first:], etypes[:, first:])


@dataclass
class TrainExamples(Dataset):
    items: torch.Tensor  # (N, max_len + 1) int64, left-padded with -1
    etypes: torch.Tensor  # (N, max_len + 1) int64 (0 on padding)
    user_idx: torch.Tensor  # (N,)

    @classmethod
    def build(cls, sequences, max_len: int, through: str = "train") -> "TrainExamples":
        vals, offs = list_column(sequences, "item_idx")
        ets, _ = list_column(sequences, "event_type")
        end = training_ends(sequences, through)
        users = _int_column(sequences, "user_idx")
        keep = np.nonzero(end >= 2)[0]
        _, (items, etypes) = latest_windows(offs[keep], end[keep], max_len + 1, (vals, PAD), (ets, 0))
        return cls(torch.from_numpy(items), torch.from_numpy(etypes), torch.from_numpy(users[keep]))

    def __len__(self) -> int:
        return self.items.size(0)

    def __getitem__(self, i: int) -> int:
        return i  # the collate gathers rows in one vectorised index

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        ix = torch.as_tensor(idx, dtype=torch.long)
        w, e = trim_left_padding(self.items[ix], self.etypes[ix], keep=2)
        return {"hist": w[:, :-1], "event_types": e[:, :-1], "targets": w[:, 1:], "user_idx": self.user_idx[ix]}

    def num_targets(self) -> int:
        return int((self.items[:, 1:] != PAD).sum())

    def item_counts(self, num_items: int) -> torch.Tensor:
        """(I,) how often each item is a training TARGET (for logQ / popularity sampling)."""
        t = self.items[:, 1:]
        return torch.bincount(t[t != PAD], minlength=num_items).float()


@dataclass
class EvalExamples(Dataset):
    hist: torch.Tensor  # (N, max_len) left-padded
    etypes: torch.Tensor  # (N, max_len)
    target: torch.Tensor  # (N,)
    user_idx: torch.Tensor  # (N,)
    seen_vals: torch.Tensor  # flat seen items of all users
    seen_offs: torch.Tensor  # (N + 1,)

    @classmethod
    def build(cls, sequences, split: str, max_len: int, max_users: int = 0) -> "EvalExamples":
        if split not in ("valid", "test"):
            raise ValueError(f"split must be valid or test, got {split!r}")
        vals, offs = list_column(sequences, "item_idx")
        ets, _ = list_column(sequences, "event_type")
        pos = _int_column(sequences, f"{split}_pos")
        users = _int_column(sequences, "user_idx")
        keep = np.nonzero(pos >= 1)[0]
        if max_users and len(keep) > max_users:
            # a fixed, evenly spaced subset (deterministic; the final evaluation uses every user)
            keep = keep[np.linspace(0, len(keep) - 1, max_users).round().astype(np.int64)]
        starts, p = offs[keep], pos[keep]
        _, (hist, etypes) = latest_windows(starts, p, max_len, (vals, PAD), (ets, 0))
        target = vals[starts + p].astype(np.int64)
        # seen = each user's distinct items before the target, ascending (np.unique per user, vectorised)
        row, src = _ragged(starts, p)
        span = int(vals.max()) + 1 if vals.size else 1
        key = np.sort(row * span + vals[src])  # (user row, item) pairs in order: one sort for every user
        key = key[np.concatenate([[True], key[1:] != key[:-1]])]  # distinct (np.unique: 10x slower on numpy 2.4)
        row, seen = np.divmod(key, span)
        seen_offs = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(np.bincount(row, minlength=len(keep)), out=seen_offs[1:])
        return cls(torch.from_numpy(hist), torch.from_numpy(etypes), torch.from_numpy(target),
                   torch.from_numpy(users[keep]), torch.from_numpy(seen), torch.from_numpy(seen_offs))

    def __len__(self) -> int:
        return self.hist.size(0)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        ix = torch.as_tensor(idx, dtype=torch.long)
        lens = self.seen_offs[ix + 1] - self.seen_offs[ix]
        S = int(lens.max()) if len(idx) else 0
        seen = torch.full((len(idx), max(S, 1)), PAD, dtype=torch.long)  # right-padded: order does not matter
        starts = self.seen_offs[ix].numpy()
        row, src = _ragged(starts, lens.numpy())
        seen[torch.from_numpy(row), torch.from_numpy(src - starts[row])] = self.seen_vals[torch.from_numpy(src)]
        hist, etypes = trim_left_padding(self.hist[ix], self.etypes[ix])
        return {"hist": hist, "event_types": etypes, "target": self.target[ix], "user_idx": self.user_idx[ix], "seen": seen}


class EpochSampler(Sampler[int]):
    """A permutation of range(n) that depends only on (seed, epoch): a resumed run sees exactly the
    batches of an uninterrupted one (together with skip_first_batches)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def select_epoch(self, epoch: int) -> None:
        # deliberately NOT named set_epoch: accelerate's DataLoaderShard calls sampler.set_epoch with its
        # own per-object iteration counter, which restarts at 0 on a resumed run (wrong permutation)
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n
