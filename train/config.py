"""Typed config of the train stage: ``configs/train/<job>.yaml`` + dotted ``key=value`` overrides.

    cfg = load_config(TrainConfig, "configs/train/sample.yaml", ["optim.lr=3e-4", "max_steps=200"])

Precision (no/bf16/fp16) and the ZeRO stage are NOT here: they come only from the accelerate config
and the DeepSpeed JSON in launch/ (STYLE.md #4).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

from train.model import RecModelConfig, RecModelHyper


@dataclass
class ModelSection(RecModelHyper):
    """The user-settable part of RecModelConfig (num_items / num_event_types come from the data),
    plus the negative sampling of the training loss."""

    # sampled_softmax: extra negatives per step (shared by the batch), drawn uniformly or by popularity^alpha
    num_negatives: int = 512
    negative_sampling: Literal["uniform", "popularity"] = "uniform"
    popularity_alpha: float = 0.75
    # text_mode top: the cached pooled text features of the whole catalogue are recomputed through the trained
    # layers every this many optimizer steps (and at every evaluation and checkpoint, so a resumed run is exact)
    text_refresh_every: int = 100

    def validate(self) -> None:
        super().validate()
        if self.num_negatives < 0:
            raise ValueError("model.num_negatives must be >= 0")
        if self.text_refresh_every < 1:
            raise ValueError(f"model.text_refresh_every must be >= 1, got {self.text_refresh_every}")

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
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  # cosine/linear decay to lr * min_lr_ratio at max_steps
    grad_clip: float = 1.0  # 0 = off

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must hold 2 numbers, got {self.betas}")


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
    # shortened. For nightly chains that must publish by a set hour and for lent GPUs. 0 = no limit
    max_train_wall_s: float = 0.0
    # warm start: a previous run's final/ (train/export.py::warm_start maps item rows by item_id).
    # Fresh runs only: when the run folder holds a step_<N> checkpoint, resuming from it wins.
    init_from: str = ""
    # frozen text tower: a directory where the encoder's per-item features are kept between runs (the nightly
    # fine-tune and inference share it when they encode on the same kind of device; train/text_cache.py)
    text_feature_cache: str = ""

    def validate(self) -> None:
        for k in ("batch_size", "grad_accum", "eval_batch_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError("set max_steps > 0 or epochs > 0")
        if self.keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        if self.eval_every_epochs < 0:
            raise ValueError(f"eval_every_epochs must be >= 0 (0 = use eval_every), got {self.eval_every_epochs}")
        if self.max_train_wall_s < 0:
            raise ValueError(f"max_train_wall_s must be >= 0 (0 = no limit), got {self.max_train_wall_s}")

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
