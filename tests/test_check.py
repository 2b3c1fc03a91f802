"""The morning check of a published table (inference/check.py, ``python -m inference.check``): a whole, fresh table
passes; every way a table can be absent, stale, incomplete or wrong is named, with the users or items concerned.

One table is published once (30 users, 40 items of which 3 unavailable, K = 5, a tiny hybrid model); each test damages
a copy of it (rewriting one part file with the rows changed) and checks what the check says.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from inference.check import check_table
from inference.config import InferenceConfig
from inference.run import run

sys.path.insert(0, str(Path(__file__).parent))
from test_inference import DATE, K, _fix_vocab_hash, world  # noqa: E402,F401  (world: the module fixture)

ROOT = Path(__file__).resolve().parent.parent
UNAVAILABLE = {"i0", "i5", "i9"}


@pytest.fixture(scope="module")
def table(world, tmp_path_factory):  # noqa: F811
    """recs/dt=DATE published from prepared v1 with three items unavailable (in a prepared root of its own)."""
    import datasets

    root = tmp_path_factory.mktemp("check")
    v1 = root / "prepared" / "v1"
    shutil.copytree(world["v1"], v1)
    items = datasets.load_from_disk(str(v1 / "items")).map(lambda r: {"available": r["item_id"] not in UNAVAILABLE})
    items.save_to_disk(str(root / "items_new"))
    shutil.rmtree(v1 / "items")
    (root / "items_new").rename(v1 / "items")
    _fix_vocab_hash(v1)
    (root / "prepared" / "LATEST").write_text("v1\n")
    run(_cfg(world, root / "prepared", root / "recs"))
    return {"root": root, "recs": root / "recs", "prepared": root / "prepared", "v1": v1}


def _cfg(world, prepared: Path, recs: Path, *over: str) -> InferenceConfig:  # noqa: F811
    """The table's inference config (tonight's prepared root, K, exclusions); the check's report beside ``recs``."""
    from lmrec_common.config import load_config

    return load_config(InferenceConfig, ROOT / "configs/inference/ci.yaml",
                       [f"model_dir={world['final']}", f"prepared_dir={prepared}", f"output_dir={recs}",
                        f"run_date={DATE}", f"k={K}", "exclude_seen=true", "exclude_unavailable=true",
                        "active_since_days=0", "num_threads=1", f"check.report={recs.parent / 'check.json'}", *over])


def _copy(table, tmp_path) -> tuple[Path, Path]:
    """A copy of the published table (link + run folder); returns (recs, the run folder)."""
    recs = tmp_path / "recs"
    shutil.copytree(table["recs"], recs, symlinks=True)
    return recs, Path(os.path.realpath(recs / f"dt={DATE}"))


def _rewrite(folder: Path, change) -> None:
    """Rewrite the (one) part file with ``change(list of row dicts)`` applied, keeping its schema."""
    [part] = sorted(folder.glob("part-*.parquet"))
    t = pq.read_table(part)
    rows = t.to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), part)


def _problems(rep: dict) -> str:
    return "\n".join(f"{p['check']}: {p['what']} {p['examples']}" for p in rep["problems"])


def test_a_whole_fresh_table_passes_and_its_counts_are_read_from_the_files(world, table, tmp_path):  # noqa: F811
    rep = check_table(_cfg(world, table["prepared"], table["recs"], f"check.report={tmp_path / 'check.json'}"))
    assert rep["ok"], _problems(rep)
    c = rep["counts"]
    assert c["users"] == c["users_prepared"] == 30 and c["rows"] == 30 * K and c["users_without_rows"] == 0
    assert rep["data_version"] == rep["tonight_data_version"] == "v1"
    assert json.loads((tmp_path / "check.json").read_text()) == rep
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def cli(date: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "inference.check", "--config", "configs/inference/ci.yaml",
                               f"output_dir={table['recs']}", f"prepared_dir={table['prepared']}", f"run_date={date}",
                               f"k={K}", "exclude_seen=true", "exclude_unavailable=true", "active_since_days=0",
                               f"check.report={tmp_path / 'cli.json'}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    p = cli(DATE)
    assert p.returncode == 0 and ": OK |" in p.stdout, p.stdout + p.stderr
    p = cli("2026-11-28")
    assert p.returncode == 1 and "no table" in p.stdout, p.stdout + p.stderr  # the alert: no table for that date
    p = cli("27-11-2026")
    assert p.returncode == 2 and p.stderr.strip().startswith("error: run_date") and "Traceback" not in p.stderr, p.stderr


def test_a_stale_or_misconfigured_table_is_named(world, table, tmp_path):  # noqa: F811
    """Tonight's data is a newer version than the table was computed from, and the table's K is not the config's."""
    prep = tmp_path / "prepared"
    shutil.copytree(table["prepared"], prep)
    shutil.copytree(prep / "v1", prep / "v2")
    m = json.loads((prep / "v2" / "manifest.json").read_text())
    m["version"] = "v2"
    (prep / "v2" / "manifest.json").write_text(json.dumps(m))
    (prep / "LATEST").write_text("v2\n")
    rep = check_table(_cfg(world, prep, table["recs"], "k=10", f"check.report={tmp_path / 'check.json'}"))
    text = _problems(rep)
    assert not rep["ok"] and "computed from prepared version 'v1'" in text and "holds 'v2'" in text
    assert "the table has K = 5, the config asks for 10" in text


def test_a_table_made_from_data_that_stops_before_the_expected_day_is_named(world, table, tmp_path):  # noqa: F811
    """check.expect_events_through: a whole table made from prepared data whose newest usable event is older than the
    day tonight's log should reach (data_prep kept the previous version: on_incomplete=keep_previous) is stale."""
    prep = tmp_path / "prepared"  # the table's prepared data, its manifest recording the newest event as data_prep does
    shutil.copytree(table["prepared"], prep)
    m = json.loads((prep / "v1" / "manifest.json").read_text())
    m["counts"]["events_newest_utc"] = "2026-11-25T23:10:00+00:00"
    (prep / "v1" / "manifest.json").write_text(json.dumps(m))

    def check(prepared: Path, day: str, name: str) -> dict:
        return check_table(_cfg(world, prepared, table["recs"], f"check.expect_events_through={day}",
                                f"check.report={tmp_path / name}"))
    rep = check(prep, "2026-11-25", "a.json")
    assert rep["ok"] and rep["data_through"] == "2026-11-25T23:10:00+00:00", _problems(rep)
    rep = check(prep, "2026-11-26", "b.json")
    assert not rep["ok"] and [p["check"] for p in rep["problems"]] == ["fresh"], _problems(rep)
    assert "ends on 2026-11-25, before 2026-11-26" in _problems(rep)
    rep = check(table["prepared"], "2026-11-25", "c.json")  # prepared before data_prep counted events per day
    assert not rep["ok"] and "does not record its newest event" in _problems(rep)
    with pytest.raises(Exception, match="check.expect_events_through '2026-1-1' is not YYYY-MM-DD"):
        check(prep, "2026-1-1", "d.json")
    # published although incomplete (forget requests outranked keeping the previous version): named, whatever is expected
    m["completeness"] = {"expect_events_through": "2026-11-26", "problem": "2026-11-26 holds 4 usable events, 33% of ..."}
    (prep / "v1" / "manifest.json").write_text(json.dumps(m))
    rep = check_table(_cfg(world, prep, table["recs"], f"check.report={tmp_path / 'e.json'}"))
    assert not rep["ok"] and "was published incomplete: 2026-11-26 holds 4 usable events" in _problems(rep)


def test_missing_part_and_missing_users_are_named(world, table, tmp_path):  # noqa: F811
    recs, folder = _copy(table, tmp_path)
    users = sorted({r["user_id"] for r in pq.read_table(next(folder.glob("part-*.parquet"))).to_pylist()})
    gone = users[:2]
    _rewrite(folder, lambda rows: rows.__setitem__(slice(None), [r for r in rows if r["user_id"] not in gone]))
    rep = check_table(_cfg(world, table["prepared"], recs))
    text = _problems(rep)
    assert "2 of tonight's 30 prepared users have no rows" in text and all(str(u) in text for u in gone)
    assert "rows, the manifest records" in text  # the part no longer has the rows its manifest entry says
    [part] = folder.glob("part-*.parquet")
    part.unlink()
    rep = check_table(_cfg(world, table["prepared"], recs))
    assert "part file(s) the manifest lists are missing" in _problems(rep) and rep["counts"]["users"] == 0


@pytest.mark.parametrize("fault,expect", [
    ("duplicate", "users recommended one item twice"),
    ("rank_gap", "users whose ranks are not 1..n"),
    ("rising", "users whose scores rise with rank"),
    ("unknown_item", "rows whose item is not in tonight's catalogue"),
    ("unavailable", "rows of unavailable items"),
    ("seen", "rows of items the user has seen"),
    ("date", "rows whose run_date is not the table's date"),
    ("mixed_source", "users whose rows mix sources"),
    ("split_user", "users have rows in more than one place"),
])
def test_each_wrong_row_is_named_with_its_user(world, table, tmp_path, fault, expect):  # noqa: F811
    """One fault in one user's rows (the part's row count unchanged): the check names the fault and that user."""
    import datetime as dt

    import datasets

    recs, folder = _copy(table, tmp_path)
    rows0 = pq.read_table(next(folder.glob("part-*.parquet"))).to_pylist()
    victim = rows0[3 * K]["user_id"]  # the 4th user in the file
    seq = datasets.load_from_disk(str(table["v1"] / "sequences"))
    item_ids = datasets.load_from_disk(str(table["v1"] / "items"))["item_id"]
    history = {item_ids[i] for i in seq.filter(lambda r: r["user_id"] == str(victim))[0]["item_idx"]}

    def change(rows):
        mine = [r for r in rows if r["user_id"] == victim]
        if fault == "duplicate":
            mine[1]["item_id"] = mine[0]["item_id"]
        elif fault == "rank_gap":
            mine[2]["rank"] = 7
        elif fault == "rising":
            mine[3]["score"] = mine[0]["score"] + 1.0
        elif fault == "unknown_item":
            mine[4]["item_id"] = "no-such-item"
        elif fault == "unavailable":
            mine[4]["item_id"] = sorted(UNAVAILABLE - {r["item_id"] for r in mine})[0]
        elif fault == "seen":
            mine[4]["item_id"] = sorted(history - {r["item_id"] for r in mine})[0]
        elif fault == "date":
            mine[0]["run_date"] = dt.date(2026, 11, 26)
        elif fault == "mixed_source":
            mine[4]["source"] = "fallback"
        elif fault == "split_user":  # the victim's last row moved to the end of the file
            rows.remove(mine[-1])
            rows.append(mine[-1])
    _rewrite(folder, change)
    rep = check_table(_cfg(world, table["prepared"], recs))
    hit = [p for p in rep["problems"] if expect in p["what"]]
    assert not rep["ok"] and hit, _problems(rep)
    named = [e.split(": ")[0] for e in hit[0]["examples"]]  # item faults are named "user: item"
    assert str(victim) in named if fault != "date" else hit[0]["examples"] == ["2026-11-26"], _problems(rep)


PREV = "2026-11-26"  # the night before DATE


def _previous(recs: Path, folder: Path, change=None, date: str = PREV) -> Path:
    """A previous night's table beside tonight's: a copy of tonight's run folder as ``dt=<date>``'s run, its rows
    changed by ``change`` (as _rewrite) and its manifest's row counts kept as they are (the check reads its files)."""
    prev = recs / "_runs" / f"dt={date}" / "run=prev"
    shutil.copytree(folder, prev)
    os.symlink(os.path.relpath(prev, recs), recs / f"dt={date}")
    if change is not None:
        _rewrite(prev, change)
    return prev


def test_tonight_is_compared_with_the_previous_nights_table(world, table, tmp_path):  # noqa: F811
    """Section 7: with no earlier table nothing is compared; the same lists as last night pass with a full overlap; an
    older table than previous_max_age_days, one that is not whole, and compare_previous=false are not compared."""
    recs, folder = _copy(table, tmp_path)
    rep = check_table(_cfg(world, table["prepared"], recs))
    assert rep["ok"] and rep["previous"] is None, _problems(rep)
    c = rep["content"]
    assert c["users"] == 30 and c["users_fallback"] == rep["counts"]["rows_by_source"].get("fallback", 0) // K
    assert 0 < c["items_recommended"] <= 37 and c["coverage"] == pytest.approx(c["items_recommended"] / 37)
    _previous(recs, folder)
    rep = check_table(_cfg(world, table["prepared"], recs))
    p = rep["previous"]
    assert rep["ok"] and p["compared"] and p["run_date"] == PREV, _problems(rep)
    assert p["users"] == 30 and p["items_recommended"] == c["items_recommended"] and p["top10_overlap"] == 1.0
    import datasets
    seq = datasets.load_from_disk(str(table["v1"] / "sequences"))  # chance: K of the items each user may be shown
    chance = sum(K / max(37 - len(set(h)), K) for h in seq["item_idx"]) / len(seq)  # (no fallback users here)
    assert p["top10_overlap_beyond_chance"] == 1.0 and p["top10_overlap_chance"] == pytest.approx(chance, abs=1e-6)
    assert p["users_in_both_by_model"] == 30 - c["users_fallback"]
    rep = check_table(_cfg(world, table["prepared"], recs, "check.compare_previous=false"))
    assert rep["ok"] and "previous" not in rep
    os.rename(recs / f"dt={PREV}", recs / "dt=2026-11-19")  # 8 days before: beyond previous_max_age_days (7)
    rep = check_table(_cfg(world, table["prepared"], recs))
    assert rep["ok"] and rep["previous"] is None
    rep = check_table(_cfg(world, table["prepared"], recs, "check.previous_max_age_days=8"))
    assert rep["previous"]["run_date"] == "2026-11-19"
    os.unlink(recs / "_runs" / f"dt={PREV}" / "run=prev" / "_SUCCESS")  # a previous table that is not whole
    rep = check_table(_cfg(world, table["prepared"], recs, "check.previous_max_age_days=8"))
    assert rep["ok"] and rep["previous"]["compared"] is False
    from lmrec_common.config import ConfigError
    with pytest.raises(ConfigError, match="min_users_ratio must be in"):
        _cfg(world, table["prepared"], recs, "check.min_users_ratio=1.5")


def test_a_table_unlike_the_previous_nights_is_named(world, table, tmp_path):  # noqa: F811
    """Whole tables whose content is wrong: half of last night's users, lists of items unrelated to last night's and
    onto a fraction of its distinct items, and many more users on the popularity fallback. Each rule is named, and
    each turns off at its neutral value."""
    recs, folder = _copy(table, tmp_path)

    def ghosts(rows):  # last night also served 30 users that tonight's table has lost
        rows.extend({**r, "user_id": f"ghost-{r['user_id']}"} for r in list(rows))
    _previous(recs, folder, ghosts)
    rep = check_table(_cfg(world, table["prepared"], recs))
    assert [p["check"] for p in rep["problems"]] == ["content"], _problems(rep)
    assert "serves 30 users, 50% of the 60 in dt=2026-11-26's table (check.min_users_ratio 0.9)" in _problems(rep)
    assert check_table(_cfg(world, table["prepared"], recs, "check.min_users_ratio=0.5"))["ok"]

    recs, folder = _copy(table, tmp_path / "b")
    n = iter(range(10**6))

    def unrelated(rows):  # last night's lists: 150 distinct items (gone from the catalogue since), none of tonight's
        for r in rows:
            r["item_id"] = f"old-{next(n)}"
    _previous(recs, folder, unrelated)
    rep = check_table(_cfg(world, table["prepared"], recs))
    text = _problems(rep)
    items = rep["content"]["items_recommended"]
    assert f"the lists hold {items} distinct items, {items / 150:.0%} of the 150 in dt=2026-11-26's table" in text, text
    assert "keep 0.0% of their top-10 items from dt=2026-11-26's table on average" in text, text
    assert rep["previous"]["top10_overlap"] == 0.0 and rep["previous"]["items_recommended"] == 150
    assert check_table(_cfg(world, table["prepared"], recs, "check.min_items_ratio=0", "check.min_top10_overlap=0"))["ok"]

    recs, folder = _copy(table, tmp_path / "c")
    _previous(recs, folder)
    model_users = [u for u in dict.fromkeys(r["user_id"] for r in pq.read_table(folder).to_pylist()
                                              if r["source"] == "model")][:6]

    def to_fallback(rows):  # tonight: six more users served from the popularity fallback
        for r in rows:
            if r["user_id"] in model_users:
                r["source"] = "fallback"
    _rewrite(folder, to_fallback)
    rep = check_table(_cfg(world, table["prepared"], recs))
    share = rep["content"]["fallback_share"]
    assert share - rep["previous"]["fallback_share"] == pytest.approx(0.2)
    assert f"{share:.1%} of the users get the popularity fallback, against" in _problems(rep), _problems(rep)
    assert [p["check"] for p in rep["problems"]] == ["content"]
    assert check_table(_cfg(world, table["prepared"], recs, "check.max_fallback_rise=1"))["ok"]


def _prom(path: Path) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}; every sample line must parse, every series has a TYPE line."""
    out, typed = {}, set()
    for line in path.read_text().splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            assert series.split("{")[0] in typed, line
            out[series] = float(value)
    return out


def test_the_verdict_and_figures_go_to_a_prometheus_textfile(world, table, tmp_path):  # noqa: F811
    """check.metrics_file: gauges labelled with the table, the problems counted per check; rewritten by each check."""
    recs, folder = _copy(table, tmp_path)
    prom = tmp_path / "textfile" / "lmrec.prom"
    prom.parent.mkdir()
    rep = check_table(_cfg(world, table["prepared"], recs, f"check.metrics_file={prom}"))
    m, lab = _prom(prom), f'{{table="{recs}"}}'
    assert rep["ok"] and m[f"lmrec_check_ok{lab}"] == 1 and m[f"lmrec_table_rows{lab}"] == 30 * K
    assert m[f"lmrec_table_users{lab}"] == 30 and m[f"lmrec_table_items_recommended{lab}"] == rep["content"]["items_recommended"]
    assert m[f"lmrec_table_run_date_timestamp_seconds{lab}"] == 1795737600  # 2026-11-27T00:00:00Z
    assert m[f'lmrec_check_problems{{table="{recs}",check="content"}}'] == 0
    assert "lmrec_table_top10_overlap" not in prom.read_text()  # nothing to compare with: the series is left out
    _previous(recs, folder, lambda rows: rows.extend({**r, "user_id": f"ghost-{r['user_id']}"} for r in list(rows)))
    rep = check_table(_cfg(world, table["prepared"], recs, f"check.metrics_file={prom}"))
    m = _prom(prom)
    assert not rep["ok"] and m[f"lmrec_check_ok{lab}"] == 0 and m[f"lmrec_table_top10_overlap{lab}"] == 1.0
    assert m[f'lmrec_check_problems{{table="{recs}",check="content"}}'] == 1
    assert sorted(p.name for p in prom.parent.iterdir()) == ["lmrec.prom"]  # written atomically: no temp file left
    rep = check_table(_cfg(world, table["prepared"], recs, "run_date=2026-11-28", f"check.metrics_file={prom}"))
    m = _prom(prom)  # no table at all: still a verdict for the alert
    assert m[f"lmrec_check_ok{lab}"] == 0 and m[f'lmrec_check_problems{{table="{recs}",check="published"}}'] == 1


def test_each_variant_of_an_ab_test_is_compared_on_its_own(world, table, tmp_path):  # noqa: F811
    """A/B test: half the users move to variant 'b', whose lists tonight share nothing with those users' lists last
    night (a new model that learned nothing). The whole table keeps half its lists, so only the per-variant rule can
    see it: variant 'b' is named, variant 'a' and the whole table are not; per-variant figures are in the report."""
    import datasets

    recs, folder = _copy(table, tmp_path)
    rows = pq.read_table(folder).to_pylist()
    users = list(dict.fromkeys(r["user_id"] for r in rows))
    b_users = set(users[::2])
    catalogue = [i for i in datasets.load_from_disk(str(table["v1"] / "items"))["item_id"] if i not in UNAVAILABLE]

    def split(rows):
        for r in rows:
            r["variant"] = "b" if r["user_id"] in b_users else "a"
    _rewrite(folder, split)
    tonight = {}
    for r in pq.read_table(folder).to_pylist():
        tonight.setdefault(r["user_id"], set()).add(r["item_id"])

    def unrelated_for_b(rows):  # last night: b's users had other items (from the catalogue), a's the same as tonight
        for n, u in enumerate(users):
            if u in b_users:
                other = [i for i in catalogue if i not in tonight[u]]
                other = other[n % len(other):] + other[: n % len(other)]
                for r, item in zip((r for r in rows if r["user_id"] == u), other):
                    r["item_id"] = item
    _previous(recs, folder, unrelated_for_b)
    rep = check_table(_cfg(world, table["prepared"], recs))
    text = _problems(rep)
    assert not rep["ok"] and [p["check"] for p in rep["problems"]] == ["content"], text
    assert "variant 'b': the 15 users served by the model on both nights keep 0.0% of their top-10 items" in text, text
    by = rep["previous"]["by_variant"]
    assert by["a"]["top10_overlap"] == 1.0 and by["b"]["top10_overlap"] == 0.0
    assert 0.3 < rep["previous"]["top10_overlap_beyond_chance"] < 0.7  # the whole table: half its lists kept
    assert rep["content"]["by_variant"]["b"]["users"] == 15 and by["b"]["previous"]["users"] == 15
