"""Personalised search, measured: does blending the query with the user's history find the next item better than
the query alone or the history alone? (issue 32; the blend is inference/serve/engine.py Engine.blend)

    python bench/search_eval.py --model-dir work/checkpoints/sample/final --prepared-dir work/prepared/sample \
        --out docs/results/search_eval_sample.json
    python bench/search_eval.py --model-dir bench/out/quality/amazon2014-toy/runs-r1/hybrid_s0/final \
        --prepared-dir bench/out/quality/amazon2014-toy/prepared --title-sep "" --out docs/results/search_eval_amazon2014-toy.json

Protocol (held out, leave-last-out): for every user with a test event, the history is every event before it (as
training saw it: the model never trained on the target), the target is the test item, and the query is
``--words`` words drawn (seeded per user, kept in title order) from the target's title: its item text up to the
first ``--title-sep`` (the sample's template starts "{title}. "; "" = the whole text, for title-only catalogues).
Words shorter than 3 characters are skipped; titles with fewer words give all of them. Every candidate item is
ranked (unavailable items and the user's history left out, as /v1/search does with search_exclude_seen) by
score = (1 - w) z(<query, text vector>) + w z(<user, item vector>) for each w of --weights: w = 0 is query only
(plain text search), w = 1 history only (what /v1/recommend ranks by). Reports HR@10, NDCG@10, HR@50, MRR per w,
and paired differences (bench/paired.py) of the best w against w = 0 and w = 1, user by user, with 95% intervals.
A further row, ``query_vs_item_vectors``, ranks by <query, item vector> (id part included) instead of the text
vectors, the alternative the service does not use. The ranking is checked against Engine.search on a few users.
Writes aggregates only (safe for licensed data).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

WORD = re.compile(r"[^\W_]{3,}", re.UNICODE)


def query_words(title: str, n: int, rng: np.random.Generator) -> str:
    words = WORD.findall(title)
    if len(words) <= n:
        return " ".join(words) if words else title
    keep = np.sort(rng.choice(len(words), size=n, replace=False))
    return " ".join(words[i] for i in keep)


def ranks_of_targets(scores: torch.Tensor, target: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """scores (B, N), target (B,), banned (B, N) bool -> 1-based rank of each target among the allowed items."""
    s = scores.masked_fill(banned, float("-inf"))
    t = s.gather(1, target[:, None])
    return (s > t).sum(1) + 1


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--prepared-dir", required=True)
    ap.add_argument("--title-sep", default=". ", help="the title is the item text up to this separator ('' = all of it)")
    ap.add_argument("--words", type=int, default=2, help="query words drawn from the target's title")
    ap.add_argument("--weights", default="0,0.1,0.25,0.4,0.5,0.6,0.75,0.9,1")
    ap.add_argument("--max-users", type=int, default=0, help="0 = every user with a test event")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--text-feature-cache", default="")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from data_prep.schema import load_prepared
    from inference.run import history_windows, user_vectors_bucketed
    from inference.serve.config import ServeConfig
    from inference.serve.engine import Engine
    from paired import compare, per_user

    t0 = time.time()
    cfg = ServeConfig(model_dir=args.model_dir, prepared_dir=args.prepared_dir, text_feature_cache=args.text_feature_cache,
                      search_exclude_seen=True).checked()
    eng = Engine.load(cfg)
    if not eng.search_ready:
        raise SystemExit(f"{args.model_dir}: no text tower, nothing to search with")
    prep = load_prepared(eng.source.prepared_dir)
    texts = prep.items.data.table.column("text").to_pylist()
    titles = [t.split(args.title_sep)[0] if args.title_sep else t for t in texts]
    seq = prep.sequences.data.table.select(["user_id", "item_idx", "event_type", "test_pos"]).to_pylist()
    users = [r for r in seq if r["test_pos"] is not None and r["test_pos"] > 0
             and not eng.cat.excluded[r["item_idx"][r["test_pos"]]]]  # a target that can be recommended at all
    if args.max_users:
        users = users[: args.max_users]
    weights = [float(x) for x in args.weights.split(",")]
    excluded = torch.from_numpy(eng.cat.excluded)
    ranks = {w: [] for w in weights}
    ranks["query_vs_item_vectors"] = []
    T = eng.T
    for s in range(0, len(users), args.batch):
        chunk = users[s : s + args.batch]
        qs = []
        for r in chunk:
            rng = np.random.default_rng([args.seed, zlib.crc32(str(r["user_id"]).encode())])
            qs.append(query_words(titles[r["item_idx"][r["test_pos"]]], args.words, rng))
        target = torch.tensor([r["item_idx"][r["test_pos"]] for r in chunk])
        hv = [np.asarray(r["item_idx"][: r["test_pos"]], np.int64) for r in chunk]
        he = [np.asarray(r["event_type"][: r["test_pos"]], np.int64) for r in chunk]
        offs = np.zeros(len(chunk) + 1, np.int64)
        np.cumsum([len(h) for h in hv], out=offs[1:])
        vals, ets = np.concatenate(hv), np.concatenate(he)
        hist, et, w_len, _ = history_windows(vals, offs, ets, eng.cat.to_model, T, space="tonight")
        banned = excluded[None, :].repeat(len(chunk), 1)
        rows = torch.from_numpy(np.repeat(np.arange(len(chunk)), np.diff(offs)))
        banned[rows, torch.from_numpy(vals)] = True  # the history (search_exclude_seen)
        with torch.inference_mode():
            q = eng.encode_queries(qs)
            u = user_vectors_bucketed(eng.model, hist, et, eng.device, item_table=eng.cat.vectors).float()
            for w in weights:
                x, shift = eng.blend(q, u if w > 0 else None, w)
                sc = x @ eng.search_matrix.T - shift[:, None].float()
                ranks[w].append(ranks_of_targets(sc, target, banned))
            ranks["query_vs_item_vectors"].append(ranks_of_targets(q @ eng.cat.vectors.T, target, banned))
        print(f"[search_eval] {min(s + args.batch, len(users))}/{len(users)} users", flush=True)
    ranks = {k: torch.cat(v) for k, v in ranks.items()}

    # the batch ranking is the service's: Engine.search's top-10 holds the target exactly when its rank is <= 10
    checked = 0
    ids = prep.items.data.table.column("item_id").to_pylist()
    names = prep.event_types
    for i, r in enumerate(users[:20]):
        rng = np.random.default_rng([args.seed, zlib.crc32(str(r["user_id"]).encode())])
        qtext = query_words(titles[r["item_idx"][r["test_pos"]]], args.words, rng)
        h = r["item_idx"][: r["test_pos"]]
        for w in (0.0, weights[len(weights) // 2]):
            out = eng.search(qtext, [ids[j] for j in h], [names[e] for e in r["event_type"][: r["test_pos"]]], k=10,
                             history_weight=w)
            hit = str(ids[r["item_idx"][r["test_pos"]]]) in [str(x) for x in out["items"]]
            assert hit == bool(ranks[w][i] <= 10), (r["user_id"], w, hit, int(ranks[w][i]))
            checked += 1

    def summary(rk: torch.Tensor) -> dict:
        m = per_user(rk)
        return {k: round(float(v.mean()), 4) for k, v in m.items()}

    table = {str(w): summary(ranks[w]) for w in weights}
    table["query_vs_item_vectors"] = summary(ranks["query_vs_item_vectors"])
    best = max(weights, key=lambda w: float(per_user(ranks[w])["NDCG@10"].mean()))
    res = {
        "what": "held-out search: query = words of the next item's title, history = the events before it (bench/search_eval.py)",
        "model_dir": str(Path(args.model_dir).resolve()), "model_version": eng.model_version,
        "item_tower": eng.model.cfg.item_tower, "data_version": eng.data_version, "users": len(users),
        "catalogue_items": eng.n_items, "query_words": args.words, "title_sep": args.title_sep, "seed": args.seed,
        "by_history_weight": table, "best_weight_ndcg10": best,  # no example queries: the data behind them is never committed
        "paired_best_vs_query_only": compare(ranks[weights[0]], ranks[best]) if weights[0] == 0 else None,
        "paired_best_vs_history_only": compare(ranks[weights[-1]], ranks[best]) if weights[-1] == 1 else None,
        "checked_against_engine_search": checked, "wall_s": round(time.time() - t0, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} torch threads)".strip(),
        "date": dt.date.today().isoformat(),
    }
    for w in weights:
        m = table[str(w)]
        print(f"[search_eval] w {w:<4} | HR@10 {m['HR@10']:.4f} | NDCG@10 {m['NDCG@10']:.4f} | HR@50 {m['HR@50']:.4f} | MRR {m['MRR']:.4f}")
    m = table["query_vs_item_vectors"]
    print(f"[search_eval] query vs item vectors | HR@10 {m['HR@10']:.4f} | NDCG@10 {m['NDCG@10']:.4f}")
    for name in ("paired_best_vs_query_only", "paired_best_vs_history_only"):
        if res[name]:
            d = res[name]["NDCG@10"]
            print(f"[search_eval] {name}: NDCG@10 {d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] (n {d['n']})")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print(f"[search_eval] wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
