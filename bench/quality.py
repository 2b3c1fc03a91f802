"""Recommendation quality under the full-ranking protocol (issues #5, #27), one command per dataset:

    python bench/quality.py --dataset ml-100k --quick                  # smoke test, a few minutes on CPU
    python bench/quality.py --dataset ml-100k --seeds 0,1,2            # the ML-100K tables
    python bench/quality.py --dataset ml-1m --seeds 0,1,2              # the ML-1M tables (a GPU is used when present)
    python bench/quality.py --dataset ml-1m --variants id,hybrid --set max_steps=3000   # a subset, shorter
    python bench/quality.py --dataset amazon2014-toy --seeds 0,1,2     # text-rich, sparse: configs/train/amazon_*.yaml
    python bench/quality.py --raw DIR --name shop [--max-len 50]       # your own data in the raw layout (events/, items/)
    # one table from runs of several commands (other settings, seeds, machines or days): each command trains under
    # its own --tag / --set / --precision / --seeds, and the table names the others' records
    python bench/quality.py --dataset ml-1m --variants hybrid --seeds 2 --tag dr1 --set model.dropout=0.1 --no-docs
    python bench/quality.py --dataset ml-1m --variants most_popular,id --seeds 0,1,2 --records bench/out/quality/ml-1m/runs-dr1
    python bench/quality.py --dataset ml-1m --report-only --records docs/results/ml-1m.json --records RUN_FOLDER   # trains nothing
    # two commands side by side on one machine: give each its share of the cores (a training takes every core by
    # default; two on 2 cores without it ran 2-4x slower per step than with OMP_NUM_THREADS=1 each, 2026-12-06)
    OMP_NUM_THREADS=1 python bench/quality.py --dataset amazon2018-game --variants pool --seeds 1 --no-docs &

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
   These runs write no record: the cold-start table is this command's, or copied whole from a results JSON
   named with --records when this command does not run ``cold``.
6. record   every evaluated run writes <run folder>/record.json: the dataset and a fingerprint of its prepared data,
   variant, seed, tag, config file + sha256, the overrides and precision it was trained with, its resolved settings,
   test and validation metrics, best step, validation curve, train wall and peak RSS, date, commit, machine and the
   command; record.npz beside it holds the per-user test ranks. A finished run (this command's --tag) is not
   retrained; a run folder from before records gets its record the first time its command evaluates it again.
7. report  the table is made from records: this command's, plus those named with --records (a record, a run folder,
   a runs-<tag> folder, or a results JSON: its runs are records, and its rows without per-seed records, from tables
   made before records, are copied whole, marked [carried]). Records not made by this command are listed below the
   table with their machine, precision and command, and a row trained with settings other than this command's
   names them in its config column, as does a row whose config file has changed since its runs (the settings
   then -> now: a reused row is not the recipe the file holds today). Refused before any training: a record of another dataset or other prepared
   data, a (variant, seed) named twice with other settings or trained here too, one model (row) whose records
   differ in settings or precision. Below the table, the model to ship: the best mean validation NDCG@10.
   --report-only trains nothing (and reads no data unless --variants names
   most_popular). Written: <out>/results.json, and (unless --quick / --no-docs / --raw) docs/results/<ds>.json
   (its runs hold the records, without ranks) + docs/results/<ds>_*.png, then docs/RESULTS.md is rebuilt from
   every docs/results/*.json.

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
from lmrec_common.manifest import git_commit, sha256_file  # noqa: E402
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
TRAINED = {"id": "sasrec", "text": "text", "hybrid": "hybrid", "hybrid_ratings": "hybrid", "lora": "lora", "pool": "pool",
           "top": "top"}
# pool: the hybrid with a learned attention pooling over the frozen encoder's token states (text_mode pool)
# top: the hybrid with the encoder's top layer trained over its cached lower-layer states (text_mode top, sampled softmax)
# hybrid_ratings: the hybrid plus the stars of every history event as its event type (converted with
# --rating-event-types into its own prepared data: same events, order and split, so the same targets).
# It uses more of the data than the published anchors (they see item ids only).
VARIANT_EXTRA = {"hybrid_ratings": ["model.use_event_types=true"]}
RATING_TYPES = [f"rating_{r}" for r in range(1, 6)]
COLD_MODELS = ("id", "text", "hybrid")
ALL_VARIANTS = ["most_popular", "id", "text", "hybrid", "hybrid_ratings", "lora", "pool", "top", "cold"]
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


# beyond data_prep's own run-only keys (pipeline.CONFIG_RUN_ONLY): a work folder's prepared data is the same data
# whatever path reached its inputs, however many shards or rows per batch wrote it, incremental or not
_PREP_SAME_DATA = {"events_path", "items_path", "output_dir", "batch_size", "incremental", "num_shards"}
# what a text tower reads of an item (recorded with every text run: runs on other item text are other models)
ITEM_TEXT_KEYS = ("item_text_template", "item_text_unescape_html", "tokenizer", "max_text_tokens")


def prep_config(prep_yaml: str, events: Path, items: Path, out_dir: Path, extra: tuple[str, ...] = ()):
    from data_prep.config import DataPrepConfig

    try:
        return load_config(DataPrepConfig, ROOT / prep_yaml, [f"events_path={events}", f"items_path={items}",
                                                               f"output_dir={out_dir}", "version=v1", "num_proc=1", *extra])
    except (KeyError, TypeError, ValueError) as e:  # an unknown key or a bad value of --prep-set
        raise SystemExit(f"[quality] data_prep config {prep_yaml} + {' '.join(extra) or 'no overrides'}: {e}") from None


def item_text_settings(prep_yaml: str, extra: tuple[str, ...] = ()) -> dict:
    """How the item text is made (template, HTML decoding, tokenizer, truncation) under ``prep_yaml`` + ``extra``."""
    from lmrec_common.config import to_dict

    cfg = to_dict(prep_config(prep_yaml, Path("."), Path("."), Path("."), extra))
    return {k: cfg[k] for k in ITEM_TEXT_KEYS}


def prepare(prep_yaml: str, events: Path, items: Path, out_dir: Path, extra: tuple[str, ...] = ()) -> Path:
    """data_prep with the dataset's config; version fixed to v1 so reruns reuse it. Prepared data made under other
    settings (an edited template, another --prep-set into the same folder) is refused, never reused."""
    from data_prep.pipeline import CONFIG_RUN_ONLY
    from data_prep.pipeline import run as prep_run
    from lmrec_common.config import to_dict

    version = out_dir / "v1"
    cfg = prep_config(prep_yaml, events, items, out_dir, extra)
    if (version / "manifest.json").is_file():
        had = json.loads((version / "manifest.json").read_text()).get("config") or {}
        want = json.loads(json.dumps(to_dict(cfg)))
        changed = [f"{k}: {had[k]!r} -> {v!r}" for k, v in want.items() if k not in CONFIG_RUN_ONLY | _PREP_SAME_DATA and k in had and had[k] != v]
        if changed:
            raise SystemExit(f"[quality] {version} was prepared under other data_prep settings than {prep_yaml}"
                             f"{''.join(' + ' + e for e in extra)} give now ({'; '.join(changed)}): delete it (and the runs trained on it), "
                             "or pass --out for another work folder")
        log(f"prepared data present: {version}")
        return version
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
        # a key the code no longer has (and ``then`` lacks) is not a change: nothing to compare it with
        was = then.get(key, default.get(key, value))
        pairs = [(f"{key}.{k}", v, was.get(k, (default.get(key) or {}).get(k, v))) for k, v in value.items()] \
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
            "config_sha256": sha256_file(train_yaml),
            "precision": env["ACCELERATE_MIXED_PRECISION"]}
    if (final / "export.json").is_file():
        had = json.loads(args_file.read_text()) if args_file.is_file() else want  # runs from before the record: trusted
        if os.path.realpath(had.get("data", "")) == os.path.realpath(prep):  # the same folder reached another way
            had = {**had, "data": want["data"]}
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
        # this child's own resource use (RUSAGE_CHILDREN would be the largest of every run so far)
        _, status, usage = os.wait4(p.pid, 0)
        rc = p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"[quality] training {run_name} failed with exit code {rc}; see {runs / run_name / 'train.log'}")
    # the training loop sums its launches (a run resumed after a kill); the bench saw only this one
    trainer = json.loads((final / "metrics.json").read_text()).get("train_wall_s") if (final / "metrics.json").is_file() else None
    resumed = "[train] resumed from" in (runs / run_name / "train.log").read_text()
    rec = {"wall_s": trainer, "source": "train loop (all launches)"} if trainer is not None else \
        {"wall_s": wall, "source": "bench (this launch)", **({"partial": True} if resumed else {})}
    rec["torch"] = torch.__version__  # the table's machine line is the reporting process's; runs may differ
    rec["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)  # Linux: KiB; this launch only when it resumed
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


# ------------------------------------------------------------------------------------------------ records
# A record is one evaluated run, self-contained: <run folder>/record.json (what it was trained on and with, its
# metrics, where and when) + record.npz beside it (the per-user test ranks the paired differences need). Every
# table is made from records: this command's runs, and any the user names with --records.
RECORD_KIND = "lmrec.quality_record"
DATA_KEYS = ("n_candidates", "n_test_users", "sha256")  # what records of the same prepared data share


class Record:
    """One record and where it came from (a plain class: this file is also loaded by path, outside sys.modules)."""

    def __init__(self, path: str, data: dict, ranks: np.ndarray | None = None, origin: dict | None = None,
                 source: str | None = None, paired: list | None = None):
        self.path = path  # where it was read or written (named in every error about it)
        self.data = data  # record.json, or a run entry of a results JSON (the same fields)
        self.ranks = ranks  # (n_test_users,) 1-based test ranks; None when read from a results JSON
        self.origin = origin  # None: run by this command; else where it ran: source, command, machine, precision
        self.source = source  # the results JSON it came from (its paired rows stand in for the missing ranks)
        self.paired = paired or []

    @property
    def key(self) -> tuple[str, int]:
        return self.data["variant"], int(self.data["seed"])

    def fingerprint(self) -> dict:
        return {**(self.data.get("data") or {}), "dataset": self.data.get("dataset")}


def data_fingerprint(dataset: str, prep, cand: torch.Tensor) -> dict:
    """What a record says about the data it was measured on: two records compare only when these agree
    (sha256 over the item ids, the users and their item sequences, hence the validation and test targets)."""
    from train.data import EvalExamples, list_column

    vals, offs = list_column(prep.sequences, "item_idx")
    h = hashlib.sha256()
    for col in (prep.items.data.table.column("item_id"), prep.sequences.data.table.column("user_id")):
        h.update("\n".join(map(str, col.to_pylist())).encode() + b"\0")
    h.update(np.asarray(offs, dtype=np.int64).tobytes() + np.asarray(vals, dtype=np.int64).tobytes())
    return {"dataset": dataset, "n_candidates": int(cand.sum()), "n_test_users": len(EvalExamples.build(prep.sequences, "test", 1)),
            "n_items_catalogue": len(prep.items), "sha256": h.hexdigest()}


def check_same_data(fp: dict, other: dict, where: str) -> None:
    """Refuses a record (or a results file) ``other`` of another dataset or other prepared data than ``fp``
    (compared on the keys both have: records read from results files of before records carry no sha256)."""
    if other.get("dataset") != fp["dataset"]:
        raise SystemExit(f"{where}: dataset {other.get('dataset')!r}, this run is {fp['dataset']!r}")
    for key in DATA_KEYS:
        if key in other and key in fp and other[key] != fp[key]:
            raise SystemExit(f"{where}: {key} {other[key]} differs from this run's {fp[key]} (other prepared data)")


def write_record(run_dir: Path, rec: dict, ranks: torch.Tensor) -> Record:
    np.savez_compressed(run_dir / "record.npz", test_ranks=ranks.numpy().astype(np.int64))
    atomic_write_json(run_dir / "record.json", rec)  # last: a record.json always has its ranks
    return Record(str(run_dir / "record.json"), rec, ranks.numpy().astype(np.int64))


def load_record(path: Path, doc: dict | None = None) -> Record:
    if doc is None:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"[quality] {path}: cannot read a record ({e})") from None
    if doc.get("kind") != RECORD_KIND:
        raise SystemExit(f"[quality] {path}: not a record of bench/quality.py (kind {doc.get('kind')!r})")
    npz = path.with_suffix(".npz")
    return Record(str(path), doc, np.load(npz)["test_ranks"] if npz.is_file() else None)


def own_record(run_dir: Path, final: Path, fp: dict, settings: dict, precision: str) -> Record | None:
    """The record of a run of this command when it still describes its final/ (same export, data, settings):
    the run is then not evaluated again."""
    f = run_dir / "record.json"
    if not (f.is_file() and (run_dir / "record.npz").is_file()):
        return None
    r = load_record(f)
    same_data = all(r.fingerprint().get(k) == fp.get(k) for k in ("dataset", *DATA_KEYS))
    if r.data.get("export_sha256") != sha256_file(final / "export.json") or not same_data or \
            r.data.get("precision") != precision or setting_changes(r.data.get("settings", {}), settings):
        return None
    return r


def records_of_results(doc: dict, source: str) -> tuple[list[Record], dict]:
    """The records a results JSON holds (its runs' entries with metrics and settings) and, for its models whose
    runs have none (tables made before records), their whole rows; its cold-start table too. Each keeps where it
    ran (a row or seed already carried into that file keeps its first origin)."""
    configs, carried = doc.get("configs") or {}, doc.get("carried") or {}
    base = {"dataset": doc.get("dataset"), "data": {k: doc[k] for k in ("n_candidates", "n_test_users", "n_items_catalogue") if k in doc}}
    recs, rows = [], {}
    for variant, runs in (doc.get("runs") or {}).items():
        entries = sorted((int(s), e) for s, e in runs.items())
        if not entries or not all("metrics" in e and "settings" in e for _, e in entries):
            continue
        for seed, e in entries:
            origin = e.get("carried") or {"source": source, "command": doc.get("command"),
                                           "machine": e.get("machine") or doc.get("machine"), "precision": e.get("precision")}
            data = {**base, "config": configs.get(variant), "command": origin["command"],
                    **{k: v for k, v in e.items() if k != "carried"}, "variant": variant, "seed": seed}
            recs.append(Record(f"{source} ({variant} seed {seed})", data, origin=origin, source=source, paired=doc.get("paired") or []))
    have = {r.data["variant"] for r in recs}

    def origin(model: str) -> dict:
        return carried.get(model) or {"source": source, "command": doc.get("command"), "machine": doc.get("machine"),
                                      "precision": (doc.get("precision_for") or {}).get(model, doc.get("precision"))}

    for model, summary in (doc.get("summary") or {}).items():
        if model not in have:
            rows[model] = {"summary": summary, "summary_valid": (doc.get("summary_valid") or {}).get(model, {}),
                           "runs": (doc.get("runs") or {}).get(model, {}), "config": configs.get(model),
                           "origin": origin(model), "source": source, "paired": doc.get("paired") or [], "data": base}
    if doc.get("cold"):
        rows["cold"] = {"cold": doc["cold"], "origin": origin("cold"), "source": source, "paired": doc.get("paired") or [], "data": base}
    return recs, rows


def read_records(spec: str) -> tuple[list[Record], dict]:
    """--records PATH: a record.json, a run folder holding one, a runs-<tag> folder (the records of its runs), or a
    results JSON (<out>/results.json, docs/results/<dataset>.json). Returns its records and, from a results JSON,
    the rows it holds without per-seed records (see records_of_results)."""
    recs, rows = _read_records(spec)
    for r in recs:  # not run by this command: where it ran is named below the table
        r.origin = r.origin or {"source": spec, "command": r.data.get("command"), "machine": r.data.get("machine"),
                                "precision": r.data.get("precision")}
    return recs, rows


def _read_records(spec: str) -> tuple[list[Record], dict]:
    p = Path(spec)
    if p.is_dir():
        if (p / "record.json").is_file():
            return [load_record(p / "record.json")], {}
        runs = sorted(d for d in p.iterdir() if d.is_dir())
        recs = [load_record(d / "record.json") for d in runs if (d / "record.json").is_file()]
        if not recs:
            raise SystemExit(f"[quality] --records {spec}: no record.json in it or in its run folders (a run gets its record "
                             "when the command that trained it evaluates it: rerun that command, a finished run is not retrained)")
        missing = [d.name for d in runs if not (d / "record.json").is_file()]
        if missing:
            log(f"--records {spec}: no record in {', '.join(missing)} (unfinished, or not evaluated since records exist): left out")
        return recs, {}
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"[quality] --records {spec}: cannot read a record, run folder or results JSON ({e})") from None
    if doc.get("kind") == RECORD_KIND:
        return [load_record(p, doc)], {}
    if not isinstance(doc.get("runs"), dict) or "summary" not in doc:
        raise SystemExit(f"[quality] --records {spec}: neither a record nor a results JSON of bench/quality.py")
    recs, rows = records_of_results(doc, spec)
    if not recs and not rows:
        raise SystemExit(f"[quality] --records {spec}: holds no record and no row")
    return recs, rows


def same_run(a: Record, b: Record) -> bool:
    """Two records of one run reached by two paths (a run folder and a results JSON that holds its record)."""
    return a.data.get("precision") == b.data.get("precision") and not setting_changes(a.data["settings"], b.data["settings"]) \
        and a.data["metrics"]["test"] == b.data["metrics"]["test"]


def check_records(named: list[Record], planned: dict[tuple[str, int], tuple[Path, dict, str]]) -> list[Record]:
    """Refuses, before any training: a (variant, seed) named twice with other settings or results (except that a
    results JSON's record gives way to one named as a run folder or record: a committed table's row is refreshed
    by naming the table and the new runs); one that this command trains too (from another run folder; a results
    JSON's record of it gives way to this command's run, as its whole rows do: naming a committed table refreshes
    its rows); records of one model (one table row) trained with other
    settings or precision than each other or than this command gives that model. ``planned``: (variant, seed) ->
    (run folder, resolved settings, precision) of this command's runs. Returns the named records to use."""
    kept: dict[tuple[str, int], Record] = {}
    for r in named:
        other = kept.get(r.key)
        if other is None:
            kept[r.key] = r
        elif same_run(other, r):
            log(f"{r.key[0]} seed {r.key[1]}: {r.path} is the record of {other.path} again")
        elif bool(other.source) != bool(r.source):  # a table's record gives way to a record named by its run
            table_rec, run_rec = (other, r) if other.source else (r, other)
            log(f"{r.key[0]} seed {r.key[1]}: {run_rec.path} named, the record of {table_rec.source} left out "
                f"({'; '.join(setting_changes(table_rec.data['settings'], run_rec.data['settings'])) or 'other results'})")
            kept[r.key] = run_rec
        else:
            changed = setting_changes(other.data["settings"], r.data["settings"])
            if other.data.get("precision") != r.data.get("precision"):
                changed.append(f"precision: {other.data.get('precision')!r} -> {r.data.get('precision')!r}")
            raise SystemExit(f"[quality] --records: {r.key[0]} seed {r.key[1]} twice, {other.path} and {r.path} "
                             f"({'; '.join(changed) or 'same settings, other results'}): name one of them")
    for key, r in list(kept.items()):
        if key in planned:
            run_dir = planned[key][0]
            if os.path.realpath(Path(r.path).parent) == os.path.realpath(run_dir):
                del kept[key]  # this command's own run: evaluated (or its record reused) below
                continue
            if r.source:  # a results JSON is a table: this command refreshes its rows (as its whole rows)
                log(f"{key[0]} seed {key[1]}: trained by this command, the record of {r.source} left out")
                del kept[key]
                continue
            raise SystemExit(f"[quality] {key[0]} seed {key[1]}: trained by this command in {run_dir} and named by "
                             f"--records {r.path}: drop it from --seeds or from --records")
    rows: dict[str, tuple[str, dict, str]] = {}  # variant -> (path, settings, precision) the row's others must have
    for (variant, _), (run_dir, settings, precision) in planned.items():
        rows.setdefault(variant, (f"{run_dir} (this command)", settings, precision))
    for r in kept.values():
        variant = r.key[0]
        if variant not in rows:
            rows[variant] = (r.path, r.data["settings"], r.data.get("precision"))
            continue
        path, settings, precision = rows[variant]
        changed = setting_changes(settings, r.data["settings"]) + (
            [f"precision: {precision!r} -> {r.data.get('precision')!r}"] if r.data.get("precision") != precision else [])
        if changed:
            raise SystemExit(f"[quality] --records {r.path}: {variant} was trained with other settings than {path} "
                             f"({'; '.join(changed)}); one row is one model: report them in separate tables")
    return list(kept.values())


def config_label(rec: dict, overrides: list[str], precision: str) -> str:
    """The table's config column of a row: the config and the overrides its records were trained with beyond this
    command's --set (the line above the table), the ones of --set they lack, and their precision where it is
    not this command's. Records of results files from before records carry their label as it was."""
    if "overrides" not in rec:
        label = rec.get("config") or "-"
    else:
        extra = [o for o in rec["overrides"] if o not in overrides]
        missing = [o for o in overrides if o not in rec["overrides"]]
        label = rec["config"] + "".join(f" {o}" for o in extra) + (f" (without {' '.join(missing)})" if missing else "")
    if rec.get("precision") not in (None, precision) and "(precision " not in label:
        label += f" (precision {rec['precision']})"
    stale = config_drift(rec)
    if stale:
        label += f" (the file has changed since this row was trained: {stale})"
    return label


def config_drift(rec: dict) -> str:
    """How a record's config file resolves now compared with the settings its run was trained with ("" when
    alike, or when the record predates settings or its file is gone): a row reused from an older table must not
    read as a run of the recipe that file now holds (amazon_text.yaml carried at d 64 after the recipe went to
    d 128)."""
    if "settings" not in rec or "overrides" not in rec or not rec.get("config"):
        return ""
    path = Path(rec["config"]) if Path(rec["config"]).is_absolute() else ROOT / rec["config"]
    if not path.is_file():
        return ""
    try:
        changes = setting_changes(rec["settings"], resolved_settings(path, rec["overrides"]))
    except (ValueError, TypeError) as e:  # ConfigError is a ValueError
        return f"it no longer loads with the run's overrides ({e})"
    return "; ".join(changes)


def variant_order(name: str) -> int:
    """The table's usual row order (ALL_VARIANTS), whichever command measured each row."""
    return ALL_VARIANTS.index(name) if name in ALL_VARIANTS else len(ALL_VARIANTS)


def table(res: dict, records: list[Record], rows: dict) -> None:
    """Fills ``res`` (the results JSON) from records: runs (each record, with where it ran when it was not this
    command), per-seed metrics, summaries, configs, precision_for and the paired differences; then the rows
    of results files that this command's records do not cover, marked carried (and their cold-start table)."""
    records = sorted(records, key=lambda r: (variant_order(r.key[0]), r.key[1]))
    for r in records:
        variant, seed = r.key
        res["runs"].setdefault(variant, {})[seed] = {**r.data, **({"carried": r.origin} if r.origin else {})}
        res["per_seed"].setdefault(variant, []).append({**r.data["metrics"], "best_step": r.data.get("best_step")})
        if variant not in res["configs"]:
            res["configs"][variant] = config_label(r.data, res["overrides"], res["precision"])
            if r.data.get("precision") not in (None, res["precision"]):
                res["precision_for"][variant] = r.data["precision"]
    res["summary"] = {k: aggregate(v, "test") for k, v in res["per_seed"].items()}
    res["summary_valid"] = {k: aggregate(v, "valid") for k, v in res["per_seed"].items()}
    taken = {}
    for model, row in rows.items():
        if model in res["summary"] or model == "cold" and res.get("cold"):
            log(f"{model}: measured here, the row of {row['source']} left out")
            continue
        taken[model] = row
        if model == "cold":
            res["cold"] = row["cold"]
        else:
            res["summary"][model], res["summary_valid"][model] = row["summary"], row["summary_valid"]
            res["runs"][model], res["configs"][model] = row["runs"], row["config"] or "-"
        res["carried"][model] = row["origin"]
    for key in ("summary", "summary_valid", "runs"):
        res[key] = dict(sorted(res[key].items(), key=lambda kv: variant_order(kv[0])))
    res["paired"] = paired_rows(records, taken)


# ------------------------------------------------------------------------------------------------ report
PAIRED_METRICS = ("HR@10", "NDCG@10")


def paired_rows(records: list[Record], rows: dict) -> list[dict]:
    """Paired per-user test differences (bench/paired.py) of every two models with a record of the same seed:
    B - A with its 95% interval, B the later model in the table's order. Both models rank the same users, so the
    difference has a much smaller error than either mean (the user-to-user spread cancels). Records read from a
    results JSON have no ranks: the pairs that JSON computed stand in, where both models in this table come from
    it (as records of that seed or as whole rows, ``rows``). Two models with ranks of two seeds or more also get one
    row pooled over those seeds (bench/paired.py compare_seeds: each user's difference averaged over the seeds)."""
    from paired import compare, compare_seeds

    by_seed: dict[int, list[Record]] = {}
    for r in records:
        by_seed.setdefault(r.key[1], []).append(r)
    out = []
    for seed in sorted(by_seed):
        models = sorted(by_seed[seed], key=lambda r: variant_order(r.key[0]))
        for i, ra in enumerate(models):
            for rb in models[i + 1:]:
                if ra.ranks is None or rb.ranks is None:
                    continue
                c = compare(torch.as_tensor(ra.ranks), torch.as_tensor(rb.ranks))
                out.append({"a": ra.key[0], "b": rb.key[0], "seed": seed, **_paired_cells(c)})
    ranked: dict[str, dict[int, Record]] = {}
    for r in records:
        if r.ranks is not None:
            ranked.setdefault(r.key[0], {})[r.key[1]] = r
    names = sorted(ranked, key=variant_order)
    for i, ma in enumerate(names):
        for mb in names[i + 1:]:
            seeds = sorted(set(ranked[ma]) & set(ranked[mb]))
            if len(seeds) < 2:
                continue
            c = compare_seeds([(torch.as_tensor(ranked[ma][s].ranks), torch.as_tensor(ranked[mb][s].ranks)) for s in seeds])
            out.append({"a": ma, "b": mb, "seed": ",".join(map(str, seeds)), "seeds": seeds, **_paired_cells(c)})
    source_of = {r.key: r.source for r in records}
    have = {(r["a"], r["b"], str(r["seed"])) for r in out}
    sources = {r.source: r.paired for r in records if r.source} | {w["source"]: w.get("paired") or [] for w in rows.values()}
    for src, paired in sources.items():
        for p in paired:
            key = (p["a"], p["b"], str(p["seed"]))
            if key not in have and all((rows.get(m) or {}).get("source") == src or
                                       all(source_of.get((m, sd)) == src for sd in _pair_seeds(p)) for m in (p["a"], p["b"])):
                out.append(p)
                have.add(key)
    return sorted(out, key=lambda p: (len(_pair_seeds(p)) > 1, _pair_seeds(p), variant_order(p["a"]), variant_order(p["b"])))


def _paired_cells(c: dict) -> dict:
    """What a paired row keeps of bench/paired.py's statistics: the table's metrics, difference, interval, user counts."""
    return {k: {x: c[k][x] for x in ("diff", "ci95", "users_b_better", "users_a_better")} for k in PAIRED_METRICS}


def _pair_seeds(p: dict) -> list[int]:
    """The seeds a paired row covers: one, or several for a row pooled over seeds."""
    return [int(x) for x in p.get("seeds") or [p["seed"]]]


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


def validation_choice(res: dict) -> tuple[str, float, list[tuple[str, float]]] | None:
    """The model to ship by the rule of the README and docs/CONFIGS.md: the highest mean VALIDATION NDCG@10 over its
    seeds (the test split plays no part). Returns (model, its NDCG@10, the others' (model, NDCG@10) best first), or
    None when fewer than two models have a validation figure."""
    vals = [(name, v["NDCG@10"]["mean"]) for name, v in (res.get("summary_valid") or {}).items()
            if name in res.get("summary", {}) and (v or {}).get("NDCG@10", {}).get("mean") is not None]
    if len(vals) < 2:
        return None
    vals.sort(key=lambda x: -x[1])
    return vals[0][0], vals[0][1], vals[1:]


def report_item_text(records: list) -> dict | None:
    """The item text of a report's records, when they name one (records from before it was recorded do not)."""
    seen = {json.dumps(r.data["settings"]["item_text"], sort_keys=True) for r in records if "item_text" in r.data.get("settings", {})}
    return json.loads(seen.pop()) if len(seen) == 1 else None


def item_text_line(res: dict) -> str:
    """What the text models of a table read of each item (tables from before it was recorded: nothing)."""
    t = res.get("item_text")
    if not t:
        return ""
    return ("  \nItem text: " + (f"data_prep overrides `{' '.join(res['prep_set'])}`, " if res.get("prep_set") else "")
            + f"template `{t['item_text_template']}`" + (", HTML entities decoded" if t["item_text_unescape_html"] else "")
            + f", first {t['max_text_tokens']} tokens of {t['tokenizer']}.")


def dataset_section(res: dict) -> str:
    ds = res["dataset"]
    lines = [f"## {ds}", "",
             f"Command: `{res['command']}`  ",
             f"Machine: {res['machine']['cpu']}, {res['machine']['cpu_cores']} cores, GPU: {res['machine']['gpu'] or 'none'}, "
             f"torch {res['machine']['torch']}, precision {res['precision']}"
             + "".join(f" ({k}: {v})" for k, v in (res.get("precision_for") or {}).items()) + ".  ",
             f"Wall time of this command: {fmt_secs(res['wall_s'])} (runs it found finished are reused, not retrained; each run's "
             f"training wall is in the table); training seeds per model in the table. "
             f"Candidates: {res['n_candidates']:,} items; test users: {res['n_test_users']:,}.  ",
             f"Train overrides on top of the configs: `{' '.join(res['overrides']) or '(none)'}`." + item_text_line(res), "",
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
        if moved:  # records of another command's runs: named in the list below the table
            run_seeds += f" ({','.join(moved)} carried)"
        config = res['configs'].get(name, '-') + (" [carried]" if name in res.get("carried", {}) else "")
        lines.append(f"| {name} | {config} | {run_seeds} | " + " | ".join(fmt_range(s.get(k, {})) for k in HEADLINE)
                     + f" | {fmt_range(v.get('NDCG@10', {}))} | {wall} |")
    choice = validation_choice(res)
    if choice is not None:  # the one a user keeps: chosen on validation, never on the test columns above
        name, best, rest = choice
        lines += ["", f"Chosen on validation NDCG@10 (mean over seeds): **{name}** ({res['configs'].get(name, '-')}), "
                  f"{best:.4f}; then " + ", ".join(f"{n} {x:.4f}" for n, x in rest) + "."]
    # where each carried row (a results file's row without records) and carried seed (another command's record) ran
    carried = list((res.get("carried") or {}).items()) + [
        (f"{name} seed {seed}", r["carried"]) for name, rs in res["runs"].items() for seed, r in rs.items() if r.get("carried")]
    if carried:
        seeds = any(r.get("carried") for rs in res["runs"].values() for r in rs.values())
        what = " and ".join(w for w, on in (("Rows marked [carried]", bool(res.get("carried"))), ("carried seeds", seeds)) if on)
        lines += ["", f"{what[0].upper() + what[1:]} were not run by this command: they come from another run of this "
                  "bench on the same prepared data (same candidates and test users):"]
        groups: dict = {}  # one line per origin: its JSON text -> (origin, what came from there)
        for model, o in carried:
            groups.setdefault(json.dumps(o, sort_keys=True), (o, []))[1].append(model)
        for o, models in groups.values():
            m = o.get("machine") or {}
            lines.append(f"- {', '.join(models)}: {m.get('cpu', '?')}, {m.get('cpu_cores', '?')} cores, GPU: {m.get('gpu') or 'none'}, "
                         f"torch {m.get('torch', '?')}, precision {o.get('precision')}; command `{o.get('command')}`")
    if res.get("paired"):
        lines += ["", "Paired per-user differences on the test split, model B minus model A trained with the same seed "
                  "(bench/paired.py; 95% interval over users; users better / worse on NDCG@10). A row of several seeds "
                  "pools them: each user's difference is its mean over those seeds:", "",
                  "| B | A | seed | HR@10 B - A [95%] | NDCG@10 B - A [95%] | users B better / A better |", "|---|---|---|---|---|---|"]
        for r in res["paired"]:
            f = lambda d: f"{d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"  # noqa: E731
            seed = f"{r['seed']} pooled" if len(_pair_seeds(r)) > 1 else r["seed"]
            lines.append(f"| {r['b']} | {r['a']} | {seed} | {f(r['HR@10'])} | {f(r['NDCG@10'])} | "
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
    ap.add_argument("--prep-set", dest="prep_sets", action="append", default=[], metavar="KEY=VALUE",
                    help="data_prep override of the prepared data, e.g. --prep-set 'item_text_template={title}' "
                         "(repeatable): measures an item text (template, max_text_tokens) on your data. The prepared data "
                         "and the runs go to folders named by these overrides (prepared-p<hash>, runs[-tag]-p<hash>, results-p<hash>.json), the "
                         "records name the item text, and docs/ is left alone")
    ap.add_argument("--max-len", dest="max_len", type=int, default=0,
                    help="model.max_len of every trained model (before --set): the one recipe setting to fit to your data")
    ap.add_argument("--src", help="dataset folder (default: ../shared/data/<dataset>)")
    ap.add_argument("--out", help="work folder (default: bench/out/quality/<dataset>)")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds of every trained variant, e.g. 0,1,2")
    ap.add_argument("--variants", default="",
                    help=f"comma-separated subset of {ALL_VARIANTS} (default: all; lora only with a GPU: on CPU "
                         "the encoder pass over the catalogue costs about a minute per step; top only when named: "
                         "~6x the frozen hybrid's step on a CPU, level with it on amazon2014-toy, docs/TEXT_RICH.md)")
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
    ap.add_argument("--records", action="append", default=[], metavar="PATH",
                    help="records of other commands' runs to report in this table (repeatable): a run folder or its "
                         "record.json, a runs-<tag> folder (its runs' records), or a results JSON (its runs' records, and "
                         "its rows without records, marked [carried]; those this command measures are replaced). "
                         "Refused, before any training, when of other data, when a (variant, seed) comes twice, or "
                         "when one model's records differ in settings")
    ap.add_argument("--report-only", dest="report_only", action="store_true",
                    help="train nothing: the table is made from --records (and most_popular when --variants names it; "
                         "without it no data is read)")
    args = ap.parse_args(argv)
    if bool(args.dataset) == bool(args.raw):
        ap.error("give one of --dataset NAME or --raw DIR")
    if args.name and not args.raw:
        ap.error("--name goes with --raw (a --dataset has its own name)")
    if args.max_len < 0:
        ap.error(f"--max-len must be > 0, got {args.max_len}")
    if args.report_only and not args.records:
        ap.error("--report-only makes a table from --records: name at least one")
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
    prep_sets = tuple(args.prep_sets)
    # other item text is other prepared data and other models: folders of their own, so nothing mixes or is reused
    psuf = "-p" + hashlib.sha256("\n".join(prep_sets).encode()).hexdigest()[:8] if prep_sets else ""
    text_settings = item_text_settings(prep_yaml, prep_sets)
    out = Path(args.out or ROOT / "bench" / "out" / "quality" / args.dataset).resolve()
    src = Path(args.src or src_default)
    seeds = parse_seeds(args.seeds, "--seeds")
    # records named by the user: read, and refused when of another dataset, before anything else runs
    named, rows = [], {}
    for spec in args.records:
        recs, got = read_records(spec)
        for r in recs:
            check_same_data({"dataset": args.dataset}, r.fingerprint(), f"[quality] --records {r.path}")
        for model, row in got.items():
            check_same_data({"dataset": args.dataset}, {**row["data"]["data"], "dataset": row["data"]["dataset"]},
                            f"[quality] --records {spec}")
            rows.setdefault(model, row)
        named += recs
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    movielens = args.dataset in MOVIELENS and not args.raw

    def default(v: str) -> bool:  # variants run when --variants is not given: those with a config for this data
        if v == "lora" and not gpu or v == "hybrid_ratings" and not movielens or v == "top":
            return False
        return v not in TRAINED or (ROOT / "configs" / "train" / f"{prefix}_{TRAINED[v]}.yaml").is_file()

    variants = [v.strip() for v in args.variants.split(",") if v.strip()] or \
        ([] if args.report_only else [v for v in ALL_VARIANTS if default(v)])
    bad = sorted(set(variants) - set(ALL_VARIANTS))
    if bad:
        raise SystemExit(f"[quality] unknown variant(s) {bad}; known: {ALL_VARIANTS}")
    if args.report_only and set(variants) - {"most_popular"}:
        raise SystemExit(f"[quality] --report-only trains nothing: --variants may name most_popular only, not "
                         f"{','.join(v for v in variants if v != 'most_popular')}")
    overrides = ([f"model.max_len={args.max_len}"] if args.max_len else []) + list(args.overrides)
    if args.quick:
        # a few hundred examples' worth of steps: exercises every path, numbers are not meaningful
        overrides = ["max_steps=12", "eval_every=6", "eval_every_epochs=0", "save_every=0", "log_every=6", "early_stopping_patience=0"] + overrides
    precision = ("bf16" if gpu and torch.cuda.is_bf16_supported() else "no") if args.precision == "auto" else args.precision
    env = dict(os.environ, ACCELERATE_MIXED_PRECISION=precision, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])))
    tag = args.tag or ("quick" if args.quick else "")
    runs = out / ("runs" + (f"-{tag}" if tag else "") + psuf)

    def config_of(variant: str) -> tuple[Path, list[str]]:  # the train config and overrides of a trained variant
        return ROOT / "configs" / "train" / f"{prefix}_{TRAINED[variant]}.yaml", VARIANT_EXTRA.get(variant, []) + overrides

    def settings_of(variant: str) -> dict:  # a text model's settings include the item text it reads
        settings = resolved_settings(*config_of(variant))
        return settings if settings["model"]["item_tower"] == "id" else {**settings, "item_text": text_settings}

    trained = [v for v in variants if v in TRAINED]
    for variant in trained:
        if not config_of(variant)[0].is_file():
            raise SystemExit(f"[quality] {config_of(variant)[0]} missing: variant {variant} has no config for {args.dataset}")
    if "hybrid_ratings" in variants and not movielens:
        raise SystemExit("[quality] hybrid_ratings needs MovieLens (its stars become event types); not for raw-layout data")
    # this command's runs and their settings: the named records are checked against them before any training
    planned = {(v, seed): (runs / f"{v}_s{seed}", settings_of(v), precision) for v in trained for seed in seeds}
    named = check_records(named, planned)
    log(f"{args.dataset}: variants {variants}, seeds {seeds}, device {device}, precision {precision}, out {out}"
        + (f", {len(named)} records named" if args.records else ""))

    # ---- data (a report of records alone reads none: the records say which data they were measured on)
    from data_prep.schema import load_prepared

    if variants:
        if movielens:
            raw = out / "raw"
            convert(src, raw)
        else:
            raw = raw_layout(src)
        prep_path = prepare(prep_yaml, raw / "events", raw / "items", out / ("prepared" + psuf), prep_sets)
        prep = load_prepared(prep_path)
        cand = candidate_mask(prep)
        fp = data_fingerprint(args.dataset, prep, cand)
        n_train = torch.tensor(prep.items.data.table.column("n_train_events").to_numpy())
        slices = {"cold_items": n_train == 0}  # targets never seen in training (rare under leave-last-out)
    else:  # the records agree with each other: each key as the first record that has it says
        prep_path, fp = None, {"dataset": args.dataset}
        for where, other in [(f"[quality] --records {r.path}", r.fingerprint()) for r in named] + \
                [(f"[quality] --records {w['source']}", w["data"]["data"]) for w in rows.values()]:
            check_same_data(fp, {**other, "dataset": args.dataset}, where)
            fp |= {k: other[k] for k in ("n_candidates", "n_test_users", "n_items_catalogue", "sha256") if k in other and k not in fp}
    for r in named:  # other prepared data: refused before any training
        check_same_data(fp, r.fingerprint(), f"[quality] --records {r.path}")
    for model, row in rows.items():
        check_same_data(fp, {**row["data"]["data"], "dataset": row["data"]["dataset"]}, f"[quality] --records {row['source']}")

    res = {"dataset": args.dataset, "command": "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine(), "precision": precision, "precision_for": {},
           "seeds": [] if args.report_only else seeds,  # the seeds this command trained (each row lists its own)
           "overrides": overrides, "prep_set": list(prep_sets),
           # what the text models read of an item: this command's data_prep settings, or, for a report, its records'
           "item_text": text_settings if not args.report_only else report_item_text(named),
           "n_candidates": fp["n_candidates"], "n_items_catalogue": fp.get("n_items_catalogue"),
           "prepared": str(prep_path) if prep_path else None, "records": list(args.records),
           "runs": {}, "per_seed": {}, "configs": {}, "carried": {}, "notes": []}

    if "most_popular" in variants:
        m = evaluate_popular(prep, cand, slices, device)
        res["per_seed"]["most_popular"] = [m]
        res["configs"]["most_popular"] = "train/baselines.py"
        log(f"most_popular test HR@10 {m['test']['HR@10']:.4f} NDCG@10 {m['test']['NDCG@10']:.4f}")

    vdata = {}  # variant -> (prepared path, loaded) where it is not the main prepared data
    if "hybrid_ratings" in variants:
        convert(src, out / "raw-ratings", ("--rating-event-types",))
        rp = prepare(prep_yaml, out / "raw-ratings" / "events", out / "raw-ratings" / "items", out / ("prepared-ratings" + psuf),
                     (*prep_sets, "event_types=[" + ",".join(RATING_TYPES) + "]"))
        rprep = load_prepared(rp)
        if not same_split(prep, rprep):
            raise SystemExit(f"[quality] internal: {rp} does not hold the same items and sequences as {prep_path}")
        vdata["hybrid_ratings"] = (rp, rprep)

    own = []  # this command's records: one per run, written into its run folder
    commit = git_commit()
    for variant in trained:
        yaml_path, voverrides = config_of(variant)
        vpath, vprep = vdata.get(variant, (prep_path, prep))
        for seed in seeds:
            name = f"{variant}_s{seed}"
            run_dir, vsettings, _ = planned[(variant, seed)]
            final, wall = train_one(yaml_path, vpath, runs, name, seed, voverrides, env)
            rec = own_record(run_dir, final, fp, vsettings, precision)
            if rec is not None:
                log(f"{name}: its record describes this final/, not evaluated again ({rec.path})")
            else:
                m = evaluate_final(final, vprep, cand, slices, device, text_cache=text_cache_dir(out))
                wall_rec = json.loads((run_dir / "wall.json").read_text()) if (run_dir / "wall.json").is_file() else {}
                rec = write_record(run_dir, {
                    "kind": RECORD_KIND, "dataset": args.dataset, "data": {k: v for k, v in fp.items() if k != "dataset"},
                    "variant": variant, "seed": seed, "tag": tag, "run_name": name, "run_dir": str(run_dir), "final": str(final),
                    "config": str(yaml_path.relative_to(ROOT)), "config_sha256": sha256_file(yaml_path), "overrides": voverrides,
                    "precision": precision, "settings": vsettings, "export_sha256": sha256_file(final / "export.json"),
                    "metrics": {sp: {k: m[sp][k] for k in (*HEADLINE, "n") if k in m[sp]} for sp in ("test", "valid")},
                    "best_step": m["best_step"], "trained": m.get("trained"), "valid_curve": read_valid_curve(run_dir),
                    "wall_s": wall, "peak_rss_mib": wall_rec.get("peak_rss_mib"), "train_torch": wall_rec.get("torch"),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
                    "machine": res["machine"], "command": res["command"]}, m["test_ranks"])
            own.append(rec)
            tr = rec.data.get("trained") or {}
            log(f"{name}: test HR@10 {rec.data['metrics']['test']['HR@10']:.4f} NDCG@10 {rec.data['metrics']['test']['NDCG@10']:.4f} "
                f"(valid NDCG@10 {rec.data['metrics']['valid'].get('NDCG@10', float('nan')):.4f}, best step {rec.data['best_step']}, "
                f"train {fmt_wall(rec.data['wall_s'])})"
                + (f" [stopped by {tr['stopped_by']} after step {tr['steps']} of {tr['max_steps']}]" if tr.get("stopped_by") else ""))

    if "cold" in variants:
        cold_info = make_cold_raw(raw, out / "raw-cold")
        cprep_path = prepare(prep_yaml, out / "raw-cold" / "events", out / "raw-cold" / "items", out / ("prepared-cold" + psuf), prep_sets)
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
        cold = {"info": {k: v for k, v in cold_info.items() if k != "cold_items"}, "per_seed": {}, "summary": {},
                "overrides": cold_overrides, "seeds": seeds}
        mp = evaluate_popular(cprep, ccand, cslices, device)
        cold["per_seed"]["most_popular"] = [mp]
        for model_name in COLD_MODELS:
            yaml_path = ROOT / "configs" / "train" / f"{prefix}_{TRAINED[model_name]}.yaml"
            for seed in seeds:
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

    # ---- the table, from records: this command's and the named ones
    table(res, own + named, rows)
    res["n_test_users"] = fp["n_test_users"]
    if named or rows:
        log(f"from --records: {', '.join(f'{r.key[0]} seed {r.key[1]}' for r in named)}"
            + ("; rows " + ", ".join(res["carried"]) if res["carried"] else ""))
    res["wall_s"] = time.time() - t_all
    res["notes"].append("The item-vector/ranking numbers are computed from each run's final/ export (train.export.load_final) "
                        "with train.metrics; checkpoints are chosen by the training loop on validation NDCG@10 only.")
    if args.dataset == "ml-1m":
        res["notes"].append("ML-1M ratings.dat here is a reconstruction (137 of 1,000,209 timestamps imputed, none of them a "
                            "user's last rating: test targets unaffected); see /work/shared/data/ml-1m/SOURCE.md.")

    # ---- report
    for v in list(res["per_seed"].values()) + list((res.get("cold") or {}).get("per_seed", {}).values()):
        for m in v:  # per-user tensors are not JSON: the records keep them (record.npz)
            m.pop("test_ranks", None)
    out.mkdir(parents=True, exist_ok=True)
    # another item text (--prep-set) reports beside the work folder's own table, not over it
    results_json = out / f"results{psuf}.json"
    atomic_write_json(results_json, res)
    log(f"wrote {results_json}")
    docs = ROOT / "docs"
    to_docs = not args.quick and not args.no_docs and not args.raw and not prep_sets
    (docs / "results" if to_docs else out).mkdir(parents=True, exist_ok=True)
    res["plots"] = plots(res, runs, (docs / "results" if to_docs else out) / (args.dataset + psuf))
    # aggregated metrics and the runs' records (no MovieLens-derived rows): safe to commit
    slim = {k: v for k, v in res.items() if k not in ("per_seed",)}
    slim["cold"] = {k: v for k, v in (res.get("cold") or {}).items() if k != "per_seed"} or None
    if to_docs:
        atomic_write_json(docs / "results" / f"{args.dataset}.json", slim)
        log(f"wrote {write_results_md(docs)} and {', '.join(res['plots'])}")
    section = dataset_section(res)
    if not to_docs:
        atomic_write_text(out / f"RESULTS{psuf}.md", section)
        log(f"wrote {out / f'RESULTS{psuf}.md'} (docs/RESULTS.md untouched: --quick / --no-docs / --raw / --prep-set)")
    print(section)
    choice = validation_choice(res)
    if choice is not None:
        log(f"chosen on validation NDCG@10: {choice[0]} ({res['configs'].get(choice[0], '-')}, {choice[1]:.4f})")
    log(f"done in {fmt_secs(time.time() - t_all)}")
    return res


if __name__ == "__main__":
    main()
