"""CUDA paths give the CPU's answers (skipped without a GPU; bench/gpu_checks.py runs them on a lent one).

    python -m pytest -q -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_inference import _cfg, _read, world  # noqa: E402,F401  (world: the tiny hybrid + prepared fixture)

from conftest import reset_accelerate  # noqa: E402
from inference.run import run as run_inference  # noqa: E402
from inference.topk import csr_from_lists, topk_exact  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _problem(n_users=300, n_items=5000, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, V = torch.randn(n_users, d, generator=g), torch.randn(n_items, d, generator=g)
    rng = np.random.default_rng(seed)
    seen = [rng.choice(n_items, size=int(rng.integers(0, 60)), replace=False) for _ in range(n_users)]
    off, val = csr_from_lists(seen)
    unavailable = torch.from_numpy(rng.random(n_items) < 0.02)
    return U, V, off, val, unavailable, seen


@pytest.mark.parametrize("method", ["topk", "blockmax"])
@pytest.mark.parametrize("chunk", [None, 1234])
def test_topk_exact_cuda_matches_cpu(method, chunk):
    U, V, off, val, unavailable, seen = _problem()
    s_c, i_c = topk_exact(U, V, 50, seen_offsets=off, seen_items=val, unavailable=unavailable, item_chunk=chunk, method=method)
    s_g, i_g = topk_exact(U.cuda(), V.cuda(), 50, seen_offsets=off, seen_items=val, unavailable=unavailable.cuda(),
                          item_chunk=chunk, method=method)
    assert s_g.is_cuda and i_g.is_cuda
    torch.testing.assert_close(s_g.cpu(), s_c, rtol=1e-4, atol=1e-4)
    # continuous random scores: only float rounding can swap neighbours
    assert (i_g.cpu() == i_c).float().mean().item() >= 0.99
    for b, items in enumerate(seen):
        assert not set(i_g[b].tolist()) & set(items.tolist())
    assert not bool(unavailable.cuda()[i_g.clamp(min=0)].any())


def test_topk_bf16_scores_find_the_fp32_top_items():
    """score_dtype=bfloat16 (tensor cores): the items chosen are the fp32 top items up to bf16 rounding."""
    U, V, off, val, unavailable, _ = _problem()
    s_c, i_c = topk_exact(U, V, 50, seen_offsets=off, seen_items=val, unavailable=unavailable)
    _, i_b = topk_exact(U.cuda().bfloat16(), V.cuda().bfloat16(), 50, seen_offsets=off, seen_items=val,
                        unavailable=unavailable.cuda(), method="blockmax")
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 50 for a, b in zip(i_c, i_b.cpu())])
    assert overlap >= 0.9, overlap
    # the fp32 score of every bf16 pick is within bf16 rounding (inputs and output, 2^-8 relative) of the
    # fp32 50th score: |error| <= 2 * 2^-8 * sum_i |u_i v_i| + 2^-8 * |score|
    picks = i_b.cpu()
    true = (U @ V.T).gather(1, picks)
    tol = 2 * 2**-8 * (U.abs() @ V.abs().T).gather(1, picks) + 2**-8 * s_c[:, :1].abs()
    assert bool((true >= s_c[:, -1:] - 2 * tol).all())


def test_inference_cuda_matches_cpu(world, tmp_path):  # noqa: F811
    # accelerate's process state is a singleton that fixes the device: a fresh one per run, as per process in real use
    reset_accelerate()
    gpu_df, gpu_man = _read(run_inference(_cfg(world, tmp_path / "gpu", device="cuda", write_streams=2)))
    reset_accelerate()
    cpu_df, cpu_man = _read(run_inference(_cfg(world, tmp_path / "cpu", device="cpu")))
    reset_accelerate()
    assert gpu_man["devices"][0].startswith("cuda") and cpu_man["devices"] == ["cpu"]
    assert gpu_man["counts"]["rows"] == cpu_man["counts"]["rows"] and len(gpu_man["parts"]) == 2
    key = ["user_id", "rank"]
    a, b = cpu_df.sort_values(key).reset_index(drop=True), gpu_df.sort_values(key).reset_index(drop=True)
    np.testing.assert_allclose(a["score"], b["score"], rtol=1e-3, atol=1e-4)
    assert (a["item_id"] == b["item_id"]).mean() >= 0.95
    bf_df, bf_man = _read(run_inference(_cfg(world, tmp_path / "bf16", device="cuda", score_dtype="bfloat16")))
    reset_accelerate()
    assert bf_man["devices"][0].startswith("cuda") and bf_man["counts"]["rows"] == cpu_man["counts"]["rows"]


def test_inference_cuda_overlap_scoring_gives_the_same_table(world, tmp_path):  # noqa: F811
    """overlap_scoring on CUDA (next chunk queued before the previous result is waited for; pinned copies,
    one event per chunk): the very same table as the synchronous path, in float32 and bf16."""
    key = ["user_id", "rank"]
    for dtype in ("float32", "bfloat16"):
        got = {}
        for overlap in (False, True):
            reset_accelerate()
            df, man = _read(run_inference(_cfg(world, tmp_path / f"{dtype}-{overlap}", device="cuda", score_dtype=dtype,
                                               overlap_scoring=overlap, user_batch_size=4, write_streams=2)))
            got[overlap] = (df.drop(columns="model_version").sort_values(key).reset_index(drop=True), man["counts"]["rows"])
        reset_accelerate()
        assert got[True][1] == got[False][1] == 30 * 5
        assert got[True][0].equals(got[False][0]), dtype


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_train_lora_bf16_on_cuda_learns_and_exports(tmp_path, monkeypatch):
    """LoRA hybrid under bf16 autocast on the GPU: the loss falls, the weights stay float32, final/ loads."""
    from fixtures_prepared import write_prepared, write_tiny_text_model
    from lmrec_common.config import load_config
    from train.config import TrainConfig
    from train.export import load_final
    from train.loop import run as run_train

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    prep = write_prepared(tmp_path / "prepared")
    bert = write_tiny_text_model(tmp_path / "bert")
    cfg = load_config(TrainConfig, None, [
        f"data={prep}", f"output_dir={tmp_path / 'ck'}", "run_name=g", f"model.text_model_path={bert}", "model.item_tower=hybrid",
        "model.text_mode=lora", "model.d_model=32", "model.max_len=20", "model.dropout=0.0", "batch_size=8", "tracker=none",
        "optim.lr=1e-2", "optim.warmup_steps=3", "max_steps=60", "log_every=10", "eval_every=30", "save_every=0",
        "early_stopping_patience=0"])
    assert run_train(cfg) == 0
    rd = tmp_path / "ck" / "g"
    ls = [json.loads(x)["loss"] for x in (rd / "losses.jsonl").read_text().splitlines()]
    assert len(ls) == 60 and sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.3, ls
    m = json.loads((rd / "final" / "metrics.json").read_text())
    assert m["valid"]["NDCG@10"] > m["valid_most_popular"]["NDCG@10"], m
    model, _ = load_final(rd / "final")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
