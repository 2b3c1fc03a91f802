"""Exact top-K by inner product, in bounded memory, with per-user and global exclusions.

    from inference.topk import topk_exact, csr_from_lists
    off, val = csr_from_lists([[3, 7], [], [0]])            # items each user has seen
    scores, idx = topk_exact(U, V, k=100, seen_offsets=off, seen_items=val, unavailable=mask)

``U`` is one chunk of user vectors (B, d), ``V`` the whole item matrix (I, d). Memory never holds
more than (B x item_chunk) scores: the catalogue is walked in slices of ``item_chunk`` items, each
slice yields its own top-K, and the partial top-Ks are merged (a running (B, K) best list). The
caller walks users in chunks of B, so nothing scales with users x items.

Exclusions are applied to the scores before selection, so the result is the exact top-K over the
allowed items (not "top-K then filter", which returns fewer than K): ``seen`` is a CSR structure
(offsets (B+1,), values (nnz,) item indices of row b in values[offsets[b]:offsets[b+1]]) and
``unavailable`` a (I,) bool mask. A user with fewer than K allowed items gets score -inf and
index -1 in the tail; callers drop those entries.

Selection methods (``method``):
- ``"topk"``: ``torch.topk`` over each (B, item_chunk) score slice.
- ``"blockmax"``: two-stage exact selection. Cut each score row into blocks of ``block`` items,
  take each block's max, keep the K blocks with the largest max, and run ``torch.topk`` over those
  K x block candidates. It is exact because every item of the true top-K lies in one of the K best
  blocks (a block outside them has K blocks above it, each holding an item that beats all of the
  block's items). On CPU it replaces a top-K over I items with a streaming max (vectorised, memory
  bound) plus a top-K over I/block + K*block values. bench/inference_bench.py compares both; the
  measured winner is the default (see docs/BENCH_INFERENCE.md).

Ties: the *scores* returned are always the exact top-K scores. Which of several items tied on the
K-th score is returned is unspecified (as with torch.topk); within the returned list, rows are
ordered by score descending and then by item index ascending, so output is deterministic for the
same input on the same machine.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch

Method = Literal["topk", "blockmax", "auto"]
NEG_INF = float("-inf")

# Measured on the 2-core CPU dev box (docs/BENCH_INFERENCE.md): blockmax(64) wins at 1M items per
# score slice, torch.topk at 10k-100k; the switch point between is not measured finer than that.
AUTO_BLOCKMAX_MIN_ITEMS = 500_000
DEFAULT_BLOCK = 64


def csr_from_lists(rows: Sequence[Sequence[int]] | Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """[[3, 7], [], [0]] -> offsets tensor([0, 2, 2, 3]), values tensor([3, 7, 0]) (int64)."""
    lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    if offsets[-1] == 0:
        values = np.zeros(0, dtype=np.int64)
    else:
        values = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])
    return torch.from_numpy(offsets), torch.from_numpy(values)


def _row_ids(offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """CSR offsets (B+1,) -> the row of every value (nnz,). ``nnz`` given: no device-to-host sync."""
    counts = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(len(counts), device=offsets.device), counts, output_size=nnz)


def select_rows_topk(scores: torch.Tensor, k: int, method: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of ``scores`` (B, n) -> (values (B, k), column indices (B, k)), k <= n.

    blockmax never copies the score block: the full blocks are a view of it, a ragged last block
    (n not a multiple of ``block``) is reduced on its own, and the candidates are gathered by column."""
    n = scores.shape[1]
    if method == "topk" or n <= k * block:
        return torch.topk(scores, k, dim=1, sorted=False)
    b = scores.shape[0]
    nf = n // block  # full blocks
    bmax = scores[:, :nf * block].unflatten(1, (nf, block)).amax(dim=2)  # (B, nf), a view: rows keep their stride
    if nf * block < n:  # the ragged last block
        bmax = torch.cat([bmax, scores[:, nf * block:].amax(dim=1, keepdim=True)], dim=1)
    top_blocks = torch.topk(bmax, k, dim=1, sorted=False).indices  # (B, k) block ids
    cols = (top_blocks.unsqueeze(2) * block + torch.arange(block, device=scores.device)).reshape(b, k * block)
    cand = scores.gather(1, cols.clamp(max=n - 1))  # (B, k*block)
    if nf * block < n:  # columns past the end (only in the ragged block) must not be picked
        cand = cand.masked_fill(cols >= n, NEG_INF)
    vals, pos = torch.topk(cand, k, dim=1, sorted=False)
    return vals, cols.gather(1, pos)


def resolve_method(method: Method, num_items: int) -> str:
    if method == "auto":
        return "blockmax" if num_items >= AUTO_BLOCKMAX_MIN_ITEMS else "topk"
    if method not in ("topk", "blockmax"):
        raise ValueError(f"unknown top-K method {method!r}; use topk, blockmax or auto")
    return method


def topk_exact(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    k: int,
    *,
    seen_offsets: torch.Tensor | None = None,
    seen_items: torch.Tensor | None = None,
    unavailable: torch.Tensor | None = None,
    item_chunk: int | None = None,
    method: Method = "auto",
    block: int = DEFAULT_BLOCK,
    unavailable_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` items per user by inner product, excluding seen and unavailable items.

    user_vecs (B, d), item_vecs (I, d) (same dtype/device); seen_offsets (B+1,) int64 and
    seen_items (nnz,) int64 item indices in [0, I) (CSR, optional); unavailable (I,) bool (optional);
    item_chunk: items scored at once (memory B x item_chunk floats); None = all I at once.
    unavailable_idx: the same exclusion given as item indices already on the device (a caller scoring
    many chunks computes it once; ``torch.nonzero`` of the mask would wait for the device every call).
    Returns (scores (B, k') float32, item indices (B, k') int64) with k' = min(k, I), sorted by score
    descending then index ascending; entries past a user's allowed items are (-inf, -1).

    With CPU (ideally pinned) seen_* inputs and a single item slice, nothing here waits for the device:
    the work is queued and the caller decides when to synchronise (inference/run.py overlaps chunks so).
    """
    if user_vecs.ndim != 2 or item_vecs.ndim != 2 or user_vecs.shape[1] != item_vecs.shape[1]:
        raise ValueError(f"shape mismatch: users {tuple(user_vecs.shape)} vs items {tuple(item_vecs.shape)}; want (B, d) and (I, d)")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    b, num_items = user_vecs.shape[0], item_vecs.shape[0]
    dev = user_vecs.device
    kk = min(k, num_items)
    method = resolve_method(method, num_items)
    chunk = num_items if not item_chunk or item_chunk >= num_items else int(item_chunk)
    if chunk < kk:
        chunk = kk  # a slice must hold at least k items for its partial top-k

    seen_rows = seen_cols = None
    if seen_items is not None and seen_items.numel():
        if seen_offsets is None or seen_offsets.numel() != b + 1:
            raise ValueError(f"seen_offsets must have B+1={b + 1} entries")
        if seen_offsets.device.type == "cpu" and (int(seen_offsets[0]) != 0 or int(seen_offsets[-1]) != seen_items.numel()):
            raise ValueError(f"seen_offsets must run from 0 to len(seen_items)={seen_items.numel()}, "
                             f"got {int(seen_offsets[0])}..{int(seen_offsets[-1])}")
        lo_hi = seen_items.aminmax()  # on the input's device: free when it is the CPU
        if int(lo_hi.min) < 0 or int(lo_hi.max) >= num_items:
            raise ValueError(f"seen item index out of range [0, {num_items}): min {int(lo_hi.min)}, max {int(lo_hi.max)}")
        nb = dev.type == "cuda"  # from pinned memory this copy does not wait; from pageable memory it is staged
        seen_cols = seen_items.to(dev, torch.int64, non_blocking=nb)
        seen_rows = _row_ids(seen_offsets.to(dev, torch.int64, non_blocking=nb), seen_items.numel())
    unavail_idx = unavailable_idx
    if unavail_idx is None and unavailable is not None:
        if unavailable.shape != (num_items,):
            raise ValueError(f"unavailable mask must have shape ({num_items},), got {tuple(unavailable.shape)}")
        unavail_idx = torch.nonzero(unavailable.to(dev), as_tuple=False).flatten()

    best_s = best_i = neg = None
    for start in range(0, num_items, chunk):
        stop = min(start + chunk, num_items)
        # (B, n) inner products. A bf16 product is selected in bf16: its values are what a float32 copy
        # would hold (bf16 -> float32 is exact), so the picks are the same at a third of the memory traffic
        scores = user_vecs @ item_vecs[start:stop].T
        if scores.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            scores = scores.float()
        whole = start == 0 and stop == num_items  # one slice: no masks (a boolean mask would wait for the device)
        if unavail_idx is not None and unavail_idx.numel():
            if whole:
                scores.index_fill_(1, unavail_idx, NEG_INF)
            else:
                sel = unavail_idx[(unavail_idx >= start) & (unavail_idx < stop)]
                if sel.numel():
                    scores.index_fill_(1, sel - start, NEG_INF)
        if seen_cols is not None:
            if neg is None or neg.dtype != scores.dtype:
                neg = torch.full((), NEG_INF, device=dev, dtype=scores.dtype)  # a fill on the device, not a host copy
            if whole:
                scores.index_put_((seen_rows, seen_cols), neg)
            else:
                m = (seen_cols >= start) & (seen_cols < stop)
                if bool(m.any()):
                    scores.index_put_((seen_rows[m], seen_cols[m] - start), neg)
        kc = min(kk, stop - start)
        s, i = select_rows_topk(scores, kc, method, block)
        i = i + start
        if best_s is None:
            best_s, best_i = s, i
        else:  # merge the partial top-k of this slice into the running best (B, k)
            cs, ci = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
            s2, p = torch.topk(cs, min(kk, cs.shape[1]), dim=1, sorted=False)
            best_s, best_i = s2, ci.gather(1, p)
    assert best_s is not None and best_i is not None
    return order_topk(best_s, best_i)


def order_topk(scores: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's selected (scores, item indices), (B, k) in any order -> float32 scores descending, then item index
    ascending (two stable sorts: a deterministic order); entries scored -inf (excluded items) get index -1."""
    scores = scores.float()
    o = torch.argsort(idx, dim=1, stable=True)
    scores, idx = scores.gather(1, o), idx.gather(1, o)
    o = torch.argsort(scores, dim=1, descending=True, stable=True)
    scores, idx = scores.gather(1, o), idx.gather(1, o)
    return scores, idx.masked_fill(torch.isneginf(scores), -1)
