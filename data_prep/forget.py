"""Forget users: record deletion requests that the next data_prep run applies (docs/CONTRACTS.md section 2).

    python -m data_prep.forget --output-dir work/prepared/sample --user-ids ids.txt [--reason "ticket 4711"]

``--user-ids`` is a text file with one user id per line, written as the prepared data and the nightly table print it
(an integer id as ``42``; blank lines are ignored). A malformed line (not UTF-8, leading or trailing whitespace, a tab
or other control character, or, where the prepared user ids are int64, not a canonical int64) stops the command with
one error naming the file and line, and nothing is recorded.

The requests are appended to ``<output_dir>/forget/requests.parquet`` (the ledger: user_id, requested_at, reason,
request_id; one row per id and request), rewritten atomically under ``forget/.lock``; it only grows. The next
``python -m data_prep`` on that output_dir drops every event of those users from everything it writes (sequences,
serving, quarantine, and its own validation cache), counts them (``events_filtered.forgotten``,
``users_forgotten``) and never reuses a version prepared before the newest request; training and inference then
never see them, and the next table has no row for them. Versions published before the request still hold their data
until deleted: this command and data_prep name them.

Where the output_dir pseudonymises user ids (data_prep config ``pseudonymize_user_ids_key_env``,
data_prep/pseudonym.py), the file holds RAW ids (as the events have them) and the ledger records only their
pseudonyms (``user_id_form`` = the scheme and key fingerprint); the key comes from the environment variable the
latest manifest names (or ``--key-env``) and must match its fingerprint. A ledger recorded with raw ids before
pseudonymisation was turned on is rewritten as pseudonyms by the first pseudonymised data_prep run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import secrets
import sys
import unicodedata
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.lock import LOCK_FILE, exclusive_lock
from data_prep.pseudonym import CONFIG_KEY, RAW_FORM, Pseudonymizer, canonical_user_ids, from_manifest, manifest_entry
from data_prep.schema import FORGET_LEDGER, LATEST_FILE, MANIFEST_FILE, DataPrepError
from lmrec_common.manifest import sha256_strings
from lmrec_common.publish import atomic_write_bytes

LEDGER_SCHEMA = pa.schema([
    ("user_id", pa.string()),  # as the prepared data prints it: the raw id, or its pseudonym (user_id_form)
    ("requested_at", pa.timestamp("us", tz="UTC")),
    ("reason", pa.string()),
    ("request_id", pa.string()),  # one per command: the lines of one file share it
    # "raw", or "hmac-sha256-128:<key fingerprint>" when the output_dir pseudonymises user ids (data_prep/pseudonym.py);
    # a ledger written before this column holds raw ids
    ("user_id_form", pa.string()),
])
_INT64 = re.compile(r"-?(0|[1-9][0-9]*)")


@dataclass
class ForgetSet:
    """What the ledger asks data_prep to drop: ``user_ids`` (sorted distinct strings) and ``sha256`` = sha256_strings of
    them, which a prepared manifest records (``forget.users_sha256``) and a rerun compares."""

    path: Path
    requests: int
    user_ids: pa.Array  # in the form of this run's user ids (pseudonyms when it pseudonymises)
    raw_rows: int = 0  # ledger rows holding raw ids while this run pseudonymises: pseudonymise_ledger converts them

    @cached_property
    def sha256(self) -> str:  # compared once per cached events file: computed once
        return sha256_strings(self.user_ids.to_pylist())

    def summary(self) -> dict:
        return {"ledger": str(self.path), "requests": self.requests, "users_requested": len(self.user_ids),
                "users_sha256": self.sha256}


EMPTY_SHA256 = sha256_strings([])


def ledger_path(out_dir: Path) -> Path:
    return Path(out_dir) / FORGET_LEDGER


def _read_table(path: Path) -> pa.Table:
    try:
        t = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataPrepError(f"{path}: cannot read the forget ledger ({e}); nothing runs without it (deletion requests "
                            "must be honoured): restore it from a backup") from None
    if "user_id" not in t.column_names or not pa.types.is_string(t.schema.field("user_id").type):
        raise DataPrepError(f"{path}: not a forget ledger (needs a string column 'user_id'; has {t.schema}); restore it "
                            "from a backup")
    if "user_id_form" not in t.column_names:  # written before pseudonymisation existed: raw ids
        t = t.append_column("user_id_form", pa.array([RAW_FORM] * t.num_rows, pa.string()))
    return t


def _ledger_ids(t: pa.Table, path: Path, pz: Pseudonymizer | None) -> tuple[pa.Array, int]:
    """The ledger's user ids in the form of a run with ``pz`` (raw rows pseudonymised), and how many rows are raw.
    A row pseudonymised under another key, or any pseudonymised row when ``pz`` is None, cannot be matched: error."""
    form = t.column("user_id_form").combine_chunks().fill_null(RAW_FORM)
    raw = pc.equal(form, RAW_FORM)
    other = pc.unique(form.filter(pc.invert(raw))).to_pylist()
    want = pz.form if pz is not None else RAW_FORM
    bad = [f for f in other if f != want]
    if bad:
        now = f"this run's key (in {pz.key_env}) has fingerprint {pz.fingerprint}" if pz else f"this run's {CONFIG_KEY} is empty (raw ids)"
        raise DataPrepError(f"{path}: forget requests recorded as {bad[0]} cannot be matched: {now}; deletion requests "
                            "must be honoured, so nothing runs: use the key they were recorded under")
    ids = t.column("user_id").combine_chunks()
    n_raw = int(pc.sum(raw).as_py() or 0)
    if pz is not None and n_raw:
        ids = pc.if_else(raw, pz(ids), ids)  # raw ids of the ledger were written as the table printed them
    return ids, (n_raw if pz is not None else 0)


def read_ledger(out_dir: Path, pz: Pseudonymizer | None = None) -> ForgetSet:
    """The forget requests recorded under a prepared root (an empty set when there is no ledger), as ids of a run
    that pseudonymises with ``pz`` (None: raw ids)."""
    p = ledger_path(out_dir)
    if not p.is_file():
        return ForgetSet(p, 0, pa.array([], pa.string()))
    t = _read_table(p)
    ids, n_raw = _ledger_ids(t, p, pz)
    ids = pc.unique(ids.drop_null())
    return ForgetSet(p, t.num_rows, ids.take(pc.sort_indices(ids)), n_raw)


def _write_ledger(ledger: Path, t: pa.Table) -> None:
    buf = pa.BufferOutputStream()
    pq.write_table(t, buf)
    atomic_write_bytes(ledger, buf.getvalue().to_pybytes())


def pseudonymise_ledger(out_dir: Path, pz: Pseudonymizer) -> int:
    """Rewrite the ledger's raw ids as pseudonyms under ``pz`` (data_prep, once the first pseudonymised version of
    an output_dir that had raw versions is published): afterwards the ledger holds no raw id. Returns rows
    converted."""
    ledger = ledger_path(out_dir)
    with exclusive_lock(ledger.parent / LOCK_FILE, "", wait=True):
        if not ledger.is_file():
            return 0
        t = _read_table(ledger)
        ids, n_raw = _ledger_ids(t, ledger, pz)
        if n_raw:
            t = t.set_column(t.schema.get_field_index("user_id"), "user_id", ids)
            t = t.set_column(t.schema.get_field_index("user_id_form"), "user_id_form", pa.array([pz.form] * t.num_rows, pa.string()))
            _write_ledger(ledger, t.select(LEDGER_SCHEMA.names).cast(LEDGER_SCHEMA))
    return n_raw


def parse_user_ids(path: Path, id_type: str, outcome: str = "nothing was recorded") -> list[str]:
    """Distinct ids of ``path`` in file order; DataPrepError naming the first malformed line (and how many more)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataPrepError(f"--user-ids {path}: cannot read ({e.strerror or e})") from None
    ids: dict[str, None] = {}
    bad: list[str] = []
    for no, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(f"{path}:{no}: not valid UTF-8 ({raw[:40]!r})")
            continue
        if not s.strip():
            continue
        if s != s.strip():
            why = "leading or trailing whitespace (ids are matched exactly as the table prints them)"
        elif any(unicodedata.category(ch).startswith("C") for ch in s):
            why = "a tab or other control character (one id per line, nothing else)"
        elif id_type == "int64" and not (_INT64.fullmatch(s) and -(2**63) <= int(s) < 2**63):
            why = "not an int64 id as the table prints it (this output_dir's user ids are int64, e.g. 42)"
        else:
            ids.setdefault(s)
            continue
        bad.append(f"{path}:{no}: {s[:80]!r}: {why}")
    if bad:
        more = f" ({len(bad) - 1} more malformed line(s))" if len(bad) > 1 else ""
        raise DataPrepError(f"{bad[0]}{more}; {outcome}")
    if not ids:
        raise DataPrepError(f"--user-ids {path}: no user id in the file; {outcome}")
    return list(ids)


def _published_versions(out_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in out_dir.glob(f"*/{MANIFEST_FILE}") if not p.parent.name.startswith((".", "_")))


def record_requests(out_dir: str | Path, ids_file: str | Path, reason: str = "", key_env: str | None = None) -> dict:
    """Append the ids of ``ids_file`` to the ledger of the prepared root ``out_dir``; returns a summary. Where the
    latest version pseudonymises user ids, the ids are raw ones and are recorded as their pseudonyms (the key from
    the environment variable its manifest names, or ``key_env``)."""
    out_dir = Path(out_dir).expanduser().resolve()
    latest = out_dir / LATEST_FILE
    if not latest.is_file():
        raise DataPrepError(f"--output-dir {out_dir} is not a prepared root (no {LATEST_FILE}): give the output_dir of "
                            "python -m data_prep (the folder holding LATEST and the versions)")
    ledger = ledger_path(out_dir)
    latest_name = latest.read_text(encoding="utf-8").strip()
    try:
        m = json.loads((out_dir / latest_name / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        m = None  # no readable latest manifest: ids are taken as strings, exactly as written
    if m is None and ledger.is_file() and pc.any(pc.not_equal(_read_table(ledger).column("user_id_form"), RAW_FORM)).as_py():
        raise DataPrepError(f"{out_dir / latest_name / MANIFEST_FILE} cannot be read and the ledger holds pseudonymised "
                            "requests: the ids cannot be recorded without knowing the key; restore the manifest")
    # pseudonymised output_dir: the ids in the file are raw (as the events have them), recorded as their pseudonyms
    pz = from_manifest(m, f"{out_dir / latest_name}", key_env) if m else None
    if m is None:
        id_type = "string"
    elif pz is not None:
        id_type = manifest_entry(m).get("raw_user_id_type", "string")
    else:
        id_type = m.get("user_id_type", "string")
    ids = parse_user_ids(Path(ids_file), id_type)
    if pz is not None:
        mode = (m.get("counts") or {}).get("id_normalization", "exact")
        ids = pz(canonical_user_ids(pa.array(ids, pa.string()), mode)).to_pylist()
        ids = list(dict.fromkeys(ids))  # "007" and "7" under trim_zeros: one user
    with exclusive_lock(ledger.parent / LOCK_FILE, "", wait=True):  # concurrent forget commands: no lost appends
        old = _read_table(ledger).select(LEDGER_SCHEMA.names).cast(LEDGER_SCHEMA) if ledger.is_file() else LEDGER_SCHEMA.empty_table()
        before = set(_ledger_ids(old, ledger, pz)[0].to_pylist())
        now = _dt.datetime.now(_dt.timezone.utc)
        request_id = now.strftime("%Y%m%dT%H%M%S") + f"-{secrets.token_hex(3)}"
        new = pa.table({"user_id": ids, "requested_at": [now] * len(ids), "reason": [reason] * len(ids),
                        "request_id": [request_id] * len(ids), "user_id_form": [pz.form if pz else RAW_FORM] * len(ids)},
                       schema=LEDGER_SCHEMA)
        _write_ledger(ledger, pa.concat_tables([old, new]))
    return {"ledger": str(ledger), "request_id": request_id, "recorded": len(ids),
            "already_requested": sum(1 for i in ids if i in before), "requests": old.num_rows + len(ids),
            "pseudonymised": pz is not None, "versions_holding_data": _published_versions(out_dir)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m data_prep.forget", description=__doc__.split("\n\n")[0])
    ap.add_argument("--output-dir", required=True, help="the data_prep output_dir (holds LATEST and the versions)")
    ap.add_argument("--user-ids", required=True, help="text file, one user id per line, as the table prints it")
    ap.add_argument("--reason", default="", help="free text kept with each request (e.g. a ticket number)")
    ap.add_argument("--key-env", default=None, help="pseudonymised output_dir: the environment variable holding the "
                                                    "key (default: the one its manifest names)")
    a = ap.parse_args(argv)
    try:
        s = record_requests(a.output_dir, a.user_ids, a.reason, a.key_env)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    olds = s["versions_holding_data"]
    print(f"[forget] recorded {s['recorded']} user id(s) ({s['already_requested']} already requested) as request "
          f"{s['request_id']} in {s['ledger']} ({s['requests']} requests in all). The next python -m data_prep on "
          f"{Path(a.output_dir)} drops their events and publishes a version without them."
          + (f" Versions published before this request still hold their data until you delete them: {olds}." if olds else ""),
          flush=True)
    return s


if __name__ == "__main__":
    main()
