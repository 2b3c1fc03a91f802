"""What the morning check (``python -m inference.check``) costs on a large table: wall time and peak memory.

    python bench/check_bench.py --users 50000 200000 --items 50000 --k 100 --out docs/results/check_cpu.json

Writes a synthetic prepared version (tests/fixtures_prepared.py's layout: users' histories on the first half of the
items) and a whole, correct table of it (``--k`` rows per user, all from the second half, so none seen; two part
files, as two ranks write, with the manifest fields the check reads), then runs the real command in a subprocess and
records its wall time, rows per second and peak RSS (that child's own ru_maxrss, from wait4), and whether it passed (it must: the
table is correct). Then the previous night's table is written beside it (the same users, each list moved 5 places:
half of each top-10 kept; section 7 of the check compares the two) and the check is run again: what the comparison adds. Then one row
of tonight's table is made a seen item and the check must find it. One prepared version and table per ``--users``
value, side by side in one run (how time and memory grow with users).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
DATE = "2026-11-27"
PREV_DATE = "2026-11-26"


def write_table(recs: Path, prepared_v: Path, k: int, parts: int = 2, date: str = DATE, shift: int = 0) -> tuple[Path, int]:
    """recs/dt=<date> -> _runs/dt=<date>/run=bench/: ``parts`` part files of every prepared user's k unseen items (each
    user's list moved ``shift`` places along the second half of the items: another night's lists)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from inference.run import table_schema
    from lmrec_common.publish import point_to

    seq = datasets.load_from_disk(str(prepared_v / "sequences"))
    items = datasets.load_from_disk(str(prepared_v / "items"))
    users = np.asarray(seq.data.table.column("user_id").to_pylist(), dtype=object)
    item_ids = np.asarray(items.data.table.column("item_id").to_pylist(), dtype=object)
    half = len(item_ids) // 2
    folder = recs / "_runs" / f"dt={date}" / "run=bench"
    folder.mkdir(parents=True)
    schema = table_schema("string", "string")
    listed, total = [], 0
    for r, chunk in enumerate(np.array_split(np.arange(len(users)), parts)):
        n = len(chunk) * k
        idx = half + (np.repeat(chunk * 7919 + shift, k) + np.tile(np.arange(k), len(chunk))) % (len(item_ids) - half)
        t = pa.table({"user_id": pa.array(np.repeat(users[chunk], k), pa.string()),
                      "rank": pa.array(np.tile(np.arange(1, k + 1), len(chunk)).astype(np.int16)),
                      "item_id": pa.array(item_ids[idx], pa.string()),
                      "score": pa.array(np.tile(-np.arange(k, dtype=np.float32), len(chunk))),
                      "model_version": pa.array(["bench"] * n), "run_date": pa.array([_dt.date.fromisoformat(date)] * n, pa.date32()),
                      "source": pa.array(["model"] * n), "variant": pa.array(["default"] * n)}, schema=schema)
        name = f"part-{r:05d}-bench.parquet"
        pq.write_table(t, folder / name)
        listed.append({"file": name, "rows": n})
        total += n
    version = json.loads((prepared_v / "manifest.json").read_text())["version"]
    man = {"kind": "lmrec.recs", "run_date": date, "run_id": "bench", "k": k, "model": {"path": "bench", "model_version": "bench"},
           "data": {"version": version}, "exclusions": {"seen": True, "unavailable": True, "active_since_days": 0},
           "parts": listed, "counts": {"rows": total, "users_fewer_than_k": 0, "users_inactive": 0}}
    (folder / "_manifest.json").write_text(json.dumps(man))
    (folder / "_SUCCESS").write_text("")
    point_to(recs, f"dt={date}", folder)
    return folder, total


def run_check(prepared: Path, recs: Path, k: int, report: Path) -> dict:
    cmd = [sys.executable, "-m", "inference.check", "--config", "configs/inference/nightly.yaml", f"prepared_dir={prepared}",
           f"output_dir={recs}", f"run_date={DATE}", f"k={k}", "exclude_seen=true", "exclude_unavailable=true",
           "active_since_days=0", f"check.report={report}"]
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN would be the max of all)
        wall = time.time() - t0
        code = os.waitstatus_to_exitcode(status)
        err.seek(0)
        if not report.is_file():
            raise SystemExit(f"[check_bench] the check wrote no report (exit {code}):\n{err.read()[-3000:]}")
    rep = json.loads(report.read_text())
    return {"exit": code, "wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024), "ok": rep["ok"],
            "problems": [x["what"] for x in rep["problems"]], "counts": rep["counts"], "previous": rep.get("previous"),
            "cmd": " ".join(cmd[1:])}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, nargs="+", default=[50_000, 200_000])
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--out", default="", help="JSON to write (default: print only)")
    ap.add_argument("--write", help=argparse.SUPPRESS)  # child: write one size's data into this folder
    ap.add_argument("--write-previous", help=argparse.SUPPRESS)  # child: write the previous night's table there
    ap.add_argument("--plant-seen", help=argparse.SUPPRESS)  # child: plant one seen item in that folder's table
    a = ap.parse_args(argv)
    if a.write:
        write_data(Path(a.write), a.users[0], a.items, a.k)
        return {}
    if a.write_previous:
        tmp = Path(a.write_previous)
        write_table(tmp / "recs", tmp / "prepared" / (tmp / "prepared" / "LATEST").read_text().strip(), a.k,
                    date=PREV_DATE, shift=5)
        return {}
    if a.plant_seen:
        plant_seen(Path(a.plant_seen))
        return {}

    import quality  # bench/quality.py: machine()
    from lmrec_common.manifest import git_commit

    sizes = [one_size(users, a.items, a.k) for users in a.users]
    res = {"bench": "check", "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": quality.machine(),
           "git_commit": git_commit(), "items": a.items, "k": a.k, "sizes": sizes}
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return res


def one_size(users: int, n_items: int, k: int) -> dict:
    """A prepared version of ``users`` users and its table; the check run on it clean, then with the previous night's
    table beside it, then with one seen item. The
    data is written by a child process: a check started from a parent that held the written rows would count the
    parent's pages in its peak RSS (ru_maxrss survives fork and exec)."""
    with tempfile.TemporaryDirectory(prefix="check_bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        w = subprocess.run([sys.executable, __file__, "--write", str(tmp), "--users", str(users), "--items", str(n_items),
                            "--k", str(k)], capture_output=True, text=True)
        if w.returncode != 0:
            raise SystemExit(f"[check_bench] writing the data failed:\n{w.stderr[-3000:]}")
        rows = int(w.stdout.strip().splitlines()[-1])
        print(f"[check_bench] {users} users x {k} = {rows} rows, {n_items} items written in {time.time() - t0:.0f}s", flush=True)
        clean = run_check(tmp / "prepared", tmp / "recs", k, tmp / "clean.json")
        w = subprocess.run([sys.executable, __file__, "--write-previous", str(tmp), "--k", str(k)], capture_output=True, text=True)
        if w.returncode != 0:
            raise SystemExit(f"[check_bench] writing the previous table failed:\n{w.stderr[-3000:]}")
        compared = run_check(tmp / "prepared", tmp / "recs", k, tmp / "compared.json")
        w = subprocess.run([sys.executable, __file__, "--plant-seen", str(tmp)], capture_output=True, text=True)
        if w.returncode != 0:
            raise SystemExit(f"[check_bench] planting a seen item failed:\n{w.stderr[-3000:]}")
        damaged = run_check(tmp / "prepared", tmp / "recs", k, tmp / "damaged.json")
    out = {"users": users, "rows": rows, "clean": {**clean, "rows_per_s": round(rows / clean["wall_s"])},
           "with_previous_night": compared, "one_seen_item_planted": damaged}
    print(json.dumps(out, indent=1), flush=True)
    return out


def write_data(tmp: Path, users: int, n_items: int, k: int) -> None:
    """(child) tmp/prepared (users' histories on the first half of the items) and tmp/recs: prints the table's rows."""
    from fixtures_prepared import write_prepared

    v = write_prepared(tmp / "prepared", num_users=users, num_items=n_items, cold_items=n_items // 2)
    (tmp / "prepared" / "LATEST").write_text(f"{v.name}\n")
    _, rows = write_table(tmp / "recs", v, k)
    print(rows)


def plant_seen(tmp: Path) -> None:
    """(child) the first row of the first part file becomes an item its user has seen."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    v = tmp / "prepared" / (tmp / "prepared" / "LATEST").read_text().strip()
    part = sorted((tmp / "recs" / f"dt={DATE}").resolve().glob("part-*.parquet"))[0]
    t = pq.read_table(part)
    seq = datasets.load_from_disk(str(v / "sequences"))
    items = datasets.load_from_disk(str(v / "items"))["item_id"]
    ids = t.column("item_id").to_pylist()
    ids[0] = items[seq[0]["item_idx"][0]]
    pq.write_table(t.set_column(t.schema.get_field_index("item_id"), "item_id", pa.array(ids, pa.string())), part)


if __name__ == "__main__":
    main()
