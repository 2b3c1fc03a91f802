"""Is model B better than model A on the same users? A paired comparison of two exported models.

    python bench/paired.py --prepared bench/out/quality/ml-1m/prepared/v1 \
        --a bench/out/quality/ml-1m/runs-c5500L4bf/hybrid_s0/final --b bench/out/quality/ml-1m/runs-c5500L6bf/hybrid_s0/final

Both models rank every user of the split on the protocol of bench/quality.py (all candidate items,
seen items excluded). Each metric is then compared USER BY USER: the mean of the per-user differences
B - A, its standard error (sd / sqrt(n)) and a 95% interval, next to the standard error of one model's
mean alone. Two models trained on the same users make correlated mistakes, so the paired error of a
difference is much smaller than the unpaired one, and it is the one that says whether a gap between two
runs of the same seed is more than noise. (It measures noise over users only: seed-to-seed variation
needs more seeds.) Several --a and --b (one pair per seed, by position) pool the seeds: each user's
difference is its mean over the pairs, the interval is over users. Prints a table; --out writes JSON
(aggregates only: safe for licensed data).

Runs of bench/quality.py need no ranking again: a run folder (or its record.json) keeps the per-user test ranks
(record.npz), so two tables' runs compare in seconds, e.g. a recipe before and after a change:

    python bench/paired.py --a bench/out/quality/amazon2014-toy/runs-r6/hybrid_s{0,1,2} \
        --b bench/out/quality/amazon2014-toy/runs-r7/hybrid_s{0,1,2}
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
    return compare_seeds([(ra, rb)])


def compare_seeds(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, dict]:
    """Paired statistics of B - A over the same users, pooled over seeds: ``pairs`` holds one (A ranks, B ranks)
    per seed, A and B trained with that seed. Each user's difference is the mean over the seeds of B - A, and
    the interval is over users. With one seed it is the plain paired comparison; with several, a user's
    seed-to-seed noise partly averages out, but a shift common to all users of one seed is not in the error
    (three seeds cannot measure it): the per-seed rows stay the ones that show that spread."""
    if not pairs:
        raise ValueError("no (A, B) rank pairs to compare")
    shapes = {tuple(t.shape) for pair in pairs for t in pair}
    if len(shapes) != 1:
        raise ValueError(f"the rank vectors cover different users: {sorted(shapes)}")
    per_seed = [(per_user(ra), per_user(rb)) for ra, rb in pairs]
    a = {k: torch.stack([pa[k] for pa, _ in per_seed]).mean(0) for k in per_seed[0][0]}
    b = {k: torch.stack([pb[k] for _, pb in per_seed]).mean(0) for k in per_seed[0][1]}
    n = pairs[0][0].numel()
    res = {}
    for k in a:
        d = b[k] - a[k]
        se = float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
        res[k] = {"a": float(a[k].mean()), "b": float(b[k].mean()), "diff": float(d.mean()), "se_paired": se,
                  "ci95": [float(d.mean()) - 1.96 * se, float(d.mean()) + 1.96 * se],
                  "se_one_model": float(a[k].std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan"),
                  "users_b_better": int((d > 0).sum()), "users_a_better": int((d < 0).sum()), "n": n,
                  "n_seeds": len(pairs)}
    return res


def record_file(path: str) -> Path | None:
    """The bench/quality.py record a --a/--b names (a run folder holding record.json, or the file itself); None
    for an exported model (a final/ folder)."""
    p = Path(path)
    if p.is_file() and p.name.endswith(".json"):
        return p
    if (p / "record.json").is_file():
        return p / "record.json"
    return None


def ranks_of_records(named: list[tuple[str, str]], records: dict[str, Path | None],
                     splits: str | None) -> dict[str, dict[str, torch.Tensor]]:
    """Test ranks of bench/quality.py runs as their records keep them: every one a record, of the same prepared
    data (dataset, candidates, users and their sequences), with its record.npz."""
    import quality

    if splits not in (None, "test"):
        raise SystemExit(f"[paired] --splits {splits}: a run's record keeps its test ranks only; name the runs' final/ "
                         "folders and --prepared to rank other splits")
    missing = [path for name, path in named if records[name] is None]
    if missing:
        raise SystemExit(f"[paired] {', '.join(missing)}: no record.json; compare runs of bench/quality.py with each "
                         "other, or exported final/ folders (with --prepared) with each other")
    ranks, first = {}, None
    for name, path in named:
        rec = quality.load_record(records[name])
        if rec.ranks is None:
            raise SystemExit(f"[paired] {records[name]}: its per-user ranks ({records[name].with_suffix('.npz').name}) "
                             "are missing; rerun the bench command that trained the run to evaluate it again")
        fp = rec.fingerprint()
        if first is None:
            first = (records[name], fp)
        else:
            try:
                quality.check_same_data(first[1], fp, f"[paired] {records[name]}")
            except SystemExit as e:  # name the record it was compared with
                raise SystemExit(f"{e} ({first[0]}): the users differ, a paired comparison needs the same users") from None
        ranks[name] = {"test": torch.as_tensor(rec.ranks)}
        print(f"[paired] {name}: {records[name]} ({rec.data.get('variant')} seed {rec.data.get('seed')}, "
              f"tag {rec.data.get('tag')})", flush=True)
    return ranks


def rank_models(named: list[tuple[str, str]], prepared: str, splits: list[str], device: str) -> dict[str, dict[str, torch.Tensor]]:
    """Every split's ranks of exported models (final/ folders), on bench/quality.py's protocol."""
    import quality  # bench/quality.py: the protocol (candidates, ranking, seen-item exclusion)
    from data_prep.schema import load_prepared
    from train.catalogue import Catalogue
    from train.data import held_out_splits
    from train.export import load_final

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    prep = load_prepared(prepared)
    cand = quality.candidate_mask(prep)
    ranks: dict[str, dict[str, torch.Tensor]] = {}
    for name, final in named:
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
    return ranks


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", help="prepared/<version> folder both models are evaluated on (not needed when "
                    "--a and --b are runs of bench/quality.py with their records)")
    ap.add_argument("--a", required=True, nargs="+", help="final/ of the reference model, or a bench/quality.py run "
                    "folder (its record.json); several (one per seed, in the order of --b): the comparison is pooled "
                    "over them, each paired with the --b of its position")
    ap.add_argument("--b", required=True, nargs="+", help="final/ or run folder of the challenger (as many as --a)")
    ap.add_argument("--splits", default=None, help="valid,test (default) for models; records keep test ranks only")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    if len(a.a) != len(a.b):
        raise SystemExit(f"[paired] --a names {len(a.a)} models and --b {len(a.b)}: give one challenger per reference "
                         "(the same seed at the same position)")
    named = [(f"a{i}", f) for i, f in enumerate(a.a)] + [(f"b{i}", f) for i, f in enumerate(a.b)]
    records = {name: record_file(path) for name, path in named}
    if any(records.values()):
        ranks, splits = ranks_of_records(named, records, a.splits), ["test"]
    else:
        if not a.prepared:
            raise SystemExit("[paired] --prepared is needed to rank exported models (final/ folders); runs of "
                             "bench/quality.py with a record.json need none")
        splits = (a.splits or "valid,test").split(",")
        ranks = rank_models(named, a.prepared, splits, a.device)
    out = {"command": " ".join(["python", "bench/paired.py"] + (argv if argv is not None else sys.argv[1:])),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "a": a.a if len(a.a) > 1 else a.a[0], "b": a.b if len(a.b) > 1 else a.b[0], "splits": {}}
    if len(a.a) > 1:
        out["per_seed"] = [{"a": fa, "b": fb, "splits": {s: compare(ranks[f"a{i}"][s], ranks[f"b{i}"][s]) for s in splits}}
                           for i, (fa, fb) in enumerate(zip(a.a, a.b))]
    for s in splits:
        res = compare_seeds([(ranks[f"a{i}"][s], ranks[f"b{i}"][s]) for i in range(len(a.a))])
        out["splits"][s] = res
        pooled = f", each user's mean over {len(a.a)} pairs" if len(a.a) > 1 else ""
        print(f"\n{s} ({res['HR@10']['n']} users): B - A, paired{pooled}")
        print(f"{'metric':8} {'A':>8} {'B':>8} {'B - A':>8} {'paired SE':>10} {'95% interval':>20} {'one model SE':>13} {'users B>A / A>B':>16}")
        for k, v in res.items():
            print(f"{k:8} {v['a']:8.4f} {v['b']:8.4f} {v['diff']:+8.4f} {v['se_paired']:10.4f} "
                  f"[{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}] {v['se_one_model']:13.4f} {v['users_b_better']:>7} / {v['users_a_better']:<7}")
        for i, one in enumerate(out.get("per_seed", [])):
            v = one["splits"][s]["NDCG@10"]
            print(f"  pair {i} alone: NDCG@10 B - A {v['diff']:+.4f} [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]  ({one['b']} vs {one['a']})")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
