"""Catalogue encoding with and without the text-feature cache (train/text_cache.py), side by side:

    python bench/text_cache_bench.py --items 20000 --out docs/results/text_cache_cpu.json

The bundled MiniLM (6 layers, 384-d) in a hybrid SeqRecModel encodes a synthetic catalogue of --items items
whose token lengths follow a title-plus-genres shape (8-48 tokens, median ~20; token ids are random, which
costs the encoder the same as real text of that length). Timed, each in a fresh model (best of --rounds):

- plain:     Catalogue.prepare() without a cache, as training and inference did before the cache
- cold:      the same with an empty cache directory (encodes everything, then writes the file)
- warm:      the next night: every item's tokens unchanged (reads the file, encodes nothing)
- warm 5%:   5% of the items changed text (or are new): only those go through the encoder

Reported: seconds, items/s, and each row's ratio to plain; the cache file's size. CPU threads: --threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmrec_common.models import resolve_model_path  # noqa: E402
from train.catalogue import Catalogue  # noqa: E402
from train.model import RecModelConfig, SeqRecModel  # noqa: E402


def tokens(n: int, seed: int, vocab: int = 30000) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.exp(torch.randn(n, generator=g) * 0.45 + 3.0).long().clamp(8, 48)
    ids = torch.randint(1000, vocab, (n, 48), generator=g)
    ids[:, 0] = 101  # [CLS]
    ids[torch.arange(48)[None, :] >= lens[:, None]] = 0
    return ids, lens


def model(n: int) -> SeqRecModel:
    torch.manual_seed(0)
    return SeqRecModel(RecModelConfig(num_items=n, item_tower="hybrid", text_model_path=str(resolve_model_path("bundled:all-MiniLM-L6-v2")),
                                      d_model=64, n_layers=2, n_heads=1, max_len=50)).eval()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=20000)
    ap.add_argument("--changed", type=float, default=0.05, help="share of items whose text changes for 'warm 5%%'")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256, help="items per encoder call (inference's item_batch_size)")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    ids, lens = tokens(a.items, 0)
    ids2, lens2 = ids.clone(), lens.clone()
    k = int(a.items * a.changed)
    new_ids, new_lens = tokens(k, 1)
    ids2[:k], lens2[:k] = new_ids, new_lens  # the first k items: another text
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            cache = Path(tmp) / f"round{r}"
            for name, (i, ln, cdir) in {"plain": (ids, lens, None), "cold": (ids, lens, cache), "warm": (ids, lens, cache),
                                        f"warm {100 * a.changed:.0f}%": (ids2, lens2, cache)}.items():
                m = model(a.items)
                cat = Catalogue.from_tokens(i, ln)
                t = time.perf_counter()
                enc = cat.prepare(m, a.batch, cache_dir=str(cdir) if cdir else None)
                dt = time.perf_counter() - t
                best = rows.get(name)
                if best is None or dt < best["s"]:
                    rows[name] = {"s": dt, "encoded": enc}
                print(f"[text_cache_bench] round {r + 1} {name}: {dt:.2f} s, {enc} items encoded", flush=True)
            size = sum(p.stat().st_size for p in cache.iterdir())
    plain = rows["plain"]["s"]
    for v in rows.values():
        v["items_s"] = a.items / v["s"]
        v["ratio_to_plain"] = v["s"] / plain
    res = {"command": "python bench/text_cache_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.processor() or platform.machine()}, "
           f"{a.threads} torch threads, torch {torch.__version__}", "items": a.items, "cache_file_mb": size / 2**20, "rows": rows}
    print(f"{'':10s} {'seconds':>9s} {'items/s':>10s} {'encoded':>8s} {'x plain':>8s}")
    for name, v in rows.items():
        print(f"{name:10s} {v['s']:9.2f} {v['items_s']:10.0f} {v['encoded']:8d} {v['ratio_to_plain']:8.3f}")
    print(f"cache file {size / 2**20:.1f} MiB for {a.items} items")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
