"""The GPU figures of one short session on a lent GPU, inside a fixed time budget (issues #4 and #5).

    python bench/gpu_checks.py --out OUT --ml1m-raw bench/out/quality/ml-1m/raw --budget-s 540

1. Nightly inference (bench/inference_bench.py) on the GPU: users/s end to end (bf16 scores, both
   top-K selections, write_streams auto) next to the plain bf16 matmul + torch.topk floor, GPU peak
   memory, over 10k / 100k / 1M items, and 1M items at two user counts (memory flat in users); then the
   largest point with the pipelining settings side by side (reads in line / ahead x overlap_scoring off / on).
2. MovieLens-1M, full-ranking protocol (bench/quality.py): the hybrid with its MiniLM item tower
   fine-tuned by LoRA against the same hybrid with the tower frozen, same seed and same number of steps.
   A 25-step LoRA probe measures the step time first (or --step-s gives it, or --steps fixes the length);
   the runs then get the most steps (up to the CPU runs' 5,500, cosine schedule) that fit the remaining
   budget, side by side on the GPU when --pair names two. Each run also gets the budget as its training
   deadline (max_train_wall_s), so it reports test metrics even if it is slower than expected.
   Checkpoints are chosen on validation NDCG@10 only; test metrics are reported. --set passes overrides.
   A grid instead (--steps fixed, the data prepared once): --seeds 0,1,2 and --arm NAME=KEY=VALUE;...
   train every variant x arm x seed side by side on the one GPU (9 frozen hybrids at once ran at 0.16 s
   per step each on an H200), each on its share of the host's cores, and report each arm's mean and range over the seeds:
       --parts quality --pair hybrid --seeds 0,1,2 --steps 5500 --arm L4 --arm L6=model.n_layers=6

3. Training efficiency (issue #33, ``--parts throughput``): bench/train_throughput.py --preset gpu in the budget
   left (ours vs the naive path, native bf16 vs ZeRO-2/3, MiniLM / BERT-base / ~0.5B decoder), its JSON as
   train_throughput_gpu_<card>.json with the ``checks`` object, and the checks table in summary.md.

On the lent device (no registry, 64 MiB carried): `bash scripts/prepare_device.sh` here, then the
command its header prints (carry [".whl"]). ``--parts`` picks what runs (tests, inference, quality): ``--parts quality`` gives the LoRA comparison the
whole budget. Everything lands under --out: summary.md (the tables), inference.json, quality.json and logs.tar.gz.
MovieLens files are read from --ml1m-raw (the converter's output, never committed) and nothing
derived from them is written under --out except aggregate metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
T0 = time.time()


def log(msg: str) -> None:
    print(f"[gpu_checks {time.time() - T0:5.0f}s] {msg}", flush=True)


def sh(cmd: list[str], logfile: Path, timeout: float, env: dict | None = None) -> int:
    """Run cmd, tee its output to logfile (and to stdout for lines that matter); kill it at timeout."""
    log(f"$ {' '.join(cmd)}  (timeout {timeout:.0f}s)")
    with open(logfile, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                             env=dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", **(env or {})),
                             start_new_session=True)
        deadline = time.time() + timeout
        import threading

        def pump():
            for line in p.stdout:
                f.write(line)
                if line.startswith(("[bench]", "[quality]", "Traceback", "FAILED", "ERROR")) or "Error" in line or " passed" in line:
                    print("   " + line, end="", flush=True)

        th = threading.Thread(target=pump, daemon=True)
        th.start()
        while p.poll() is None and time.time() < deadline:
            time.sleep(1)
        if p.poll() is None:
            log(f"timeout: killing {cmd[1]}")
            os.killpg(p.pid, 9)
            p.wait()
        th.join(timeout=5)
    return p.returncode


def step_seconds(train_log: Path, batch: int = 128) -> float | None:
    """Seconds per optimizer step from the last progress line of a train.log ('... 1.28k ex/s ...')."""
    if not train_log.is_file():
        return None
    rates = re.findall(r"\| ([\d.]+)([kMG]?) ex/s", train_log.read_text())
    if len(rates) < 2:  # the first line is step 1 (includes warm-up)
        return None
    v, unit = rates[-1]
    ex_s = float(v) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[unit]
    return batch / ex_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ml1m-raw", "--raw-data", dest="ml1m_raw", default="",
                    help="the data of part 2: converted MovieLens (data_prep.convert movielens --out) for --dataset ml-1m / "
                         "ml-100k, or a raw-layout folder (events/ + items/, e.g. a copy of ../shared/data/amazon2014-toy) "
                         "for --dataset amazon2014-toy / amazon2018-game; empty = skip part 2")
    ap.add_argument("--budget-s", type=float, default=540, help="wall seconds for everything")
    ap.add_argument("--inference-grid", default="10000:100000,100000:100000,1000000:50000,1000000:200000")
    ap.add_argument("--inference-timeout-s", type=float, default=200)
    ap.add_argument("--max-steps", type=int, default=5500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default="", help="comma-separated seeds (default: --seed); every variant x arm x seed "
                    "trains side by side")
    ap.add_argument("--arm", dest="arms", action="append", default=[], metavar="NAME[=KEY=VALUE;KEY=VALUE...]",
                    help="a configuration trained beside the others (over every seed), its overrides on top of --set, "
                         "e.g. --arm L4 --arm 'L6d128=model.n_layers=6;model.d_model=128'; needs --steps")
    ap.add_argument("--dataset", default="ml-1m", choices=["ml-1m", "ml-100k", "amazon2014-toy", "amazon2018-game"],
                    help="the data of part 2 (ml-100k: a CPU smoke test of this script; an Amazon set: the text-rich "
                         "recipes, e.g. --pair lora,pool with amazon_lora.yaml against the shipped pool)")
    ap.add_argument("--probe-steps", type=int, default=25)
    ap.add_argument("--pair", default="lora,hybrid", help="the probed variant and its control (a CPU smoke test: id,hybrid)")
    ap.add_argument("--min-steps", type=int, default=500, help="fewer steps than this fit: no quality run")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="training override for the quality runs (passed to bench/quality.py --set), e.g. model.n_layers=6")
    ap.add_argument("--eval-margin-s", type=float, default=None, help="seconds kept after training ends for evaluation "
                    "and reporting (training gets the rest of the budget as max_train_wall_s); default 50 + 10 per run "
                    "side by side")
    ap.add_argument("--steps", type=int, default=0, help="train this many steps, no probe (the step time is known); "
                    "0 = a probe sizes the run to the budget")
    ap.add_argument("--step-s", type=float, default=0.0, help="known seconds per training step (e.g. 0.101 for LoRA alone on "
                    "an H200): sizes the run to the budget without a probe, so the cosine schedule ends before the deadline")
    ap.add_argument("--parts", default="tests,inference,quality", help="which of tests,inference,quality,throughput "
                    "to run (e.g. quality alone gives LoRA the whole budget: ~5,500 steps fit in ~15 min; throughput: "
                    "issue #33's training efficiency, bench/train_throughput.py --preset gpu in what is left)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "lmrec-gpu-checks"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    summary = ["# GPU checks", "", f"command: `python bench/gpu_checks.py {' '.join(sys.argv[1:])}`",
               f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    versions = {}
    for mod in ("torch", "transformers", "accelerate", "peft", "datasets", "pyarrow"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - report what is missing, do not stop
            versions[mod] = f"missing ({type(e).__name__})"
    summary.append(f"machine: {gpu}, {os.cpu_count()} cores; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    log(summary[-1])
    results: dict = {"gpu": gpu, "versions": versions, "budget_s": a.budget_s}

    parts = {x.strip() for x in a.parts.split(",")}
    # ---- 0. the CUDA tests (tests/test_gpu.py: GPU paths give the CPU's answers)
    rc = None if "tests" not in parts else sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu.py"], logs / "pytest_gpu.log", 150)
    if rc is not None:
        tail = (logs / "pytest_gpu.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        results["pytest_gpu"] = {"rc": rc, "last_line": tail[0]}
        summary += ["", f"CUDA tests (`pytest -m gpu tests/test_gpu.py`): rc {rc}, {tail[0]}"]

    # ---- 1. inference
    inf_json = out / "inference.json"
    if "inference" in parts:
        run_inference_checks(a, out, work, logs, results, summary)

    # ---- 2. LoRA vs frozen on ML-1M
    if a.ml1m_raw and "quality" in parts:
        run_quality_checks(a, work, logs, results, summary)

    # ---- 3. training efficiency: ours vs the naive path, native bf16 vs ZeRO-2/3, three tower shapes (#33)
    if "throughput" in parts:
        run_throughput_checks(a, out, work, logs, results, summary, gpu)

    results["wall_s"] = time.time() - T0
    summary.append(f"\nwall {results['wall_s']:.0f}s")
    (out / "quality.json").write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tf:
        tf.add(logs, arcname="logs")
    print("\n".join(summary), flush=True)


def _train_throughput():
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    import train_throughput

    return train_throughput


def card_name(gpu: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100' (the results file's suffix): the cards whose peak the bench knows
    (train_throughput.PEAK_TFLOPS, longest names first); an unknown card keeps a slug of its name."""
    for card in sorted(_train_throughput().PEAK_TFLOPS, key=len, reverse=True):
        if card in gpu:
            return card.lower()
    return re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_") or "none"


def run_throughput_checks(a, out: Path, work: Path, logs: Path, results: dict, summary: list, gpu: str) -> None:
    """bench/train_throughput.py --preset gpu in the budget left (it starts the variants the checks need first,
    starts none that cannot finish, and rewrites its JSON after every variant), then its checks in the summary."""
    left = a.budget_s - (time.time() - T0) - 20  # margin: the summary and the log archive
    if left < 90:
        log(f"throughput: {left:.0f}s left, not started")
        results["throughput"] = {"skipped": f"{left:.0f}s left"}
        return
    dst = out / f"train_throughput_gpu_{card_name(gpu)}.json"
    rc = sh([sys.executable, "bench/train_throughput.py", "--preset", "gpu", "--work", str(work / "throughput"),
             "--out", str(dst), "--budget-s", f"{left - 10:.0f}"], logs / "train_throughput.log", left)
    results["throughput"] = {"rc": rc, "json": dst.name}
    if not dst.is_file():
        summary += ["", f"training throughput: rc {rc}, no results (logs/train_throughput.log)"]
        return
    tt = _train_throughput()
    doc = json.loads(dst.read_text())
    results["throughput"]["checks"] = {k: doc["checks"][k] for k in tt.CHECK_TARGETS}
    ran = [r["variant"] for r in doc["results"] if not r.get("failed")]
    failed = [r["variant"] for r in doc["results"] if r.get("failed")]
    summary += ["", f"## Training throughput (bench/train_throughput.py --preset gpu, {dst.name})", "",
                tt.checks_table(doc["checks"]), "", f"ran: {', '.join(ran) or '-'}; failed: {', '.join(failed) or '-'}; "
                f"not started (budget): {', '.join(doc['skipped']) or '-'}"]


def run_inference_checks(a, out: Path, work: Path, logs: Path, results: dict, summary: list) -> None:
    inf_json = out / "inference.json"
    rc = sh([sys.executable, "bench/inference_bench.py", "--grid", a.inference_grid, "--batch", "2048", "--budget-mb", "8192",
             "--e2e-methods", "topk,blockmax", "--side-users", "32768", "--threads", "0", "--work", str(work / "inference"),
             "--out", str(inf_json)], logs / "inference.log", a.inference_timeout_s)
    results["inference_rc"] = rc
    # the largest point again, the pipelining settings side by side: reads in line or 2 chunks ahead (reader
    # thread) x overlap_scoring off / on (next chunk queued before the previous result is waited for). The
    # earlier control of this slot (ONE writer thread) settled its question on the H200: the same tower time
    big_point = a.inference_grid.split(",")[-1]
    inf1_json = out / "inference_pipelining.json"
    sh([sys.executable, "bench/inference_bench.py", "--grid", big_point, "--batch", "2048", "--budget-mb", "8192",
        "--e2e-methods", "blockmax", "--side-users", "8192", "--threads", "0", "--prefetch", "0,2", "--overlap", "0,1",
        "--work", str(work / "inference"), "--out", str(inf1_json)], logs / "inference_pipelining.log", 120)
    if inf_json.is_file():
        inf = json.loads(inf_json.read_text())
        summary += ["", f"## Inference (top-100, d=64, {inf['meta'].get('score_dtype')} scores, batch 2048 users, "
                        f"{'complete' if inf['meta'].get('complete') else 'STOPPED at the time limit'})", "",
                    "| items | users | e2e topk | e2e blockmax | floor | select_topk | select_blockmax | best e2e / floor | "
                    "phases (read/tower/topk/write s, best e2e) | parts | GPU peak MB | RSS peak MB |",
                    "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for r in inf["results"]:
            bm = r["end_to_end_by_method"]
            best = max(bm, key=lambda m: bm[m]["users_s"])
            ph = bm[best]["phase_s"]
            summary.append(f"| {r['items']:,} | {r['users']:,} | {bm['topk']['users_s']:,.0f} | {bm['blockmax']['users_s']:,.0f} | "
                           f"{r['floor_users_s']:,.0f} | {r['select_topk_users_s']:,.0f} | {r['select_blockmax_users_s']:,.0f} | "
                           f"{bm[best]['users_s'] / r['floor_users_s']:.2f} ({best}) | {ph['read_s']:.2f}/{ph['user_tower_s']:.2f}/"
                           f"{ph['topk_s']:.2f}/{ph['write_s']:.2f} | {r['write_streams']} | {r.get('gpu_peak_allocated_mb')} | "
                           f"{r['peak_rss_mb']} |")
        if inf1_json.is_file():
            for r in json.loads(inf1_json.read_text())["results"]:
                for key, v in r["end_to_end_by_method"].items():
                    ph = v["phase_s"]
                    summary.append(f"| {r['items']:,} | {r['users']:,} | - | {v['users_s']:,.0f} ({key}) | {r['floor_users_s']:,.0f} | | | "
                                   f"{v['users_s'] / r['floor_users_s']:.2f} | {ph['read_s']:.2f}/{ph['user_tower_s']:.2f}/{ph['topk_s']:.2f}/"
                                   f"{ph['write_s']:.2f} | {r['write_streams']} | {r.get('gpu_peak_allocated_mb')} | {r['peak_rss_mb']} |")
        big = [r for r in inf["results"] if r["items"] >= 1_000_000]
        if big:
            r = max(big, key=lambda r: r["users"])
            best = max(r["end_to_end_by_method"].values(), key=lambda v: v["users_s"])["users_s"]
            results["projection_10M_users_1M_items_min"] = 10_000_000 / best / 60
            summary.append(f"\nProjected 10M users x 1M items on this GPU, end to end with writing: "
                           f"{10_000_000 / best / 60:.1f} min (at {best:,.0f} users/s)")
    else:
        summary.append(f"\ninference bench produced no result (rc {rc}); see logs/inference.log")



def run_quality_checks(a, work: Path, logs: Path, results: dict, summary: list) -> None:
    q = work / "quality"
    q.mkdir(parents=True, exist_ok=True)
    if a.dataset.startswith("ml-"):  # MovieLens: the converted copy where bench/quality.py keeps it (no converting)
        if not (q / "raw").exists():
            shutil.copytree(a.ml1m_raw, q / "raw")
        src = q / "no-src"
    else:  # raw-layout data is read where it lies
        src = Path(a.ml1m_raw).resolve()
    common = [sys.executable, "bench/quality.py", "--dataset", a.dataset, "--src", str(src), "--out", str(q),
              "--no-docs", "--set", "model.text_batch_size=4096"] + [x for kv in a.overrides for x in ("--set", kv)]
    pair = a.pair.split(",")
    jobs = make_jobs(a, pair)
    if len(jobs) > len(pair):  # a grid: prepare the data once (most-popular is free) rather than once per run
        if not a.steps:
            raise SystemExit("--arm / --seeds need --steps (no probe sizes a grid)")
        sh(common + ["--seeds", str(a.seed), "--variants", "most_popular", "--tag", "prep"], logs / "prepare.log", 300)
    if a.steps or a.step_s:  # step time known from an earlier session: no probe, the whole budget trains
        n = a.steps
        if not n:
            # the train deadline of run_side_by_side, less ~15 s of data preparation and model loading inside it
            left = a.budget_s - 15 - (time.time() - T0) - eval_margin(a, len(jobs)) - 15
            n = fit_steps(a, left, a.step_s, pair, alone_factor=1.05)
            log(f"{a.step_s}s per step: {n} steps fit {left:.0f}s")
        results["steps"] = n
        if n >= a.min_steps:
            run_side_by_side(a, q, common, jobs, n, logs, results, summary)
        else:
            summary.append(f"\nat {a.step_s}s per step fewer than {a.min_steps} steps fit the budget; no quality run")
        copy_run_logs(q, logs)
        return
    rc = sh(common + ["--seeds", str(a.seed), "--variants", pair[0], "--tag", "probe", "--set", f"max_steps={a.probe_steps}", "--set", "eval_every=0",
                      "--set", f"log_every={max(1, a.probe_steps // 5)}", "--set", "save_every=0"], logs / "probe.log", 180)
    st = step_seconds(q / "runs-probe" / f"{pair[0]}_s{a.seed}" / "train.log")
    results["lora_probe_rc"], results["lora_step_s"] = rc, st
    left = a.budget_s - (time.time() - T0) - 45  # margin: evaluation of both finals, packing
    log(f"LoRA step {st}s; {left:.0f}s left for training")
    if st:
        # evaluation every 250 steps costs about as much as ~15 steps here (catalogue encode + 6,040 users)
        # side by side with the frozen run, LoRA steps took 1.6x the probe's (0.147 vs 0.091 s, H200, 2026-11-28)
        n = fit_steps(a, left, st, pair, alone_factor=1.1)
        results["steps"] = n
        if n >= a.min_steps:
            run_side_by_side(a, q, common, jobs, n, logs, results, summary)
        else:
            summary.append(f"\nLoRA step {st:.3f}s: fewer than {a.min_steps} steps fit the budget; no quality run")
    else:
        summary.append(f"\nLoRA probe gave no step time (rc {rc}); see logs/probe.log")
    copy_run_logs(q, logs)


def fit_steps(a, left: float, step_s: float, pair: list, alone_factor: float) -> int:
    """Steps of step_s seconds that fit in left seconds (side by side a step takes ~1.7x; alone evaluation
    adds alone_factor), at most --max-steps, rounded down to whole evaluations of 250."""
    n = int(min(a.max_steps, left / (step_s * (1.7 if len(pair) > 1 else alone_factor))))
    return n // 250 * 250 if n >= 250 else n


def copy_run_logs(q: Path, logs: Path) -> None:
    for pat in ("runs-*/*/train.log", "*/runs-*/*/train.log", "runs-*/*/evals.jsonl", "*/runs-*/*/evals.jsonl"):
        for p in q.glob(pat):  # named by the whole path: a grid's runs share tag and run names across arms
            shutil.copy(p, logs / "_".join(p.relative_to(q).parts))


def eval_margin(a, n_runs: int) -> float:
    """Seconds kept after the training deadline: --eval-margin-s, else 50 s + 10 s per run side by side (every
    run's end, the bench encoding the catalogue again to rank final/, shares the GPU: 9 frozen runs on an H200
    took 40 s each to encode 3,883 items, 2026-11-29)."""
    return a.eval_margin_s if a.eval_margin_s is not None else 50 + 10 * n_runs


def valid_curve(log_text: str) -> list[tuple[int, float]]:
    """(step, validation NDCG@10) of every evaluation in a training log."""
    return [(int(st), float(nd)) for st, nd in re.findall(r"\[valid\] step (\d+) \|[^\n]*?\| NDCG@10 ([\d.]+)", log_text)]


def make_jobs(a, pair: list) -> list[dict]:
    """The runs to train side by side: every variant of --pair x --arm x seed. A lone run per variant keeps the
    variant's name (the layout of the pair mode); a grid names each run variant[_arm]_s<seed>."""
    seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [a.seed]
    arms = []
    for spec in a.arms or [""]:
        name, _, kvs = spec.partition("=")
        arms.append((name, [kv for kv in kvs.split(";") if kv]))
    grid = len(arms) * len(seeds) > 1
    return [{"label": f"{v}{'_' + arm if arm else ''}_s{seed}" if grid else v, "variant": v, "arm": arm or v, "seed": seed,
             "overrides": kvs} for v in pair for arm, kvs in arms for seed in seeds]


def run_side_by_side(a, q: Path, common: list, jobs: list[dict], n: int, logs: Path, results: dict, summary: list) -> None:
    """Train the jobs side by side on the one GPU for n steps (cosine), report each one's test metrics and, for a
    grid, each arm's mean and range over seeds."""
    results["steps"] = n
    deadline = T0 + a.budget_s - 15
    # a run that would outlast the budget ends training at max_train_wall_s and still reports its best
    # validation checkpoint's test metrics (a kill would leave none): the margin covers data preparation
    # (first run), the final validation + test inside train, the bench's own evaluation of final/ and exit
    train_s = int(deadline - time.time() - eval_margin(a, len(jobs)))
    sched = ["--set", f"max_steps={n}", "--set", "optim.schedule=cosine", "--set", "optim.min_lr_ratio=0.05",
             "--set", f"max_train_wall_s={max(train_s, 1)}"]
    # the host's cores shared out: each run's data pipeline and kernel launches need one, torch would take all
    threads = str(max(1, (os.cpu_count() or 1) // len(jobs)))
    procs = []
    for job in jobs:  # side by side on the one GPU: the frozen hybrid is small
        qv = q / job["label"]  # own out folder (results.json) over the shared raw and prepared data
        qv.mkdir(exist_ok=True)
        for name in ("raw", "prepared"):  # prepared exists when the probe or the grid's prep ran; else each run prepares
            if (q / name).exists() and not (qv / name).exists():
                (qv / name).symlink_to(q / name)
        cmd = ([x if x != str(q) else str(qv) for x in common] + ["--seeds", str(job["seed"]), "--variants", job["variant"],
               "--tag", f"gpu{n}"] + sched + [x for kv in job["overrides"] for x in ("--set", kv)])
        lf = logs / f"quality_{job['label']}.log"
        log(f"$ {' '.join(cmd)}")
        env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
        if len(jobs) > 1:
            env.setdefault("OMP_NUM_THREADS", threads)
        procs.append((job, subprocess.Popen(cmd, cwd=ROOT, stdout=open(lf, "w"), stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True), lf))
    while any(p.poll() is None for _, p, _ in procs) and time.time() < deadline:
        time.sleep(2)
    variants = list(dict.fromkeys(j["variant"] for j in jobs))
    what = (" vs ".join(variants) + (" side by side" if len(jobs) > 1 else " alone") + "".join(f", {kv}" for kv in a.overrides)
            + (f"; arms {', '.join(a.arms)}" if a.arms else ""))
    seeds = sorted({j["seed"] for j in jobs})
    summary += ["", f"## {a.dataset}: {what} on the one GPU ({n} steps, cosine, seed{'s' if len(seeds) > 1 else ''} "
                    f"{','.join(map(str, seeds))}, mixed precision auto = bf16 on a GPU)", "",
                "| run | test HR@10 | test NDCG@10 | HR@50 | NDCG@50 | HR@200 | MRR | valid NDCG@10 | best step | train wall |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda x: f"{x:.4f}" if isinstance(x, float) else "-"  # noqa: E731
    for job, p, lf in procs:
        label, variant = job["label"], job["variant"]
        killed = p.poll() is None
        if killed:
            os.killpg(p.pid, 9)
            p.wait()
        text = lf.read_text()
        # the validation curve from the run's log (kept even when the run is killed before its test figures)
        curve = valid_curve(text)
        if killed:
            results.setdefault("quality", {})[label] = {"rc": None, "killed": True, "variant": variant, "arm": job["arm"],
                                                        "seed": job["seed"], "overrides": job["overrides"], "valid_curve": curve}
            best = max(curve, key=lambda c: c[1]) if curve else None
            summary.append(f"| {label} | killed at the budget | | | | | | {f(best[1]) if best else '-'} (so far) | "
                           f"{best[0] if best else '-'} (of {curve[-1][0] if curve else 0} run) | |")
            continue
        # valid "nan": a refit (train_through=valid) trained on the validation targets, no held-out figure
        m = re.search(r"test HR@10 ([\d.]+) NDCG@10 ([\d.]+) \(valid NDCG@10 ([\d.]+|nan), best step (\d+), train ([^)]+)\)", text)
        stopped = re.search(r"\[stopped by (\S+) after step (\d+) of (\d+)\]", text)
        res_file = q / label / "results.json"
        entry = results.setdefault("quality", {})[label] = {"rc": p.returncode, "line": m.group(0) if m else None,
                                                            "variant": variant, "arm": job["arm"], "seed": job["seed"],
                                                            "overrides": job["overrides"], "valid_curve": curve}
        if not m:
            summary.append(f"| {label} | failed (rc {p.returncode}) | | | | | | | | |")
            continue
        row = {"HR@10": float(m.group(1)), "NDCG@10": float(m.group(2)),
               "valid NDCG@10": None if m.group(3) == "nan" else float(m.group(3)),
               "best_step": int(m.group(4)), "train": m.group(5) + (f" (stopped at step {stopped.group(2)} of "
                                                                    f"{stopped.group(3)}: {stopped.group(1)})" if stopped else "")}
        # the full metric set of this run from its own results file
        extra = {}
        if res_file.is_file():
            r = json.loads(res_file.read_text())
            extra = {k: v["mean"] for k, v in r.get("summary", {}).get(variant, {}).items() if isinstance(v, dict) and "mean" in v}
            entry["summary"] = r.get("summary", {}).get(variant)
            entry["summary_valid"] = r.get("summary_valid", {}).get(variant)
        row.update({k: extra.get(k) for k in ("HR@50", "NDCG@50", "HR@200", "MRR")})
        entry.update(row)
        summary.append(f"| {label} | {f(row['HR@10'])} | {f(row['NDCG@10'])} | {f(row['HR@50'])} | {f(row['NDCG@50'])} | "
                       f"{f(row['HR@200'])} | {f(row['MRR'])} | {f(row['valid NDCG@10'])} | {row['best_step']} | {row['train']} |")
    if len(seeds) > 1:  # each arm over its seeds: mean (min-max), the form of the quality bench's tables
        summary += ["", "| arm | seeds done | test HR@10 mean (min-max) | test NDCG@10 mean (min-max) | valid NDCG@10 mean |",
                    "|---|---:|---|---|---:|"]
        by_arm: dict = {}
        for e in results.get("quality", {}).values():
            if "HR@10" in e:
                by_arm.setdefault(f"{e['variant']} {e['arm']}", []).append(e)
        results["arms"] = {}
        for arm, es in by_arm.items():
            agg = {k: {"mean": sum(v) / len(v), "min": min(v), "max": max(v)} if v else {"mean": None}
                   for k in ("HR@10", "NDCG@10", "valid NDCG@10") for v in [[e[k] for e in es if e[k] is not None]]}
            results["arms"][arm] = dict(agg, seeds=sorted(e["seed"] for e in es))
            summary.append(f"| {arm} | {len(es)} | {agg['HR@10']['mean']:.4f} ({agg['HR@10']['min']:.4f}-{agg['HR@10']['max']:.4f}) | "
                           f"{agg['NDCG@10']['mean']:.4f} ({agg['NDCG@10']['min']:.4f}-{agg['NDCG@10']['max']:.4f}) | "
                           f"{f(agg['valid NDCG@10']['mean'])} |")


if __name__ == "__main__":
    main()
