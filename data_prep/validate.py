"""Row-level validation of raw events, columnar (pyarrow compute; no Python loop per event).

``validate_batch(table, first_row, spec)`` turns a batch of raw rows into normalised columns
(user_id/item_id as strings, timestamp as int64 epoch seconds, event_type as int8 code) plus a
``reason`` column: null for a usable row, else the first failed check, in the order of
``CHECK_ORDER``. It is a pure function of the batch and ``ValidationSpec``, so it runs unchanged
inside ``datasets.Dataset.map(batched=True, num_proc=N)`` workers.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.pseudonym import key_fingerprint, pseudonymize
from data_prep.schema import DataPrepError

CHECK_ORDER = ["null_user_id", "null_item_id", "null_timestamp", "bad_timestamp", "timestamp_out_of_range", "unknown_event_type"]

ID_NORMALIZATIONS = ("exact", "trim", "trim_zeros")
ID_WHITESPACE, ID_LEADING_ZERO = 1, 2

UNIT_DIV = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}

# Output of validate_batch (one row per input row).
VALIDATED_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("ts", pa.int64()),  # epoch seconds, UTC
        ("etype", pa.int8()),  # index into event_types
        ("row", pa.int64()),  # row number in the source file
        ("reason", pa.string()),  # null = usable
        ("n_decoded_latin1", pa.int8()),  # 1 if an id of this row held non-UTF-8 bytes (decoded as latin-1)
        ("id_flags", pa.int8()),  # ID_WHITESPACE | ID_LEADING_ZERO: the raw user or item id of this row had them
    ]
)


@dataclass(frozen=True)
class ValidationSpec:
    """Everything validate_batch needs; part of the per-file cache key (incremental runs)."""

    user_col: str
    item_col: str
    ts_col: str
    etype_col: str | None  # None = column absent: every event is default_etype
    ts_kind: str  # timestamp | date | number | string (inputs.check_timestamp_column)
    ts_unit: str  # s | ms | us | ns (for numbers and numeric strings)
    min_ts: int  # epoch seconds, inclusive
    max_ts: int  # epoch seconds, exclusive
    event_types: tuple[str, ...]
    default_etype: int
    id_normalization: str = "exact"  # ID_NORMALIZATIONS
    # key fingerprint of the HMAC that replaces user ids (data_prep/pseudonym.py); "" = raw ids. The key itself is
    # validate_batch's user_key argument: never part of a spec, a cache key or a file
    user_pseudonym: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def parse_time_bound(s: str, key: str) -> int:
    """Config bound -> epoch seconds: epoch seconds, or ISO date/time (UTC unless an offset is given)."""
    s = str(s).strip()
    if re.fullmatch(r"-?\d+", s):
        return int(s)
    try:
        d = _dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise DataPrepError(f"config {key}={s!r} is neither epoch seconds nor an ISO date/time (e.g. 2026-11-26)") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    return int(d.timestamp())


def detect_unit(col: pa.ChunkedArray | pa.Array) -> str:
    """Epoch unit from the magnitude of the median |value| (robust to a few outliers):
    < 1e11 -> s (until year 5138), < 1e14 -> ms, < 1e17 -> us, else ns."""
    a = pc.abs(pc.cast(col, pa.float64(), safe=False))  # unsafe: epoch ns (> 2**53) are not exact floats, nor need to be
    med = pc.approximate_median(a).as_py()
    if med is None or med < 1e11:
        return "s"
    if med < 1e14:
        return "ms"
    if med < 1e17:
        return "us"
    return "ns"


def to_utf8(arr: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, int]:
    """Any string-like or integer array -> (pa.string array, number of values that were not valid
    UTF-8 and were decoded as latin-1). The slow per-value path runs only for a failing batch."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.dictionary_decode()
        t = arr.type
    if pa.types.is_integer(t):
        return pc.cast(arr, pa.string()), 0
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        try:
            arr.validate(full=True)
            return pc.cast(arr, pa.string()), 0
        except pa.ArrowInvalid:  # a Parquet "string" column holding invalid UTF-8 bytes
            arr = arr.view(pa.large_binary() if pa.types.is_large_string(t) else pa.binary()) if not pa.types.is_string_view(t) else pc.cast(arr, pa.binary())
            t = arr.type
    # binary
    try:
        return pc.cast(arr, pa.string()), 0  # the cast validates UTF-8
    except pa.ArrowInvalid:
        pass
    out, bad = [], 0
    for b in arr.to_pylist():
        if b is None:
            out.append(None)
            continue
        try:
            out.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(b.decode("latin-1"))  # latin-1 maps every byte: never fails
            bad += 1
    return pa.array(out, pa.string()), bad


def normalize_ids(s: pa.Array, mode: str) -> tuple[pa.Array, np.ndarray]:
    """String ids -> (ids under ``mode``, int8 flags per value: ID_WHITESPACE if the raw id had
    leading/trailing whitespace, ID_LEADING_ZERO if it is all digits with a leading zero, e.g. "007").

    ``exact`` returns the ids unchanged (flags still computed: the manifest counts them), ``trim``
    strips whitespace, ``trim_zeros`` also strips leading zeros of all-digit ids ("000" -> "0")."""
    if mode not in ID_NORMALIZATIONS:
        raise ValueError(f"id_normalization must be one of {ID_NORMALIZATIONS}, got {mode!r}")
    if isinstance(s, pa.ChunkedArray):
        s = s.combine_chunks()
    trimmed = pc.utf8_trim_whitespace(s)
    ws = pc.not_equal(pc.utf8_length(s), pc.utf8_length(trimmed)).fill_null(False)
    zero = pc.match_substring_regex(trimmed, r"^0+\d+$").fill_null(False)
    flags = ws.to_numpy(zero_copy_only=False).astype(np.int8) * ID_WHITESPACE + zero.to_numpy(zero_copy_only=False).astype(np.int8) * ID_LEADING_ZERO
    if mode == "exact":
        return s, flags
    if mode == "trim":
        return trimmed, flags
    return pc.replace_substring_regex(trimmed, r"^0+(\d+)$", r"\1"), flags


def _null_or_empty(s: pa.Array) -> pa.Array:
    return pc.or_kleene(pc.is_null(s), pc.equal(pc.utf8_length(s), 0)).fill_null(True)


_ISO_FORMATS = ["%Y-%m-%d %H:%M:%S%z", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"]


def parse_timestamps(col: pa.Array, kind: str, unit: str) -> pa.Array:
    """Raw timestamp column -> int64 epoch seconds; null where unparsable (or null)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if kind == "timestamp":
        div = UNIT_DIV[col.type.unit]
        v = pc.cast(col, pa.int64())  # tz-aware timestamps are stored as UTC
        return pc.divide(v, div) if div > 1 else v  # floor for non-negative values (all in-range ones)
    if kind == "date":
        return pc.multiply(pc.cast(pc.cast(col, pa.date32()), pa.int64()), 86_400)
    if kind == "number":
        div = UNIT_DIV[unit]
        if pa.types.is_floating(col.type):
            f = pc.divide(pc.cast(col, pa.float64()), float(div))
            ok = pc.and_(pc.is_finite(f), pc.less(pc.abs(f), 9.2e18)).fill_null(False)
            f = pc.if_else(ok, f, None)  # NaN/inf -> null -> bad_timestamp
            return pc.cast(pc.floor(f), pa.int64())
        if pa.types.is_uint64(col.type):  # beyond int64: unparsable (bad_timestamp), not an Arrow cast error
            col = pc.if_else(pc.greater(col, pa.scalar(2**63 - 1, pa.uint64())), pa.scalar(None, pa.uint64()), col)
        v = pc.cast(col, pa.int64())
        return pc.divide(v, div) if div > 1 else v
    # strings: epoch digits, or ISO-8601 ("2026-11-26T12:00:00Z", "2026-11-26 12:00:00+02:00", "2026-11-26")
    s, _ = to_utf8(col)
    s = pc.utf8_trim_whitespace(s)
    digits = pc.match_substring_regex(s, r"^-?\d+$").fill_null(False)
    num = pc.cast(pc.if_else(digits, s, None), pa.int64())
    if UNIT_DIV[unit] > 1:
        num = pc.divide(num, UNIT_DIV[unit])
    iso = pc.replace_substring_regex(s, r"^(\d{4}-\d{2}-\d{2})T", r"\1 ")
    iso = pc.replace_substring_regex(iso, r"(\d{2}:\d{2}:\d{2})\.\d+", r"\1")  # drop fractional seconds
    iso = pc.replace_substring_regex(iso, r"\s*(Z|UTC)$", "+0000")
    iso = pc.replace_substring_regex(iso, r"([+-]\d{2}):(\d{2})$", r"\1\2")
    out = num
    for fmt in _ISO_FORMATS:
        parsed = pc.strptime(iso, format=fmt, unit="s", error_is_null=True)
        if pa.types.is_timestamp(parsed.type) and parsed.type.tz is not None:
            parsed = parsed.cast(pa.timestamp("s"))
        out = pc.coalesce(out, pc.cast(parsed, pa.int64()))
    return out


def validate_batch(batch: pa.Table, first_row: int, spec: ValidationSpec, user_key: bytes | None = None) -> pa.Table:
    """Raw rows (a pa.Table batch whose first row is row ``first_row`` of its file) -> VALIDATED_SCHEMA. With
    ``spec.user_pseudonym`` the user ids come out as pseudonyms under ``user_key`` (its fingerprint must match)."""
    n = batch.num_rows
    users, bad_u = to_utf8(batch.column(spec.user_col))
    items, bad_i = to_utf8(batch.column(spec.item_col))
    users, fu = normalize_ids(users, spec.id_normalization)
    if spec.user_pseudonym:
        if user_key is None or key_fingerprint(user_key) != spec.user_pseudonym:
            raise ValueError("validate_batch: spec.user_pseudonym is set but user_key is missing or another key")
        users = pseudonymize(users, user_key)  # nulls and "" stay as they are: null_user_id below still sees them
    items, fi = normalize_ids(items, spec.id_normalization)
    id_flags = pa.array(fu | fi)
    latin1 = pa.array(np.zeros(n, np.int8))
    if bad_u or bad_i:
        # Rare path: mark which rows were decoded (count in the manifest) by re-checking per value.
        flags = np.zeros(n, np.int8)
        for name in (spec.user_col, spec.item_col):
            col = batch.column(name).combine_chunks()
            if pa.types.is_dictionary(col.type):
                col = col.dictionary_decode()
            if not pa.types.is_integer(col.type):
                for i, b in enumerate(col.view(pa.binary()).to_pylist() if not pa.types.is_binary(col.type) else col.to_pylist()):
                    if b is not None:
                        try:
                            b.decode("utf-8")
                        except UnicodeDecodeError:
                            flags[i] = 1
        latin1 = pa.array(flags)

    raw_ts = batch.column(spec.ts_col)
    ts = parse_timestamps(raw_ts, spec.ts_kind, spec.ts_unit)
    raw_ts_null = pc.is_null(raw_ts.combine_chunks() if isinstance(raw_ts, pa.ChunkedArray) else raw_ts)
    if spec.ts_kind == "string":
        raw_ts_null = pc.or_kleene(raw_ts_null, _null_or_empty(pc.utf8_trim_whitespace(to_utf8(raw_ts)[0]))).fill_null(True)
    if spec.etype_col is None:
        etype = pa.array(np.full(n, spec.default_etype, np.int8))
    else:
        et, _ = to_utf8(batch.column(spec.etype_col))
        et = pc.utf8_lower(pc.utf8_trim_whitespace(et))
        etype = pc.cast(pc.index_in(et, value_set=pa.array(list(spec.event_types), pa.string())), pa.int8())

    in_range = pc.and_(pc.greater_equal(ts, spec.min_ts), pc.less(ts, spec.max_ts))
    checks = [
        ("null_user_id", _null_or_empty(users)),
        ("null_item_id", _null_or_empty(items)),
        ("null_timestamp", raw_ts_null),
        ("bad_timestamp", pc.is_null(ts)),
        ("timestamp_out_of_range", pc.invert(in_range.fill_null(True))),
        ("unknown_event_type", pc.is_null(etype)),
    ]
    reason = pa.nulls(n, pa.string())
    # Walk the checks last-to-first so that the FIRST failing check (CHECK_ORDER) wins.
    for name, mask in reversed(checks):
        reason = pc.if_else(mask, pa.scalar(name, pa.string()), reason)
    rows = pa.array(np.arange(first_row, first_row + n, dtype=np.int64))
    return pa.table(
        [users, items, ts.cast(pa.int64()), etype.fill_null(-1).cast(pa.int8()), rows, reason, latin1, id_flags],
        schema=VALIDATED_SCHEMA,
    )


def stringify(table: pa.Table, columns: dict[str, str | None]) -> dict[str, pa.Array]:
    """Original values as strings for the quarantine file: {out_name: source column or None}."""
    out = {}
    n = table.num_rows
    for out_name, src in columns.items():
        if src is None or src not in table.column_names:
            out[out_name] = pa.nulls(n, pa.string())
            continue
        col = table.column(src).combine_chunks()
        if pa.types.is_dictionary(col.type):
            col = col.dictionary_decode()
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type) or pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            out[out_name] = to_utf8(col)[0]
        else:
            try:
                out[out_name] = pc.cast(col, pa.string())
            except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
                out[out_name] = pa.array([None if v is None else str(v) for v in col.to_pylist()], pa.string())
    return out
