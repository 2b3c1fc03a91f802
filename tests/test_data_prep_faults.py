"""data_prep faults (issue 29 item 6): two concurrent runs on one output_dir (the second is refused, naming the lock),
integer ids that overflow int64 (a uint64 column: one error naming the file, column, row and value), integer epochs
beyond 2**53.

    python -m pytest tests/test_data_prep_faults.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from data_prep.pipeline import run
from data_prep.schema import DataPrepError, load_prepared
from test_data_prep import BASE, catalogue, check_identity, events_table
from test_data_prep import setup as prep_setup

ROOT = Path(__file__).resolve().parent.parent


def test_a_second_concurrent_run_on_one_output_dir_is_refused(tmp_path):
    """Another process holds output_dir/.lock (a data_prep run in progress): this run stops at once, naming it, and
    publishes nothing; once the holder is gone the same command runs."""
    cfg = prep_setup(tmp_path)
    out = Path(cfg.output_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from data_prep.lock import output_dir_lock\n"
                               f"with output_dir_lock(Path({str(out)!r})):\n    print('held', flush=True); sys.stdin.read()"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DataPrepError, match=r"another data_prep run holds .*/out/\.lock \(same output_dir\)"):
            run(cfg)
        assert [p.name for p in out.iterdir()] == [".lock"]
    finally:
        holder.communicate("", timeout=60)
    assert run(cfg).is_dir()


def test_uint64_ids_that_overflow_int64_name_the_file_and_column(tmp_path):
    t = events_table(BASE)
    fits = t.set_column(0, "user_id", pa.array(t.column("user_id").to_pylist(), pa.uint64()))
    assert load_prepared(run(prep_setup(tmp_path / "fits", {"d/a.parquet": fits}))).manifest["user_id_type"] == "int64"
    items = [2**63 + 5 if k == 5 else i for k, i in enumerate(t.column("item_id").to_pylist())]
    big = t.set_column(1, "item_id", pa.array(items, pa.uint64()))
    with pytest.raises(DataPrepError, match=r"events file .*a\.parquet: column 'item_id' is uint64 and 1 of its values overflow "
                                            r"int64, the first at row 5: 9223372036854775813 > 9223372036854775807"):
        run(prep_setup(tmp_path / "ev", {"d/a.parquet": big}))
    cat = catalogue()
    cat = cat.set_column(0, "item_id", pa.array([2**64 - 1] + cat.column("item_id").to_pylist()[1:], pa.uint64()))
    with pytest.raises(DataPrepError, match=r"items file .*items\.parquet: column 'item_id' is uint64 .* row 0: 18446744073709551615"):
        run(prep_setup(tmp_path / "it", items=cat))
    # a uint64 timestamp beyond int64 is an unparsable value of one row (quarantined), not an Arrow error
    ts = t.set_column(2, "timestamp", pa.array([2**64 - 1] + t.column("timestamp").to_pylist()[1:], pa.uint64()))
    v = run(prep_setup(tmp_path / "ts", {"d/a.parquet": ts}))
    m = json.loads((v / "manifest.json").read_text())
    assert m["counts"]["events_quarantined"]["bad_timestamp"] == 1
    check_identity(m)
    # integer epochs in ns (beyond 2**53) are detected as ns, not an Arrow cast error
    ns = t.set_column(2, "timestamp", pa.array([x * 10**9 for x in t.column("timestamp").to_pylist()], pa.int64()))
    v = run(prep_setup(tmp_path / "ns", {"d/a.parquet": ns}))
    assert load_prepared(v).sequences["timestamp"] == load_prepared(run(prep_setup(tmp_path / "s"))).sequences["timestamp"]


def test_leftovers_of_killed_runs_are_removed_by_the_next_run(tmp_path):
    """A data_prep run killed (kill -9, OOM) leaves its staging folder (a whole prepared copy, named after its own
    version), its datasets cache and half-written cache entries. Version names are new every run, so before, the next
    run removed only the staging folders of ITS version name and each killed run kept a copy forever
    (bench/fault_suite.py kill9_data_prep). The next run holds the output_dir lock, so every such name is stale."""
    cfg = prep_setup(tmp_path)
    out = Path(cfg.output_dir)
    stale = [out / ".tmp-v20200101T000000-4242-deadbeef" / "items", out / ".old-v20200101T000000-4242-cafe" / "x",
             out / "_cache" / "hf-4242" / "y", out / "_cache" / "validated" / ".tmp-0123abcd-4242" / "kept.arrow"]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half written")
    (out / "_cache" / "tokens").mkdir(parents=True)
    (out / "_cache" / "tokens" / ".tmp-abc.parquet-4242-0badf00d").write_bytes(b"half")
    v = run(cfg)
    hidden = sorted(p.relative_to(out).as_posix() for p in out.rglob(".*") if p.name not in (".lock",))
    assert hidden == [] and not list((out / "_cache").glob("hf-*")), hidden
    assert sorted(p.name for p in out.iterdir()) == sorted([".lock", "LATEST", "_cache", v.name])


def test_a_file_rewritten_with_the_same_size_and_mtime_is_not_reused_stale(tmp_path):
    """Validation results and version reuse are keyed by the bytes (sha256), not (size, mtime): an events file rewritten
    with other values of the same width and its mtime set back is validated again and gives a new version."""
    import os
    import time

    import pyarrow.parquet as pq

    cfg = prep_setup(tmp_path)
    f = tmp_path / "raw" / "events" / "dt=2023-11-14" / "part-0.parquet"
    kw = dict(compression="NONE", use_dictionary=False, write_statistics=False)  # the bytes follow the values 1:1
    t = events_table(BASE)
    pq.write_table(t, f, **kw)
    v1 = run(cfg)
    st = f.stat()
    items = t.column("item_id").to_pylist()
    items[0], items[5] = items[5], items[0]  # two events of user 1 and user 2 swap items: other data, same bytes count
    assert items[0] != items[5]
    pq.write_table(t.set_column(1, "item_id", pa.array(items, pa.int64())), f, **kw)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    time.sleep(1.1)  # version names have one-second resolution
    v2 = run(cfg)
    m2 = json.loads((v2 / "manifest.json").read_text())
    assert v2 != v1 and m2["reuse"]["events_files_reused"] == []
    seq1, seq2 = (load_prepared(v).sequences.to_dict()["item_idx"] for v in (v1, v2))
    assert seq1 != seq2
