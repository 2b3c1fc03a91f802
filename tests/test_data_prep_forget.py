"""Forgetting users (issue 28 item 3): python -m data_prep.forget records requests, the next data_prep drops the users'
events everywhere (sequences, serving, quarantine, its cache), counts them, never reuses a version prepared before the
request, and the next table has no row for them.

    python -m pytest tests/test_data_prep_forget.py -q

Fixtures are tiny Parquet logs written here (string user ids, so that a byte search for the id means something).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.forget import main as forget_main
from data_prep.pipeline import run
from data_prep.schema import DataPrepError, load_prepared
from test_data_prep import T0, check_identity, quarantine
from test_data_prep import setup as prep_setup

ROOT = Path(__file__).resolve().parent.parent
GONE = "zed-4711-forgetme"  # 3 usable events, one of each late/early quarantine reason, one more in a later file
SOLO = "solo-4712-forgetme"  # a single event: a serving/ user
GONE_TS = [T0 + 777_001 + k for k in range(7)]  # timestamps no other user has: their bytes identify the events


def _log(extra_day: bool = False) -> pa.Table:
    rows = [(f"user-{u}", 1 + (u * 3 + k) % 10, T0 + 100 * k + u, "view") for u in range(6) for k in range(4)]
    rows += [("user-0", 2, T0 + 5000, "teleport")]  # a quarantined row of a user who stays
    if not extra_day:
        rows += [(GONE, 1, GONE_TS[0], "view"), (GONE, 2, GONE_TS[1], "click"), (GONE, 3, GONE_TS[2], "view"),
                 (GONE, 4, GONE_TS[3], "teleport"),  # unknown_event_type (quarantined at validation)
                 (GONE, 3, GONE_TS[2], "view"),  # duplicate (quarantined in the global stage)
                 (GONE, 999, GONE_TS[4], "view"),  # item_not_in_catalogue (global stage)
                 (SOLO, 5, GONE_TS[5], "view")]
    else:
        rows = [(f"user-{u}", 7, T0 + 90_000 + u, "view") for u in range(6)] + [(GONE, 6, GONE_TS[6], "view")]
    u, i, t, e = zip(*rows)
    return pa.table({"user_id": pa.array(u), "item_id": pa.array(i, pa.int64()), "timestamp": pa.array(t, pa.int64()),
                     "event_type": pa.array(e)})


def tiny_train_config(data, output_dir: Path, run_name: str):
    """A 4-step id-only training run on ``data`` (a prepared output_dir), checkpointing and evaluating every 2 steps."""
    from lmrec_common.config import load_config
    from train.config import TrainConfig

    return load_config(TrainConfig, None, [f"data={data}", f"output_dir={output_dir}", f"run_name={run_name}",
                                           "model.item_tower=id", "model.d_model=8", "model.n_layers=1", "model.max_len=8",
                                           "batch_size=4", "max_steps=4", "eval_every=2", "save_every=2", "tracker=none",
                                           "optim.warmup_steps=1", "log_every=1"])


def files_holding(root: Path, needles: list[bytes], skip: tuple[Path, ...] = ()) -> list[str]:
    """Files under ``root`` (but ``skip``) holding any of ``needles`` (bytes), as "path: needle"."""
    hits = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(p.is_relative_to(s) for s in skip):
            data = p.read_bytes()
            hits += [f"{p.relative_to(root)}: {n!r}" for n in needles if n in data]
    return hits


def _files_mentioning(root: Path, skip: tuple[Path, ...] = ()) -> list[str]:
    """Files under ``root`` (but ``skip``) holding a forgotten id or the bytes of one of their timestamps."""
    return files_holding(root, [b"forgetme"] + [np.int64(t).tobytes() for t in GONE_TS] + [str(t).encode() for t in GONE_TS], skip)


def _forget(out: Path, tmp_path: Path, lines: list[str], *extra: str) -> dict:
    f = tmp_path / "ids.txt"
    f.write_text("\n".join(lines) + "\n")
    return forget_main(["--output-dir", str(out), "--user-ids", str(f), *extra])


def test_forgotten_users_leave_every_file_of_the_next_version_and_the_cache(tmp_path, capsys):
    cfg = prep_setup(tmp_path, {"dt=2023-11-14/part-0.parquet": _log()})
    out = Path(cfg.output_dir)
    v1 = run(cfg)
    m1 = load_prepared(v1).manifest
    assert _files_mentioning(v1), "the search must find the users in a version prepared before the request"
    assert m1["counts"]["events_filtered"] == {"single_event": 1, "forgotten": 0} and m1["forget"]["requests"] == 0

    s = _forget(out, tmp_path, [GONE, "", SOLO, GONE, "never-seen-user"], "--reason", "ticket 4711")
    assert (s["recorded"], s["already_requested"], s["versions_holding_data"]) == (3, 0, [v1.name])
    assert "Versions published before this request still hold their data" in capsys.readouterr().out
    ledger = pq.read_table(out / "forget" / "requests.parquet")
    assert ledger.column("user_id").to_pylist() == [GONE, SOLO, "never-seen-user"]
    assert set(ledger.column("reason").to_pylist()) == {"ticket 4711"} and ledger.schema.field("requested_at").type.tz == "UTC"

    v2 = run(cfg)  # same input files: must not reuse v1, prepared before the request
    assert v2 != v1 and (out / "LATEST").read_text().strip() == v2.name
    d = load_prepared(v2)
    c, c1 = d.manifest["counts"], m1["counts"]
    check_identity(d.manifest)
    assert c["events_read"] == c1["events_read"] == 32
    assert c["events_filtered"] == {"single_event": 0, "forgotten": 7} and c["users_forgotten"] == 2
    assert c["events_kept"] == c1["events_kept"] - 3 and c["users"] == c1["users"] - 1
    assert c["events_quarantined"]["unknown_event_type"] == 1  # user-0's row stays quarantined
    assert c["events_quarantined"]["duplicate"] == 0 and c["events_quarantined"]["item_not_in_catalogue"] == 0
    assert quarantine(v2).column("user_id").to_pylist() == ["user-0"]
    assert GONE not in d.sequences["user_id"] and SOLO not in d.serving["user_id"] and len(d.serving) == 0
    f = d.manifest["forget"]
    assert (f["requests"], f["users_requested"], f["users_forgotten"], f["events_forgotten"]) == (3, 3, 2, 7)
    assert f["older_versions"] == [v1.name]
    # no file of the new version, nor of data_prep's cache, holds their ids or events (the ledger and v1 do)
    assert _files_mentioning(out, skip=(v1, out / "forget")) == []

    # a rerun reuses v2 (same inputs, same requests); a repeated request forgets nobody new: still v2
    assert run(cfg) == v2
    assert _forget(out, tmp_path, [SOLO])["already_requested"] == 1
    assert run(cfg) == v2

    # a new partition: the cached file is reused as scrubbed (counts carried in its cache entry), the new one scrubbed
    p = Path(cfg.events_path) / "dt=2023-11-15" / "part-0.parquet"
    p.parent.mkdir()
    pq.write_table(_log(extra_day=True), p)
    v3 = run(cfg)
    m3 = load_prepared(v3).manifest
    check_identity(m3)
    assert m3["reuse"]["events_files_reused"] == [str(Path(cfg.events_path).resolve() / "dt=2023-11-14" / "part-0.parquet")]
    assert m3["counts"]["events_filtered"]["forgotten"] == 8 and m3["counts"]["users_forgotten"] == 2
    assert _files_mentioning(out, skip=(v1, out / "forget")) == []


def test_the_next_table_has_no_row_for_a_forgotten_user(tmp_path):
    """prepare -> forget -> prepare -> inference (an untrained id-only model exported on the new version)."""
    from inference.config import InferenceConfig
    from inference.run import run as infer
    from train.export import export_final
    from train.model import RecModelConfig, SeqRecModel

    cfg = prep_setup(tmp_path, {"dt=2023-11-14/part-0.parquet": _log()})
    v1 = run(cfg)
    _forget(Path(cfg.output_dir), tmp_path, [GONE, SOLO])
    v2 = run(cfg)
    d = load_prepared(v2)
    mcfg = RecModelConfig(num_items=len(d.items), num_event_types=len(d.event_types), item_tower="id", d_model=8,
                          n_layers=1, n_heads=1, max_len=8)
    export_final(tmp_path / "final", SeqRecModel(mcfg).state_dict(), mcfg, None, {"test": True}, d.manifest, {},
                 item_ids=d.items["item_id"])

    def table_users(prepared: Path, out: Path, date: str) -> set:
        t = infer(InferenceConfig(model_dir=str(tmp_path / "final"), prepared_dir=str(prepared), output_dir=str(out),
                                  run_date=date, k=3, num_threads=1))
        return set(pq.read_table(sorted(t.glob("part-*.parquet")), partitioning=None).column("user_id").to_pylist())

    regular = {f"user-{u}" for u in range(6)}
    assert table_users(v1, tmp_path / "old", "2026-11-26") == regular | {GONE, SOLO}  # last night, before the request
    assert table_users(Path(cfg.output_dir), tmp_path / "recs", "2026-11-27") == regular  # LATEST = v2
    assert _files_mentioning(tmp_path / "recs") == []


@pytest.mark.parametrize(
    "lines, match",
    [
        (["user-1", " user-2"], r"ids\.txt:2: ' user-2': leading or trailing whitespace"),
        (["user-1", "user\t2"], r"ids\.txt:2: .*control character"),
        ([], r"no user id in the file"),
    ],
)
def test_malformed_forget_file_names_the_line_and_records_nothing(tmp_path, capsys, lines, match):
    cfg = prep_setup(tmp_path, {"dt=2023-11-14/part-0.parquet": _log()})
    run(cfg)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _forget(Path(cfg.output_dir), tmp_path, lines)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert __import__("re").search(match, err), err
    assert not (Path(cfg.output_dir) / "forget" / "requests.parquet").exists()


def test_int_user_ids_must_be_written_as_the_table_prints_them(tmp_path, capsys):
    cfg = prep_setup(tmp_path)  # BASE: int64 user ids 1..4
    out = Path(cfg.output_dir)
    with pytest.raises(SystemExit):  # before any data_prep run: not a prepared root
        _forget(out, tmp_path, ["1"])
    assert "is not a prepared root (no LATEST)" in capsys.readouterr().err
    run(cfg)
    capsys.readouterr()
    for bad in ("007", "abc", "9223372036854775808"):
        with pytest.raises(SystemExit):
            _forget(out, tmp_path, ["2", bad, "x y"])
        err = capsys.readouterr().err
        assert f"ids.txt:2: {bad!r}: not an int64 id as the table prints it" in err and "(1 more malformed line(s))" in err
    (tmp_path / "ids.txt").write_bytes(b"2\n\xff\xfe\n")
    with pytest.raises(SystemExit):
        forget_main(["--output-dir", str(out), "--user-ids", str(tmp_path / "ids.txt")])
    assert "ids.txt:2: not valid UTF-8" in capsys.readouterr().err
    assert not (out / "forget" / "requests.parquet").exists()
    _forget(out, tmp_path, ["2"])
    v = run(cfg)
    m = load_prepared(v).manifest
    assert m["counts"]["events_filtered"]["forgotten"] == 4 and "2" not in load_prepared(v).sequences["user_id"]
    check_identity(m)


def test_forget_cli_error_is_one_line_without_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "data_prep.forget", "--output-dir", str(tmp_path / "nope"), "--user-ids",
                        str(tmp_path / "ids.txt")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [f"error: --output-dir {tmp_path / 'nope'} is not a prepared root (no LATEST): "
                                             "give the output_dir of python -m data_prep (the folder holding LATEST and the versions)"]


def test_a_corrupt_ledger_stops_data_prep(tmp_path):
    cfg = prep_setup(tmp_path)
    (Path(cfg.output_dir) / "forget").mkdir(parents=True)
    (Path(cfg.output_dir) / "forget" / "requests.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataPrepError, match=r"requests\.parquet: cannot read the forget ledger"):
        run(cfg)


def test_a_new_training_run_on_the_next_version_holds_nothing_of_a_forgotten_user(tmp_path):
    """prepare -> forget -> prepare -> train (checkpoints, best/, final/, logs): no file of the new run mentions the
    forgotten users or their events."""
    from train.loop import run as train

    cfg = prep_setup(tmp_path, {"dt=2023-11-14/part-0.parquet": _log()})
    run(cfg)
    _forget(Path(cfg.output_dir), tmp_path, [GONE, SOLO])
    run(cfg)
    assert train(tiny_train_config(cfg.output_dir, tmp_path / "ck", "after")) == 0
    rd = tmp_path / "ck" / "after"
    assert (rd / "final" / "model.safetensors").is_file() and any(rd.glob("step_*"))
    assert _files_mentioning(rd) == []


def test_forget_under_id_normalization_reaches_quarantined_rows_with_raw_id_forms(tmp_path):
    # with id_normalization=trim the request "zed-..." must also drop a quarantined row written " zed-... " (raw form)
    t = _log()
    raw = [f" {u} " if u == GONE and e == "teleport" else u for u, e in zip(t.column("user_id").to_pylist(), t.column("event_type").to_pylist())]
    cfg = prep_setup(tmp_path, {"dt=2023-11-14/part-0.parquet": t.set_column(0, "user_id", pa.array(raw))}, id_normalization="trim")
    out = Path(cfg.output_dir)
    v1 = run(cfg)
    assert f" {GONE} " in quarantine(v1).column("user_id").to_pylist()  # quarantine keeps what the file held
    _forget(out, tmp_path, [GONE])
    v2 = run(cfg)
    assert load_prepared(v2).manifest["counts"]["events_filtered"]["forgotten"] == 6
    assert quarantine(v2).column("user_id").to_pylist() == ["user-0"]
    assert [p for p in out.rglob("*") if p.is_file() and not p.is_relative_to(v1) and not p.is_relative_to(out / "forget")
            and GONE.encode() in p.read_bytes()] == []
