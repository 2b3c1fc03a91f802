"""The multi-node launch file run as 2 "nodes" on this machine (issue 34 item 6): two `accelerate launch --config_file
launch/accelerate/multinode_zero3.yaml --num_machines 2 --machine_rank R --main_process_ip 127.0.0.1 ...` processes,
one per node as launch/slurm/train.sh starts them, rendezvous on localhost. DeepSpeed ZeRO-3 in bf16 (the file's
precision), one worker per node. tests/train_probe.py records each worker's launcher variables and dtypes.
Run alone it takes ~1 min on 2 cores; a wrong machine_rank (both nodes 0, accelerate #2816) hangs at the rendezvous
until the timeout below."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_prepared import write_prepared, write_tiny_text_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "tests" / "train_probe.py"
STEPS = 4
TIMEOUT_S = 600
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode_assets")
    return {"prep": write_prepared(root / "prepared"), "bert": write_tiny_text_model(root / "bert")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_zero3_rendezvous_and_one_export(assets, tmp_path):
    port = free_port()
    probe_dir = tmp_path / "probe"
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", LMREC_PROBE_DIR=str(probe_dir))
    env.pop("ACCELERATE_USE_CPU", None)
    train_args = [f"data={assets['prep']}", f"output_dir={tmp_path}", "run_name=mn", f"model.text_model_path={assets['bert']}",
                  "model.item_tower=hybrid", "model.d_model=32", "model.max_len=20", "model.dropout=0.1", "batch_size=8",
                  "eval_batch_size=8", "tracker=none", f"max_steps={STEPS}", f"save_every={STEPS}", "eval_every=0",
                  "optim.warmup_steps=2", "optim.lr=3e-3", "early_stopping_patience=0", "evaluate_test=false"]
    procs, logs = [], []
    for node in (0, 1):
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch",
               "--config_file", str(ROOT / "launch" / "accelerate" / "multinode_zero3.yaml"),
               "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(node),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(PROBE), *train_args]
        logs.append(tmp_path / f"node{node}.log")
        with open(logs[-1], "w") as f:  # a file, not a pipe: neither launcher can block on a full pipe
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:  # each launcher leads its own session: end it with its torchrun workers
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    text = [f.read_text() for f in logs]
    assert codes == [0, 0], f"exit codes {codes}\n--- node 0\n{text[0][-4000:]}\n--- node 1\n{text[1][-4000:]}"

    # ---- the rendezvous: one world of 2, each node its own rank, one worker per node
    assert "world size 2 | distributed DEEPSPEED | precision bf16 | ZeRO stage 3" in text[0], text[0][-3000:]
    probes = {int(f.stem[4:]): json.loads(f.read_text()) for f in probe_dir.glob("rank*.json")}
    assert sorted(probes) == [0, 1], probes
    for rank, p in probes.items():
        assert p["env"] == {"RANK": str(rank), "LOCAL_RANK": "0", "GROUP_RANK": str(rank), "WORLD_SIZE": "2",
                            "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}, (rank, p["env"])
        # both ranks trained every step, in the file's precision
        assert p["train_forwards"] == STEPS and p["weight_dtypes"] == ["bfloat16"] and p["output_dtypes"] == ["bfloat16"], (rank, p)

    # ---- both ranks' work in the run: ZeRO-3 shards of each rank in the checkpoint, every batch counted
    run_dir = tmp_path / "mn"
    rec = json.loads((run_dir / f"step_{STEPS}" / "COMPLETE").read_text())
    assert rec["world_size"] == 2
    # each rank's partition of the parameters and of DeepSpeed's bf16 optimizer (fp32 master weights)
    assert {f"pytorch_model/{kind}_pp_rank_{r}_mp_rank_00_{what}_states.pt" for r in (0, 1)
            for kind, what in (("zero", "model"), ("bf16_zero", "optim"))} <= set(rec["files"]), sorted(rec["files"])
    assert {f"random_states_{r}.pkl" for r in (0, 1)} <= set(rec["files"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and metrics["examples_seen"] == STEPS * 8 * 2, metrics

    # ---- one export, by rank 0 only, whole and loadable
    from train.export import load_final

    assert sorted(p.name for p in run_dir.iterdir() if "final" in p.name) == ["final"]
    assert "[train] exported" in text[0] and "[train] exported" not in text[1]
    model, info = load_final(run_dir / "final")
    assert info["metrics"]["valid"]["n"] == 50 and model.item_emb.weight.shape == (41, 32)
