"""Typed config of the online service (inference/serve).

    python -m inference.serve --config configs/serve/sample.yaml [key=value ...]

Every field is documented here; the YAML files under configs/serve/ only set values. Two ways to name what is
served (exactly one):
- ``follow_recs: <recs root>``: the model and the prepared version of the newest published nightly table under that
  root (its ``_manifest.json``), with the table's own scoring settings (exclusions, cold items, fallback, history
  length): the service answers as the table does and moves to the next model when the next table is published;
- ``model_dir`` + ``prepared_dir``: a final/ and a prepared folder (or root with LATEST), with the scoring settings
  below (same meaning and defaults as the nightly inference config, inference/config.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from inference.config import InferenceConfig
from lmrec_common.config import ConfigError

# the scoring settings shared with the nightly inference config: same names, same meaning, same defaults
# (tests/test_serve.py checks the defaults agree); with follow_recs they are taken from the table's manifest
SHARED_WITH_INFERENCE = ("exclude_seen", "exclude_unavailable", "cold_item_ids", "fallback_days", "max_history",
                         "topk_method", "score_dtype", "item_batch_size", "text_feature_cache")


@dataclass
class ServeConfig:
    # --- what is served (one of the two)
    follow_recs: str = ""  # a nightly output_dir (recs root): serve the model + data of its newest dt= table
    follow_variant: str = ""  # with follow_recs and an A/B table: the variant whose model to serve ("" = the first)
    # with follow_recs: serve only a table whose morning check passed (python -m inference.check's report at
    # <follow_recs>/_checks/dt=<date>.json says ok, for that very run folder): a new table that fails its check, or
    # has not been checked yet, is not loaded, and the service stays on (or goes back to) the newest one that passed
    follow_checked: bool = False
    model_dir: str = ""  # checkpoints/<run>/final (train/export.py)
    prepared_dir: str = ""  # prepared/<version> or a prepared root holding LATEST: tonight's catalogue and popularity
    run_date: str = ""  # YYYY-MM-DD for fallback_days > 0 (the window ends that day); "" = today (UTC) at load
    # --- scoring, as in inference/config.py (model_dir mode; follow_recs takes the first five from the table)
    exclude_seen: bool = True  # leave the history's items out of /v1/recommend
    exclude_unavailable: bool = True  # leave catalogue items with available == false out
    cold_item_ids: Literal["text", "nearest"] = "text"  # items without training events: text alone, or a warm twin's id row
    fallback_days: int = 0  # fallback popularity: 0 = training events, N = events of the N days ending run_date
    max_history: int = 0  # events fed to the user tower; 0 = the model's max_len
    topk_method: Literal["auto", "topk", "blockmax"] = "auto"  # inference/topk.py
    score_dtype: Literal["float32", "bfloat16"] = "float32"  # dtype of the user x items product
    item_batch_size: int = 256  # items per text-encoder call when encoding the catalogue at load
    text_feature_cache: str = ""  # read only here: the nightly job keeps it up to date
    # --- requests
    default_k: int = 20  # k when a request gives none
    max_k: int = 1000  # larger k: 422 naming the field
    max_history_items: int = 10_000  # longer history / exclude lists: 422 (the tower reads the latest max_len anyway)
    max_query_chars: int = 1000  # longer search queries: 422
    max_body_bytes: int = 1 << 20  # larger request bodies: 413
    # event type of history items a request gives without event_types ("" = the prepared manifest's first one)
    default_event_type: str = ""
    # --- search: score = (1 - w) * z(<query, text vector>) + w * z(<user, item vector>), each standardised over the
    # catalogue's candidates (mean 0, std 1); w = search_history_weight: 0 = plain text search, 1 = history only.
    # Chosen on the validation targets of the sample and two Amazon sets (docs/SERVE.md, bench/search_eval.py).
    # A request's history_weight overrides it.
    search_history_weight: float = 0.4
    # Optional, per catalogue: a weight of its own for broad queries, the ones many items meet about equally ("comedy",
    # "garden"). A query's sharpness is its best item's z-score minus its tenth best's; w = search_broad_history_weight
    # at or below the low end of search_sharpness_range, search_history_weight at or above its high end, linear between.
    # null = one weight for every query. Calibrate both on your validation targets with bench/search_eval.py
    # --query-from title,attribute: the sharpness of an item-naming query differs between catalogues, so a rule fitted
    # on one can cost on another (docs/SERVE.md "Broad queries").
    search_broad_history_weight: float | None = None
    search_sharpness_range: tuple[float, float] = (1.0, 2.0)  # [low, high] sharpness, with search_broad_history_weight
    # the space <query, text vector> is taken in: "encoder" = the frozen text encoder's own sentence space (cosine of
    # pooled outputs, what all-MiniLM-L6-v2 was trained for; text_mode frozen and pool), "model" = the item tower's text
    # part (the recommender's learned map of the text), "auto" = encoder when the encoder is frozen, else model.
    # Measured side by side in docs/SERVE.md (bench/search_eval.py --spaces encoder,model)
    search_text_space: Literal["auto", "encoder", "model"] = "auto"
    search_exclude_seen: bool = True  # search results leave out the items of the given history
    # --- server
    host: str = "127.0.0.1"  # loopback only by default: put a proxy in front to expose it
    port: int = 8080
    compute_threads: int = 2  # requests scored at once (each in its own thread); more wait their turn
    num_threads: int = 1  # torch intra-op threads per scoring thread
    reload_poll_s: float = 30.0  # how often to look for a newly published model/table (0 = never; SIGHUP = now)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = False

    def validate(self) -> None:
        if bool(self.follow_recs) == bool(self.model_dir):
            raise ValueError("name what to serve: follow_recs (a nightly recs root) or model_dir + prepared_dir, not both"
                             if self.follow_recs else "model_dir is empty: set follow_recs (a nightly recs root) or "
                             "model_dir + prepared_dir")
        if self.model_dir and not self.prepared_dir:
            raise ValueError("prepared_dir is empty: model_dir needs the prepared data of tonight's catalogue")
        if self.follow_variant and not self.follow_recs:
            raise ValueError("follow_variant needs follow_recs")
        if self.follow_checked and not self.follow_recs:
            raise ValueError("follow_checked needs follow_recs (it picks among the nightly tables)")
        for key in ("default_k", "max_k", "max_history_items", "max_query_chars", "max_body_bytes", "compute_threads",
                    "num_threads", "item_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("fallback_days", "max_history"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.default_k > self.max_k:
            raise ValueError(f"default_k {self.default_k} exceeds max_k {self.max_k}")
        if self.max_k > 32767:
            raise ValueError(f"max_k must be <= 32767 (the table's rank is int16), got {self.max_k}")
        for key in ("search_history_weight", "search_broad_history_weight"):
            if getattr(self, key) is not None and not (0.0 <= getattr(self, key) <= 1.0):
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        r = self.search_sharpness_range
        if len(r) != 2 or not all(math.isfinite(x) for x in r) or not 0 <= r[0] < r[1]:
            raise ValueError(f"search_sharpness_range must be [low, high] with 0 <= low < high, got {list(r)}")
        if not (math.isfinite(self.reload_poll_s) and self.reload_poll_s >= 0):
            raise ValueError(f"reload_poll_s must be a number >= 0, got {self.reload_poll_s}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.run_date:
            InferenceConfig(run_date=self.run_date).validate()

    def checked(self) -> "ServeConfig":
        try:
            self.validate()
        except ValueError as e:
            raise ConfigError(f"serve config: {e}") from None
        return self

    def inference_config(self, model_dir: str, prepared_dir: str) -> InferenceConfig:
        """The nightly config whose scoring settings these are (for the shared functions of inference/run.py)."""
        return InferenceConfig(model_dir=model_dir, prepared_dir=prepared_dir, run_date=self.run_date,
                               **{k: getattr(self, k) for k in SHARED_WITH_INFERENCE})
