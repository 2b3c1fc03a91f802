"""Typed config of the nightly inference stage.

    accelerate launch -m inference --config configs/inference/nightly.yaml run_date=2026-11-27 k=50

Every field is documented here; the YAML files under configs/inference/ only set values.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, field
from typing import Literal

from lmrec_common.config import ConfigError

DEFAULT_VARIANT = "default"  # the variant column when the config names one model (model_dir)
SHARE_TOLERANCE = 1e-6


@dataclass
class VariantConfig:
    """One arm of an A/B test: a model and the share of users it serves (inference/run.py assign_variants)."""

    name: str = ""  # the table's `variant` value: letters, digits, '_', '-', '.'
    model_dir: str = ""  # checkpoints/<run>/final of this arm's model
    share: float = 0.0  # fraction of users in (0, 1]; the variants' shares sum to 1

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name or ""):
            raise ValueError(f"name must be a non-empty word of letters, digits, '_', '-', '.', got {self.name!r}")
        if not self.model_dir:
            raise ValueError("model_dir is empty: name the final/ folder of this variant's model")
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"share must be in (0, 1], got {self.share}")


@dataclass
class GateConfig:
    """The promotion gate (inference/gate.py, ``python -m inference.gate``): does tonight's fine-tuned model replace the
    one that ``model_dir`` (then a symlink, the serving link) points at? Unused by the nightly table itself."""

    candidate: str = ""  # tonight's final/ (set per night: gate.candidate=checkpoints/<run>/final)
    split: Literal["valid", "test"] = "valid"  # the held-out event per user both models are ranked on (prepared data)
    max_users: int = 100000  # an evenly spaced, deterministic subset of that split's users; 0 = every user
    metric: str = "NDCG@10"  # HR@K or NDCG@K (K in 10, 50, 200) or MRR: what the rule compares
    # promoted only if metric(candidate) >= metric(incumbent) x (1 - max_relative_drop) ...
    max_relative_drop: float = 0.02
    # ... and metric(candidate) > metric(most popular by tonight's training events) x min_ratio_over_popular
    # (a model that does not beat popularity is broken, whatever the incumbent does)
    min_ratio_over_popular: float = 1.0
    # ... and its users' top-10 lists cover at least this fraction of the incumbent's coverage of the catalogue (a model
    # that collapses onto a few items can keep its accuracy); 0 = no check
    min_coverage_ratio: float = 0.5
    report: str = ""  # where the decision is written (JSON); "" = gate.json beside the candidate (checkpoints/<run>/)
    # a candidate that cannot be judged: no export (tonight's training failed, timed out or was cancelled) or one that
    # fails its integrity check. "error" = one line, exit 2 (nothing after the gate runs); "keep_incumbent" = the
    # serving model writes tonight's table (decision kept_incumbent, exit 0; with no usable incumbent, exit 3).
    # launch/slurm/nightly_chain.sh sets keep_incumbent and starts the gate once training has ended, however it ended
    unusable_candidate: Literal["error", "keep_incumbent"] = "error"

    def validate(self) -> None:
        if self.max_users < 0:
            raise ValueError(f"max_users must be >= 0, got {self.max_users}")
        if not 0.0 <= self.max_relative_drop < 1.0:
            raise ValueError(f"max_relative_drop must be in [0, 1), got {self.max_relative_drop}")
        if not 0.0 <= self.min_coverage_ratio <= 1.0:
            raise ValueError(f"min_coverage_ratio must be in [0, 1], got {self.min_coverage_ratio}")
        if self.min_ratio_over_popular < 0:
            raise ValueError(f"min_ratio_over_popular must be >= 0, got {self.min_ratio_over_popular}")
        if not re.fullmatch(r"(HR|NDCG)@(10|50|200)|MRR", self.metric):
            raise ValueError(f"metric must be HR@K or NDCG@K with K in 10, 50, 200, or MRR; got {self.metric!r}")


@dataclass
class CheckConfig:
    """The morning check of a published table (inference/check.py, ``python -m inference.check``). Unused by the table."""

    report: str = ""  # where the verdict is written (JSON); "" = <output_dir>/_checks/dt=<run_date>.json
    # the UTC date (YYYY-MM-DD) tonight's prepared data must reach (data_prep's expect_events_through): a table made
    # from data whose newest usable event is older (a log that had not landed, data_prep on_incomplete=keep_previous)
    # is a problem ("fresh"). "" = not checked
    expect_events_through: str = ""
    # a Prometheus text-format file written (atomically) with the verdict and the table's figures, for node_exporter's
    # textfile collector or a Pushgateway (e.g. /var/lib/node_exporter/textfile/lmrec_<table>.prom; series labelled
    # with table = output_dir). "" = none
    metrics_file: str = ""
    # --- against the previous night's table (the newest dt= under output_dir at most previous_max_age_days before
    # run_date; none = not compared, said so). A table can be whole and wrong in what it holds: a model that learned
    # nothing or collapsed, a catalogue or id mismatch, a log that lost users. Each rule below is a problem ("content")
    # when it fails; 0 (1 for max_fallback_rise) turns it off
    compare_previous: bool = True
    previous_max_age_days: int = 7
    # tonight's table serves fewer than this fraction of the previous table's users (with a short active_since_days
    # window the served users follow the week's rhythm: lower it to what a quiet day gives)
    min_users_ratio: float = 0.9
    # its lists hold fewer distinct items than this fraction of the previous table's (same K): a collapse onto few
    # items. On the sample: a retrain 1.01, an ids-only model replacing the hybrid 0.40 (a change worth knowing of,
    # not a fault), a model trained one step 0.46
    min_items_ratio: float = 0.25
    # the share of users served the popularity fallback rose by more than this (0.05 = 5 points): the model does not
    # know their history items
    max_fallback_rise: float = 0.05
    # the users served by the model on both nights keep, on average, less than this fraction of their top-10 items
    # beyond what two unrelated lists share by chance (10 / eligible items): lists unrelated to last night's (a model
    # that learned nothing, a mixed-up export). Measured on the sample (2026-12-08, docs/RELIABILITY.md section 9):
    # a retrain with another seed 0.79, an ids-only model replacing the hybrid 0.15, a model trained one step 0.004
    min_top10_overlap: float = 0.05

    def validate(self) -> None:
        if self.previous_max_age_days < 1:
            raise ValueError(f"previous_max_age_days must be >= 1, got {self.previous_max_age_days}")
        for key in ("min_users_ratio", "min_items_ratio", "max_fallback_rise", "min_top10_overlap"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)}")


@dataclass
class InferenceConfig:
    # --- inputs
    model_dir: str = ""  # checkpoints/<run>/final (train/export.py); loaded alone. Empty when `variants` names the models
    # A/B test: several models, each user served by exactly one, chosen by a salted hash of the user id (stable across
    # nights, whatever the row order or number of ranks). Empty = model_dir serves everyone (variant "default")
    variants: list[VariantConfig] = field(default_factory=list)
    bucket_salt: str = ""  # required with 2+ variants; a new salt reshuffles every user (a new experiment)
    prepared_dir: str = ""  # prepared/<version> or a prepared root holding LATEST (tonight's data)
    # --- output: output_dir/_runs/dt=<run_date>/run=<run_id>/ (part-*.parquet, _manifest.json, _SUCCESS), and the
    # symlink output_dir/dt=<run_date> -> the current run's folder (docs/CONTRACTS.md section 4)
    output_dir: str = "recs"
    run_date: str = ""  # YYYY-MM-DD (UTC); "" = today (UTC)
    # a run folder replaced by a rerun of its date stays this long (seconds), so that readers that resolved the link
    # before the rerun finish reading it; a later run (of any date) removes it after that. 0 = at once
    replaced_run_grace_s: int = 86400
    k: int = 100  # recommendations per user
    # --- what may be recommended
    exclude_seen: bool = True  # drop every item in the user's whole history
    exclude_unavailable: bool = True  # drop catalogue items with available == false
    # items without training events (new since training, or never interacted with), hybrid models:
    #   text    = scored from their text alone (warm items also get their learned id term: new items rank low)
    #   nearest = each borrows the id row of the warm item nearest in the model's text space
    #             (train/catalogue.py Catalogue.borrow_cold_ids): more new items in the lists, a little less accuracy on
    #             the rest (ML-1M cold start, docs/RESULTS.md); id-only / text-only models: must stay text
    cold_item_ids: Literal["text", "nearest"] = "text"
    active_since_days: int = 0  # > 0: only users with an event in the last N days before run_date (inclusive); 0 = every user prepared
    # users the model cannot score (no history item it knows: e.g. every event on an item missing from the catalogue)
    # get the most popular items instead (source = fallback), seen and unavailable items excluded. Popularity =
    # events in the N days ending with run_date over every prepared history; 0 = the items' training events
    fallback_days: int = 0
    max_history: int = 0  # events fed to the user tower; 0 = the model's max_len (what it was trained with)
    # --- compute
    user_batch_size: int = 1024  # users scored at once: memory holds user_batch_size x item_chunk float32 scores
    score_budget_mb: int = 1024  # caps that score block: item_chunk = budget / (4 bytes x user_batch_size)
    topk_method: Literal["auto", "topk", "blockmax"] = "auto"  # inference/topk.py; auto = measured winner by catalogue size
    score_dtype: Literal["float32", "bfloat16"] = "float32"  # dtype of the users x items matmul and of the selection over it; bfloat16 = GPU tensor cores (returned scores float32)
    item_batch_size: int = 256  # items per text-encoder call when encoding the catalogue
    # a directory where the text tower's per-item features are kept between runs (train/text_cache.py): an
    # item whose tokens and encoder are unchanged since the last run is not encoded again. Empty = off
    text_feature_cache: str = ""
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = the device Accelerate assigns this rank
    num_threads: int = 0  # torch CPU threads per rank; 0 = cores / local ranks on CPU (no oversubscription), 1 on a GPU
    # part files per rank, each written by its own thread (chunks dealt round-robin):
    # 0 = auto (1 on CPU; on a GPU up to 4 within the rank's share of cores: one zstd writer is slower than a GPU's top-K)
    write_streams: int = 0
    # chunks of users whose histories a reader thread prepares ahead (Arrow + numpy) while this thread scores
    # the current one; 0 = read in line. Same output either way (chunks are consumed in order)
    prefetch_chunks: int = 2
    # GPU only: queue chunk i+1's user tower and top-K before waiting for chunk i's result (one CUDA stream,
    # pinned copies, an event per chunk), so the host's launch work overlaps the device's top-K. Same table.
    # H200, 1M items x 200k users: 136,986 users/s on against 104,712 off (1.06x / 0.81x of the plain
    # matmul + topk floor; docs/BENCH_INFERENCE.md). No effect on CPU
    overlap_scoring: bool = True
    # --- output format
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    # --- promotion gate (python -m inference.gate, between a nightly fine-tune and this table; the table ignores it)
    gate: GateConfig = field(default_factory=GateConfig)
    # --- morning check (python -m inference.check, after this table: is it there, complete and correct?)
    check: CheckConfig = field(default_factory=CheckConfig)

    def validate(self) -> None:
        if self.k < 1 or self.k > 32767:
            raise ValueError(f"k must be in 1..32767 (rank is int16), got {self.k}")
        if self.user_batch_size < 1:
            raise ValueError(f"user_batch_size must be >= 1, got {self.user_batch_size}")
        if self.score_budget_mb < 1:
            raise ValueError(f"score_budget_mb must be >= 1, got {self.score_budget_mb}")
        if self.item_batch_size < 1:
            raise ValueError(f"item_batch_size must be >= 1, got {self.item_batch_size}")
        for key in ("active_since_days", "fallback_days", "max_history", "num_threads", "write_streams", "prefetch_chunks",
                    "replaced_run_grace_s"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.run_date:
            try:
                d = _dt.date.fromisoformat(self.run_date)
            except ValueError:
                raise ValueError(f"run_date must be YYYY-MM-DD, got {self.run_date!r}") from None
            if d.isoformat() != self.run_date:
                raise ValueError(f"run_date must be YYYY-MM-DD, got {self.run_date!r}")
        if self.variants:
            if self.model_dir:
                raise ValueError(f"model_dir ({self.model_dir}) and variants are both set: name every model under variants "
                                 "(model_dir= on the command line clears it)")
            names = [v.name for v in self.variants]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"variants: name {dup[0]!r} is used twice; each variant needs its own name")
            total = sum(v.share for v in self.variants)
            if abs(total - 1.0) > SHARE_TOLERANCE:
                parts = " + ".join(f"{v.name} {v.share:g}" for v in self.variants)
                raise ValueError(f"variants: the shares must sum to 1, got {total:g} ({parts})")
            if len(self.variants) > 1 and not self.bucket_salt:
                raise ValueError("bucket_salt is empty: an A/B test with several variants needs a salt (any string, kept "
                                 "for the experiment's life; a new salt reshuffles every user)")

    def resolved_variants(self) -> list[VariantConfig]:
        """The models to run, in config order: ``variants``, or model_dir as the single variant "default"."""
        return list(self.variants) or [VariantConfig(name=DEFAULT_VARIANT, model_dir=self.model_dir, share=1.0)]

    def resolved_run_date(self) -> str:
        return self.run_date or _dt.datetime.now(_dt.timezone.utc).date().isoformat()

    def require_paths(self) -> None:
        """Checked at run time (not at load) so that configs with placeholders still load in tests."""
        for key in ("model_dir", "prepared_dir", "output_dir"):
            if key == "model_dir" and self.variants:
                continue
            if not getattr(self, key):
                raise ConfigError(f"inference config: {key} is empty; set it in the YAML or as {key}=...")
