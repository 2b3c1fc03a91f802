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
