"""Latency of the online service on loopback, next to the bare cost of what it computes.

    python bench/serve_bench.py --out docs/results/serve_bench.json                  # 10k and 100k items
    python bench/serve_bench.py --items 10000 --requests 200 --workdir /tmp/sb        # a quick look

For each catalogue size: a synthetic prepared folder (N items, ids only) and a random-init id-only model (d_model 64,
2 layers, max_len 50: the sample recipe's user tower) exported as final/, then
1. bare: in this process, the user tower over one history + the matmul against the N item vectors + the exact top-K
   (inference.run.score_windows, what /v1/recommend runs), one request after another: p50/p99 and requests/s;
2. served: ``python -m inference.serve`` (model_dir mode, compute_threads 2, one torch thread each) and POST
   /v1/recommend over keep-alive HTTP/1.1 connections from 1 and from 8 client threads, a bounded number of requests
   each (after a warm-up): p50/p99 latency at the client and requests/s.
Histories are drawn at random from the catalogue (5-50 items, seeded), k = 20. The client runs on the same cores as
the server: on a 2-core machine it takes part of the CPU the server could use, so the served figures are a floor.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

D_MODEL, LAYERS, MAX_LEN, K = 64, 2, 50, 20


def write_world(root: Path, n_items: int, n_users: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """prepared/v1 (N items with ids "i<k>", no text) + final/ of a random-init id-only model on it."""
    import datasets

    from lmrec_common.manifest import sha256_strings
    from train.export import export_final
    from train.model import RecModelConfig, SeqRecModel

    prep, final = root / "prepared" / "v1", root / "final"
    if (final / "export.json").is_file() and (prep / "manifest.json").is_file():
        return prep, final
    rng = np.random.default_rng(seed)
    ids = [f"i{k}" for k in range(n_items)]
    pop = rng.zipf(1.3, n_items).clip(max=10_000).astype(np.int64)
    datasets.Dataset.from_dict({
        "item_idx": np.arange(n_items, dtype=np.int32), "item_id": ids, "text": [""] * n_items,
        "input_ids": [[101, 102]] * n_items, "n_train_events": pop, "in_catalogue": [True] * n_items,
        "available": (rng.random(n_items) > 0.02).tolist()},
        features=datasets.Features({"item_idx": datasets.Value("int32"), "item_id": datasets.Value("string"),
                                    "text": datasets.Value("string"), "input_ids": datasets.Sequence(datasets.Value("int32")),
                                    "n_train_events": datasets.Value("int64"), "in_catalogue": datasets.Value("bool"),
                                    "available": datasets.Value("bool")})).save_to_disk(str(prep / "items"))
    seqs = [rng.integers(0, n_items, int(rng.integers(5, 51))).tolist() for _ in range(n_users)]
    datasets.Dataset.from_dict({
        "user_idx": list(range(n_users)), "user_id": [f"u{u}" for u in range(n_users)], "item_idx": seqs,
        "timestamp": [[1_700_000_000 + 60 * j for j in range(len(s))] for s in seqs],
        "event_type": [[0] * len(s) for s in seqs], "train_len": [len(s) - 2 for s in seqs],
        "valid_pos": [len(s) - 2 for s in seqs], "test_pos": [len(s) - 1 for s in seqs]},
        features=datasets.Features({"user_idx": datasets.Value("int32"), "user_id": datasets.Value("string"),
                                    "item_idx": datasets.Sequence(datasets.Value("int32")),
                                    "timestamp": datasets.Sequence(datasets.Value("int64")),
                                    "event_type": datasets.Sequence(datasets.Value("int8")), "train_len": datasets.Value("int32"),
                                    "valid_pos": datasets.Value("int32"), "test_pos": datasets.Value("int32")})
    ).save_to_disk(str(prep / "sequences"))
    manifest = {"kind": "lmrec.prepared", "schema_version": 1, "version": "v1", "code_version": "bench",
                "created_at": "2026-01-01T00:00:00+00:00", "config": {}, "counts": {"users": n_users, "items": n_items},
                "event_types": ["view"], "user_id_type": "string", "item_id_type": "string",
                "tokenizer": {"path": "bundled:all-MiniLM-L6-v2", "max_text_tokens": 32},
                "vocab": {"users_sha256": "x", "items_sha256": sha256_strings(ids)}, "num_shards": 1,
                "split": {"kind": "leave_last_out"}}
    (prep / "manifest.json").write_text(json.dumps(manifest))
    torch.manual_seed(seed)
    mcfg = RecModelConfig(num_items=n_items, num_event_types=1, item_tower="id", d_model=D_MODEL, n_layers=LAYERS, n_heads=1,
                          max_len=MAX_LEN, dropout=0.0)
    export_final(final, SeqRecModel(mcfg).state_dict(), mcfg, None, {"bench": True}, manifest, {}, item_ids=ids)
    return prep, final


def histories(n_items: int, n: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[f"i{x}" for x in rng.integers(0, n_items, int(rng.integers(5, 51)))] for _ in range(n)]


def stats(lat_s: list[float], wall_s: float) -> dict:
    a = np.asarray(lat_s) * 1000
    return {"requests": len(a), "p50_ms": round(float(np.percentile(a, 50)), 2), "p90_ms": round(float(np.percentile(a, 90)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "max_ms": round(float(a.max()), 2),
            "req_per_s": round(len(a) / wall_s, 1)}


def bare(prep: Path, final: Path, hs: list[list[str]]) -> dict:
    """The user tower + matmul + top-K of each request, one after another, in this process (1 torch thread)."""
    from inference.run import score_windows
    from inference.serve.config import ServeConfig
    from inference.serve.engine import Engine

    eng = Engine.load(ServeConfig(model_dir=str(final), prepared_dir=str(prep)).checked(), log=lambda s: None)
    prepped = []
    for h in hs:  # the windows and exclusions are built outside the timed part
        x = eng.prepare_history(h, None, [], True)
        prepped.append((x["hist"], x["et"], torch.from_numpy(x["seen"]), torch.tensor([0, len(x["seen"])])))
    lat = []
    for i in range(2):  # warm-up
        score_windows(eng.model, prepped[i][0], prepped[i][1], eng.cat.vectors, eng.cat_scores, K, eng.device, eng.sdt,
                      seen_offsets=prepped[i][3], seen_items=prepped[i][2], unavailable_idx=eng.unavail_idx,
                      item_chunk=eng.n_items, method=eng.method)
    t0 = time.perf_counter()
    for hist, et, seen, offs in prepped:
        t = time.perf_counter()
        score_windows(eng.model, hist, et, eng.cat.vectors, eng.cat_scores, K, eng.device, eng.sdt, seen_offsets=offs,
                      seen_items=seen, unavailable_idx=eng.unavail_idx, item_chunk=eng.n_items, method=eng.method)
        lat.append(time.perf_counter() - t)
    return stats(lat, time.perf_counter() - t0)


def load_http(port: int, hs: list[list[str]], concurrency: int, per_thread: int, warmup: int = 10) -> dict:
    """``concurrency`` threads, each on its own keep-alive connection, ``per_thread`` requests each (after warm-up)."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)

    def worker(j: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        bodies = [json.dumps({"history": hs[(j * per_thread + i) % len(hs)], "k": K}).encode() for i in range(per_thread + warmup)]
        for b in bodies[:warmup]:
            conn.request("POST", "/v1/recommend", body=b, headers={"content-type": "application/json"})
            conn.getresponse().read()
        start.wait()
        for b in bodies[warmup:]:
            t = time.perf_counter()
            conn.request("POST", "/v1/recommend", body=b, headers={"content-type": "application/json"})
            r = conn.getresponse()
            r.read()
            mine.append(time.perf_counter() - t)
            if r.status != 200:
                with lock:
                    errors[0] += 1
        conn.close()
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    out = stats(lat, time.perf_counter() - t0)
    out.update(concurrency=concurrency, errors=errors[0])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(prep: Path, final: Path, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "inference.serve", f"model_dir={final}", f"prepared_dir={prep}",
                          f"port={port}", "compute_threads=2", "num_threads=1", "reload_poll_s=0", "log_level=warning",
                          "max_k=100"], cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    t0 = time.time()
    while time.time() - t0 < 300:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return p, port
        except OSError:
            pass
        if p.poll() is not None:
            break
        time.sleep(0.3)
    p.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", default="10000,100000")
    ap.add_argument("--requests", type=int, default=400, help="requests per measurement (split over the client threads)")
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "serve_bench"))
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.workdir)
    res = {"what": "online /v1/recommend latency on loopback vs the bare user tower + matmul + top-K (bench/serve_bench.py)",
           "command": "python bench/serve_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": dt.date.today().isoformat(), "machine": {
               "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor()),
               "cores": os.cpu_count(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
               "python": platform.python_version(), "torch": torch.__version__},
           "model": {"item_tower": "id", "d_model": D_MODEL, "n_layers": LAYERS, "max_len": MAX_LEN, "init": "random"},
           "k": K, "server": {"compute_threads": 2, "torch_threads_each": 1}, "catalogues": {}}
    for n in [int(x) for x in args.items.split(",")]:
        print(f"[serve_bench] {n} items: writing the synthetic catalogue and model", flush=True)
        prep, final = write_world(work / f"items{n}", n)
        hs = histories(n, args.requests, seed=n)
        b = bare(prep, final, hs)
        print(f"[serve_bench] {n} items bare: {b}", flush=True)
        proc, port = serve(prep, final, work / f"items{n}" / "server.log")
        try:
            c1 = load_http(port, hs, 1, args.requests)
            print(f"[serve_bench] {n} items served c=1: {c1}", flush=True)
            c8 = load_http(port, hs, 8, max(1, args.requests // 8))
            print(f"[serve_bench] {n} items served c=8: {c8}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        res["catalogues"][str(n)] = {"bare": b, "served_c1": c1, "served_c8": c8,
                                     "bare_over_served_req_s": {"c1": round(b["req_per_s"] / c1["req_per_s"], 2),
                                                                "c8": round(b["req_per_s"] / c8["req_per_s"], 2)}}
    res["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print(f"[serve_bench] wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
