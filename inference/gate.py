"""Promotion gate: does tonight's fine-tuned model replace the one the nightly table is served from?

    python -m inference.gate --config configs/inference/nightly.yaml model_dir=work/checkpoints/serving \\
        gate.candidate=work/checkpoints/nightly-2026-11-27/final

A nightly fine-tune can come out worse than last night's model (a bad night of logs, a diverged run, a wrong config),
and the table it feeds is what the business serves all day. The gate runs between training and inference:

1. ``model_dir`` of the nightly inference config is a symlink, the **serving link**; it points at the final/ that
   serves now (the incumbent). On the first night it does not exist yet.
2. The candidate, the incumbent and most-popular are ranked on the same users of tonight's prepared data: each
   user's held-out event of ``gate.split`` (validation by default) against tonight's whole catalogue, through the
   nightly table's own code path (inference/run.py encode_model_catalogue, history_windows, the user tower over the
   catalogue's vectors): tonight's items mapped into each model's item space, new items scored from text, the
   user's earlier items excluded (``exclude_seen``) and unavailable items never candidates (``exclude_unavailable``),
   as in the table. A user with no history item a model knows gets the table's fallback (most popular).
3. The candidate is promoted (the link moves to it with one rename, lmrec_common.publish.point_to) when its
   ``gate.metric`` beats most-popular's times ``gate.min_ratio_over_popular``, is at least the incumbent's times
   ``1 - gate.max_relative_drop``, and its users' top-10 lists cover at least ``gate.min_coverage_ratio`` times the
   share of the catalogue the incumbent's cover (a model collapsing onto a few items can keep its accuracy).
   Otherwise the link stays: tonight's table is written by the incumbent, from tonight's data, and every user still
   gets a row. With no incumbent and a candidate that fails, nothing is fit
   to serve: exit 3, no link, and the inference step after it does not run (yesterday's table stays current).
   Forgetting comes before quality: a model trained on data prepared before tonight's forget requests (its
   data_manifest's ``forget.users_sha256`` differs from tonight's) is never promoted, and as incumbent it is never
   kept: the candidate is then judged against most-popular alone, and refused (exit 3, the link left as it is)
   if it fails.
4. The decision, every model's metrics and beyond-accuracy figures and the paired candidate - incumbent difference
   (mean and 95% interval over the users) go to ``gate.json`` beside the candidate (``gate.report``), written
   atomically before the link moves.
5. A candidate that cannot be judged (no export: tonight's training failed, timed out or was cancelled; or one that
   fails its integrity check) is an error (exit 2) unless ``gate.unusable_candidate=keep_incumbent``, which the nightly
   chain sets: the incumbent then writes tonight's table (decision kept_incumbent, the reason in the report), so a
   failed fine-tune does not cost tonight's table. An incumbent that cannot serve (damaged, or the link names no
   export) is left out: the candidate is judged against most-popular alone, and refused (exit 3) if it fails too.

Exit codes: 0 = a model serves (promoted, incumbent kept, or the candidate already serving: a rerun); 2 = a bad
config or input (one line naming it); 3 = refused with nothing to serve. Both models were chosen on the validation
split (checkpoint selection); the gate compares them on the same users, so neither gets an advantage the other
lacks, except that an incumbent refitted through the held-out events (train_through) has trained on some of
tonight's targets: the report says so.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from inference.config import InferenceConfig
from lmrec_common.log import fmt_count, fmt_secs, print0
from lmrec_common.publish import atomic_write_json, clean_stale_temps, point_to
from train.export import ExportIntegrityError

REPORT_KIND = "lmrec.gate"
EXIT_REFUSED = 3


class GateError(RuntimeError):
    """A gate that cannot decide: bad settings or inputs (one line, exit 2)."""


class GateRefused(RuntimeError):
    """The candidate failed and no incumbent may serve (none yet, or trained before tonight's forget requests):
    nothing is fit to serve (exit 3)."""


def users_per_batch(cfg: InferenceConfig, n_items: int) -> int:
    """Users ranked at once: cfg.user_batch_size, fewer when their (users, items) float32 scores and the ranking's
    copies of them (~3x) would pass cfg.score_budget_mb (a 1M-item catalogue: 89 users per batch at 1 GiB)."""
    return max(1, min(cfg.user_batch_size, cfg.score_budget_mb * 2**20 // (12 * max(n_items, 1))))


def per_user(ranks: torch.Tensor, metric: str) -> np.ndarray:
    """(N,) 1-based ranks -> (N,) float64 per-user value of ``metric`` (train/metrics.py metrics_from_ranks's
    definitions: HR@K, NDCG@K, MRR), so the mean equals that function's figure."""
    r = ranks.double().numpy()
    if metric == "MRR":
        return 1.0 / r
    name, k = metric.split("@")
    hit = (r <= int(k)).astype(np.float64)
    return hit if name == "HR" else hit / np.log2(r + 1)


def paired_interval(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean of a - b over the same users, with a normal 95% interval (n in the thousands: the CLT holds)."""
    d = a - b
    n = d.size
    mean = float(d.mean()) if n else 0.0
    half = 1.96 * float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": int(n)}


class _Users:
    """The evaluated users: each one's events before the split's target (tonight's item space) and the target."""

    def __init__(self, prepared, split: str, max_users: int):
        from train.data import EvalExamples

        self.ex = EvalExamples.build(prepared.sequences, split, max_len=1, max_users=max_users)  # windows built here
        self.n = len(self.ex)
        self._batches: dict[tuple[int, int], tuple] = {}

    def batch(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
        """Users lo..hi-1: (their earlier items flat, offsets, event types flat, targets, seen (B, S) -1 padded); built
        once and kept, as most-popular and both models rank the same batches (gate.max_users bounds the memory)."""
        key = (lo, hi)
        if key not in self._batches:
            self._batches[key] = self._build(lo, hi)
        return self._batches[key]

    def _build(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
        from train.data import _ragged

        ex = self.ex
        ix = np.arange(lo, hi, dtype=np.int64)
        pos = ex.pos[ix].astype(np.int64)
        _, src = _ragged(ex.starts[ix], pos)
        vals = np.asarray(ex.values[src], np.int64)
        ets = np.asarray(ex.etype_values[src], np.int64)
        offs = np.concatenate([[0], np.cumsum(pos)])
        return vals, offs, ets, ex.targets(ix), ex.seen(ix)


TOP_K = 10  # the lists the beyond-accuracy figures describe (training's metrics.json uses the same)


def _rank_and_top(scores: torch.Tensor, excluded: torch.Tensor, targets: torch.Tensor,
                  seen: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks of the targets among the allowed items, and each user's top-10 (the head of tonight's list). Excluded
    items (unscorable, unavailable) are never candidates; a target among them cannot be recommended tonight and gets
    the worst rank (train/metrics.py target_ranks, top_items)."""
    from train.metrics import target_ranks, top_items

    s = scores.float().masked_fill(excluded[None], -math.inf)
    return target_ranks(s, targets.to(s.device), seen).cpu(), top_items(s, seen, TOP_K).cpu()


class _Lists:
    """Ranks and top-10 lists gathered over the batches; ``summary`` = the report's metrics and beyond-accuracy."""

    def __init__(self):
        self.ranks, self.tops = [], []

    def add(self, r: torch.Tensor, top: torch.Tensor) -> None:
        self.ranks.append(r)
        self.tops.append(top)

    def summary(self, pop: torch.Tensor, excluded: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
        from train.metrics import beyond_accuracy, exposure_from_lists, metrics_from_ranks

        r = torch.cat(self.ranks) if self.ranks else torch.zeros(0, dtype=torch.long)
        top = torch.cat(self.tops).numpy() if self.tops else np.zeros((0, TOP_K), np.int64)
        b = beyond_accuracy(exposure_from_lists(top, pop.numel()), pop.cpu().numpy(), ~excluded.cpu().numpy())
        beyond = {f"{k}@{TOP_K}": b[k] for k in ("coverage", "popularity_percentile", "gini", "tail_share")}
        return r, metrics_from_ranks(r), beyond


def popularity_ranks(users: _Users, pop: torch.Tensor, excluded: torch.Tensor, cfg: InferenceConfig) -> tuple[torch.Tensor, dict]:
    """Most popular (tonight's training events per item) for every evaluated user, as the table's fallback ranks.
    Returns (ranks, the report's entry)."""
    out = _Lists()
    bs = users_per_batch(cfg, pop.numel())
    for lo in range(0, users.n, bs):
        hi = min(lo + bs, users.n)
        _, _, _, targets, seen = users.batch(lo, hi)
        out.add(*_rank_and_top(pop[None].expand(hi - lo, -1), excluded, targets, seen if cfg.exclude_seen else None))
    r, m, beyond = out.summary(pop, excluded)
    return r, dict(metrics=m, beyond=beyond)


def model_ranks(model_dir: str, prepared, tonight: tuple[np.ndarray, np.ndarray], users: _Users, pop: torch.Tensor,
                cfg: InferenceConfig, device: torch.device, role: str) -> tuple[torch.Tensor, dict]:
    """Rank every evaluated user's target with the final/ at ``model_dir`` as tonight's table would score it.
    Returns (ranks (N,), what the report says of the model)."""
    from inference.run import encode_model_catalogue, history_windows, user_vectors_bucketed
    from train.export import load_final

    t0 = time.time()
    model, info = load_final(model_dir)
    model.to(device)
    cat = encode_model_catalogue(model, info, model_dir, prepared, *tonight, cfg, device, tag=f"[gate] {role}: ")
    T = min(cfg.max_history or int(model.cfg.max_len), int(model.cfg.max_len))  # as the table
    excluded = cat.unavailable
    pop_dev = pop.to(device)
    out, n_fallback = _Lists(), 0
    bs = users_per_batch(cfg, pop.numel())
    with torch.inference_mode():
        for lo in range(0, users.n, bs):
            hi = min(lo + bs, users.n)
            vals, offs, ets, targets, seen = users.batch(lo, hi)
            hist, et, w, _ = history_windows(vals, offs, ets, cat.to_model, T, space="tonight")
            has = torch.from_numpy(w > 0)
            scores = pop_dev[None].expand(hi - lo, -1).clone()  # users the model cannot score: the table's fallback
            if bool(has.any()):
                u = user_vectors_bucketed(model, hist[has], et[has], device, buckets=1 if device.type == "cuda" else 4,
                                          item_table=cat.vectors)
                scores[has.to(device)] = model.score(u, cat.vectors).float()
            n_fallback += int((~has).sum())
            out.add(*_rank_and_top(scores, excluded, targets, seen if cfg.exclude_seen else None))
    r, metrics, beyond = out.summary(pop, excluded)
    through = trained_through(model_dir)
    honours = forget_state(info.get("data_manifest") or {}) == forget_state(prepared.manifest)
    desc = dict(path=str(Path(model_dir).resolve()), model_version=info.get("model_version"), honours_forget_requests=honours,
                trained_on_data_version=info.get("data_version"), item_tower=model.cfg.item_tower, train_through=through,
                users_fallback=n_fallback, catalogue=cat.counts, metrics=metrics, beyond=beyond, seconds=round(time.time() - t0, 2))
    print0(f"[gate] {role}: {_fmt(desc['metrics'])} | coverage@{TOP_K} {beyond[f'coverage@{TOP_K}']:.3f} | "
           f"{n_fallback} users by fallback | {fmt_secs(time.time() - t0)}")
    del model
    return r, desc


def trained_through(model_dir: str | Path) -> str:
    """The final's ``train_through`` (train/config.py): "train", or a refit's "valid" / "test"."""
    from lmrec_common.config import read_yaml

    f = Path(model_dir) / "train_config.yaml"
    return str((read_yaml(f) or {}).get("train_through", "train")) if f.is_file() else "train"


def forget_state(manifest: dict) -> str:
    """The forget requests a prepared version honoured (``forget.users_sha256`` of its manifest; none = the empty set)."""
    from data_prep.forget import EMPTY_SHA256

    return (manifest.get("forget") or {}).get("users_sha256") or EMPTY_SHA256


def _fmt(m: dict) -> str:
    return " | ".join(f"{k} {m[k]:.4f}" for k in ("HR@10", "NDCG@10", "MRR") if k in m)


def _serving_link(cfg: InferenceConfig) -> tuple[Path, Path | None, str | None]:
    """(the serving link, the final/ it points at or None, why that target cannot serve or None)."""
    if cfg.variants:
        raise GateError("the gate promotes one model and this config names variants (an A/B test): gate each arm's "
                        "model with a config of its own, whose model_dir is that arm's serving link")
    if not cfg.model_dir:
        raise GateError("model_dir is empty: set it to the serving link the nightly table reads (e.g. "
                        "model_dir=work/checkpoints/serving); the gate points it at the model that should serve")
    link = Path(cfg.model_dir)
    if link.exists() and not link.is_symlink():
        raise GateError(f"model_dir {link} is a folder, not a link: the gate promotes by moving a symlink. Point the "
                        f"nightly table at a link instead (e.g. model_dir=work/checkpoints/serving); the first gate "
                        f"creates it")
    if link.is_symlink():
        inc = Path(os.path.realpath(link))
        if not (inc / "export.json").is_file():
            return link, inc, (f"the serving link {link} points at {inc}, which is not a final export (export.json "
                               f"missing): a promotion replaces the link; else repair it (ln -sfn <final/> {link})")
        return link, inc, None
    return link, None, None


def run_gate(cfg: InferenceConfig) -> dict:
    """Decide, move the link if the candidate wins, write the report. Returns the report."""
    from data_prep.schema import load_prepared
    from lmrec_common.config import to_dict
    from train.data import held_out_splits, training_item_counts

    g = cfg.gate
    t0 = time.time()
    if not g.candidate:
        raise GateError("gate.candidate is empty: name tonight's final/ (gate.candidate=checkpoints/<run>/final)")
    cand = Path(g.candidate)
    keep_if_unusable = g.unusable_candidate == "keep_incumbent"
    unusable = None  # why the candidate cannot be judged (keep_incumbent: the incumbent serves on)
    if not (cand / "export.json").is_file():
        unusable = f"gate.candidate {cand} is not a final export (export.json missing): did tonight's training finish?"
        if not keep_if_unusable:
            raise GateError(unusable)
    if not cfg.prepared_dir:
        raise GateError("prepared_dir is empty: set it to tonight's prepared data (a prepared root with LATEST)")
    through = trained_through(cand)
    if unusable is None and g.split not in held_out_splits(through):
        raise GateError(f"gate.candidate {cand} was trained through {through!r}: its {g.split} targets are training data, "
                        f"so they cannot judge it. Gate a run trained with train_through=train (or valid with "
                        f"gate.split=test), then refit if you wish")
    link, incumbent, inc_unusable = _serving_link(cfg)
    link.parent.mkdir(parents=True, exist_ok=True)
    report_path = Path(g.report) if g.report else cand.resolve().parent / "gate.json"
    from inference.run import ExclusiveLock

    # one gate per serving link at a time: .<link>.gate.lock beside it
    lock = ExclusiveLock(link.parent / f".{link.name}.gate.lock",
                         lambda p: GateError(f"another gate holds {p}: one gate per serving link at a time"))
    try:
        clean_stale_temps(link.parent, link.name)  # a new link a killed gate left beside the old one (we hold the lock)
        prepared = load_prepared(cfg.prepared_dir)
        report = dict(kind=REPORT_KIND, created_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                      serving_link=str(link), serving_before=str(incumbent) if incumbent else None,
                      prepared=dict(path=str(prepared.path), version=prepared.version), split=g.split, metric=g.metric,
                      rule=dict(max_relative_drop=g.max_relative_drop, min_ratio_over_popular=g.min_ratio_over_popular,
                                min_coverage_ratio=g.min_coverage_ratio,
                                exclude_seen=cfg.exclude_seen, exclude_unavailable=cfg.exclude_unavailable),
                      settings=to_dict(cfg))
        if incumbent is not None and inc_unusable is None and incumbent == cand.resolve():
            print0(f"[gate] {cand} already serves through {link}: nothing to decide (a rerun)")
            report.update(decision="already_serving", reasons=[], serving_after=str(incumbent))
            atomic_write_json(report_path, report)
            return report
        device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
        if device.type == "cpu" and cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        users = _Users(prepared, g.split, g.max_users)
        if users.n == 0:
            raise GateError(f"{prepared.path}: no user has a {g.split} target: the gate has nothing to compare on "
                            f"(data_prep's split keeps one per user with enough events)")
        n_items = len(prepared.items)
        print0(f"[gate] candidate {cand} | serving {link} -> {incumbent or '(none yet: first night)'} | data "
               f"{prepared.path} (version {prepared.version}) | {fmt_count(users.n)} users' {g.split} events | "
               f"{n_items} items | device {device}")
        pop = training_item_counts(prepared.sequences, n_items).float()
        avail = np.asarray(prepared.items.data.table.column("available").to_numpy(zero_copy_only=False), dtype=bool)
        tonight = (np.array(prepared.items.data.table.column("item_id").to_pylist(), dtype=object), avail)  # (ids, available)
        pop_excluded = torch.from_numpy(~avail) if cfg.exclude_unavailable else torch.zeros(n_items, dtype=torch.bool)
        r_pop, report["most_popular"] = popularity_ranks(users, pop, pop_excluded, cfg)
        print0(f"[gate] most popular: {_fmt(report['most_popular']['metrics'])}")
        v_p = per_user(r_pop, g.metric)
        reasons = []
        if unusable is None:
            try:
                r_c, report["candidate"] = model_ranks(str(cand), prepared, tonight, users, pop, cfg, device, "candidate")
            except ExportIntegrityError as e:  # damaged: as unusable as a missing export
                if not keep_if_unusable:
                    raise
                unusable = str(e)
        if unusable is not None:
            print0(f"[gate] WARNING: the candidate cannot be judged: {unusable}")
            report["candidate"] = dict(path=str(cand), unusable=unusable)
            reasons.append(f"it cannot be judged: {unusable}")
        else:
            v_c = per_user(r_c, g.metric)
            c, p = float(v_c.mean()), float(v_p.mean())
            if not report["candidate"]["honours_forget_requests"]:
                reasons.append("it was trained on data prepared before tonight's forget requests (forget.users_sha256 differs)")
            if not c > p * g.min_ratio_over_popular:
                reasons.append(f"{g.metric} {c:.4f} does not beat most popular's {p:.4f} x {g.min_ratio_over_popular:g}")
            report["paired_vs_popular"] = paired_interval(v_c, v_p)
        if incumbent is not None and inc_unusable is None:
            try:
                r_i, report["incumbent"] = model_ranks(str(incumbent), prepared, tonight, users, pop, cfg, device, "incumbent")
            except ExportIntegrityError as e:  # the serving model is damaged: it cannot write tonight's table either
                inc_unusable = str(e)
        if inc_unusable is not None:
            report["incumbent"] = dict(path=str(incumbent), unusable=inc_unusable)
            report["note_incumbent"] = (f"the serving model cannot serve ({inc_unusable}): the candidate is judged "
                                        f"against most-popular alone")
            print0(f"[gate] WARNING: {report['note_incumbent']}")
        elif incumbent is not None:
            v_i = per_user(r_i, g.metric)
            i = float(v_i.mean())
            if unusable is None:
                report["paired_vs_incumbent"] = paired_interval(v_c, v_i)
            if report["incumbent"]["train_through"] != "train":
                report["note"] = (f"the incumbent was trained through {report['incumbent']['train_through']!r}: users "
                                  f"without new events since then have their {g.split} target in its training data, "
                                  f"which favours it")
            if not report["incumbent"]["honours_forget_requests"]:
                # users asked to be forgotten since it was trained: it may not go on serving, whatever its quality
                report["note_forget"] = ("the incumbent was trained before tonight's forget requests: it cannot be kept, "
                                         "so the candidate is judged against most-popular alone")
                print0(f"[gate] {report['note_forget']}")
            elif unusable is None:
                if c < i * (1.0 - g.max_relative_drop):
                    reasons.append(f"{g.metric} {c:.4f} is below the incumbent's {i:.4f} x (1 - {g.max_relative_drop:g})")
                cov = f"coverage@{TOP_K}"
                cc, ci = report["candidate"]["beyond"][cov], report["incumbent"]["beyond"][cov]
                if cc is not None and ci is not None and cc < ci * g.min_coverage_ratio:
                    reasons.append(f"its top-{TOP_K} lists cover {cc:.3f} of the catalogue, below the incumbent's {ci:.3f} "
                                   f"x {g.min_coverage_ratio:g} (gate.min_coverage_ratio)")
        report["reasons"] = reasons
        report["seconds"] = round(time.time() - t0, 2)
        d = report.get("paired_vs_incumbent")
        vs = (f" | vs incumbent {d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d else "")
        if not reasons:
            from inference.run import _maybe_die

            # report first, then the link: a kill between leaves the old link and a report that a rerun rewrites
            report.update(decision="promoted", serving_after=str(cand.resolve()))
            atomic_write_json(report_path, report)
            _maybe_die("gate_before_link")
            point_to(link.parent, link.name, cand.resolve())
            print0(f"[gate] PROMOTED {cand}: {link} -> {cand.resolve()}{vs} | report {report_path}")
        elif incumbent is not None and inc_unusable is None and report["incumbent"]["honours_forget_requests"]:
            report.update(decision="kept_incumbent", serving_after=str(incumbent))
            atomic_write_json(report_path, report)
            print0(f"[gate] WARNING: candidate NOT promoted ({'; '.join(reasons)}); {link} still serves {incumbent}: "
                   f"tonight's table comes from it{vs} | report {report_path}")
        else:
            report.update(decision="refused", serving_after=str(incumbent) if incumbent else None)
            atomic_write_json(report_path, report)
            why = (f"no model serves yet ({link} absent)" if incumbent is None else
                   f"the serving model cannot serve either ({inc_unusable})" if inc_unusable is not None else
                   f"the serving model {incumbent} was trained before tonight's forget requests and may not serve on")
            raise GateRefused(f"candidate {cand} refused ({'; '.join(reasons)}) and {why}: nothing is fit to publish; "
                              f"report {report_path}")
        return report
    finally:
        lock.release()


def main() -> None:
    import sys

    from lmrec_common.config import cli_args, load_config
    from lmrec_common.log import print_config

    path, overrides = cli_args(sys.argv[1:], InferenceConfig, "python -m inference.gate")
    cfg = load_config(InferenceConfig, path, overrides)
    print_config("gate", path, overrides, cfg, "the gate's report (gate.json)")
    run_gate(cfg)


if __name__ == "__main__":
    from data_prep.schema import PreparedDataError
    from lmrec_common.config import ConfigError
    from lmrec_common.log import user_errors
    from lmrec_common.models import ModelPathError

    # bad config or input: one line, exit 2; refused with nothing to serve: one line, exit 3
    user_errors(main, (GateError, ExportIntegrityError, PreparedDataError, ConfigError, ModelPathError),
                exit_codes={GateRefused: EXIT_REFUSED})
