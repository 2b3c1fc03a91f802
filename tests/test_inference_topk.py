"""inference/topk.py against a brute-force numpy reference: exclusions, ties, item chunking, both methods.

    python -m pytest tests/test_inference_topk.py -q
"""

import numpy as np
import pytest
import torch

from inference.topk import csr_from_lists, topk_exact


def reference(U, V, k, seen, unavailable):
    """Brute force: full score matrix, excluded = -inf, stable sort by (-score, index)."""
    S = U.astype(np.float64) @ V.astype(np.float64).T
    S = S.astype(np.float32)
    S[:, unavailable] = -np.inf
    for b, items in enumerate(seen):
        S[b, list(items)] = -np.inf
    out_s, out_i = [], []
    for row in S:
        order = np.lexsort((np.arange(len(row)), -row))[: min(k, len(row))]
        s = row[order]
        out_s.append(s)
        out_i.append(np.where(np.isneginf(s), -1, order))
    return np.array(out_s), np.array(out_i)


def check(U, V, k, seen, unavailable, **kw):
    off, val = csr_from_lists(seen)
    s, i = topk_exact(torch.from_numpy(U), torch.from_numpy(V), k, seen_offsets=off, seen_items=val,
                      unavailable=torch.from_numpy(unavailable), **kw)
    s, i = s.numpy(), i.numpy()
    rs, ri = reference(U, V, k, seen, unavailable)
    assert s.shape == rs.shape == i.shape
    # the top-k *scores* are exact, whatever the tie-break
    np.testing.assert_allclose(s, rs, rtol=1e-5, atol=1e-5)
    scores_full = U @ V.T
    for b in range(U.shape[0]):
        valid = i[b][i[b] >= 0]
        assert len(set(valid.tolist())) == len(valid), "duplicate item in one user's list"
        assert not set(valid.tolist()) & set(seen[b]), "a seen item was recommended"
        assert not unavailable[valid].any(), "an unavailable item was recommended"
        np.testing.assert_allclose(scores_full[b, valid], s[b][: len(valid)], rtol=1e-5, atol=1e-5)
        # without ties at the k-th score the indices are exact too
        n_allowed = V.shape[0] - len(set(seen[b]) | set(np.flatnonzero(unavailable).tolist()))
        assert len(valid) == min(k, n_allowed)
    return s, i, rs, ri


@pytest.mark.parametrize("method", ["topk", "blockmax"])
@pytest.mark.parametrize("item_chunk", [None, 7, 64, 1000])
def test_random_matches_reference(method, item_chunk):
    rng = np.random.default_rng(0)
    B, I, d, k = 9, 300, 8, 10
    U = rng.standard_normal((B, d)).astype(np.float32)
    V = rng.standard_normal((I, d)).astype(np.float32)
    seen = [rng.choice(I, size=rng.integers(0, 40), replace=False).tolist() for _ in range(B)]
    unavailable = np.zeros(I, bool)
    unavailable[rng.choice(I, 25, replace=False)] = True
    s, i, rs, ri = check(U, V, k, seen, unavailable, item_chunk=item_chunk, method=method, block=4)
    np.testing.assert_array_equal(i, ri)  # continuous random scores: no ties, so indices are exact


@pytest.mark.parametrize("method", ["topk", "blockmax"])
def test_ties_and_hand_computed(method):
    # 1-d vectors: score = u * v. Items 0..5 with values; ties between items 1,2 and 4,5.
    V = np.array([[1.0], [3.0], [3.0], [0.5], [2.0], [2.0]], np.float32)
    U = np.array([[1.0], [1.0], [-1.0]], np.float32)
    seen = [[1], [], [3]]
    unavailable = np.array([False, False, False, False, False, True])
    s, i, _, _ = check(U, V, 3, seen, unavailable, method=method, block=2)
    # user 0: item1 seen, item5 unavailable -> 2 (3.0), 4 (2.0), 0 (1.0)
    assert i[0].tolist() == [2, 4, 0] and s[0].tolist() == [3.0, 2.0, 1.0]
    # user 1: tie 1/2 at 3.0 -> ordered by index
    assert i[1].tolist() == [1, 2, 4]
    # user 2: negative user, seen item 3 -> 0 (-1), 4 (-2), then items 1/2 tie at -3 ON the k-th
    # place: which one is returned is unspecified, but the score is exact
    assert i[2].tolist()[:2] == [0, 4] and i[2][2] in (1, 2) and s[2].tolist() == [-1.0, -2.0, -3.0]


def test_fewer_allowed_items_than_k_gives_minus_one():
    V = np.eye(4, dtype=np.float32)
    U = np.ones((2, 4), np.float32)
    seen = [[0, 1, 2], []]
    unavailable = np.array([False, False, False, True])
    s, i, _, _ = check(U, V, 3, seen, unavailable, item_chunk=2, method="blockmax", block=1)
    assert i[0].tolist() == [-1, -1, -1]  # all excluded
    assert i[1].tolist() == [0, 1, 2] and np.isneginf(s[0]).all()


def test_k_larger_than_catalogue_and_bad_inputs():
    U = torch.ones(1, 2)
    V = torch.eye(2)
    s, i = topk_exact(U, V, 5)
    assert i.tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="shape mismatch"):
        topk_exact(torch.ones(1, 3), V, 1)
    with pytest.raises(ValueError, match="out of range"):
        off, val = csr_from_lists([[7]])
        topk_exact(U, V, 1, seen_offsets=off, seen_items=val)
    with pytest.raises(ValueError, match="seen_offsets must run from 0"):
        topk_exact(U, V, 1, seen_offsets=torch.tensor([0, 2]), seen_items=torch.tensor([1]))
    with pytest.raises(ValueError, match="unavailable mask"):
        topk_exact(U, V, 1, unavailable=torch.zeros(3, dtype=torch.bool))


def test_large_catalogue_chunked_blockmax_equals_topk():
    g = torch.Generator().manual_seed(1)
    U = torch.randn(16, 32, generator=g)
    V = torch.randn(50_000, 32, generator=g)
    off, val = csr_from_lists([torch.randint(0, 50_000, (50,), generator=g).tolist() for _ in range(16)])
    a = topk_exact(U, V, 100, seen_offsets=off, seen_items=val, method="topk")
    b = topk_exact(U, V, 100, seen_offsets=off, seen_items=val, method="blockmax", item_chunk=8192)
    torch.testing.assert_close(a[0], b[0])
    assert torch.equal(a[1], b[1])


@pytest.mark.parametrize("num_items", [301, 303, 42])
def test_blockmax_ragged_last_block_matches_reference(num_items):
    """Catalogue sizes that are not a multiple of the block: the last, shorter block is reduced on its
    own (no padded copy of the scores) and its items can win; columns past the end never come back."""
    rng = np.random.default_rng(num_items)
    B, d, k = 7, 8, 10
    U = rng.standard_normal((B, d)).astype(np.float32)
    V = rng.standard_normal((num_items, d)).astype(np.float32)
    V[-1] = 10 * np.abs(U).mean(0) * np.sign(U[0])  # the very last item is user 0's best: it sits in the ragged block
    seen = [rng.choice(num_items - 1, size=5, replace=False).tolist() for _ in range(B)]
    unavailable = np.zeros(num_items, bool)
    s, i, rs, ri = check(U, V, k, seen, unavailable, method="blockmax", block=4)
    np.testing.assert_array_equal(i, ri)
    assert i[0, 0] == num_items - 1


def test_bf16_scores_select_exactly_what_their_float32_copy_selects():
    """A bf16 product is selected in bf16 (no float32 copy of the block): same items, same scores as
    selecting over the float32 copy of those bf16 values; scores come back float32."""
    g = torch.Generator().manual_seed(3)
    U = torch.randn(33, 16, generator=g).bfloat16()
    V = torch.randn(5_003, 16, generator=g).bfloat16()
    off, val = csr_from_lists([torch.randint(0, 5_003, (20,), generator=g).tolist() for _ in range(33)])
    unavailable = torch.zeros(5_003, dtype=torch.bool)
    unavailable[::97] = True
    for method in ("topk", "blockmax"):
        s, i = topk_exact(U, V, 50, seen_offsets=off, seen_items=val, unavailable=unavailable, method=method, item_chunk=2_000)
        assert s.dtype == torch.float32
        ref = (U @ V.T).float()  # the same bf16 products, compared in float32
        for b in range(33):
            ref[b, val[off[b]:off[b + 1]]] = float("-inf")
        ref[:, unavailable] = float("-inf")
        rs, _ = torch.topk(ref, 50, dim=1)
        torch.testing.assert_close(s, rs, rtol=0, atol=0)  # the exact top-50 values
        assert torch.equal(ref.gather(1, i), s)  # and the items carry those values
