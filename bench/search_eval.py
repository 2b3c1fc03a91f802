"""Personalised search, measured: does blending the query with the user's history find the next item better than
the query alone or the history alone? (issue 32; the blend is inference/serve/engine.py Engine.blend)

    python bench/search_eval.py --model-dir work/checkpoints/sample/final --prepared-dir work/prepared/sample \
        --out docs/results/search_eval_sample.json
    python bench/search_eval.py --model-dir bench/out/quality/amazon2014-toy/runs-<tag>/hybrid_s0/final \
        --prepared-dir bench/out/quality/amazon2014-toy/prepared --title-sep "" --out docs/results/search_eval_amazon2014-toy.json

Protocol (held out, leave-last-out): for every user with a held-out event, the history is every event before it (as
training saw it: the model never trained on the target), the target is the held-out item, and the query is
``--words`` words drawn (seeded per user, kept in title order) from the target's title: its item text up to the
first ``--title-sep`` (the sample's template starts "{title}. "; "" = the whole text, for title-only catalogues).
Words shorter than 3 characters are skipped; titles with fewer words give all of them. Every candidate item is
ranked (unavailable items and the user's history left out, as /v1/search does with search_exclude_seen) by
score = (1 - w) z(<query, text vector>) + w z(<user, item vector>) for each w of --weights: w = 0 is query only
(plain text search), w = 1 history only (what /v1/recommend ranks by). Reports HR@10, NDCG@10, HR@50, MRR per w,
and paired differences (bench/paired.py) of the best w against w = 0 and w = 1, user by user, with 95% intervals.
The best w is chosen on the validation targets (each user's second-to-last event, with its own drawn query); every
reported figure is on the test targets. Each text space of --spaces (the service's search_text_space: ``encoder``,
the frozen encoder's own sentence space; ``model``, the item tower's text part) gets its own table, and the first two
are compared user by user, each at its chosen weight. In the model space a further row, ``query_vs_item_vectors``,
ranks by <query, item vector> (id part included) instead of the text vectors, an alternative the service does not
use. The ranking is checked against Engine.search on 20 users x 2 weights per split.
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


def load_engine(args, space: str):
    from inference.serve.config import ServeConfig
    from inference.serve.engine import Engine

    cfg = ServeConfig(model_dir=args.model_dir, prepared_dir=args.prepared_dir, text_feature_cache=args.text_feature_cache,
                      search_exclude_seen=True, search_text_space=space).checked()
    eng = Engine.load(cfg)
    if not eng.search_ready:
        raise SystemExit(f"{args.model_dir}: no text tower, nothing to search with")
    return eng


def read_data(prepared_dir: str, title_sep: str) -> dict:
    """What every split and space reads from the prepared data, read once: item ids, texts, titles, event type names
    and the users' sequences with their held-out positions."""
    from data_prep.schema import load_prepared

    prep = load_prepared(prepared_dir)
    texts = prep.items.data.table.column("text").to_pylist()
    return {"ids": prep.items.data.table.column("item_id").to_pylist(), "texts": texts,
            "titles": [t.split(title_sep)[0] if title_sep else t for t in texts], "names": prep.event_types,
            "seq": prep.sequences.data.table.select(["user_id", "item_idx", "event_type", "valid_pos", "test_pos"]).to_pylist()}


def eval_split(args, eng, data: dict, split: str, weights: list[float]) -> tuple[dict, int, int]:
    """Ranks of the held-out ``split`` targets (valid / test) for every weight (+ query_vs_item_vectors in the model
    space) with the engine's search; the history is every event before the target. Returns (ranks, users, how many
    rankings were checked against Engine.search)."""
    from inference.run import history_windows, user_vectors_bucketed

    pos_col = f"{split}_pos"
    titles = data["titles"]
    users = [r for r in data["seq"] if r[pos_col] is not None and r[pos_col] > 0
             and not eng.cat.excluded[r["item_idx"][r[pos_col]]]]  # a target that can be recommended at all
    if args.max_users:
        users = users[: args.max_users]
    excluded = torch.from_numpy(eng.cat.excluded)
    ranks = {w: [] for w in weights}
    if eng.search_space == "model":
        ranks["query_vs_item_vectors"] = []

    def query(r) -> str:
        rng = np.random.default_rng([args.seed, zlib.crc32(str(r["user_id"]).encode())] + ([1] if split == "valid" else []))
        return query_words(titles[r["item_idx"][r[pos_col]]], args.words, rng)

    for s in range(0, len(users), args.batch):
        chunk = users[s : s + args.batch]
        qs = [query(r) for r in chunk]
        target = torch.tensor([r["item_idx"][r[pos_col]] for r in chunk])
        hv = [np.asarray(r["item_idx"][: r[pos_col]], np.int64) for r in chunk]
        he = [np.asarray(r["event_type"][: r[pos_col]], np.int64) for r in chunk]
        offs = np.zeros(len(chunk) + 1, np.int64)
        np.cumsum([len(h) for h in hv], out=offs[1:])
        vals, ets = np.concatenate(hv), np.concatenate(he)
        hist, et, _, _ = history_windows(vals, offs, ets, eng.cat.to_model, eng.T, space="tonight")
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
            if "query_vs_item_vectors" in ranks:
                ranks["query_vs_item_vectors"].append(ranks_of_targets(q @ eng.cat.vectors.T, target, banned))
        print(f"[search_eval] {eng.search_space} space, {split}: {min(s + args.batch, len(users))}/{len(users)} users",
              flush=True)
    ranks = {k: torch.cat(v) for k, v in ranks.items()}

    # the batch ranking is the service's: Engine.search's top-10 holds the target exactly when its rank is <= 10
    ids, names = data["ids"], data["names"]
    checked = 0
    for i, r in enumerate(users[:20]):
        h = r["item_idx"][: r[pos_col]]
        for w in (0.0, weights[len(weights) // 2]):
            out = eng.search(query(r), [ids[j] for j in h], [names[e] for e in r["event_type"][: r[pos_col]]], k=10,
                             history_weight=w)
            hit = str(ids[r["item_idx"][r[pos_col]]]) in [str(x) for x in out["items"]]
            assert hit == bool(ranks[w][i] <= 10), (eng.search_space, split, r["user_id"], w, hit, int(ranks[w][i]))
            checked += 1
    return ranks, len(users), checked


def search_latency(eng, data: dict, args) -> dict:
    """Wall time of Engine.search (the service's own call: query encoding, user tower, blend, top-K) for one query and
    the history of the first test user with at least 20 events, ``args.latency`` calls after 10 warm-up ones."""
    ids, rows = data["ids"], data["seq"]
    r = next((r for r in rows if r["test_pos"] is not None and r["test_pos"] >= 20), rows[0])
    hist = [ids[j] for j in r["item_idx"][: r["test_pos"] or len(r["item_idx"])]]
    query = query_words(data["texts"][r["item_idx"][-1]], args.words, np.random.default_rng(args.seed))
    times = []
    for i in range(10 + args.latency):
        t = time.perf_counter()
        eng.search(query, hist, None, k=20)
        if i >= 10:
            times.append((time.perf_counter() - t) * 1000)
    return {"p50": round(float(np.percentile(times, 50)), 2), "p99": round(float(np.percentile(times, 99)), 2),
            "calls": len(times), "history_len": len(hist)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--prepared-dir", required=True)
    ap.add_argument("--title-sep", default=". ", help="the title is the item text up to this separator ('' = all of it)")
    ap.add_argument("--words", type=int, default=2, help="query words drawn from the target's title")
    ap.add_argument("--weights", default="0,0.1,0.25,0.4,0.5,0.6,0.75,0.9,1")
    ap.add_argument("--spaces", default="encoder,model",
                    help="search_text_space values to measure side by side (the first two are compared)")
    ap.add_argument("--max-users", type=int, default=0, help="0 = every user with a held-out event")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--text-feature-cache", default="")
    ap.add_argument("--latency", type=int, default=0,
                    help="also time N Engine.search calls per space (one query, one test history, after 10 warm-up "
                         "calls) and report p50 / p99 ms")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from paired import compare, per_user

    t0 = time.time()
    weights = [float(x) for x in args.weights.split(",")]
    spaces = [x.strip() for x in args.spaces.split(",") if x.strip()]
    if not spaces or any(x not in ("auto", "encoder", "model") for x in spaces) or len(set(spaces)) != len(spaces):
        raise SystemExit(f"--spaces: expected distinct values of auto, encoder, model; got {args.spaces!r}")

    def summary(rk: torch.Tensor) -> dict:
        m = per_user(rk)
        return {k: round(float(v.mean()), 4) for k, v in m.items()}

    def ndcg(rk: torch.Tensor) -> float:
        return float(per_user(rk)["NDCG@10"].mean())

    out_spaces, chosen, eng, n_users, data = {}, {}, None, {}, None
    for space in spaces:
        eng = load_engine(args, space)
        data = data or read_data(eng.source.prepared_dir, args.title_sep)
        valid, n_users["valid"], c_valid = eval_split(args, eng, data, "valid", weights)
        best = max(weights, key=lambda w: ndcg(valid[w]))  # the weight is chosen on validation targets
        test, n_users["test"], c_test = eval_split(args, eng, data, "test", weights)
        name = eng.search_space
        table = {str(k): summary(v) for k, v in test.items()}
        entry = {"valid_ndcg10_by_history_weight": {str(w): round(ndcg(valid[w]), 4) for w in weights},
                 "best_weight_on_valid": best, "by_history_weight": table,
                 "paired_best_vs_query_only": compare(test[weights[0]], test[best]) if weights[0] == 0 else None,
                 "paired_best_vs_history_only": compare(test[weights[-1]], test[best]) if weights[-1] == 1 else None,
                 "checked_against_engine_search": c_valid + c_test}
        if args.latency:
            entry["latency_ms"] = search_latency(eng, data, args)
            print(f"[search_eval] {name} space: Engine.search p50 {entry['latency_ms']['p50']:.1f} / p99 "
                  f"{entry['latency_ms']['p99']:.1f} ms ({args.latency} calls)")
        out_spaces[name] = entry
        chosen[name] = test[best]
        print(f"[search_eval] {name} space: best weight on validation {best} (validation NDCG@10 "
              + ", ".join(f"{w:g}: {ndcg(valid[w]):.4f}" for w in weights) + "); test:")
        for w in weights:
            m = table[str(w)]
            print(f"[search_eval] {name:<7} w {w:<4} | HR@10 {m['HR@10']:.4f} | NDCG@10 {m['NDCG@10']:.4f} | "
                  f"HR@50 {m['HR@50']:.4f} | MRR {m['MRR']:.4f}")
        if "query_vs_item_vectors" in table:
            m = table["query_vs_item_vectors"]
            print(f"[search_eval] {name:<7} query vs item vectors | HR@10 {m['HR@10']:.4f} | NDCG@10 {m['NDCG@10']:.4f}")
        for key in ("paired_best_vs_query_only", "paired_best_vs_history_only"):
            if entry[key]:
                d = entry[key]["NDCG@10"]
                print(f"[search_eval] {name:<7} {key}: NDCG@10 {d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] "
                      f"(n {d['n']})")
    paired_spaces = None
    names = list(out_spaces)
    if len(names) >= 2:  # each space at its validation-chosen weight, test targets user by user: first - second
        paired_spaces = {"a": names[1], "b": names[0], **compare(chosen[names[1]], chosen[names[0]])}
        d = paired_spaces["NDCG@10"]
        print(f"[search_eval] {names[0]} over {names[1]} (each at its weight chosen on validation), test NDCG@10 "
              f"{d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]")
    assert eng is not None
    res = {
        "what": "held-out search: query = words of the held-out item's title, history = the events before it; weight "
                "chosen on validation targets, reported on test targets (bench/search_eval.py)",
        "model_dir": str(Path(args.model_dir).resolve()), "model_version": eng.model_version,
        "item_tower": eng.model.cfg.item_tower, "trained_text_mode": eng.info.get("trained_text_mode"),
        "text_whiten": eng.model.cfg.text_whiten, "data_version": eng.data_version, "users": n_users,
        "catalogue_items": eng.n_items, "query_words": args.words, "title_sep": args.title_sep, "seed": args.seed,
        # no example queries: the data behind them is never committed
        "spaces": out_spaces, "paired_first_space_over_second": paired_spaces,
        "wall_s": round(time.time() - t0, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} torch threads)".strip(),
        "date": dt.date.today().isoformat(),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print(f"[search_eval] wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
