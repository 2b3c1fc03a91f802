"""Personalised search, measured: does blending the query with the user's history find the next item better than
the query alone or the history alone, and with which weight? (the blend: inference/serve/engine.py Engine.search_scores)

    python bench/search_eval.py --model-dir work/checkpoints/sample-latest/final --prepared-dir work/prepared/sample \
        --query-from title,attribute --out docs/results/search_eval_sample.json
    python bench/search_eval.py --model-dir bench/out/quality/amazon2014-toy/runs-<tag>/hybrid_s0/final \
        --prepared-dir bench/out/quality/amazon2014-toy/prepared --title-sep "" --out docs/results/search_eval_amazon2014-toy.json

Protocol (held out, leave-last-out): for every user with a held-out event, the history is every event before it (as
training saw it: the model never trained on the target) and the target is the held-out item. Two kinds of query
(--query-from, each on every user):
- ``title`` (an item named): ``--words`` words drawn (seeded per user, kept in title order) from the target's title,
  its item text up to the first ``--title-sep`` (the sample's template starts "{title}. "; "" = the whole text, for
  title-only catalogues). Words shorter than 3 characters are skipped; titles with fewer words give all of them.
- ``attribute`` (a need named): one short field (1 to --max-attribute-words words) of the target's text after the
  title, drawn seeded per user: a film's genre ("Comedy"), a shop item's category or brand. Such a query fits many
  items, so the history has to do more of the ranking. Users whose target has no short field are left out (counted);
  a catalogue with none is one clear message.
Every candidate item is ranked (unavailable items and the user's history left out, as /v1/search does with
search_exclude_seen) by score = (1 - w) z(<query, text vector>) + w z(<user, item vector>):
- for each fixed w of --weights: w = 0 is query only (plain text search), w = 1 history only (what /v1/recommend
  ranks by); the best w of each kind is chosen on the validation targets (each user's second-to-last event, with its
  own drawn query), with paired differences (bench/paired.py) against w = 0 and w = 1, user by user, 95% intervals;
- with w following each query's sharpness (Engine.adaptive_weight): ``adaptive`` = the service settings measured
  (--broad-weight, --sharpness-range; by default one weight), and the rule of a grid (broad weights x sharpness ranges,
  and "one weight") chosen on validation with NDCG@10 averaged over the kinds, then reported on test beside one
  weight, paired. The chosen rule is printed as the serve config lines to set.
Every reported figure is on the test targets. Each text space of --spaces (the service's search_text_space:
``encoder``, the frozen encoder's own sentence space; ``model``, the item tower's text part) gets its own tables, and
the first two are compared user by user, each at its chosen weight. In the model space a further row,
``query_vs_item_vectors``, ranks by <query, item vector> (id part included) instead of the text vectors, an
alternative the service does not use. The ranking is checked against Engine.search on 20 users x (w = 0, the middle
w, the service's own) per split and kind. Writes aggregates only (safe for licensed data).
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
FIELD_SEP = re.compile(r"\.\s+|[,;|]\s*")  # "Animation, Children's, Comedy", "Garden. Suvela. A long description."


def query_words(title: str, n: int, rng: np.random.Generator) -> str:
    words = WORD.findall(title)
    if len(words) <= n:
        return " ".join(words) if words else title
    keep = np.sort(rng.choice(len(words), size=n, replace=False))
    return " ".join(words[i] for i in keep)


def attributes(text: str, title_sep: str, max_words: int) -> list[str]:
    """The short fields of an item text after its title: what a shopper types for a need (a genre, a category, a brand)."""
    if not title_sep or title_sep not in text:
        return []
    fields = (f.strip().rstrip(".").strip() for f in FIELD_SEP.split(text.split(title_sep, 1)[1]))
    return [f for f in fields if WORD.search(f) and len(f.split()) <= max_words]


def ranks_of_targets(scores: torch.Tensor, target: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """scores (B, N), target (B,), banned (B, N) bool -> 1-based rank of each target among the allowed items."""
    s = scores.masked_fill(banned, float("-inf"))
    t = s.gather(1, target[:, None])
    return (s > t).sum(1) + 1


def load_engine(args, space: str):
    from inference.serve.config import ServeConfig
    from inference.serve.engine import Engine

    from lmrec_common.config import ConfigError

    try:
        rng = tuple(float(x) for x in args.sharpness_range.split(","))
        cfg = ServeConfig(model_dir=args.model_dir, prepared_dir=args.prepared_dir, text_feature_cache=args.text_feature_cache,
                          search_exclude_seen=True, search_text_space=space, search_broad_history_weight=args.broad_weight,
                          search_sharpness_range=rng).checked()
    except (ValueError, ConfigError) as e:
        raise SystemExit(f"--broad-weight / --sharpness-range: {e}") from None
    eng = Engine.load(cfg)
    if not eng.search_ready:
        raise SystemExit(f"{args.model_dir}: no text tower, nothing to search with")
    return eng


def read_data(prepared_dir: str, title_sep: str, max_attribute_words: int = 3) -> dict:
    """What every split and space reads from the prepared data, read once: item ids, texts, titles, attributes, event
    type names and the users' sequences with their held-out positions."""
    from data_prep.schema import load_prepared

    prep = load_prepared(prepared_dir)
    texts = prep.items.data.table.column("text").to_pylist()
    return {"ids": prep.items.data.table.column("item_id").to_pylist(), "texts": texts,
            "titles": [t.split(title_sep)[0] if title_sep else t for t in texts],
            "attributes": [attributes(t, title_sep, max_attribute_words) for t in texts], "names": prep.event_types,
            "seq": prep.sequences.data.table.select(["user_id", "item_idx", "event_type", "valid_pos", "test_pos"]).to_pylist()}


ADAPTIVE_BROAD = (0.5, 0.6, 0.75, 0.9)  # the broad-query weights and sharpness ranges the validation grid tries
ADAPTIVE_RANGES = ((0.5, 1.5), (1.0, 2.0), (1.0, 3.0), (1.5, 2.5), (1.5, 3.5), (2.0, 3.0))
DEFAULT_RULE = "adaptive"  # the service's own rule (the ServeConfig it loads: one weight unless broad queries get theirs)
ONE_WEIGHT = "one weight"  # the grid's rule without adaptation: search_history_weight for every query
CHOSEN_RULE = "adaptive (chosen on validation)"  # the grid's best rule on validation, reported on test


def rule_name(broad: float, rng: tuple[float, float]) -> str:
    return f"adaptive broad {broad:g} range {rng[0]:g}-{rng[1]:g}"


def eval_split(args, eng, data: dict, split: str, kind: str, weights: list[float], rules: dict) -> tuple[dict, dict, int]:
    """Ranks of the held-out ``split`` targets (valid / test) with ``kind`` queries (title / attribute) for every fixed
    weight, every adaptive rule (name -> (broad weight, sharpness range), None = the service's defaults) and, in the
    model space, query_vs_item_vectors; the history is every event before the target. Returns (ranks, counts: users used,
    left out for a target without attributes, sharpness percentiles; how many rankings were checked against
    Engine.search)."""
    from inference.run import history_windows, user_vectors_bucketed

    pos_col = f"{split}_pos"
    titles, attrs = data["titles"], data["attributes"]
    users = [r for r in data["seq"] if r[pos_col] is not None and r[pos_col] > 0
             and not eng.cat.excluded[r["item_idx"][r[pos_col]]]]  # a target that can be recommended at all
    counts = {}
    if kind == "attribute":
        n = len(users)
        users = [r for r in users if attrs[r["item_idx"][r[pos_col]]]]
        counts["left_out_no_attribute"] = n - len(users)
        if not users:
            raise SystemExit(f"--query-from attribute: no {split} target's text has a short field after its title "
                             f"(split at {args.title_sep!r}, then at '. ', ',', ';', '|'; at most {args.max_attribute_words} "
                             "words): this catalogue's text has no genres, categories or brands to ask for")
    if args.max_users:
        users = users[: args.max_users]
    excluded = torch.from_numpy(eng.cat.excluded)
    ranks = {k: [] for k in [*weights, *rules]}
    if eng.search_space == "model":
        ranks["query_vs_item_vectors"] = []
    sharp_all = []

    def query(r) -> str:
        rng = np.random.default_rng([args.seed, zlib.crc32(str(r["user_id"]).encode())] + ([1] if split == "valid" else []))
        target = r["item_idx"][r[pos_col]]
        if kind == "attribute":
            return str(rng.choice(attrs[target]))
        return query_words(titles[target], args.words, rng)

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
            zt, zu, sharp = eng.search_parts(q, u)
            sharp_all.append(sharp)
            for w in weights:
                ranks[w].append(ranks_of_targets(eng.blend(zt, zu, w), target, banned))
            for name, rule in rules.items():
                ww = eng.adaptive_weight(sharp) if rule is None else eng.adaptive_weight(sharp, *rule)
                ranks[name].append(ranks_of_targets(eng.blend(zt, zu, ww), target, banned))
            if "query_vs_item_vectors" in ranks:
                ranks["query_vs_item_vectors"].append(ranks_of_targets(q @ eng.cat.vectors.T, target, banned))
        print(f"[search_eval] {eng.search_space} space, {kind} queries, {split}: {min(s + args.batch, len(users))}/"
              f"{len(users)} users", flush=True)
    ranks = {k: torch.cat(v) for k, v in ranks.items()}
    sharp = torch.cat(sharp_all).numpy()
    counts.update(used=len(users), sharpness={f"p{p}": round(float(np.percentile(sharp, p)), 2) for p in (10, 25, 50, 75, 90)})

    # the batch ranking is the service's: Engine.search's top-10 holds the target exactly when its rank is <= 10
    ids, names = data["ids"], data["names"]
    checked = 0
    for i, r in enumerate(users[:20]):
        h = r["item_idx"][: r[pos_col]]
        for w in (0.0, weights[len(weights) // 2], None):
            out = eng.search(query(r), [ids[j] for j in h], [names[e] for e in r["event_type"][: r[pos_col]]], k=10,
                             history_weight=w)
            hit = str(ids[r["item_idx"][r[pos_col]]]) in [str(x) for x in out["items"]]
            key = DEFAULT_RULE if w is None else w
            if key in ranks:
                assert hit == bool(ranks[key][i] <= 10), (eng.search_space, kind, split, r["user_id"], w, hit, int(ranks[key][i]))
                checked += 1
    return ranks, counts, checked


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
    ap.add_argument("--query-from", default="title",
                    help="comma-separated kinds of query, each measured on every user: title = --words words of the "
                         "target's title (an item named); attribute = one short field of its text after the title, such "
                         "as a genre, category or brand (a need named)")
    ap.add_argument("--max-attribute-words", type=int, default=3, help="the longest field an attribute query asks for")
    ap.add_argument("--weights", default="0,0.1,0.25,0.4,0.5,0.6,0.75,0.9,1")
    ap.add_argument("--broad-weight", type=float, default=None,
                    help="the service settings measured as the 'adaptive' row: search_broad_history_weight (default: none, "
                         "one weight)")
    ap.add_argument("--sharpness-range", default="1,2", help="... and search_sharpness_range, as low,high")
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
    kinds = [x.strip() for x in args.query_from.split(",") if x.strip()]
    if not kinds or any(x not in ("title", "attribute") for x in kinds) or len(set(kinds)) != len(kinds):
        raise SystemExit(f"--query-from: expected distinct values of title, attribute; got {args.query_from!r}")

    def summary(rk: torch.Tensor) -> dict:
        m = per_user(rk)
        return {k: round(float(v.mean()), 4) for k, v in m.items()}

    def ndcg(rk: torch.Tensor) -> float:
        return float(per_user(rk)["NDCG@10"].mean())

    def show(d: dict) -> str:
        return f"NDCG@10 {d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] (n {d['n']})"

    out = {k: {"spaces": {}} for k in kinds}
    chosen: dict[str, dict[str, torch.Tensor]] = {k: {} for k in kinds}
    adaptive, eng, data = {}, None, None
    for space in spaces:
        eng = load_engine(args, space)
        data = data or read_data(eng.source.prepared_dir, args.title_sep, args.max_attribute_words)
        name = eng.search_space
        cfg = eng.cfg
        grid = {ONE_WEIGHT: (cfg.search_history_weight, (1.0, 2.0)),  # the broad weight = the item weight: no adaptation
                **{rule_name(b, r): (b, r) for b in ADAPTIVE_BROAD for r in ADAPTIVE_RANGES}}
        valid, test = {}, {}
        for kind in kinds:
            valid[kind] = eval_split(args, eng, data, "valid", kind, weights, {DEFAULT_RULE: None, **grid})
        # one adaptive rule for every kind of query: the grid's best on validation, NDCG@10 averaged over the kinds
        mean_valid = {g: float(np.mean([ndcg(valid[k][0][g]) for k in kinds])) for g in [DEFAULT_RULE, *grid]}
        best_rule = max(grid, key=lambda g: mean_valid[g])  # ties: the first (one weight)
        b_w, b_r = grid[best_rule]
        adaptive[name] = {
            "service_default": {"history_weight": cfg.search_history_weight, "broad_history_weight":
                                cfg.search_broad_history_weight, "sharpness_range": list(cfg.search_sharpness_range),
                                "valid_ndcg10_mean_over_kinds": round(mean_valid[DEFAULT_RULE], 4)},
            "chosen_on_valid": {"rule": best_rule, "broad_history_weight": None if best_rule == ONE_WEIGHT else b_w,
                                "sharpness_range": list(b_r), "valid_ndcg10_mean_over_kinds": round(mean_valid[best_rule], 4)},
            "valid_ndcg10_mean_over_kinds_by_rule": {g: round(v, 4) for g, v in mean_valid.items()}}
        print(f"[search_eval] {name} space: the rule chosen on validation ({' and '.join(kinds)} queries, NDCG@10 averaged "
              f"over them): {best_rule}, {mean_valid[best_rule]:.4f} (the service's settings: {mean_valid[DEFAULT_RULE]:.4f}); "
              "in the serve config: " + ("search_broad_history_weight: null" if best_rule == ONE_WEIGHT else
                                         f"search_broad_history_weight: {b_w:g}, search_sharpness_range: [{b_r[0]:g}, {b_r[1]:g}]"))
        for kind in kinds:
            v_ranks, v_counts, c_valid = valid[kind]
            best = max(weights, key=lambda w: ndcg(v_ranks[w]))  # the fixed weight chosen on this kind's validation
            rules = {DEFAULT_RULE: None, CHOSEN_RULE: grid[best_rule], ONE_WEIGHT: grid[ONE_WEIGHT]}
            t_ranks, t_counts, c_test = eval_split(args, eng, data, "test", kind, weights, rules)
            table = {str(k): summary(v) for k, v in t_ranks.items()}
            entry = {"users": {"valid": v_counts.pop("used"), "test": t_counts.pop("used")},
                     "sharpness_test": t_counts.pop("sharpness"), "sharpness_valid": v_counts.pop("sharpness"),
                     **({"users_left_out_no_attribute": {"valid": v_counts["left_out_no_attribute"],
                                                         "test": t_counts["left_out_no_attribute"]}}
                        if kind == "attribute" else {}),
                     "valid_ndcg10_by_history_weight": {str(w): round(ndcg(v_ranks[w]), 4) for w in weights},
                     "valid_ndcg10_adaptive": round(ndcg(v_ranks[DEFAULT_RULE]), 4),
                     "best_weight_on_valid": best, "by_history_weight": table,
                     "paired_best_vs_query_only": compare(t_ranks[weights[0]], t_ranks[best]) if weights[0] == 0 else None,
                     "paired_best_vs_history_only": compare(t_ranks[weights[-1]], t_ranks[best]) if weights[-1] == 1 else None,
                     "paired_chosen_rule_vs_one_weight": compare(t_ranks[ONE_WEIGHT], t_ranks[CHOSEN_RULE]),
                     "checked_against_engine_search": c_valid + c_test}
            if cfg.search_broad_history_weight is not None:  # the service's own rule adapts
                entry["paired_service_rule_vs_one_weight"] = compare(t_ranks[ONE_WEIGHT], t_ranks[DEFAULT_RULE])
            test[kind] = t_ranks
            chosen[kind][name] = t_ranks[best]
            out[kind]["spaces"][name] = entry
            print(f"[search_eval] {name} space, {kind} queries: best fixed weight on validation {best} (validation NDCG@10 "
                  + ", ".join(f"{w:g}: {ndcg(v_ranks[w]):.4f}" for w in weights) + f"; adaptive {ndcg(v_ranks[DEFAULT_RULE]):.4f}); "
                  f"sharpness p50 {entry['sharpness_test']['p50']}; test:")
            for key, m in table.items():
                print(f"[search_eval] {name:<7} {kind:<9} {key:<34} | HR@10 {m['HR@10']:.4f} | NDCG@10 {m['NDCG@10']:.4f} | "
                      f"HR@50 {m['HR@50']:.4f} | MRR {m['MRR']:.4f}")
            for key in ("paired_best_vs_query_only", "paired_best_vs_history_only", "paired_chosen_rule_vs_one_weight",
                        "paired_service_rule_vs_one_weight"):
                if entry.get(key):
                    print(f"[search_eval] {name:<7} {kind:<9} {key}: {show(entry[key]['NDCG@10'])}")
        if args.latency:
            adaptive[name]["latency_ms"] = search_latency(eng, data, args)
            print(f"[search_eval] {name} space: Engine.search p50 {adaptive[name]['latency_ms']['p50']:.1f} / p99 "
                  f"{adaptive[name]['latency_ms']['p99']:.1f} ms ({args.latency} calls)")
    for kind in kinds:
        names = list(out[kind]["spaces"])
        out[kind]["paired_first_space_over_second"] = None
        if len(names) >= 2:  # each space at its validation-chosen weight, test targets user by user: first - second
            c = {"a": names[1], "b": names[0], **compare(chosen[kind][names[1]], chosen[kind][names[0]])}
            out[kind]["paired_first_space_over_second"] = c
            print(f"[search_eval] {kind} queries: {names[0]} over {names[1]} (each at its weight chosen on validation), "
                  f"test {show(c['NDCG@10'])}")
    assert eng is not None
    res = {
        "what": "held-out search: query = words of the held-out item's title (title) or one short field of its text after "
                "the title (attribute: a need), history = the events before it; weights and the adaptive rule chosen on "
                "validation targets, reported on test targets (bench/search_eval.py)",
        "model_dir": str(Path(args.model_dir).resolve()), "model_version": eng.model_version,
        "item_tower": eng.model.cfg.item_tower, "trained_text_mode": eng.info.get("trained_text_mode"),
        "text_whiten": eng.model.cfg.text_whiten, "data_version": eng.data_version, "catalogue_items": eng.n_items,
        "query_words": args.words, "max_attribute_words": args.max_attribute_words, "title_sep": args.title_sep,
        "seed": args.seed,
        # no example queries: the data behind them is never committed
        "queries": out, "adaptive": adaptive,
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
