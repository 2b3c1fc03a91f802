"""Block-max top-K selection, side by side with the earlier way of doing each of two things:

1. a catalogue whose size is not a multiple of the block (real catalogues: 1,000,037 items, not 1,000,000):
   before, the score block was copied into a padded one (torch.nn.functional.pad) on every chunk; now
   the full blocks are a view, the ragged last block is reduced on its own and candidates are gathered.
2. bf16 scores (score_dtype: bfloat16): before, the (B, n) bf16 product was copied to float32 before
   the exclusions and the selection; now selection runs on the bf16 values (the same numbers).

    python bench/topk_select_bench.py [--items 1000037] [--users 256] [--rounds 5] [--threads 1] [--device cpu]

Prints users/s of each variant, interleaved round by round (best of --rounds), and their ratio; same
input for all, results checked equal. The earlier code is kept here, only as the reference.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from inference.topk import DEFAULT_BLOCK, NEG_INF, select_rows_topk  # noqa: E402


def select_padded(scores: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The block-max selection as it was before: pad the row to whole blocks (a copy), then index blocks."""
    b, n = scores.shape
    nb = (n + block - 1) // block
    if nb * block != n:
        scores = torch.nn.functional.pad(scores, (0, nb * block - n), value=NEG_INF)
    blocks = scores.view(b, nb, block)
    top_blocks = torch.topk(blocks.amax(dim=2), k, dim=1, sorted=False).indices
    cand = blocks[torch.arange(b, device=scores.device)[:, None], top_blocks]
    vals, pos = torch.topk(cand.reshape(b, k * block), k, dim=1, sorted=False)
    return vals, top_blocks.gather(1, pos // block) * block + pos % block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_037)
    ap.add_argument("--users", type=int, default=256, help="users per chunk (inference user_batch_size)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    U = torch.randn(a.users, a.dim, generator=g).to(dev)
    V = torch.randn(a.items, a.dim, generator=g).to(dev)
    k, block = a.k, DEFAULT_BLOCK

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def ragged_new():
        return select_rows_topk(U @ V.T, k, "blockmax", block)

    def ragged_padded():
        return select_padded(U @ V.T, k, block)

    Ub, Vb = U.bfloat16(), V.bfloat16()

    def bf16_in_place():
        return select_rows_topk(Ub @ Vb.T, k, "blockmax", block)

    def bf16_float_copy():
        return select_rows_topk((Ub @ Vb.T).float(), k, "blockmax", block)

    pairs = {"ragged catalogue: view + gather (now) vs padded copy (before)": (ragged_new, ragged_padded),
             "bf16 scores: selected in bf16 (now) vs float32 copy (before)": (bf16_in_place, bf16_float_copy)}
    # same answers (values; items too, random scores have no ties)
    for name, (new, old) in pairs.items():
        (sa, ia), (sb, ib) = new(), old()
        oa, ob = torch.argsort(ia, 1), torch.argsort(ib, 1)
        assert torch.equal(ia.gather(1, oa), ib.gather(1, ob)), name
        assert torch.equal(sa.float().gather(1, oa), sb.float().gather(1, ob)), name
    best = {f: float("inf") for pair in pairs.values() for f in pair}
    for _ in range(a.rounds):
        for pair in pairs.values():
            for f in pair:
                sync()
                t = time.perf_counter()
                f()
                sync()
                best[f] = min(best[f], time.perf_counter() - t)
    res = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
           "device": str(dev), "threads": a.threads, "items": a.items, "users": a.users, "k": k, "block": block, "pairs": {}}
    for name, (new, old) in pairs.items():
        n_s, o_s = a.users / best[new], a.users / best[old]
        res["pairs"][name] = {"now_users_s": n_s, "before_users_s": o_s, "ratio": n_s / o_s}
        print(f"{name}: {n_s:,.0f} vs {o_s:,.0f} users/s (x{n_s / o_s:.2f})", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
