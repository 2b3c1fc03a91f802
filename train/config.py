"""Typed config of the train stage: ``configs/train/<job>.yaml`` + dotted ``key=value`` overrides.

    cfg = load_config(TrainConfig, "configs/train/sample.yaml", ["optim.lr=3e-4", "max_steps=200"])

Precision (no/bf16/fp16) and the ZeRO stage are NOT here: they come only from the accelerate config
and the DeepSpeed JSON in launch/ (STYLE.md #4).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Literal

from train.model import RecModelConfig, RecModelHyper

SEED_MAX = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds numpy too)


def check_ranges(obj, ints: dict[str, int], nonneg_floats: tuple[str, ...] = (), positive_floats: tuple[str, ...] = ()) -> None:
    """ValueError naming the first field out of range: ``ints`` maps an int field to its minimum; float fields must
    be finite and >= 0 (``nonneg_floats``) or > 0 (``positive_floats``). ``_build`` prefixes the section."""
    for k, lo in ints.items():
        v = getattr(obj, k)
        if v < lo:
            raise ValueError(f"{k} must be >= {lo}, got {v}")
    for k in nonneg_floats + positive_floats:
        v = getattr(obj, k)
        if not math.isfinite(v) or v < 0 or (k in positive_floats and v == 0):
            raise ValueError(f"{k} must be a finite number {'> 0' if k in positive_floats else '>= 0'}, got {v}")


@dataclass
class ModelSection(RecModelHyper):
    """The user-settable part of RecModelConfig (num_items / num_event_types come from the data),
    plus the negative sampling of the training loss."""

    # sampled_softmax: extra negatives per step (shared by the batch), drawn uniformly or by popularity^alpha
    num_negatives: int = 512
    negative_sampling: Literal["uniform", "popularity"] = "uniform"
    popularity_alpha: float = 0.75

    def validate(self) -> None:
        super().validate()
        check_ranges(self, {"num_negatives": 0}, nonneg_floats=("popularity_alpha",))

    def rec_config(self, num_items: int, num_event_types: int, pad_token_id: int = 0) -> RecModelConfig:
        keep = {k: getattr(self, k) for k in RecModelHyper.hyper_names()}
        return RecModelConfig(num_items=num_items, num_event_types=num_event_types, pad_token_id=pad_token_id, **keep)


@dataclass
class OptimSection:
    lr: float = 1e-3
    text_lr: float = 0.0  # lr of the text encoder's trainable weights (lora/full); 0 = same as lr
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    warmup_steps: int = 100
    # cosine / linear: decay over max_steps (from epochs); constant; plateau: constant, multiplied by
    # plateau_factor each time validation NDCG@10 has not improved for plateau_patience evaluations (the
    # data at hand, not a step count, says when to anneal; early stopping ends the run); wsd (warmup-stable-decay):
    # constant after the warm-up, then a 1 - sqrt(t) decay to min_lr_ratio over the last decay_fraction of the run.
    # With max_train_wall_s the budget shortens the schedule instead of cutting it: when (1 - decay_fraction) of the
    # budget is spent and max_steps would not fit in it, the decay starts there, sized from the measured seconds per
    # step to end at the deadline, and the run ends with it (a nightly fine-tune that must publish by a set hour)
    schedule: Literal["cosine", "linear", "constant", "plateau", "wsd"] = "cosine"
    decay_fraction: float = 0.2  # schedule wsd: share of the run (steps, or the wall budget when that ends first) spent decaying
    min_lr_ratio: float = 0.0  # cosine/linear decay to lr * min_lr_ratio at max_steps; plateau: the lowest multiplier
    plateau_factor: float = 0.3
    plateau_patience: int = 1
    grad_clip: float = 1.0  # 0 = off

    def validate(self) -> None:
        check_ranges(self, {"warmup_steps": 0, "plateau_patience": 1},
                     nonneg_floats=("text_lr", "weight_decay", "min_lr_ratio", "grad_clip"),
                     positive_floats=("lr", "eps"))
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must hold 2 numbers in [0, 1), got {self.betas}")
        if self.min_lr_ratio > 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if not 0.0 < self.plateau_factor < 1.0:
            raise ValueError(f"plateau_factor must be in (0, 1), got {self.plateau_factor}")


@dataclass
class TrainConfig:
    data: str = "work/prepared/sample"  # prepared/<version>/ folder of data_prep
    output_dir: str = "work/checkpoints"  # checkpoints root; the run lives in output_dir/run_name
    run_name: str = "sample"
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    batch_size: int = 128  # per-process micro batch (sequences)
    grad_accum: int = 1
    global_batch_size: int = 0  # optional check: must equal batch_size * grad_accum * world_size (0 = not checked)
    max_steps: int = 0  # optimizer steps; 0 = derived from epochs
    epochs: int = 10
    eval_every: int = 200  # optimizer steps; 0 = only at the end
    eval_every_epochs: float = 0.0  # > 0: evaluate every this many epochs of the data at hand instead (sets eval_every)
    eval_batch_size: int = 256
    eval_max_users: int = 0  # 0 = all validation users; > 0 evaluates a fixed subset during training (final eval uses all)
    # the final evaluation (best weights, valid and test), split across ranks: 0 = every user; > 0 a fixed, evenly
    # spaced subset of this many users per split (at shop scale every user is a nightly table's worth of ranking)
    final_eval_max_users: int = 0
    early_stopping_patience: int = 10  # evaluations without a better validation NDCG@10; 0 = off
    save_every: int = 500  # optimizer steps; 0 = only on signals and at the end
    keep_last: int = 2  # step_<N>/ folders kept
    resume: Literal["auto", "never"] = "auto"
    seed: int = 1234
    log_every: int = 20
    num_workers: int = 0
    tracker: Literal["tensorboard", "none"] = "tensorboard"
    evaluate_test: bool = True  # test metrics of the exported (best) model, reported only, never used to choose
    # which events are training data: "train" (the split's training part; validation picks best/, early stopping);
    # "valid" (a refit: also each user's validation target; no validation, final/ = the last step, test still held
    # out); "test" (a production refit: every event, nothing evaluated). Take max_steps from a "train" run.
    train_through: Literal["train", "valid", "test"] = "train"
    requeue_on_signal: bool = True  # rank 0 runs `scontrol requeue $SLURM_JOB_ID` after a signal-triggered save
    stop_after_steps: int = 0  # simulate a pre-emption after this step (tests, drills): save and exit 124
    # a deadline: once the run's training wall time (all its launches) reaches this many seconds, training ends
    # as at max_steps (validate, best/ -> final/, test) and metrics.json says so; the schedule is not
    # shortened, except with optim.schedule wsd, whose decay the budget places so that it ends at the deadline.
    # For nightly chains that must publish by a set hour and for lent GPUs. 0 = no limit
    max_train_wall_s: float = 0.0
    # warm start: a previous run's final/ (train/export.py::warm_start maps item rows by item_id).
    # Fresh runs only: when the run folder holds a step_<N> checkpoint, resuming from it wins.
    init_from: str = ""
    # frozen text tower: a directory where the encoder's per-item features are kept between runs (the nightly
    # fine-tune and inference share it when they encode on the same kind of device; train/text_cache.py)
    text_feature_cache: str = ""

    def validate(self) -> None:
        # 0 where a field's comment gives 0 a meaning (derived, off, all); 1 where a count or cadence must be real
        check_ranges(self, {"batch_size": 1, "grad_accum": 1, "eval_batch_size": 1, "log_every": 1, "keep_last": 1,
                            "global_batch_size": 0, "max_steps": 0, "epochs": 0, "eval_every": 0, "eval_max_users": 0,
                            "final_eval_max_users": 0,
                            "early_stopping_patience": 0, "save_every": 0, "num_workers": 0, "stop_after_steps": 0,
                            "seed": 0},
                     nonneg_floats=("eval_every_epochs", "max_train_wall_s"))
        if self.seed > SEED_MAX:
            raise ValueError(f"seed must be <= {SEED_MAX}, got {self.seed}")
        if self.max_steps == 0 and self.epochs == 0:
            raise ValueError("set max_steps > 0 or epochs > 0")
        if self.optim.schedule == "plateau" and (self.train_through != "train" or not (self.eval_every or self.eval_every_epochs)):
            raise ValueError("optim.schedule plateau follows validation: it needs train_through train and eval_every or "
                             "eval_every_epochs > 0 (a refit has no validation: take cosine and max_steps from a plateau run)")

    def identity(self) -> dict:
        """What makes two launches the SAME run (resume allowed): model, optimisation, batch, seed.
        Step limits, eval/save cadence and logging may change between resumes."""
        ident = {
            "run_name": self.run_name,
            "model": self.model.__dict__,
            "optim": self.optim.__dict__,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "seed": self.seed,
        }
        if self.init_from:  # only when set: run folders of cold runs keep their hash
            ident["init_from"] = self.init_from
        if self.train_through != "train":  # the same: other training data, another run
            ident["train_through"] = self.train_through
        return ident

    def identity_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def plain_config(cfg: TrainConfig) -> TrainConfig:
    """A copy whose values are plain Python types: Literal values parsed from ``key=value`` overrides
    arrive as str subclasses that yaml.safe_dump refuses (train_config.yaml must stay dumpable)."""
    from lmrec_common.config import config_from_dict, to_dict

    return config_from_dict(TrainConfig, json.loads(json.dumps(to_dict(cfg))))
