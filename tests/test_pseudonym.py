"""Keyed pseudonymisation of user ids (issue 28): with pseudonymize_user_ids_key_env set, nothing lmrec writes under
the prepared root, a training run or a nightly table holds a raw user id; the same key gives the same ids across
runs, another key is refused, forget requests take raw ids, map-back restores them outside lmrec's folders.

    python -m pytest tests/test_pseudonym.py -q

Raw ids are distinctive strings ("rawuid-...") so that a byte search for them means something.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from data_prep.forget import main as forget_main
from data_prep.forget import record_requests
from data_prep.pipeline import run
from data_prep.pseudonym import key_fingerprint, pseudonymize
from data_prep.pseudonym import main as pseudonym_main
from data_prep.schema import DataPrepError, encode_histories, load_prepared
from test_data_prep import T0, check_identity
from test_data_prep_forget import files_holding, tiny_train_config
from test_data_prep import setup as prep_setup

ROOT = Path(__file__).resolve().parent.parent
ENV = "LMREC_TEST_USER_KEY"
KEY = "k3y-" + "5f1c0e9a" * 6  # what an operator exports; its bytes must appear nowhere
OTHER_KEY = "other-" + "0" * 40
USERS = [f"rawuid-{u:03d}" for u in range(6)]
GONE = "rawuid-gone-4711"  # usable events, one of each late/early quarantine reason
SOLO = "rawuid-solo-4712"  # a single event: a serving/ user
GONE_TS = [T0 + 777_001 + k for k in range(7)]


def expected(raw: str, key: str = KEY) -> str:
    """The documented formula, computed independently of data_prep/pseudonym.py."""
    return hmac.new(key.encode(), b"lmrec/user_id/v1:" + raw.encode(), hashlib.sha256).hexdigest()[:32]


def _log(extra_day: bool = False) -> pa.Table:
    rows = [(u, 1 + (k * 3 + j) % 10, T0 + 100 * j + k, "view") for k, u in enumerate(USERS) for j in range(4)]
    rows += [(USERS[0], 2, T0 + 5000, "teleport")]  # a quarantined row of a user who stays
    if not extra_day:
        rows += [(GONE, 1, GONE_TS[0], "view"), (GONE, 2, GONE_TS[1], "click"), (GONE, 3, GONE_TS[2], "view"),
                 (GONE, 4, GONE_TS[3], "teleport"),  # unknown_event_type (validation)
                 (GONE, 3, GONE_TS[2], "view"),  # duplicate (global stage: re-read from the source file)
                 (GONE, 999, GONE_TS[4], "view"),  # item_not_in_catalogue (global stage)
                 (SOLO, 5, GONE_TS[5], "view")]
    else:
        rows = [(u, 7, T0 + 90_000 + k, "view") for k, u in enumerate(USERS)] + [(GONE, 6, GONE_TS[6], "view")]
    u, i, t, e = zip(*rows)
    return pa.table({"user_id": pa.array(u), "item_id": pa.array(i, pa.int64()), "timestamp": pa.array(t, pa.int64()),
                     "event_type": pa.array(e)})


RAW_NEEDLES = [b"rawuid", KEY.encode()]  # every raw id starts with rawuid; the key itself


def _gone_needles(key: str = KEY) -> list[bytes]:
    """The forgotten users' raw ids, their pseudonyms and the bytes of their events' timestamps."""
    return ([b"gone-4711", b"solo-4712", expected(GONE, key).encode(), expected(SOLO, key).encode()]
            + [np.int64(t).tobytes() for t in GONE_TS] + [str(t).encode() for t in GONE_TS])


def _setup(tmp_path: Path, monkeypatch, key: str | None = KEY, **over):
    if key is not None:
        monkeypatch.setenv(ENV, key)
    return prep_setup(tmp_path, {"dt=2023-11-14/part-0.parquet": _log()}, pseudonymize_user_ids_key_env=ENV, **over)


def _forget(out: Path, tmp_path: Path, lines: list[str], *extra: str) -> dict:
    f = tmp_path / "ids.txt"
    f.write_text("\n".join(lines) + "\n")
    return forget_main(["--output-dir", str(out), "--user-ids", str(f), *extra])


# ----------------------------------------------------------------------------- the transform


def test_pseudonyms_follow_the_documented_formula():
    key = KEY.encode()
    got = pseudonymize(pa.array(["rawuid-000", None, "", "rawuid-000", "Zoë 42"]), key).to_pylist()
    assert got == [expected("rawuid-000"), None, "", expected("rawuid-000"), expected("Zoë 42")]
    assert len(got[0]) == 32 and int(got[0], 16) >= 0
    assert key_fingerprint(key) == hmac.new(key, b"lmrec/key_fingerprint/v1", hashlib.sha256).hexdigest()[:16]
    assert pseudonymize(pa.array(["rawuid-000"]), OTHER_KEY.encode())[0].as_py() != got[0]


# ----------------------------------------------------------------------------- data_prep


def test_a_pseudonymised_version_holds_no_raw_id_anywhere_under_the_output_dir(tmp_path, monkeypatch):
    cfg = _setup(tmp_path, monkeypatch)
    out = Path(cfg.output_dir)
    stale = out / "_cache" / "hf-999999999" / "cache-0.arrow"  # what a killed run leaves: an HF copy of raw columns
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"rawuid-000")
    v = run(cfg)
    d = load_prepared(v)
    m = d.manifest
    check_identity(m)
    # every file: sequences, serving, quarantine, manifest, config, the validation cache, LATEST
    assert files_holding(out, RAW_NEEDLES) == []
    assert sorted(d.sequences["user_id"]) == sorted(expected(u) for u in USERS + [GONE])
    assert d.serving["user_id"] == [expected(SOLO)]
    q = pq.read_table(v / "quarantine" / "events.parquet")
    assert sorted(zip(q.column("user_id").to_pylist(), q.column("reason").to_pylist())) == sorted(
        [(expected(USERS[0]), "unknown_event_type"), (expected(GONE), "unknown_event_type"),
         (expected(GONE), "duplicate"), (expected(GONE), "item_not_in_catalogue")])
    p = m["pseudonymization"]
    assert p == {"enabled": True, "scheme": "hmac-sha256-128", "key_env": ENV, "key_fingerprint": key_fingerprint(KEY.encode()),
                 "raw_user_id_type": "string", "older_raw_versions": []}
    assert m["user_id_type"] == "string" and m["config"]["pseudonymize_user_ids_key_env"] == ENV

    # the control: the same run without the key writes the raw ids (so the search above can find them)
    raw = run(prep_setup(tmp_path / "raw", {"dt=2023-11-14/part-0.parquet": _log()}))
    assert files_holding(raw.parent, [b"rawuid"]) and load_prepared(raw).manifest["pseudonymization"] == {"enabled": False}


def test_int_user_ids_become_string_pseudonyms(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    v = run(prep_setup(tmp_path, pseudonymize_user_ids_key_env=ENV))  # BASE log: int64 user ids 1..4
    m = load_prepared(v).manifest
    assert m["user_id_type"] == "string" and m["pseudonymization"]["raw_user_id_type"] == "int64"
    assert sorted(load_prepared(v).sequences["user_id"]) == sorted(expected(str(u)) for u in (1, 2, 3, 4))


def test_same_key_same_ids_across_runs_incremental_reuse_and_the_online_encoder(tmp_path, monkeypatch):
    cfg = _setup(tmp_path, monkeypatch)
    v1 = run(cfg)
    ids1 = load_prepared(v1).sequences["user_id"]
    p = Path(cfg.events_path) / "dt=2023-11-15" / "part-0.parquet"
    p.parent.mkdir()
    pq.write_table(_log(extra_day=True), p)
    v2 = run(cfg)
    m2 = load_prepared(v2).manifest
    assert m2["reuse"]["events_files_reused"] == [str(Path(cfg.events_path).resolve() / "dt=2023-11-14" / "part-0.parquet")]
    ids2 = load_prepared(v2).sequences["user_id"]
    assert set(ids1) <= set(ids2) and set(ids2) == {expected(u) for u in USERS + [GONE]}
    assert m2["pseudonymization"]["key_fingerprint"] == load_prepared(v1).manifest["pseudonymization"]["key_fingerprint"]
    assert files_holding(Path(cfg.output_dir), RAW_NEEDLES) == []
    # a fresh output_dir with the same key: the same ids (no salt, no state)
    v3 = run(prep_setup(tmp_path / "again", {"dt=2023-11-14/part-0.parquet": _log()}, pseudonymize_user_ids_key_env=ENV))
    assert load_prepared(v3).sequences["user_id"] == ids1

    # inference's online helper: raw events -> the same pseudonyms, with the key the manifest names
    d = load_prepared(v2)
    table, _ = encode_histories(d, [USERS[1], USERS[1], "rawuid-new"], [3, 4, 5], [T0, T0 + 1, T0])
    assert table.column("user_id").to_pylist() == sorted([expected(USERS[1]), expected("rawuid-new")])
    assert expected(USERS[1]) in ids2
    monkeypatch.delenv(ENV)
    with pytest.raises(DataPrepError, match=f"environment variable {ENV} is not set or empty"):
        encode_histories(d, [USERS[1]], [3], [T0])
    monkeypatch.setenv(ENV, OTHER_KEY)
    with pytest.raises(DataPrepError, match="holds another key"):
        encode_histories(d, [USERS[1]], [3], [T0])


def test_another_key_or_no_key_on_a_pseudonymised_output_dir_is_refused(tmp_path, monkeypatch):
    cfg = _setup(tmp_path, monkeypatch)
    v1 = run(cfg)
    out = Path(cfg.output_dir)
    monkeypatch.setenv(ENV, OTHER_KEY)
    with pytest.raises(DataPrepError, match=rf"holds another key \(fingerprint {key_fingerprint(OTHER_KEY.encode())}\).*"
                                            rf"{v1.name} was prepared with \(fingerprint {key_fingerprint(KEY.encode())}\).*would not join"):
        run(cfg)
    with pytest.raises(DataPrepError, match="holds another key"):  # a forget request would match nobody
        record_requests(out, _ids(tmp_path, [GONE]))
    monkeypatch.setenv(ENV, KEY)
    cfg.pseudonymize_user_ids_key_env = ""
    with pytest.raises(DataPrepError, match="pseudonymised user ids .* but pseudonymize_user_ids_key_env is empty"):
        run(cfg)
    assert (out / "LATEST").read_text().strip() == v1.name and not (out / "forget" / "requests.parquet").exists()


def _ids(tmp_path: Path, lines: list[str]) -> Path:
    f = tmp_path / "ids.txt"
    f.write_text("\n".join(lines) + "\n")
    return f


def test_missing_or_short_key_is_one_line_error_naming_the_variable(tmp_path):
    cfg = prep_setup(tmp_path, {"dt=2023-11-14/part-0.parquet": _log()})
    base = [sys.executable, "-m", "data_prep", "--config", str(ROOT / "configs/data_prep/sample.yaml"),
            f"events_path={cfg.events_path}", f"items_path={cfg.items_path}", f"output_dir={cfg.output_dir}", "num_shards=2"]
    env = {k: v for k, v in os.environ.items() if k != ENV}
    for value, msg in ((None, f"error: pseudonymize_user_ids_key_env: environment variable {ENV} is not set or empty; "),
                       ("short", f"error: pseudonymize_user_ids_key_env: the key in environment variable {ENV} has 5 bytes; ")):
        p = subprocess.run(base + [f"pseudonymize_user_ids_key_env={ENV}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env=env if value is None else {**env, ENV: value})
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(msg), lines
    assert not Path(cfg.output_dir).exists()  # refused before anything was written
    # the key itself where the name belongs: refused without echoing it
    p = subprocess.run(base + ["pseudonymize_user_ids_key_env=s3cret-key-value"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "s3cret" not in p.stderr and "name of an environment variable" in p.stderr, p.stderr[-2000:]


# ----------------------------------------------------------------------------- forget


def test_forget_takes_raw_ids_and_the_ledger_keeps_only_pseudonyms(tmp_path, monkeypatch, capsys):
    cfg = _setup(tmp_path, monkeypatch)
    out = Path(cfg.output_dir)
    v1 = run(cfg)
    s = _forget(out, tmp_path, [GONE, SOLO, "rawuid-never-seen"], "--reason", "ticket 4711")
    assert s["pseudonymised"] and s["recorded"] == 3
    ledger = pq.read_table(out / "forget" / "requests.parquet")
    assert ledger.column("user_id").to_pylist() == [expected(GONE), expected(SOLO), expected("rawuid-never-seen")]
    assert set(ledger.column("user_id_form").to_pylist()) == {f"hmac-sha256-128:{key_fingerprint(KEY.encode())}"}
    assert files_holding(out / "forget", RAW_NEEDLES) == []
    assert _forget(out, tmp_path, [GONE])["already_requested"] == 1  # matched under the key
    monkeypatch.delenv(ENV)
    with pytest.raises(SystemExit):  # the operator's shell lacks the key: one line naming the variable, nothing recorded
        _forget(out, tmp_path, ["rawuid-003"])
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: {v1}: environment variable {ENV} is not set or empty;")
    monkeypatch.setenv(ENV, KEY)
    assert pq.read_table(out / "forget" / "requests.parquet").num_rows == 4

    v2 = run(cfg)
    d = load_prepared(v2)
    check_identity(d.manifest)
    assert d.manifest["counts"]["events_filtered"]["forgotten"] == 7 and d.manifest["counts"]["users_forgotten"] == 2
    assert expected(GONE) not in d.sequences["user_id"] and len(d.serving) == 0
    # nothing of theirs under the output_dir but in v1 (prepared before the request) and the ledger (pseudonyms only)
    assert files_holding(out, _gone_needles(), skip=(v1, out / "forget")) == []
    assert files_holding(out, RAW_NEEDLES) == []


def test_turning_pseudonymisation_on_rewrites_a_raw_ledger(tmp_path, monkeypatch):
    cfg = prep_setup(tmp_path, {"dt=2023-11-14/part-0.parquet": _log()})
    out = Path(cfg.output_dir)
    v1 = run(cfg)  # raw ids
    _forget(out, tmp_path, [GONE])
    assert files_holding(out / "forget", [b"gone-4711"])  # the control: the raw ledger holds the raw id
    monkeypatch.setenv(ENV, KEY)
    cfg.pseudonymize_user_ids_key_env = ENV
    v2 = run(cfg)
    m = load_prepared(v2).manifest
    assert m["pseudonymization"]["older_raw_versions"] == [v1.name]
    assert m["counts"]["users_forgotten"] == 1 and expected(GONE) not in load_prepared(v2).sequences["user_id"]
    ledger = pq.read_table(out / "forget" / "requests.parquet")
    assert ledger.column("user_id").to_pylist() == [expected(GONE)]
    assert files_holding(out, RAW_NEEDLES + [b"gone-4711"], skip=(v1,)) == []
    assert run(cfg) == v2  # unchanged inputs and requests (now in pseudonym form): reused


# ----------------------------------------------------------------------------- train, inference, map-back


def test_a_training_run_on_pseudonymised_data_holds_no_raw_id(tmp_path, monkeypatch):
    """prepare (pseudonymised) -> forget by raw id -> prepare -> train: no file of the run holds a raw id, the key, or
    the forgotten user's pseudonym or events."""
    from train.loop import run as train

    cfg = _setup(tmp_path, monkeypatch)
    run(cfg)
    _forget(Path(cfg.output_dir), tmp_path, [GONE, SOLO])
    run(cfg)
    assert train(tiny_train_config(cfg.output_dir, tmp_path / "ck", "p")) == 0
    rd = tmp_path / "ck" / "p"
    assert (rd / "final" / "model.safetensors").is_file() and (rd / "final" / "data_manifest.json").is_file()
    assert files_holding(rd, RAW_NEEDLES + _gone_needles()) == []
    dm = json.loads((rd / "final" / "data_manifest.json").read_text())
    assert dm["pseudonymization"]["key_fingerprint"] == key_fingerprint(KEY.encode())


def _table(tmp_path: Path, prepared: Path, date: str) -> Path:
    from inference.config import InferenceConfig
    from inference.run import run as infer
    from train.export import export_final
    from train.model import RecModelConfig, SeqRecModel

    d = load_prepared(prepared)
    final = tmp_path / "final"
    if not final.exists():
        mcfg = RecModelConfig(num_items=len(d.items), num_event_types=len(d.event_types), item_tower="id", d_model=8,
                              n_layers=1, n_heads=1, max_len=8)
        export_final(final, SeqRecModel(mcfg).state_dict(), mcfg, None, {"test": True}, d.manifest, {}, item_ids=d.items["item_id"])
    infer(InferenceConfig(model_dir=str(final), prepared_dir=str(prepared), output_dir=str(tmp_path / "recs"),
                          run_date=date, k=3, num_threads=1))
    return tmp_path / "recs" / f"dt={date}"


def _read(folder: Path) -> pa.Table:
    return pq.read_table(sorted(folder.resolve().glob("part-*.parquet")), partitioning=None)


@pytest.mark.parametrize("ids", ["string", "int64"])
def test_tables_carry_pseudonyms_and_map_back_restores_raw_ids(tmp_path, monkeypatch, capsys, ids):
    monkeypatch.setenv(ENV, KEY)
    if ids == "string":
        cfg = _setup(tmp_path, monkeypatch)
        raw_users = set(USERS + [GONE, SOLO])
    else:
        cfg = prep_setup(tmp_path, pseudonymize_user_ids_key_env=ENV)  # BASE: int64 ids 1..4
        raw_users = {1, 2, 3, 4}
    v = run(cfg)
    t = _table(tmp_path, v, "2026-11-27")
    recs = _read(t)
    assert set(recs.column("user_id").to_pylist()) == {expected(str(u)) for u in raw_users}
    man = json.loads((t / "_manifest.json").read_text())
    assert man["data"]["pseudonymization"]["key_fingerprint"] == key_fingerprint(KEY.encode()) and man["data"]["user_id_type"] == "string"
    if ids == "string":
        assert files_holding(tmp_path / "recs", RAW_NEEDLES) == []

    # map-back: a copy with raw ids in a folder the operator names, outside recs/ and the prepared root
    for bad in (tmp_path / "recs" / "raw", Path(cfg.output_dir) / "raw"):
        with pytest.raises(SystemExit):
            pseudonym_main(["map-back", "--table", str(t), "--out", str(bad)])
        assert "is inside" in capsys.readouterr().err and not bad.exists()
    s = pseudonym_main(["map-back", "--table", str(t), "--out", str(tmp_path / "secure" / "dt=2026-11-27")])
    back = _read(tmp_path / "secure" / "dt=2026-11-27")
    assert set(back.column("user_id").to_pylist()) == raw_users and s["users_unmatched"] == 0
    assert back.schema.field("user_id").type == (pa.string() if ids == "string" else pa.int64())
    to_raw = {expected(str(u)): u for u in raw_users}
    assert back.drop_columns(["user_id"]).equals(recs.drop_columns(["user_id"]))
    assert back.column("user_id").to_pylist() == [to_raw[p] for p in recs.column("user_id").to_pylist()]
    assert not any(b"rawuid" in p.read_bytes() for p in (tmp_path / "secure").rglob("_map_back.json"))

    # events lacking some users: refused unless asked, then their rows are left out and counted
    part = tmp_path / "partial.parquet"
    ev = pq.read_table(sorted(Path(cfg.events_path).rglob("*.parquet")), partitioning=None)
    first = ev.column("user_id")[0]
    pq.write_table(ev.filter(pc.equal(ev.column("user_id"), first)), part)
    with pytest.raises(SystemExit):
        pseudonym_main(["map-back", "--table", str(t), "--events", str(part), "--out", str(tmp_path / "secure2")])
    assert "have no raw id in --events" in capsys.readouterr().err and not (tmp_path / "secure2").exists()
    s = pseudonym_main(["map-back", "--table", str(t), "--events", str(part), "--out", str(tmp_path / "secure2"), "--allow-unmatched"])
    assert s["users"] == 1 and s["users_unmatched"] == len(raw_users) - 1
    assert _read(tmp_path / "secure2").column("user_id").unique().to_pylist() == [first.as_py()]

    # lookup: raw id -> pseudonym (support questions)
    capsys.readouterr()
    pairs = pseudonym_main(["lookup", "--prepared-dir", cfg.output_dir, "--user-ids", str(_ids(tmp_path, [str(first.as_py())]))])
    assert pairs == [(str(first.as_py()), expected(str(first.as_py())))]
    assert capsys.readouterr().out == f"{first.as_py()}\t{expected(str(first.as_py()))}\n"


def test_after_forgetting_the_next_table_holds_neither_the_raw_id_nor_the_pseudonym(tmp_path, monkeypatch):
    cfg = _setup(tmp_path, monkeypatch)
    v1 = run(cfg)
    _forget(Path(cfg.output_dir), tmp_path, [GONE, SOLO])
    v2 = run(cfg)
    old = _table(tmp_path, v1, "2026-11-26")
    assert expected(GONE) in _read(old).column("user_id").to_pylist()  # before the request
    new = _table(tmp_path, Path(cfg.output_dir), "2026-11-27")
    assert set(_read(new).column("user_id").to_pylist()) == {expected(u) for u in USERS}
    assert files_holding(tmp_path / "recs", RAW_NEEDLES + _gone_needles(), skip=(old.resolve(),)) == []
    assert load_prepared(v2).version == json.loads((new / "_manifest.json").read_text())["data"]["version"]
