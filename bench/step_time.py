"""Time of one full-softmax training step of the sequential recommender on CPU, side by side for two
checkouts of this repo (e.g. before / after a change), or for several mixed precisions / depths of one
checkout, rounds interleaved so machine noise hits every row alike:

    git worktree add /tmp/lmrec-before <commit>
    python bench/step_time.py --compare /tmp/lmrec-before . --rounds 5
    python bench/step_time.py --precisions no,bf16 --layers 2,4     # bf16 autocast on CPU (AMX), 2 vs 4 layers
    python bench/step_time.py --layers 4 --d-models 64,128           # width
    python bench/step_time.py --precisions bf16 --onednn-cache 1024,64 --steps 64 --rounds 1   # RSS vs oneDNN's cache

The step is the MovieLens-1M shape of configs/train/ml1m_sasrec.yaml (SASRec: d 64 unless --d-models, 2 layers as it had then, 1 head,
max_len 200, dropout 0.2, batch 128, full softmax over 3,883 items) on SYNTHETIC sequences whose
lengths follow ML-1M's (median ~96 events, a quarter capped at 200): no MovieLens file is needed.
Each round runs ``--steps`` steps (forward + backward + AdamW) in a fresh subprocess per checkout,
after 2 warm-up steps; the figure is the median of the rounds' mean step times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

WORKER = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from train.model import RecModelConfig, SeqRecModel
steps, threads, tower, precision, layers, d = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
torch.set_num_threads(threads)
torch.manual_seed(0)
I, B, T = 3883, 128, 200
m = SeqRecModel(RecModelConfig(num_items=I, item_tower=tower, use_event_types=False, d_model=d, n_layers=layers,
                               n_heads=1, max_len=T, dropout=0.2))
g = torch.Generator().manual_seed(1)
# ML-1M-like lengths: log-normal around 96 events, capped at the window
lens = torch.exp(torch.randn(64 * B, generator=g) * 0.9 + 4.56).long().clamp(20, T + 1)
win = torch.randint(0, 3706, (64 * B, T + 1), generator=g)  # as on ML-1M, 177 catalogue items never occur
win[torch.arange(T + 1)[None] < (T + 1 - lens)[:, None]] = -1
kw = {}
if hasattr(m, "set_seen_items"):
    m.set_seen_items(torch.bincount(win[win >= 0], minlength=I).float())
try:  # checkouts with train/catalogue.py: the full softmax's candidates live in the catalogue
    from train.catalogue import Catalogue
    kw["catalogue"] = Catalogue(I)
    kw["catalogue"].set_training_counts(torch.bincount(win[win >= 0], minlength=I).float())
except ImportError:
    pass
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
def step(i):
    w = win[(i % 64) * B:(i % 64 + 1) * B]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):  # as accelerate's bf16 on CPU
        out = m(w[:, :-1], None, w[:, 1:], **kw)
    opt.zero_grad(); out["loss"].backward(); opt.step()
for i in range(2):
    step(i)
t = time.perf_counter()
for i in range(steps):
    step(2 + i)
import resource
print(json.dumps({"s_per_step": (time.perf_counter() - t) / steps,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


class Row(NamedTuple):
    repo: Path
    precision: str
    layers: int
    onednn_cache: str
    d_model: int

    @property
    def name(self) -> str:
        return (f"{self.repo} precision={self.precision} layers={self.layers} d_model={self.d_model}"
                + (f" onednn_cache={self.onednn_cache}" if self.onednn_cache else ""))


def run_one(repo: Path, steps: int, threads: int, tower: str, precision: str = "no", layers: int = 2,
            onednn_cache: str = "", d_model: int = 64) -> dict:
    env = dict(os.environ, PYTHONPATH=str(repo))
    if onednn_cache:  # the worker builds the model directly, so train.loop's default (64) does not apply
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = onednn_cache
    out = subprocess.run([sys.executable, "-c", WORKER, str(repo), str(steps), str(threads), tower, precision, str(layers),
                          str(d_model)],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"[step_time] worker for {repo} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", nargs="+", default=["."], help="checkouts of the repo to time (first = baseline)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--tower", default="id", choices=["id"], help="id only: no text model needed")
    ap.add_argument("--precisions", default="no", help="comma-separated: no (float32), bf16 (CPU autocast, as "
                    "accelerate's --mixed_precision bf16)")
    ap.add_argument("--layers", default="2", help="comma-separated user-tower depths, e.g. 2,4")
    ap.add_argument("--d-models", default="64", help="comma-separated model widths, e.g. 64,128")
    ap.add_argument("--onednn-cache", default="", help="comma-separated ONEDNN_PRIMITIVE_CACHE_CAPACITY values "
                    "(empty: the environment's, else oneDNN's 1024); each of the 64 synthetic batches has its own "
                    "number of target positions, so bf16 meets new shapes for the first 64 steps")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if set(precisions) - {"no", "bf16"}:
        raise SystemExit(f"[step_time] --precisions takes no and/or bf16, not {args.precisions!r}")
    layers = [int(x) for x in args.layers.split(",") if x.strip()]
    widths = [int(x) for x in args.d_models.split(",") if x.strip()]
    caches = [c.strip() for c in args.onednn_cache.split(",")] if args.onednn_cache else [""]
    rows_spec = [Row(Path(r).resolve(), p, n, c, w) for r in args.compare for p in precisions for n in layers
                 for c in caches for w in widths]
    times: dict[tuple, list[float]] = {s: [] for s in rows_spec}
    rss: dict[tuple, float] = {s: 0.0 for s in rows_spec}
    for rnd in range(args.rounds):
        for spec in rows_spec:
            res = run_one(spec.repo, args.steps, args.threads, args.tower, spec.precision, spec.layers,
                          spec.onednn_cache, spec.d_model)
            times[spec].append(res["s_per_step"])
            rss[spec] = max(rss[spec], res["peak_rss_mb"])
            print(f"[step_time] round {rnd + 1}/{args.rounds} {spec.name}: {res['s_per_step']:.3f} s/step, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    base = statistics.median(times[rows_spec[0]])
    rows = []
    for spec in rows_spec:
        t = times[spec]
        med = statistics.median(t)
        rows.append({"repo": str(spec.repo), "precision": spec.precision, "layers": spec.layers, "d_model": spec.d_model,
                     "onednn_cache": spec.onednn_cache or None,
                     "median_s_per_step": med,
                     "min": min(t), "max": max(t), "speedup_vs_first": base / med, "peak_rss_mb": rss[spec]})
        print(f"{spec.name}: median {med:.3f} s/step (range {min(t):.3f}-{max(t):.3f}), "
              f"{base / med:.2f}x the first, peak RSS {rss[spec]:.0f} MB", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                              "threads": args.threads, "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
