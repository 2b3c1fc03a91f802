"""Converters from public formats to lmrec's raw Parquet inputs (docs/CONTRACTS.md section 1).

    python -m data_prep.convert movielens --src ../shared/data/ml-1m --out work/raw/ml-1m     # 100K or 1M, auto-detected
    python -m data_prep.convert csv --events ev.csv --items it.csv --out work/raw/mine \\
        --user-col uid --item-col sku --time-col ts [--event-type-col kind] [--value-col price] \\
        [--items-id-col sku] [--text-cols title,brand] [--delimiter ,] [--encoding utf-8]

Output (built in a temporary sibling folder, renamed into place on success):

    <out>/events/part-00000.parquet   user_id, item_id, timestamp, event_type, value   (source row order kept)
    <out>/items/items.parquet         item_id + text columns (MovieLens: title, genres "Action, Comedy")
    <out>/quarantine/events.parquet   source lines that could not be parsed: source_file, source_line, raw, reason
    <out>/quarantine/items.parquet    (same, for the catalogue; each written only when non-empty)
    <out>/convert.json                what was read (paths, sizes, sha256), counts, quarantine counts per reason

MovieLens timestamps are written as Parquet ``timestamp[ms, UTC]`` (``--timestamp-format epoch_s``
keeps int64 epoch seconds). A converter keeps every parsable row as it is - null or odd ids,
duplicates, unknown items are the data_prep pipeline's business, so it can quarantine and count them
- and only lines it cannot turn into a row at all (wrong field count, a non-number where the format
has a number) go to the converter's quarantine, counted per reason in convert.json; so
``lines_read == events_written + sum(events_quarantined)`` always holds.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from lmrec_common.log import fmt_count
from lmrec_common.manifest import base_manifest, sha256_file
from lmrec_common.publish import atomic_write_json, staged_dir

# MovieLens 100K genre flag order (used when u.genre is missing)
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
QUARANTINE_SCHEMA = pa.schema([("source_file", pa.string()), ("source_line", pa.int64()), ("raw", pa.string()), ("reason", pa.string())])
_INT_RE = r"^\s*-?[0-9]+\s*$"
_NUM_RE = r"^\s*-?[0-9]+(\.[0-9]*)?\s*$"


class ConvertError(ValueError):
    """Input that cannot be converted at all (missing file, missing column); names the file."""


class _Quarantine:
    """Collects unparsable source lines (file, 1-based line, raw text, reason)."""

    def __init__(self) -> None:
        self.parts: list[pa.Table] = []

    def add(self, file: Path | str, lines, raws, reason: str | list[str]) -> None:
        lines = np.asarray(lines, dtype=np.int64)
        if len(lines) == 0:
            return
        reasons = [reason] * len(lines) if isinstance(reason, str) else list(reason)
        self.parts.append(pa.table({"source_file": [str(file)] * len(lines), "source_line": lines, "raw": [str(r) for r in raws], "reason": reasons}, schema=QUARANTINE_SCHEMA))

    def table(self) -> pa.Table:
        return pa.concat_tables(self.parts) if self.parts else QUARANTINE_SCHEMA.empty_table()

    def counts(self) -> dict[str, int]:
        t = self.table()
        if t.num_rows == 0:
            return {}
        vc = pc.value_counts(t.column("reason"))
        return {str(r["values"]): int(r["counts"]) for r in vc.to_pylist()}


def _read_delimited(path: Path, names: list[str], delimiter: str, quarantine: _Quarantine, data: bytes | None = None, encoding: str = "utf8", raw_sep: str | None = None) -> tuple[pa.Table, np.ndarray]:
    """Read a headerless delimited file as all-string columns. Lines with the wrong number of
    fields go to ``quarantine`` (their text with ``raw_sep`` put back for ``delimiter``, when the
    bytes were rewritten before parsing). Returns (table, 1-based source line of each row)."""
    bad: list[tuple[int, str, int]] = []

    def on_invalid(row) -> str:
        bad.append((row.number, row.text, row.actual_columns))
        return "skip"

    src = io.BytesIO(data) if data is not None else str(path)
    table = pcsv.read_csv(
        src,
        read_options=pcsv.ReadOptions(column_names=names, use_threads=False, encoding=encoding, block_size=1 << 24),
        # quoting off: MovieLens fields are never quoted and titles may hold a '"'
        parse_options=pcsv.ParseOptions(delimiter=delimiter, quote_char=False, invalid_row_handler=on_invalid, ignore_empty_lines=False),
        convert_options=pcsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False),
    )
    bad_lines = np.array([b[0] for b in bad], dtype=np.int64)
    quarantine.add(path, bad_lines, [b[1].replace(delimiter, raw_sep) if raw_sep else b[1] for b in bad], [f"wrong_field_count:{b[2]}_of_{len(names)}" for b in bad])
    lines = np.setdiff1d(np.arange(1, table.num_rows + len(bad) + 1, dtype=np.int64), bad_lines, assume_unique=True)
    return table, lines


def _validate_numeric(table: pa.Table, lines: np.ndarray, checks: dict[str, str], path: Path, sep: str, quarantine: _Quarantine) -> tuple[pa.Table, np.ndarray]:
    """Keep rows whose columns match their regex (``checks``: column -> regex); quarantine the rest
    with reason ``not_a_number:<column>`` (first failing column) or ``empty_line``."""
    ok = pa.array(np.ones(table.num_rows, dtype=bool))
    reason = np.full(table.num_rows, "", dtype=object)
    for col, rx in checks.items():
        good = pc.fill_null(pc.match_substring_regex(table.column(col), rx), False)
        gnp = good.to_numpy(zero_copy_only=False)
        reason[(~gnp) & (reason == "")] = f"not_a_number:{col}"
        ok = pc.and_(ok, good)
    oknp = np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool)
    if not oknp.all():
        badi = np.nonzero(~oknp)[0]
        bad_rows = table.take(pa.array(badi))
        raws = [sep.join(r) for r in zip(*[bad_rows.column(c).to_pylist() for c in table.column_names])]
        reasons = ["empty_line" if raw.strip(sep + " ") == "" else reason[i] for raw, i in zip(raws, badi)]
        quarantine.add(path, lines[badi], raws, reasons)
        table, lines = table.filter(pa.array(oknp)), lines[oknp]
    return table, lines


def _ts_array(epoch_s: pa.Array, fmt: str) -> pa.Array:
    if fmt == "epoch_s":
        return epoch_s
    return pc.multiply(epoch_s, 1000).cast(pa.timestamp("ms", tz="UTC"))


def _read_ml_ratings(path: Path, kind: str, fmt: str, q: _Quarantine, rating_event_types: bool = False) -> pa.Table:
    names = ["user_id", "item_id", "rating", "timestamp"]
    if kind == "ml-1m":
        # '::' delimiter: pyarrow takes one byte; ratings hold only digits, so map '::' -> '\t'
        data = path.read_bytes().replace(b"::", b"\t")
        t, lines = _read_delimited(path, names, "\t", q, data=data, raw_sep="::")
    else:
        t, lines = _read_delimited(path, names, "\t", q)
    t, lines = _validate_numeric(t, lines, {"user_id": _INT_RE, "item_id": _INT_RE, "rating": _NUM_RE, "timestamp": _INT_RE}, path, "::" if kind == "ml-1m" else "\t", q)
    ints = {c: pc.cast(pc.utf8_trim_whitespace(t.column(c)), pa.int64()) for c in ("user_id", "item_id", "timestamp")}
    value = pc.cast(pc.utf8_trim_whitespace(t.column("rating")), pa.float64())
    if rating_event_types:
        # "rating_<stars>" per event, so a model can embed how a user rated each item of the history;
        # the value as written ("4", "3.5"), with a trailing ".0" dropped, keeps the vocabulary small
        stars = pc.replace_substring_regex(pc.utf8_trim_whitespace(t.column("rating")), r"\.0*$", "")
        etype = pc.binary_join_element_wise(pa.scalar("rating_"), stars, "")
    else:
        etype = pa.array(np.full(t.num_rows, "rating", dtype=object), pa.string())
    return pa.table(
        {
            "user_id": ints["user_id"],
            "item_id": ints["item_id"],
            "timestamp": _ts_array(ints["timestamp"], fmt),
            "event_type": etype,
            "value": value,
        }
    )


def _split_lines(path: Path) -> list[str]:
    """MovieLens catalogues are latin-1 (ISO-8859-1): decode with it, never as UTF-8."""
    text = path.read_bytes().decode("latin-1")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _read_ml1m_movies(path: Path, q: _Quarantine) -> pa.Table:
    ids, titles, genres = [], [], []
    for n, line in enumerate(_split_lines(path), start=1):
        parts = line.split("::")
        if len(parts) < 3 or not parts[0].strip().isdigit():
            q.add(path, [n], [line], "empty_line" if not line.strip() else ("wrong_field_count" if len(parts) < 3 else "not_a_number:item_id"))
            continue
        # MovieID::Title::Genres; a title holding '::' would be rejoined
        ids.append(int(parts[0]))
        titles.append("::".join(parts[1:-1]))
        genres.append(", ".join(g for g in parts[-1].split("|") if g))
    return pa.table({"item_id": pa.array(ids, pa.int64()), "title": pa.array(titles, pa.string()), "genres": pa.array(genres, pa.string())})


def _read_ml100k_items(path: Path, genre_path: Path, q: _Quarantine) -> pa.Table:
    genre_names = list(ML100K_GENRES)
    if genre_path.is_file():
        g = {}
        for line in _split_lines(genre_path):
            if "|" in line:
                name, idx = line.rsplit("|", 1)
                if idx.strip().isdigit():
                    g[int(idx)] = name
        if g:
            genre_names = [g.get(i, f"genre_{i}") for i in range(max(g) + 1)]
    nf = 5 + len(genre_names)  # id|title|release date|video release date|IMDb URL|flags...
    ids, titles, genres = [], [], []
    for n, line in enumerate(_split_lines(path), start=1):
        parts = line.split("|")
        if len(parts) != nf or not parts[0].strip().isdigit():
            reason = "empty_line" if not line.strip() else (f"wrong_field_count:{len(parts)}_of_{nf}" if len(parts) != nf else "not_a_number:item_id")
            q.add(path, [n], [line], reason)
            continue
        ids.append(int(parts[0]))
        titles.append(parts[1])
        genres.append(", ".join(name for name, flag in zip(genre_names, parts[5:]) if flag.strip() == "1"))
    return pa.table({"item_id": pa.array(ids, pa.int64()), "title": pa.array(titles, pa.string()), "genres": pa.array(genres, pa.string())})


def detect_movielens(src: Path) -> str:
    if (src / "ratings.dat").is_file() and (src / "movies.dat").is_file():
        return "ml-1m"
    if (src / "u.data").is_file() and (src / "u.item").is_file():
        return "ml-100k"
    present = sorted(p.name for p in src.iterdir()) if src.is_dir() else []
    raise ConvertError(
        f"{src}: not a MovieLens folder: expected ratings.dat + movies.dat (ML-1M) or u.data + u.item (ML-100K); "
        f"found {present if src.is_dir() else 'no such folder'}"
    )


def _file_info(path: Path) -> dict:
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": sha256_file(path)}


def _publish(out: Path, events: pa.Table, items: pa.Table | None, qe: _Quarantine, qi: _Quarantine, info: dict, t0: float) -> dict:
    """Write everything into a staged folder and rename it to ``out``; returns convert.json."""
    counts = info.setdefault("counts", {})
    counts.update(
        {
            "events_written": events.num_rows,
            "events_quarantined": qe.counts(),
            "users": int(pc.count_distinct(events.column("user_id")).as_py()),
            "items_with_events": int(pc.count_distinct(events.column("item_id")).as_py()),
        }
    )
    if items is not None:
        counts.update({"items_written": items.num_rows, "items_quarantined": qi.counts()})
    counts["events_lines_read"] = counts["events_written"] + sum(counts["events_quarantined"].values())
    with staged_dir(out, "tmp") as tmp:
        (tmp / "events").mkdir()
        pq.write_table(events, tmp / "events" / "part-00000.parquet", row_group_size=1 << 20)
        if items is not None:
            (tmp / "items").mkdir()
            pq.write_table(items, tmp / "items" / "items.parquet")
        for name, q in (("events", qe), ("items", qi)):
            if q.parts:
                (tmp / "quarantine").mkdir(exist_ok=True)
                pq.write_table(q.table(), tmp / "quarantine" / f"{name}.parquet")
        info["seconds"] = round(time.time() - t0, 2)
        atomic_write_json(tmp / "convert.json", info)
    qn = sum(counts["events_quarantined"].values()) + sum(counts.get("items_quarantined", {}).values())
    print(
        f"[convert] wrote {out}: {fmt_count(events.num_rows)} events, {counts['users']} users, "
        f"{counts['items_with_events']} rated items, {counts.get('items_written', 0)} catalogue items, "
        f"{qn} lines quarantined, in {info['seconds']:.1f}s",
        file=sys.stderr,
        flush=True,
    )
    return info


def convert_movielens(src: str | Path, out: str | Path, timestamp_format: str = "timestamp", rating_event_types: bool = False) -> dict:
    """MovieLens 100K (u.data, u.item, u.genre) or 1M (ratings.dat, movies.dat) -> raw Parquet at ``out``.

    ``rating_event_types``: event_type "rating_<stars>" ("rating_1" .. "rating_5") instead of "rating"
    for every event (data_prep's ``event_types`` must then list them), so a model with
    ``use_event_types`` sees how the user rated each item of the history. Same events, same order."""
    if timestamp_format not in ("timestamp", "epoch_s"):
        raise ConvertError(f"timestamp_format must be 'timestamp' or 'epoch_s', got {timestamp_format!r}")
    t0 = time.time()
    src, out = Path(src), Path(out)
    kind = detect_movielens(src)
    qe, qi = _Quarantine(), _Quarantine()
    if kind == "ml-1m":
        ratings, item_file = src / "ratings.dat", src / "movies.dat"
        items = _read_ml1m_movies(item_file, qi)
        extra = []
    else:
        ratings, item_file = src / "u.data", src / "u.item"
        items = _read_ml100k_items(item_file, src / "u.genre", qi)
        extra = [src / "u.genre"] if (src / "u.genre").is_file() else []
    events = _read_ml_ratings(ratings, kind, timestamp_format, qe, rating_event_types)
    info = base_manifest("lmrec.raw_convert", 1)
    info.update(
        {
            "format": kind,
            "inputs": [_file_info(p) for p in [ratings, item_file, *extra]],
            "timestamp": "timestamp[ms, UTC]" if timestamp_format == "timestamp" else "int64 epoch seconds",
            "event_types": sorted(set(events.column("event_type").to_pylist())) if rating_event_types else ["rating"],
        }
    )
    return _publish(out, events, items, qe, qi, info, t0)


def _id_column(arr: pa.ChunkedArray, id_type: str, name: str, path: Path) -> pa.ChunkedArray:
    """Ids as read (strings); ``int``: cast (error if impossible); ``auto``: int64 when every non-null
    value is a plain integer without leading zeros (so '007' stays a string), else string."""
    arr = arr.cast(pa.string())
    if id_type == "str":
        return arr
    is_int = pc.match_substring_regex(arr, r"^(0|-?[1-9][0-9]*)$")
    all_int = bool(pc.all(pc.fill_null(is_int, True)).as_py())
    if all_int:
        return pc.cast(arr, pa.int64())
    if id_type == "int":
        first_bad = pc.index(is_int, False).as_py()
        raise ConvertError(f"{path}: column {name!r} has a non-integer id at data row {first_bad + 1}: {arr[first_bad].as_py()!r} (use --id-type str)")
    return arr


def convert_csv(
    events: str | Path,
    out: str | Path,
    items: str | Path | None = None,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    event_type_col: str | None = None,
    event_type: str = "rating",
    value_col: str | None = None,
    items_id_col: str | None = None,
    text_cols: list[str] | None = None,
    available_col: str | None = None,
    delimiter: str = ",",
    encoding: str = "utf8",
    id_type: str = "auto",
) -> dict:
    """A CSV of events (with a header row) [+ a CSV catalogue] -> raw Parquet at ``out``.

    Columns are renamed to user_id/item_id/timestamp/event_type/value. Timestamps are kept as read
    (pyarrow's CSV type inference: integers -> int64 epoch, ISO strings -> timestamp, others stay
    strings for data_prep to parse or quarantine)."""
    if id_type not in ("auto", "int", "str"):
        raise ConvertError(f"id_type must be auto, int or str, got {id_type!r}")
    t0 = time.time()
    events, out = Path(events), Path(out)
    qe, qi = _Quarantine(), _Quarantine()

    def read(path: Path, q: _Quarantine, string_cols: list[str]) -> pa.Table:
        if not path.is_file():
            raise ConvertError(f"{path}: no such file")
        bad: list = []

        def on_invalid(row) -> str:
            bad.append(row)
            return "skip"

        t = pcsv.read_csv(
            str(path),
            read_options=pcsv.ReadOptions(use_threads=False, encoding=encoding),
            parse_options=pcsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid),
            # empty fields are nulls (a missing id is null, not the id ""), for data_prep to quarantine
            convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in string_cols}, strings_can_be_null=True),
        )
        q.add(path, [r.number for r in bad], [r.text for r in bad], [f"wrong_field_count:{r.actual_columns}_of_{r.expected_columns}" for r in bad])
        return t

    def need(t: pa.Table, path: Path, cols: list[str | None]) -> None:
        missing = [c for c in cols if c and c not in t.column_names]
        if missing:
            raise ConvertError(f"{path}: column(s) {missing} not found; the file has {t.column_names}")

    et = read(events, qe, [user_col, item_col])
    need(et, events, [user_col, item_col, time_col, event_type_col, value_col])
    cols = {
        "user_id": _id_column(et.column(user_col), id_type, user_col, events),
        "item_id": _id_column(et.column(item_col), id_type, item_col, events),
        "timestamp": et.column(time_col),
        "event_type": et.column(event_type_col).cast(pa.string()) if event_type_col else pa.array(np.full(et.num_rows, event_type, dtype=object), pa.string()),
    }
    if value_col:
        try:
            cols["value"] = et.column(value_col).cast(pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ConvertError(f"{events}: column {value_col!r} is not numeric: {e}") from None
    ev_table = pa.table(cols)

    it_table = None
    inputs = [_file_info(events)]
    if items is not None:
        items = Path(items)
        id_col = items_id_col or item_col
        it = read(items, qi, [id_col])
        need(it, items, [id_col, available_col, *(text_cols or [])])
        texts = text_cols or [c for c in it.column_names if c not in (id_col, available_col)]
        icols = {"item_id": _id_column(it.column(id_col), "str" if pa.types.is_string(ev_table.column("item_id").type) else id_type, id_col, items)}
        for c in texts:
            icols[c] = it.column(c).cast(pa.string())
        if available_col:
            icols["available"] = it.column(available_col).cast(pa.bool_())
        it_table = pa.table(icols)
        inputs.append(_file_info(items))
    info = base_manifest("lmrec.raw_convert", 1)
    info.update(
        {
            "format": "csv",
            "inputs": inputs,
            "columns": {"user_id": user_col, "item_id": item_col, "timestamp": time_col, "event_type": event_type_col or f"constant {event_type!r}", "value": value_col},
            "timestamp": str(ev_table.column("timestamp").type),
        }
    )
    return _publish(out, ev_table, it_table, qe, qi, info, t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m data_prep.convert", description="Convert public formats to lmrec raw Parquet inputs (docs/CONTRACTS.md section 1).")
    sub = ap.add_subparsers(dest="format", required=True)
    ml = sub.add_parser("movielens", help="MovieLens 100K or 1M folder (auto-detected)")
    ml.add_argument("--src", required=True, help="folder with ratings.dat+movies.dat (1M) or u.data+u.item (100K)")
    ml.add_argument("--out", required=True, help="output folder (replaced whole, atomically)")
    ml.add_argument("--timestamp-format", choices=["timestamp", "epoch_s"], default="timestamp")
    ml.add_argument("--rating-event-types", action="store_true",
                    help='event_type "rating_1".."rating_5" (the stars) instead of "rating": list them in data_prep\'s event_types')
    cs = sub.add_parser("csv", help="generic CSV with a header row")
    cs.add_argument("--events", required=True)
    cs.add_argument("--items")
    cs.add_argument("--out", required=True)
    cs.add_argument("--user-col", default="user_id")
    cs.add_argument("--item-col", default="item_id")
    cs.add_argument("--time-col", default="timestamp")
    cs.add_argument("--event-type-col")
    cs.add_argument("--event-type", default="rating", help="constant event_type when --event-type-col is not given")
    cs.add_argument("--value-col")
    cs.add_argument("--items-id-col", help="item id column of the items CSV (default: --item-col)")
    cs.add_argument("--text-cols", help="comma-separated text columns of the items CSV (default: all but id/available)")
    cs.add_argument("--available-col")
    cs.add_argument("--delimiter", default=",")
    cs.add_argument("--encoding", default="utf8", help="e.g. latin-1")
    cs.add_argument("--id-type", choices=["auto", "int", "str"], default="auto")
    a = ap.parse_args(argv)
    try:
        if a.format == "movielens":
            return convert_movielens(a.src, a.out, a.timestamp_format, a.rating_event_types)
        return convert_csv(
            a.events, a.out, a.items, a.user_col, a.item_col, a.time_col, a.event_type_col, a.event_type, a.value_col,
            a.items_id_col, a.text_cols.split(",") if a.text_cols else None, a.available_col, a.delimiter, a.encoding, a.id_type,
        )
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
