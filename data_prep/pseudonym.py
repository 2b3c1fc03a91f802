"""Keyed pseudonymisation of user ids (issue 28; docs/CONTRACTS.md section 2, "Pseudonymous user ids").

    python -m data_prep.pseudonym lookup --prepared-dir work/prepared/sample --user-ids ids.txt
    python -m data_prep.pseudonym map-back --table recs/dt=2026-11-27 --out /secure/recs_raw/dt=2026-11-27

With ``pseudonymize_user_ids_key_env: LMREC_USER_KEY`` in the data_prep config, every user id data_prep writes
(sequences, serving, quarantine, its cache) is ``pseudonym(id)`` below, computed at validation, so that training,
checkpoints and the nightly tables only ever see pseudonyms. The key is the UTF-8 bytes of that environment
variable's value (at least MIN_KEY_BYTES; e.g. ``export LMREC_USER_KEY=$(openssl rand -hex 32)``); it is never
written anywhere. The manifest records the variable's name and a key fingerprint, so a later run (or a forget
request, or map-back) with another key stops instead of producing ids that do not join.

    pseudonym(id)   = hex(HMAC-SHA256(key, "lmrec/user_id/v1:" + id))[:32]       (128 bits)
    fingerprint     = hex(HMAC-SHA256(key, "lmrec/key_fingerprint/v1"))[:16]

``id`` is the user id as data_prep reads it: UTF-8, integers in decimal, after ``id_normalization``. 128 bits keep
the chance of any collision among 10^10 users below 1e-18. The prefixes separate the two uses of the key (no user id
can make its pseudonym equal the fingerprint) and version the scheme.

Nothing lmrec stores maps pseudonyms back. ``lookup`` prints the pseudonym of given raw ids (support: "what was
user X recommended?"); ``map-back`` recomputes the pseudonyms of the raw ids in the operator's events and writes a
copy of a nightly table with raw ids to a folder the operator names, outside the prepared root and the tables' root.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from data_prep.schema import DataPrepError

SCHEME = "hmac-sha256-128"
ID_PREFIX = b"lmrec/user_id/v1:"
FINGERPRINT_LABEL = b"lmrec/key_fingerprint/v1"
PSEUDONYM_HEX = 32  # 128 bits
MIN_KEY_BYTES = 16
ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")
CONFIG_KEY = "pseudonymize_user_ids_key_env"
RAW_FORM = "raw"  # forget ledger rows recorded before pseudonymisation (user_id_form column)


def key_fingerprint(key: bytes) -> str:
    """16 hex characters that identify a key without revealing it (recorded in manifests and the forget ledger)."""
    return hmac.new(key, FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:16]


def pseudonymize(ids: pa.Array | pa.ChunkedArray, key: bytes) -> pa.Array:
    """String ids -> pseudonyms (string array, same length). Nulls stay null and "" stays "" (an id data_prep
    quarantines as null_user_id: nothing to hide). One HMAC per distinct id."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    d = pc.dictionary_encode(ids)
    h0 = hmac.new(key, ID_PREFIX, hashlib.sha256)  # the prefix absorbed once; copy() per id is 2x faster than new()
    out = []
    for v in d.dictionary.to_pylist():
        if not v:
            out.append(v)
            continue
        h = h0.copy()
        h.update(v.encode("utf-8"))
        out.append(h.hexdigest()[:PSEUDONYM_HEX])
    return pa.array(out, pa.string()).take(d.indices)


@dataclass(frozen=True)
class Pseudonymizer:
    """The key (never printed: repr=False) and the name of the environment variable it came from."""

    key_env: str
    key: bytes = field(repr=False)

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.key)

    @property
    def form(self) -> str:
        """How a forget ledger row's user_id is written under this key."""
        return f"{SCHEME}:{self.fingerprint}"

    def __call__(self, ids) -> pa.Array:
        return pseudonymize(ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids, pa.string()), self.key)

    def manifest_entry(self, raw_user_id_type: str) -> dict:
        return {"enabled": True, "scheme": SCHEME, "key_env": self.key_env, "key_fingerprint": self.fingerprint,
                "raw_user_id_type": raw_user_id_type}


def load_key(env_name: str, where: str) -> bytes:
    """The key held by environment variable ``env_name``; one-line DataPrepError when it is missing, empty or short."""
    v = os.environ.get(env_name, "")
    if not v:
        raise DataPrepError(f"{where}: environment variable {env_name} is not set or empty; it must hold the secret "
                            f"key of the user id pseudonyms (at least {MIN_KEY_BYTES} bytes, e.g. the output of "
                            "`openssl rand -hex 32`; never put the key itself in a config file)")
    key = v.encode("utf-8")
    if len(key) < MIN_KEY_BYTES:
        raise DataPrepError(f"{where}: the key in environment variable {env_name} has {len(key)} bytes; use at least "
                            f"{MIN_KEY_BYTES} (e.g. the output of `openssl rand -hex 32`)")
    return key


def from_config(key_env: str) -> Pseudonymizer | None:
    """data_prep: None when ``pseudonymize_user_ids_key_env`` is empty."""
    if not key_env:
        return None
    return Pseudonymizer(key_env, load_key(key_env, CONFIG_KEY))


def manifest_entry(manifest: dict) -> dict:
    """The ``pseudonymization`` section of a prepared manifest ({"enabled": False} for one written before it)."""
    return manifest.get("pseudonymization") or {"enabled": False}


def from_manifest(manifest: dict, where: str, key_env: str | None = None) -> Pseudonymizer | None:
    """The pseudonymizer a prepared version was made with (None when its user ids are raw): the key from
    ``key_env`` or else the variable the manifest names, checked against the recorded fingerprint."""
    e = manifest_entry(manifest)
    if not e.get("enabled"):
        return None
    name = key_env or e["key_env"]
    pz = Pseudonymizer(name, load_key(name, where))
    if pz.fingerprint != e["key_fingerprint"]:
        raise DataPrepError(f"{where}: environment variable {name} holds another key (fingerprint {pz.fingerprint}) "
                            f"than the one its user ids were pseudonymised with (fingerprint {e['key_fingerprint']}): "
                            "pseudonyms computed with it would match nobody; set the original key")
    return pz


def check_same_key(prev_manifest: dict | None, prev_version: str | None, pz: Pseudonymizer | None) -> None:
    """data_prep, before anything is written: the previous version's user ids and this run's must join. Refuses a
    new key and turning pseudonymisation off (histories, forget requests and tables would no longer match);
    turning it on over raw versions is allowed (the forget ledger is converted; see pipeline)."""
    if not prev_manifest:
        return
    e = manifest_entry(prev_manifest)
    if not e.get("enabled"):
        return
    hint = ("; to change the key or stop pseudonymising, prepare into a new output_dir (forget requests recorded "
            "here cannot be carried over: record them again there from the raw ids)")
    if pz is None:
        raise DataPrepError(f"the previous version {prev_version} has pseudonymised user ids (key in {e['key_env']}, "
                            f"fingerprint {e['key_fingerprint']}) but {CONFIG_KEY} is empty: this run would publish "
                            f"raw ids under the same output_dir{hint}")
    if pz.fingerprint != e["key_fingerprint"]:
        raise DataPrepError(f"{CONFIG_KEY}: environment variable {pz.key_env} holds another key (fingerprint "
                            f"{pz.fingerprint}) than the one the previous version {prev_version} was prepared with "
                            f"(fingerprint {e['key_fingerprint']}): user histories, forget requests and tables would "
                            f"not join across versions{hint}")


def canonical_user_ids(col, id_normalization: str) -> pa.Array:
    """A raw user id column (string, binary or integer) -> the strings data_prep pseudonymises (validate_batch)."""
    from data_prep.validate import normalize_ids, to_utf8

    s, _ = to_utf8(col if isinstance(col, (pa.Array, pa.ChunkedArray)) else pa.array(col))
    return normalize_ids(s, id_normalization)[0]


# ============================================================================================ commands
def _prepared_manifest(prepared_dir: str) -> tuple[Path, dict]:
    from data_prep.schema import PreparedDataError, read_prepared_manifest, resolve_prepared

    try:
        v = resolve_prepared(prepared_dir)
        return v, read_prepared_manifest(v)
    except (PreparedDataError, OSError, ValueError) as e:
        raise DataPrepError(f"--prepared-dir {prepared_dir}: {e}") from None


def _require(manifest: dict, v: Path, key_env: str | None) -> Pseudonymizer:
    pz = from_manifest(manifest, f"prepared version {v}", key_env)
    if pz is None:
        raise DataPrepError(f"prepared version {v} has raw user ids ({CONFIG_KEY} was empty): nothing to map")
    return pz


def lookup(prepared_dir: str, ids_file: str, key_env: str | None = None) -> list[tuple[str, str]]:
    """(raw id, pseudonym) for each id of ``ids_file`` (one per line, as in a forget request)."""
    from data_prep.forget import parse_user_ids

    v, m = _prepared_manifest(prepared_dir)
    pz = _require(m, v, key_env)
    raw = parse_user_ids(Path(ids_file), manifest_entry(m).get("raw_user_id_type", "string"), "nothing was looked up")
    canon = canonical_user_ids(pa.array(raw, pa.string()), (m.get("counts") or {}).get("id_normalization", "exact"))
    return list(zip(raw, pz(canon).to_pylist()))


def _table_root(table: Path) -> Path:
    """recs/ of recs/dt=D (a link to recs/_runs/dt=D/run=R, or an old-layout folder) or of a run folder."""
    from lmrec_common.publish import RUNS_DIR

    real = Path(os.path.realpath(table))
    if RUNS_DIR in real.parts:
        return Path(*real.parts[: real.parts.index(RUNS_DIR)])
    return real.parent


def map_back(table: str, out: str, prepared_dir: str = "", events: str = "", key_env: str | None = None,
             allow_unmatched: bool = False) -> dict:
    """Write ``table`` (a nightly recs/dt=<date>) with raw user ids to the folder ``out``; returns the summary also
    written as ``out/_map_back.json`` (counts and paths; no id)."""
    import pyarrow.parquet as pq

    from data_prep.inputs import list_parquet
    from lmrec_common.publish import resolve_table, staged_dir

    try:
        tdir = resolve_table(table)
        tman = json.loads((tdir / "_manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataPrepError(f"--table {table}: {e}") from None
    v, m = _prepared_manifest(prepared_dir or (tman.get("data") or {}).get("path", ""))
    pz = _require(m, v, key_env)
    tfp = ((tman.get("data") or {}).get("pseudonymization") or {}).get("key_fingerprint")
    if tfp and tfp != pz.fingerprint:
        raise DataPrepError(f"--table {table} was written with user ids under key fingerprint {tfp}, the prepared "
                            f"version {v} under {pz.fingerprint}: give the prepared version the table was made from")
    cfg = m.get("config") or {}
    events = events or cfg.get("events_path", "")
    out_p = Path(out).expanduser().absolute()
    for what, root in (("the prepared root", v.parent), ("the tables' root", _table_root(Path(table)))):
        root = Path(os.path.realpath(root))
        if Path(os.path.realpath(out_p)).is_relative_to(root):
            raise DataPrepError(f"--out {out} is inside {what} {root}: a table with raw ids must go where lmrec's "
                                "readers and retention do not look; choose a folder outside it")
    if out_p.exists() and any(out_p.iterdir()) and not (out_p / "_map_back.json").is_file():
        raise DataPrepError(f"--out {out} exists and is not an earlier map-back output: choose an empty or new folder")

    # every distinct raw id of the events, as data_prep read it -> its pseudonym
    ucol = (cfg.get("columns") or {}).get("user_id", "user_id")
    mode = (m.get("counts") or {}).get("id_normalization", "exact")
    files = list_parquet(events, "--events")
    parts = []
    for f in files:
        try:
            col = pq.read_table(f, columns=[ucol]).column(ucol)
        except (pa.ArrowException, OSError, KeyError) as e:
            raise DataPrepError(f"--events file {f}: cannot read column {ucol!r} ({e})") from None
        parts.append(pc.unique(canonical_user_ids(col, mode)))
    raw = pc.unique(pa.concat_arrays(parts)) if parts else pa.array([], pa.string())
    pseud = pz(raw)
    raw_type = manifest_entry(m).get("raw_user_id_type", "string")

    summary = {"table": str(tdir), "run_id": tman.get("run_id"), "run_date": tman.get("run_date"),
               "prepared_version": str(v), "key_fingerprint": pz.fingerprint, "events": str(events),
               "events_files": len(files), "raw_ids_in_events": len(raw), "rows": 0, "users": 0,
               "users_unmatched": 0, "rows_dropped": 0}
    names = sorted(p.name for p in tdir.glob("*.parquet") if not p.name.startswith(("_", ".")))
    with staged_dir(out_p, tag="map-back") as tmp:
        for name in names:
            t = pq.read_table(tdir / name, partitioning=None)
            u = t.column("user_id").combine_chunks()
            idx = pc.index_in(u, value_set=pseud)
            miss = pc.is_null(idx)
            n_miss = int(pc.sum(miss).as_py() or 0)
            if n_miss:
                summary["users_unmatched"] += len(pc.unique(u.filter(miss)))
                summary["rows_dropped"] += n_miss
                keep = pc.invert(miss)
                t, idx = t.filter(keep), idx.filter(keep)
            ids = raw.take(idx)
            if raw_type == "int64":
                ids = ids.cast(pa.int64())
            t = t.set_column(t.schema.get_field_index("user_id"), "user_id", ids)
            summary["rows"] += t.num_rows
            summary["users"] += len(pc.unique(ids))  # a user's rows are in one part (one rank)
            pq.write_table(t, tmp / name, compression="zstd")
        if summary["users_unmatched"] and not allow_unmatched:
            raise DataPrepError(f"{summary['users_unmatched']:,} user(s) of {table} ({summary['rows_dropped']:,} rows) "
                                f"have no raw id in --events {events}: give the events the prepared version was made "
                                "from, or --allow-unmatched to leave their rows out; nothing was written")
        (tmp / "_map_back.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> dict | list:
    ap = argparse.ArgumentParser(prog="python -m data_prep.pseudonym", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    lk = sub.add_parser("lookup", help="print 'raw id<TAB>pseudonym' for the ids of a file")
    lk.add_argument("--prepared-dir", required=True, help="a prepared version, or the root holding LATEST")
    lk.add_argument("--user-ids", required=True, help="text file, one raw user id per line")
    mb = sub.add_parser("map-back", help="copy a nightly table with raw user ids to a folder outside lmrec's roots")
    mb.add_argument("--table", required=True, help="recs/dt=<date> (or one of its run folders)")
    mb.add_argument("--out", required=True, help="output folder (part files + _map_back.json), outside prepared/ and recs/")
    mb.add_argument("--prepared-dir", default="", help="default: the prepared version named in the table's manifest")
    mb.add_argument("--events", default="", help="raw events holding the users' ids; default: that version's events_path")
    mb.add_argument("--allow-unmatched", action="store_true", help="leave out the rows of users not found in --events")
    for p in (lk, mb):
        p.add_argument("--key-env", default=None, help="environment variable holding the key; default: the one the "
                                                       "prepared manifest names")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "lookup":
            pairs = lookup(a.prepared_dir, a.user_ids, a.key_env)
            for raw, p in pairs:
                print(f"{raw}\t{p}")
            return pairs
        s = map_back(a.table, a.out, a.prepared_dir, a.events, a.key_env, a.allow_unmatched)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"[pseudonym] wrote {s['rows']:,} rows of {s['users']:,} users with raw ids to {a.out}"
          + (f"; left out {s['rows_dropped']:,} rows of {s['users_unmatched']:,} users not in --events" if s["users_unmatched"] else ""),
          flush=True)
    return s


if __name__ == "__main__":
    main()
