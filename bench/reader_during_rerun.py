"""Readers during reruns (issue 29 item 2): processes read recs/dt=<date> over and over while the same date is
published again and again, with the publisher kill -9'd at random moments; every read is classified.

    python bench/reader_during_rerun.py                                   # ~2 min on 2 cores
    python bench/reader_during_rerun.py --seconds 20 --legacy-seconds 5 --inference-reruns 5 --out /tmp/r.json

Phases (each with its own folder under --work):
- ``runs``: the layout of docs/CONTRACTS.md section 4. A writer process publishes synthetic tables (3 part files
  of 2,000 rows; every row carries its run id) in a loop with the same calls as inference/run.py (the date's lock,
  recover_table, a staging folder, _manifest.json, _SUCCESS, place_run, point_to, sweep_runs with --grace); the
  parent SIGKILLs it at a random moment and starts another. At the end one clean publish with
  grace 0 must leave exactly one run folder and no leftovers. (0.5-2 s between kills: a fresh writer needs ~0.4 s
  to import pyarrow, then publishes ~10-50 tables a second, so kills land at every step of a publish.)
- ``legacy``: the same loop with the swap used before (lmrec_common.publish.publish_dir: the old folder is
  renamed aside and deleted), no kills: what readers got before the change.
- ``inference``: ``inference.run.run`` itself republishes one date --inference-reruns times (a generated
  2,000-item id-only model, 500 users, K alternating 10 / 7, 2 part files), the readers polling as above.

Readers (separate processes, polling without pause):
- ``careful``: what the contract tells readers to do: resolve the dt= link once (lmrec_common.publish.resolve_table:
  realpath + _SUCCESS), read _manifest.json there, list part-*.parquet there, wait 0-2 ms (a slow reader), read
  every file. A read is ``ok`` when the files are exactly the manifest's, each has the manifest's row count and
  (synthetic tables) every row carries the manifest's run id; ``mixed`` otherwise; ``absent`` when no table was
  found; ``not_found`` when a file vanished during the read; ``error`` for anything else. ``slow`` counts reads
  that took longer than the grace period (outside the contract).
- ``naive``: reads dt=<date>/part-*.parquet through the link without resolving it (a plain Spark or pyarrow read
  of the path): ``mixed`` when its rows come from two runs; ``not_found`` is its expected failure mode after a
  rerun (retry), as the file names carry the run id.
- ``probe``: only checks that dt=<date>/_SUCCESS exists, as fast as it can: ``absent`` = no table for an instant.

Writes a JSON with every count (--out, default docs/results/reader_during_rerun.json).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fcntl
import json
import multiprocessing as mp
import os
import platform
import random
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NAME = "dt=2026-11-27"
PARTS, ROWS = 3, 2000
RUN_ID_IN_NAME = re.compile(r"-(\d{8}T\d{6}-[0-9a-f]+)\.parquet$")


# ================================================================================================ writer
def _table(run_id: str, part: int):
    import pyarrow as pa

    return pa.table({"run_id": pa.array([run_id] * ROWS, pa.string()), "part": pa.array([part] * ROWS, pa.int32()),
                     "x": pa.array(range(part * ROWS, (part + 1) * ROWS), pa.int64())})


def writer_main(root: Path, layout: str, grace_s: float, count: int, log: Path) -> None:
    """Publish synthetic tables of NAME under ``root`` in a loop (``count`` times; 0 = until killed), as
    inference/run.py does; append each published run id to ``log``."""
    import pyarrow.parquet as pq

    from lmrec_common.publish import (atomic_write_json, atomic_write_text, place_run, point_to, publish_dir, recover_table,
                                      sweep_runs)

    root.mkdir(parents=True, exist_ok=True)
    n = 0
    while count == 0 or n < count:
        fd = os.open(root / f".lock-{NAME}", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # the previous writer's lock died with it
        try:
            notes = recover_table(root, NAME)  # what a killed writer left: staging folder, unused link, .old-*
            if notes:
                with open(log.with_suffix(".recovered.txt"), "a") as f:
                    f.write("".join(n + "\n" for n in notes))
            run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + f"-{secrets.token_hex(4)}"
            stage = root / f".stage-{NAME}-{run_id}"
            stage.mkdir()
            files = [f"part-{p:05d}-{run_id}.parquet" if layout == "runs" else f"part-{p:05d}.parquet" for p in range(PARTS)]
            for p, f in enumerate(files):
                pq.write_table(_table(run_id, p), stage / f)
            atomic_write_json(stage / "_manifest.json", {"run_id": run_id, "counts": {"rows": PARTS * ROWS},
                                                         "parts": [{"file": f, "rows": ROWS} for f in files]})
            atomic_write_text(stage / "_SUCCESS", "")
            if layout == "runs":
                point_to(root, NAME, place_run(stage, root, NAME, run_id))
                sweep_runs(root, NAME, grace_s)
            else:
                publish_dir(stage, root / NAME)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        with open(log, "a") as f:
            f.write(run_id + "\n")
        n += 1


def _start_writer(root: Path, layout: str, grace_s: float, log: Path, count: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--writer", str(root), "--layout", layout, "--grace", str(grace_s),
                             "--count", str(count), "--log", str(log)], cwd=ROOT)


# ================================================================================================ readers
def _empty() -> dict:
    return {"reads": 0, "ok": 0, "absent": 0, "not_found": 0, "mixed": 0, "error": 0, "slow": 0, "max_read_s": 0.0,
            "runs_seen": 0, "examples": []}


def _note(st: dict, what: str, msg: str) -> None:
    st[what] += 1
    if len(st["examples"]) < 5:
        st["examples"].append(f"{what}: {msg}")


def _careful_read(link: Path, st: dict, runs: set, grace_s: float) -> None:
    import pyarrow.parquet as pq

    from lmrec_common.publish import resolve_table

    t0 = time.perf_counter()
    st["reads"] += 1
    try:
        d = resolve_table(link)
    except FileNotFoundError as e:
        return _note(st, "absent", str(e))
    try:
        man = json.loads((d / "_manifest.json").read_text())
        files = sorted(d.glob("part-*.parquet"))
        time.sleep(random.random() * 0.002)
        tabs = {f.name: pq.read_table(f) for f in files}
    except FileNotFoundError as e:
        return _note(st, "not_found", str(e))
    except Exception as e:  # noqa: BLE001 - every failure is a finding
        return _note(st, "error", f"{type(e).__name__}: {e}")
    dt = time.perf_counter() - t0
    st["max_read_s"] = max(st["max_read_s"], dt)
    st["slow"] += dt > grace_s
    want = {p["file"]: p["rows"] for p in man["parts"]}
    got = {n: t.num_rows for n, t in tabs.items()}
    ids = {v for t in tabs.values() if "run_id" in t.column_names for v in t.column("run_id").unique().to_pylist()}
    if got != want or sum(got.values()) != man["counts"]["rows"] or not ids <= {man["run_id"]}:
        return _note(st, "mixed", f"manifest {man['run_id']} {want}, read {got} rows of runs {sorted(ids)}")
    st["ok"] += 1
    runs.add(man["run_id"])


def _naive_read(link: Path, st: dict, runs: set, grace_s: float) -> None:
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    st["reads"] += 1
    try:
        files = sorted(link.glob("part-*.parquet"))
        if not files:
            return _note(st, "absent", f"no part files in {link}")
        time.sleep(random.random() * 0.002)
        tabs = [pq.read_table(f) for f in files]
    except FileNotFoundError as e:
        return _note(st, "not_found", str(e))
    except Exception as e:  # noqa: BLE001
        return _note(st, "error", f"{type(e).__name__}: {e}")
    dt = time.perf_counter() - t0
    st["max_read_s"] = max(st["max_read_s"], dt)
    st["slow"] += dt > grace_s
    ids = {v for t in tabs if "run_id" in t.column_names for v in t.column("run_id").unique().to_pylist()}
    ids |= {m.group(1) for f in files if (m := RUN_ID_IN_NAME.search(f.name))}
    if len(ids) > 1 or len(files) != len({f.name for f in files}):
        return _note(st, "mixed", f"rows of runs {sorted(ids)}")
    st["ok"] += 1
    runs |= ids


def _probe(link: Path, st: dict, runs: set, grace_s: float) -> None:
    st["reads"] += 1
    if (link / "_SUCCESS").is_file():
        st["ok"] += 1
    else:
        _note(st, "absent", f"no {link}/_SUCCESS")


def reader_main(link: str, kind: str, grace_s: float, stop, ready, out) -> None:
    import pyarrow.parquet  # noqa: F401 - imported before the first timed read

    import lmrec_common.publish  # noqa: F401

    st, runs = _empty(), set()
    fn = {"careful": _careful_read, "naive": _naive_read, "probe": _probe}[kind]
    with ready.get_lock():
        ready.value += 1
    while not stop.is_set():
        fn(Path(link), st, runs, grace_s)
    st["runs_seen"] = len(runs)
    st["max_read_s"] = round(st["max_read_s"], 4)
    out.put((kind, st))


class Readers:
    def __init__(self, link: Path, kinds: list[str], grace_s: float):
        ctx = mp.get_context("spawn")
        self.stop, self.out, ready = ctx.Event(), ctx.Queue(), ctx.Value("i", 0)
        self.procs = [ctx.Process(target=reader_main, args=(str(link), k, grace_s, self.stop, ready, self.out)) for k in kinds]
        for p in self.procs:
            p.start()
        t0 = time.time()
        while ready.value < len(self.procs):  # every reader polling before the reruns start
            if time.time() - t0 > 120:
                raise SystemExit("readers did not start")
            time.sleep(0.05)

    def finish(self) -> dict:
        self.stop.set()
        res: dict = {}
        for _ in self.procs:
            kind, st = self.out.get(timeout=120)
            res.setdefault(kind, []).append(st)
        for p in self.procs:
            p.join(timeout=60)
        return {k: _sum(v) for k, v in res.items()}


def _sum(stats: list[dict]) -> dict:
    tot = _empty()
    for st in stats:
        for k, v in st.items():
            if k == "examples":
                tot[k] = (tot[k] + v)[:5]
            elif k in ("max_read_s", "runs_seen"):  # runs_seen: the most distinct runs one reader read whole
                tot[k] = max(tot[k], v)
            else:
                tot[k] += v
    tot["readers"] = len(stats)
    return tot


def _wait_for_table(link: Path, timeout: float = 60.0) -> None:
    t0 = time.time()
    while not (link / "_SUCCESS").is_file():
        if time.time() - t0 > timeout:
            raise SystemExit(f"no table at {link} after {timeout} s")
        time.sleep(0.05)


def _lines(p: Path) -> int:
    return len(p.read_text().splitlines()) if p.is_file() else 0


# ================================================================================================ phases
def phase_publish(work: Path, layout: str, seconds: float, grace_s: float, kill: bool, kinds: list[str]) -> dict:
    root = work / layout / "recs"
    log = work / layout / "published.txt"
    link = root / NAME
    w = _start_writer(root, layout, grace_s, log)
    _wait_for_table(link)
    readers = Readers(link, kinds, grace_s)
    kills, t_end = 0, time.time() + seconds
    rng = random.Random(0)
    while time.time() < t_end:
        if not kill:
            time.sleep(min(1.0, max(0.0, t_end - time.time())))
            continue
        time.sleep(min(rng.uniform(0.5, 2.0), max(0.0, t_end - time.time())))
        w.send_signal(signal.SIGKILL)
        w.wait()
        kills += 1
        w = _start_writer(root, layout, grace_s, log)
    res = readers.finish()
    w.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    w.wait()
    published = _lines(log)
    out = {"layout": layout, "seconds": seconds, "grace_s": grace_s, "publishes": published, "writer_kills": kills,
           "readers": res}
    if layout == "runs":  # replaced runs removed by the writers' sweeps while the readers read (grace over)
        out["run_folders_at_end"] = len(list((root / "_runs" / NAME).iterdir()))
        out["run_folders_removed_during"] = published - out["run_folders_at_end"]
    if layout == "runs":  # one clean publish with grace 0: the table is whole, nothing else is left
        r = subprocess.run([sys.executable, __file__, "--writer", str(root), "--layout", layout, "--grace", "0",
                            "--count", "1", "--log", str(log)], cwd=ROOT)
        runs = sorted((root / "_runs" / NAME).iterdir())
        leftovers = sorted(p.name for p in root.iterdir() if p.name not in ("_runs", NAME, f".lock-{NAME}"))
        from lmrec_common.publish import resolve_table

        cur = resolve_table(link)
        man = json.loads((cur / "_manifest.json").read_text())
        out["after_clean_publish"] = {"exit": r.returncode, "run_folders": len(runs), "leftovers": leftovers,
                                      "current_is_last_published": man["run_id"] == log.read_text().splitlines()[-1],
                                      "current_rows": sum(_rows(f) for f in cur.glob("part-*.parquet"))}
    rec = log.with_suffix(".recovered.txt")
    notes = rec.read_text().splitlines() if rec.is_file() else []
    # what the writer after a kill found and cleaned (the clean publish included): a kill mid-publish leaves a
    # staging folder, or a new link not yet renamed over the old one (a run folder placed but never pointed at
    # stays until the grace period ends)
    out["killed_mid_publish_leftovers"] = {"staging_folders": sum(".stage-" in n for n in notes),
                                           "unused_links": sum(".tmp-" in n for n in notes),
                                           "restored_old_tables": sum(n.startswith("restored") for n in notes)}
    return out


def _rows(f: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(f).metadata.num_rows


def phase_inference(work: Path, reruns: int, grace_s: float, kinds: list[str]) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    from inference_bench import build

    from inference.config import InferenceConfig
    from inference.run import run

    d = build(work / "data", 2000, 500, 16)
    out_dir = work / "inference" / "recs"
    link = out_dir / NAME

    def cfg(k: int) -> InferenceConfig:
        return InferenceConfig(model_dir=str(d / "final"), prepared_dir=str(d / "prepared" / "v1"), output_dir=str(out_dir),
                               run_date=NAME[3:], k=k, user_batch_size=128, num_threads=1, write_streams=2,
                               replaced_run_grace_s=int(grace_s))

    run(cfg(10))
    readers = Readers(link, kinds, grace_s)
    t0 = time.time()
    for i in range(reruns):
        run(cfg(7 if i % 2 == 0 else 10))
    wall = time.time() - t0
    res = readers.finish()
    kept = len(list((out_dir / "_runs" / NAME).iterdir()))
    return {"reruns": reruns, "seconds": round(wall, 1), "grace_s": grace_s, "users": 500, "k": [10, 7], "parts": 2,
            "readers": res, "run_folders_at_end": kept, "run_folders_removed_during": reruns + 1 - kept}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="runs layout with kills")
    ap.add_argument("--legacy-seconds", type=float, default=20.0, help="the layout before (0 = skip)")
    ap.add_argument("--inference-reruns", type=int, default=30, help="inference.run reruns (0 = skip)")
    ap.add_argument("--grace", type=float, default=5.0, help="replaced_run_grace_s of the runs under test")
    ap.add_argument("--readers", default="careful,careful,naive,probe", help="reader processes by kind")
    ap.add_argument("--work", default="/tmp/lmrec-reader-bench")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "reader_during_rerun.json"))
    ap.add_argument("--writer", help=argparse.SUPPRESS)
    ap.add_argument("--layout", default="runs", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--log", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.writer:
        return writer_main(Path(a.writer), a.layout, a.grace, a.count, Path(a.log))
    import shutil

    work = Path(a.work)
    for sub in ("runs", "legacy", "inference"):
        shutil.rmtree(work / sub, ignore_errors=True)
    kinds = a.readers.split(",")
    res = {"what": "readers polling recs/dt=<date> while the date is republished (bench/reader_during_rerun.py)",
           "command": "python bench/reader_during_rerun.py " + " ".join(sys.argv[1:]),
           "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
           "python": platform.python_version(), "phases": {}}
    res["phases"]["runs"] = phase_publish(work, "runs", a.seconds, a.grace, True, kinds)
    print(json.dumps(res["phases"]["runs"], indent=1), flush=True)
    if a.legacy_seconds > 0:
        res["phases"]["legacy"] = phase_publish(work, "legacy", a.legacy_seconds, a.grace, False, kinds)
        print(json.dumps(res["phases"]["legacy"], indent=1), flush=True)
    if a.inference_reruns > 0:
        res["phases"]["inference"] = phase_inference(work, a.inference_reruns, a.grace, kinds)
        print(json.dumps(res["phases"]["inference"], indent=1), flush=True)
    # a failure = what the contract rules out: for careful readers any failed read (or one slower than the grace);
    # for naive ones a mix or no table (not_found is their documented failure: retry, or resolve the link);
    # for probes no table
    kinds_fail = {"careful": ("absent", "not_found", "mixed", "error", "slow"), "naive": ("absent", "mixed", "error"),
                  "probe": ("absent",)}
    res["summary"] = {p: {"reruns": ph.get("publishes", ph.get("reruns")), "writer_kills": ph.get("writer_kills", 0),
                          "reads": {k: st["reads"] for k, st in ph["readers"].items()},
                          "failures": {k: {f: st[f] for f in kinds_fail[k]} for k, st in ph["readers"].items()},
                          "naive_not_found": ph["readers"].get("naive", _empty())["not_found"]}
                      for p, ph in res["phases"].items()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["summary"], indent=1))
    print(f"wrote {a.out}")
    bad = {p: sm["failures"] for p, sm in res["summary"].items()
           if p != "legacy" and any(v for f in sm["failures"].values() for v in f.values())}
    if bad:
        raise SystemExit(f"failures: {bad}")

if __name__ == "__main__":
    main()
