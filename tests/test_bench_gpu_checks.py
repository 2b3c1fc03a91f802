"""bench/gpu_checks.py: the runs a grid trains side by side (variants x arms x seeds) and their names."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_checks  # noqa: E402


def _args(**kw):
    return argparse.Namespace(**{"seed": 0, "seeds": "", "arms": [], **kw})


def test_pair_mode_keeps_variant_names():
    jobs = gpu_checks.make_jobs(_args(seed=3), ["lora", "hybrid"])
    assert [(j["label"], j["seed"], j["overrides"]) for j in jobs] == [("lora", 3, []), ("hybrid", 3, [])]


def test_grid_of_arms_and_seeds():
    jobs = gpu_checks.make_jobs(_args(seeds="0,2", arms=["L4", "L6d128=model.n_layers=6;model.d_model=128"]), ["hybrid"])
    assert [j["label"] for j in jobs] == ["hybrid_L4_s0", "hybrid_L4_s2", "hybrid_L6d128_s0", "hybrid_L6d128_s2"]
    assert jobs[0]["overrides"] == [] and jobs[0]["arm"] == "L4"
    assert jobs[3]["overrides"] == ["model.n_layers=6", "model.d_model=128"] and jobs[3]["seed"] == 2
    # one arm over several seeds is a grid too: each run needs its own name
    assert [j["label"] for j in gpu_checks.make_jobs(_args(seeds="0,1"), ["hybrid"])] == ["hybrid_s0", "hybrid_s1"]


def test_valid_curve_from_a_training_log():
    log = ("  hybrid_s0 | [valid] most_popular | HR@10 0.0427 | NDCG@10 0.0206 | users 6040\n"
           "  hybrid_s0 | step 00250/05500 | epoch 5 | loss 6.1948 | lr 9.98e-04 | 952.88 ex/s\n"
           "  hybrid_s0 | [valid] step 00250 | HR@10 0.1841 | HR@50 0.4286 | NDCG@10 0.0979 | MRR 0.0867 | users 6040 | best\n"
           "  hybrid_s0 | [valid] step 00500 | HR@10 0.2470 | HR@50 0.5152 | NDCG@10 0.1352 | MRR 0.1167 | users 6040\n"
           "  hybrid_s0 | [valid] final model (step 00500) | HR@10 0.2470 | NDCG@10 0.1352\n")
    assert gpu_checks.valid_curve(log) == [(250, 0.0979), (500, 0.1352)]


def test_card_names_of_the_results_file():
    assert gpu_checks.card_name("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_checks.card_name("NVIDIA H200") == "h200"
    assert gpu_checks.card_name("NVIDIA GeForce RTX 4090") == "nvidia_geforce_rtx_4090"


def test_throughput_part_runs_the_gpu_preset_in_the_budget_left_and_reports_its_checks(tmp_path, monkeypatch):
    import json

    calls = []

    def fake_sh(cmd, logfile, timeout, env=None):
        calls.append((cmd, timeout))
        out = Path(cmd[cmd.index("--out") + 1])
        rows = [{"variant": "minilm_native", "useful_tok_s": 900.0, "events_s": 90.0, "model_tflops_s": 1.0,
                 "device": "NVIDIA H100 80GB HBM3"},
                {"variant": "minilm_naive", "useful_tok_s": 100.0, "events_s": 9.0, "model_tflops_s": 1.0,
                 "device": "NVIDIA H100 80GB HBM3"},
                {"variant": "decoder_native", "failed": True, "exit": 1, "log": "x"}]
        import train_throughput as tt

        out.write_text(json.dumps({"checks": tt.checks(rows, None), "results": rows, "skipped": ["bert_zero3"]}))
        return 0

    monkeypatch.setattr(gpu_checks, "sh", fake_sh)
    monkeypatch.setattr(gpu_checks, "T0", gpu_checks.time.time())
    results, summary = {}, []
    gpu_checks.run_throughput_checks(argparse.Namespace(budget_s=600), tmp_path, tmp_path / "w", tmp_path, results,
                                     summary, "NVIDIA H100 80GB HBM3")
    (cmd, timeout), = calls
    assert cmd[cmd.index("--preset") + 1] == "gpu" and cmd[cmd.index("--out") + 1].endswith("train_throughput_gpu_h100.json")
    assert 560 < timeout <= 580 and float(cmd[cmd.index("--budget-s") + 1]) == round(timeout - 10)
    assert results["throughput"]["checks"]["vs_naive"] == 9.0 and results["throughput"]["checks"]["mfu_0p5b"] is None
    text = "\n".join(summary)
    assert "| vs_naive | 9 | >= 3 | not yet (shapes missing) | minilm 9 | bert, decoder |" in text and "failed: decoder_native" in text and "bert_zero3" in text
    # too little left: nothing starts, and the results say why
    monkeypatch.setattr(gpu_checks, "T0", gpu_checks.time.time() - 550)
    results = {}
    gpu_checks.run_throughput_checks(argparse.Namespace(budget_s=600), tmp_path, tmp_path / "w", tmp_path, results, [], "x")
    assert "skipped" in results["throughput"] and len(calls) == 1
