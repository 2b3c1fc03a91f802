"""Full-ranking metrics: the held-out item is ranked against ALL items, the user's history excluded.

    ranks = target_ranks(scores, targets, seen)      # (B,) 1-based
    m = metrics_from_ranks(ranks)                    # {"HR@10": ..., "NDCG@10": ..., "MRR": ..., "n": ...}

Protocol (the one of the published MovieLens anchors: leave-last-out, full ranking, seen excluded):
- every item the user consumed before the target (the whole history, not only the last max_len)
  is removed from the ranking, EXCEPT the target itself: with re-consumption the target may also
  appear in the history, and it always stays rankable;
- rank = 1 + #{other items with score > target score} + #{other items with score == target score}:
  ties are counted PESSIMISTICALLY, so a constant scorer gets the worst rank, never a lucky one;
- a NaN score is treated as -inf for the other items and makes the target's rank the worst;
- HR@K = [rank <= K] (= Recall@K with one target), NDCG@K = [rank <= K] / log2(rank + 1), MRR = 1/rank
  (no cut-off); each is a mean over users.
Computed from per-user ranks so that distributed evaluation gathers the ranks (gather_for_metrics)
and gets the same numbers whatever the world size.
"""

from __future__ import annotations

import math

import numpy as np
import torch

KS = (10, 50, 200)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
    """scores (B, I) float, targets (B,) item idx, seen (B, S) item idx padded with -1 -> ranks (B,) int64.

    Does not modify ``scores``."""
    if scores.dim() != 2 or targets.shape != (scores.size(0),):
        raise ValueError(f"target_ranks: scores (B, I) and targets (B,) expected, got {tuple(scores.shape)} / {tuple(targets.shape)}")
    B, I = scores.shape
    if bool(((targets < 0) | (targets >= I)).any()):
        raise ValueError(f"target_ranks: targets outside 0..{I - 1}")
    s = scores.float().clone()
    s = torch.nan_to_num(s, nan=-math.inf)
    rows = torch.arange(B, device=s.device)
    t = s[rows, targets].clone()  # (B,)
    if seen is not None and seen.numel():
        seen = seen.to(s.device).long()
        valid = seen >= 0
        r = rows[:, None].expand_as(seen)[valid]
        s[r, seen[valid]] = -math.inf
    # the target is never excluded and never counted against itself
    s[rows, targets] = -math.inf
    nan_target = torch.isnan(scores.float()[rows, targets])
    better_or_tie = (s >= t[:, None]) & (s > -math.inf)
    # a target whose score is -inf ties with every excluded (-inf) item: still only count real items
    ranks = 1 + better_or_tie.sum(1)
    ranks = torch.where(nan_target | torch.isneginf(t), torch.full_like(ranks, I), ranks)
    return ranks


def metrics_from_ranks(ranks: torch.Tensor, ks=KS) -> dict[str, float]:
    """Mean HR@K, NDCG@K and MRR over users from 1-based ranks (N,)."""
    r = ranks.double()
    n = r.numel()
    out: dict[str, float] = {}
    if n == 0:
        return {"n": 0}
    for k in ks:
        hit = (r <= k).double()
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float((hit / torch.log2(r + 1)).mean())
    out["MRR"] = float((1.0 / r).mean())
    out["n"] = n
    return out


def format_metrics(m: dict[str, float], ks=KS) -> str:
    parts = [f"HR@{k} {m.get(f'HR@{k}', float('nan')):.4f}" for k in ks]
    parts += [f"NDCG@{k} {m.get(f'NDCG@{k}', float('nan')):.4f}" for k in ks]
    parts.append(f"MRR {m.get('MRR', float('nan')):.4f}")
    parts.append(f"users {m.get('n', 0)}")
    return " | ".join(parts)


# ------------------------------------------------------------------------------------ beyond accuracy
# What a list of recommendations does to the catalogue, from how often each item is recommended (its exposure).
# Computed over the ELIGIBLE items (those that may be recommended: the whole catalogue in training's evaluation,
# the available items in the nightly table), with popularity = training events per item:
#   coverage               = share of eligible items recommended at least once
#   popularity_percentile  = mean over recommended rows of the item's popularity percentile among eligible items:
#                            100 * (#less popular + 0.5 * #others as popular) / (n - 1); 0 = least popular, 100 = most
#   gini                   = Gini index of exposure over eligible items (ascending e_1..e_n):
#                            sum_i (2i - n - 1) e_i / (n sum e); 0 = every item shown equally, -> 1 = a few items only
#   tail_share             = share of recommended rows whose item is in the long tail: the eligible items outside the
#                            ceil(20%) most popular (ties by item index), i.e. the bottom 80% by popularity
HEAD_PERCENT = 20


def exposure_from_lists(top: np.ndarray, num_items: int) -> np.ndarray:
    """(U, K) recommended item indices (-1 = no item) -> (num_items,) int64 times each item is recommended."""
    top = np.asarray(top)
    return np.bincount(top[top >= 0].astype(np.int64), minlength=num_items)[:num_items].astype(np.int64)


def beyond_accuracy(exposure: np.ndarray, popularity: np.ndarray, eligible: np.ndarray | None = None) -> dict[str, float | int | None]:
    """Coverage, mean popularity percentile, Gini index of exposure and long-tail share (definitions above) from
    ``exposure`` (I,) recommendations per item, ``popularity`` (I,) training events per item and ``eligible`` (I,)
    bool (None = every item). Metrics of an empty table are None."""
    exposure = np.asarray(exposure, np.int64)
    popularity = np.asarray(popularity, np.float64)
    idx = np.arange(len(exposure)) if eligible is None else np.flatnonzero(np.asarray(eligible, bool))
    e, p = exposure[idx], popularity[idx]
    n, total = len(idx), int(e.sum())
    out: dict[str, float | int | None] = {"items_eligible": n, "recommendations": total}
    if n == 0 or total == 0:
        return {**out, "coverage": None if n == 0 else 0.0, "popularity_percentile": None, "gini": None, "tail_share": None}
    ps = np.sort(p)
    less = np.searchsorted(ps, p, side="left")
    equal_others = np.searchsorted(ps, p, side="right") - less - 1
    pct = 100.0 * (less + 0.5 * equal_others) / (n - 1) if n > 1 else np.full(n, 50.0)
    es = np.sort(e).astype(np.float64)
    gini = float(((2 * np.arange(1, n + 1) - n - 1) * es).sum() / (n * es.sum()))
    head = np.lexsort((np.arange(n), -p))[: -(-n * HEAD_PERCENT // 100)]  # the ceil(20%) most popular, ties by index
    tail = np.ones(n, bool)
    tail[head] = False
    out.update(coverage=float((e > 0).sum() / n), popularity_percentile=float((pct * e).sum() / total), gini=gini,
               tail_share=float(e[tail].sum() / total))
    return out


def top_items(scores: torch.Tensor, seen: torch.Tensor | None, k: int) -> torch.Tensor:
    """(B, I) scores, (B, S) seen item indices padded with -1 -> (B, k) int64 the k best unseen items, -1 where fewer
    than k items are left (NaN scores never make a list). Does not modify ``scores``."""
    s = torch.nan_to_num(scores.float(), nan=-math.inf).clone()
    if seen is not None and seen.numel():
        seen = seen.to(s.device).long()
        valid = seen >= 0
        rows = torch.arange(s.size(0), device=s.device)[:, None].expand_as(seen)[valid]
        s[rows, seen[valid]] = -math.inf
    v, idx = torch.topk(s, min(k, s.size(1)), dim=1)
    return torch.where(torch.isneginf(v), torch.full_like(idx, -1), idx)


def format_beyond(m: dict, k: int) -> str:
    def f(name: str, fmt: str) -> str:
        v = m.get(f"{name}@{k}")
        return "n/a" if v is None else format(v, fmt)

    return (f"coverage@{k} {f('coverage', '.3f')} | pop pct@{k} {f('popularity_percentile', '.1f')} | "
            f"gini@{k} {f('gini', '.3f')} | tail@{k} {f('tail_share', '.3f')}")
