"""Diagnosis of the GPU inference user tower (docs/BENCH_INFERENCE.md, "Measured on one NVIDIA H200").

    python bench/tower_probe.py tower     # on a GPU: the tower alone, per chunk of 2,048 users, several ways + a profile
    python bench/tower_probe.py gil       # anywhere: a loop of tiny torch ops alone vs beside 1/2/4 Parquet writer threads

``tower`` times inference.run.user_vectors_bucketed (4 and 1 length buckets), the host-to-device copies alone,
model.user_vectors on GPU-resident windows, each SDPA backend and bf16 autocast, then prints the profiler's
top ops (id-only model, d 64, 2 layers, 2 heads, max_len 50, 1M items, histories of 5-50 events).
``gil`` is the CPU proxy of the suspected GIL contention between the launch-bound main thread and the writer
threads of inference/run.py (each op releases and retakes the GIL, as a CUDA launch does).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def tower(I: int = 1_000_000, B: int = 2048, nb: int = 20) -> None:
    from inference.run import history_windows, user_vectors_bucketed
    from train.model import RecModelConfig, SeqRecModel

    dev = torch.device("cuda")
    torch.manual_seed(0)
    m = SeqRecModel(RecModelConfig(num_items=I, num_event_types=1, item_tower="id", d_model=64, n_layers=2, n_heads=2,
                                   max_len=50, dropout=0.0)).to(dev).eval()
    table = m.all_item_vectors().float().contiguous()
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(nb):
        lens = rng.integers(5, 51, size=B)
        offs = np.concatenate([[0], np.cumsum(lens)])
        vals = rng.integers(0, I, size=int(offs[-1]))
        h, et, _, _ = history_windows(vals, offs, np.zeros_like(vals), np.arange(I), 50, space="tonight")
        batches.append((h, et))

    def timeit(name, fn, data=batches):
        best = 1e9
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for h, et in data:
                fn(h, et)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        print(f"{name:44s} {best / nb * 1e3:7.2f} ms per chunk of {B} ({B * nb / best:,.0f} users/s)", flush=True)

    with torch.inference_mode():
        timeit("bucketed(4)", lambda h, et: user_vectors_bucketed(m, h, et, dev, item_table=table))
        timeit("bucketed(1)", lambda h, et: user_vectors_bucketed(m, h, et, dev, buckets=1, item_table=table))
        timeit("host-to-device copies only", lambda h, et: (h.to(dev), et.to(dev)))
        timeit("user_vectors, windows already on the GPU", lambda h, et: m.user_vectors(h, et, item_table=table),
               [(h.to(dev), et.to(dev)) for h, et in batches])
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for be in (SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            try:
                with sdpa_kernel([be]):
                    timeit(f"bucketed(4), sdpa {be.name}", lambda h, et: user_vectors_bucketed(m, h, et, dev, item_table=table))
            except RuntimeError as e:
                print(f"sdpa {be.name}: {str(e)[:100]}")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            timeit("bucketed(4), bf16 autocast", lambda h, et: user_vectors_bucketed(m, h, et, dev, item_table=table))
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for h, et in batches[:5]:
                user_vectors_bucketed(m, h, et, dev, item_table=table)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60))


def gil(B: int = 2048, K: int = 100) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from inference.run import write_rows, table_schema

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 1_000_000, size=(B, K))
    sc = rng.random((B, K), dtype=np.float32)
    valid = idx >= 0
    per_user = valid.sum(1)
    users = pa.array([str(10_000_000 + u) for u in range(B)])
    item_ids = pa.array(np.arange(1_000_000, dtype=np.int64))
    schema = table_schema("int64", "int64")
    stop = threading.Event()

    def main_loop(n: int = 30) -> float:
        x = torch.zeros(64)
        t = time.perf_counter()
        for _ in range(n):
            for _ in range(170):  # ~ the tower's launches per chunk
                x = x + 1
        return (time.perf_counter() - t) / n * 1e3

    def writer(j: int) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as d, pq.ParquetWriter(f"{d}/w{j}.parquet", schema, compression="zstd",
                                                                  use_dictionary=["model_version", "run_date"]) as w:
            while not stop.is_set():
                write_rows(w, users, "int64", idx, sc, valid, per_user, item_ids, "v1", 20000)

    print(f"alone: {main_loop():.2f} ms per 170 ops", flush=True)
    for nw in (1, 2, 4):
        stop.clear()
        ts = [threading.Thread(target=writer, args=(j,)) for j in range(nw)]
        for t in ts:
            t.start()
        time.sleep(0.3)
        print(f"beside {nw} writer thread(s): {main_loop():.2f} ms per 170 ops", flush=True)
        stop.set()
        for t in ts:
            t.join()


if __name__ == "__main__":
    {"tower": tower, "gil": gil}[sys.argv[1] if len(sys.argv) > 1 else "tower"]()
