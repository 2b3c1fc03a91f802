"""Training and evaluation examples from the prepared folder of data_prep (docs/CONTRACTS.md section 2).

    prep = open_prepared("work/prepared/sample")
    train = TrainExamples.build(prep.sequences, max_len=200)      # one example per user (SASRec)
    valid = EvalExamples.build(prep.sequences, "valid", max_len=200)
    batch = train.collate([0, 5, 7])                               # windows of these rows only

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

Memory: nothing per event is copied, and nothing per event stays resident. The item_idx / event_type values stay in the memory-mapped Arrow
files of ``datasets.load_from_disk`` (``FlatValues``: zero-copy numpy views, one per Arrow chunk, never
concatenated); an example set holds per user only its flat start (int32, int64 past 2^31 events), its
end / target position (int32) and its user_idx (int32), 12 bytes a user. ``collate`` builds the windows
(and the targets and seen sets) of its batch's rows with ``latest_windows``, so resident memory per rank is
flat in the number of users but for those 12 bytes, and the same for any world size. Every rank builds the
same index arrays and the Accelerate dataloader gives each rank its slice of every batch; the file pages
a rank reads are the page cache's, shared by the ranks of a node. A whole-column scan (the startup checks and
counts, the offsets) and the batches' window reads release the mapped pages they read as they go (every
``RELEASE_BYTES`` of pages read, a scattered read counting ``FAULT_AROUND``; lmrec_common/mapped.py): a rank's resident
set holds the pages of its last few batches, not of every event it ever read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from data_prep.schema import PreparedData, PreparedDataError, load_prepared
from lmrec_common.mapped import dataset_files, release_mapped_pages

PAD = -1
BLOCK_EVENTS = 1 << 20  # events per block when a whole column is scanned (item counts): bounded temporaries
# a whole-column scan of the memory-mapped shards releases the pages it touched every RELEASE_BYTES (and a column read
# at its end), so the scan's resident set stays bounded instead of keeping every page it read (lmrec_common/mapped.py)
RELEASE_BYTES = 64 << 20
# what one read of a mapped file can make resident: Linux maps up to 16 cached pages around a faulting page
# (fault_around_bytes, 64 KiB by default), so a batch's scattered window reads count this much each
FAULT_AROUND = 64 << 10


def open_prepared(path: str) -> PreparedData:
    """The one place the train stage reads the prepared folder (kind/schema/columns are checked
    by data_prep.schema; errors name the folder)."""
    return load_prepared(path)


def _zero_copy(arr) -> np.ndarray:
    """A primitive Arrow array as numpy: a view of its buffer (memory-mapped for load_from_disk), a copy only
    where Arrow cannot give a view (nulls)."""
    try:
        return arr.to_numpy(zero_copy_only=True)
    except Exception:  # pyarrow.ArrowInvalid: nulls or a type without a numpy view
        return np.asarray(arr.to_numpy(zero_copy_only=False))


class FlatValues:
    """The values of a list column as one flat index space over its Arrow chunks, without concatenating them:
    ``parts[c]`` is chunk c's values (a zero-copy view), flat position p lies in the part with
    ``bases[c] <= p < bases[c + 1]``. Indexing with an int array gathers (what latest_windows does)."""

    def __init__(self, parts: list[np.ndarray], files=()):
        self.parts = parts or [np.zeros(0, np.int64)]
        self.files = tuple(files)  # the Arrow files the parts are memory-mapped from (none: in memory)
        self._unreleased = 0
        self.bases = np.zeros(len(self.parts) + 1, np.int64)
        np.cumsum([len(p) for p in self.parts], out=self.bases[1:])
        self.dtype = self.parts[0].dtype
        self.size = int(self.bases[-1])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, pos) -> np.ndarray:
        pos = np.asarray(pos)
        if self.files and pos.size:
            self._count_read(pos.reshape(-1))
        if len(self.parts) == 1:
            return self.parts[0][pos]
        flat = pos.reshape(-1)
        which = np.searchsorted(self.bases, flat, side="right") - 1  # (n,) part of each position
        order = np.argsort(which, kind="stable")
        cuts = np.flatnonzero(np.diff(which[order])) + 1
        out = np.empty(flat.shape, self.dtype)
        for seg in np.split(order, cuts):  # one gather per part the positions touch
            if seg.size:
                c = which[seg[0]]
                out[seg] = self.parts[c][flat[seg] - self.bases[c]]
        return out.reshape(pos.shape)

    def _count_read(self, flat: np.ndarray) -> None:
        """Account a gather's pages: each contiguous run of positions faults in up to FAULT_AROUND bytes around it
        (the kernel maps neighbouring cached pages on a fault), never more than the span the positions cover. So
        the batches' random window reads release their pages every RELEASE_BYTES as a scan's do (O(n), no sort)."""
        runs = 1 + int(np.count_nonzero(np.diff(flat) != 1)) if flat.size > 1 else 1
        span = (int(flat.max()) - int(flat.min()) + 1) * self.dtype.itemsize
        self.scanned(min(runs * FAULT_AROUND, span + FAULT_AROUND))

    def scanned(self, nbytes: int) -> None:
        """A whole-column scan has read ``nbytes`` more of the values: every RELEASE_BYTES, drop the pages read."""
        self._unreleased += int(nbytes)
        if self.files and self._unreleased >= RELEASE_BYTES:
            release_mapped_pages(self.files)
            self._unreleased = 0

    def min_max(self) -> tuple[int, int]:
        """(min, max) of the values, part by part (the pages read are released as the scan goes)."""
        lo = hi = None
        for p in self.parts:
            if p.size:
                a, b = int(p.min()), int(p.max())
                lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
                self.scanned(p.nbytes)
        self.scanned(RELEASE_BYTES)  # the scan is over: release what it read since the last release
        return lo, hi

    def min(self) -> int:
        return self.min_max()[0]

    def max(self) -> int:
        return self.min_max()[1]


def flat_list_column(ds, name: str, offsets: bool = True) -> tuple[FlatValues, np.ndarray | None]:
    """A list<int> column of a datasets.Dataset as (flat values, offsets (N+1,) int64), zero-copy: the values
    stay in the (memory-mapped) Arrow buffers, chunk by chunk; only the offsets (8 bytes a row; None with
    ``offsets=False``, for a column whose rows have the same lengths as one already read) are new."""
    col = ds.data.table.column(name)
    parts, offs, base = [], [np.zeros(1, np.int64)], 0
    for chunk in col.chunks:
        if len(chunk) == 0:
            continue
        o = _zero_copy(chunk.offsets)  # a sliced chunk's offsets need not start at 0 (relative to chunk.values)
        parts.append(_zero_copy(chunk.values)[o[0] : o[-1]])
        if offsets:
            offs.append(o[1:].astype(np.int64) - o[0] + base)
        base += int(o[-1] - o[0])
    files = dataset_files(ds)
    if offsets and files:
        release_mapped_pages(files)  # the offsets were read whole
    return FlatValues(parts, files), (np.concatenate(offs) if offsets else None)


def list_column(ds, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list<int> column as (flat values, offsets (N+1,)) as plain numpy arrays without Python objects per
    element. The values are a zero-copy view when the column has one chunk and a concatenated copy otherwise
    (the bench and test helpers' form; training and evaluation use ``flat_list_column``, never a copy)."""
    vals, offsets = flat_list_column(ds, name)
    values = vals.parts[0] if len(vals.parts) == 1 else np.concatenate(vals.parts)
    return values, offsets


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
    (flat values, pad value) pairs over the same positions (item_idx with -1, event_type with 0); the flat
    values are a numpy array or a ``FlatValues`` (anything gathered by ``values[int array]``).
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
    out = np.array(ds.data.table.column(name).to_numpy(), dtype=np.int64)  # a copy: the mapped pages can go
    files = dataset_files(ds)
    if files:
        release_mapped_pages(files)
    return out


def _index_dtype(n: int):
    """int32 for flat positions below 2^31, int64 beyond."""
    return np.int32 if n < 2**31 else np.int64


def _count_items(values, starts: np.ndarray, lens: np.ndarray, num_items: int) -> np.ndarray:
    """(I,) int64: occurrences of each item at flat positions starts[i] .. starts[i] + lens[i] - 1 of ``values``,
    scanned in blocks of about BLOCK_EVENTS events (temporaries bounded whatever the number of users)."""
    counts = np.zeros(num_items, np.int64)
    lens = np.asarray(lens, np.int64)
    total = np.cumsum(lens)
    a = 0
    while a < len(lens):
        done = int(total[a - 1]) if a else 0
        b = max(int(np.searchsorted(total, done + BLOCK_EVENTS, side="right")), a + 1)
        _, src = _ragged(starts[a:b], lens[a:b])
        counts += np.bincount(values[src], minlength=num_items)  # a FlatValues accounts the pages it read
        a = b
    if hasattr(values, "scanned"):
        values.scanned(RELEASE_BYTES)  # the scan is over
    return counts


def check_sequences(prep: PreparedData, num_items: int) -> None:
    """Cheap consistency checks before any compute (a corrupt or foreign folder fails here)."""
    seq = prep.sequences
    vals, _ = flat_list_column(seq, "item_idx")
    lo, hi = vals.min_max() if vals.size else (0, 0)
    if lo < 0 or hi >= num_items:
        raise PreparedDataError(
            f"{prep.path}/sequences: item_idx outside 0..{num_items - 1} (min {lo}, max {hi}); "
            "items/ and sequences/ do not belong together")
    n_types = max(len(prep.manifest.get("event_types") or []), 1)
    et, _ = flat_list_column(seq, "event_type", offsets=False)
    lo, hi = et.min_max() if et.size else (0, 0)
    if lo < 0 or hi >= n_types:
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
    vals, offs = flat_list_column(sequences, "item_idx")
    # the first training_ends events of each user: data_prep's train_mask, counted block by block
    return torch.from_numpy(_count_items(vals, offs[:-1], training_ends(sequences, through), num_items).astype(np.float32))


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


class _UserRows(Dataset):
    """What TrainExamples and EvalExamples share: one row per user (``starts``, ``user_idx``) over the flat
    ``values`` / ``etype_values``; each row's window ends before flat position starts + ``_window_ends()``."""

    def _window_ends(self) -> np.ndarray:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> int:
        return i  # the collate gathers rows in one vectorised index

    def windows(self, ix) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, width) int64 item and event-type windows of rows ``ix``, left-padded (latest_windows)."""
        ix = np.asarray(ix, np.int64)
        _, (items, etypes) = latest_windows(self.starts[ix], self._window_ends()[ix], self.width, (self.values, PAD),
                                            (self.etype_values, 0))
        return torch.from_numpy(items), torch.from_numpy(etypes)

    @property
    def etypes(self) -> torch.Tensor:
        """Every row's event-type window at once (tests and small data: what the examples no longer hold)."""
        return self.windows(np.arange(len(self)))[1]


@dataclass
class TrainExamples(_UserRows):
    """One example per user with at least 2 training events; its window is built by ``collate``."""

    values: FlatValues  # item_idx of every user, flat (memory-mapped)
    etype_values: FlatValues  # event_type, same positions
    starts: np.ndarray  # (N,) flat position of the example user's first event (int32; int64 past 2^31 events)
    ends: np.ndarray  # (N,) int32 leading events of the user that are training data (training_ends)
    user_idx: np.ndarray  # (N,) int32
    width: int  # max_len + 1

    @classmethod
    def build(cls, sequences, max_len: int, through: str = "train") -> "TrainExamples":
        vals, offs = flat_list_column(sequences, "item_idx")
        ets, _ = flat_list_column(sequences, "event_type", offsets=False)  # same row lengths as item_idx
        end = training_ends(sequences, through)
        keep = np.nonzero(end >= 2)[0]
        users = _int_column(sequences, "user_idx")[keep].astype(np.int32)
        return cls(vals, ets, offs[keep].astype(_index_dtype(vals.size)), end[keep].astype(np.int32), users, max_len + 1)

    def _window_ends(self) -> np.ndarray:
        return self.ends  # windows of width max_len + 1: inputs and their next-item targets

    @property
    def items(self) -> torch.Tensor:
        """Every row's window at once (tests and small data: this is what the examples no longer hold)."""
        return self.windows(np.arange(len(self)))[0]

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        w, e = trim_left_padding(*self.windows(idx), keep=2)
        users = torch.from_numpy(self.user_idx[np.asarray(idx, np.int64)].astype(np.int64))
        return {"hist": w[:, :-1], "event_types": e[:, :-1], "targets": w[:, 1:], "user_idx": users}

    def num_targets(self) -> int:
        """Target positions per epoch, the non-padding entries of ``targets`` = [1:] of each window: a user's latest
        min(end, max_len) events (the first event of a short window is a target too, after a padded input)."""
        return int(np.minimum(self.ends, self.width - 1).astype(np.int64).sum())

    def item_counts(self, num_items: int) -> torch.Tensor:
        """(I,) how often each item is a training TARGET (for logQ / popularity sampling), counted from the flat
        values over the positions num_targets counts (no window is built)."""
        n = np.minimum(self.ends, self.width - 1).astype(np.int64)
        return torch.from_numpy(_count_items(self.values, self.starts.astype(np.int64) + self.ends - n, n, num_items)).float()


@dataclass
class EvalExamples(_UserRows):
    """One example per user with a target of the split and a history before it; ``collate`` builds its window,
    target and seen items."""

    values: FlatValues  # item_idx of every user, flat (memory-mapped)
    etype_values: FlatValues
    starts: np.ndarray  # (N,) flat position of the user's first event (int32; int64 past 2^31 events)
    pos: np.ndarray  # (N,) int32 position of the target in the user's list = length of the history before it
    user_idx: np.ndarray  # (N,) int32
    width: int  # max_len

    @classmethod
    def build(cls, sequences, split: str, max_len: int, max_users: int = 0) -> "EvalExamples":
        if split not in ("valid", "test"):
            raise ValueError(f"split must be valid or test, got {split!r}")
        vals, offs = flat_list_column(sequences, "item_idx")
        ets, _ = flat_list_column(sequences, "event_type", offsets=False)  # same row lengths as item_idx
        pos = _int_column(sequences, f"{split}_pos")
        keep = np.nonzero(pos >= 1)[0]
        if max_users and len(keep) > max_users:
            # a fixed, evenly spaced subset (deterministic; the final evaluation uses every user)
            keep = keep[np.linspace(0, len(keep) - 1, max_users).round().astype(np.int64)]
        users = _int_column(sequences, "user_idx")[keep].astype(np.int32)
        return cls(vals, ets, offs[keep].astype(_index_dtype(vals.size)), pos[keep].astype(np.int32), users, max_len)

    def _window_ends(self) -> np.ndarray:
        return self.pos  # windows of width max_len: the history before the target

    def targets(self, ix) -> torch.Tensor:
        ix = np.asarray(ix, np.int64)
        return torch.from_numpy(self.values[self.starts[ix].astype(np.int64) + self.pos[ix]].astype(np.int64))

    @property
    def hist(self) -> torch.Tensor:
        """Every row's window at once (tests and small data: this is what the examples no longer hold)."""
        return self.windows(np.arange(len(self)))[0]

    @property
    def target(self) -> torch.Tensor:
        return self.targets(np.arange(len(self)))

    def seen(self, ix) -> torch.Tensor:
        """(B, S) each row's distinct items before its target, ascending, right-padded with -1 (S >= 1)."""
        ix = np.asarray(ix, np.int64)
        row, src = _ragged(self.starts[ix], self.pos[ix])
        items = self.values[src].astype(np.int64)
        span = int(items.max()) + 1 if items.size else 1
        key = np.sort(row * span + items)  # (row, item) pairs in order: one sort for the batch
        first = np.ones(key.size, bool)
        first[1:] = key[1:] != key[:-1]
        row, items = np.divmod(key[first], span)  # distinct pairs (np.unique: 10x slower on numpy 2.4)
        lens = np.bincount(row, minlength=len(ix))
        out = np.full((len(ix), max(int(lens.max()) if len(ix) else 0, 1)), PAD, dtype=np.int64)
        out[row, np.arange(len(row)) - np.repeat(np.cumsum(lens) - lens, lens)] = items
        return torch.from_numpy(out)

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        ix = np.asarray(idx, np.int64)
        hist, etypes = trim_left_padding(*self.windows(ix))
        return {"hist": hist, "event_types": etypes, "target": self.targets(ix),
                "user_idx": torch.from_numpy(self.user_idx[ix].astype(np.int64)), "seen": self.seen(ix)}


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
