"""Typed config of the data_prep stage.

    python -m data_prep --config configs/data_prep/sample.yaml num_proc=2 columns.user_id=uid

Every field is documented here; the YAML files under configs/data_prep/ only set values.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import re
from dataclasses import dataclass, field
from typing import Literal

from lmrec_common.config import ConfigError

DEFAULT_EVENT_TYPES = ["interaction", "view", "click", "cart", "purchase", "rating"]


@dataclass
class ColumnsConfig:
    """Names of the columns in the raw events Parquet (docs/CONTRACTS.md section 1)."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"
    event_type: str = "event_type"  # optional column: absent -> every event is "interaction"
    value: str = "value"  # optional column (rating, dwell time...); validated, not stored in sequences


@dataclass
class DataPrepConfig:
    # --- inputs: a file, a folder (searched recursively for *.parquet, e.g. dt=YYYY-MM-DD/ partitions) or a glob
    events_path: str = ""
    items_path: str = ""
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    item_id_column: str = "item_id"  # id column of the catalogue
    available_column: str = "available"  # optional bool column of the catalogue (false = never recommend)

    # --- output: output_dir/<version>/ is published atomically, then output_dir/LATEST names it
    output_dir: str = ""
    version: str = ""  # "" = auto, UTC time "vYYYYmmddTHHMMSS" (a "-N" suffix if that name exists); explicit = replaced whole

    # --- validation
    timestamp_unit: Literal["auto", "s", "ms", "us", "ns"] = "auto"  # integer/float epochs; auto = per file from the magnitude
    min_timestamp: str = "1990-01-01"  # ISO date/time (UTC) or epoch seconds; earlier -> quarantine timestamp_out_of_range
    max_timestamp: str = "2100-01-01"  # same; later -> quarantine
    event_types: list[str] = field(default_factory=lambda: list(DEFAULT_EVENT_TYPES))  # known types (lower-cased); others -> quarantine
    dedup: bool = True  # same (user, item, timestamp, event_type) seen again -> quarantine "duplicate" (first occurrence kept)
    unknown_items: Literal["quarantine", "keep"] = "quarantine"  # events whose item has no catalogue row
    # more than this share of the events quarantined stops the run before publishing, naming the reason and the key
    # to check (a copied config's event types or timestamp window); 1 = publish whatever is left
    max_quarantined_share: float = 0.5
    on_bad_file: Literal["error", "skip"] = "error"  # corrupt/0-byte Parquet: stop, or skip and list it in manifest skipped_files
    # string ids (users and items, events and catalogue alike): exact = kept byte for byte (" 42", "042" and "42" are
    # three users); trim = leading/trailing whitespace removed; trim_zeros = also leading zeros of all-digit ids
    # ("007" -> "7"). Whatever the mode, manifest counts.ids_* say how many events' ids had whitespace or leading
    # zeros, and a warning names this key when exact keeps them apart.
    id_normalization: Literal["exact", "trim", "trim_zeros"] = "exact"
    # keyed pseudonymisation of user ids (data_prep/pseudonym.py): the NAME of an environment variable holding the
    # secret key (e.g. LMREC_USER_KEY), never the key itself. Set: every user id written under output_dir (sequences,
    # serving, quarantine, _cache, the forget ledger) is HMAC-SHA256(key, id) as 32 hex characters, so training,
    # checkpoints and tables see only pseudonyms; the manifest records the variable's name and a key fingerprint,
    # and a later run with another key, or with this key empty, is refused. "" = raw ids
    pseudonymize_user_ids_key_env: str = ""

    # --- input completeness (nightly runs): a log that has not fully landed must not become tonight's data.
    # expect_events_through: the UTC date (YYYY-MM-DD) the usable events must reach, e.g. the day before the table's
    # run_date (launch/slurm/nightly_chain.sh: EVENTS_LAG_DAYS); "" = no check. The run stops before publishing when no
    # usable event falls on that day or later, or when that day holds fewer usable events than min_day_share x the
    # median of the baseline_days days before it (a partition that landed in part). Either way the message names the
    # day, its count and the baseline; the manifest's counts.events_by_day holds the recent daily counts
    expect_events_through: str = ""
    min_day_share: float = 0.5  # 0 = one usable event on the day is enough
    baseline_days: int = 7  # the days before expect_events_through whose median usable events is its expected volume
    # what an incomplete log does: error = exit 3, nothing published, LATEST unchanged; keep_previous = a warning,
    # exit 0, LATEST stays the previous version (tonight's table is then made from it, and the morning check with
    # check.expect_events_through says so). With no previous version it is exit 3 either way
    on_incomplete: Literal["error", "keep_previous"] = "error"

    # --- item text
    item_text_template: str = "{title}"  # Python str.format over catalogue columns; null/missing fields render empty
    item_text_unescape_html: bool = True  # decode HTML entities in the fields (&amp; -> &): scraped catalogues carry them
    tokenizer: str = "bundled:all-MiniLM-L6-v2"  # lmrec_common.models.resolve_model_path spec; never downloaded
    max_text_tokens: int = 64  # input_ids truncated to this many tokens, special tokens included

    # --- splits (docs/CONTRACTS.md section 2)
    split: Literal["leave_last_out", "time"] = "leave_last_out"
    time_cutoff: str = ""  # split=time: UTC date "YYYY-MM-DD"; train = before it, test = first event on that day

    # --- output layout and execution
    num_shards: int = 8  # sequences shards; make it a multiple of your largest world size (train/inference ranks)
    num_proc: int = 0  # worker processes for validation/tokenisation; 0 = all CPU cores
    batch_size: int = 200_000  # rows per validation batch (the memory work unit inside one file)
    incremental: bool = True  # reuse per-file validation and per-text tokenisation cached under output_dir/_cache

    # --- engine: where the global part runs (validation, dedup, vocabularies, per-user order, splits); docs/SPARK.md.
    # local = this process and num_proc workers (numpy/pyarrow, HF Datasets; up to a few billion events on one node);
    # spark = Apache Spark (pip install 'lmrec[spark]' + Java 17+) for logs that outgrow one node: the same
    # prepared/<version>/, every other key meaning the same; the per-file validation cache (incremental) is not used
    engine: Literal["local", "spark"] = "local"
    # engine=spark: the master URL (spark://host:7077, yarn, k8s://..., local[4]); "" = the one spark-submit was given,
    # else local[2]; ignored with engine=local. Spark settings (memory, executors) come from spark-submit /
    # spark-defaults.conf as usual
    spark_master: str = ""

    def validate(self) -> None:
        # lmrec_common.config returns a command-line Literal value as its internal str subclass,
        # which yaml.safe_dump (save_config) cannot represent: normalise to plain str.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, str) and type(v) is not str:
                setattr(self, f.name, str(v))
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1 (a multiple of your largest world size), got {self.num_shards}")
        if self.num_proc < 0:
            raise ValueError(f"num_proc must be >= 0 (0 = all cores), got {self.num_proc}")
        if self.max_text_tokens < 2:
            raise ValueError(f"max_text_tokens must be >= 2 (room for the special tokens), got {self.max_text_tokens}")
        if not 0.0 <= self.max_quarantined_share <= 1.0:
            raise ValueError(f"max_quarantined_share must be in [0, 1], got {self.max_quarantined_share}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.event_types:
            raise ValueError("event_types must list at least one event type")
        self.event_types = [t.strip().lower() for t in self.event_types]
        if len(set(self.event_types)) != len(self.event_types):
            raise ValueError(f"event_types has duplicates: {self.event_types}")
        if len(self.event_types) > 127:
            raise ValueError("event_types: at most 127 types (stored as int8)")
        if self.split == "time" and not self.time_cutoff:
            raise ValueError("split=time needs time_cutoff (a UTC date, e.g. 2026-11-26)")
        if self.pseudonymize_user_ids_key_env and not re.fullmatch(r"[A-Z_][A-Z0-9_]{0,127}", self.pseudonymize_user_ids_key_env):
            raise ValueError("pseudonymize_user_ids_key_env must be the name of an environment variable (upper-case "
                             "letters, digits, '_', e.g. LMREC_USER_KEY) that holds the key; never the key itself")
        if self.expect_events_through:
            try:
                _dt.date.fromisoformat(self.expect_events_through)
            except ValueError:
                raise ValueError(f"expect_events_through must be a UTC date YYYY-MM-DD, got {self.expect_events_through!r}") from None
        if not 0.0 <= self.min_day_share <= 1.0:
            raise ValueError(f"min_day_share must be in [0, 1], got {self.min_day_share}")
        if not 1 <= self.baseline_days <= 60:
            raise ValueError(f"baseline_days must be in [1, 60], got {self.baseline_days}")
        if "/" in self.version or self.version.startswith("."):
            raise ValueError(f"version must be a plain folder name, got {self.version!r}")

    def require_paths(self) -> None:
        """Checked at run time (not at load) so that configs with placeholders still load in tests."""
        for key in ("events_path", "items_path", "output_dir"):
            if not getattr(self, key):
                raise ConfigError(f"data_prep config: {key} is empty; set it in the YAML or as {key}=...")


def as_dict(cfg: DataPrepConfig) -> dict:
    return dataclasses.asdict(cfg)
