"""train/metrics.py against hand-computed ranks."""

import math

import pytest
import torch

from train.metrics import format_metrics, metrics_from_ranks, target_ranks


def test_rank_counts_items_scored_higher():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.7]])
    # target 2 (0.5): items 1 (0.9) and 4 (0.7) are higher -> rank 3
    assert target_ranks(scores, torch.tensor([2])).tolist() == [3]
    assert target_ranks(scores, torch.tensor([1])).tolist() == [1]
    assert target_ranks(scores, torch.tensor([0])).tolist() == [5]


def test_seen_items_excluded_but_target_stays_rankable():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.7]])
    seen = torch.tensor([[1, 2, -1]])  # item 2 is also the target (re-consumption)
    # item 1 excluded; the target itself is never excluded; only item 4 is higher -> rank 2
    assert target_ranks(scores, torch.tensor([2]), seen).tolist() == [2]
    # input scores untouched
    assert scores[0, 1] == pytest.approx(0.9)


def test_ties_are_pessimistic_and_nan_is_worst():
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.2, float("nan"), 0.1, 0.0], [float("nan"), 0.5, 0.1, 0.0]])
    r = target_ranks(scores, torch.tensor([0, 0, 0]))
    # row 0: the two other items tie with the target -> rank 3 (not 1)
    # row 1: the NaN item is treated as -inf -> target first
    # row 2: NaN target -> the worst rank (I = 4)
    assert r.tolist() == [3, 1, 4]


def test_rows_are_independent_and_padding_ignored():
    scores = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    seen = torch.tensor([[0, -1], [-1, -1]])
    assert target_ranks(scores, torch.tensor([2, 2]), seen).tolist() == [2, 3]


def test_metrics_from_ranks_hand_computed():
    m = metrics_from_ranks(torch.tensor([1, 3, 11, 60]), ks=(10, 50, 200))
    assert m["n"] == 4
    assert m["HR@10"] == pytest.approx(2 / 4)
    assert m["HR@50"] == pytest.approx(3 / 4)
    assert m["HR@200"] == pytest.approx(1.0)
    assert m["NDCG@10"] == pytest.approx((1 / math.log2(2) + 1 / math.log2(4)) / 4)
    assert m["NDCG@50"] == pytest.approx((1 + 0.5 + 1 / math.log2(12)) / 4)
    assert m["NDCG@200"] == pytest.approx((1 + 0.5 + 1 / math.log2(12) + 1 / math.log2(61)) / 4)
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 11 + 1 / 60) / 4)
    assert "HR@10 0.5000" in format_metrics(m)


def test_bad_targets_raise():
    with pytest.raises(ValueError, match="targets outside"):
        target_ranks(torch.zeros(1, 3), torch.tensor([3]))
    assert metrics_from_ranks(torch.zeros(0, dtype=torch.long)) == {"n": 0}
