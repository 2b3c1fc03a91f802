"""Pure functions of bench/train_throughput.py against hand-computed values (no timing, no model runs
except one tiny parameter-count check)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tt():
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "bench" / "train_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_throughput"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_layer_params_by_hand(tt):
    # BERT-base: 4 * 768^2 (q,k,v,o) + 2 * 768 * 3072 (FFN) = 2,359,296 + 4,718,592
    assert tt.layer_matmul_params(tt.SHAPES["bert-base"]) == 7_077_888
    # Qwen2.5-0.5B geometry: q,o 2 * 896^2; k,v 2 * 896 * 128 (2 kv heads x 64); SwiGLU 3 * 896 * 4864
    assert tt.SHAPES["decoder-0.5b"].kv_dim == 128
    assert tt.layer_matmul_params(tt.SHAPES["decoder-0.5b"]) == 2 * 896 * 896 + 2 * 896 * 128 + 3 * 896 * 4864


def test_shape_params_match_transformers(tt):
    """The formula counts exactly what transformers builds (BERT without pooler, Qwen2 body), on tiny shapes."""
    import torch
    from transformers import BertConfig, BertModel, Qwen2Config, Qwen2Model

    torch.manual_seed(0)
    enc = tt.Shape("tiny-enc", layers=2, hidden=32, heads=4, kv_heads=4, ffn=64, vocab=100, max_pos=40)
    m = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=40), add_pooling_layer=False)
    assert tt.shape_params(enc)["total"] == sum(p.numel() for p in m.parameters())
    dec = tt.Shape("tiny-dec", layers=2, hidden=32, heads=4, kv_heads=2, ffn=48, vocab=100, max_pos=64, gated=True, decoder=True)
    q = Qwen2Model(Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=64))
    assert tt.shape_params(dec)["total"] == sum(p.numel() for p in q.parameters())


def test_real_shapes_sizes(tt):
    # published sizes minus the pooler (d^2 + d, unused by the item tower): all-MiniLM-L6-v2 22,713,216 - 147,840;
    # BERT-base 109,482,240 - 590,592; Qwen2.5-0.5B 494.0M
    assert tt.shape_params(tt.SHAPES["minilm"])["total"] == 22_713_216 - (384 * 384 + 384)
    assert tt.shape_params(tt.SHAPES["bert-base"])["total"] == 108_891_648
    assert round(tt.shape_params(tt.SHAPES["decoder-0.5b"])["total"] / 1e6) == 494


def test_forward_flops_by_hand(tt):
    s = tt.Shape("t", layers=2, hidden=4, heads=1, kv_heads=1, ffn=8, vocab=10)
    mm = 2 * (4 * 16 + 2 * 4 * 8)  # 2 layers x (4 d^2 + 2 d f) = 256
    assert tt.shape_params(s)["matmul"] == mm
    # sequences of 3 and 5 tokens: 2 * 8 tokens * 256 + 4 * layers 2 * d 4 * (9 + 25)
    assert tt.forward_flops(s, [3, 5]) == 2 * 8 * 256 + 4 * 2 * 4 * 34
    assert tt.forward_flops(s, []) == 0
    assert tt.train_factor("full") == 3 and tt.train_factor("lora") == 2 and tt.train_factor("frozen") == 1


def test_user_tower_flops_by_hand(tt):
    # 3 x positions 10 x layers 2 x (24 * 8^2 + 4 * T 5 * 8)
    assert tt.user_tower_flops(8, 2, 10, 5) == 3 * 10 * 2 * (24 * 64 + 160)


def test_comm_bytes_by_hand(tt):
    # 1000 params in bf16 = 2000 B; 4 ranks -> (N-1)/N = 0.75
    ddp = tt.comm_bytes(1000, 0, 4)
    assert ddp["payload"] == 2000 and ddp["wire"] == 3000 and ddp["ops"] == {"all_reduce": 2000}
    z2 = tt.comm_bytes(1000, 2, 4)
    assert z2["payload"] == 4000 and z2["wire"] == 3000  # same wire volume as DDP
    assert z2["ops"] == {"reduce_scatter": 2000, "all_gather": 2000}
    z3 = tt.comm_bytes(1000, 3, 4)
    assert z3["payload"] == 6000 and z3["wire"] == 4500  # 1.5x DDP
    # parameters kept from forward to backward (fit max_live_parameters): one gather, like ZeRO-2
    assert tt.comm_bytes(1000, 3, 4, regather=False)["payload"] == 4000
    assert tt.comm_bytes(1000, 2, 1)["wire"] == 0  # one rank sends nothing
    assert tt.comm_bytes(10, 0, 2, bytes_per=4)["payload"] == 40
    with pytest.raises(ValueError):
        tt.comm_bytes(10, 4, 2)


def test_scaled_step_by_hand(tt):
    # 1e9 params bf16, DDP on 8: wire = 2 * 7/8 * 2e9 = 3.5e9 B; at 350 GB/s -> 10 ms comm; compute 30 ms
    r = tt.scaled_step(0.030, 10**9, 0, 8, 350.0, overlap=0.0)
    assert r["comm_s"] == pytest.approx(0.010)
    assert r["step_s"] == pytest.approx(0.040) and r["efficiency"] == pytest.approx(0.75)
    half = tt.scaled_step(0.030, 10**9, 0, 8, 350.0, overlap=0.5)
    assert half["step_s"] == pytest.approx(0.035)


def test_padded_tokens_by_hand(tt):
    lens = [3, 10, 4, 9]
    assert tt.padded_tokens(lens) == 4 * 10  # one batch padded to the longest
    assert tt.padded_tokens(lens, bucket=2) == 2 * 4 + 2 * 10  # sorted [3,4] [9,10]
    assert tt.padded_tokens(lens, bucket=1) == sum(lens)
    assert tt.padded_tokens([]) == 0


def test_bucketed_encoder_matches_plain(tt, tmp_path):
    """The length-bucketing lever changes only padding, not the vectors (eval mode, same weights)."""
    import torch
    from transformers import BertConfig, BertModel

    from train.catalogue import Catalogue
    from train.model import RecModelConfig, SeqRecModel

    tmp = tmp_path / "tower"
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp)
    cfg = RecModelConfig(num_items=7, item_tower="text", text_mode="full", text_model_path=str(tmp), d_model=8, dropout=0.0)
    torch.manual_seed(0)
    plain = SeqRecModel(cfg).eval()
    bucketed = tt._bucketed_model_class(2)(cfg).eval()
    bucketed.load_state_dict(plain.state_dict())
    lens = torch.tensor([2, 6, 3, 5, 1, 6, 4])
    ids = torch.randint(1, 50, (7, 6)) * (torch.arange(6)[None] < lens[:, None])
    cat = Catalogue.from_tokens(ids, lens)
    idx = torch.tensor([5, 0, 3, 1, 6])
    with torch.no_grad():
        torch.testing.assert_close(bucketed._encode_text(idx, cat), plain._encode_text(idx, cat), atol=1e-5, rtol=1e-4)


def _row(variant, shape, useful_tok_s, events_s, tflops=0.0, device="NVIDIA H100 80GB HBM3"):
    return {"variant": variant, "shape": shape, "useful_tok_s": useful_tok_s, "events_s": events_s,
            "model_tflops_s": tflops, "device": device}


def test_checks_by_hand(tt):
    rows = [_row("minilm_native", "minilm", 9000.0, 500.0), _row("minilm_naive", "minilm", 1000.0, 50.0),
            _row("bert_native", "bert-base", 4000.0, 200.0), _row("bert_naive", "bert-base", 2000.0, 20.0),
            _row("bert_zero2", "bert-base", 0, 170.0), _row("minilm_zero2", "minilm", 0, 450.0),
            _row("decoder_native", "decoder-0.5b", 1.0, 1.0, tflops=445.05),
            {"variant": "decoder_naive", "failed": True, "exit": 1, "log": "x"}]
    c = tt.checks(rows, cpu_peak=None)
    assert c["vs_naive"] == pytest.approx(2.0)  # the smaller of 9 (MiniLM) and 2 (BERT-base); the decoder's failed
    assert c["zero2_over_bf16"] == pytest.approx(0.85)  # min(450/500, 170/200)
    assert c["mfu_0p5b"] == pytest.approx(445.05 / 989.0)  # H100 SXM dense bf16
    d = c["detail"]
    assert d["vs_naive"]["missing_shapes"] == ["decoder"] and d["vs_naive"]["met"] is False
    assert d["vs_naive"]["history_events_by_shape"] == {"minilm": pytest.approx(10.0), "bert": pytest.approx(10.0)}
    assert d["zero2_over_bf16"]["met"] is True and d["mfu_0p5b"]["met"] is True
    # a figure that meets its target on the shapes measured so far is not yet met
    part = tt.checks(rows[:2], cpu_peak=None)
    assert part["vs_naive"] == pytest.approx(9.0) and part["detail"]["vs_naive"]["met"] is None
    assert "| vs_naive | 2 | >= 3 | NO | minilm 9, bert 2 | decoder |" in tt.checks_table(c)
    empty = tt.checks([], cpu_peak=1e12)
    assert (empty["vs_naive"], empty["zero2_over_bf16"], empty["mfu_0p5b"]) == (None, None, None)
    assert empty["detail"]["mfu_0p5b"]["met"] is None


def test_cpu_rows_take_the_measured_matmul_rate_as_peak(tt):
    r = _row("decoder_native", "decoder-0.5b", 1.0, 1.0, tflops=0.05, device="CPU")
    assert tt.checks([r], cpu_peak=1e11)["mfu_0p5b"] == pytest.approx(0.5)


def test_gpu_preset_runs_what_the_checks_need_first(tt):
    vs, meta = tt.presets("gpu")
    names = [v.name for v in vs]
    assert names[: len(tt.GPU_CHECK_ORDER)] == list(tt.GPU_CHECK_ORDER)
    assert len(names) == len(set(names)) == 17 and meta["precision"] == "bf16"
    for s in ("minilm", "bert", "decoder"):  # every shape has its four launches
        assert {f"{s}_native", f"{s}_zero2", f"{s}_zero3", f"{s}_naive"} <= set(names)
    naive = next(v for v in vs if v.name == "decoder_naive")
    assert naive.path == "naive" and "--naive-examples" in naive.args


def test_budget_skips_what_cannot_fit_and_writes_after_every_variant(tt, tmp_path, monkeypatch):
    import json

    clock = [1000.0]
    monkeypatch.setattr(tt.time, "time", lambda: clock[0])
    monkeypatch.setattr(tt, "prepare_data", lambda work, syn: tmp_path / "prep")
    monkeypatch.setattr(tt, "paper_model", lambda d: {})
    monkeypatch.setattr(tt, "matmul_peak", lambda: 1e12)
    monkeypatch.setattr(tt, "tables", lambda *a: "")
    out = tmp_path / "r.json"
    seen = []

    def fake_run(v, a, gpu, precision, timeout=None):
        if seen:  # the previous variant's row is on disk before the next starts
            assert [r["variant"] for r in json.loads(out.read_text())["results"]] == seen
        seen.append(v.name)
        clock[0] += 100.0  # every variant takes 100 s
        return _row(v.name, v.shape, 1.0, 1.0, device="CPU") | {"timeout": timeout}

    monkeypatch.setattr(tt, "run_variant", fake_run)
    assert tt.main(["--preset", "cpu", "--work", str(tmp_path), "--out", str(out), "--budget-s", "350"]) == 0
    doc = json.loads(out.read_text())
    # 0 s, 100 s and 200 s into the budget a variant starts; at 300 s 50 s are left, under the 100 s one took
    assert [r["variant"] for r in doc["results"]] == seen and len(seen) == 3
    assert [r["timeout"] for r in doc["results"]] == [350.0, 250.0, 150.0]
    assert doc["skipped"] == [v.name for v in tt.presets("cpu")[0][3:]]
    assert doc["checks"]["detail"]["vs_naive"]["by_shape"] == {"minilm": 1.0}


def test_a_variant_past_its_timeout_is_killed_with_its_children(tt, tmp_path):
    import sys as _sys
    import time

    marker = tmp_path / "child.pid"
    # a parent that starts a child and both sleep: the timeout must kill the child too (accelerate's workers)
    code = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(marker)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    t0 = time.time()
    rc, out, err = tt._run_group([_sys.executable, "-c", code], dict(__import__("os").environ), timeout=3)
    assert rc is None and "killed after 3s" in err and time.time() - t0 < 30
    child = int(marker.read_text())
    status = Path(f"/proc/{child}/status")
    for _ in range(50):  # the child is gone, or a zombie waiting for init to reap it, shortly after the kill
        if not status.exists() or "\nState:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"child {child} outlived the timeout")
