"""Mixed precision through the launch files users use (issue 34 item 4): fp16 on CPU (cpu_1proc.yaml
--mixed_precision fp16) and bf16 under DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU processes (cpu_ds_zero{2,3}.yaml
--mixed_precision bf16, as their headers say). Each run must really compute in that precision, read inside the
processes by tests/train_probe.py (dtypes of the user tower's Linear weights and outputs in training forwards),
and finish with finite losses and an export; an fp16 run stopped and resumed (loss scaler in the checkpoint) repeats
the uninterrupted one exactly. Multi-node ZeRO-3 in bf16 (multinode_zero3.yaml): test_train_multinode.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_prepared import write_prepared, write_tiny_text_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "tests" / "train_probe.py"
STEPS = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision_assets")
    return {"prep": write_prepared(root / "prepared"), "bert": write_tiny_text_model(root / "bert")}


def launch_probe(launch_args: list[str], assets, out: Path, run_name: str) -> tuple[str, dict[int, dict]]:
    """accelerate launch <launch_args> tests/train_probe.py (= -m train with probes); returns the log and each rank's probe."""
    probe_dir = out / f"probe-{run_name}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", LMREC_PROBE_DIR=str(probe_dir))
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", *launch_args, str(PROBE),
           f"data={assets['prep']}", f"output_dir={out}", f"run_name={run_name}", f"model.text_model_path={assets['bert']}",
           "model.item_tower=hybrid", "model.d_model=32", "model.max_len=20", "model.dropout=0.1", "batch_size=8",
           "eval_batch_size=8", "tracker=none", f"max_steps={STEPS}", f"save_every={STEPS}", "eval_every=2",
           "optim.warmup_steps=2", "optim.lr=3e-3", "log_every=1", "early_stopping_patience=0", "evaluate_test=false"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = p.stdout + p.stderr
    assert p.returncode == 0, f"exit {p.returncode}\n{log[-6000:]}"
    probes = {int(f.stem[4:]): json.loads(f.read_text()) for f in probe_dir.glob("rank*.json")}
    return log, probes


def check_finished(run_dir: Path) -> None:
    """Every step logged with a finite loss, and final/ exported (float32 weights, loadable)."""
    from train.export import load_final

    losses = [json.loads(x) for x in (run_dir / "losses.jsonl").read_text().splitlines()]
    assert [x["step"] for x in losses] == list(range(1, STEPS + 1))
    assert all(math.isfinite(x["loss"]) for x in losses), losses
    w = load_file(str(run_dir / "final" / "model.safetensors"))
    w.update(load_file(str(run_dir / "final" / "item_tower" / "model.safetensors")))  # the encoder's weights (hybrid)
    assert {v.dtype for v in w.values() if v.is_floating_point()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())
    _, info = load_final(run_dir / "final")
    assert info["metrics"]["steps"] == STEPS and info["metrics"]["valid"]["n"] == 50


@pytest.mark.slow
def test_fp16_cpu_one_process(assets, tmp_path):
    """fp16 autocast (float32 weights, float16 matmul outputs) with a loss scaler (scaler.pt in the checkpoint)."""
    log, probes = launch_probe(["--config_file", str(ROOT / "launch/accelerate/cpu_1proc.yaml"), "--mixed_precision", "fp16"],
                               assets, tmp_path, "fp16")
    assert "world size 1 | distributed NO | precision fp16 | ZeRO stage 0 | device cpu" in log, log[-3000:]
    assert list(probes) == [0], probes
    p = probes[0]
    assert p["train_forwards"] == STEPS and p["weight_dtypes"] == ["float32"] and p["output_dtypes"] == ["float16"], p
    assert (tmp_path / "fp16" / f"step_{STEPS}" / "scaler.pt").is_file()
    check_finished(tmp_path / "fp16")


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_bf16_deepspeed_two_processes(assets, tmp_path, zero):
    """DeepSpeed bf16: bf16 weights (fp32 master copy in the optimizer) and bf16 outputs on both ranks."""
    log, probes = launch_probe(["--config_file", str(ROOT / f"launch/accelerate/cpu_ds_zero{zero}.yaml"), "--mixed_precision",
                                "bf16"], assets, tmp_path, f"bf16z{zero}")
    assert f"world size 2 | distributed DEEPSPEED | precision bf16 | ZeRO stage {zero}" in log, log[-3000:]
    assert sorted(probes) == [0, 1], probes
    for rank, p in probes.items():
        assert p["train_forwards"] == STEPS and p["weight_dtypes"] == ["bfloat16"] and p["output_dtypes"] == ["bfloat16"], (rank, p)
    check_finished(tmp_path / f"bf16z{zero}")


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_fp16_cpu_resume_is_exact(assets, tmp_path, monkeypatch):
    """In-process (run(cfg) reads the precision from the launcher's environment): stopped after step 2 and resumed,
    the fp16 run repeats the uninterrupted one bit for bit; the scaler's state travels in scaler.pt."""
    from conftest import reset_accelerate
    from lmrec_common.config import load_config
    from train.config import TrainConfig
    from train.loop import EXIT_REQUEUE, run

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")

    def cfg(name, *over):
        return load_config(TrainConfig, None, [
            f"data={assets['prep']}", f"output_dir={tmp_path}", f"run_name={name}", f"model.text_model_path={assets['bert']}",
            "model.d_model=32", "model.max_len=20", "model.dropout=0.1", "batch_size=8", "tracker=none", f"max_steps={STEPS}",
            "optim.warmup_steps=2", "eval_every=0", "save_every=0", "early_stopping_patience=0", "evaluate_test=false", *over])

    assert run(cfg("straight")) == 0
    reset_accelerate()
    assert run(cfg("stopped", "stop_after_steps=2")) == EXIT_REQUEUE
    scaler = torch.load(tmp_path / "stopped" / "step_2" / "scaler.pt", weights_only=True)
    assert scaler["scale"] > 1, scaler  # loss scaling on (65536 at the start, halved on each overflow)
    reset_accelerate()
    assert run(cfg("stopped")) == 0
    losses = {n: [json.loads(x)["loss"] for x in (tmp_path / n / "losses.jsonl").read_text().splitlines()]
              for n in ("straight", "stopped")}
    assert len(losses["straight"]) == STEPS and losses["straight"] == losses["stopped"], losses
