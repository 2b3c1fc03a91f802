"""Finding and opening the raw Parquet inputs; schema checks that stop at once (file + column named).

Bad files (0 bytes, truncated, not Parquet) raise DataPrepError naming the file, or with
``on_bad_file=skip`` are returned in ``skipped`` with the reason (recorded in the manifest).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.schema import DataPrepError
from lmrec_common.manifest import sha256_file


@dataclass
class InputFile:
    path: Path  # absolute
    size: int  # bytes
    mtime_ns: int
    schema: pa.Schema | None = None
    rows: int = 0
    sha256: str = ""  # of the file's bytes: what the validation cache and "nothing changed" are keyed by

    @property
    def fingerprint(self) -> dict:
        # content, not mtime: a file rewritten with the same bytes (a regenerated sample, a re-sync) is the same
        # input, and one rewritten in place with the same size and mtime is not
        return {"path": str(self.path), "size": self.size, "sha256": self.sha256}


def list_parquet(spec: str, what: str) -> list[Path]:
    """A file, a folder (recursive *.parquet, hidden/underscore files ignored, e.g. _SUCCESS) or a glob.

    Sorted by path so that "source file order" (the tie-break of equal timestamps) is deterministic;
    dt=YYYY-MM-DD partitions sort chronologically."""
    if not spec:
        raise DataPrepError(f"{what}: no path given")
    p = Path(os.path.expanduser(spec))
    if any(ch in spec for ch in "*?["):
        files = [Path(x) for x in glob.glob(os.path.expanduser(spec), recursive=True)]
        files = [f for f in files if f.is_file()]
    elif p.is_file():
        files = [p]
    elif p.is_dir():
        files = [f for f in p.rglob("*.parquet") if f.is_file()]
    else:
        raise DataPrepError(f"{what}: path {spec} does not exist (resolved to {p.resolve()})")
    files = [f for f in files if not any(part.startswith((".", "_")) for part in f.relative_to(p if p.is_dir() else f.parent).parts)]
    if not files:
        raise DataPrepError(f"{what}: no *.parquet files under {spec}")
    return sorted(f.resolve() for f in files)


def open_inputs(spec: str, what: str, on_bad_file: str) -> tuple[list[InputFile], list[dict]]:
    """Fingerprint and read the footer of every file. Returns (good files, skipped files)."""
    good, skipped = [], []
    for f in list_parquet(spec, what):
        st = f.stat()
        inp = InputFile(path=f, size=st.st_size, mtime_ns=st.st_mtime_ns)
        try:
            if st.st_size == 0:
                raise DataPrepError(f"{what} file {f} is empty (0 bytes): not a Parquet file")
            inp.sha256 = sha256_file(f)
            try:
                meta = pq.read_metadata(f)
                inp.schema = meta.schema.to_arrow_schema()
                inp.rows = meta.num_rows
            except (pa.ArrowException, OSError) as e:
                raise DataPrepError(f"{what} file {f} is corrupt or truncated (cannot read the Parquet footer: {e})") from None
        except DataPrepError as e:
            if on_bad_file == "skip":
                skipped.append({**inp.fingerprint, "reason": str(e)})
                continue
            raise
        good.append(inp)
    if not good:
        raise DataPrepError(f"{what}: every file under {spec} was skipped as unreadable: {[s['path'] for s in skipped]}")
    return good, skipped


def is_string_like(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return is_string_like(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string_view(t) or pa.types.is_binary_view(t)


def check_id_column(inp: InputFile, col: str, what: str) -> str:
    """'int' or 'string' for an id column; anything else (float, struct...) is a schema error."""
    if col not in inp.schema.names:
        raise DataPrepError(f"{what} file {inp.path}: missing column {col!r} (columns: {inp.schema.names}); set columns.* in the config if it has another name")
    t = inp.schema.field(col).type
    if pa.types.is_integer(t):
        return "int"
    if is_string_like(t):
        return "string"
    raise DataPrepError(f"{what} file {inp.path}: column {col!r} has type {t}; ids must be integers or strings")


INT64_MAX = 2**63 - 1


def check_id_values(values: pa.Array | pa.ChunkedArray, path: Path, col: str, what: str) -> None:
    """Integer ids are stored, sorted and typed as int64 downstream: a uint64 id column holding a value above the int64
    maximum stops here with the file, column, row and value named (Arrow's cast error would name none of them)."""
    if not pa.types.is_uint64(values.type) or len(values) == 0:
        return
    over = pc.greater(values, pa.scalar(INT64_MAX, pa.uint64()))
    if not pc.any(over).as_py():
        return
    row = pc.index(over, True).as_py()
    n = pc.sum(over).as_py()
    raise DataPrepError(
        f"{what} file {path}: column {col!r} is uint64 and {n:,} of its values overflow int64, the first at row {row}: "
        f"{values[row].as_py()} > {INT64_MAX}; integer ids must fit int64: write the column as strings (ids are "
        "compared as strings) or remap the ids")


def check_timestamp_column(inp: InputFile, col: str, what: str) -> str:
    if col not in inp.schema.names:
        raise DataPrepError(f"{what} file {inp.path}: missing column {col!r} (columns: {inp.schema.names})")
    t = inp.schema.field(col).type
    if pa.types.is_timestamp(t):
        return "timestamp"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return "number"
    if is_string_like(t):
        return "string"
    raise DataPrepError(
        f"{what} file {inp.path}: column {col!r} has type {t}; timestamps must be a Parquet timestamp/date, "
        "an epoch number (s/ms/us) or an ISO-8601 string"
    )


def check_optional_column(inp: InputFile, col: str, what: str, kind: str) -> bool:
    """True if present with an acceptable type; False if absent; schema error otherwise."""
    if col not in inp.schema.names:
        return False
    t = inp.schema.field(col).type
    ok = is_string_like(t) if kind == "string" else (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t))
    if not ok:
        raise DataPrepError(f"{what} file {inp.path}: column {col!r} has type {t}; expected {'a string' if kind == 'string' else 'a number'}")
    return True
