"""Shop-scale run through all three stages (issue 30): synthetic users -> data_prep -> a bounded training of an id
tower and of a frozen-text (hybrid) tower on 2 processes -> inference of every user on 2 processes, with the wall
time and the peak memory of every process of every stage, so growth with the number of users shows as a ratio.

    python bench/scale.py --users 1000000                   # one size (~30 min on 2 shared cores); results merged by size
    python bench/scale.py --users 5000000 --stages data_prep,train_id,train_hybrid   # a size without inference
    python bench/scale.py --quick --out /tmp/scale.json     # 20k users, every stage, 2 processes: the test's run

Sizes: ``--users`` users with ``--events-per-user`` events on average (the synthetic generator, data_prep/synthetic.py:
sessions, Zipf popularity, >= 2 events a user), ``--items`` catalogue items whose text is a short title. The stages
are the real commands (``python -m data_prep``, ``accelerate launch --config_file launch/accelerate/cpu_ddp_2proc.yaml
-m train`` / ``-m inference``), each in its own process tree; the input generation is timed apart (not a stage).

Memory, sampled every ``--poll`` s from /proc/<pid>/status for every process of the stage's tree: ``peak_rss_mib``
(VmRSS; VmHWM where it is larger: the kernel's own high-water mark), ``peak_anon_mib`` (RssAnon: the process's private
memory) and ``peak_file_mib`` (RssFile: pages of memory-mapped files, e.g. the prepared Arrow shards, which are page
cache shared by the ranks and given back under pressure). ``ranks`` = the worker processes (environment RANK);
data_prep's figures are its main process plus ``tree_peak_pss_mib``, the peak of the summed PSS of its tree (how
docs/BENCH_DATA_PREP.md measured the 53 MB per million events of issue 30).

Text tower: the frozen hybrid run uses a random-init 2-layer BERT (hidden 64) with the bundled MiniLM tokenizer
(throughput and memory do not depend on the weights); ``minilm_probe`` times the real bundled all-MiniLM-L6-v2 on
``--minilm-probe`` titles to project the frozen encode of the whole catalogue.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from lmrec_common.manifest import git_commit  # noqa: E402

LAUNCH = "launch/accelerate/cpu_ddp_2proc.yaml"
STAGES = ("data_prep", "train_id", "train_hybrid", "inference")
RUN_DATE = "2026-10-31"  # the day after the synthetic window (start 2026-10-01, 30 days)
MIB = 2**20


# ------------------------------------------------------------------------------------------ memory sampling
def _status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of /proc/<pid>/status in bytes ({} once the process is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError):
        return {}
    return out


def run_stage(name: str, cmd: list[str], log_path: Path, poll: float, env: dict | None = None) -> dict:
    """Run ``cmd`` (its own process tree), sample every process's memory, return wall time and peaks."""
    import psutil

    # the launch files decide the distributed setup: accelerate variables of the calling process (an in-process
    # Accelerator sets ACCELERATE_USE_CPU, e.g. in a test session) would override them
    base = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env = dict(base, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
               **(env or {}))
    print(f"[scale] {name}: {shlex.join(cmd)}", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        root = psutil.Process(proc.pid)
        procs: dict[int, dict] = {}
        tree_pss = 0
        last_note = t0
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = [root]
            pss = 0
            for p in tree:
                st = _status(p.pid)
                if not st:
                    continue
                rec = procs.get(p.pid)
                if rec is None or rec["rank"] is None:
                    # read again until a rank shows: a worker seen between fork and exec still has its parent's
                    # environment (no RANK) and would otherwise never count as a rank
                    try:
                        rank = p.environ().get("RANK")
                        cmdline = " ".join(p.cmdline())[:200]
                    except psutil.Error:
                        continue
                    if rec is None:
                        try:
                            ppid = p.ppid()
                        except psutil.Error:
                            continue
                        rec = procs[p.pid] = {"pid": p.pid, "ppid": ppid, "rank": None, "rss": 0, "anon": 0, "file": 0}
                    rec["rank"], rec["cmd"] = None if rank is None else int(rank), cmdline
                rec["rss"] = max(rec["rss"], st.get("VmRSS", 0), st.get("VmHWM", 0))
                rec["anon"] = max(rec["anon"], st.get("RssAnon", 0))
                rec["file"] = max(rec["file"], st.get("RssFile", 0))
                if name == "data_prep":  # PSS needs smaps_rollup: only where the tree is compared with the old bench
                    try:
                        pss += p.memory_full_info().pss
                    except psutil.Error:
                        pass
            tree_pss = max(tree_pss, pss)
            if time.time() - last_note > 60:
                last_note = time.time()
                print(f"[scale] {name}: {last_note - t0:.0f}s ...", flush=True)
            time.sleep(poll)
    wall = time.time() - t0
    tail = log_path.read_text().splitlines()[-40:]
    if proc.returncode != 0:
        raise SystemExit(f"error: stage {name} failed (rc {proc.returncode}); log {log_path}:\n" + "\n".join(tail))

    def mib(rec):
        return {"peak_rss_mib": round(rec["rss"] / MIB, 1), "peak_anon_mib": round(rec["anon"] / MIB, 1),
                "peak_file_mib": round(rec["file"] / MIB, 1)}

    # only the workers carry RANK (torchrun's agent, the accelerate process, sets it for them); a worker's own children
    # (a forked helper, a shell-out) inherit it: a rank is a process with RANK whose parent has none
    with_rank = {pid for pid, r in procs.items() if r["rank"] is not None}
    ranks = sorted((r for r in procs.values() if r["rank"] is not None and r.get("ppid") not in with_rank),
                   key=lambda r: r["rank"])
    out = {"wall_s": round(wall, 1), "command": shlex.join(cmd), "log": str(log_path)}
    if ranks:
        out["ranks"] = [{"rank": r["rank"], **mib(r)} for r in ranks]
        out["peak_rss_mib_max_rank"] = max(r["peak_rss_mib"] for r in out["ranks"])
        out["peak_anon_mib_max_rank"] = max(r["peak_anon_mib"] for r in out["ranks"])
    else:
        out["main"] = mib(procs.get(proc.pid, {"rss": 0, "anon": 0, "file": 0}))
        out["workers"] = len(procs) - 1
        out["tree_peak_pss_mib"] = round(tree_pss / MIB, 1)
    print(f"[scale] {name}: {wall:.1f}s | " + (" | ".join(f"rank {r['rank']} RSS {r['peak_rss_mib']:.0f} MiB (anon "
          f"{r['peak_anon_mib']:.0f}, file {r['peak_file_mib']:.0f})" for r in out.get("ranks", []))
          or f"main RSS {out['main']['peak_rss_mib']:.0f} MiB, tree PSS {out['tree_peak_pss_mib']:.0f} MiB"), flush=True)
    return out


# ------------------------------------------------------------------------------------------ inputs
def make_raw(raw: Path, users: int, items: int, events: int) -> dict:
    """Synthetic raw logs (reused when generation.json matches); returns the generation's counts and wall time."""
    from data_prep import synthetic

    cfg = synthetic.config(n_users=users, n_items=items, n_events=events, n_days=30, events_per_chunk=2_000_000)
    g = raw / "generation.json"
    if g.is_file() and json.loads(g.read_text())["config"] == synthetic.to_dict(cfg):
        return {"reused": True, **json.loads(g.read_text()).get("counts", {})}
    t0 = time.time()
    info = synthetic.generate(raw, cfg)
    return {"reused": False, "wall_s": round(time.time() - t0, 1), **info.get("counts", {})}


def make_text_tower(dest: Path) -> Path:
    """A random-init 2-layer BERT (hidden 64) with the bundled MiniLM tokenizer (data_prep's), saved as a HF folder."""
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lmrec_common.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(str(resolve_model_path("bundled:all-MiniLM-L6-v2")))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=64)).save_pretrained(str(dest))
    tok.save_pretrained(str(dest))
    return dest


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def minilm_probe(raw: Path, n: int) -> dict:
    """Frozen-encode time of the bundled all-MiniLM-L6-v2 on n catalogue titles (this process, torch threads = cores)."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModel, AutoTokenizer

    from lmrec_common.models import resolve_model_path

    path = str(resolve_model_path("bundled:all-MiniLM-L6-v2"))
    titles = [str(t) for t in pq.read_table(raw / "items" / "items.parquet", columns=["title"]).column("title").to_pylist()[:n]]
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    t0 = time.time()
    with torch.no_grad():
        for s in range(0, len(titles), 256):
            b = tok(titles[s : s + 256], padding=True, truncation=True, max_length=64, return_tensors="pt")
            model(**b).last_hidden_state.mean(1)
    sec = time.time() - t0
    return {"items": len(titles), "seconds": round(sec, 2), "items_per_s": round(len(titles) / sec, 1),
            "torch_threads": torch.get_num_threads()}


PROBE = """
import json, sys, time
from pathlib import Path
def mem():
    st = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines() if ":" in l)
    return {k: int(st[k].split()[0]) // 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
from train.data import EvalExamples, TrainExamples, open_prepared
import torch  # noqa: F401 (imported by train.data: counted in 'before')
prep = open_prepared(sys.argv[1])
max_len = int(sys.argv[2])
before, t0 = mem(), time.time()
tr = TrainExamples.build(prep.sequences, max_len)
ev = [EvalExamples.build(prep.sequences, s, max_len) for s in ("valid", "test")]
b = tr.collate(list(range(min(len(tr), 128))))
print(json.dumps({"max_len": max_len, "seconds": round(time.time() - t0, 2), "train_examples": len(tr),
                  "eval_examples": [len(e) for e in ev], "before_mib": before, "after_mib": mem()}))
"""


def examples_probe(code_dir: Path, prepared: Path, max_len: int) -> dict:
    """Memory of TrainExamples + EvalExamples (valid, test; every user) built by the train.data of ``code_dir`` (e.g. a
    worktree of an older commit: before/after) on ``prepared``, in a fresh process: RSS before and after, VmHWM."""
    env = dict(os.environ, PYTHONPATH=str(code_dir), HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    p = subprocess.run([sys.executable, "-c", PROBE, str(prepared), str(max_len)], capture_output=True, text=True, env=env,
                       cwd=str(code_dir))
    if p.returncode != 0:
        raise SystemExit(f"error: examples probe of {code_dir} failed:\n{p.stderr[-3000:]}")
    rev = git_commit(code_dir)
    out = {"code": str(code_dir), "commit": rev, **json.loads(p.stdout.strip().splitlines()[-1])}
    a, b = out["before_mib"], out["after_mib"]
    print(f"[scale] examples probe {rev} max_len {max_len}: {out['seconds']}s, RssAnon +{b['RssAnon'] - a['RssAnon']} MiB, "
          f"VmHWM {b['VmHWM']} MiB", flush=True)
    return out


# ------------------------------------------------------------------------------------------ one size
def run_size(a, users: int, save=lambda res: None) -> dict:
    """Every stage of ``a.stages`` at one size; ``save(res)`` after each stage (a later failure keeps the earlier ones)."""
    items = a.items if not a.quick else 2000
    events = users * a.events_per_user
    tag = f"u{users}"
    work = Path(a.work) / tag
    work.mkdir(parents=True, exist_ok=True)
    raw = Path(a.work) / f"raw-{tag}-i{items}-e{events}"
    print(f"[scale] size {users:,} users, {items:,} items, {events:,} events -> {work}", flush=True)
    res = {"users": users, "items": items, "events_generated": events, "stages": {}}
    res["generate"] = make_raw(raw, users, items, events)
    py, acc = sys.executable, str(Path(sys.executable).with_name("accelerate"))
    prepared = work / "prepared"
    tower = make_text_tower(Path(a.work) / "tiny_bert_h64")
    cache = work / "text_features"
    steps = a.steps if not a.quick else 6
    common = {"data": str(prepared), "output_dir": str(work / "ck"), "batch_size": 128, "max_steps": steps,
              "eval_every": max(steps // 2, 1), "eval_max_users": 2000 if not a.quick else 200,
              "final_eval_max_users": a.final_eval_users if not a.quick else 500, "save_every": 0, "log_every": 10,
              "tracker": "none", "early_stopping_patience": 0, "optim": {"lr": 1e-3, "warmup_steps": 10}}
    model = {"d_model": 64, "n_layers": 2, "n_heads": 1, "max_len": 50, "dropout": 0.1, "loss": "sampled_softmax",
             "num_negatives": 512}
    stages = [s for s in a.stages.split(",") if s]
    if "data_prep" in stages:
        cfg = write_yaml(work / "data_prep.yaml", {
            "events_path": str(raw / "events"), "items_path": str(raw / "items"), "output_dir": str(prepared),
            "item_text_template": "{title}", "tokenizer": "bundled:all-MiniLM-L6-v2", "max_text_tokens": 32,
            "event_types": ["view", "click", "cart", "purchase"], "split": "leave_last_out", "num_shards": 8,
            "num_proc": 0, "incremental": False})
        res["stages"]["data_prep"] = run_stage("data_prep", [py, "-m", "data_prep", "--config", str(cfg)],
                                               work / "data_prep.log", a.poll)
        save(res)
    for tower_kind in ("id", "hybrid"):
        if f"train_{tower_kind}" not in stages:
            continue
        m = dict(model, item_tower=tower_kind)
        if tower_kind == "hybrid":
            m.update(text_model_path=str(tower), text_mode="frozen", pooling="mean")
        cfg = write_yaml(work / f"train_{tower_kind}.yaml", {**common, "run_name": tower_kind, "model": m,
                                                             "text_feature_cache": str(cache)})
        res["stages"][f"train_{tower_kind}"] = run_stage(
            f"train_{tower_kind}", [acc, "launch", "-q", "--config_file", LAUNCH, "-m", "train", "--config", str(cfg),
                                    "resume=never"], work / f"train_{tower_kind}.log", a.poll)
        save(res)
    if "inference" in stages:
        final = work / "ck" / ("hybrid" if (work / "ck" / "hybrid" / "final").is_dir() else "id") / "final"
        cfg = write_yaml(work / "inference.yaml", {
            "model_dir": str(final), "prepared_dir": str(prepared), "output_dir": str(work / "recs"), "k": a.k,
            "text_feature_cache": str(cache), "user_batch_size": 1024, "num_threads": 0})
        st = res["stages"]["inference"] = run_stage(
            "inference", [acc, "launch", "-q", "--config_file", LAUNCH, "-m", "inference", "--config", str(cfg),
                          f"run_date={RUN_DATE}"], work / "inference.log", a.poll)
        table = Path(os.path.realpath(work / "recs" / f"dt={RUN_DATE}"))
        man = json.loads((table / "_manifest.json").read_text())
        st.update(model=final.parent.name, table=str(table), counts=man["counts"], k=a.k)
    prep_manifest = next(iter(sorted(prepared.glob("v*/manifest.json"))), None)
    if prep_manifest is not None:
        c = json.loads(prep_manifest.read_text()).get("counts", {})
        res["prepared"] = {k: c.get(k) for k in ("events_kept", "users", "items", "items_with_events") if k in c}
        res["prepared"]["path"] = str(prep_manifest.parent)
    return res


# ------------------------------------------------------------------------------------------ report
def machine() -> dict:
    import psutil
    import torch

    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"cpu": model, "nproc": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def ratios(sizes: list[dict]) -> dict:
    """Largest size / smallest size of each stage's peak memory and wall time."""
    if len(sizes) < 2:
        return {}
    lo, hi = min(sizes, key=lambda s: s["users"]), max(sizes, key=lambda s: s["users"])
    out = {"users": f"{hi['users']} / {lo['users']}", "users_ratio": hi["users"] / lo["users"]}
    for st in STAGES:
        a, b = lo["stages"].get(st), hi["stages"].get(st)
        if not (a and b):
            continue
        if a.get("commit") != b.get("commit") or a.get("commit") is None:  # measured on other code: no ratio
            out[st] = {"not_comparable": f"measured on different code ({a.get('commit')} at {lo['users']}, "
                                         f"{b.get('commit')} at {hi['users']} users)"}
            continue
        r = {"wall": round(b["wall_s"] / a["wall_s"], 2)}
        for k in ("peak_rss_mib_max_rank", "peak_anon_mib_max_rank", "tree_peak_pss_mib"):
            if k in a and a[k]:
                r[k] = round(b[k] / a[k], 3)
        if "main" in a:
            r["main_peak_rss_mib"] = round(b["main"]["peak_rss_mib"] / a["main"]["peak_rss_mib"], 3)
        out[st] = r
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python bench/scale.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", default="1000000", help="comma-separated user counts, one run each (ignored with --quick)")
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--events-per-user", type=int, default=10)
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per training run")
    ap.add_argument("--final-eval-users", type=int, default=10_000, help="final_eval_max_users of the training runs")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--minilm-probe", type=int, default=2000, help="titles encoded by the real MiniLM (0 = skip)")
    ap.add_argument("--examples-probe", default="", help="CODE_DIR[,CODE_DIR...]: only measure building the examples "
                    "with each folder's train.data on --probe-prepared (before/after), merged into --out")
    ap.add_argument("--probe-prepared", default="", help="prepared/<version> folder for --examples-probe")
    ap.add_argument("--probe-max-len", default="50,200")
    ap.add_argument("--quick", action="store_true", help="20k users, 2k items, 6 steps: proves the bench end to end")
    ap.add_argument("--poll", type=float, default=0.2, help="seconds between memory samples")
    ap.add_argument("--work", default=str(REPO / "work" / "bench" / "scale"))
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "scale_cpu.json"), help="results JSON (merged by size)")
    a = ap.parse_args(argv)
    sizes = [20_000] if a.quick else [int(x) for x in a.users.split(",")]
    bad = [s for s in a.stages.split(",") if s and s not in STAGES]
    if bad:
        raise SystemExit(f"error: --stages: unknown stage(s) {bad}; known {list(STAGES)}")
    out = Path(a.out)
    doc = json.loads(out.read_text()) if out.is_file() else {"sizes": []}
    doc["meta"] = {"command": "python " + shlex.join(["bench/scale.py", *(argv if argv is not None else sys.argv[1:])]),
                   "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
                   "launch": LAUNCH, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                   "load_avg_at_start": list(os.getloadavg())}
    commit = git_commit()

    def save(res: dict) -> None:
        res["date"] = doc["meta"]["date"]
        res["load_avg_now"] = list(os.getloadavg())
        for st in res["stages"].values():  # each stage says when and on which code it was measured (first: an
            st.setdefault("date", doc["meta"]["date"])  # earlier save of this size is ``old`` below, the same object)
            st.setdefault("commit", commit)
        old = next((s for s in doc["sizes"] if s["users"] == res["users"]), None)
        if old is not None:  # stages not run this time keep their earlier record (with its own date and commit)
            for st in old.get("stages", {}).values():
                st.setdefault("date", old.get("date"))
                st.setdefault("commit", None)
        if old is not None:
            res["stages"] = {**old.get("stages", {}), **res["stages"]}
        doc["sizes"] = sorted([s for s in doc["sizes"] if s["users"] != res["users"]] + [res], key=lambda s: s["users"])
        doc["ratios"] = ratios(doc["sizes"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")

    if a.examples_probe:
        doc.setdefault("examples_probe", [])
        for code in a.examples_probe.split(","):
            for ml in (int(x) for x in a.probe_max_len.split(",")):
                r = examples_probe(Path(code), Path(a.probe_prepared), ml)
                r["prepared"] = a.probe_prepared
                doc["examples_probe"] = [x for x in doc["examples_probe"] if (x["commit"], x["max_len"], x["prepared"]) !=
                                         (r["commit"], ml, r["prepared"])] + [r]
                out.write_text(json.dumps(doc, indent=1) + "\n")
        return doc
    for users in sizes:
        t0 = time.time()
        res = run_size(a, users, save)
        res["total_wall_s"] = round(time.time() - t0, 1)
        save(res)
    if a.minilm_probe and not a.quick:
        doc["minilm_probe"] = minilm_probe(Path(a.work) / f"raw-u{sizes[0]}-i{a.items}-e{sizes[0] * a.events_per_user}",
                                           a.minilm_probe)
        doc["minilm_probe"]["projected_s_for_items"] = round(a.items / doc["minilm_probe"]["items_per_s"], 1)
        out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"[scale] wrote {out}", flush=True)
    return doc


if __name__ == "__main__":
    main()
