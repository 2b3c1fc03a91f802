"""The prepared-data contract (docs/CONTRACTS.md section 2), importable by the later stages.

    from data_prep.schema import load_prepared
    data = load_prepared("work/prepared/ml1m")       # a version folder, or a root holding LATEST
    data.items["input_ids"][0], data.sequences[0]["item_idx"], data.manifest["counts"]

This module imports only the datasets library, data_prep.sequences and data_prep.pseudonym (no tokenizer, no torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmrec_common.mapped import dataset_files, release_mapped_pages

KIND = "lmrec.prepared"
# 2: serving/ (users served but neither trained on nor evaluated: one usable event, or only events on items missing
# from the catalogue). Version 1 folders (no serving/) are still read: they simply have no such users.
SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
LATEST_FILE = "LATEST"
MANIFEST_FILE = "manifest.json"
ITEMS_DIR = "items"
SEQUENCES_DIR = "sequences"
SERVING_DIR = "serving"
QUARANTINE_DIR = "quarantine"
FORGET_LEDGER = "forget/requests.parquet"  # under the prepared root (output_dir), beside LATEST; data_prep/forget.py

ITEM_COLUMNS = ["item_idx", "item_id", "text", "input_ids", "n_train_events", "in_catalogue", "available"]
SEQUENCE_COLUMNS = ["user_idx", "user_id", "item_idx", "timestamp", "event_type", "train_len", "valid_pos", "test_pos"]
# serving/: one row per user who is in no row of sequences/ but had a usable event (docs/CONTRACTS.md section 2)
SERVING_COLUMNS = ["user_id", "item_idx", "timestamp", "event_type", "last_timestamp", "why"]
SERVING_WHY = ["single_event", "items_not_in_catalogue"]
QUARANTINE_EVENT_COLUMNS = ["user_id", "item_id", "timestamp", "event_type", "value", "source_file", "source_row", "reason"]

# Quarantine / filter reasons (manifest counts use exactly these keys).
EVENT_QUARANTINE_REASONS = [
    "null_user_id",
    "null_item_id",
    "null_timestamp",
    "bad_timestamp",
    "timestamp_out_of_range",
    "unknown_event_type",  # also a null event_type where the column exists
    "item_not_in_catalogue",
    "duplicate",
]
# forgotten: events of users named in the forget ledger (python -m data_prep.forget), dropped from every output,
# quarantine included (a quarantined row of such a user is counted here, not under its quarantine reason)
EVENT_FILTER_REASONS = ["single_event", "forgotten"]
ITEM_QUARANTINE_REASONS = ["null_item_id", "duplicate_item_id"]


class DataPrepError(Exception):
    """Input that cannot be prepared at all (schema error, corrupt file, missing path). The message
    names the file and the column; a row-level problem is a quarantined row instead."""


class InputIncomplete(DataPrepError):
    """The events have not fully landed for the day the run expects (``expect_events_through``): nothing is published
    (``python -m data_prep`` exits 3), or, with ``on_incomplete: keep_previous``, the previous version stays LATEST."""


class PreparedDataError(ValueError):
    """A prepared folder that is missing, incomplete or of an incompatible schema version."""


@dataclass
class PreparedData:
    path: Path  # the version folder
    manifest: dict[str, Any]
    items: Any  # datasets.Dataset, ITEM_COLUMNS, row i has item_idx == i
    sequences: Any  # datasets.Dataset, SEQUENCE_COLUMNS, one row per user
    serving: Any = None  # datasets.Dataset, SERVING_COLUMNS (schema >= 2): users served only; None for a version 1 folder

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def event_types(self) -> list[str]:
        return list(self.manifest["event_types"])


def resolve_prepared(path: str | Path) -> Path:
    """A version folder (has manifest.json) or a prepared root (has LATEST) -> the version folder."""
    p = Path(path)
    if (p / MANIFEST_FILE).is_file():
        return p
    latest = p / LATEST_FILE
    if latest.is_file():
        name = latest.read_text(encoding="utf-8").strip()
        v = p / name
        if not (v / MANIFEST_FILE).is_file():
            raise PreparedDataError(f"{latest} names version {name!r} but {v / MANIFEST_FILE} does not exist")
        return v
    if not p.exists():
        raise PreparedDataError(f"prepared data path {p} does not exist (run python -m data_prep first)")
    raise PreparedDataError(f"{p} is neither a prepared version folder (no {MANIFEST_FILE}) nor a prepared root (no {LATEST_FILE})")


def read_prepared_manifest(path: str | Path) -> dict[str, Any]:
    v = resolve_prepared(path)
    with open(v / MANIFEST_FILE, encoding="utf-8") as f:
        m = json.load(f)
    if m.get("kind") != KIND:
        raise PreparedDataError(f"{v / MANIFEST_FILE}: kind is {m.get('kind')!r}, expected {KIND!r}")
    sv = m.get("schema_version")
    if sv not in READABLE_SCHEMA_VERSIONS:
        raise PreparedDataError(
            f"{v / MANIFEST_FILE}: schema_version {sv} is not supported by this code (reads {list(READABLE_SCHEMA_VERSIONS)}); "
            "re-run python -m data_prep with this code version"
        )
    return m


def load_prepared(path: str | Path) -> PreparedData:
    """Load a prepared version (memory-mapped Arrow; cheap). Checks kind, schema version and columns."""
    import datasets

    v = resolve_prepared(path)
    m = read_prepared_manifest(v)
    out = {}
    parts = [(ITEMS_DIR, ITEM_COLUMNS), (SEQUENCES_DIR, SEQUENCE_COLUMNS)]
    if m.get("schema_version", 1) >= 2:
        parts.append((SERVING_DIR, SERVING_COLUMNS))
    for name, cols in parts:
        d = v / name
        if not d.is_dir():
            raise PreparedDataError(f"{v}: missing {name}/ (incomplete prepared folder)")
        ds = datasets.load_from_disk(str(d))
        missing = [c for c in cols if c not in ds.column_names]
        if missing:
            raise PreparedDataError(f"{d}: missing column(s) {missing}; has {ds.column_names}")
        out[name] = ds
    # opening the shards read every record batch's header through the mapping (a few hundred MiB of pages at 5M
    # users): this process does not need them resident (lmrec_common/mapped.py)
    release_mapped_pages(dataset_files(*out.values()))
    return PreparedData(path=v, manifest=m, items=out[ITEMS_DIR], sequences=out[SEQUENCES_DIR], serving=out.get(SERVING_DIR))


def item_index(prepared: PreparedData):
    """item_id (string) -> item_idx as a pyarrow array usable with ``pc.index_in`` (value_set)."""
    return prepared.items.data.table.column("item_id").combine_chunks()


def encode_histories(prepared: PreparedData, user_ids, item_ids, timestamps, key_env: str | None = None):
    """Map raw events (three equal-length arrays/lists: ids as str or int, timestamps as epoch
    seconds) to per-user item_idx histories with the same ordering rule as data_prep
    (timestamp, then input order). Items unknown to ``prepared`` are dropped and counted.

    Returns ``(table, n_unknown)``; ``table`` has user_id (string), item_idx (list<int32>),
    timestamp (list<int64>), one row per user, users sorted by id as strings. Ids are normalised
    as data_prep normalised them (manifest counts.id_normalization) and, when data_prep pseudonymised
    them (manifest pseudonymization), replaced by the same pseudonyms: the key is read from the
    environment variable the manifest names (or ``key_env``) and checked against its fingerprint."""
    from data_prep.pseudonym import from_manifest
    from data_prep.sequences import encode_histories as _enc

    mode = prepared.manifest.get("counts", {}).get("id_normalization", "exact")
    pz = from_manifest(prepared.manifest, f"prepared version {prepared.path}", key_env)
    return _enc(item_index(prepared), user_ids, item_ids, timestamps, mode, pz.key if pz else None)
