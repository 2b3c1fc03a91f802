"""RecBole's SASRec on a prepared dataset, scored under this project's protocol: the standard peer of the ids-only
recipe (issue #27: "ID-only at least level with a standard SASRec on the same data; RecBole's is a fair neighbour").

    # once, in an environment of its own (RecBole pins old colorlog/colorama and pulls ray; it is not a project
    # dependency): python -m venv .venv-recbole && .venv-recbole/bin/pip install torch==2.13.0 recbole==1.2.1 \
    #     "pandas<3" "datasets>=3.0" "pyarrow>=15" psutil
    python bench/quality.py --dataset amazon2014-toy --variants id --seeds 0 --tag r6 --no-docs   # the prepared data + ids run
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv-recbole/bin/python bench/recbole_sasrec.py \
        --prepared bench/out/quality/amazon2014-toy/prepared/v1 --seed 0 \
        --pair bench/out/quality/amazon2014-toy/runs-r6/id_s0
    # in a time budget: --max-wall-s S ends it at its best validation checkpoint; --resume (same --out) continues
    # it later from there; --pair-only pairs a finished run with --pair runs without training

What is the same as bench/quality.py's models: the users, their event order (data_prep's, ties included: RecBole
gets each user's position as its timestamp, so its time-ordered leave-last-out split is exactly data_prep's), the
validation and test targets, the input window (the last ``--max-len`` events), the checkpoint chosen on validation
NDCG@10, and the ranking: the trained model's scores over every item go through bench/quality.py's ``rank_users``
(full ranking, the user's own history excluded, the target always rankable, ties counted against it). RecBole's own
figures for the same checkpoint are reported beside (its evaluator drops a target that is also in the history and
counts only the users its split keeps; the run checks that its scores equal RecBole's own on a test batch).

What is RecBole's: the model (SASRec.yaml: 2 layers, 2 heads, d 64, dropout 0.5, CE over all items), the training
(every prefix of each training sequence, batch 2048, Adam 1e-3, early stopping after ``--stopping-step`` epochs
without a better validation NDCG@10), all at RecBole 1.2.1's defaults unless ``--set key=value`` changes one.

Writes <out>/result.json (both evaluations, paired differences against each --pair run, settings, versions, machine,
wall, date) and <out>/record.npz (per-user test ranks, in bench/quality.py's user order).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

RECBOLE_VERSION = "1.2.1"
INSTALL = (f"python -m venv .venv-recbole && .venv-recbole/bin/pip install torch==2.13.0 recbole=={RECBOLE_VERSION} "
           "\"pandas<3\" \"datasets>=3.0\" \"pyarrow>=15\" psutil, then run this file with .venv-recbole/bin/python and "
           "PYTHONPATH=. (see its docstring)")


def log(msg: str) -> None:
    print(f"[recbole_sasrec] {msg}", flush=True)


def import_recbole():
    """RecBole 1.2.1 predates numpy 2: it reads aliases numpy 2 removed (np.float_ ...); they are restored for it."""
    for name, alias in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        if not hasattr(np, name):
            setattr(np, name, alias)
    try:
        import recbole
    except ImportError:
        raise SystemExit(f"[recbole_sasrec] RecBole is not installed in this environment: {INSTALL}") from None
    if recbole.__version__ != RECBOLE_VERSION:
        log(f"RecBole {recbole.__version__} (this bench was written against {RECBOLE_VERSION})")
    return recbole


def write_atomic_inter(prep, path: Path) -> dict:
    """Each user's events through its test target as RecBole atomic rows (user, item, position as timestamp)."""
    from lmrec_common.publish import atomic_write_text
    from train.data import _ragged, list_column

    items, offs = list_column(prep.sequences, "item_idx")
    users = np.asarray(prep.sequences["user_idx"], dtype=np.int64)
    test_pos = np.asarray(prep.sequences["test_pos"], dtype=np.int64)
    lens = np.where(test_pos >= 0, test_pos + 1, np.diff(offs))  # a user without a test target keeps every event
    row, src = _ragged(offs[:-1], lens)
    rows = zip(users[row].tolist(), items[src].tolist(), (src - offs[:-1][row]).tolist())
    atomic_write_text(path, "user_id:token\titem_id:token\ttimestamp:float\n" + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows))
    return {"users": int(len(users)), "events": int(lens.sum()), "users_without_test": int((test_pos < 0).sum())}


def recbole_config(name: str, data_root: Path, work: Path, seed: int, max_len: int, epochs: int, stopping_step: int,
                   overrides: list[str], n_items: int = 10**9) -> dict:
    import yaml

    cfg = {
        "data_path": str(data_root), "checkpoint_dir": str(work / "saved"),
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",  # the data is filtered already
        "MAX_ITEM_LIST_LENGTH": max_len, "train_neg_sample_args": None, "loss_type": "CE",
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["Hit", "NDCG", "MRR"], "topk": [k for k in (10, 50) if k < n_items] or [1], "valid_metric": "NDCG@10",
        "epochs": epochs, "stopping_step": stopping_step, "eval_step": 1,
        "seed": seed, "reproducibility": True, "gpu_id": "" if not torch.cuda.is_available() else "0",
        "show_progress": False, "log_wandb": False, "worker": 0, "save_dataset": False, "save_dataloaders": False,
    }
    for ov in overrides:
        if "=" not in ov:
            raise SystemExit(f"[recbole_sasrec] --set {ov!r}: expected key=value (a RecBole config key)")
        k, v = ov.split("=", 1)
        cfg[k.strip()] = yaml.safe_load(v)
    return cfg


def left_aligned(hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, W) windows left-padded with -1 -> (B, W) the same items from column 0, -1 after, and their lengths."""
    W = hist.size(1)
    n = (hist >= 0).sum(1)
    j = torch.arange(W, device=hist.device)[None, :]
    src = ((W - n)[:, None] + j).clamp(max=W - 1)
    return torch.where(j < n[:, None], hist.gather(1, src), torch.full_like(hist, -1)), n


def scorer(model, to_rb: torch.Tensor, rb_items: torch.Tensor, n_items: int):
    """A bench/quality.py score function (batch of our windows -> (B, n_items) scores) for a RecBole SASRec."""
    table = model.item_embedding.weight  # (n_rb, d); row 0 is RecBole's padding

    @torch.no_grad()
    def score(b):
        seq, n = left_aligned(b["hist"])
        rb = torch.where(seq >= 0, to_rb.to(seq.device)[seq.clamp(min=0)], torch.zeros_like(seq))
        out = model.forward(rb, n.clamp(min=1)) @ table.T  # (B, n_rb)
        scores = torch.full((seq.size(0), n_items), -math.inf, device=out.device)
        scores[:, rb_items[1:].to(out.device)] = out[:, 1:]
        return scores

    return score


def check_same_scores(model, score, prep, test_data, user_tokens, rb_items: torch.Tensor, max_len: int) -> int:
    """Our windows through ``score`` must give RecBole's own full-sort scores on its first test batch: the same
    inputs, positions and items, or every figure of ours would be of another model. Returns the users checked."""
    from train.data import EvalExamples

    inter = next(iter(test_data))[0]
    with torch.no_grad():
        theirs = model.full_sort_predict(inter).view(len(inter), -1)[:, 1:]  # (B, n_rb - 1), RecBole's item order
    ex = EvalExamples.build(prep.sequences, "test", max_len)
    row_of = {int(u): k for k, u in enumerate(ex.user_idx)}
    users = [int(user_tokens[int(u)]) for u in inter["user_id"]]
    missing = [u for u in users if u not in row_of]
    if missing:
        raise RuntimeError(f"RecBole tests users {missing[:5]} that have no test target here")
    b = ex.collate([row_of[u] for u in users])
    ours = score(b)[:, rb_items[1:]]
    err = float((ours - theirs).abs().max())
    if err > 1e-4 * max(1.0, float(theirs.abs().max())):
        raise RuntimeError(f"scores through this bench's windows differ from RecBole's own by {err:.3g}")
    return len(users)


def our_protocol(score, prep, cand: torch.Tensor, max_len: int, device: str) -> dict:
    """Validation and test metrics (and per-user test ranks) through bench/quality.py's ranking."""
    import quality

    res = {}
    for split in ("valid", "test"):
        r = quality.rank_users(score, prep, split, max_len, cand, device)
        res[split] = quality.summarize(r, int(cand.sum()), {})
        if split == "test":
            res["test_ranks"] = r["ranks"]
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python bench/recbole_sasrec.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepared", required=True, help="a prepared dataset (data_prep's output, e.g. "
                                                       "bench/out/quality/amazon2014-toy/prepared/v1)")
    ap.add_argument("--name", help="the dataset's name in the work folder (default: the folder above prepared/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-len", dest="max_len", type=int, default=50, help="the input window (MAX_ITEM_LIST_LENGTH)")
    ap.add_argument("--epochs", type=int, default=300, help="RecBole's epochs (its default; early stopping ends sooner)")
    ap.add_argument("--stopping-step", dest="stopping_step", type=int, default=10,
                    help="epochs without a better validation NDCG@10 before stopping (RecBole's default)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="a RecBole config key=value, e.g. --set hidden_dropout_prob=0.3 (repeatable)")
    ap.add_argument("--pair", action="append", default=[], metavar="RUN",
                    help="a bench/quality.py run folder (or its record.json) of the same prepared data: paired "
                         "per-user test differences, this model minus that one (repeatable)")
    ap.add_argument("--max-wall-s", dest="max_wall_s", type=float, default=None,
                    help="training budget in seconds: no epoch starts that would end past it (judged from the mean "
                         "epoch so far, validation included); the best validation checkpoint is then reported and "
                         "result.json says stopped_by max_wall_s")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its best validation checkpoint (model, optimizer, epoch, "
                         "early-stopping count), e.g. after --max-wall-s ended it while validation was still rising; "
                         "the data order is not the uninterrupted run's (RecBole's checkpoint holds no RNG state)")
    ap.add_argument("--pair-only", dest="pair_only", action="store_true",
                    help="train nothing: pair the finished run in --out (its result.json and record.npz) with the "
                         "--pair runs and rewrite its result.json (RecBole need not be installed)")
    ap.add_argument("--out", help="work folder (default: bench/out/recbole/<name>/sasrec_s<seed>)")
    args = ap.parse_args(argv)
    if args.max_wall_s is not None and args.max_wall_s <= 0:
        raise SystemExit(f"[recbole_sasrec] --max-wall-s {args.max_wall_s:g}: expected a positive number of seconds")

    from data_prep.schema import PreparedDataError
    from lmrec_common.publish import atomic_write_json
    from train.data import open_prepared
    import quality

    prep_path = Path(args.prepared).resolve()
    try:
        prep = open_prepared(str(prep_path))
    except (PreparedDataError, OSError) as e:
        raise SystemExit(f"[recbole_sasrec] --prepared {args.prepared}: not a prepared dataset ({e})") from None
    name = args.name or prep_path.parent.parent.name
    work = Path(args.out) if args.out else ROOT / "bench" / "out" / "recbole" / name / f"sasrec_s{args.seed}"
    work = work.resolve()
    cand = quality.candidate_mask(prep)
    fp = quality.data_fingerprint(name, prep, cand)
    pairs = []
    for spec in args.pair:  # checked before training: a wrong run fails in seconds, not after hours
        rec_path = Path(spec) / "record.json" if Path(spec).is_dir() else Path(spec)
        if not rec_path.is_file():
            raise SystemExit(f"[recbole_sasrec] --pair {spec}: no record.json (a bench/quality.py run folder that was evaluated)")
        rec = quality.load_record(rec_path)
        quality.check_same_data(fp, rec.fingerprint(), f"[recbole_sasrec] --pair {spec}")
        if rec.ranks is None:
            raise SystemExit(f"[recbole_sasrec] --pair {spec}: its record.npz (per-user ranks) is missing")
        pairs.append(rec)
    if args.pair_only:
        return pair_finished(work, fp, pairs)

    import_recbole()
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_logger, init_seed

    t0 = time.time()
    rb_name = f"lmrec_{name}"
    data_root = work / "data"
    counts = write_atomic_inter(prep, data_root / rb_name / f"{rb_name}.inter")
    log(f"{counts['users']:,} users, {counts['events']:,} events written for RecBole ({data_root})")
    cfg = recbole_config(rb_name, data_root, work, args.seed, args.max_len, args.epochs, args.stopping_step, args.overrides,
                         n_items=len(prep.items))
    cwd = os.getcwd()
    os.chdir(work)  # RecBole writes its log/ and log_tensorboard/ under the working directory
    try:
        config = Config(model="SASRec", dataset=rb_name, config_dict=cfg)
        init_seed(config["seed"], config["reproducibility"])
        init_logger(config)
        dataset = create_dataset(config)
        train_data, valid_data, test_data = data_preparation(config, dataset)
        init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
        model = SASRec(config, train_data._dataset).to(config["device"])
        trainer = Trainer(config, model)
        resumed_from = resume(trainer, work / "saved") if args.resume else None
        earlier_curve = []  # a resumed run's validation curve goes on from its earlier launches'
        if resumed_from is not None and (work / "result.json").is_file():
            earlier_curve = [c for c in json.loads((work / "result.json").read_text()).get("valid_curve", [])
                             if c[0] <= resumed_from]
        # RecBole's own early-stopping count (recbole.utils.early_stopping: stop once it exceeds stopping_step)
        budget = WallBudget(args.max_wall_s, args.epochs, early_stopped=lambda: trainer.cur_step > trainer.stopping_step)
        try:
            best_valid, _ = trainer.fit(train_data, valid_data, saved=True, show_progress=False, callback_fn=budget)
        except WallBudget.Spent:
            best_valid = trainer.best_valid_score
        if not os.path.isfile(trainer.saved_model_file):
            raise SystemExit(f"[recbole_sasrec] no validated checkpoint in {trainer.saved_model_file}: "
                             f"--max-wall-s {args.max_wall_s:g} ended the run before its first validation")
        # RecBole's own best-model reload uses torch.load's old default (weights_only=False), refused by torch >= 2.6
        ckpt = torch.load(trainer.saved_model_file, map_location=config["device"], weights_only=False)
        model.load_state_dict(ckpt["state_dict"])
        best_epoch = int(ckpt.get("epoch", -1))
        model.eval()
        rb_valid = {k: float(v) for k, v in trainer.evaluate(valid_data, load_best_model=False).items()}
        rb_test = {k: float(v) for k, v in trainer.evaluate(test_data, load_best_model=False).items()}
        train_s = time.time() - t0
        tokens = dataset.field2id_token["item_id"]  # RecBole id -> our item_idx as text ('[PAD]' at 0)
        rb_items = torch.tensor([0] + [int(t) for t in tokens[1:]], dtype=torch.long)
        to_rb = torch.zeros(len(prep.items), dtype=torch.long)
        to_rb[rb_items[1:]] = torch.arange(1, len(rb_items))
        score = scorer(model, to_rb, rb_items, len(prep.items))
        checked = check_same_scores(model, score, prep, test_data, dataset.field2id_token["user_id"], rb_items, args.max_len)
        log(f"scores through this bench's windows = RecBole's own on its first test batch ({checked} users)")
        ours = our_protocol(score, prep, cand, args.max_len, str(config["device"]))
    finally:
        os.chdir(cwd)
    ranks = ours.pop("test_ranks")
    n_params = sum(p.numel() for p in model.parameters())
    paired_out = pair_rows(pairs, ranks)
    import recbole
    res = {
        "kind": "lmrec.recbole_sasrec", "dataset": name, "prepared": str(prep_path), "seed": args.seed,
        "command": "python bench/recbole_sasrec.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "recbole": recbole.__version__, "machine": quality.machine(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "config": {k: (v if isinstance(v, (int, float, str, bool, list, dict, type(None))) else str(v))
                   for k, v in cfg.items()} | {k: config[k] for k in ("n_layers", "n_heads", "hidden_size", "inner_size",
                                                                   "hidden_dropout_prob", "attn_dropout_prob", "learning_rate",
                                                                   "train_batch_size")},
        "params": n_params, "best_epoch": best_epoch, "best_valid_ndcg10_recbole": float(best_valid),
        "epochs_run": budget.epochs_run, "stopped_by": budget.stopped_by, "max_wall_s": args.max_wall_s,
        "resumed_from_epoch": resumed_from, "valid_curve": earlier_curve + [list(x) for x in budget.curve],
        "train_and_eval_s": round(train_s, 1), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "recbole_metrics": {"valid": rb_valid, "test": rb_test},
        "metrics": ours, "paired": paired_out,
    }
    res["fingerprint"] = fp
    np.savez_compressed(work / "record.npz", test_ranks=ranks.numpy().astype(np.int64))
    atomic_write_json(work / "result.json", res)
    t, v = ours["test"], ours["valid"]
    log(f"{name} seed {args.seed}: best epoch {best_epoch} of {budget.epochs_run} ({budget.stopped_by}), valid NDCG@10 "
        f"{v['NDCG@10']:.4f}, test HR@10 {t['HR@10']:.4f} "
        f"NDCG@10 {t['NDCG@10']:.4f} (RecBole's evaluator: {rb_test.get('hit@10', float('nan')):.4f} / "
        f"{rb_test.get('ndcg@10', float('nan')):.4f}), {train_s / 60:.1f} min")
    log_pairs(paired_out)
    log(f"wrote {work / 'result.json'}")
    return res


def resume(trainer, saved: Path) -> int:
    """--resume: load the newest checkpoint under ``saved`` into ``trainer`` as RecBole's resume_checkpoint does
    (which torch >= 2.6 refuses: it loads with weights_only=True); training continues after its epoch and keeps
    writing the best model to the same file. Returns the checkpoint's epoch."""
    ckpts = sorted(saved.glob("SASRec-*.pth"), key=lambda f: f.stat().st_mtime)
    if not ckpts:
        raise SystemExit(f"[recbole_sasrec] --resume: no checkpoint under {saved} (a run of this bench with the same --out)")
    ck = torch.load(ckpts[-1], map_location=trainer.device, weights_only=False)
    trainer.saved_model_file = str(ckpts[-1])
    trainer.start_epoch = int(ck["epoch"]) + 1
    trainer.cur_step = int(ck["cur_step"])
    trainer.best_valid_score = float(ck["best_valid_score"])
    trainer.model.load_state_dict(ck["state_dict"])
    trainer.model.load_other_parameter(ck.get("other_parameter"))
    trainer.optimizer.load_state_dict(ck["optimizer"])
    log(f"--resume: {ckpts[-1].name}, epoch {ck['epoch']} (valid NDCG@10 {ck['best_valid_score']:.4f}): "
        f"training continues from epoch {trainer.start_epoch}")
    return int(ck["epoch"])


class WallBudget:
    """RecBole's ``fit`` callback (called after each validation): counts epochs and raises ``Spent`` once another
    epoch, at the mean length of those so far (validation included), would end past ``max_wall_s``. RecBole has
    saved the best validation checkpoint by then, so the run is reported from it as after early stopping.
    ``early_stopped`` reads RecBole's own early-stopping state: an epoch after which RecBole stops is not cut."""

    class Spent(Exception):
        pass

    def __init__(self, max_wall_s: float | None, epochs: int, early_stopped=lambda: False, clock=time.time):
        self.max_wall_s, self.epochs, self.early_stopped, self.clock = max_wall_s, epochs, early_stopped, clock
        self.t0 = clock()
        self.epochs_run = 0  # epochs of the run (a resumed run's included)
        self.calls = 0  # epochs of this launch: the budget's mean epoch
        self.curve: list[tuple[int, float]] = []  # (epoch, RecBole's validation NDCG@10) of this launch
        self.stopped_by = "epochs"

    def __call__(self, epoch_idx: int, valid_score: float) -> None:
        self.epochs_run = epoch_idx + 1
        self.calls += 1
        self.curve.append((epoch_idx, float(valid_score)))
        if self.early_stopped():  # RecBole stops after this call: say so
            self.stopped_by = "early_stopping"
            return
        spent = self.clock() - self.t0
        if self.max_wall_s is not None and self.epochs_run < self.epochs and \
                spent + spent / self.calls > self.max_wall_s:
            self.stopped_by = "max_wall_s"
            log(f"--max-wall-s {self.max_wall_s:g}: {spent:.0f} s spent over {self.calls} epochs, another would "
                f"end past the budget: stopping at the best validation checkpoint")
            raise self.Spent()


def pair_rows(pairs: list, ranks: torch.Tensor) -> list[dict]:
    """Paired per-user test differences, RecBole's SASRec minus each bench/quality.py record of ``pairs``."""
    import paired

    rows = []
    for rec in pairs:
        c = paired.compare(torch.from_numpy(rec.ranks), ranks)
        rows.append({"a": f"{rec.key[0]}_s{rec.key[1]}", "a_record": rec.path, "b": "recbole_sasrec",
                     **{k: c[k] for k in ("HR@10", "NDCG@10", "HR@50", "NDCG@50", "MRR")}})
    return rows


def log_pairs(paired_out: list[dict]) -> None:
    for p in paired_out:
        d = p["NDCG@10"]
        log(f"  recbole_sasrec - {p['a']}: NDCG@10 {d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}], "
            f"HR@10 {p['HR@10']['diff']:+.4f} [{p['HR@10']['ci95'][0]:+.4f}, {p['HR@10']['ci95'][1]:+.4f}]")


def pair_finished(work: Path, fp: dict, pairs: list) -> dict:
    """--pair-only: the paired differences of a finished run (``work``) against ``pairs``, written into its result."""
    import quality
    from lmrec_common.publish import atomic_write_json

    res_path, rec_path = work / "result.json", work / "record.npz"
    if not res_path.is_file() or not rec_path.is_file():
        raise SystemExit(f"[recbole_sasrec] --pair-only: {work} holds no finished run (result.json and record.npz)")
    if not pairs:
        raise SystemExit("[recbole_sasrec] --pair-only: name the runs to pair with --pair RUN")
    res = json.loads(res_path.read_text())
    if "fingerprint" in res:  # the run and this --prepared must be the same data
        quality.check_same_data(fp, res["fingerprint"], f"[recbole_sasrec] --pair-only {work}")
    ranks = torch.from_numpy(np.load(rec_path)["test_ranks"])
    if len(ranks) != fp["n_test_users"]:
        raise SystemExit(f"[recbole_sasrec] --pair-only: {rec_path} ranks {len(ranks)} test users, the prepared data "
                         f"has {fp['n_test_users']}")
    kept = [p for p in res.get("paired", []) if p["a_record"] not in {r.path for r in pairs}]
    res["paired"] = kept = kept + pair_rows(pairs, ranks)
    atomic_write_json(res_path, res)
    log_pairs(kept)
    log(f"wrote {res_path}")
    return res



if __name__ == "__main__":
    main()
