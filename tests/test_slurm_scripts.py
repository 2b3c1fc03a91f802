"""launch/ files without a cluster: sbatch scripts parse, carry the header and the safety options,
fail fast on bad arguments; accelerate configs load and reference existing DeepSpeed JSONs.
(The scripts are run for real on a local SLURM in tests/test_slurm.py.)"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SLURM = ROOT / "launch" / "slurm"
JOBS = ["data_prep.sh", "data_prep_spark.sh", "train.sh", "gate.sh", "inference.sh", "check.sh"]


def test_scripts_parse_and_have_headers():
    checked = 0
    for p in sorted(SLURM.glob("*.sh")):
        r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, f"{p.name}: {r.stderr}"
        checked += 1
    assert checked == 8
    for name in JOBS:
        text = (SLURM / name).read_text()
        head = text.split("#SBATCH", 1)[0]
        assert "Nodes x GPUs" in head and "Expected time" in head and "sbatch " in head, f"{name}: header incomplete"
        assert "--kill-on-bad-exit=1" in text, name
        assert "--open-mode=append" in text and "--requeue" in text, name
        assert "_common.sh" in text, name
    common = (SLURM / "_common.sh").read_text()
    assert "set -euo pipefail" in common and "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in common
    train = (SLURM / "train.sh").read_text()
    assert re.search(r"#SBATCH --signal=USR1@\d+", train)
    # per-node values must be expanded on each node, not once in the batch shell (accelerate #2816)
    assert r"--machine_rank \$SLURM_NODEID" in train and r"--machine_rank \$SLURM_NODEID" in (SLURM / "inference.sh").read_text()
    assert 'bash -c "exec accelerate launch' in train
    assert 'scontrol requeue "$SLURM_JOB_ID"' in train


def _run(script: str, *args: str, env_extra: dict | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"LMREC_ROOT": str(ROOT), **(env_extra or {})})
    return subprocess.run(["bash", str(SLURM / script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", JOBS)
def test_missing_config_fails_fast(script):
    r = _run(script, "configs/nope.yaml")
    assert r.returncode == 2 and "config file" in r.stderr


def test_inference_needs_run_date_and_chain_validates_date():
    r = _run("inference.sh", "configs/inference/ci.yaml")
    assert r.returncode == 2 and "run_date" in r.stderr
    r = _run("gate.sh", "configs/inference/ci.yaml", "model_dir=x")
    assert r.returncode == 2 and "gate.candidate" in r.stderr
    r = subprocess.run(["bash", str(SLURM / "nightly_chain.sh"), "27-11-2026"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "YYYY-MM-DD" in r.stderr
    for env, words in (({"EVENTS_LAG_DAYS": "one"}, "EVENTS_LAG_DAYS must be a number"),
                       ({"EVENTS_THROUGH": "2026-11-2"}, "EVENTS_THROUGH must be YYYY-MM-DD"),
                       ({"EVENTS_LAG_DAYS": "1", "ON_INCOMPLETE": "skip"}, "ON_INCOMPLETE must be keep_previous or error")):
        r = subprocess.run(["bash", str(SLURM / "nightly_chain.sh"), "2026-11-27"], cwd=ROOT, env={**os.environ, **env},
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and words in r.stderr, (env, r.stderr)  # refused before anything is submitted


def test_accelerate_configs_load_and_reference_existing_json():
    from accelerate.commands.config.config_args import load_config_from_file

    expect = {"gpu_1.yaml": ("NO", 1), "gpu_8_zero2.yaml": ("DEEPSPEED", 8), "multinode_zero3.yaml": ("DEEPSPEED", 16)}
    for name, (kind, procs) in expect.items():
        path = ROOT / "launch" / "accelerate" / name
        cfg = load_config_from_file(str(path))
        assert str(cfg.distributed_type).endswith(kind) and cfg.num_processes == procs, name
        raw = yaml.safe_load(path.read_text())
        ds = (raw.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if ds:
            assert (ROOT / ds).is_file(), f"{name} references missing {ds}"


def test_deepspeed_launch_files_set_precision_in_the_json():
    """Accelerate refuses a `mixed_precision` key in a launch file that names a deepspeed_config_file (ValueError
    "... will be ignored" when the Accelerator starts: gpu_8_zero2.yaml and multinode_zero3.yaml failed so before
    issue 34). The GPU files take bf16 from their *_bf16.json, which differ from zero2/zero3.json only there."""
    import json

    checked = 0
    for path in sorted((ROOT / "launch" / "accelerate").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        ds = (raw.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if not ds:
            continue
        checked += 1
        assert "mixed_precision" not in raw, f"{path.name}: mixed_precision next to {ds} (accelerate refuses it)"
        bf16 = json.loads((ROOT / ds).read_text())["bf16"]["enabled"]
        assert bf16 == (True if path.name.startswith(("gpu_", "multinode_")) else "auto"), (path.name, ds, bf16)
    assert checked == 4
    for stage in (2, 3):
        base = json.loads((ROOT / f"launch/deepspeed/zero{stage}.json").read_text())
        bf16 = json.loads((ROOT / f"launch/deepspeed/zero{stage}_bf16.json").read_text())
        assert bf16.pop("bf16") == {"enabled": True} and bf16.pop("fp16") == {"enabled": False}
        assert {k: v for k, v in base.items() if k not in ("bf16", "fp16")} == bf16, stage
