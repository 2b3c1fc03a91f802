"""Is model B better than model A on the same users? A paired comparison of two exported models.

    python bench/paired.py --prepared bench/out/quality/ml-1m/prepared/v1 \
        --a bench/out/quality/ml-1m/runs-c5500L4bf/hybrid_s0/final --b bench/out/quality/ml-1m/runs-c5500L6bf/hybrid_s0/final

Both models rank every user of the split on the protocol of bench/quality.py (all candidate items,
seen items excluded). Each metric is then compared USER BY USER: the mean of the per-user differences
B - A, its standard error (sd / sqrt(n)) and a 95% interval, next to the standard error of one model's
mean alone. Two models trained on the same users make correlated mistakes, so the paired error of a
difference is much smaller than the unpaired one, and it is the one that says whether a gap between two
runs of the same seed is more than noise. (It measures noise over users only: seed-to-seed variation
needs more seeds.) Prints a table; --out writes JSON (aggregates only: safe for licensed data).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def per_user(ranks: torch.Tensor) -> dict[str, torch.Tensor]:
    """1-based ranks (N,) -> per-user HR@10, NDCG@10, HR@50, NDCG@50, MRR (N,) float64."""
    r = ranks.double()
    out = {}
    for k in (10, 50):
        hit = (r <= k).double()
        out[f"HR@{k}"] = hit
        out[f"NDCG@{k}"] = hit / torch.log2(r + 1)
    out["MRR"] = 1.0 / r
    return out


def compare(ra: torch.Tensor, rb: torch.Tensor) -> dict[str, dict]:
    """Paired statistics of B - A over the same users (same order)."""
    if ra.shape != rb.shape:
        raise ValueError(f"the two rank vectors cover different users: {tuple(ra.shape)} vs {tuple(rb.shape)}")
    a, b = per_user(ra), per_user(rb)
    n = ra.numel()
    res = {}
    for k in a:
        d = b[k] - a[k]
        se = float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
        res[k] = {"a": float(a[k].mean()), "b": float(b[k].mean()), "diff": float(d.mean()), "se_paired": se,
                  "ci95": [float(d.mean()) - 1.96 * se, float(d.mean()) + 1.96 * se],
                  "se_one_model": float(a[k].std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan"),
                  "users_b_better": int((d > 0).sum()), "users_a_better": int((d < 0).sum()), "n": n}
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", required=True, help="prepared/<version> folder both models are evaluated on")
    ap.add_argument("--a", required=True, help="final/ of the reference model")
    ap.add_argument("--b", required=True, help="final/ of the challenger")
    ap.add_argument("--splits", default="valid,test")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    import quality  # bench/quality.py: the protocol (candidates, ranking, seen-item exclusion)
    from data_prep.schema import load_prepared
    from train.data import held_out_splits
    from train.catalogue import Catalogue
    from train.export import load_final

    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    prep = load_prepared(a.prepared)
    cand = quality.candidate_mask(prep)
    splits = a.splits.split(",")
    ranks: dict[str, dict[str, torch.Tensor]] = {}
    for name, final in (("a", a.a), ("b", a.b)):
        metrics = Path(final) / "metrics.json"
        through = json.loads(metrics.read_text()).get("train_through", "train") if metrics.is_file() else "train"
        trained_on = [x for x in splits if x in ("valid", "test") and x not in held_out_splits(through)]
        if trained_on:
            raise SystemExit(f"[paired] {final} was trained through the {through} targets (a refit): compare it on the "
                             f"held-out splits only, not {','.join(trained_on)} (--splits)")
        t = time.time()
        model, _ = load_final(final)
        cat = Catalogue.build(prep.items, model)
        model.to(device)
        items = cat.to(device).item_vectors(model).float()

        def score(batch, model=model, items=items):
            return model.score(model.user_vectors(batch["hist"], batch["event_types"], item_table=items).float(), items)

        ranks[name] = {s: quality.rank_users(score, prep, s, model.cfg.max_len, cand, device)["ranks"] for s in splits}
        print(f"[paired] {name}: {final} ranked in {time.time() - t:.0f}s", flush=True)
    out = {"command": " ".join(["python", "bench/paired.py"] + (argv if argv is not None else sys.argv[1:])),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "a": a.a, "b": a.b, "splits": {}}
    for s in splits:
        res = compare(ranks["a"][s], ranks["b"][s])
        out["splits"][s] = res
        print(f"\n{s} ({res['HR@10']['n']} users): B - A, paired")
        print(f"{'metric':8} {'A':>8} {'B':>8} {'B - A':>8} {'paired SE':>10} {'95% interval':>20} {'one model SE':>13} {'users B>A / A>B':>16}")
        for k, v in res.items():
            print(f"{k:8} {v['a']:8.4f} {v['b']:8.4f} {v['diff']:+8.4f} {v['se_paired']:10.4f} "
                  f"[{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}] {v['se_one_model']:13.4f} {v['users_b_better']:>7} / {v['users_a_better']:<7}")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
