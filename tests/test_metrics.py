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


# ----------------------------------------------------------------------------- beyond accuracy (issue 28)


def test_beyond_accuracy_hand_example():
    import numpy as np

    from train.metrics import beyond_accuracy, exposure_from_lists

    # 5 items, popularity (training events) 10, 0, 5, 5, 1; three users' top-2 lists
    pop = np.array([10, 0, 5, 5, 1])
    e = exposure_from_lists(np.array([[0, 2], [0, 3], [0, 1]]), 5)
    assert e.tolist() == [3, 1, 1, 1, 0]
    b = beyond_accuracy(e, pop)
    assert b["coverage"] == 4 / 5 and b["items_eligible"] == 5 and b["recommendations"] == 6
    # percentiles among the 5 items: item1 (0) 0, item4 (1) 25, items 2 and 3 (5, tied) 62.5, item0 (10) 100;
    # rows: 0, 0, 0, 2, 3, 1 -> (3 * 100 + 62.5 + 62.5 + 0) / 6
    assert b["popularity_percentile"] == pytest.approx(425 / 6)
    # exposure ascending 0, 1, 1, 1, 3: sum (2i - 6) e_i = -2 + 0 + 2 + 12 = 12 -> 12 / (5 * 6)
    assert b["gini"] == pytest.approx(0.4)
    # head = the ceil(20% of 5) = 1 most popular item (item 0): 3 of 6 rows are in the tail
    assert b["tail_share"] == pytest.approx(0.5)


def test_beyond_accuracy_eligible_items_ties_and_extremes():
    import numpy as np

    from train.metrics import beyond_accuracy, exposure_from_lists, top_items

    pop = np.array([4, 4, 4, 4, 9, 0])
    eligible = np.array([True, True, True, True, False, True])  # item 4 may not be recommended (unavailable)
    # equal exposure of every eligible item: Gini 0, full coverage
    b = beyond_accuracy(np.array([2, 2, 2, 2, 0, 2]), pop, eligible)
    assert b["items_eligible"] == 5 and b["coverage"] == 1.0 and b["gini"] == pytest.approx(0.0)
    # the head is the ceil(20% of 5) = 1 most popular eligible item; ties by item index: item 0
    assert b["tail_share"] == pytest.approx(8 / 10)
    # percentiles among eligible: item5 (0) 0; items 0-3 (4, tied): (1 + 0.5 * 3) / 4 * 100 = 62.5
    assert b["popularity_percentile"] == pytest.approx((4 * 2 * 62.5 + 2 * 0) / 10)
    # everything on one item: Gini (n - 1) / n
    assert beyond_accuracy(np.array([0, 0, 7, 0, 0, 0]), pop, eligible)["gini"] == pytest.approx(4 / 5)
    empty = beyond_accuracy(np.zeros(6, np.int64), pop)
    assert empty["coverage"] == 0.0 and empty["gini"] is None and empty["tail_share"] is None
    # top_items: seen excluded, NaN never listed, -1 past the items left
    scores = torch.tensor([[0.1, 0.9, float("nan"), 0.3], [0.5, 0.4, 0.3, 0.2]])
    top = top_items(scores, torch.tensor([[1, -1, -1], [0, 1, 2]]), 3)
    assert top.tolist() == [[3, 0, -1], [3, -1, -1]]
    assert exposure_from_lists(top.numpy(), 4).tolist() == [1, 0, 0, 2]
