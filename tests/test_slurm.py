"""The real sbatch scripts of launch/slurm/ on a real single-node SLURM (scripts/slurm_local.sh start).

    bash scripts/slurm_local.sh start && . /tmp/lmrec-slurm/env.sh && python -m pytest tests/test_slurm.py -q

1. the nightly chain (data_prep -> fine-tune -> inference, job dependencies, 2 CPU processes per
   step through launch/accelerate/cpu_ddp_2proc.yaml) runs end to end and the table appears; a
   second night warm-starts its fine-tune from the first night's final/ (PREV_FINAL); a third night's fine-tune fails
   and the serving model writes its table; a fourth night's log has not landed: its table comes from the night
   before's data and the check job fails;
2. a running training job is pre-empted twice -- a graceful USR1 (what `#SBATCH --signal` sends
   before the time limit: save, `scontrol requeue`, exit) and an admin `scontrol requeue` (SIGTERM)
   -- and each time the requeued job resumes from its last checkpoint and finally completes.
Skipped when sbatch is missing or no cluster answers. Total ~2-3 min on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATE = "2026-11-27"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _env() -> dict:
    env = dict(os.environ)
    if "SLURM_CONF" not in env:
        conf = Path(os.environ.get("LMREC_SLURM_DIR", "/tmp/lmrec-slurm")) / "slurm.conf"
        if conf.is_file():
            env["SLURM_CONF"] = str(conf)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cluster_up() -> bool:
    if not shutil.which("sbatch"):
        return False
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%t"], env=_env(), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0 and any(s.startswith(("idle", "mix", "alloc")) for s in r.stdout.split())


pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(not _cluster_up(), reason="no local SLURM (bash scripts/slurm_local.sh start)")]


def _job_state(jid: str) -> tuple[str, int]:
    r = subprocess.run(["scontrol", "show", "job", "-o", jid], env=_env(), capture_output=True, text=True, timeout=10)
    m = re.search(r"JobState=(\S+)", r.stdout)
    restarts = re.search(r"Restarts=(\d+)", r.stdout)
    return (m.group(1) if m else "UNKNOWN"), int(restarts.group(1)) if restarts else 0


def _wait(jid: str, timeout: float, log: Path | None = None) -> str:
    t0 = time.time()
    while time.time() - t0 < timeout:
        state, _ = _job_state(jid)
        if state in TERMINAL:
            return state
        time.sleep(1)
    subprocess.run(["scancel", jid], env=_env(), timeout=10)
    pytest.fail(f"job {jid} not finished after {timeout} s (state {state}); log:\n{log.read_text()[-3000:] if log and log.is_file() else ''}")


def _logs(d: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(d.glob("*.out")))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Synthetic raw logs (200 users, 120 items) + a tiny BERT item tower, on the shared filesystem."""
    from data_prep.synthetic import SyntheticConfig, generate
    from fixtures_prepared import write_tiny_text_model

    d = tmp_path_factory.mktemp("slurm")
    generate(d / "raw", SyntheticConfig(n_users=200, n_items=120, n_events=4000, n_topics=6, n_days=10))
    write_tiny_text_model(d / "tiny")
    return d


def _chain(raw: Path, raw_dir: str, date: str, extra: dict | None = None,
           expect: dict | None = None) -> tuple[dict, Path, Path]:
    """Submit launch/slurm/nightly_chain.sh for ``date`` on ``raw/<raw_dir>`` and wait for its last job; every job ends
    COMPLETED unless ``expect`` names another state for its step."""
    t, logs = raw / "chain", raw / "chain" / f"logs-{date}"
    logs.mkdir(parents=True, exist_ok=True)
    sb = f"-c 2 -o {logs}/%x-%j.out"
    env = _env() | {
        "PREP_CONFIG": "configs/data_prep/sample.yaml",
        "PREP_ARGS": f"events_path={raw}/{raw_dir}/events items_path={raw}/{raw_dir}/items output_dir={t}/prepared num_shards=2",
        "FINETUNE": "1", "TRAIN_CONFIG": "configs/train/ci_slurm.yaml",
        "TRAIN_ARGS": f"data={t}/prepared model.text_model_path={raw}/tiny", "CKPT_ROOT": f"{t}/ckpt",
        "INFER_CONFIG": "configs/inference/ci.yaml", "INFER_ARGS": f"prepared_dir={t}/prepared output_dir={t}/recs",
        "TRAIN_ACCEL": "launch/accelerate/cpu_ddp_2proc.yaml", "INFER_ACCEL": "launch/accelerate/cpu_ddp_2proc.yaml",
        "PROCS_PER_NODE": "2", "PREP_SBATCH": sb, "TRAIN_SBATCH": sb, "GATE_SBATCH": sb, "INFER_SBATCH": sb, "CHECK_SBATCH": sb, **(extra or {}),
    }
    r = subprocess.run(["bash", "launch/slurm/nightly_chain.sh", date], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    jobs = dict(kv.split("=") for kv in r.stdout.strip().splitlines()[-1].split()[1:])
    _wait(jobs["check"], 400)
    for step in ("prep", "train", "gate", "infer", "check"):
        if jobs.get(step, "none") == "none":
            continue
        assert _job_state(jobs[step])[0] == (expect or {}).get(step, "COMPLETED"), f"{step} job {jobs[step]}: {_job_state(jobs[step])}\n{_logs(logs)}"
    return jobs, t, logs


def test_nightly_chain_end_to_end(raw):
    """Night 1 with the promotion gate (GATE=1): no model serves yet, the fine-tune beats most-popular, so the gate
    creates the serving link and the table is written by tonight's model through it."""
    jobs, t, logs = _chain(raw, "raw", DATE, {"GATE": "1"})
    table = t / "recs" / f"dt={DATE}"
    assert (table / "_SUCCESS").is_file(), _logs(logs)
    man = json.loads((table / "_manifest.json").read_text())
    assert man["world_size"] == 2 and len(man["parts"]) == 2
    assert man["counts"]["users_scored"] == 200 and man["counts"]["rows"] == 200 * man["k"]
    final = (t / "ckpt" / f"nightly-{DATE}" / "final").resolve()
    assert man["model"]["path"] == str(final)
    gate = json.loads((final.parent / "gate.json").read_text())
    assert gate["decision"] == "promoted" and gate["serving_before"] is None, gate
    assert os.path.realpath(t / "ckpt" / "serving") == str(final)
    text = _logs(logs)
    assert "[data_prep] published" in text and "[train] exported" in text and "[inference] published" in text
    assert "[gate] PROMOTED" in text
    check = json.loads((t / "recs" / "_checks" / f"dt={DATE}.json").read_text())  # the chain's last job
    assert check["ok"] and check["counts"]["users"] == 200 and check["run_folder"] == str(table.resolve())


def test_second_night_warm_starts_from_last_nights_model(raw):
    """Night 2: new events and 20 new catalogue items; the fine-tune starts from night 1's final/
    (items mapped by item_id) and the table of night 2 is published next to night 1's."""
    from data_prep.synthetic import SyntheticConfig, generate

    prev = raw / "chain" / "ckpt" / f"nightly-{DATE}" / "final"
    if not (prev / "export.json").is_file():
        pytest.skip("night 1 (test_nightly_chain_end_to_end) did not produce a model")
    generate(raw / "raw2", SyntheticConfig(n_users=220, n_items=140, n_events=4500, n_topics=6, n_days=11, seed=1))
    date2 = "2026-11-28"
    serving = raw / "chain" / "ckpt" / "serving"
    prom = raw / "chain" / "textfile" / "lmrec_nightly.prom"
    prom.parent.mkdir(exist_ok=True)
    jobs, t, logs = _chain(raw, "raw2", date2, {"PREV_FINAL": str(serving), "GATE": "1", "CHECK_METRICS_FILE": str(prom),
                                                "CHECK_ARGS": "check.previous_max_age_days=2"})
    text = "\n".join(p.read_text(errors="replace") for p in logs.glob("lmrec-train-*.out"))
    assert f"[train] warm start from {prev.resolve()}" in text and "items carried over 120 | new 20" in text, text[-3000:]
    man = json.loads((t / "recs" / f"dt={date2}" / "_manifest.json").read_text())
    # the gate compared night 2's model with night 1's on night 2's data; the table comes from the one it chose
    final2 = (t / "ckpt" / f"nightly-{date2}" / "final").resolve()
    gate = json.loads((final2.parent / "gate.json").read_text())
    assert gate["serving_before"] == str(prev.resolve()) and gate["incumbent"]["path"] == str(prev.resolve()), gate
    chosen = final2 if gate["decision"] == "promoted" else prev.resolve()
    assert gate["decision"] in ("promoted", "kept_incumbent") and gate["serving_after"] == str(chosen)
    assert os.path.realpath(serving) == str(chosen) and man["model"]["path"] == str(chosen)
    assert man["counts"]["users_scored"] == 220 and man["catalogue"]["items"] == 140
    assert (t / "recs" / f"dt={DATE}" / "_SUCCESS").is_file()  # last night's table untouched
    # the check compared the table with night 1's and wrote its verdict as Prometheus gauges (CHECK_METRICS_FILE)
    check = json.loads((t / "recs" / "_checks" / f"dt={date2}.json").read_text())
    assert check["ok"] and check["previous"]["run_date"] == DATE and check["previous"]["compared"], check.get("problems")
    lines = prom.read_text().splitlines()
    assert f'lmrec_check_ok{{table="{t}/recs"}} 1' in lines and any(ln.startswith("lmrec_table_top10_overlap{") for ln in lines)


def test_a_night_whose_fine_tune_fails_still_publishes_its_table(raw):
    """Night 3: the fine-tune fails (the text model it names is gone). The gate still runs once training has ended, finds no
    candidate, keeps the serving model, and tonight's table is written by it from tonight's data."""
    serving = raw / "chain" / "ckpt" / "serving"
    if not (serving / "export.json").is_file():
        pytest.skip("no serving model from the nights before")
    before = os.path.realpath(serving)
    date3 = "2026-11-29"
    t = raw / "chain"
    jobs, t, logs = _chain(raw, "raw2", date3, {"GATE": "1",
                                                "TRAIN_ARGS": f"data={t}/prepared model.text_model_path={raw}/gone"},
                           expect={"train": "FAILED"})
    gate = json.loads((t / "ckpt" / f"nightly-{date3}" / "gate.json").read_text())
    assert gate["decision"] == "kept_incumbent" and "cannot be judged" in gate["reasons"][0], gate
    assert os.path.realpath(serving) == before
    man = json.loads((t / "recs" / f"dt={date3}" / "_manifest.json").read_text())
    assert man["model"]["path"] == before and man["counts"]["users_scored"] == 220
    assert "[gate] WARNING: the candidate cannot be judged" in _logs(logs)


def test_a_night_whose_log_has_not_landed_is_made_from_last_nights_data_and_the_check_fails(raw):
    """Night 4: tonight's log should reach the day after the last one in raw2 (EVENTS_THROUGH), but nothing new has
    landed. data_prep publishes no version and keeps the previous one (on_incomplete=keep_previous, the chain's
    default), the serving model writes tonight's table from it, and the check job FAILS naming the missing day."""
    serving = raw / "chain" / "ckpt" / "serving"
    if not (serving / "export.json").is_file():
        pytest.skip("no serving model from the nights before")
    t = raw / "chain"
    latest = (t / "prepared" / "LATEST").read_text().strip()
    date4 = "2026-11-30"
    jobs, t, logs = _chain(raw, "raw2", date4, {"FINETUNE": "0", "MODEL_DIR": str(serving), "EVENTS_THROUGH": "2026-10-12"},
                           expect={"check": "FAILED"})
    assert (t / "prepared" / "LATEST").read_text().strip() == latest
    text = _logs(logs)
    assert "WARNING: the newest usable event is on 2026-10-11" in text and "expect_events_through=2026-10-12" in text, text[-3000:]
    man = json.loads((t / "recs" / f"dt={date4}" / "_manifest.json").read_text())
    assert man["data"]["version"] == latest and man["counts"]["users_scored"] == 220  # a whole table, from last night's data
    check = json.loads((t / "recs" / "_checks" / f"dt={date4}.json").read_text())
    assert [p["check"] for p in check["problems"]] == ["fresh"] and "before 2026-10-12" in check["problems"][0]["what"], check


def test_preempted_training_resumes_from_checkpoint(raw):
    from data_prep.config import DataPrepConfig
    from data_prep.pipeline import run as prep_run
    from lmrec_common.config import load_config

    t = raw / "preempt"
    (t / "logs").mkdir(parents=True)
    prep_run(load_config(DataPrepConfig, ROOT / "configs/data_prep/sample.yaml",
                         [f"events_path={raw}/raw/events", f"items_path={raw}/raw/items", f"output_dir={t}/prepared",
                          "num_shards=2", "num_proc=1"]))
    run_dir = t / "ckpt" / "pre"
    log = t / "logs" / "train.out"
    env = _env() | {"ACCEL_CONFIG": "launch/accelerate/cpu_ddp_2proc.yaml", "PROCS_PER_NODE": "2"}
    r = subprocess.run(["sbatch", "--parsable", "-c", "2", "-o", str(log), "launch/slurm/train.sh", "configs/train/ci_slurm.yaml",
                        f"data={t}/prepared", f"output_dir={t}/ckpt", "run_name=pre", f"model.text_model_path={raw}/tiny",
                        "max_steps=600", "save_every=10", "log_every=100"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    jid = r.stdout.strip().split(";")[0]

    def wait_ckpt_after(step: int, timeout: float = 240) -> int:
        t0 = time.time()
        while time.time() - t0 < timeout:
            done = [int(p.parent.name.split("_")[1]) for p in run_dir.glob("step_*/COMPLETE")]
            if done and max(done) > step and _job_state(jid)[0] == "RUNNING":
                return max(done)
            assert _job_state(jid)[0] not in TERMINAL, f"job ended before the pre-emption drill:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        pytest.fail(f"no checkpoint after step {step} within {timeout} s:\n{log.read_text()[-3000:] if log.is_file() else ''}")

    # 1) graceful: USR1 to the job steps (what --signal=USR1@120 sends before the time limit)
    first = wait_ckpt_after(0)
    subprocess.run(["scancel", "-s", "USR1", jid], env=_env(), check=True, timeout=10)
    # 2) admin: a hard `scontrol requeue` of the restarted job once it has resumed and saved again
    t0 = time.time()
    resumed: list[int] = []
    while time.time() - t0 < 240 and not resumed:
        resumed = [int(s) for s in re.findall(r"\[train\] resumed from \S+ \(step (\d+)", log.read_text() if log.is_file() else "")]
        assert _job_state(jid)[0] not in TERMINAL, f"job ended before the second drill:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    assert resumed and resumed[0] >= first, f"no resume after USR1 (first checkpoint {first}):\n{log.read_text()[-3000:]}"
    second = wait_ckpt_after(resumed[0])
    subprocess.run(["scontrol", "requeue", jid], env=_env(), check=True, timeout=10)
    state = _wait(jid, 400, log)
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    assert _job_state(jid)[1] == 2
    for n in (0, 1, 2):
        assert f"restart {n}]" in text, text[-4000:]
    resumed = [int(s) for s in re.findall(r"\[train\] resumed from \S+ \(step (\d+)", text)]
    assert len(resumed) == 2 and resumed[0] >= first and resumed[1] >= second, (resumed, first, second)
    assert (run_dir / "final" / "export.json").is_file()
    assert "exported" in text and "done in" in text
