"""The training job, in named steps around one state object (``TrainJob``), read top to bottom in ``_run``:
check_inputs -> build_data -> build_model -> prepare_and_resume -> print_header -> train (micro_step /
end_of_step: schedule, one all-reduce, log, validate, save) -> finish (final evaluation, export). All
distributed and precision mechanics go through the Accelerator, here only.

    accelerate launch [--config_file launch/accelerate/<x>.yaml] -m train --config configs/train/<job>.yaml [key=value ...]

Run folder ``<output_dir>/<run_name>/``: run.json (identity), step_<N>/ (accelerator.save_state +
scheduler.json + trainer_state.json + COMPLETE, written last with the sha256 of every file:
train/checkpoint.py), best/ (weights of the best validation NDCG@10; in a refit,
train_through valid/test, the last step's), losses.jsonl (one line per optimizer step: mean loss over
micro-batches and ranks), evals.jsonl,
tb/ (TensorBoard), warm_start.json (with ``init_from``: items carried over / new), final/ (the export
of docs/CONTRACTS.md section 3).

Warm start: ``init_from=<previous run>/final`` initialises a FRESH run from last night's model (item
id rows mapped by item_id onto tonight's catalogue, everything else copied when shapes match; see
train/export.py::warm_start). When the run folder already holds a step_<N> checkpoint, the resume wins.

Pre-emption: SIGTERM/SIGUSR1 (or ``stop_after_steps``) -> at the end of the current optimizer step all
ranks agree (one all-reduce), save step_<N>/, rank 0 writes ``<run>/PREEMPTED.json`` (step, reason,
checkpoint) and, under SLURM with ``requeue_on_signal``, runs ``scontrol requeue $SLURM_JOB_ID``; then
every process exits with 124. ``python -m train`` returns 124 itself; under ``accelerate launch``
(torchrun) any non-zero worker exit becomes launcher exit 1, so scripts test for PREEMPTED.json
(removed when the run resumes). Relaunching the same command resumes from the newest step_<N> that verifies
(newer damaged ones are named in a warning; another world size is refused).
Rerun of a finished run: the last launch that exported final/ writes ``<run>/FINISHED.json`` (its whole resolved config,
data version, model_version; not after a cut by ``max_train_wall_s``, which a relaunch continues). The same command again (every setting the same, same data version, final/ still that
export) trains nothing: one line says so and exits 0. Any change (more epochs, another evaluation setting) resumes as
above and exports again.
Exit 0: done (final/ exported, or already there). Any error: exit 1 with the reason.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from lmrec_common.config import ConfigError, save_config, to_dict
from lmrec_common.log import fmt_count, fmt_secs, print0
from lmrec_common.mapped import dataset_files, release_mapped_pages
from lmrec_common.models import resolve_model_path
from lmrec_common.publish import atomic_write_json, atomic_write_text
from train.baselines import MostPopular
from train.catalogue import Catalogue
from train.checkpoint import (first_unloadable, load_scheduler, newest_verified, read_jsonl_tolerant, save_scheduler,
                              saved_torch_rng, short_error, weights_only_deepspeed_engine, write_complete)
from train.config import TrainConfig, plain_config
from train.data import (EpochSampler, EvalExamples, TrainExamples, check_sequences, open_prepared,
                        held_out_splits, training_item_counts)
from train.export import WarmStartError, export_final, warm_start
from train.metrics import (
    KS,
    beyond_accuracy,
    exposure_from_lists,
    format_beyond,
    format_metrics,
    metrics_from_ranks,
    target_ranks,
    top_items,
)
from train.model import RecModelConfig, SeqRecModel

EXIT_OK = 0
EXIT_REQUEUE = 124
PREEMPTED = "PREEMPTED.json"  # in the run folder while a stopped run waits to be resumed
FINISHED = "FINISHED.json"  # in the run folder when its last launch exported final/: the settings and data it finished with
RUN_KIND = "lmrec.train_run"
WARM_START = "warm_start.json"  # in the run folder: what init_from carried over (read back by a resumed run's export)


class TrainingError(RuntimeError):
    """A run that cannot start or must stop (bad input, foreign checkpoint folder, non-finite loss)."""


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (per process)
    best_metric: float = -1.0  # validation NDCG@10 of best/
    best_step: int = -1
    bad_evals: int = 0  # evaluations since the last improvement
    lr_scale: float = 1.0  # schedule plateau: the multiplier validation plateaus have brought the lr down to
    plateau_evals: int = 0  # schedule plateau: evaluations since the last improvement or decay
    examples_seen: int = 0
    last_eval_step: int = -1
    # wall seconds of every launch this run's checkpoints descend from, each counted from the launch's start to
    # its last save (a resumed run's figure is the whole training's, not the last launch's); None when a
    # launch was not timed (resumed from a checkpoint written before this field existed)
    wall_s: float | None = 0.0
    stopped_by: str = ""  # why training ended before max_steps: "early_stopping", "max_train_wall_s" ("" = it did not)
    # schedule wsd under a wall budget: the step its decay began and the decay's length in steps, set once when the
    # budget turned out to end before max_steps (-1: the decay is the default one, the last decay_fraction of max_steps)
    decay_start: int = -1
    decay_steps: int = 0

    def start_clock(self, t0: float) -> None:
        """This launch started at t0 (time.time()); wall_s so far came from earlier launches."""
        self._clock = (t0, self.wall_s)

    def tick(self) -> None:
        """Bring wall_s up to now (before the state is saved or reported)."""
        t0, before = getattr(self, "_clock", (time.time(), self.wall_s))
        self.wall_s = None if before is None else before + time.time() - t0

    def spent_s(self) -> float:
        """Training seconds so far (all launches); this launch's alone when earlier ones were not timed."""
        self.tick()
        return self.wall_s if self.wall_s is not None else time.time() - self._clock[0]

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ------------------------------------------------------------------------------------------------ signals
class StopFlag:
    """SIGTERM/SIGUSR1 set a flag; the loop checks it at the end of each optimizer step (all ranks agree)."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGUSR1):
            self._old[s] = signal.signal(s, self._handler)

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def _handler(self, signum, frame) -> None:
        self.signum = signum


# ------------------------------------------------------------------------------------------------ setup

def emulated_cpu_precision(mixed_precision: str, device: torch.device) -> str | None:
    """Why this CPU runs the requested autocast dtype slowly, or None. Without AVX512-BF16 / AMX, bf16 matmuls
    are emulated: a 4-layer ML-1M training step took 17.8 s against 1.85 s in float32 on a 2-vCPU AMD EPYC
    (AVX2 only; `bench/step_time.py --precisions no,bf16`, 2026-11-29), where an AMX Xeon ran it 1.3x faster."""
    if device.type != "cpu" or mixed_precision not in ("bf16", "fp16"):
        return None
    cpu = torch.cpu
    native = (cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported()) if mixed_precision == "bf16" \
        else cpu._is_amx_fp16_supported()
    if native:
        return None
    return (f"mixed precision {mixed_precision} on a CPU without native {mixed_precision} matmuls (no "
            f"{'AVX512-BF16 / AMX' if mixed_precision == 'bf16' else 'AMX-FP16'}; torch sees {torch.backends.cpu.get_cpu_capability()}): "
            f"emulated, ~10x slower than float32 here; use --mixed_precision no")

def make_accelerator(cfg: TrainConfig, run_dir: Path):
    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
    from accelerate.utils import ProjectConfiguration

    # the (I, L) token / (I, H) feature buffers never change during training: do not broadcast them every step
    handlers = [DistributedDataParallelKwargs(broadcast_buffers=False)]
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and not torch.cuda.is_available():
        # without CUDA accelerate picks no backend and DeepSpeed then sees world size 1
        # (notes/distributed-cpu-recipes.md section 3)
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    log_with = "tensorboard" if cfg.tracker == "tensorboard" else None
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb")),
        kwargs_handlers=handlers,
        rng_types=[],
        # no CUDA: CPU processes over gloo (a MULTI_GPU launch config then gives N CPU workers)
        cpu=not deepspeed and not torch.cuda.is_available(),  # data order comes from EpochSampler(seed, epoch), not from synchronised RNGs
    )
    enable_cpu_fp16(accelerator)
    return accelerator


def enable_cpu_fp16(accelerator) -> None:
    """fp16 on a CPU: Accelerate (1.16) turns on neither autocast nor loss scaling there (only off the CPU), so a
    `--mixed_precision fp16` run computed in float32 while its header said fp16. Turn on what it turns on for a GPU
    before prepare(): fp16 autocast around the forward and in accelerator.autocast(), and a GradScaler (backward,
    unscale before clipping, skipped steps on overflow, scaler.pt in checkpoints). DeepSpeed keeps its own fp16."""
    from accelerate.utils import DistributedType

    if (accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu" and not accelerator.native_amp
            and accelerator.distributed_type != DistributedType.DEEPSPEED):
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")


def zero_stage(accelerator) -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


@contextlib.contextmanager
def no_zero3_init(accelerator):
    """Build modules whole, not partitioned by transformers' zero.Init. Under ZeRO-3 accelerate registers
    its DeepSpeed config with transformers even with zero3_init_flag false, and from_pretrained /
    from_config then return empty (partitioned) weights. The frozen features are computed before
    prepare(), which partitions the parameters afterwards; finish() needs a whole plain copy. Fine for
    MiniLM-class towers; a 7B item tower would want zero3_init instead."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or int(plugin.zero_stage) != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def check_batch_arithmetic(cfg: TrainConfig, world: int) -> int:
    glob = cfg.batch_size * cfg.grad_accum * world
    if cfg.global_batch_size and cfg.global_batch_size != glob:
        per = cfg.global_batch_size / (cfg.grad_accum * world)
        hint = (f"batch_size={int(per)}" if per.is_integer() else
                f"global_batch_size {cfg.global_batch_size} is not divisible by grad_accum {cfg.grad_accum} x world size {world}")
        raise ConfigError(f"global_batch_size {cfg.global_batch_size} != batch_size {cfg.batch_size} x grad_accum "
                          f"{cfg.grad_accum} x world size {world} = {glob} ({hint})")
    return glob


def check_run_dir(run_dir: Path, cfg: TrainConfig, data_version: str, accelerator) -> dict:
    """run.json identifies the run; a launch with another identity refuses the folder before any compute."""
    ident = {"kind": RUN_KIND, "run_name": cfg.run_name, "config_hash": cfg.identity_hash(),
             "data_version": data_version, "identity": cfg.identity()}
    f = run_dir / "run.json"
    if f.is_file():
        old = json.loads(f.read_text())
        diffs = [k for k in ("kind", "run_name", "config_hash", "data_version") if old.get(k) != ident[k]]
        if diffs == ["config_hash"] and same_identity_across_versions(old.get("identity", {}), ident["identity"]):
            print0(f"[train] {run_dir}: run.json was written by a version of lmrec with other config keys; the settings "
                   "are the same (keys added since at their defaults, removed ones at the value that meant 'off'): resuming")
            diffs = []
        if diffs:
            oi, ni = _flatten(old.get("identity", {})), _flatten(ident["identity"])
            detail = [f"{k}: {oi.get(k)!r} -> {ni.get(k)!r}" for k in sorted(set(oi) | set(ni)) if oi.get(k) != ni.get(k)]
            if old.get("data_version") != data_version:
                detail.append(f"data_version: {old.get('data_version')} -> {data_version}")
            raise TrainingError(
                f"checkpoint folder {run_dir} belongs to another run (differs in {', '.join(diffs)}: "
                f"{'; '.join(detail) or 'see run.json'}). Use another run_name or output_dir, or delete the folder.")
        if cfg.resume == "never" and any(run_dir.glob("step_*/COMPLETE")):
            raise TrainingError(f"{run_dir} already holds checkpoints and resume=never: use another run_name or delete the folder")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not f.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(f, ident)
    accelerator.wait_for_everyone()
    return ident


# Config keys lmrec no longer has, with the value that meant "off" (a run that had that value is unaffected by the removal).
REMOVED_IDENTITY_KEYS = {"model.bce_click_weight": 0.0}


def same_identity_across_versions(old: dict, new: dict) -> bool:
    """Two run identities written by different versions of the code describe the same run: every key either equal,
    or present on one side only at a value the other side's code means the same by (a key added since: its default;
    a key removed since: REMOVED_IDENTITY_KEYS). So an upgrade between two launches does not orphan a run."""
    from train.config import TrainConfig

    defaults = _flatten(TrainConfig().identity())
    o, n = _flatten(old), _flatten(new)
    for k in set(o) | set(n):
        if k in o and k in n:
            if o[k] != n[k] and not (isinstance(o[k], (list, tuple)) and list(o[k]) == list(n[k])):
                return False
        elif k in n:  # added since the run started
            if k not in defaults or n[k] != defaults[k]:
                return False
        elif k not in REMOVED_IDENTITY_KEYS or o[k] != REMOVED_IDENTITY_KEYS[k]:  # removed since
            return False
    return True


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = []
    for d in run_dir.glob("step_*"):
        if d.is_dir() and (d / "COMPLETE").is_file() and d.name[5:].isdigit():
            steps.append((int(d.name[5:]), d))
    return max(steps)[1] if steps else None


def build_optimizer(model: SeqRecModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, LayerNorms and embeddings (they are 1-D or lookup tables)."""
    decay, no_decay, text = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("text_encoder."):
            text.append(p)
        elif p.dim() < 2 or "emb" in name or ".ln" in name or name.startswith("ln_"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if text:
        groups.append({"params": text, "weight_decay": cfg.optim.weight_decay, "lr": cfg.optim.text_lr or cfg.optim.lr})
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


def wsd_window(cfg: TrainConfig, max_steps: int) -> tuple[int, int]:
    """schedule wsd without a binding wall budget: (first step of the decay, its length): the last decay_fraction
    of the steps after the warm-up."""
    length = max(1, round(cfg.optim.decay_fraction * max(1, max_steps - cfg.optim.warmup_steps)))
    return max_steps - length, length


def lr_lambda(cfg: TrainConfig, max_steps: int, plateau_scale: Callable[[], float] = lambda: 1.0,
              decay_window: Callable[[], tuple[int, int]] = lambda: (-1, 0)):
    """The lr multiplier per step. ``plateau_scale`` (schedule plateau): the current multiplier that validation
    plateaus set (do_eval), read when the scheduler steps. ``decay_window`` (schedule wsd): (start, length) of a
    decay the wall budget placed (TrainerState.decay_start/decay_steps), start -1 = the default window."""
    o = cfg.optim

    def f(step: int) -> float:  # step = optimizer steps done; multiplier of the base lr
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "plateau":
            return max(plateau_scale(), o.min_lr_ratio)
        if o.schedule == "wsd":
            start, length = decay_window()
            if start < 0:
                start, length = wsd_window(cfg, max_steps)
            if step < start:
                return 1.0
            # 1 - sqrt(t): the cool-down shape Hagele et al. (2024, "Scaling laws and compute-optimal training beyond
            # fixed training durations") found to match a cosine run of the same length
            t = min(1.0, (step - start) / length)
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * (1 - math.sqrt(t))
        t = min(1.0, (step - o.warmup_steps) / max(1, max_steps - o.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * t)) if o.schedule == "cosine" else 1 - t
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape

    return f


def maybe_warm_start(cfg: TrainConfig, model: SeqRecModel, prep, text_path, ckpt: Path | None, run_dir: Path,
                     accelerator) -> dict | None:
    """Load ``init_from`` (a previous final/) into the fresh model, mapping item rows by item_id
    (train/export.py::warm_start). Every rank does the same deterministic copy (identical weights
    before prepare, as with the seeded init). Skipped when a step_<N> checkpoint will be resumed."""
    if not cfg.init_from:
        return None
    if ckpt is not None:
        print0(f"[train] init_from {cfg.init_from} ignored: resuming from {ckpt} (the checkpoint already holds "
               "the warm-started weights and their training since)")
        return None
    t0 = time.time()
    item_ids = [str(x) for x in prep.items.data.table.column("item_id").to_pylist()]
    try:
        rep = warm_start(model, cfg.init_from, item_ids, list(prep.event_types), text_model_dir=text_path)
    except WarmStartError as e:
        raise TrainingError(str(e)) from None
    print0(f"[train] warm start from {cfg.init_from} (model_version {rep['model_version']}, data {rep['data_version']}): "
           f"items carried over {rep['items_carried']} | new {rep['items_new']} (fresh init) | dropped {rep['items_dropped']} "
           f"| tensors copied {rep['tensors_copied']}/{rep['tensors_total']} | {time.time() - t0:.1f}s")
    if rep["skipped"]:
        print0(f"[train] warm start: {len(rep['skipped'])} tensor(s) left at their fresh init: "
               + "; ".join(rep["skipped"][:6]) + (" ..." if len(rep["skipped"]) > 6 else ""))
    if rep["unused_previous"]:
        print0(f"[train] warm start: {len(rep['unused_previous'])} tensor(s) of the previous model unused: "
               + ", ".join(rep["unused_previous"][:6]) + (" ..." if len(rep["unused_previous"]) > 6 else ""))
    if accelerator.is_main_process:
        atomic_write_json(run_dir / WARM_START, rep)
    return rep


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(accelerator, dataloader, score_fn, beyond: tuple[torch.Tensor, int] | None = None) -> dict:
    """Full-ranking metrics; each rank scores its users, per-user ranks are gathered (duplicates
    added to even out the last batch are dropped by gather_for_metrics): same result for any world size.
    ``beyond`` = (training events per item (I,), k): also each user's top-k (seen items excluded) -> coverage@k,
    popularity_percentile@k, gini@k, tail_share@k (train/metrics.py beyond_accuracy, every item eligible)."""
    ranks, tops, targets = [], [], []
    for batch in dataloader:
        scores = score_fn(batch)  # (B, I)
        r = target_ranks(scores, batch["target"], batch["seen"])
        ranks.append(accelerator.gather_for_metrics(r))
        if beyond is not None:
            tops.append(accelerator.gather_for_metrics(top_items(scores, batch["seen"], beyond[1])).cpu())
            targets.append(accelerator.gather_for_metrics(batch["target"]).cpu())
    all_ranks = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)
    m = metrics_from_ranks(all_ranks)
    if beyond is not None:
        # the users whose held-out item had no training event (cold items, scored from text alone) and the rest
        tgt = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
        cold = beyond[0].cpu()[tgt] == 0
        m["cold_items"] = metrics_from_ranks(all_ranks.cpu()[cold])
        m["warm_items"] = metrics_from_ranks(all_ranks.cpu()[~cold])
        pop, k = beyond[0].cpu().numpy(), beyond[1]
        top = torch.cat(tops).numpy() if tops else np.zeros((0, k), np.int64)
        b = beyond_accuracy(exposure_from_lists(top, len(pop)), pop)
        m.update({f"{name}@{k}": b[name] for name in ("coverage", "popularity_percentile", "gini", "tail_share")})
    return m


def model_scorer(model: SeqRecModel, accelerator=None, catalogue: Catalogue | None = None):
    cache = {}

    def score(batch):
        if "items" not in cache:
            cache["items"] = model.all_item_vectors(catalogue).float()  # (I, d), once per evaluation
        u = model.user_vectors(batch["hist"], batch["event_types"], item_table=cache["items"]).float()  # (B, d)
        # ranking scores in float32 even under bf16/fp16 autocast: a bf16 (B, I) product rounds nearby
        # scores into ties (8 bits of mantissa), which target_ranks counts against the target, so
        # validation metrics (and the checkpoint they pick) would sit below the float32 test figures
        with torch.autocast(device_type=u.device.type, enabled=False):
            return model.score(u, cache["items"])

    return score


def run_eval(accelerator, model, dataloader, catalogue: Catalogue | None = None) -> dict:
    unwrapped = accelerator.unwrap_model(model)
    was = unwrapped.training
    unwrapped.eval()
    try:
        with accelerator.autocast():
            return evaluate(accelerator, dataloader, model_scorer(unwrapped, catalogue=catalogue))
    finally:
        unwrapped.train(was)


# ------------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(accelerator, run_dir: Path, state: TrainerState, keep_last: int, scheduler=None) -> Path:
    """step_<N>/: accelerator.save_state (the scheduler is not registered with it: accelerate would pickle it and
    unpickle it with weights_only=False) + scheduler.json + trainer_state.json + COMPLETE, written last with the
    sha256 of every file (train/checkpoint.py: resume trusts only folders that verify)."""
    out = run_dir / f"step_{state.step}"
    if accelerator.is_main_process and out.exists():
        shutil.rmtree(out)  # an incomplete leftover of a killed save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(out))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.tick()
        if scheduler is not None:
            save_scheduler(out, scheduler)
        atomic_write_json(out / "trainer_state.json", state.to_dict())
        write_complete(out, state.step, accelerator.num_processes)  # written last: resume trusts only complete folders
        done = sorted((int(d.name[5:]), d) for d in run_dir.glob("step_*") if d.name[5:].isdigit())
        # newer folders than this step were refused at resume (damaged): they do not count towards keep_last
        complete = [(s, d) for s, d in done if (d / "COMPLETE").is_file() and s <= state.step]
        for s, d in complete[:-keep_last]:
            shutil.rmtree(d, ignore_errors=True)
        for s, d in done:
            if s < state.step and not (d / "COMPLETE").is_file():
                shutil.rmtree(d, ignore_errors=True)
    accelerator.wait_for_everyone()
    return out


def choose_checkpoint(run_dir: Path, cfg: TrainConfig, accelerator) -> Path | None:
    """The newest step_<N>/ that verifies (train/checkpoint.py), chosen on rank 0 (it reads every file once) and
    broadcast; each newer folder refused is named in a warning. TrainingError when complete folders exist but
    none verifies, or when the chosen one was saved with another world size (another global batch)."""
    from accelerate.utils import broadcast_object_list

    world = accelerator.num_processes
    pick = [None, None, []]  # path, error, refused
    if accelerator.is_main_process:
        d, rec, refused = newest_verified(run_dir)
        pick = [str(d) if d else None, None, refused]
        if d is None and refused:
            pick[1] = (f"no checkpoint in {run_dir} can be resumed: {' | '.join(refused)}. Delete the damaged step_<N>/ "
                       "folders to train from scratch")
        elif d is not None and rec["world_size"] not in (None, world):
            old = rec["world_size"]
            g_old, g_new = cfg.batch_size * cfg.grad_accum * old, cfg.batch_size * cfg.grad_accum * world
            pick[1] = (f"{d} was saved by {old} process(es) (global batch {cfg.batch_size} x {cfg.grad_accum} x {old} = "
                       f"{g_old}); this launch has {world} (global batch {g_new}). Resuming with another world size would "
                       "change the global batch and the data order and is refused (no setting allows it): relaunch with "
                       f"{old} process(es), or train a new run (another run_name)")
    pick = broadcast_object_list([pick])[0]
    for why in pick[2]:
        print0(f"[train] warning: checkpoint refused: {why}")
    if pick[1]:
        raise TrainingError(pick[1])
    if pick[2] and pick[0]:
        print0(f"[train] warning: resuming from {pick[0]}, the newest checkpoint that verifies")
    return Path(pick[0]) if pick[0] else None


def load_checkpoint(accelerator, model, scheduler, ckpt: Path) -> None:
    """accelerator.load_state with no pickle read beyond weights_only (Accelerate's own loader for optimizer, RNG
    and scaler state; DeepSpeed's checkpoint engine swapped for a weights_only one), the LR schedule from
    scheduler.json, and a check that this rank's RNG state was restored (Accelerate only logs that failure)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        weights_only_deepspeed_engine(model)
    src, staged = ckpt, None
    if (ckpt / "custom_checkpoint_0.pkl").is_file():
        # a checkpoint written before scheduler.json: load_state would unpickle this file with weights_only=False
        # (and insists on one registered object per file): load the rest from hard links without it
        src = staged = ckpt.parent / f".resume-{ckpt.name}-rank{accelerator.process_index}"
        shutil.rmtree(staged, ignore_errors=True)
        for f in ckpt.rglob("*"):
            if f.is_file() and f.name != "custom_checkpoint_0.pkl":
                (staged / f.relative_to(ckpt)).parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(f, staged / f.relative_to(ckpt))
                except OSError:
                    shutil.copy2(f, staged / f.relative_to(ckpt))
    try:
        accelerator.load_state(str(src))
    except Exception as e:  # noqa: BLE001 - verified files that still do not load (e.g. a refused pickle global)
        bad = first_unloadable(ckpt)  # torch's error does not say which file: name it
        where, why = (f"{ckpt}/{bad[0]}", bad[1]) if bad else (str(ckpt), short_error(e, 300))
        raise TrainingError(f"{where}: verified but does not load with weights_only ({why}); lmrec never unpickles "
                            "code from a checkpoint: delete this step_<N>/ to resume from an older one") from None
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    try:
        load_scheduler(ckpt, scheduler)
    except Exception as e:  # noqa: BLE001 - one message, whatever the reason
        raise TrainingError(f"{ckpt}: the LR schedule's state does not load ({type(e).__name__}: {str(e)[:300]})") from None
    try:
        want = saved_torch_rng(ckpt, accelerator.process_index)
    except Exception:  # noqa: BLE001 - unreadable: reported below as not restored
        want = None
    if want is None or not torch.equal(torch.get_rng_state(), want):
        raise TrainingError(f"{ckpt}/random_states_{accelerator.process_index}.pkl: this rank's RNG state was not "
                            "restored (missing or unreadable): the resume would not be exact")


def remove_leftovers(run_dir: Path) -> list[str]:
    """Remove the temporary files a killed launch left in its run folder (rank 0, before this launch writes there): a
    half-exported final/ (``.tmp-final-*``, a whole export each), best/ weights and records being replaced
    (``best/.tmp-*``), run files and logs being rewritten (``.tmp-<name>-*``). Their names carry the writer's pid, so no
    later write replaces them: without this each kill at such a moment kept its copy for good. Returns their names."""
    out = []
    for p in sorted(list(run_dir.glob(".tmp-*")) + list(run_dir.glob(".old-*")) + list((run_dir / "best").glob(".tmp-*"))):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        out.append(p.relative_to(run_dir).as_posix())
    return out


def save_best(accelerator, model, run_dir: Path, state: TrainerState, metrics: dict) -> None:
    from safetensors.torch import save_file

    sd = accelerator.get_state_dict(model)  # collective under ZeRO-3 (full dict on rank 0)
    if accelerator.is_main_process:
        best = run_dir / "best"
        best.mkdir(parents=True, exist_ok=True)
        tmp = best / f".tmp-model-{os.getpid()}.safetensors"
        save_file({k: v.detach().cpu().float().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
                   for k, v in sd.items()}, str(tmp))
        os.replace(tmp, best / "model.safetensors")
        atomic_write_json(best / "best.json", {"step": state.step, "metrics": metrics})
    accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------------ logging
def memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except ImportError:
        return float("nan")


def tracker_config(cfg: TrainConfig) -> dict:
    """TensorBoard hparams accept scalars and strings only: flatten the config."""
    out = {}

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk("", to_dict(cfg))
    return out


# ------------------------------------------------------------------------------------------------ run
# oneDNN primitives kept per process (its default: 1024). bf16 autocast on CPU runs the linears through
# oneDNN, one primitive per input shape, and the loss's rows (a batch's non-padding target positions)
# change in number from batch to batch, so new shapes keep coming: the ML-1M hybrid's RSS grew from
# 1.3 GiB (float32) to 5-6 GiB at the default. A
# probe (91 sequence lengths, twice; docs/PERF.md) peaked at 3.0 GB with 1024, 1.6 GB with 64 and 1.4 GB
# with 0 (no cache, 1.4x slower); 64 cost no time there. Read when oneDNN creates its first primitive.
ONEDNN_CACHE_CAPACITY = "64"


def bound_onednn_cache() -> None:
    """Sets ONEDNN_PRIMITIVE_CACHE_CAPACITY unless the user did (their value wins)."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)


def run(cfg: TrainConfig) -> int:
    """Train, evaluate and export; returns the exit code (0, or 124 after a signal-triggered save)."""
    bound_onednn_cache()
    # normalise: Literal values coming from key=value overrides are str subclasses that yaml cannot dump
    cfg = plain_config(cfg)
    stop = StopFlag()
    stop.install()
    try:
        return _run(cfg, stop)
    finally:
        stop.uninstall()


@dataclass
class TrainJob:
    """One launch of a training run: what each step of ``_run`` builds, in the order it builds it. A step reads the
    fields the steps before it filled (``check_inputs`` -> ``build_data`` -> ``build_model`` -> ``prepare_and_resume``
    -> ``train`` -> ``finish``)."""

    cfg: TrainConfig
    stop: StopFlag
    accelerator: Any
    run_dir: Path
    t_start: float
    # check_inputs
    prep: Any = None  # train.data.Prepared
    model_cfg: RecModelConfig | None = None
    text_path: Path | None = None  # the resolved local folder of the item tower's text model (None: id tower)
    ckpt: Path | None = None  # the checkpoint this launch resumes from
    finished: dict | None = None  # FINISHED.json of a run already finished with these settings: nothing to train
    glob_batch: int = 0
    # build_data
    train_ex: TrainExamples | None = None
    valid_ex: EvalExamples | None = None
    sampler: EpochSampler | None = None
    train_dl: Any = None
    valid_dl: Any = None
    counts: torch.Tensor | None = None  # (I,) training events per item
    # build_model
    model: Any = None  # SeqRecModel, wrapped by accelerator.prepare
    catalogue: Catalogue | None = None
    warm: dict | None = None  # what init_from carried over (None: not warm-started)
    optimizer: Any = None
    scheduler: Any = None
    batches_per_epoch: int = 0  # micro-batches per process after sharding (DataLoaderShard splits each global batch)
    steps_per_epoch: int = 0
    max_steps: int = 0
    state: TrainerState = field(default_factory=TrainerState)  # replaced by the checkpoint's when resuming
    # schedule wsd under a wall budget: (step, seconds spent) at this launch's first optimizer step, the origin of the
    # seconds-per-step estimate that sizes the decay (this launch's steps and evaluations, not its start-up)
    clock_ref: tuple[int, float] | None = None

    @property
    def end_step(self) -> int:
        """The step training ends at: max_steps, or the end of the decay a wall budget placed (schedule wsd)."""
        s = self.state
        return min(self.max_steps, s.decay_start + s.decay_steps) if s.decay_start >= 0 else self.max_steps

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def release_pages(self) -> None:
        """Drop this process's resident pages of the memory-mapped prepared shards after a scan that read them all
        (startup checks and counts, a validation pass): the loop reads a few users per batch, so without this the
        resident set would keep every page a scan touched, growing with the data (lmrec_common/mapped.py)."""
        if self.prep is not None:
            release_mapped_pages(dataset_files(self.prep.sequences, self.prep.items))


def _run(cfg: TrainConfig, stop: StopFlag) -> int:
    run_dir = Path(cfg.output_dir) / cfg.run_name
    job = TrainJob(cfg, stop, make_accelerator(cfg, run_dir), run_dir, time.time())
    plugin = getattr(job.accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.deepspeed_config.get("gradient_clipping") == "auto":
        # DeepSpeed clips inside its step (accelerator.clip_grad_norm_ is a no-op there): use optim.grad_clip
        plugin.deepspeed_config["gradient_clipping"] = float(cfg.optim.grad_clip)
    check_inputs(job)
    if job.finished:
        print0(f"[train] run {cfg.run_name} already finished with these settings on data {job.prep.version}: {run_dir / 'final'} "
               f"kept (model_version {job.finished['model_version']}, step {job.finished.get('best_step')}); nothing to train. "
               f"To train again: another run_name, or delete {run_dir}")
        job.accelerator.end_training()
        return EXIT_OK
    build_data(job)
    build_model(job)
    prepare_and_resume(job)
    print_header(job)
    if validates(cfg):  # a baseline in the same run, same users, same metrics code
        pop = evaluate(job.accelerator, job.valid_dl, MostPopular(job.counts).scores)
        print0(f"[valid] most_popular | {format_metrics(pop)}")
    exit_code = train(job)
    if exit_code == EXIT_OK:
        finish(job)  # evaluate the best weights on valid (all users) and test, export final/
    job.accelerator.end_training()
    if exit_code == EXIT_OK:
        job.state.tick()
        print0(f"[train] done in {fmt_secs(time.time() - job.t_start)}"
               + (f" ({fmt_secs(job.state.wall_s)} over all launches of this run)"
                  if job.ckpt is not None and job.state.wall_s is not None else ""))
    return exit_code


def check_inputs(job: TrainJob) -> None:
    """The prepared data, the text model and the run folder, checked before any compute; fills prep, model_cfg,
    text_path, ckpt."""
    cfg = job.cfg
    job.glob_batch = check_batch_arithmetic(cfg, job.world)
    prep = job.prep = open_prepared(cfg.data)
    items = prep.items
    num_items = len(items)
    item_idx_col = items.data.table.column("item_idx").to_numpy()
    if num_items == 0 or not (item_idx_col == range(num_items)).all():
        raise TrainingError(f"{prep.path}/items: item_idx must equal the row number 0..{num_items - 1}")
    check_sequences(prep, num_items)
    pad_id = 0
    if cfg.model.item_tower != "id":
        text_path = job.text_path = resolve_model_path(cfg.model.text_model_path)  # errors: missing / not a transformer folder
        from transformers import AutoConfig

        try:
            tconf = AutoConfig.from_pretrained(str(text_path), local_files_only=True, trust_remote_code=False)
        except Exception as e:
            raise TrainingError(f"model.text_model_path {text_path}: not a loadable transformer config ({e})") from None
        pad_id = tconf.pad_token_id if getattr(tconf, "pad_token_id", None) is not None else 0
        ids_max = items.data.table.column("input_ids").combine_chunks().values.to_numpy().max(initial=0)
        if ids_max >= getattr(tconf, "vocab_size", ids_max + 1):
            raise TrainingError(
                f"{prep.path}/items: token id {ids_max} >= vocab size {tconf.vocab_size} of {text_path}: the data was "
                f"tokenized with another tokenizer ({prep.manifest.get('tokenizer')}); re-run data_prep with this model")
        tok = prep.manifest.get("tokenizer") or {}
        if tok.get("path") not in (None, cfg.model.text_model_path, str(text_path)):
            print0(f"[train] warning: data tokenized with {tok.get('path')!r}, item tower is {cfg.model.text_model_path!r}")
    job.model_cfg = cfg.model.rec_config(num_items, max(len(prep.event_types), 1), pad_id)
    check_run_dir(job.run_dir, cfg, prep.version, job.accelerator)
    # decided before the model is built: a warm start must load its weights before the frozen text
    # features are computed, and a checkpoint to resume from makes the warm start pointless
    job.finished = finished_launch(job.run_dir, cfg, prep.version) if cfg.resume == "auto" else None
    job.ckpt = choose_checkpoint(job.run_dir, cfg, job.accelerator) if cfg.resume == "auto" and not job.finished else None
    if cfg.init_from and not (Path(cfg.init_from) / "export.json").is_file():
        raise TrainingError(f"init_from {cfg.init_from} is not a final/ export (no export.json)")


def launch_settings(cfg: TrainConfig) -> dict:
    """The resolved config as plain JSON values: what FINISHED.json compares between launches."""
    return json.loads(json.dumps(to_dict(plain_config(cfg)), sort_keys=True, default=str))


def finished_launch(run_dir: Path, cfg: TrainConfig, data_version: str) -> dict | None:
    """FINISHED.json's record when the run's last launch finished with exactly these settings on this data version
    and final/ is still its export; else None (train, resuming from a checkpoint where there is one)."""
    try:
        rec = json.loads((run_dir / FINISHED).read_text())
        export = json.loads((run_dir / "final" / "export.json").read_text())
    except (OSError, ValueError):
        return None
    same = rec.get("settings") == launch_settings(cfg) and rec.get("data_version") == data_version
    return rec if same and export.get("model_version") == rec.get("model_version") else None


def build_data(job: TrainJob) -> None:
    """Training and validation examples (12 bytes per user, windows built per batch) and their loaders."""
    cfg, prep, max_len = job.cfg, job.prep, job.model_cfg.max_len
    job.train_ex = TrainExamples.build(prep.sequences, max_len, cfg.train_through)
    job.valid_ex = EvalExamples.build(prep.sequences, "valid", max_len, cfg.eval_max_users)
    if len(job.train_ex) == 0:
        raise TrainingError(f"{prep.path}/sequences: no user has 2 or more training events")
    job.sampler = EpochSampler(len(job.train_ex), cfg.seed)
    job.train_dl = torch.utils.data.DataLoader(job.train_ex, batch_size=cfg.batch_size, sampler=job.sampler,
                                               collate_fn=job.train_ex.collate, num_workers=cfg.num_workers,
                                               drop_last=False, generator=torch.Generator().manual_seed(cfg.seed))
    # every loader owns a generator: creating an iterator draws a seed from it, and a draw from the
    # global RNG would shift the dropout masks of a resumed run (resume must be exact)
    job.valid_dl = torch.utils.data.DataLoader(job.valid_ex, batch_size=cfg.eval_batch_size, collate_fn=job.valid_ex.collate,
                                               num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    # how often each item occurs in training: n_train_events of items/ unless a refit trains on more
    job.counts = training_item_counts(prep.sequences, len(prep.items), cfg.train_through)
    job.release_pages()  # check_sequences and the counts read every event; the loop reads a batch's users


def build_model(job: TrainJob) -> None:
    """The model (same seed on every rank: identical initial weights), its catalogue (the items' side:
    train/catalogue.py), the warm start, the optimizer and the lr schedule."""
    from accelerate.utils import set_seed

    cfg, model_cfg, accelerator = job.cfg, job.model_cfg, job.accelerator
    num_items = model_cfg.num_items
    set_seed(cfg.seed)
    with no_zero3_init(accelerator):
        model = SeqRecModel(model_cfg, text_model_path=str(job.text_path) if job.text_path else None)
        model.set_seen_items(job.counts)
        catalogue = Catalogue.from_items(job.prep.items, model)
        catalogue.set_training_counts(job.counts)
        job.warm = maybe_warm_start(cfg, model, job.prep, job.text_path, job.ckpt, job.run_dir, accelerator)
        if model.uses_text and model_cfg.text_mode == "frozen":
            t0 = time.time()
            # on the training device (it ran on the process's CPU before: 40 s for ML-1M's 3,883 titles per run
            # with 9 runs sharing an H200 machine's 16 cores)
            model.to(accelerator.device)
            encoded = catalogue.prepare(model, cache_dir=cfg.text_feature_cache or None,
                                        write_cache=accelerator.is_main_process)
            print0(f"[train] frozen item tower: encoded {encoded} of {num_items} items once on {accelerator.device} in "
                   f"{time.time() - t0:.1f}s" + (f" (the rest from {cfg.text_feature_cache})" if encoded < num_items else "")
                   + (f", whitened on {model.text_basis.size(1)} principal axes" if model_cfg.text_whiten else ""))
        elif model.uses_text and model_cfg.text_mode == "pool":
            t0 = time.time()
            model.to(accelerator.device)
            catalogue.prepare(model)  # the pooling is trained: its features are computed every step
            print0(f"[train] item tower: mean features and the tokens' coordinates on {model_cfg.pool_rank} principal axes of "
                   f"{num_items} items cached once ({catalogue.states.numel() * 4 / 2**20:.0f} MiB), a "
                   f"{model_cfg.pool_heads}-head attention pooling over them trained, in {time.time() - t0:.1f}s"
                   + (f"; mean features whitened on {model.text_basis.size(1)} principal axes" if model_cfg.text_whiten else ""))
        elif model.uses_text and model_cfg.text_mode == "top":
            t0 = time.time()
            model.to(accelerator.device)
            catalogue.prepare(model)  # the lower layers are frozen: their output is computed once
            print0(f"[train] item tower: the lower layers' token states of {num_items} items cached once "
                   f"({catalogue.states.numel() * 2 / 2**20:.0f} MiB), the top {model_cfg.top_layers} encoder layer(s) trained "
                   f"over them, in {time.time() - t0:.1f}s" + ("" if model_cfg.loss == "sampled_softmax" else
                   " (full softmax: every item through the trained layers every step; sampled_softmax is far cheaper)"))
    catalogue.to(accelerator.device)
    job.model, job.catalogue = model, catalogue
    job.optimizer = build_optimizer(model, cfg)
    # batches per process after sharding (DataLoaderShard splits every global batch of world x micro)
    job.batches_per_epoch = math.ceil(len(job.train_ex) / (cfg.batch_size * job.world))
    job.steps_per_epoch = math.ceil(job.batches_per_epoch / cfg.grad_accum)
    job.max_steps = cfg.max_steps or cfg.epochs * job.steps_per_epoch
    if cfg.eval_every_epochs > 0:  # a cadence that follows the data's size (recipes shared by catalogues)
        cfg.eval_every = max(1, round(cfg.eval_every_epochs * job.steps_per_epoch))
    # the schedule acts on the raw optimizer's param groups (ZeRO keeps the same group dicts) and is
    # stepped by hand once per optimizer step: accelerate's prepared scheduler steps num_processes
    # times per call, which would tie the warm-up length to the world size. (plateau: the lambda reads
    # job.state when called, i.e. the resumed state once it is loaded.)
    job.scheduler = torch.optim.lr_scheduler.LambdaLR(job.optimizer, lr_lambda(
        cfg, job.max_steps, lambda: job.state.lr_scale, lambda: (job.state.decay_start, job.state.decay_steps)))


def prepare_and_resume(job: TrainJob) -> None:
    """accelerator.prepare, then the resume from job.ckpt, the run folder's leftovers of a killed launch, its
    config and the trackers."""
    cfg, accelerator, run_dir = job.cfg, job.accelerator, job.run_dir
    job.model, job.optimizer, job.train_dl, job.valid_dl = accelerator.prepare(job.model, job.optimizer, job.train_dl, job.valid_dl)
    if len(job.train_dl) != job.batches_per_epoch:
        raise TrainingError(f"internal: {len(job.train_dl)} batches per process after prepare, expected {job.batches_per_epoch}")
    # the scheduler is saved as scheduler.json by save_checkpoint, not registered with accelerate (it pickles it)
    if job.ckpt is not None:
        load_checkpoint(accelerator, job.model, job.scheduler, job.ckpt)
        saved = json.loads((job.ckpt / "trainer_state.json").read_text())
        job.state = TrainerState(**{"wall_s": None, **saved})  # no wall_s: the earlier launches were not timed
        s = job.state
        print0(f"[train] resumed from {job.ckpt} (step {s.step}, epoch {s.epoch}, batch {s.batch_in_epoch}, "
               + ("earlier launches not timed)" if s.wall_s is None else f"{fmt_secs(s.wall_s)} of training before)"))
    job.state.start_clock(job.t_start)
    if accelerator.is_main_process:
        (run_dir / PREEMPTED).unlink(missing_ok=True)
        (run_dir / FINISHED).unlink(missing_ok=True)  # this launch trains: final/ is replaced when it finishes
        left = remove_leftovers(run_dir)
        if left:
            print0(f"[train] removed {len(left)} leftover(s) of a killed launch: {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}")
        # drop log lines past the checkpoint (written by the killed attempt after its last save)
        for name in ("losses.jsonl", "evals.jsonl"):
            f = run_dir / name
            if f.is_file():
                rows, bad = read_jsonl_tolerant(f)
                if bad:
                    print0(f"[train] warning: {f}: dropped line(s) {bad[:5]} that do not parse (a torn write of a killed run)")
                atomic_write_text(f, "".join(ln + "\n" for step, ln in rows if step <= job.state.step))
        save_config(cfg, run_dir / "train_config.yaml")
    accelerator.init_trackers(cfg.run_name, config=tracker_config(cfg))


def print_header(job: TrainJob) -> None:
    cfg, accelerator, model_cfg = job.cfg, job.accelerator, job.model_cfg
    trainable, total = model_param_counts(job.model)
    print0("=" * 100)
    print0(f"[train] run {cfg.run_name} -> {job.run_dir} | data {job.prep.path} (version {job.prep.version})")
    print0(f"[train] world size {job.world} | distributed {accelerator.distributed_type.value} | precision {accelerator.mixed_precision} "
           f"| ZeRO stage {zero_stage(accelerator)} | device {accelerator.device}")
    slow = emulated_cpu_precision(accelerator.mixed_precision, accelerator.device)
    if slow:
        print0(f"[train] warning: {slow}")
    print0(f"[train] micro batch {cfg.batch_size} x grad_accum {cfg.grad_accum} x world {job.world} = global batch "
           f"{job.glob_batch} sequences")
    print0(f"[train] model {model_cfg.item_tower} tower"
           + (f" ({model_cfg.text_mode}, {cfg.model.text_model_path})" if model_cfg.item_tower != "id" else "")
           + f" | d {model_cfg.d_model} | layers {model_cfg.n_layers} | heads {model_cfg.n_heads} | max_len {model_cfg.max_len}"
           f" | loss {model_cfg.loss} | params trainable {fmt_count(trainable)} / total {fmt_count(total)}")
    print0(f"[train] items {model_cfg.num_items} | train examples {len(job.train_ex)} ({fmt_count(job.train_ex.num_targets())} "
           f"target positions/epoch) | valid users {len(job.valid_ex)} | {job.steps_per_epoch} steps/epoch | max steps "
           f"{job.max_steps} (~{job.max_steps / job.steps_per_epoch:.1f} epochs) | eval every {cfg.eval_every} | save every "
           f"{cfg.save_every}")
    if cfg.optim.schedule == "wsd":
        start = wsd_window(cfg, job.max_steps)[0]
        print0(f"[train] schedule wsd: lr {cfg.optim.lr:g} until step {start}, then down to {cfg.optim.lr * cfg.optim.min_lr_ratio:g} "
               f"at step {job.max_steps}" + (f"; max_train_wall_s {cfg.max_train_wall_s:g}: the decay starts when "
                                             f"{1 - cfg.optim.decay_fraction:.0%} of it is spent if max_steps will not fit"
                                             if cfg.max_train_wall_s else ""))
    if not validates(cfg):
        print0(f"[train] train_through={cfg.train_through}: a refit, the {cfg.train_through} targets are training data: no "
               f"validation, no early stopping; final/ = the weights of step {job.max_steps}"
               + (" (test still held out)" if cfg.train_through == "valid" else " (nothing held out, nothing evaluated)"))
    print0("=" * 100)


def model_param_counts(model) -> tuple[int, int]:
    """ZeRO-3 partitions parameters (numel() is 0 locally): DeepSpeed keeps the full size in ds_numel."""
    tr = tot = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        tot += n
        tr += n if p.requires_grad else 0
    return tr, tot


def sampling_distributions(counts: torch.Tensor, negative_sampling: str, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled softmax: (p_target, p_neg), each (I,) summing to 1: how often each item is a training target, and the
    proposal the shared negatives are drawn from (uniform, or target counts ** alpha with a floor)."""
    p_target = counts / counts.sum().clamp(min=1)
    p_neg = counts.clamp(min=0).pow(alpha) + 1e-3 if negative_sampling == "popularity" else torch.ones(counts.numel())
    return p_target, p_neg / p_neg.sum()


def candidate_log_q(n_targets: torch.Tensor | float, p_target: torch.Tensor, p_neg: torch.Tensor, num_negatives: int) -> torch.Tensor:
    """(I,) log of each item's expected count among a step's softmax candidates (the batch's ``n_targets`` targets plus
    ``num_negatives`` draws from ``p_neg``): the logQ correction subtracted from the sampled logits (Yi et al. 2019),
    so that the sampled softmax estimates the full one whatever the proposal."""
    return torch.log(n_targets * p_target + num_negatives * p_neg + 1e-12)


class _StepWindow:
    """This rank's micro-batch losses and counts since the last optimizer step, and the ranks' totals since the last
    log line (the throughput it prints)."""

    def __init__(self):
        self.micro_losses: list[torch.Tensor] = []
        self.examples = self.tokens = 0
        self.t_log, self.ex_log, self.tok_log, self.steps_log = time.time(), 0, 0, 0

    def add(self, loss: torch.Tensor, n_examples: int, n_targets: int) -> None:
        self.micro_losses.append(loss.detach().float())
        self.examples += n_examples
        self.tokens += n_targets


@dataclass
class StepReport:
    """One optimizer step as every rank sees it after the step's single all-reduce."""

    mean_loss: float  # over micro-batches and ranks
    signalled: bool  # any rank got SIGTERM / SIGUSR1
    non_finite: bool  # any rank's loss
    out_of_time: bool  # any rank's clock passed max_train_wall_s
    spent_s: float  # training seconds so far, the mean over ranks (every rank sees the same figure)


def train(job: TrainJob) -> int:
    """Optimizer steps until max_steps, early stopping, the wall budget or a stop signal -> EXIT_OK / EXIT_REQUEUE.
    Resumes mid-epoch: the sampler's epoch order is a function of (seed, epoch) and the batches already consumed
    are skipped."""
    cfg, accelerator, state = job.cfg, job.accelerator, job.state
    sampling = None
    if job.model_cfg.loss == "sampled_softmax":
        sampling = sampling_distributions(job.counts, cfg.model.negative_sampling, cfg.model.popularity_alpha)
    job.model.train()
    window = _StepWindow()
    while state.step < job.end_step:
        job.sampler.select_epoch(state.epoch)
        dl = accelerator.skip_first_batches(job.train_dl, state.batch_in_epoch) if state.batch_in_epoch else job.train_dl
        for batch in dl:
            state.batch_in_epoch += 1
            micro_step(job, batch, window, sampling)
            if not accelerator.sync_gradients:
                continue
            ended = end_of_step(job, window, batch)
            if ended is not None:
                return ended
        state.epoch += 1
        state.batch_in_epoch = 0
    return EXIT_OK


def micro_step(job: TrainJob, batch: dict, window: _StepWindow, sampling: tuple | None) -> None:
    """Forward and backward of one micro-batch; the optimizer steps when accelerate's accumulation is complete."""
    cfg, accelerator, model = job.cfg, job.accelerator, job.model
    extra = {}
    n_t = (batch["targets"] != -1).sum()
    if sampling is not None:
        p_target, p_neg = sampling
        # a function of (seed, step, micro-batch, rank): a resumed run draws the same negatives
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + job.state.step * 1_009 + len(window.micro_losses) * 31
                                          + accelerator.process_index)
        neg = torch.multinomial(p_neg, cfg.model.num_negatives, replacement=True, generator=g)
        # expected count of each item among the candidates: in-batch targets + sampled negatives
        log_q = candidate_log_q(n_t.float().cpu(), p_target, p_neg, cfg.model.num_negatives)
        extra = {"negatives": neg.to(accelerator.device), "item_log_q": log_q.to(accelerator.device)}
    with accelerator.accumulate(model):
        loss = model(batch["hist"], batch["event_types"], batch["targets"], catalogue=job.catalogue, **extra)["loss"]
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        job.optimizer.step()
        job.optimizer.zero_grad(set_to_none=True)
    window.add(loss, batch["hist"].size(0), int(n_t))


def reduce_step(job: TrainJob, window: _StepWindow) -> StepReport:
    """The one all-reduce of an optimizer step: loss, stop signal, non-finite loss, examples, targets, clock."""
    accelerator, state = job.accelerator, job.state
    local = torch.stack(window.micro_losses).mean()
    spent = state.spent_s()
    out_of_time = bool(job.cfg.max_train_wall_s) and spent >= job.cfg.max_train_wall_s
    flags = torch.tensor([float(local), float(job.stop.signum != 0), float(not torch.isfinite(local)),
                          float(window.examples), float(window.tokens), float(out_of_time), spent], dtype=torch.float64,
                         device=accelerator.device)
    red = accelerator.reduce(flags, reduction="sum")
    window.micro_losses, window.examples, window.tokens = [], 0, 0
    state.examples_seen += int(red[3])
    window.ex_log += int(red[3])
    window.tok_log += int(red[4])
    window.steps_log += 1
    mean_loss = float(red[0]) / accelerator.num_processes
    return StepReport(mean_loss, bool(red[1] > 0), bool(red[2] > 0) or not math.isfinite(mean_loss), bool(red[5] > 0),
                      float(red[6]) / accelerator.num_processes)


def place_budget_decay(job: TrainJob, rep: StepReport) -> None:
    """schedule wsd with max_train_wall_s: once (1 - decay_fraction) of the budget is spent, if the steps left to
    max_steps do not fit in the rest of it, the decay starts now and lasts the steps that do (seconds per step
    measured since this launch's first step, evaluations included), so the run ends at the deadline with its lr
    annealed instead of being cut at the top of the schedule. Decided once, from figures every rank shares;
    saved with the trainer state, so a resumed run keeps it."""
    cfg, state = job.cfg, job.state
    if job.clock_ref is None:
        job.clock_ref = (state.step, rep.spent_s)
    budget = cfg.max_train_wall_s
    if cfg.optim.schedule != "wsd" or not budget or state.decay_start >= 0 or rep.spent_s < (1 - cfg.optim.decay_fraction) * budget:
        return
    if state.step >= wsd_window(cfg, job.max_steps)[0]:
        return  # the default decay has begun: it ends at max_steps (the deadline still cuts it if it comes first)
    s0, t0 = job.clock_ref
    per_step = (rep.spent_s - t0) / (state.step - s0) if state.step - s0 >= 5 else rep.spent_s / max(1, state.step)
    fit = int(max(0.0, budget - rep.spent_s) / max(per_step, 1e-9))
    if state.step + fit >= job.max_steps:
        return  # max_steps fits in the budget: the default decay
    state.decay_start, state.decay_steps = state.step, max(1, fit)
    print0(f"[train] wsd: {rep.spent_s:.0f}s of the {budget:g}s budget spent at step {state.step} of {job.max_steps} "
           f"({per_step:.2f}s per step): the lr decays from here over {state.decay_steps} steps and training ends at step "
           f"{job.end_step}")


def log_step(job: TrainJob, rep: StepReport, lr: float, window: _StepWindow) -> None:
    """losses.jsonl and the trackers every step, a progress line every log_every steps."""
    state = job.state
    if job.accelerator.is_main_process:
        with open(job.run_dir / "losses.jsonl", "a") as f:
            f.write(json.dumps({"step": state.step, "loss": rep.mean_loss, "lr": lr}) + "\n")
    job.accelerator.log({"train/loss": rep.mean_loss, "train/lr": lr}, step=state.step)
    if state.step % job.cfg.log_every == 0 or state.step == 1:
        now = time.time()
        dt = max(now - window.t_log, 1e-9)
        eta = (job.end_step - state.step) * dt / max(1, window.steps_log)
        print0(f"step {state.step:05d}/{job.end_step:05d} | epoch {state.epoch} | loss {rep.mean_loss:.4f} | lr {lr:.2e} | "
               f"{fmt_count(window.ex_log / dt)} ex/s | {fmt_count(window.tok_log / dt)} tok/s | mem {memory_gib():.2f} GiB | "
               f"eta {fmt_secs(eta)}")
        window.t_log, window.ex_log, window.tok_log, window.steps_log = now, 0, 0, 0


def end_of_step(job: TrainJob, window: _StepWindow, batch: dict) -> int | None:
    """After an optimizer step: schedule, agree across ranks, log, validate, save; an exit code when training ends
    here (last step, early stopping, wall budget: EXIT_OK; signal or stop_after_steps: EXIT_REQUEUE), else None."""
    cfg, accelerator, state, run_dir = job.cfg, job.accelerator, job.state, job.run_dir
    if not getattr(job.optimizer, "step_was_skipped", False):
        job.scheduler.step()
    state.step += 1
    rep = reduce_step(job, window)
    if rep.non_finite:
        last = latest_checkpoint(run_dir)
        raise TrainingError(
            f"non-finite loss {rep.mean_loss} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch} of the "
            f"epoch; rank {accelerator.process_index} users {batch['user_idx'][:8].tolist()}...): stopping; the last good "
            f"checkpoint is {last or 'none (no checkpoint saved yet)'}. Lower optim.lr, enable optim.grad_clip, or check the data.")
    lr = job.scheduler.get_last_lr()[0]
    log_step(job, rep, lr, window)
    place_budget_decay(job, rep)

    last_step = state.step >= job.end_step
    if last_step and state.step < job.max_steps:  # the end of a decay the wall budget placed (schedule wsd)
        state.stopped_by = "max_train_wall_s"
        print0(f"[train] wsd: the decay the wall budget placed ends at step {state.step} of {job.max_steps} (lr {lr:.2e}); "
               "best/ -> final/ as usual")
    if rep.out_of_time and not last_step:  # any rank's clock: all ranks see the same sum and stop together
        state.stopped_by = "max_train_wall_s"
        print0(f"[train] max_train_wall_s={cfg.max_train_wall_s:g} reached after step {state.step} of {job.max_steps}: "
               f"ending training here (the schedule's lr is {lr:.2e}, not its final value); best/ -> final/ as usual")
        last_step = True
    if validates(cfg) and cfg.eval_every and state.step % cfg.eval_every == 0 and not last_step:
        stopping = do_eval(cfg, accelerator, job.model, job.valid_dl, state, run_dir, job.catalogue)
        job.release_pages()
        if stopping:
            state.stopped_by = "early_stopping"
            print0(f"[train] early stopping: no better valid NDCG@10 in {cfg.early_stopping_patience} evaluations "
                   f"(best {state.best_metric:.4f} at step {state.best_step})")
            return EXIT_OK
    preempt = rep.signalled or (cfg.stop_after_steps and state.step == cfg.stop_after_steps)
    if (cfg.save_every and state.step % cfg.save_every == 0) or preempt:
        path = save_checkpoint(accelerator, run_dir, state, cfg.keep_last, job.scheduler)
        print0(f"[train] saved {path}")
    if preempt:
        stop = job.stop
        why = signal.Signals(stop.signum).name if stop.signum else f"stop_after_steps={cfg.stop_after_steps}"
        print0(f"[train] stopping after step {state.step} ({why}); exit {EXIT_REQUEUE}: relaunch to resume")
        if accelerator.is_main_process:
            # torchrun turns any worker exit code into 1, so launchers read this marker instead
            atomic_write_json(run_dir / PREEMPTED, {"step": state.step, "reason": why, "checkpoint": str(path),
                                                    "time": time.time()})
            if cfg.requeue_on_signal and stop.signum and os.environ.get("SLURM_JOB_ID"):
                subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
        accelerator.wait_for_everyone()  # no rank exits (and makes torchrun kill the others) before this
        return EXIT_REQUEUE
    return EXIT_OK if last_step else None


def validates(cfg: TrainConfig) -> bool:
    """Does validation choose the exported weights? Not in a refit (train_through valid/test), whose
    validation targets are training data."""
    return cfg.train_through == "train"


def do_eval(cfg, accelerator, model, valid_dl, state: TrainerState, run_dir: Path, catalogue: Catalogue) -> bool:
    """Validate, keep best/ up to date; True when early stopping triggers."""
    t0 = time.time()
    m = run_eval(accelerator, model, valid_dl, catalogue)
    state.last_eval_step = state.step
    better = m["NDCG@10"] > state.best_metric
    print0(f"[valid] step {state.step:05d} | {format_metrics(m)} | {time.time() - t0:.1f}s" + (" | best" if better else ""))
    accelerator.log({f"valid/{k}": v for k, v in m.items() if k != "n"}, step=state.step)
    if accelerator.is_main_process:
        with open(run_dir / "evals.jsonl", "a") as f:
            f.write(json.dumps({"step": state.step, **m}) + "\n")
    if better:
        state.best_metric, state.best_step, state.bad_evals, state.plateau_evals = m["NDCG@10"], state.step, 0, 0
        save_best(accelerator, model, run_dir, state, m)
    else:
        state.bad_evals += 1
        state.plateau_evals += 1
        o = cfg.optim
        if o.schedule == "plateau" and state.plateau_evals >= o.plateau_patience and state.lr_scale > o.min_lr_ratio:
            state.lr_scale, state.plateau_evals = max(state.lr_scale * o.plateau_factor, o.min_lr_ratio), 0
            print0(f"[train] validation plateau ({o.plateau_patience} evaluation(s) without a better NDCG@10): "
                   f"lr x{o.plateau_factor} -> {o.lr * state.lr_scale:.2e} from the next step")
    return bool(cfg.early_stopping_patience and state.bad_evals >= cfg.early_stopping_patience)


def finish(job: TrainJob) -> None:
    """Evaluate the best weights on every validation user and on test (reported, never used to choose; a fixed
    subset of final_eval_max_users per split when set), then rank 0 publishes final/. The users are split across
    ranks by the prepared dataloader and gathered with gather_for_metrics (each user counted once). A refit exports
    the last step's weights and evaluates only the split it did not train on. Evaluation runs on a plain copy of the
    model on every rank (no collectives inside it), so it is the same code under DDP, ZeRO-2 and ZeRO-3."""
    from safetensors.torch import load_file

    cfg, accelerator, state, run_dir, model_cfg = job.cfg, job.accelerator, job.state, job.run_dir, job.model_cfg
    catalogue, counts = job.catalogue, job.counts
    if not validates(cfg):
        state.best_step = state.step
        save_best(accelerator, job.model, run_dir, state, {})
    elif state.last_eval_step != state.step:
        do_eval(cfg, accelerator, job.model, job.valid_dl, state, run_dir, catalogue)
    sd = load_file(str(run_dir / "best" / "model.safetensors"))
    with no_zero3_init(accelerator):
        plain = SeqRecModel(model_cfg, text_model_path=str(job.text_path) if job.text_path else None, load_text_weights=False)
    plain.load_state_dict(sd, strict=True)
    # the training catalogue serves the plain copy: its frozen features as they are; text_mode pool computes its
    # token states again from the best weights' encoder and basis, once
    plain.to(accelerator.device).eval()
    if plain.uses_text and model_cfg.text_mode == "pool":
        catalogue.prepare(plain)
    state.tick()
    metrics = {"best_step": state.best_step, "steps": state.step, "max_steps": job.max_steps,
               "stopped_by": state.stopped_by or None, "examples_seen": state.examples_seen,
               "train_wall_s": None if state.wall_s is None else round(state.wall_s, 1), "train_through": cfg.train_through}
    if cfg.optim.schedule == "wsd":  # where the lr decay began: the default window's start, or where the budget placed it
        metrics["decay_start"] = state.decay_start if state.decay_start >= 0 else wsd_window(cfg, job.max_steps)[0]
    splits = [x for x in held_out_splits(cfg.train_through) if x == "valid" or cfg.evaluate_test]
    for split in splits:
        dl = accelerator.prepare(_eval_loader(cfg, job.prep, split, model_cfg.max_len, cfg.final_eval_max_users))
        m = evaluate(accelerator, dl, model_scorer(plain, catalogue=catalogue), beyond=(counts, KS[0]))
        b = evaluate(accelerator, dl, MostPopular(counts).scores, beyond=(counts, KS[0]))
        print0(f"[{split}] final model (step {state.best_step}) | {format_metrics(m)} | {format_beyond(m, KS[0])}")
        print0(f"[{split}] most_popular             | {format_metrics(b)} | {format_beyond(b, KS[0])}")
        metrics[split] = m
        metrics[f"{split}_most_popular"] = b
        job.release_pages()
    if accelerator.is_main_process:
        extra = {"run_name": cfg.run_name, "step": state.best_step}
        warm = job.warm
        if warm is None and (run_dir / WARM_START).is_file():  # a resumed warm-started run: keep the lineage
            warm = json.loads((run_dir / WARM_START).read_text())
        if warm:
            extra["warm_start"] = {k: warm[k] for k in ("init_from", "model_version", "data_version", "items_carried",
                                                         "items_new", "items_dropped")}
        # rank 0 alone builds the item tower to save it: under ZeRO-3, transformers' zero.Init would wait for the
        # other ranks in a collective they never enter (a hang), so the export builds modules whole
        with no_zero3_init(accelerator):
            info = export_final(run_dir / "final", sd, model_cfg, job.text_path, cfg, job.prep.manifest, metrics, extra=extra,
                                item_ids=[str(x) for x in job.prep.items.data.table.column("item_id").to_pylist()])
        atomic_write_json(run_dir / "metrics.json", metrics)
        if state.stopped_by != "max_train_wall_s":  # a run cut by its wall budget goes on when launched again
            atomic_write_json(run_dir / FINISHED, {"settings": launch_settings(cfg), "data_version": job.prep.version,
                                                   "model_version": info["model_version"], "best_step": state.best_step,
                                                   "steps": state.step, "stopped_by": state.stopped_by or None})
        print0(f"[train] exported {run_dir / 'final'} (model_version {info['model_version']})")
    accelerator.wait_for_everyone()


def _eval_loader(cfg, prep, split: str, max_len: int, max_users: int):
    ex = EvalExamples.build(prep.sequences, split, max_len, max_users)
    return torch.utils.data.DataLoader(ex, batch_size=cfg.eval_batch_size, collate_fn=ex.collate, num_workers=cfg.num_workers,
                                       generator=torch.Generator().manual_seed(cfg.seed))
