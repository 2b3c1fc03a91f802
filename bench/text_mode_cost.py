"""What each way of using the text encoder costs to train, side by side on one prepared dataset (issue #27).

    python bench/text_mode_cost.py --dataset amazon2014-toy --precision bf16          # prepares it if needed
    python bench/text_mode_cost.py --prepared DIR --name mine --precision bf16 --variants frozen,pool,lora_sampled
    python bench/text_mode_cost.py --dataset amazon2014-toy --out docs/results/text_mode_cost_amazon2014-toy.json

Every variant is the REAL training command (``python -m train`` with a shipped config, on the dataset's own
schedule), stopped after ``--warmup + --steps`` optimizer steps by the loop's own ``stop_after_steps`` (it saves a
checkpoint and exits 124, as a pre-empted run does; no evaluation beyond the loop's start-up one). Each variant runs in
its own process, so its peak RSS is its own; with ``--rounds R`` the variants take turns R times so that a change in
the machine's load hits every row alike, and a row's figure is the median over its rounds.

Per variant:
- s/step: the median over the timed steps (``log_every=1``; a step's time is its progress line's examples per
  second over the batch it trained), and its ratio to the frozen hybrid of the same rounds;
- setup: process start to the first step (imports, data, the catalogue through the encoder where the mode needs it
  before training: frozen, pool and top encode every item once; lora and full encode in the step);
- peak RSS of the process (Linux ru_maxrss), on a GPU also the loop's CUDA peak;
- the schedule of the config on this data (steps per epoch, max steps, as the loop computed them) and the
  projected training time: setup + max steps x s/step, evaluations and early stopping left out.

The variants (``--variants``; ``--steps-for NAME=N`` shortens one):
    ids           configs/train/amazon_sasrec.yaml  (no text)
    frozen        configs/train/amazon_hybrid.yaml  (MiniLM features computed once; the shipped hybrid)
    pool          configs/train/amazon_pool.yaml    (learned pooling over the frozen token states; shipped)
    top           configs/train/amazon_top.yaml     (MiniLM's top layer trained over its cached input, sampled softmax)
    lora          configs/train/amazon_lora.yaml    (LoRA on MiniLM, whole catalogue through the encoder every step)
    lora_sampled  amazon_lora.yaml + model.loss=sampled_softmax (the batch's items + 512 shared negatives per step)
    full_sampled  amazon_lora.yaml + model.text_mode=full model.loss=sampled_softmax (every MiniLM weight trained)
    lora_sampled_onecall  lora_sampled with the step's items in one padded encoder call, whatever text_batch_size says

Results: the JSON (``--out``; default bench/out/text_mode_cost/<name>.json) and a markdown table on stdout. Outputs
under bench/out/ are gitignored; a results JSON of timings holds no data and may be committed under docs/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lmrec_common.log import fmt_secs  # noqa: E402

TRAIN_CONFIGS = ROOT / "configs" / "train"
VARIANTS = {  # name -> (config, overrides)
    "ids": ("amazon_sasrec.yaml", []),
    "frozen": ("amazon_hybrid.yaml", []),
    "pool": ("amazon_pool.yaml", []),
    "top": ("amazon_top.yaml", []),
    "lora": ("amazon_lora.yaml", []),
    "lora_sampled": ("amazon_lora.yaml", ["model.loss=sampled_softmax"]),
    "full_sampled": ("amazon_lora.yaml", ["model.text_mode=full", "model.loss=sampled_softmax"]),
    # the step's items in ONE padded encoder call whatever text_batch_size says: today's lora / full step (length
    # bucketing was measured with it on 2026-12-06 and taken out: no faster on a CPU); kept to measure it on a GPU
    "lora_sampled_onecall": ("amazon_lora.yaml", ["model.loss=sampled_softmax", "model.text_batch_size=1000000"]),
}
# lora (full softmax) keeps the whole catalogue's encoder activations for the backward: ~10+ GiB on the Amazon sets, so
# it runs only when named (on a GPU, or a CPU host with the memory)
DEFAULT_VARIANTS = "ids,frozen,pool,top,lora_sampled,full_sampled"
DEFAULT_STEPS_FOR = {"lora": 1}  # the whole catalogue through the encoder and back every step: minutes on a CPU
BASELINE = "frozen"
# the loop's progress line and its header (train/loop.py: log_step, the "[train] ... steps/epoch" line)
STEP_RE = re.compile(r"^step (\d+)/(\d+) \|.*\| ([0-9.]+)([kMG]?) ex/s \|.*\| mem ([0-9.]+) GiB")
PLAN_RE = re.compile(r"(\d+) steps/epoch \| max steps (\d+)")
MODEL_RE = re.compile(r"^\[train\] model (.*?) \| params trainable ([0-9.]+)([kMG]?) / total ([0-9.]+)([kMG]?)")
UNIT = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}


def log(msg: str) -> None:
    print(f"[text_mode_cost] {msg}", flush=True)


def parse_log(lines: list[str]) -> dict:
    """Steps (number -> examples/s, memory GiB), the schedule and the model line from a training run's stdout."""
    steps, plan, model = {}, None, None
    for line in lines:
        mm = MODEL_RE.match(line.strip())
        if mm and model is None:
            model = {"model": mm.group(1), "params_trainable": float(mm.group(2)) * UNIT[mm.group(3)],
                     "params_total": float(mm.group(4)) * UNIT[mm.group(5)]}
        m = STEP_RE.match(line.strip())
        if m:
            steps[int(m.group(1))] = (float(m.group(3)) * UNIT[m.group(4)], float(m.group(5)))
            continue
        p = PLAN_RE.search(line)
        if p and plan is None:
            plan = {"steps_per_epoch": int(p.group(1)), "max_steps": int(p.group(2))}
    return {"steps": steps, "plan": plan, "model": model}


def run_variant(name: str, prepared: Path, work: Path, warmup: int, steps: int, overrides: list[str], env: dict,
                round_: int, timeout: float) -> dict:
    """One stopped training run of a variant; its timings and memory."""
    config, extra = VARIANTS[name]
    run_name = f"{name}_r{round_}"
    total = warmup + steps
    cmd = [sys.executable, "-m", "train", "--config", str(TRAIN_CONFIGS / config), f"data={prepared}",
           f"output_dir={work / 'runs'}", f"run_name={run_name}", "seed=0", "tracker=none", "evaluate_test=false",
           "log_every=1", f"stop_after_steps={total}", "save_every=0", *extra, *overrides]
    log(f"{name} (round {round_}): {' '.join(cmd[2:])}")
    shutil.rmtree(work / "runs" / run_name, ignore_errors=True)  # a run folder left by an earlier bench would resume
    log_file = work / "logs" / f"{run_name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    lines, t_first = [], None
    t0 = time.time()
    with open(log_file, "w") as lf:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in p.stdout:
            lf.write(line)
            lines.append(line)
            if t_first is None and line.startswith("step 00001/"):
                t_first = time.time()
            if line.startswith(("step ", "[train]", "Traceback", "error")):
                print(f"  {run_name} | {line}", end="", flush=True)
            if time.time() - t0 > timeout:
                p.kill()
                break
        _, status, usage = os.wait4(p.pid, 0)
        rc = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    got = parse_log(lines)
    timed = [got["steps"][s] for s in sorted(got["steps"]) if warmup < s <= total]
    # 124: the loop stopped itself after stop_after_steps (saved, as when pre-empted); anything else is a failure
    if rc not in (0, 124) or len(timed) < steps or got["plan"] is None:
        tail = "".join(lines[-15:])
        raise SystemExit(f"[text_mode_cost] {name}: the training run failed (exit {rc}, {len(timed)} of {steps} timed "
                         f"steps; log {log_file}):\n{tail}")
    batch = batch_size(work / "runs" / run_name)
    step_s = [batch / ex_s for ex_s, _ in timed]
    return {"variant": name, "round": round_, "config": f"configs/train/{config}", "overrides": [*extra, *overrides],
            "step_s": step_s, "step_s_median": statistics.median(step_s), "examples_per_step": batch,
            "setup_s": (t_first - t0) if t_first else None, "wall_s": wall, "peak_rss_gib": usage.ru_maxrss / 2**20,
            "loop_mem_gib_last": timed[-1][1], "plan": got["plan"], **(got["model"] or {}), "log": str(log_file)}


def batch_size(run_dir: Path) -> int:
    """Examples per optimizer step of a run, from the settings it resolved (batch x grad_accum)."""
    import yaml

    cfg = yaml.safe_load((run_dir / "train_config.yaml").read_text())
    return int(cfg["batch_size"]) * int(cfg.get("grad_accum", 1) or 1)


def summarize(runs: list[dict], variants: list[str]) -> list[dict]:
    """One row per variant: the median over its rounds, ratios to the frozen hybrid of the same rounds."""
    rows = []
    base = [r["step_s_median"] for r in runs if r["variant"] == BASELINE]
    base_s = statistics.median(base) if base else None
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        step = statistics.median(r["step_s_median"] for r in mine)
        setup = statistics.median(r["setup_s"] for r in mine if r["setup_s"] is not None)
        plan = mine[0]["plan"]
        rows.append({
            "variant": v, "config": mine[0]["config"], "overrides": mine[0]["overrides"], "rounds": len(mine),
            "model": mine[0].get("model"), "params_trainable": mine[0].get("params_trainable"),
            "step_s": step, "x_frozen": step / base_s if base_s else None, "examples_s": mine[0]["examples_per_step"] / step,
            "setup_s": setup, "peak_rss_gib": max(r["peak_rss_gib"] for r in mine),
            "steps_per_epoch": plan["steps_per_epoch"], "max_steps": plan["max_steps"],
            "projected_train_s": setup + plan["max_steps"] * step,
        })
    return rows


def table(rows: list[dict]) -> str:
    out = ["| variant | config | s / step | x frozen | examples/s | setup | peak RSS | schedule (steps) | projected training |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cfg = Path(r["config"]).name + "".join(f" {o}" for o in r["overrides"])
        x = f"{r['x_frozen']:.2f}" if r["x_frozen"] is not None else "-"
        out.append(f"| {r['variant']} | `{cfg}` | {r['step_s']:.3f} | {x} | {r['examples_s']:.0f} | {r['setup_s']:.0f} s "
                   f"| {r['peak_rss_gib']:.2f} GiB | {r['max_steps']:,} ({r['steps_per_epoch']:,}/epoch) "
                   f"| {fmt_secs(r['projected_train_s'])} |")
    return "\n".join(out)


def machine() -> dict:
    """bench/quality.py's machine record, plus what decides a CPU timing here: the threads and the host."""
    sys.path.insert(0, str(ROOT / "bench"))
    import quality

    return {**quality.machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "host": platform.node()}


def prepared_of(args) -> tuple[Path, str]:
    """The prepared folder to measure on: --prepared, or bench/quality.py's for --dataset (prepared if absent)."""
    if args.prepared:
        p = Path(args.prepared).resolve()
        if not (p / "manifest.json").is_file():
            raise SystemExit(f"[text_mode_cost] --prepared {p}: no manifest.json (a data_prep output version folder)")
        return p, args.name or p.parent.name
    sys.path.insert(0, str(ROOT / "bench"))
    import quality

    src, prep_yaml, _ = quality.DATASETS[args.dataset]
    out = ROOT / "bench" / "out" / "quality" / args.dataset
    if args.dataset in quality.MOVIELENS:
        raw = out / "raw"
        quality.convert(src, raw)
    else:
        raw = quality.raw_layout(src)
    return Path(quality.prepare(prep_yaml, raw / "events", raw / "items", out / "prepared")).resolve(), args.dataset


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=["ml-100k", "ml-1m", "amazon2014-toy", "amazon2018-game"])
    src.add_argument("--prepared", help="a prepared version folder (data_prep's output)")
    ap.add_argument("--name", help="the dataset's name in the results (default: --dataset, or the prepared folder's parent)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant and round")
    ap.add_argument("--warmup", type=int, default=3, help="steps before the timed ones")
    ap.add_argument("--steps-for", action="append", default=[], metavar="NAME=N",
                    help=f"timed steps of one variant (default {DEFAULT_STEPS_FOR}; its warm-up is then 1 step)")
    ap.add_argument("--rounds", type=int, default=1, help="the variants take turns this many times")
    ap.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no", help="Accelerate mixed precision")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a train config override for every variant (e.g. model.text_model_path=DIR)")
    ap.add_argument("--work", help="scratch folder (runs, logs); default bench/out/text_mode_cost/<name>")
    ap.add_argument("--out", help="results JSON; default <work>/text_mode_cost.json")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per variant run before it is killed")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise SystemExit(f"[text_mode_cost] --variants: unknown {bad or 'none given'}; known: {', '.join(VARIANTS)}")
    steps_for = dict(DEFAULT_STEPS_FOR)
    for spec in args.steps_for:
        name, _, n = spec.partition("=")
        if name not in VARIANTS or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"[text_mode_cost] --steps-for {spec!r}: expected NAME=N with NAME of {', '.join(VARIANTS)} and N >= 1")
        steps_for[name] = int(n)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        raise SystemExit("[text_mode_cost] --steps and --rounds must be >= 1, --warmup >= 0")
    prepared, name = prepared_of(args)
    work = Path(args.work or ROOT / "bench" / "out" / "text_mode_cost" / name).resolve()
    env = dict(os.environ, ACCELERATE_MIXED_PRECISION=args.precision,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])))
    log(f"{name}: {prepared}, variants {variants}, precision {args.precision}, {args.rounds} round(s), work {work}")
    t0 = time.time()
    runs = []
    for r in range(args.rounds):
        for v in variants:
            steps = steps_for.get(v, args.steps)
            warmup = args.warmup if v not in steps_for else min(args.warmup, 1)
            runs.append(run_variant(v, prepared, work, warmup, steps, args.overrides, env, r, args.timeout))
            last = runs[-1]
            log(f"{v}: {last['step_s_median']:.3f} s/step, setup {last['setup_s']:.0f} s, peak RSS {last['peak_rss_gib']:.2f} GiB")
    rows = summarize(runs, variants)
    from lmrec_common.manifest import git_commit
    from lmrec_common.publish import atomic_write_json

    doc = {"kind": "lmrec.text_mode_cost", "dataset": name, "prepared": str(prepared),
           "command": "python bench/text_mode_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(ROOT),
           "machine": machine(), "precision": args.precision, "wall_s": time.time() - t0, "rows": rows, "runs": runs}
    out = Path(args.out or work / "text_mode_cost.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, doc)
    print(table(rows))
    log(f"wrote {out} ({fmt_secs(doc['wall_s'])})")
    return doc


if __name__ == "__main__":
    main()
