"""data_prep's input-completeness check (``expect_events_through``, ``min_day_share``, ``baseline_days``,
``on_incomplete``): a log whose expected day has not landed, or has landed in part, publishes no version; the day's
usable events are counted in the manifest; a rerun on unchanged inputs is judged from its manifest; keep_previous
leaves LATEST on the previous version and exits 0; the command's exit code is 3.

The raw log here: 12 users, one "view" each on each of 10 days (2026-11-01 .. 2026-11-10, 12 events a day).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.config import DataPrepConfig
from data_prep.pipeline import BY_DAY_WINDOW, completeness_problem, events_by_day, run
from data_prep.schema import InputIncomplete
from lmrec_common.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
DAY0 = dt.date(2026, 11, 1)
USERS = 12


def _epoch(day: dt.date, seconds: int = 0) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp()) + seconds


def _day(tmp_path: Path, i: int, n: int = USERS) -> None:
    """Day DAY0 + i as its own dt= partition: ``n`` users' views, an hour apart from 01:00."""
    day = DAY0 + dt.timedelta(days=i)
    t = pa.table({"user_id": pa.array(range(n), pa.int64()), "item_id": pa.array([(u + i) % 10 + 1 for u in range(n)], pa.int64()),
                  "timestamp": pa.array([_epoch(day, 3600 * (1 + u)) for u in range(n)], pa.int64()),
                  "event_type": pa.array(["view"] * n)})
    p = tmp_path / "raw" / "events" / f"dt={day}" / "part-0.parquet"
    p.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, p)


def _log(tmp_path: Path, days: int = 10) -> None:
    for i in range(days):
        _day(tmp_path, i)
    (tmp_path / "raw" / "items").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"item_id": pa.array(range(1, 11), pa.int64()), "title": [f"Item {k}" for k in range(1, 11)]}),
                   tmp_path / "raw" / "items" / "items.parquet")


def _args(tmp_path: Path, **over) -> list[str]:
    ov = {"events_path": tmp_path / "raw" / "events", "items_path": tmp_path / "raw" / "items", "output_dir": tmp_path / "out",
          "num_shards": 2, "num_proc": 1, **over}
    return [f"{k}={v}" for k, v in ov.items()]


def _cfg(tmp_path: Path, **over) -> DataPrepConfig:
    return load_config(DataPrepConfig, None, _args(tmp_path, **over))


def _latest(tmp_path: Path) -> str:
    return (tmp_path / "out" / "LATEST").read_text().strip()


def _versions(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("v"))


# ----------------------------------------------------------------------------- the two functions


def test_events_by_day_counts_usable_events_per_utc_day_over_the_window():
    d = _epoch(DAY0)
    ts = np.array([d + 5, d + 86_399, d + 86_400, d + 3 * 86_400 + 10, d - 40 * 86_400, d + 2 * 86_400], np.int64)
    keep = np.array([True, True, True, True, True, False])  # the last one (day 2) is a duplicate: not usable
    by_day, newest = events_by_day(ts, keep)
    assert newest == d + 3 * 86_400 + 10
    assert len(by_day) == BY_DAY_WINDOW and list(by_day)[-1] == "2026-11-04" and list(by_day) == sorted(by_day)
    assert [by_day[k] for k in ("2026-11-01", "2026-11-02", "2026-11-03", "2026-11-04")] == [2, 1, 0, 1]
    assert by_day[str(DAY0 - dt.timedelta(days=40))] == 1 and sum(by_day.values()) == 5
    assert events_by_day(ts, keep, chunk=2) == (by_day, newest)  # chunking changes nothing
    assert events_by_day(ts[:0]) == ({}, None)
    far = np.array([d - 100 * 86_400, d], np.int64)  # an event older than the window is outside the counts
    assert sum(events_by_day(far)[0].values()) == 1


def test_completeness_problem_names_the_day_its_count_and_the_baseline():
    def cfg(**over) -> DataPrepConfig:
        return load_config(DataPrepConfig, None, [f"{k}={v}" for k, v in over.items()] + ["events_path=/logs"])

    by_day = {str(DAY0 + dt.timedelta(days=i)): n for i, n in enumerate([100, 120, 90, 110, 100, 105, 95, 40])}
    newest = _epoch(DAY0 + dt.timedelta(days=7), 7200)
    assert completeness_problem(by_day, newest, cfg()) is None  # nothing expected
    assert completeness_problem(by_day, newest, cfg(expect_events_through="2026-11-07")) is None  # 95 vs a median of 100
    why = completeness_problem(by_day, newest, cfg(expect_events_through="2026-11-08"))
    assert "2026-11-08 holds 40 usable events, 40% of the median of the 7 days before it (100; min_day_share=0.5)" in why
    assert "/logs" in why
    assert completeness_problem(by_day, newest, cfg(expect_events_through="2026-11-08", min_day_share=0.35)) is None
    assert completeness_problem(by_day, newest, cfg(expect_events_through="2026-11-08", min_day_share=0)) is None
    assert "3 days before it" in completeness_problem(by_day, newest, cfg(expect_events_through="2026-11-08", baseline_days=3))
    why = completeness_problem(by_day, newest, cfg(expect_events_through="2026-11-09"))
    assert why.startswith("the newest usable event is on 2026-11-08 (2026-11-08 02:00 UTC), but expect_events_through=2026-11-09")
    assert "no usable event at all" in completeness_problem({}, None, cfg(expect_events_through="2026-11-09"))
    assert completeness_problem({"2026-11-08": 3}, _epoch(DAY0 + dt.timedelta(days=7)),  # no baseline (a new log): only the day
                                cfg(expect_events_through="2026-11-08")) is None


@pytest.mark.parametrize("over, key", [({"expect_events_through": "2026-11-9"}, "expect_events_through"),
                                       ({"min_day_share": "1.5"}, "min_day_share"), ({"baseline_days": "0"}, "baseline_days"),
                                       ({"on_incomplete": "skip"}, "on_incomplete")])
def test_bad_completeness_settings_are_refused_naming_the_key(tmp_path, over, key):
    with pytest.raises(ConfigError, match=key):
        _cfg(tmp_path, **over)


# ----------------------------------------------------------------------------- the runs


def test_a_day_that_has_not_landed_or_landed_in_part_publishes_nothing(tmp_path):
    _log(tmp_path, days=9)  # through 2026-11-09
    first = run(_cfg(tmp_path))
    m = json.loads((first / "manifest.json").read_text())
    assert m["counts"]["events_newest_utc"] == "2026-11-09T12:00:00+00:00"
    by_day = m["counts"]["events_by_day"]
    assert len(by_day) == BY_DAY_WINDOW and list(by_day)[-1] == "2026-11-09"
    assert [by_day[str(DAY0 + dt.timedelta(days=i))] for i in range(9)] == [USERS] * 9 and sum(by_day.values()) == 9 * USERS

    with pytest.raises(InputIncomplete, match=r"2026-11-10's events have not landed .*unchanged since version "
                                              rf"{first.name}\. Nothing was published; .*LATEST stays {first.name}"):
        run(_cfg(tmp_path, expect_events_through="2026-11-10"))
    _day(tmp_path, 9, n=4)  # 4 of the day's 12 views have landed
    with pytest.raises(InputIncomplete, match=r"2026-11-10 holds 4 usable events, 33% of the median of the 7 days before it \(12;"):
        run(_cfg(tmp_path, expect_events_through="2026-11-10"))
    assert _latest(tmp_path) == first.name and _versions(tmp_path) == [first.name]

    _day(tmp_path, 9)  # the whole day
    second = run(_cfg(tmp_path, expect_events_through="2026-11-10"))
    assert second != first and _latest(tmp_path) == second.name
    m = json.loads((second / "manifest.json").read_text())
    assert m["counts"]["events_by_day"]["2026-11-10"] == USERS and m["counts"]["events_newest_utc"].startswith("2026-11-10T12:00")
    # the same inputs again, expecting the same day: judged from the manifest, the version is reused
    assert run(_cfg(tmp_path, expect_events_through="2026-11-10", min_day_share=0.9)) == second
    assert _versions(tmp_path) == [first.name, second.name]


def test_keep_previous_leaves_latest_on_the_previous_version(tmp_path, capsys):
    _log(tmp_path, days=9)
    with pytest.raises(InputIncomplete, match="Nothing was published. Rerun once"):  # no previous version to keep
        run(_cfg(tmp_path, expect_events_through="2026-11-10", on_incomplete="keep_previous"))
    assert not (tmp_path / "out" / "LATEST").exists()
    first = run(_cfg(tmp_path))
    _day(tmp_path, 9, n=2)
    assert run(_cfg(tmp_path, expect_events_through="2026-11-10", on_incomplete="keep_previous")) == first
    assert _latest(tmp_path) == first.name and _versions(tmp_path) == [first.name]
    out = capsys.readouterr().out
    assert "WARNING: 2026-11-10 holds 2 usable events" in out and f"LATEST stays {first.name} (on_incomplete=keep_previous)" in out


def test_the_command_exits_3_with_one_line(tmp_path):
    _log(tmp_path, days=9)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LMREC_TRACEBACK", None)

    def cli(*over: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "data_prep", *_args(tmp_path), *over], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    p = cli("expect_events_through=2026-11-09")
    assert p.returncode == 0, p.stderr
    p = cli("expect_events_through=2026-11-10")
    assert p.returncode == 3 and "Traceback" not in p.stderr, p.stderr
    [line] = p.stderr.strip().splitlines()
    assert line.startswith("error: the newest usable event is on 2026-11-09") and "Rerun once the events have landed" in line
    p = cli("expect_events_through=2026-11-10", "on_incomplete=keep_previous")
    assert p.returncode == 0 and "WARNING: the newest usable event is on 2026-11-09" in p.stdout + p.stderr


def test_forget_requests_outrank_keeping_the_previous_version(tmp_path, capsys):
    """keep_previous never keeps a version prepared before newer forget requests: the run publishes tonight's inputs
    with the requests applied, warns, and records the unmet expectation in the manifest (the morning check reads it)."""
    from data_prep.forget import main as forget_main
    from data_prep.schema import load_prepared

    _log(tmp_path, days=9)
    first = run(_cfg(tmp_path))
    (tmp_path / "ids.txt").write_text("3\n")
    assert forget_main(["--output-dir", str(tmp_path / "out"), "--user-ids", str(tmp_path / "ids.txt")])["recorded"] == 1
    with pytest.raises(InputIncomplete, match="have not landed"):  # on_incomplete=error: still nothing published
        run(_cfg(tmp_path, expect_events_through="2026-11-10"))
    second = run(_cfg(tmp_path, expect_events_through="2026-11-10", on_incomplete="keep_previous"))
    assert second != first and _latest(tmp_path) == second.name
    p = load_prepared(second)
    assert "3" in load_prepared(first).sequences["user_id"]
    assert "3" not in p.sequences["user_id"] and p.manifest["counts"]["users_forgotten"] == 1
    c = p.manifest["completeness"]
    assert c["expect_events_through"] == "2026-11-10" and "2026-11-10's events have not landed" in c["problem"]
    assert "Published all the same" in capsys.readouterr().out
    assert json.loads((first / "manifest.json").read_text())["completeness"] == {"expect_events_through": None, "problem": None}
