"""Recommendation quality under the full-ranking protocol (issues #5, #27), one command per dataset:

    python bench/quality.py --dataset ml-100k --quick                  # smoke test, a few minutes on CPU
    python bench/quality.py --dataset ml-100k --seeds 0,1,2            # the ML-100K tables
    python bench/quality.py --dataset ml-1m --seeds 0,1,2              # the ML-1M tables (a GPU is used when present)
    python bench/quality.py --dataset ml-1m --variants id,hybrid --set max_steps=3000   # a subset, shorter
    python bench/quality.py --dataset amazon2014-toy --seeds 0,1,2     # text-rich, sparse: configs/train/amazon_*.yaml
    python bench/quality.py --raw DIR --name shop [--max-len 50]       # your own data in the raw layout (events/, items/)

Datasets: MovieLens (converted from its original files), and any folder already in the raw input layout
(``events/`` + ``items/`` Parquet, docs/CONTRACTS.md section 1): the two Amazon review sets of
../shared/data, or ``--raw DIR`` for a user's own. Raw-layout data is prepared with
configs/data_prep/amazon.yaml (``--prep-config`` for another) and trained with the ``amazon_*`` train configs
(``--max-len`` sets model.max_len, the one setting those recipes expect a user to change).

What it does, all through the project's own code path (nothing here re-implements a stage):
1. convert  ``python -m data_prep.convert movielens`` -> <out>/raw (skipped when present)
2. prepare  data_prep.pipeline.run(configs/data_prep/<ds>.yaml) -> <out>/prepared/v1 (leave-last-out,
   all ratings, no k-core filter, ties broken by (timestamp, file order, row order))
3. train    ``python -m train --config configs/train/<ds>_<variant>.yaml`` per variant and seed, in a
   subprocess (same command a user runs; picks up a GPU by itself). The loop keeps the checkpoint with
   the best VALIDATION NDCG@10 (best/) and exports it as final/.
4. evaluate final/ is loaded with train.export.load_final (exactly what inference serves) and ranked with
   train.metrics on the TEST target: every item is a candidate except the user's history; HR@K, NDCG@K
   for K = 10, 50, 200, MRR, catalogue coverage@10. Every two models trained with the same seed are also
   compared user by user (B - A with a 95% interval, bench/paired.py): the error of a difference between
   two models on the same users is about half that of either mean.
5. cold start (variant ``cold``): 10% of the items are removed from training entirely (all their events
   dropped, except when it is a user's LAST event, which stays as that user's test target); id / text /
   hybrid models are trained on that data and measured on the test users whose target is a removed item.
6. report  <out>/results.json, and (unless --quick / --no-docs) docs/results/<ds>.json +
   docs/results/<ds>_*.png, then docs/RESULTS.md is rebuilt from every docs/results/*.json.

Candidates: the published protocol ranks against the items that occur in the ratings (3,706 on ML-1M);
catalogue rows without any rating (177 on ML-1M) are not candidates here (they would only be noise for
text models and free wins for id models).

Outputs live under bench/out/ (gitignored). Never commit anything under it: it is derived from the datasets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # bench/paired.py (this file may be loaded by path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lmrec_common.config import load_config  # noqa: E402
from lmrec_common.log import fmt_secs  # noqa: E402
from lmrec_common.publish import atomic_write_json, atomic_write_text, staged_dir  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"
DATASETS = {
    # name -> (default source folder, data_prep config, prefix of configs/train/<prefix>_<variant>.yaml)
    "ml-100k": (SHARED_DATA / "ml-100k", "configs/data_prep/ml100k.yaml", "ml100k"),
    "ml-1m": (SHARED_DATA / "ml-1m", "configs/data_prep/ml1m.yaml", "ml1m"),
    # already in the raw input layout (events/, items/): no converter
    "amazon2014-toy": (SHARED_DATA / "amazon2014-toy", "configs/data_prep/amazon.yaml", "amazon"),
    "amazon2018-game": (SHARED_DATA / "amazon2018-game", "configs/data_prep/amazon.yaml", "amazon"),
}
MOVIELENS = ("ml-100k", "ml-1m")  # converted from the original files; the others are read as they are
# variant -> train config suffix; "most_popular" needs no training, "cold" expands to cold_{id,text,hybrid}
TRAINED = {"id": "sasrec", "text": "text", "hybrid": "hybrid", "hybrid_ratings": "hybrid", "lora": "lora", "pool": "pool"}
# pool: the hybrid with a learned attention pooling over the frozen encoder's token states (text_mode pool)
# hybrid_ratings: the hybrid plus the stars of every history event as its event type (converted with
# --rating-event-types into its own prepared data: same events, order and split, so the same targets).
# It uses more of the data than the published anchors (they see item ids only).
VARIANT_EXTRA = {"hybrid_ratings": ["model.use_event_types=true"]}
RATING_TYPES = [f"rating_{r}" for r in range(1, 6)]
COLD_MODELS = ("id", "text", "hybrid")
ALL_VARIANTS = ["most_popular", "id", "text", "hybrid", "hybrid_ratings", "lora", "pool", "cold"]
PRECISIONS = ("auto", "no", "bf16", "fp16")  # Accelerate mixed precision; auto: bf16 on a GPU that has it, else fp32
COLD_FRACTION = 0.10
COLD_SEED = 2026  # which items are cold does not depend on the training seed: every seed sees the same split
ANCHORS = {  # ML-1M, same protocol, numbers as published (HR@10, NDCG@10)
    "SASRec (generative-recommenders)": (0.2853, 0.1603),
    "BERT4Rec (generative-recommenders)": (0.2843, 0.1537),
    "HSTU (generative-recommenders)": (0.3097, 0.1720),
    "HSTU-large (generative-recommenders)": (0.3294, 0.1893),
    "SASRec full CE (Klenitskiy & Vasilev 2023)": (0.3152, 0.1821),
}
HEADLINE = ("HR@10", "NDCG@10", "HR@50", "NDCG@50", "HR@200", "NDCG@200", "MRR", "coverage@10")


def log(msg: str) -> None:
    print(f"[quality] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ data
def raw_layout(src: Path) -> Path:
    """A dataset folder already in the raw input layout is used where it lies (read only): checked here so
    a wrong path fails with one line before anything runs."""
    missing = [d for d in ("events", "items") if not (src / d).is_dir()]
    if not src.is_dir() or missing:
        raise SystemExit(f"[quality] {src}: not a dataset in the raw input layout (needs events/ and items/ folders of "
                         f"Parquet files{'; missing ' + ', '.join(missing) if src.is_dir() else ''})")
    return src


def convert(src: Path, raw: Path, extra: tuple[str, ...] = ()) -> None:
    if (raw / "convert.json").is_file():
        log(f"raw inputs present: {raw}")
        return
    if not src.is_dir():
        raise SystemExit(f"[quality] dataset folder {src} not found (pass --src)")
    subprocess.run([sys.executable, "-m", "data_prep.convert", "movielens", "--src", str(src), "--out", str(raw), *extra],
                   cwd=ROOT, check=True)


def prepare(prep_yaml: str, events: Path, items: Path, out_dir: Path, extra: tuple[str, ...] = ()) -> Path:
    """data_prep with the dataset's config; version fixed to v1 so reruns reuse it."""
    from data_prep.config import DataPrepConfig
    from data_prep.pipeline import run as prep_run

    version = out_dir / "v1"
    if (version / "manifest.json").is_file():
        log(f"prepared data present: {version}")
        return version
    cfg = load_config(DataPrepConfig, ROOT / prep_yaml,
                      [f"events_path={events}", f"items_path={items}", f"output_dir={out_dir}", "version=v1", "num_proc=1", *extra])
    return Path(prep_run(cfg))


def same_split(a, b) -> bool:
    """Two prepared datasets hold the same items (same order) and the same per-user item sequences
    (hence the same validation and test targets); only what rides along (event types) may differ."""
    from train.data import list_column

    if a.items.data.table.column("item_id").to_pylist() != b.items.data.table.column("item_id").to_pylist():
        return False
    va, oa = list_column(a.sequences, "item_idx")
    vb, ob = list_column(b.sequences, "item_idx")
    ua = a.sequences.data.table.column("user_id").to_pylist()
    ub = b.sequences.data.table.column("user_id").to_pylist()
    return ua == ub and np.array_equal(oa, ob) and np.array_equal(va, vb)


def make_cold_raw(raw: Path, cold_raw: Path) -> dict:
    """Raw events with 10% of the rated items removed from training entirely.

    An event of a cold item is dropped unless it is its user's LAST event (the leave-last-out test
    target), so cold items occur nowhere in training or validation (not as inputs, targets or
    validation targets) and only as test targets. Order = (timestamp, row order), as data_prep's."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    info_path = cold_raw / "cold.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    files = sorted((raw / "events").rglob("*.parquet"))
    if len(files) != 1:
        raise SystemExit(f"[quality] {raw}/events: expected the converter's single part file, found {len(files)}")
    ev = pq.read_table(files[0])
    user = ev.column("user_id").to_numpy()
    item = ev.column("item_id").to_numpy()
    ts = pc.cast(ev.column("timestamp"), pa.int64()).to_numpy()
    n = len(user)
    rated = np.unique(item)
    rng = np.random.default_rng(COLD_SEED)
    cold = np.sort(rng.choice(rated, size=int(round(COLD_FRACTION * len(rated))), replace=False))
    # last event per user: sort by (user, timestamp, row) and take each user's final row
    order = np.lexsort((np.arange(n), ts, user))
    last_rows = order[np.r_[user[order][1:] != user[order][:-1], True]]
    is_last = np.zeros(n, dtype=bool)
    is_last[last_rows] = True
    is_cold = np.isin(item, cold)
    keep = ~is_cold | is_last
    with staged_dir(cold_raw) as tmp:
        (tmp / "events").mkdir()
        pq.write_table(ev.filter(pa.array(keep)), tmp / "events" / "part-00000.parquet")
        (tmp / "items").mkdir()
        for f in (raw / "items").glob("*.parquet"):
            (tmp / "items" / f.name).write_bytes(f.read_bytes())
        info = {"cold_fraction": COLD_FRACTION, "cold_seed": COLD_SEED, "rated_items": int(len(rated)),
                "cold_items": [int(x) for x in cold], "n_cold_items": int(len(cold)), "events_read": int(n),
                "events_kept": int(keep.sum()), "events_removed_cold_item": int((~keep).sum()),
                "cold_test_targets": int((is_cold & is_last).sum())}
        (tmp / "cold.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"cold-start data: {info['n_cold_items']} of {info['rated_items']} rated items cold, "
        f"{info['events_removed_cold_item']:,} events removed, {info['cold_test_targets']} users with a cold test target")
    return info


# ------------------------------------------------------------------------------------------------ train
# settings a reused run need not share with the current command (paths, logging, checkpoint bookkeeping;
# the seed is checked through bench_args.json)
_RUN_ONLY_KEYS = {"data", "output_dir", "run_name", "seed", "tracker", "evaluate_test", "log_every", "save_every",
                  "keep_last", "resume", "num_workers", "eval_batch_size", "requeue_on_signal", "stop_after_steps",
                  "text_feature_cache"}


def text_cache_dir(out: Path) -> Path:
    """The text-feature cache of a work folder (train/text_cache.py): its runs' MiniLM features, shared."""
    return out / "text_features"


def _plain(cfg) -> dict:
    from lmrec_common.config import to_dict
    from train.config import plain_config

    return json.loads(json.dumps(to_dict(plain_config(cfg))))


def resolved_settings(train_yaml: Path, overrides: list[str]) -> dict:
    """The settings a run of ``train_yaml`` + ``overrides`` trains under (model, optim, schedule, batch,
    selection): the resolved config less the keys that only name where and how one run goes (seed, paths)."""
    from train.config import TrainConfig

    return {k: v for k, v in _plain(load_config(TrainConfig, train_yaml, list(overrides))).items() if k not in _RUN_ONLY_KEYS}


def setting_changes(then: dict, now: dict) -> list[str]:
    """Settings on which ``then`` (a run's resolved config) and ``now`` differ, as "key: then -> now". A key
    added to the config after the run was trained counts as its default there (what the code did before the
    key existed): a config that now sets it to something else is a change."""
    from train.config import TrainConfig

    default, out = _plain(TrainConfig()), []
    for key, value in now.items():
        if key in _RUN_ONLY_KEYS:
            continue
        if key == "eval_every" and now.get("eval_every_epochs"):  # the loop resolved it from the epochs: compare those
            continue
        was = then.get(key, default[key])
        pairs = [(f"{key}.{k}", v, was.get(k, default[key][k])) for k, v in value.items()] \
            if isinstance(value, dict) and isinstance(was, dict) else [(key, value, was)]
        out += [f"{name}: {old!r} -> {new!r}" for name, new, old in pairs if old != new]
    return out


def resolved_changes(train_yaml: Path, overrides: list[str], trained_yaml: Path) -> list[str] | None:
    """setting_changes between the run's resolved config (final/train_config.yaml) and ``train_yaml`` +
    ``overrides`` now; None when the run has no resolved config to compare."""
    if not trained_yaml.is_file():
        return None
    from lmrec_common.config import read_yaml

    return setting_changes(read_yaml(trained_yaml), resolved_settings(train_yaml, overrides))


def train_one(train_yaml: Path, prep: Path, runs: Path, run_name: str, seed: int, overrides: list[str], env: dict) -> tuple[Path, float | None]:
    final = runs / run_name / "final"
    args_file = runs / run_name / "bench_args.json"
    want = {"config": str(train_yaml), "data": str(prep), "seed": seed, "overrides": list(overrides),
            "config_sha256": hashlib.sha256(Path(train_yaml).read_bytes()).hexdigest(),
            "precision": env["ACCELERATE_MIXED_PRECISION"]}
    if (final / "export.json").is_file():
        had = json.loads(args_file.read_text()) if args_file.is_file() else want  # runs from before the record: trusted
        changed = resolved_changes(train_yaml, overrides, final / "train_config.yaml")
        if changed:  # whatever the record says: the model was trained under other settings than these
            raise SystemExit(f"[quality] {runs / run_name} was trained with other settings than {train_yaml.name} + "
                             f"{' '.join(overrides) or 'no overrides'} give now ({'; '.join(changed)}): use another "
                             "--tag (or delete the folder) rather than report it under these settings")
        # the resolved settings decide when the run has them (so a config edit, or overrides that restate what
        # the config said when the run was trained, leave it reusable); else the file hash and the overrides
        if changed is not None:
            if (had.get("config"), had.get("config_sha256"), had.get("overrides")) != \
                    (want["config"], want["config_sha256"], want["overrides"]):
                log(f"{run_name}: {train_yaml.name} was edited since the run, its resolved settings were not"
                    if (had.get("config"), had.get("overrides")) == (want["config"], want["overrides"]) else
                    f"{run_name}: trained as {Path(had.get('config', '?')).name} + {' '.join(had.get('overrides', []))}; "
                    f"{train_yaml.name} + {' '.join(overrides)} resolve to the same settings")
            had = {**had, **{k: want[k] for k in ("config", "config_sha256", "overrides")}}
        elif "config_sha256" not in had:
            log(f"{run_name}: trained before the bench hashed config files; {train_yaml.name} may have changed since")
            had = {**had, "config_sha256": want["config_sha256"]}
        if "precision" not in had:  # recorded before the mixed precision was: its train.log header names it
            log(f"{run_name}: trained before the bench recorded the precision (see its train.log); "
                f"reported under {want['precision']}")
            had = {**had, "precision": want["precision"]}
        if had != want:
            raise SystemExit(f"[quality] {runs / run_name} was trained with {json.dumps(had)}, not {json.dumps(want)}: "
                             "use another --tag (or delete the folder) rather than report it under these settings")
        log(f"{run_name}: final/ present, not retrained ({final})")
        return final, read_wall(runs / run_name)
    # every run of this work folder shares one text-feature cache (same MiniLM: encoded once per device type)
    cmd = [sys.executable, "-m", "train", "--config", str(train_yaml), f"data={prep}", f"output_dir={runs}",
           f"run_name={run_name}", f"seed={seed}", "tracker=none", "evaluate_test=false",
           f"text_feature_cache={text_cache_dir(runs.parent)}", *overrides]
    log(f"{run_name}: {' '.join(cmd[1:])}")
    (runs / run_name).mkdir(parents=True, exist_ok=True)
    atomic_write_json(args_file, want)
    t0 = time.time()
    with open(runs / run_name / "train.log", "a") as lf:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in p.stdout:
            lf.write(line)
            # the loop's header, [valid] lines and every log_every progress line; config dump stays in the log
            if line.startswith(("[train]", "[valid]", "step ", "Traceback", "  File", "train.", "ValueError", "RuntimeError")):
                print(f"  {run_name} | {line}", end="", flush=True)
        rc = p.wait()
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"[quality] training {run_name} failed with exit code {rc}; see {runs / run_name / 'train.log'}")
    # the training loop sums its launches (a run resumed after a kill); the bench saw only this one
    trainer = json.loads((final / "metrics.json").read_text()).get("train_wall_s") if (final / "metrics.json").is_file() else None
    resumed = "[train] resumed from" in (runs / run_name / "train.log").read_text()
    rec = {"wall_s": trainer, "source": "train loop (all launches)"} if trainer is not None else \
        {"wall_s": wall, "source": "bench (this launch)", **({"partial": True} if resumed else {})}
    rec["torch"] = torch.__version__  # the table's machine line is the reporting process's; runs may differ
    atomic_write_json(runs / run_name / "wall.json", rec)
    return final, read_wall(runs / run_name)


def read_wall(run_dir: Path) -> float | None:
    """Training wall seconds of a run; None when unknown (no record, or a resumed run whose earlier launches
    were not timed)."""
    f = run_dir / "wall.json"
    rec = json.loads(f.read_text()) if f.is_file() else {}
    return None if rec.get("partial") or rec.get("wall_s") is None else float(rec["wall_s"])


def fmt_wall(w: float | None) -> str:
    return "untimed" if w is None else fmt_secs(w)


# ------------------------------------------------------------------------------------------------ evaluation
def candidate_mask(prep) -> torch.Tensor:
    """(I,) bool: items that occur in any user's sequence (the protocol's item set)."""
    from train.data import list_column

    vals, _ = list_column(prep.sequences, "item_idx")
    m = torch.zeros(len(prep.items), dtype=torch.bool)
    m[torch.from_numpy(np.unique(vals).astype(np.int64))] = True
    return m


@torch.no_grad()
def rank_users(score_fn, prep, split: str, max_len: int, cand: torch.Tensor, device: str, batch_size: int = 512) -> dict:
    """Per-user 1-based test ranks (N,), targets (N,) and the top-10 items (N, 10) with seen items excluded."""
    from train.data import EvalExamples
    from train.metrics import target_ranks

    ex = EvalExamples.build(prep.sequences, split, max_len)
    ranks, targets, top = [], [], []
    for s in range(0, len(ex), batch_size):
        b = ex.collate(list(range(s, min(s + batch_size, len(ex)))))
        b = {k: v.to(device) for k, v in b.items()}
        # a private (B, I) copy: the baseline returns an expanded view of one row, which in-place
        # masking below would corrupt for every user (and the counts themselves)
        scores = score_fn(b).float().clone()
        scores[:, ~cand.to(device)] = -math.inf  # not in the protocol's item set (never a target)
        ranks.append(target_ranks(scores, b["target"], b["seen"]).cpu())
        targets.append(b["target"].cpu())
        seen = b["seen"]
        rows = torch.arange(seen.size(0), device=device)[:, None].expand_as(seen)
        ok = seen >= 0
        scores[rows[ok], seen[ok]] = -math.inf
        top.append(scores.topk(min(10, scores.size(1)), dim=1).indices.cpu())
    return {"ranks": torch.cat(ranks), "targets": torch.cat(targets), "top10": torch.cat(top)}


def summarize(r: dict, n_cand: int, slices: dict[str, torch.Tensor]) -> dict:
    from train.metrics import metrics_from_ranks

    out = metrics_from_ranks(r["ranks"])
    out["coverage@10"] = float(torch.unique(r["top10"]).numel() / n_cand)
    for name, tmask in slices.items():
        keep = tmask[r["targets"]]
        out[name] = metrics_from_ranks(r["ranks"][keep])
    return out


def evaluate_final(final: Path, prep, cand: torch.Tensor, slices: dict, device: str, also_borrowed: bool = False,
                   text_cache: Path | None = None):
    """Metrics of final/ on prep. ``also_borrowed``: returns (as trained, served with cold_item_ids=nearest:
    items without training events borrow a warm twin's id row, train/catalogue.py borrow_cold_ids), one load."""
    from train.data import held_out_splits
    from train.catalogue import Catalogue
    from train.export import load_final

    trained = json.loads((final / "metrics.json").read_text()) if (final / "metrics.json").is_file() else {}
    # a refit (train_through=valid) trained on the validation targets: its validation figure is in-sample, left out
    splits = held_out_splits(trained.get("train_through") or "train")
    if "test" not in splits:
        raise SystemExit(f"[quality] {final}: trained through the test targets (train_through=test), nothing held out to report")
    model, info = load_final(final)
    model.to(device)
    cat = Catalogue.build(prep.items, model, cache_dir=str(text_cache) if text_cache else None)
    m = _evaluate_model(model, cat, info, prep, cand, slices, device, splits)
    if trained:  # how training ended: all max_steps, early stopping, or the deadline
        m["trained"] = {k: trained.get(k) for k in ("steps", "max_steps", "stopped_by", "train_through")}
    if not also_borrowed:
        return m
    cat.borrow_cold_ids(model)
    return m, _evaluate_model(model, cat, info, prep, cand, slices, device, splits)


def _evaluate_model(model, cat, info: dict, prep, cand: torch.Tensor, slices: dict, device: str,
                    splits: tuple[str, ...] = ("valid", "test")) -> dict:
    items = cat.item_vectors(model).float()  # (I, d), once

    def score(b):
        return model.score(model.user_vectors(b["hist"], b["event_types"], item_table=items).float(), items)

    out = {"valid": {}}
    for split in splits:
        r = rank_users(score, prep, split, model.cfg.max_len, cand, device)
        out[split] = summarize(r, int(cand.sum()), slices)
    out["test_ranks"] = r["ranks"]  # per user, for the paired comparisons of the report (not written out)
    out["model_version"] = info.get("model_version")
    out["best_step"] = info.get("step")
    return out


def evaluate_popular(prep, cand: torch.Tensor, slices: dict, device: str) -> dict:
    from train.baselines import MostPopular

    counts = torch.tensor(prep.items.data.table.column("n_train_events").to_numpy(), dtype=torch.float, device=device)
    pop = MostPopular(counts)
    return {split: summarize(rank_users(pop.scores, prep, split, 200, cand, device), int(cand.sum()), slices)
            for split in ("valid", "test")}


# ------------------------------------------------------------------------------------------------ report
PAIRED_METRICS = ("HR@10", "NDCG@10")


def paired_rows(per_seed: dict, runs: dict) -> list[dict]:
    """Paired per-user test differences (bench/paired.py) of every two trained models of the same seed: B - A
    with its 95% interval, B the later model in the run's order. Both models rank the same users, so the
    difference has a much smaller error than either mean (the user-to-user spread cancels)."""
    from paired import compare

    by_seed: dict = {}  # seed -> [(model, ranks)] in the run's order
    for model, ms in per_seed.items():
        for seed, m in zip(runs.get(model, {}), ms):
            if m.get("test_ranks") is not None:
                by_seed.setdefault(seed, []).append((model, m["test_ranks"]))
    rows = []
    for seed, models in by_seed.items():
        for i, (a, ra) in enumerate(models):
            for b, rb in models[i + 1:]:
                c = compare(ra, rb)
                rows.append({"a": a, "b": b, "seed": seed, **{k: {x: c[k][x] for x in ("diff", "ci95", "users_b_better", "users_a_better")}
                                                             for k in PAIRED_METRICS}})
    return rows


def aggregate(per_seed: list[dict], split: str = "test", slice_name: str | None = None) -> dict:
    """{metric: {"mean", "min", "max", "n_seeds"}} over seeds."""
    out = {}
    for k in HEADLINE + ("n",):
        vals = []
        for m in per_seed:
            d = m[split] if slice_name is None else m[split].get(slice_name, {})
            if k in d:
                vals.append(d[k])
        if vals:
            out[k] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals)), "n_seeds": len(vals)}
    return out


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version()}


def read_valid_curve(run_dir: Path) -> list[list[float]]:
    """[[step, validation NDCG@10], ...] from the training loop's evals.jsonl ([] when absent)."""
    f = run_dir / "evals.jsonl"
    if not f.is_file():
        return []
    return [[p["step"], p["NDCG@10"]] for p in map(json.loads, f.read_text().splitlines()) if "NDCG@10" in p]


def check_same_data(res: dict, old: dict, where: str, keys=("n_candidates", "n_test_users")) -> None:
    """Refuses an earlier results file ``old`` of another dataset or other test data than ``res``."""
    if old.get("dataset") != res["dataset"]:
        raise SystemExit(f"{where}: dataset {old.get('dataset')!r}, this run is {res['dataset']!r}")
    for key in keys:
        if old.get(key) != res.get(key):
            raise SystemExit(f"{where}: {key} {old.get(key)} differs from this run's {res.get(key)} (other prepared data)")


def read_carry_seeds(specs: list[str]) -> dict[str, list[tuple[int, dict, dict, str]]]:
    """--carry-seeds VARIANT=SEEDS:RESULTS_JSON -> {variant: [(seed, its run entry, the file, its path)]}.
    Read before any training; whether the settings match this command's is checked by the caller."""
    out: dict = {}
    for spec in specs:
        name, sep, rest = (x.strip() for x in spec.partition("="))
        seeds_text, sep2, path = rest.partition(":")
        if not sep or not sep2 or not path or name not in TRAINED:
            raise SystemExit(f"[quality] --carry-seeds {spec!r}: expected VARIANT=SEEDS:RESULTS_JSON with VARIANT one of {sorted(TRAINED)}")
        try:
            old = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"[quality] --carry-seeds {spec}: cannot read a results JSON ({e})") from None
        runs = (old.get("runs") or {}).get(name) or {}
        for seed in parse_seeds(seeds_text, f"--carry-seeds {spec}"):
            entry = runs.get(str(seed))
            if entry is None:
                raise SystemExit(f"[quality] --carry-seeds {spec}: {path} has no {name} run of seed {seed} "
                                 f"(its seeds: {', '.join(sorted(runs)) or 'none'})")
            if "metrics" not in entry or "settings" not in entry:
                raise SystemExit(f"[quality] --carry-seeds {spec}: {path} reported {name} seed {seed} before the bench kept "
                                 "each run's metrics and settings; rerun that seed")
            if any(seed == s for s, *_ in out.get(name, [])):
                raise SystemExit(f"[quality] --carry-seeds: {name} seed {seed} named twice")
            out.setdefault(name, []).append((seed, entry, old, path))
    return out


def add_carried_seeds(res: dict, variant: str, carried: list[tuple[int, dict, dict, str]]) -> None:
    """Adds the seeds read by read_carry_seeds to ``variant``'s runs and per-seed metrics in ``res``, each
    run keeping where it was measured (its first origin when it was carried before)."""
    for seed, entry, old, path in carried:
        res["runs"].setdefault(variant, {})[seed] = {**entry, "carried": entry.get("carried") or {
            "source": path, "command": old.get("command"), "machine": entry.get("machine"), "precision": entry.get("precision")}}
        res["per_seed"].setdefault(variant, []).append({**entry["metrics"], "best_step": entry.get("best_step")})
        log(f"{variant}_s{seed}: carried from {path}: test HR@10 {entry['metrics']['test']['HR@10']:.4f} "
            f"NDCG@10 {entry['metrics']['test']['NDCG@10']:.4f}")


def carry_rows(res: dict, old: dict, source: str, computed: set[str]) -> None:
    """Copies into ``res`` every model of an earlier results file ``old`` (docs/results/<dataset>.json) that
    this command did not compute: its summaries, runs, config, cold-start table and the paired rows between
    carried models. Each carried row keeps where it was measured (``res["carried"][model]``: the machine,
    precision and command of the run that trained it), so one command can refresh one row of a table whose
    other rows took hours on another machine. Refuses a file of another dataset or of other test data."""
    check_same_data(res, old, f"[quality] --carry-from {source}")
    prov = old.get("carried") or {}
    carried = res.setdefault("carried", {})

    def origin(model: str) -> dict:
        if model in prov:  # carried there already: keep the first origin
            return prov[model]
        return {"source": source, "command": old.get("command"), "machine": old.get("machine"),
                "precision": (old.get("precision_for") or {}).get(model, old.get("precision"))}

    for model in old.get("summary", {}):
        if model in computed:
            continue
        res["summary"][model] = old["summary"][model]
        res["summary_valid"][model] = old.get("summary_valid", {}).get(model, {})
        if model in old.get("runs", {}):
            res["runs"][model] = old["runs"][model]
        if model in old.get("configs", {}):
            res["configs"][model] = old["configs"][model]
        carried[model] = origin(model)
    if "cold" not in computed and old.get("cold"):
        res["cold"] = old["cold"]
        carried["cold"] = origin("cold")
    res["paired"] += [r for r in old.get("paired") or [] if r["a"] in carried and r["b"] in carried]
    order = {v: i for i, v in enumerate(ALL_VARIANTS)}  # the table's usual row order, carried or not
    for key in ("summary", "summary_valid", "runs"):
        res[key] = dict(sorted(res[key].items(), key=lambda kv: order.get(kv[0], len(order))))


def by_seed(runs: dict) -> list[tuple]:
    """A model's runs as (seed, run) in seed order (keys are ints when trained here, strings once read from JSON)."""
    return sorted(runs.items(), key=lambda kv: int(kv[0]))


def plots(res: dict, runs: Path, png_prefix: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    # 1. validation NDCG@10 over training (every seed, one colour per variant)
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    curves, missing = 0, []
    for i, (variant, seeds) in enumerate(sorted(res["runs"].items())):
        for j, (seed, r) in enumerate(by_seed(seeds)):
            pts = r.get("valid_curve") or read_valid_curve(Path(r.get("run_dir") or runs / r["run_name"]))
            if not pts:  # a carried run from before curves were stored, its folder on another machine
                missing.append(f"{variant} seed {seed}")
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colours[i % len(colours)], alpha=0.8,
                    label=variant if j == 0 else None)
            curves += 1
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation NDCG@10 (loop's own evaluation)")
    ax.set_title(f"{res['dataset']}: validation NDCG@10 during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = png_prefix.with_name(png_prefix.name + "_valid_ndcg.png")
    if curves:  # no trained model (baseline only): no empty plot
        fig.savefig(p, dpi=90)
        made.append(p.name)
    if missing:  # the plot must not pass for the whole table
        res["notes"].append(f"Not in the validation plot (no curve on record, e.g. a carried run trained before the "
                            f"bench stored curves in the results file): {', '.join(missing)}.")
    plt.close(fig)
    # 2. test HR@10 / NDCG@10 per model: mean bar + min..max range over seeds
    names = list(res["summary"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("HR@10", "NDCG@10")):
        means = [res["summary"][n][metric]["mean"] for n in names]
        lo = [res["summary"][n][metric]["mean"] - res["summary"][n][metric]["min"] for n in names]
        hi = [res["summary"][n][metric]["max"] - res["summary"][n][metric]["mean"] for n in names]
        ax.bar(range(len(names)), means, yerr=[lo, hi], capsize=3, color=colours[: len(names)])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{res['dataset']} test {metric} (mean, min..max over seeds)")
        if res["dataset"] == "ml-1m":
            k = 0 if metric == "HR@10" else 1
            for label, ls in (("SASRec (generative-recommenders)", "--"), ("HSTU-large (generative-recommenders)", ":")):
                ax.axhline(ANCHORS[label][k], ls=ls, color="k", lw=1, label=label.split(" (")[0])
            ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    p = png_prefix.with_name(png_prefix.name + "_test_metrics.png")
    fig.savefig(p, dpi=90)
    plt.close(fig)
    made.append(p.name)
    return made


def fmt_range(a: dict) -> str:
    if not a:
        return "-"
    if a["n_seeds"] == 1 or a["max"] - a["min"] < 5e-5:
        return f"{a['mean']:.4f}"
    return f"{a['mean']:.4f} ({a['min']:.4f}-{a['max']:.4f})"


def dataset_section(res: dict) -> str:
    ds = res["dataset"]
    lines = [f"## {ds}", "",
             f"Command: `{res['command']}`  ",
             f"Machine: {res['machine']['cpu']}, {res['machine']['cpu_cores']} cores, GPU: {res['machine']['gpu'] or 'none'}, "
             f"torch {res['machine']['torch']}, precision {res['precision']}"
             + "".join(f" ({k}: {v})" for k, v in (res.get("precision_for") or {}).items()) + ".  ",
             f"Wall time: {fmt_secs(res['wall_s'])} in all (per training run below); training seeds per model in the table. "
             f"Candidates: {res['n_candidates']:,} items; test users: {res['n_test_users']:,}.  ",
             f"Train overrides on top of the configs: `{' '.join(res['overrides']) or '(none)'}`.", "",
             "Test split (checkpoint chosen on VALIDATION NDCG@10 only); mean over seeds, (min-max) when more than one:", "",
             "| model | config | seeds | HR@10 | NDCG@10 | HR@50 | NDCG@50 | HR@200 | NDCG@200 | MRR | coverage@10 | valid NDCG@10 | train wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in res["summary"].items():
        v = res["summary_valid"].get(name, {})
        walls = [r.get("wall_s") for r in res["runs"].get(name, {}).values()]
        timed = [w for w in walls if w is not None and not math.isnan(w)]
        wall = "-" if not timed else fmt_secs(float(np.mean(timed))) + "/run" + (
            f" ({len(timed)} of {len(walls)} runs timed)" if len(timed) < len(walls) else "")
        cut = [r["trained"] for r in res["runs"].get(name, {}).values() if (r.get("trained") or {}).get("stopped_by") == "max_train_wall_s"]
        if cut:  # a deadline ended these runs before their schedule did: say so next to their figures
            wall += f" ({len(cut)} ended by max_train_wall_s, at step " + ", ".join(f"{t['steps']} of {t['max_steps']}" for t in cut) + ")"
        runs = by_seed(res["runs"].get(name, {}))  # carried seeds in their place
        run_seeds = ",".join(str(k) for k, _ in runs) or "-"  # most-popular has none
        moved = [str(k) for k, r in runs if r.get("carried")]
        if moved:  # seeds taken from another results file (--carry-seeds): named in the list below the table
            run_seeds += f" ({','.join(moved)} carried)"
        config = res['configs'].get(name, '-') + (" [carried]" if name in res.get("carried", {}) else "")
        lines.append(f"| {name} | {config} | {run_seeds} | " + " | ".join(fmt_range(s.get(k, {})) for k in HEADLINE)
                     + f" | {fmt_range(v.get('NDCG@10', {}))} | {wall} |")
    # where each carried row (--carry-from) and carried seed (--carry-seeds) was measured
    carried = list((res.get("carried") or {}).items()) + [
        (f"{name} seed {seed}", r["carried"]) for name, rs in res["runs"].items() for seed, r in rs.items() if r.get("carried")]
    if carried:
        seeds = any(r.get("carried") for rs in res["runs"].values() for r in rs.values())
        kinds = [k for k, on in ((("Rows marked [carried]", "`--carry-from`"), bool(res.get("carried"))),
                                 (("carried seeds", "`--carry-seeds`"), seeds)) if on]
        what, how = " and ".join(w for w, _ in kinds), " / ".join(f for _, f in kinds)
        lines += ["", f"{what[0].upper() + what[1:]} were not rerun by this command: they are copied with {how} from "
                  "an earlier run of this bench on the same prepared data (same candidates and test users):"]
        groups: dict = {}  # one line per origin: its JSON text -> (origin, what came from there)
        for model, o in carried:
            groups.setdefault(json.dumps(o, sort_keys=True), (o, []))[1].append(model)
        for o, models in groups.values():
            m = o.get("machine") or {}
            lines.append(f"- {', '.join(models)}: {m.get('cpu', '?')}, {m.get('cpu_cores', '?')} cores, GPU: {m.get('gpu') or 'none'}, "
                         f"torch {m.get('torch', '?')}, precision {o.get('precision')}; command `{o.get('command')}`")
    if res.get("paired"):
        lines += ["", "Paired per-user differences on the test split, model B minus model A trained with the same seed "
                  "(bench/paired.py; 95% interval over users; users better / worse on NDCG@10):", "",
                  "| B | A | seed | HR@10 B - A [95%] | NDCG@10 B - A [95%] | users B better / A better |", "|---|---|---|---|---|---|"]
        for r in res["paired"]:
            f = lambda d: f"{d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"  # noqa: E731
            lines.append(f"| {r['b']} | {r['a']} | {r['seed']} | {f(r['HR@10'])} | {f(r['NDCG@10'])} | "
                         f"{r['NDCG@10']['users_b_better']} / {r['NDCG@10']['users_a_better']} |")
    if ds == "ml-1m":
        lines += ["", "Published anchors on the same protocol (not measured here): " +
                  "; ".join(f"{k} {h:.4f} / {n:.4f}" for k, (h, n) in ANCHORS.items()) + "."]
    if res.get("cold"):
        c = res["cold"]
        lines += ["", f"### {ds}: cold start ({c['info']['n_cold_items']} of {c['info']['rated_items']} rated items = "
                  f"{100 * c['info']['cold_fraction']:.0f}% removed from training entirely; item choice seed {c['info']['cold_seed']})"
                  + (" [carried]" if "cold" in res.get("carried", {}) else ""), "",
                  f"Test users whose target is a removed item: {c['n_cold_users']}. All test users of the cold-start data: {c['n_users']}. "
                  f"Training seeds: {', '.join(map(str, c.get('seeds', res['seeds'])))}; train overrides: "
                  f"`{' '.join(c.get('overrides', res['overrides'])) or '(none)'}`.", "",
                  "| model | cold-target users HR@10 | NDCG@10 | HR@50 | warm-target users HR@10 | NDCG@10 | all users HR@10 | NDCG@10 |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, s in c["summary"].items():
            lines.append(f"| {name} | {fmt_range(s['cold'].get('HR@10', {}))} | {fmt_range(s['cold'].get('NDCG@10', {}))} | "
                         f"{fmt_range(s['cold'].get('HR@50', {}))} | {fmt_range(s['warm'].get('HR@10', {}))} | "
                         f"{fmt_range(s['warm'].get('NDCG@10', {}))} | {fmt_range(s['all'].get('HR@10', {}))} | {fmt_range(s['all'].get('NDCG@10', {}))} |")
    for p in res.get("plots", []):
        lines += ["", f"![{p}](results/{p})"]
    if res.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


GENERATED_MARK = "<!-- everything below is generated by bench/quality.py from docs/results/*.json; edit above this line -->"


def write_results_md(docs: Path) -> Path:
    """docs/RESULTS.md = its hand-written head (everything above GENERATED_MARK, kept as is) + one
    generated section per docs/results/<dataset>.json (so each dataset's run refreshes its own section
    and keeps the others')."""
    out = docs / "RESULTS.md"
    head = "# Recommendation quality\n\n"
    if out.is_file() and GENERATED_MARK in out.read_text():
        head = out.read_text().split(GENERATED_MARK)[0]
    parts = [head.rstrip("\n") + "\n\n" + GENERATED_MARK + "\n"]
    for name in sorted(DATASETS):  # docs/results/ also holds other benches' JSON: only the datasets' own
        f = docs / "results" / f"{name}.json"
        if f.is_file():
            parts.append(dataset_section(json.loads(f.read_text())))
    atomic_write_text(out, "\n".join(parts))
    return out


# ------------------------------------------------------------------------------------------------ main
def parse_seeds(text: str, what: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"[quality] {what}: seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"[quality] {what}: need at least one seed and no repeats, got {text!r}")
    return seeds


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python bench/quality.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=sorted(DATASETS), help="a dataset of ../shared/data (or --raw)")
    ap.add_argument("--raw", help="your own dataset in the raw input layout (a folder with events/ and items/ Parquet); "
                                  "results go to the work folder, docs/ is left alone")
    ap.add_argument("--name", help="with --raw: the dataset's name in the report and the work folder (default: the folder's name)")
    ap.add_argument("--prep-config", dest="prep_config",
                    help="data_prep config for raw-layout data (default configs/data_prep/amazon.yaml: template {title}, "
                         "event type 'review' among the known ones)")
    ap.add_argument("--max-len", dest="max_len", type=int, default=0,
                    help="model.max_len of every trained model (before --set): the one recipe setting to fit to your data")
    ap.add_argument("--src", help="dataset folder (default: ../shared/data/<dataset>)")
    ap.add_argument("--out", help="work folder (default: bench/out/quality/<dataset>)")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds, e.g. 0,1,2")
    ap.add_argument("--seeds-for", dest="seeds_for", action="append", default=[], metavar="VARIANT=SEEDS",
                    help="other seeds for one trained variant, e.g. --seeds-for id=0 (repeatable; runs already "
                         "trained under the same --tag are reused, so seeds run separately can be reported together)")
    ap.add_argument("--variants", default="",
                    help=f"comma-separated subset of {ALL_VARIANTS} (default: all; lora only with a GPU: on CPU "
                         "the encoder pass over the catalogue costs about a minute per step)")
    ap.add_argument("--quick", action="store_true", help="smoke test: few steps per model, no docs written")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="train config override for every model, e.g. --set max_steps=2000 (repeatable)")
    ap.add_argument("--cold-set", dest="cold_overrides", action="append", default=[],
                    help="extra train override for the cold-start models only, after --set, e.g. --cold-set "
                         "max_steps=1500 (a shorter budget for the cold-start table than for the main one)")
    ap.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="mixed precision of training (auto: bf16 on a GPU that has it, else fp32)")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/results/ and docs/RESULTS.md")
    ap.add_argument("--tag", default="", help="suffix of the run folders (keeps runs with other overrides apart)")
    ap.add_argument("--tag-for", dest="tag_for", action="append", default=[], metavar="VARIANT=TAG",
                    help="another run-folder tag for one trained variant (repeatable), e.g. --tag-for hybrid=c5500dr1")
    ap.add_argument("--set-for", dest="set_for", action="append", default=[], metavar="VARIANT=KEY=VALUE",
                    help="a train override for one trained variant only, after --set (repeatable), "
                         "e.g. --set-for hybrid=model.dropout=0.1")
    ap.add_argument("--precision-for", dest="precision_for", action="append", default=[], metavar="VARIANT=PRECISION",
                    help="another mixed precision for one trained variant (repeatable), e.g. --precision-for hybrid=bf16 "
                         "to report bf16 hybrid runs beside float32 ones")
    ap.add_argument("--carry-from", dest="carry_from", metavar="RESULTS_JSON",
                    help="an earlier docs/results/<dataset>.json: its models that this command does not run are "
                         "copied into the table as they are, marked [carried] with their machine and command (e.g. "
                         "rerun only --variants most_popular,hybrid and keep the other rows)")
    ap.add_argument("--carry-seeds", dest="carry_seeds", action="append", default=[], metavar="VARIANT=SEEDS:RESULTS_JSON",
                    help="seeds of a model this command trains, taken from an earlier results JSON instead of trained "
                         "here (repeatable), e.g. --carry-seeds hybrid=2:docs/results/ml-1m_hybrid_s2.json: seeds run "
                         "on another machine join this command's seeds in one row. Refused unless their resolved "
                         "settings are this command's for that model and the test data is the same")
    ap.add_argument("--results-to", dest="results_to", metavar="PATH",
                    help="write the aggregated results JSON to PATH (e.g. docs/results/ml-1m_hybrid_s2.json, for a "
                         "later --carry-seeds / --carry-from) instead of docs/results/<dataset>.json; "
                         "docs/RESULTS.md is left as it is")
    args = ap.parse_args(argv)
    if bool(args.dataset) == bool(args.raw):
        ap.error("give one of --dataset NAME or --raw DIR")
    if args.name and not args.raw:
        ap.error("--name goes with --raw (a --dataset has its own name)")
    if args.max_len < 0:
        ap.error(f"--max-len must be > 0, got {args.max_len}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_all = time.time()
    if args.raw:  # a user's own data, in the raw layout
        src_default, prep_yaml, prefix = Path(args.raw), "configs/data_prep/amazon.yaml", "amazon"
        args.dataset = args.name or Path(args.raw).resolve().name
    else:
        src_default, prep_yaml, prefix = DATASETS[args.dataset]
    prep_yaml = args.prep_config or prep_yaml
    out = Path(args.out or ROOT / "bench" / "out" / "quality" / args.dataset).resolve()
    src = Path(args.src or src_default)
    seeds = parse_seeds(args.seeds, "--seeds")
    seeds_for = {}
    for spec in args.seeds_for:
        name, sep, val = (x.strip() for x in spec.partition("="))
        if not sep or name not in (*TRAINED, "cold"):
            raise SystemExit(f"[quality] --seeds-for {spec!r}: expected VARIANT=SEEDS with VARIANT one of {sorted((*TRAINED, 'cold'))}")
        seeds_for[name] = parse_seeds(val, f"--seeds-for {spec}")
    tag_for, set_for, precision_for = {}, {}, {}
    for flag, specs in (("--tag-for", args.tag_for), ("--set-for", args.set_for), ("--precision-for", args.precision_for)):
        for spec in specs:
            name, sep, val = (x.strip() for x in spec.partition("="))
            if not sep or not val or name not in TRAINED:
                raise SystemExit(f"[quality] {flag} {spec!r}: expected VARIANT=... with VARIANT one of {sorted(TRAINED)}")
            if flag == "--tag-for":
                tag_for[name] = val
            elif flag == "--set-for":
                set_for.setdefault(name, []).append(val)
            elif val not in PRECISIONS:
                raise SystemExit(f"[quality] --precision-for {spec!r}: precision must be one of {list(PRECISIONS)}")
            else:
                precision_for[name] = val
    carry_from = None  # read before hours of training, not after
    if args.carry_from:
        try:
            carry_from = json.loads(Path(args.carry_from).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"[quality] --carry-from {args.carry_from}: cannot read a results JSON ({e})") from None
    carry_seeds = read_carry_seeds(args.carry_seeds)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    movielens = args.dataset in MOVIELENS and not args.raw

    def default(v: str) -> bool:  # variants run when --variants is not given: those with a config for this data
        if v == "lora" and not gpu or v == "hybrid_ratings" and not movielens:
            return False
        return v not in TRAINED or (ROOT / "configs" / "train" / f"{prefix}_{TRAINED[v]}.yaml").is_file()

    variants = [v.strip() for v in args.variants.split(",") if v.strip()] or [v for v in ALL_VARIANTS if default(v)]
    bad = sorted(set(variants) - set(ALL_VARIANTS))
    if bad:
        raise SystemExit(f"[quality] unknown variant(s) {bad}; known: {ALL_VARIANTS}")
    overrides = ([f"model.max_len={args.max_len}"] if args.max_len else []) + list(args.overrides)
    if args.quick:
        # a few hundred examples' worth of steps: exercises every path, numbers are not meaningful
        overrides = ["max_steps=12", "eval_every=6", "eval_every_epochs=0", "save_every=0", "log_every=6", "early_stopping_patience=0"] + overrides
    def resolve(p: str) -> str:
        return ("bf16" if gpu and torch.cuda.is_bf16_supported() else "no") if p == "auto" else p

    precision = resolve(args.precision)
    precision_for = {k: resolve(v) for k, v in precision_for.items() if resolve(v) != precision}
    env = dict(os.environ, ACCELERATE_MIXED_PRECISION=precision, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])))
    tag = args.tag or ("quick" if args.quick else "")
    runs = out / ("runs" + (f"-{tag}" if tag else ""))

    def config_of(variant: str) -> tuple[Path, list[str]]:  # the train config and overrides of a trained variant
        return (ROOT / "configs" / "train" / f"{prefix}_{TRAINED[variant]}.yaml",
                VARIANT_EXTRA.get(variant, []) + overrides + set_for.get(variant, []))

    carry_sources = {path: old for carried in carry_seeds.values() for _, _, old, path in carried}  # one check per file
    for path, old in carry_sources.items():  # refused now, not after hours of training
        check_same_data({"dataset": args.dataset}, old, f"[quality] --carry-seeds {path}", keys=())
    for variant, carried in carry_seeds.items():
        if variant not in variants:
            raise SystemExit(f"[quality] --carry-seeds {variant}=...: {variant} is not among --variants {','.join(variants)}")
        now = resolved_settings(*config_of(variant))
        for seed, entry, old, path in carried:
            if seed in seeds_for.get(variant, seeds):
                raise SystemExit(f"[quality] --carry-seeds: {variant} seed {seed} is trained by this command too; drop it from --seeds")
            changed = setting_changes(entry["settings"], now)
            if changed:
                raise SystemExit(f"[quality] --carry-seeds {path}: {variant} seed {seed} was trained with other settings than "
                                 f"this command gives {variant} ({'; '.join(changed)})")
    log(f"{args.dataset}: variants {variants}, seeds {seeds}, device {device}, precision {precision}"
        + "".join(f" ({k}: {v})" for k, v in precision_for.items()) + f", out {out}")

    # ---- data
    from data_prep.schema import load_prepared

    if movielens:
        raw = out / "raw"
        convert(src, raw)
    else:
        raw = raw_layout(src)
    prep_path = prepare(prep_yaml, raw / "events", raw / "items", out / "prepared")
    prep = load_prepared(prep_path)
    cand = candidate_mask(prep)
    n_train = torch.tensor(prep.items.data.table.column("n_train_events").to_numpy())
    slices = {"cold_items": n_train == 0}  # targets never seen in training (rare under leave-last-out)

    res = {"dataset": args.dataset, "command": "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine(), "precision": precision, "precision_for": precision_for, "seeds": seeds, "seeds_for": seeds_for, "overrides": overrides,
           "n_candidates": int(cand.sum()), "n_items_catalogue": len(prep.items), "prepared": str(prep_path),
           "runs": {}, "per_seed": {}, "configs": {}, "notes": []}
    for path, old in carry_sources.items():
        check_same_data(res, old, f"[quality] --carry-seeds {path}", ("n_candidates",))

    if "most_popular" in variants:
        m = evaluate_popular(prep, cand, slices, device)
        res["per_seed"]["most_popular"] = [m]
        res["configs"]["most_popular"] = "train/baselines.py"
        log(f"most_popular test HR@10 {m['test']['HR@10']:.4f} NDCG@10 {m['test']['NDCG@10']:.4f}")

    vdata = {}  # variant -> (prepared path, loaded) where it is not the main prepared data
    if "hybrid_ratings" in variants:
        if not movielens:
            raise SystemExit("[quality] hybrid_ratings needs MovieLens (its stars become event types); not for raw-layout data")
        convert(src, out / "raw-ratings", ("--rating-event-types",))
        rp = prepare(prep_yaml, out / "raw-ratings" / "events", out / "raw-ratings" / "items", out / "prepared-ratings",
                     ("event_types=[" + ",".join(RATING_TYPES) + "]",))
        rprep = load_prepared(rp)
        if not same_split(prep, rprep):
            raise SystemExit(f"[quality] internal: {rp} does not hold the same items and sequences as {prep_path}")
        vdata["hybrid_ratings"] = (rp, rprep)

    for variant in [v for v in variants if v in TRAINED]:
        yaml_path, voverrides = config_of(variant)
        if not yaml_path.is_file():
            raise SystemExit(f"[quality] {yaml_path} missing: variant {variant} has no config for {args.dataset}")
        res["configs"][variant] = str(yaml_path.relative_to(ROOT)) + "".join(
            f" {x}" for x in VARIANT_EXTRA.get(variant, []) + set_for.get(variant, [])) + (
            f" (precision {precision_for[variant]})" if variant in precision_for else "")
        venv = {**env, "ACCELERATE_MIXED_PRECISION": precision_for.get(variant, precision)}
        vpath, vprep = vdata.get(variant, (prep_path, prep))
        vruns = out / f"runs-{tag_for[variant]}" if variant in tag_for else runs
        vsettings = resolved_settings(yaml_path, voverrides)
        for seed in seeds_for.get(variant, seeds):
            name = f"{variant}_s{seed}"
            final, wall = train_one(yaml_path, vpath, vruns, name, seed, voverrides, venv)
            m = evaluate_final(final, vprep, cand, slices, device, text_cache=text_cache_dir(out))
            # everything a later --carry-seeds needs to report this seed without its run folder
            res["runs"].setdefault(variant, {})[seed] = {
                "run_name": name, "wall_s": wall, "final": str(final), "run_dir": str(vruns / name), "trained": m.get("trained"),
                "valid_curve": read_valid_curve(vruns / name), "best_step": m["best_step"],
                "metrics": {sp: {k: m[sp][k] for k in (*HEADLINE, "n") if k in m[sp]} for sp in ("test", "valid")},
                "precision": venv["ACCELERATE_MIXED_PRECISION"], "machine": res["machine"], "settings": vsettings}
            res["per_seed"].setdefault(variant, []).append(m)
            tr = m.get("trained") or {}
            log(f"{name}: test HR@10 {m['test']['HR@10']:.4f} NDCG@10 {m['test']['NDCG@10']:.4f} "
                f"(valid NDCG@10 {m['valid'].get('NDCG@10', float('nan')):.4f}, best step {m['best_step']}, train {fmt_wall(wall)})"
                + (f" [stopped by {tr['stopped_by']} after step {tr['steps']} of {tr['max_steps']}]" if tr.get("stopped_by") else ""))
        add_carried_seeds(res, variant, carry_seeds.get(variant, []))

    if "cold" in variants:
        cold_info = make_cold_raw(raw, out / "raw-cold")
        cprep_path = prepare(prep_yaml, out / "raw-cold" / "events", out / "raw-cold" / "items", out / "prepared-cold")
        cprep = load_prepared(cprep_path)
        ccand = candidate_mask(cprep)
        ids = cprep.items.data.table.column("item_id").to_pylist()
        cold_ids = {str(x) for x in cold_info["cold_items"]}
        is_cold = torch.tensor([i in cold_ids for i in ids])
        # the split removed the cold items from training: n_train_events must be 0 for every one of them
        cn = torch.tensor(cprep.items.data.table.column("n_train_events").to_numpy())
        if bool((cn[is_cold] > 0).any()):
            raise SystemExit("[quality] internal: a cold item has training events in the cold-start data")
        cslices = {"cold": is_cold, "warm": ~is_cold}
        cold_overrides = overrides + list(args.cold_overrides)
        cold_seeds = seeds_for.get("cold", seeds)
        cold = {"info": {k: v for k, v in cold_info.items() if k != "cold_items"}, "per_seed": {}, "summary": {},
                "overrides": cold_overrides, "seeds": cold_seeds}
        mp = evaluate_popular(cprep, ccand, cslices, device)
        cold["per_seed"]["most_popular"] = [mp]
        for model_name in COLD_MODELS:
            yaml_path = ROOT / "configs" / "train" / f"{prefix}_{TRAINED[model_name]}.yaml"
            for seed in cold_seeds:
                name = f"cold_{model_name}_s{seed}"
                final, wall = train_one(yaml_path, cprep_path, runs, name, seed, cold_overrides, env)
                if model_name == "hybrid":  # also the same model served with cold_item_ids=nearest
                    m, mb = evaluate_final(final, cprep, ccand, cslices, device, also_borrowed=True, text_cache=text_cache_dir(out))
                    cold["per_seed"].setdefault("hybrid+nearest_id", []).append(mb)
                else:
                    m = evaluate_final(final, cprep, ccand, cslices, device, text_cache=text_cache_dir(out))
                cold["per_seed"].setdefault(model_name, []).append(m)
                log(f"{name}: cold-target HR@10 {m['test']['cold']['HR@10']:.4f} NDCG@10 {m['test']['cold']['NDCG@10']:.4f} | "
                    f"all HR@10 {m['test']['HR@10']:.4f} (train {fmt_wall(wall)})")
        for name, per in cold["per_seed"].items():
            cold["summary"][name] = {"cold": aggregate(per, "test", "cold"), "warm": aggregate(per, "test", "warm"),
                                     "all": aggregate(per, "test")}
        cold["n_cold_users"] = cold["per_seed"]["most_popular"][0]["test"]["cold"]["n"]
        cold["n_users"] = cold["per_seed"]["most_popular"][0]["test"]["n"]
        res["cold"] = cold

    res["paired"] = paired_rows(res["per_seed"], res["runs"])
    res["summary"] = {k: aggregate(v, "test") for k, v in res["per_seed"].items()}
    res["summary_valid"] = {k: aggregate(v, "valid") for k, v in res["per_seed"].items()}
    first = next(iter(res["per_seed"].values()), None)
    res["n_test_users"] = first[0]["test"]["n"] if first else 0
    for variant, carried in carry_seeds.items():
        for seed, entry, old, path in carried:
            if entry["metrics"]["test"].get("n") != res["n_test_users"]:
                raise SystemExit(f"[quality] --carry-seeds {path}: {variant} seed {seed} ranked {entry['metrics']['test'].get('n')} "
                                 f"test users, this run {res['n_test_users']} (other prepared data)")
    if carry_from is not None:
        carry_rows(res, carry_from, args.carry_from, set(res["per_seed"]) | ({"cold"} if "cold" in res else set()))
        log(f"carried from {args.carry_from}: {', '.join(res.get('carried', {})) or 'nothing (every model was rerun)'}")
    res["wall_s"] = time.time() - t_all
    res["notes"].append("The item-vector/ranking numbers are computed from each run's final/ export (train.export.load_final) "
                        "with train.metrics; checkpoints are chosen by the training loop on validation NDCG@10 only.")
    if args.dataset == "ml-1m":
        res["notes"].append("ML-1M ratings.dat here is a reconstruction (137 of 1,000,209 timestamps imputed, none of them a "
                            "user's last rating: test targets unaffected); see /work/shared/data/ml-1m/SOURCE.md.")

    # ---- report
    for v in res["per_seed"].values():  # per-user tensors are not JSON; keep the metrics only
        for m in v:
            m.pop("test_ranks", None)
    atomic_write_json(out / "results.json", res)
    log(f"wrote {out / 'results.json'}")
    docs = ROOT / "docs"
    to_docs = not args.quick and not args.no_docs and not args.results_to and not args.raw
    (docs / "results" if to_docs else out).mkdir(parents=True, exist_ok=True)
    res["plots"] = plots(res, runs, (docs / "results" if to_docs else out) / args.dataset)
    # aggregated metrics only (no MovieLens-derived rows): safe to commit
    slim = {k: v for k, v in res.items() if k not in ("per_seed",)}
    slim["cold"] = {k: v for k, v in (res.get("cold") or {}).items() if k != "per_seed"} or None
    if to_docs:
        atomic_write_json(docs / "results" / f"{args.dataset}.json", slim)
        log(f"wrote {write_results_md(docs)} and {', '.join(res['plots'])}")
    else:
        if args.results_to:
            Path(args.results_to).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(args.results_to), slim)
            log(f"wrote {args.results_to}")
        atomic_write_text(out / "RESULTS.md", dataset_section(res))
        log(f"wrote {out / 'RESULTS.md'} (docs/RESULTS.md untouched: --quick / --no-docs / --results-to)")
    print(dataset_section(res))
    log(f"done in {fmt_secs(time.time() - t_all)}")
    return res


if __name__ == "__main__":
    main()
