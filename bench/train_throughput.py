"""Training efficiency: useful-token throughput, MFU, peak memory and communication, side by side (issue #6).

    python bench/train_throughput.py --preset cpu-smoke            # ~2 min on 2 cores: MiniLM only, 2 steps
    python bench/train_throughput.py --preset cpu                  # the CPU figures of docs/PERF.md (~15 min, 2 cores)
    python bench/train_throughput.py --preset gpu                  # one GPU: 3 shapes x {native bf16, ZeRO-2, ZeRO-3, naive} + levers
    python bench/train_throughput.py --preset gpu --budget-s 500   # the same in a lent GPU's minutes: the checks' variants first
    python bench/train_throughput.py --paper                       # the FLOPs / bytes / scaling model only (no runs)
    # one variant by hand (what the orchestrator runs; any accelerate config works, e.g. DeepSpeed ZeRO-2 on 2 CPU procs):
    DS_ACCELERATOR=cpu accelerate launch --config_file launch/accelerate/cpu_ds_zero2.yaml \\
        bench/train_throughput.py --worker --data <prepared> --shape minilm --batch 4 --max-len 20 --result /tmp/r.json

Every variant runs in a fresh ``accelerate launch`` subprocess (so peak memory is its own) and writes one
JSON result; the orchestrator collects them into --out (JSON, rewritten after every variant, with issue #33's
``checks`` object: see ``checks``) and prints the markdown tables of docs/PERF.md and the checks table.

What one variant measures (``--path ours``): the REAL train-stage objects -- ``train.loop.make_accelerator``,
``train.model.SeqRecModel`` (item tower = text encoder in text_mode full/lora, sampled softmax with
``--negatives`` shared negatives, every distinct item of the step encoded once), ``train.loop.build_optimizer``,
the train loop's step (accumulate -> backward -> clip -> step -> zero_grad) on batches of ``train.data.TrainExamples``
from a prepared folder. ``--path naive`` is the seed article on the same users: each (history -> next item) example
flattened into text ("title; title; ...  [SEP] candidate title"), tokenized one example at a time, padded to 128,
ONE encoder forward per example, BCE click head (positive / random negative alternate).

Units (per optimizer step, summed over ranks):
- useful tokens: non-padding item-text tokens actually encoded (ours: distinct items once; naive: the
  non-padding tokens of each flattened 128-token example). padded tokens: what the encoder really ran.
- history events: next-item predictions trained (ours: non-padding target positions; naive: examples).
  This is the fair unit across the two paths.
- model FLOPs: ``train_flops`` below on USEFUL tokens only (padding is waste, not work), incl. the user tower.
  MFU = model FLOPs/s / peak; GPU peak = dense bf16 datasheet figure of the device (PEAK_TFLOPS), CPU "peak"
  = a measured large-matmul rate of this machine (so CPU MFU reads as "share of the best matmul rate").
- peak memory: torch.cuda.max_memory_allocated (GPU) or the process's peak RSS (CPU, imports included).
- comm: bytes handed to collectives per step and rank, by op (DDP through a comm hook, DeepSpeed by wrapping
  torch.distributed's collectives before DeepSpeed binds them), compared with ``comm_bytes`` (the paper model).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NAIVE_MAX_LEN = 128  # tokens per naive example (the seed article's padding length)
NAIVE_HISTORY = 50  # items of history flattened into one naive example

# dense bf16 tensor-core peak, TFLOP/s (NVIDIA datasheets, SXM parts, no sparsity)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}

# issue #33's targets: ours >= 3x the naive path in useful tokens/s on every shape; ZeRO-2 within 15% of native
# bf16 (MiniLM and BERT-base shapes); >= 40% MFU on the ~0.5B decoder shape
CHECK_TARGETS = {"vs_naive": 3.0, "zero2_over_bf16": 0.85, "mfu_0p5b": 0.40}
# the gpu preset's variants in the order the checks need them (the rest, ZeRO-3 and the levers, follow)
GPU_CHECK_ORDER = ("minilm_native", "minilm_naive", "decoder_native", "bert_native", "bert_zero2", "minilm_zero2",
                   "bert_naive", "decoder_naive")


# ============================================================================================ model shapes
@dataclass(frozen=True)
class Shape:
    """An item-tower shape. ``gated`` = SwiGLU FFN (3 matrices), else GELU FFN (2). kv_heads < heads = GQA."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    max_pos: int = 512
    gated: bool = False
    decoder: bool = False  # causal LM body (pooling "last"); else a BERT-like encoder (mean pooling)

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads


SHAPES = {
    # the default item tower: the bundled sentence-transformers/all-MiniLM-L6-v2 (real weights)
    "minilm": Shape("minilm", layers=6, hidden=384, heads=12, kv_heads=12, ffn=1536, vocab=30522),
    # BERT-base geometry, random init (throughput does not depend on the weights)
    "bert-base": Shape("bert-base", layers=12, hidden=768, heads=12, kv_heads=12, ffn=3072, vocab=30522),
    # Qwen2.5-0.5B geometry (GQA 14/2 heads, SwiGLU, tied 151936-token embedding), random init: ~0.49B params
    "decoder-0.5b": Shape("decoder-0.5b", layers=24, hidden=896, heads=14, kv_heads=2, ffn=4864, vocab=151936,
                          max_pos=32768, gated=True, decoder=True),
}


def layer_matmul_params(s: Shape) -> int:
    """Weights of one block that take part in matmuls (biases/norms excluded): q,o (d x d), k,v (d x kv_dim),
    FFN 2 or 3 matrices of d x ffn."""
    d = s.hidden
    return 2 * d * d + 2 * d * s.kv_dim + (3 if s.gated else 2) * d * s.ffn


def shape_params(s: Shape) -> dict:
    """Parameter counts of the transformer body, as built by transformers (BertModel without pooler /
    Qwen2Model): matmul weights + biases + norms per layer, embeddings (+ BERT position/type + LN)."""
    d = s.hidden
    if s.decoder:  # Qwen2: q,k,v biases, no o/FFN bias, 2 RMSNorm (weight only) per layer + final norm
        per_layer = layer_matmul_params(s) + (d + 2 * s.kv_dim) + 2 * d
        emb = s.vocab * d
        other = d
    else:  # BERT: every linear has a bias; 2 LayerNorms (weight + bias) per layer; embeddings LN
        per_layer = layer_matmul_params(s) + (4 * d + s.ffn + d) + 4 * d
        emb = (s.vocab + s.max_pos + 2) * d
        other = 2 * d
    body = s.layers * per_layer
    return {"per_layer": per_layer, "layers": body, "embedding": emb, "total": body + emb + other,
            "matmul": s.layers * layer_matmul_params(s)}


def forward_flops(s: Shape, seq_lens) -> float:
    """Forward FLOPs of the item tower over sequences of the given lengths (no padding counted):
    2 FLOPs per multiply-add; per sequence of L tokens: 2 * L * matmul params + per layer 4 * L^2 * d
    (Q K^T and attention x V; full attention counted for decoders too, as in the PaLM/nanoGPT MFU convention)."""
    lens = [int(x) for x in seq_lens]
    tok = sum(lens)
    sq = sum(x * x for x in lens)
    return 2.0 * tok * shape_params(s)["matmul"] + 4.0 * s.layers * s.hidden * sq


def train_factor(text_mode: str) -> float:
    """FLOPs of forward+backward relative to forward: full = 3 (backward = activations + weights grads,
    each ~ forward), lora = 2 (activation grads only; LoRA's own weights are negligible), frozen = 1."""
    return {"full": 3.0, "lora": 2.0, "frozen": 1.0}[text_mode]


def user_tower_flops(d_model: int, n_layers: int, positions: int, T: int) -> float:
    """Training FLOPs (x3) of the causal user tower on ``positions`` = B * T sequence positions:
    per position and layer 2 * 12 d^2 (qkv 3d^2, proj d^2, FFN 8 d^2) + 4 T d (attention)."""
    return 3.0 * positions * n_layers * (24.0 * d_model * d_model + 4.0 * T * d_model)


def comm_bytes(params: int, stage: int, world: int, bytes_per: int = 2, regather: bool = True) -> dict:
    """Per step and per rank: ``payload`` = bytes handed to collectives, ``wire`` = bytes each rank sends
    with ring algorithms ((N-1)/N of the payload per reduce-scatter / all-gather, 2(N-1)/N per all-reduce).
    stage 0 = DDP: all-reduce of the gradients. ZeRO-1/2: reduce-scatter of the gradients + all-gather of the
    updated parameters (same wire volume as DDP). ZeRO-3: all-gather of the parameters in forward AND
    again in backward + reduce-scatter of the gradients (1.5x DDP). ``params`` = trainable parameters
    (frozen ones are never communicated under DDP/ZeRO-1/2; under ZeRO-3 they are gathered too, so pass
    the total then). ``regather=False``: ZeRO-3 keeps the parameters gathered in forward until backward
    (DeepSpeed does so while they fit stage3_max_live_parameters / stage3_max_reuse_distance, as with our
    zero3.json and models < 1e9 parameters): one all-gather per step, the same volume as ZeRO-2."""
    if world < 1:
        raise ValueError("world must be >= 1")
    P = params * bytes_per
    f = (world - 1) / world
    if stage == 0:
        payload, wire, ops = P, 2 * f * P, {"all_reduce": P}
    elif stage in (1, 2):
        payload, wire, ops = 2 * P, 2 * f * P, {"reduce_scatter": P, "all_gather": P}
    elif stage == 3:
        g = 2 if regather else 1
        payload, wire, ops = (g + 1) * P, (g + 1) * f * P, {"all_gather": g * P, "reduce_scatter": P}
    else:
        raise ValueError(f"stage must be 0..3, got {stage}")
    return {"payload": payload, "wire": wire, "ops": ops}


@dataclass(frozen=True)
class Interconnect:
    name: str
    bus_gbs: float  # achievable NCCL bus bandwidth per GPU, GB/s (busbw convention: time = wire bytes / busbw)


INTERCONNECTS = {
    8: Interconnect("1 node, 8x H100 SXM, NVLink4/NVSwitch (450 GB/s per direction; ~360 GB/s NCCL busbw)", 360.0),
    64: Interconnect("8 nodes x 8 H100, 8x 400 Gb/s InfiniBand NDR per node (50 GB/s per GPU; ~40 GB/s busbw)", 40.0),
}


def scaled_step(compute_s: float, params: int, stage: int, world: int, bus_gbs: float, overlap: float = 0.0,
                bytes_per: int = 2) -> dict:
    """Weak scaling (same per-GPU batch): step = compute + (1 - overlap) * wire / busbw.
    efficiency = compute / step (1.0 = perfect)."""
    c = comm_bytes(params, stage, world, bytes_per)
    t_comm = c["wire"] / (bus_gbs * 1e9)
    step = compute_s + (1.0 - overlap) * t_comm
    return {"comm_s": t_comm, "step_s": step, "efficiency": compute_s / step if step > 0 else 1.0, "wire_bytes": c["wire"]}


def padded_tokens(lens, bucket: int = 0) -> int:
    """Tokens the encoder runs for items of these lengths: one batch padded to the longest (bucket=0), or
    sorted by length and cut into chunks of ``bucket`` items, each padded to its own longest."""
    lens = sorted(int(x) for x in lens)
    if not lens:
        return 0
    if bucket <= 0:
        return len(lens) * max(lens)
    return sum(len(lens[i:i + bucket]) * lens[i:i + bucket][-1] for i in range(0, len(lens), bucket))


# ============================================================================================ the worker
class CommCounter:
    """Bytes handed to torch.distributed collectives, by op (installed before DeepSpeed binds them)."""

    OPS = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "_all_gather_base",
           "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "all_reduce_coalesced", "all_to_all_single")

    def __init__(self):
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.on = False

    def add(self, op: str, n: int) -> None:
        if self.on:
            self.bytes[op] = self.bytes.get(op, 0) + int(n)
            self.calls[op] = self.calls.get(op, 0) + 1

    def install(self) -> None:
        import torch
        import torch.distributed as tdist

        def nbytes(x):
            if isinstance(x, torch.Tensor):
                return x.numel() * x.element_size()
            if isinstance(x, (list, tuple)):
                return sum(nbytes(t) for t in x)
            return 0

        for op in self.OPS:
            fn = getattr(tdist, op, None)
            if fn is None:
                continue

            def wrap(*a, _fn=fn, _op=op, **k):
                # payload = the larger side (gather: output, scatter: input), i.e. the full logical tensor
                vals = list(a) + list(k.values())
                self.add(_op, max((nbytes(v) for v in vals), default=0))
                return _fn(*a, **k)

            setattr(tdist, op, wrap)

    @staticmethod
    def ddp_hook(model) -> None:
        """DDP all-reduces gradient buckets in C++, past the Python functions. With the stock all-reduce comm
        hook (same collective, same bucket) each bucket goes through torch.distributed.all_reduce, which
        ``install`` counts."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        model.register_comm_hook(None, default_hooks.allreduce_hook)


def _peak_mem(torch) -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _sync(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_tower_folder(work: Path, shape: Shape) -> Path:
    """config.json of a random-init shape (SeqRecModel(load_text_weights=False) builds it from_config)."""
    from transformers import BertConfig, Qwen2Config

    d = work / "towers" / shape.name
    if (d / "config.json").is_file():
        return d
    if shape.decoder:
        conf = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                           num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                           max_position_embeddings=shape.max_pos, tie_word_embeddings=True)
    else:
        conf = BertConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                          num_attention_heads=shape.heads, intermediate_size=shape.ffn, max_position_embeddings=shape.max_pos)
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    conf.save_pretrained(tmp)
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)
    return d


def _bucketed_model_class(bucket: int):
    """SeqRecModel whose text encoder runs the step's distinct items sorted by length in chunks of ``bucket``
    items, each padded to its own longest (the length-bucketing lever; proposed for train/model.py)."""
    import torch

    from train.model import SeqRecModel

    class BucketedSeqRecModel(SeqRecModel):
        def _encode_text(self, idx, catalogue):
            if bucket <= 0 or idx.numel() <= bucket:
                return super()._encode_text(idx, catalogue)
            order = torch.argsort(catalogue.lengths[idx], stable=True)
            parts = [super(BucketedSeqRecModel, self)._encode_text(idx[order[s:s + bucket]], catalogue)
                     for s in range(0, idx.numel(), bucket)]
            out = torch.cat(parts)
            res = torch.empty_like(out)
            res[order] = out  # back to the caller's order
            return res

    return BucketedSeqRecModel


def _set_attn(enc, impl: str) -> None:
    if not impl:
        return
    if hasattr(enc, "set_attn_implementation"):
        enc.set_attn_implementation(impl)
    else:
        enc.config._attn_implementation = impl


def worker(a) -> dict:
    comm = CommCounter()
    if a.count_comm:
        comm.install()  # before the Accelerator: DeepSpeed captures some torch.distributed functions at init
    import numpy as np
    import torch

    from lmrec_common.models import resolve_model_path
    from train.config import ModelSection, OptimSection, TrainConfig
    from train.data import EpochSampler, TrainExamples, item_token_tensors, open_prepared
    from train.loop import build_optimizer, make_accelerator, no_zero3_init, zero_stage

    shape = SHAPES[a.shape]
    work = Path(a.work)
    prep = open_prepared(a.data)
    num_items = len(prep.items)
    if shape.name == "minilm":
        tower, with_weights = resolve_model_path("bundled:all-MiniLM-L6-v2"), True
    else:
        tower, with_weights = make_tower_folder(work, shape), False
    cfg = TrainConfig(
        data=a.data, output_dir=str(work / "runs"), run_name=f"bench-{os.getpid()}", tracker="none", batch_size=a.batch,
        model=ModelSection(item_tower="text", text_model_path=str(tower), text_mode=a.text_mode,
                           pooling="last" if shape.decoder else "mean", d_model=64, n_layers=2, n_heads=1, max_len=a.max_len,
                           dropout=0.1, loss="sampled_softmax", num_negatives=a.negatives, gradient_checkpointing=a.grad_ckpt),
        optim=OptimSection(lr=1e-4, warmup_steps=0, schedule="constant", grad_clip=1.0),
    )
    accelerator = make_accelerator(cfg, work / "runs" / cfg.run_name)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.deepspeed_config.get("gradient_clipping") == "auto":
        plugin.deepspeed_config["gradient_clipping"] = float(cfg.optim.grad_clip)  # as train/loop.py does
    world, dev = accelerator.num_processes, accelerator.device
    torch.manual_seed(0)

    ids, lens = item_token_tensors(prep.items, 0)
    train_ex = TrainExamples.build(prep.sequences, a.max_len)
    dl = torch.utils.data.DataLoader(train_ex, batch_size=a.batch, sampler=EpochSampler(len(train_ex), 0),
                                     collate_fn=train_ex.collate, drop_last=True, generator=torch.Generator().manual_seed(0))
    rss_before_model = _peak_mem(torch)
    if a.path == "ours":
        model, stats_fn = _build_ours(a, cfg, num_items, len(prep.event_types), tower, with_weights, ids, lens, accelerator, no_zero3_init)
    else:
        model, stats_fn = _build_naive(a, prep, tower, with_weights, accelerator, no_zero3_init)
    optimizer = build_optimizer(model, cfg) if a.path == "ours" else torch.optim.AdamW(model.parameters(), lr=1e-5)
    if a.fused:
        # same groups, fused kernel (one launch for all parameters instead of one per tensor group)
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"], "lr": g["lr"]} for g in optimizer.param_groups]
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=True)
    if a.compile:
        inner = model.text_encoder if a.path == "ours" else model.encoder
        inner.forward = torch.compile(inner.forward, dynamic=True)
    model, optimizer, dl = accelerator.prepare(model, optimizer, dl)
    if a.count_comm and accelerator.distributed_type.value in ("MULTI_GPU", "MULTI_CPU"):
        comm.ddp_hook(model)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in accelerator.unwrap_model(model).parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in accelerator.unwrap_model(model).parameters())
    model.train()

    step_fn = _ours_step if a.path == "ours" else _naive_step
    load0 = os.getloadavg()[0]
    prof = None
    if a.profile:
        import cProfile

        prof = cProfile.Profile()
    it = iter(dl)
    times, stats = [], []
    for i in range(a.warmup + a.steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(dl)
            batch = next(it)
        timed = i >= a.warmup
        comm.on = timed
        _sync(torch)
        if timed and prof is not None:
            prof.enable()
        t0 = time.perf_counter()
        st = step_fn(a, cfg, accelerator, model, optimizer, batch, stats_fn, num_items, i)
        _sync(torch)
        dt_s = time.perf_counter() - t0
        if prof is not None:
            prof.disable()
        comm.on = False
        print(f"[bench] rank {accelerator.process_index} step {i + 1}/{a.warmup + a.steps}{'' if timed else ' (warm-up)'} "
              f"{dt_s:.3f}s loss {st.pop('loss'):.4f}", file=sys.stderr, flush=True)
        if timed:
            times.append(dt_s)
            stats.append(st)

    # ---- sum the per-step counts over ranks, take the slowest rank's time
    keys = sorted(stats[0])
    local = torch.tensor([[s[k] for k in keys] for s in stats], dtype=torch.float64).sum(0)
    t_local = torch.tensor([sum(times)], dtype=torch.float64)
    tot = accelerator.reduce(local.to(dev), reduction="sum").cpu() if world > 1 else local
    t_max = float(accelerator.reduce(t_local.to(dev), reduction="max").cpu()) if world > 1 else float(t_local)
    per_step = {k: float(v) / a.steps for k, v in zip(keys, tot.tolist())}
    step_s = t_max / a.steps
    flops = per_step["model_flops"]
    res = {
        "variant": a.variant, "path": a.path, "shape": shape.name, "text_mode": a.text_mode,
        "distributed": accelerator.distributed_type.value, "zero_stage": zero_stage(accelerator), "world": world,
        "precision": accelerator.mixed_precision, "device": _device_name(torch), "batch_per_rank": a.batch, "max_len": a.max_len,
        "negatives": a.negatives, "bucket": a.bucket, "fused": a.fused, "grad_ckpt": a.grad_ckpt, "attn": a.attn or "default",
        "compile": a.compile, "steps": a.steps, "warmup": a.warmup,
        "step_s": step_s, "step_s_median_rank0": float(np.median(times)), "step_s_all_rank0": times,
        # contention-robust figure on a shared machine: the best single step of rank 0 (its own counts x world)
        "best_events_s": max(s_["events"] / t for s_, t in zip(stats, times)) * world,
        "best_useful_tok_s": max(s_["useful_tokens"] / t for s_, t in zip(stats, times)) * world,
        "loadavg_1min_start_end": [load0, os.getloadavg()[0]],
        "examples_s": per_step["examples"] / step_s, "events_s": per_step["events"] / step_s,
        "useful_tok_s": per_step["useful_tokens"] / step_s, "padded_tok_s": per_step["padded_tokens"] / step_s,
        "pad_frac": 1 - per_step["useful_tokens"] / max(per_step["padded_tokens"], 1),
        "model_flops_per_step": flops, "model_tflops_s": flops / step_s / 1e12,
        "per_step": per_step, "params_trainable": trainable, "params_total": total,
        "peak_mem_bytes": _peak_mem(torch), "rss_before_model_bytes": rss_before_model,
        "comm_bytes_per_step_rank0": {k: v / a.steps for k, v in comm.bytes.items()},
        "comm_calls_per_step_rank0": {k: v / a.steps for k, v in comm.calls.items()},
        "torch": torch.__version__,
    }
    if prof is not None:
        res["profile_top"] = _profile_top(prof, a.steps)
        print("[bench] profile (cumulative s per step):\n" + "\n".join(f"  {t:8.3f}  {n}" for n, t in res["profile_top"]), file=sys.stderr)
    if accelerator.is_main_process and a.result:
        Path(a.result).write_text(json.dumps(res, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return res


def _profile_top(prof, steps: int, n: int = 30) -> list[tuple[str, float]]:
    """The functions with the largest cumulative time per step (where a per-step overhead lives)."""
    import pstats

    st = pstats.Stats(prof)
    rows = [(f"{Path(f).name}:{line}({fn})", v[3] / steps) for (f, line, fn), v in st.stats.items()]
    return sorted(rows, key=lambda r: -r[1])[:n]


def _device_name(torch) -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def _build_ours(a, cfg, num_items, num_types, tower, with_weights, ids, lens, accelerator, no_zero3_init):
    import torch

    from train.catalogue import Catalogue
    from train.model import SeqRecModel

    shape = SHAPES[a.shape]
    mcfg = cfg.model.rec_config(num_items, max(num_types, 1), 0)
    cls = _bucketed_model_class(a.bucket) if a.bucket else SeqRecModel
    with no_zero3_init(accelerator):
        model = cls(mcfg, text_model_path=str(tower), load_text_weights=with_weights)
    _set_attn(model.text_encoder, a.attn)
    lens_all = lens.tolist()
    p_neg = torch.ones(num_items) / num_items

    def stats(batch, neg) -> dict:
        """Counts of one micro-batch: distinct items (encoded once), their useful and padded tokens, FLOPs."""
        hist, tgt = batch["hist"].cpu(), batch["targets"].cpu()
        need = torch.cat([hist[hist >= 0], tgt[tgt >= 0], neg.cpu()])
        uniq = torch.unique(need).tolist()
        ul = [lens_all[i] for i in uniq]
        B, T = hist.shape
        f = train_factor(a.text_mode) * forward_flops(shape, ul) + user_tower_flops(64, 2, B * T, T)
        return {"examples": B, "events": int((tgt >= 0).sum()), "distinct_items": len(uniq), "item_refs": int(need.numel()),
                "useful_tokens": sum(ul), "padded_tokens": padded_tokens(ul, a.bucket),
                "tokens_no_dedup": sum(lens_all[i] for i in need.tolist()), "model_flops": f}

    stats.p_neg = p_neg
    stats.catalogue = Catalogue.from_tokens(ids, lens).to(accelerator.device)  # the items' tokens, read by each step
    return model, stats


def _ours_step(a, cfg, accelerator, model, optimizer, batch, stats_fn, num_items, i) -> dict:
    import torch

    g = torch.Generator().manual_seed(1000 + i * 7 + accelerator.process_index)
    neg = torch.multinomial(stats_fn.p_neg, a.negatives, replacement=True, generator=g).to(accelerator.device)
    with accelerator.accumulate(model):
        out = model(batch["hist"], batch["event_types"], batch["targets"], negatives=neg, catalogue=stats_fn.catalogue)
        accelerator.backward(out["loss"])
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    st = stats_fn(batch, neg)
    st["loss"] = float(out["loss"].detach())
    return st


def _build_naive(a, prep, tower, with_weights, accelerator, no_zero3_init):
    import torch
    import torch.nn as nn
    from transformers import AutoTokenizer

    from lmrec_common.models import resolve_model_path
    from train.model import pool_hidden, load_text_encoder

    shape = SHAPES[a.shape]
    texts = prep.items.data.table.column("text").to_pylist()
    # the data's tokenizer (MiniLM's): the token ids must fit every shape's vocabulary (30522 <= vocab)
    tok = AutoTokenizer.from_pretrained(str(resolve_model_path("bundled:all-MiniLM-L6-v2")))
    tok.truncation_side = "left"  # keep the most recent history when the text exceeds 128 tokens
    pooling = "last" if shape.decoder else "mean"

    class NaiveClickModel(nn.Module):
        """The seed article: encoder over "history text [SEP] candidate text" -> pooled -> click logit."""

        def __init__(self):
            super().__init__()
            with no_zero3_init(accelerator):
                self.encoder = load_text_encoder(str(tower), with_weights=with_weights)
            self.head = nn.Linear(self.encoder.config.hidden_size, 1)

        def forward(self, input_ids, attention_mask):
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.head(pool_hidden(h, attention_mask, pooling)).squeeze(-1)

    model = NaiveClickModel()
    _set_attn(model.encoder, a.attn)
    rng = torch.Generator().manual_seed(0)

    def examples(batch):
        """(history text, candidate text, label) for every next-item position of the batch's users."""
        hist, tgt = batch["hist"].cpu(), batch["targets"].cpu()
        out = []
        for r in range(hist.size(0)):
            row = hist[r].tolist()
            for t in range(hist.size(1)):
                if int(tgt[r, t]) < 0:
                    continue
                h = [x for x in row[: t + 1] if x >= 0][-NAIVE_HISTORY:]
                pos = len(out) % 2 == 0  # positives and random negatives alternate
                cand = int(tgt[r, t]) if pos else int(torch.randint(0, len(texts), (1,), generator=rng))
                out.append(("User watched: " + "; ".join(texts[x] for x in h), texts[cand], float(pos)))
        return out[: a.naive_examples] if a.naive_examples else out

    examples.tok = tok
    return model, examples


def _naive_step(a, cfg, accelerator, model, optimizer, batch, examples_fn, num_items, i) -> dict:
    """One optimizer step over the batch's examples, one tokenizer call + one forward per example."""
    import torch
    import torch.nn.functional as F

    shape = SHAPES[a.shape]
    exs = examples_fn(batch)
    useful, losses, lens = 0, [], []
    for k, (h, c, y) in enumerate(exs):
        enc = examples_fn.tok(h, c, padding="max_length", truncation=True, max_length=NAIVE_MAX_LEN, return_tensors="pt")
        ids, attn = enc["input_ids"].to(accelerator.device), enc["attention_mask"].to(accelerator.device)
        logit = model(ids, attn)
        loss = F.binary_cross_entropy_with_logits(logit.float(), torch.full_like(logit.float(), y)) / len(exs)
        accelerator.backward(loss)
        n = int(attn.sum())
        useful += n
        lens.append(n)
        losses.append(float(loss.detach()) * len(exs))
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    f = train_factor(a.text_mode) * forward_flops(shape, lens)
    return {"examples": len(exs), "events": len(exs), "distinct_items": 0, "item_refs": 0, "useful_tokens": useful,
            "padded_tokens": NAIVE_MAX_LEN * len(exs), "tokens_no_dedup": useful, "model_flops": f,
            "loss": sum(losses) / max(len(losses), 1)}


# ============================================================================================ orchestration
@dataclass
class Variant:
    name: str
    launch: str  # native | zero2 | zero3 | ddp2 | zero2x2 | zero3x2
    shape: str = "minilm"
    path: str = "ours"
    args: tuple = ()  # extra worker args
    ds_json: dict | None = None  # overrides of launch/deepspeed/zero{2,3}.json ("zero_optimization" keys)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(v: Variant, gpu: bool, precision: str, work: Path) -> tuple[list[str], dict]:
    """accelerate launch command of one variant, using the repo's launch/ configs."""
    env = dict(os.environ)
    acc = [sys.executable, "-m", "accelerate.commands.launch"]
    port = ["--main_process_port", str(_free_port())]
    mp = ["--mixed_precision", precision]
    stage = {"zero2": 2, "zero3": 3, "zero2x2": 2, "zero3x2": 3}.get(v.launch)
    if stage:
        js = json.loads((REPO / f"launch/deepspeed/zero{stage}.json").read_text())
        if v.ds_json:
            js["zero_optimization"].update(v.ds_json)
        jf = work / f"ds_{v.name}.json"
        jf.write_text(json.dumps(js, indent=1))
        nproc = "2" if v.launch.endswith("x2") else "1"
        if gpu:
            cfgf = "launch/accelerate/gpu_8_zero2.yaml" if stage == 2 else "launch/accelerate/multinode_zero3.yaml"
            acc += ["--config_file", cfgf, "--num_machines", "1", "--machine_rank", "0", "--main_process_ip", "127.0.0.1"]
        else:
            cfgf = f"launch/accelerate/cpu_ds_zero{stage}.yaml"
            env["DS_ACCELERATOR"] = "cpu"
            acc += ["--config_file", cfgf]
        acc += ["--num_processes", nproc, "--deepspeed_config_file", str(jf)] + mp + port
    elif v.launch == "ddp2":
        acc += ["--config_file", "launch/accelerate/cpu_ddp_2proc.yaml"] + mp + port
    else:
        acc += ["--config_file", "launch/accelerate/gpu_1.yaml" if gpu else "launch/accelerate/cpu_1proc.yaml"] + mp
    return acc, env


def _run_group(cmd: list[str], env: dict, timeout: float) -> tuple[int | None, str, str]:
    """Run ``cmd`` in a session of its own; at ``timeout`` kill the whole session (accelerate's launcher AND the
    workers it started, which would otherwise keep the GPU). Returns (exit code or None on timeout, stdout, stderr)."""
    import signal

    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return None, out, err + f"\n[bench] killed after {timeout:.0f}s (--variant-timeout / --budget-s)"


def run_variant(v: Variant, a, gpu: bool, precision: str, timeout: float | None = None) -> dict | None:
    work = Path(a.work)
    res_file = work / "results" / f"{v.name}.json"
    res_file.parent.mkdir(parents=True, exist_ok=True)
    res_file.unlink(missing_ok=True)
    cmd, env = launch_cmd(v, gpu, precision, work)
    cmd += [str(Path(__file__).resolve()), "--worker", "--variant", v.name, "--data", str(a.data_dir), "--work", str(work),
            "--shape", v.shape, "--path", v.path, "--result", str(res_file), *v.args]
    print(f"[bench] {v.name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    code, out, err = _run_group(cmd, env, a.variant_timeout if timeout is None else timeout)
    log = work / "results" / f"{v.name}.log"
    log.write_text(out + "\n----- stderr -----\n" + err)
    if code != 0 or not res_file.is_file():
        tail = "\n".join(err.strip().splitlines()[-15:])
        print(f"[bench] {v.name}: FAILED ({'timeout' if code is None else f'exit {code}'}, log {log}):\n{tail}", flush=True)
        return {"variant": v.name, "failed": True, "exit": code, "timed_out": code is None, "log": str(log)}
    r = json.loads(res_file.read_text())
    r["wall_s"] = time.time() - t0
    print(f"[bench] {v.name}: step {r['step_s']:.3f}s | {r['events_s']:.1f} events/s | {r['useful_tok_s']:.0f} useful tok/s "
          f"| pad {100 * r['pad_frac']:.0f}% | {r['model_tflops_s'] * 1e3:.1f} GFLOP/s | peak mem {r['peak_mem_bytes'] / 2**30:.2f} GiB "
          f"| wall {r['wall_s']:.0f}s", flush=True)
    return r


def presets(name: str) -> tuple[list[Variant], dict]:
    """Variants and their sizes. CPU sizes fit 2 shared cores in minutes: small batch, few steps."""
    if name in ("cpu", "cpu-smoke"):
        steps = ["--steps", "2", "--warmup", "1"] if name == "cpu-smoke" else ["--steps", "3", "--warmup", "1"]
        small = ("--batch", "2", "--max-len", "10", "--negatives", "16", *steps)
        naive = ("--batch", "2", "--max-len", "10", "--naive-examples", "8", *steps)
        bert = ("--batch", "1", "--max-len", "10", "--negatives", "8", *steps)
        bert_naive = ("--batch", "1", "--max-len", "10", "--naive-examples", "3", *steps)
        vs = [
            Variant("minilm_native", "native", args=small),
            Variant("minilm_naive", "native", path="naive", args=naive),
        ]
        if name == "cpu":
            vs += [
                Variant("minilm_native_bucket32", "native", args=(*small, "--bucket", "32")),
                Variant("minilm_native_fused", "native", args=(*small, "--fused")),
                Variant("minilm_native_eager", "native", args=(*small, "--attn", "eager")),
                Variant("minilm_native_gradckpt", "native", args=(*small, "--grad-ckpt")),
                Variant("minilm_lora", "native", args=(*small, "--text-mode", "lora")),
                Variant("minilm_zero2", "zero2", args=small),
                Variant("minilm_zero3", "zero3", args=small),
                Variant("minilm_zero2_bigbucket_overlap", "zero2", args=small,
                        ds_json={"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "overlap_comm": True}),
                Variant("bert_native", "native", shape="bert-base", args=bert),
                Variant("bert_naive", "native", shape="bert-base", path="naive", args=bert_naive),
                Variant("bert_zero2", "zero2", shape="bert-base", args=bert),
                # 2 CPU processes: measured communication vs the paper model
                Variant("minilm_ddp_x2", "ddp2", args=(*small, "--count-comm")),
                Variant("minilm_zero2_x2", "zero2x2", args=(*small, "--count-comm")),
                Variant("minilm_zero3_x2", "zero3x2", args=(*small, "--count-comm")),
            ]
        return vs, {"precision": "no", "synthetic": []}
    if name == "gpu":
        b = ("--batch", "64", "--max-len", "50", "--negatives", "512", "--steps", "20", "--warmup", "5")
        b_dec = ("--batch", "16", "--max-len", "50", "--negatives", "256", "--steps", "10", "--warmup", "3")
        nv = ("--batch", "2", "--max-len", "50", "--naive-examples", "64", "--steps", "5", "--warmup", "1")
        full = {}
        for shape, args in (("minilm", b), ("bert-base", b), ("decoder-0.5b", b_dec)):
            s = shape.split("-")[0]
            full |= {f"{s}_native": Variant(f"{s}_native", "native", shape=shape, args=args),
                     f"{s}_zero2": Variant(f"{s}_zero2", "zero2", shape=shape, args=args),
                     f"{s}_zero3": Variant(f"{s}_zero3", "zero3", shape=shape, args=args),
                     f"{s}_naive": Variant(f"{s}_naive", "native", shape=shape, path="naive", args=nv)}
        # what the three checks need first: a lease of a few minutes (--budget-s) measures them before the rest
        vs = [full.pop(n) for n in GPU_CHECK_ORDER] + list(full.values())
        vs += [Variant("bert_native_bucket64", "native", shape="bert-base", args=(*b, "--bucket", "64")),
               Variant("bert_native_fused", "native", shape="bert-base", args=(*b, "--fused")),
               Variant("bert_native_compile", "native", shape="bert-base", args=(*b, "--compile")),
               Variant("bert_native_gradckpt", "native", shape="bert-base", args=(*b, "--grad-ckpt")),
               Variant("bert_zero2_bigbucket_overlap", "zero2", shape="bert-base", args=b,
                       ds_json={"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "overlap_comm": True})]
        return vs, {"precision": "bf16", "synthetic": ["n_users=20000", "n_items=20000", "n_events=1000000"]}
    raise SystemExit(f"unknown preset {name!r} (cpu, cpu-smoke, gpu)")


def prepare_data(work: Path, synthetic_overrides: list[str]) -> Path:
    """Synthetic raw logs -> data_prep.pipeline.run -> prepared folder (reused when it exists)."""
    tag = "_".join(o.replace("=", "") for o in synthetic_overrides) or "sample"
    out = work / "prepared" / tag
    if (out / "LATEST").exists() or any(out.glob("*/manifest.json")):
        return out
    raw = work / "raw" / tag
    if not (raw / "generation.json").is_file():
        subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--out", str(raw), *synthetic_overrides], cwd=REPO, check=True)
    from data_prep.config import DataPrepConfig
    from data_prep.pipeline import run
    from lmrec_common.config import config_from_dict

    cfg = config_from_dict(DataPrepConfig, {
        "events_path": str(raw / "events"), "items_path": str(raw / "items"), "output_dir": str(out), "version": "bench",
        "item_text_template": "{title}. {category}. {brand}. {description}", "max_text_tokens": 64,
        "event_types": ["view", "click", "cart", "purchase"], "num_shards": 2, "num_proc": 0, "incremental": False})
    run(cfg)
    return out


def matmul_peak(seconds: float = 3.0, n: int = 1024, dtype: str = "float32") -> float:
    """Best observed FLOP/s of an (n x n) @ (n x n) matmul on this machine (all threads): the CPU 'peak'."""
    import torch

    x = torch.randn(n, n, dtype=getattr(torch, dtype))
    best, t_end = 0.0, time.time() + seconds
    while time.time() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            x @ x
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def data_stats(prep_dir: Path, batch: int, max_len: int, negatives: int, shape: Shape, steps: int = 20) -> dict:
    """Per-step counts of the real batches at a given size, without running a model (for the paper model)."""
    import torch

    from train.data import EpochSampler, TrainExamples, item_token_tensors, open_prepared

    prep = open_prepared(prep_dir)
    _, lens = item_token_tensors(prep.items, 0)
    ex = TrainExamples.build(prep.sequences, max_len)
    order = list(EpochSampler(len(ex), 0))
    g = torch.Generator().manual_seed(0)
    acc = {"events": 0, "distinct_items": 0, "useful_tokens": 0, "padded_tokens": 0, "tokens_no_dedup": 0, "flops": 0.0}
    n = 0
    for s in range(0, min(len(order), steps * batch) - batch + 1, batch):
        b = ex.collate(order[s:s + batch])
        neg = torch.randint(0, len(lens), (negatives,), generator=g)
        need = torch.cat([b["hist"][b["hist"] >= 0], b["targets"][b["targets"] >= 0], neg])
        u = torch.unique(need)
        ul = lens[u].tolist()
        acc["events"] += int((b["targets"] >= 0).sum())
        acc["distinct_items"] += len(ul)
        acc["useful_tokens"] += sum(ul)
        acc["padded_tokens"] += padded_tokens(ul)
        acc["tokens_no_dedup"] += int(lens[need].sum())
        acc["flops"] += 3 * forward_flops(shape, ul) + user_tower_flops(64, 2, batch * max_len, max_len)
        n += 1
    return {k: v / max(n, 1) for k, v in acc.items()} | {"steps": n, "batch": batch, "max_len": max_len, "negatives": negatives}


def paper_model(prep_dir: Path | None, mfu: float = 0.40, peak_tflops: float = 989.0) -> dict:
    """FLOPs per step at batch 64 x 50 (from the real batches when a prepared folder is given), step time at
    ``mfu`` of an H100/H200 bf16 peak, bytes per step under DDP/ZeRO-2/ZeRO-3 and the 8 / 64 GPU estimate."""
    out = {"assumptions": {"mfu": mfu, "peak_tflops_bf16": peak_tflops, "bytes_per_param_comm": 2,
                           "interconnects": {str(k): dataclasses.asdict(v) for k, v in INTERCONNECTS.items()}}, "shapes": {}}
    for sname, shape in SHAPES.items():
        p = shape_params(shape)
        params = p["total"] + 64 * 64 * 30  # + projection and user tower (~0.1M), negligible
        st = data_stats(prep_dir, 64 if sname != "decoder-0.5b" else 16, 50, 512 if sname != "decoder-0.5b" else 256, shape) \
            if prep_dir else None
        compute_s = st["flops"] / (mfu * peak_tflops * 1e12) if st else None
        row = {"params": p, "step_stats": st, "compute_s_1gpu": compute_s, "comm": {}, "scaling": {}}
        for stage in (0, 2, 3):
            row["comm"][stage] = {w: comm_bytes(params, stage, w) for w in (2, 8, 64)}
            if compute_s:
                row["scaling"][stage] = {w: {ov: scaled_step(compute_s, params, stage, w, INTERCONNECTS[w].bus_gbs, ov)
                                             for ov in (0.0, 0.8)} for w in (8, 64)}
        out["shapes"][sname] = row
    return out


# ============================================================================================ tables
def _fmt(x, unit=""):
    if x is None:
        return "-"
    for u, d in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= d:
            return f"{x / d:.2f}{u}{unit}"
    return f"{x:.2f}{unit}" if isinstance(x, float) else f"{x}{unit}"


def row_peak(r: dict, cpu_peak: float | None) -> float | None:
    """The FLOP/s a row's MFU is measured against: the GPU's datasheet bf16 peak, or the CPU's measured matmul rate."""
    if r["device"].startswith("CPU"):
        return cpu_peak
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in r["device"]), None)


def checks(results: list[dict], cpu_peak: float | None) -> dict:
    """Issue #33's three figures from the rows that ran (a missing row leaves its figure out, and says so):
    ``vs_naive`` = the smallest over the shapes of ours / naive useful tokens/s (native launch, same shape),
    ``zero2_over_bf16`` = the smaller over MiniLM and BERT-base of ZeRO-2 / native history events/s,
    ``mfu_0p5b`` = the ~0.5B decoder's MFU (native bf16), a fraction. ``detail`` holds each shape's ratio,
    the history-events ratio beside the token one, the target and whether it is met (None while shapes are
    missing and those measured meet it)."""
    ok = {r["variant"]: r for r in results if r and not r.get("failed")}
    vs_tok, vs_ev, z2 = {}, {}, {}
    for s in ("minilm", "bert", "decoder"):
        ours, naive = ok.get(f"{s}_native"), ok.get(f"{s}_naive")
        if ours and naive and naive["useful_tok_s"] > 0 and naive["events_s"] > 0:
            vs_tok[s] = ours["useful_tok_s"] / naive["useful_tok_s"]
            vs_ev[s] = ours["events_s"] / naive["events_s"]
        zero2 = ok.get(f"{s}_zero2")
        if s != "decoder" and ours and zero2 and ours["events_s"] > 0:
            z2[s] = zero2["events_s"] / ours["events_s"]
    dec = ok.get("decoder_native")
    peak = row_peak(dec, cpu_peak) if dec else None
    mfu = dec["model_tflops_s"] * 1e12 / peak if dec and peak else None
    out = {"vs_naive": min(vs_tok.values()) if vs_tok else None,
           "zero2_over_bf16": min(z2.values()) if z2 else None,
           "mfu_0p5b": mfu}
    need = {"vs_naive": ("minilm", "bert", "decoder"), "zero2_over_bf16": ("minilm", "bert"), "mfu_0p5b": ("decoder",)}
    have = {"vs_naive": vs_tok, "zero2_over_bf16": z2, "mfu_0p5b": {"decoder": mfu} if mfu is not None else {}}
    out["detail"] = {}
    for k, target in CHECK_TARGETS.items():
        missing = [x for x in need[k] if x not in have[k]]
        # met: False once a measured shape misses the target; True only when every shape is measured and meets it
        met = None if out[k] is None else (False if out[k] < target else (True if not missing else None))
        out["detail"][k] = {"target": target, "met": met, "by_shape": have[k], "missing_shapes": missing}
    out["detail"]["vs_naive"]["history_events_by_shape"] = vs_ev
    return out


def checks_table(c: dict) -> str:
    lines = ["| check | value | target | met | by shape | missing |", "|---|---|---|---|---|---|"]
    for k in CHECK_TARGETS:
        d = c["detail"][k]
        v = "-" if c[k] is None else f"{c[k]:.3g}"
        by = ", ".join(f"{s} {x:.3g}" for s, x in d["by_shape"].items()) or "-"
        lines.append(f"| {k} | {v} | >= {d['target']:g} | "
                     f"{'-' if c[k] is None else {True: 'yes', False: 'NO', None: 'not yet (shapes missing)'}[d['met']]} "
                     f"| {by} | {', '.join(d['missing_shapes']) or '-'} |")
    return "\n".join(lines)


def tables(results: list[dict], peak_flops: float | None, paper: dict | None) -> str:
    lines = []
    ok = [r for r in results if not r.get("failed")]
    if ok:
        lines += ["| variant | shape | path | launch | world | prec | batch x T | step s | examples/s | history events/s | useful tok/s "
                  "| padded tok/s | pad % | model GFLOP/s | MFU % | peak mem GiB | best-step events/s | load avg |",
                  "|" + "---|" * 18]
        for r in ok:
            launch = "DDP" if r["distributed"] in ("MULTI_CPU", "MULTI_GPU") else (f"ZeRO-{r['zero_stage']}" if r["zero_stage"] else "native")
            peak = row_peak(r, peak_flops)
            mfu = 100 * r["model_tflops_s"] * 1e12 / peak if peak else None
            lines.append(f"| {r['variant']} | {r['shape']} ({r['text_mode']}) | {r['path']} | {launch} | {r['world']} | {r['precision']} "
                         f"| {r['batch_per_rank']} x {r['max_len']} | {r['step_s']:.3f} | {r['examples_s']:.2f} | {r['events_s']:.1f} "
                         f"| {r['useful_tok_s']:.0f} | {r['padded_tok_s']:.0f} | {100 * r['pad_frac']:.0f} | {r['model_tflops_s'] * 1e3:.1f} "
                         f"| {'-' if mfu is None else f'{mfu:.1f}'} | {r['peak_mem_bytes'] / 2**30:.2f} | {r['best_events_s']:.1f} "
                         f"| {r['loadavg_1min_start_end'][0]:.1f}-{r['loadavg_1min_start_end'][1]:.1f} |")
    failed = [r for r in results if r.get("failed")]
    if failed:
        lines += ["", "Failed: " + ", ".join(f"{r['variant']} (exit {r['exit']}, {r['log']})" for r in failed)]
    comm = [r for r in ok if r.get("comm_bytes_per_step_rank0")]
    if comm:
        lines += ["", "| variant | measured bytes/step/rank by op (calls) | measured total | paper payload | ratio |", "|---|---|---|---|---|"]
        for r in comm:
            stage = 0 if r["distributed"] in ("MULTI_CPU", "MULTI_GPU") else r["zero_stage"]
            bpp = 2 if r["precision"] in ("bf16", "fp16") else 4
            params = r["params_trainable"] if stage < 3 else r["params_total"]
            paper_b = comm_bytes(params, stage, r["world"], bpp)["payload"]
            meas = dict(r["comm_bytes_per_step_rank0"])
            tot = sum(meas.values())
            by = ", ".join(f"{k} {_fmt(v, 'B')} ({r['comm_calls_per_step_rank0'][k]:.0f})" for k, v in sorted(meas.items()))
            lines.append(f"| {r['variant']} | {by} | {_fmt(tot, 'B')} | {_fmt(paper_b, 'B')} | {tot / paper_b:.2f} |")
    if paper:
        lines += ["", "| shape | params (total / matmul) | events/step | distinct items/step | useful tok/step | tokens w/o dedup "
                  "| pad % (one batch) | TFLOP/step | step at 40% MFU | GPU-h per 1B events |", "|" + "---|" * 10]
        for s, row in paper["shapes"].items():
            st = row["step_stats"]
            if not st:
                continue
            gh = 1e9 / st["events"] * row["compute_s_1gpu"] / 3600
            lines.append(f"| {s} | {_fmt(row['params']['total'])} / {_fmt(row['params']['matmul'])} | {st['events']:.0f} (B {st['batch']}) "
                         f"| {st['distinct_items']:.0f} | {_fmt(st['useful_tokens'])} | {_fmt(st['tokens_no_dedup'])} "
                         f"| {100 * (1 - st['useful_tokens'] / st['padded_tokens']):.0f} | {st['flops'] / 1e12:.2f} "
                         f"| {1e3 * row['compute_s_1gpu']:.1f} ms | {gh:.2f} |")
        lines += ["", "| shape | stage | bytes/step/GPU (payload) | wire 8 GPUs | step 8 GPUs (no overlap / 80%) | eff. 8 | wire 64 GPUs "
                  "| step 64 GPUs (no overlap / 80%) | eff. 64 |", "|" + "---|" * 9]
        for s, row in paper["shapes"].items():
            for stage in (0, 2, 3):
                sc = row["scaling"].get(stage)
                c8, c64 = row["comm"][stage][8], row["comm"][stage][64]
                if not sc:
                    continue
                a8, b8 = sc[8][0.0], sc[8][0.8]
                a64, b64 = sc[64][0.0], sc[64][0.8]
                lines.append(f"| {s} | {'DDP' if stage == 0 else f'ZeRO-{stage}'} | {_fmt(c8['payload'], 'B')} | {_fmt(c8['wire'], 'B')} "
                             f"| {1e3 * a8['step_s']:.1f} / {1e3 * b8['step_s']:.1f} ms | {100 * a8['efficiency']:.0f}-{100 * b8['efficiency']:.0f}% "
                             f"| {_fmt(c64['wire'], 'B')} | {1e3 * a64['step_s']:.1f} / {1e3 * b64['step_s']:.1f} ms "
                             f"| {100 * a64['efficiency']:.0f}-{100 * b64['efficiency']:.0f}% |")
    return "\n".join(lines)


# ============================================================================================ CLI
def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/lmrec-train-bench", help="scratch folder (data, tower configs, results)")
    ap.add_argument("--out", help="results JSON (orchestrator); default <work>/train_throughput.json")
    # orchestrator
    ap.add_argument("--preset", default="cpu-smoke", help="cpu | cpu-smoke | gpu")
    ap.add_argument("--only", help="comma-separated variant names of the preset to run")
    ap.add_argument("--paper", action="store_true", help="the paper model only (data statistics + formulas, no runs)")
    ap.add_argument("--variant-timeout", type=int, default=1800)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall budget of the whole run (a lent GPU's minutes): no variant starts unless the time left "
                         "covers the longest variant so far (at least 60 s), each is killed at the time left, and --out "
                         "is rewritten after every variant, so a cut-short run still holds what it measured")
    # worker
    ap.add_argument("--worker", action="store_true", help="run ONE variant in this process (under accelerate launch)")
    ap.add_argument("--variant", default="manual")
    ap.add_argument("--data", help="prepared folder (worker)")
    ap.add_argument("--result", help="worker result JSON")
    ap.add_argument("--shape", default="minilm", choices=sorted(SHAPES))
    ap.add_argument("--path", default="ours", choices=["ours", "naive"])
    ap.add_argument("--text-mode", default="full", choices=["full", "lora"])
    ap.add_argument("--batch", type=int, default=4, help="users per micro-batch and rank")
    ap.add_argument("--max-len", type=int, default=20, help="history positions per user")
    ap.add_argument("--negatives", type=int, default=32, help="shared sampled negatives per step")
    ap.add_argument("--naive-examples", type=int, default=16, help="naive: examples per step (0 = all positions of the batch)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--bucket", type=int, default=0, help="length-bucketing: items per padded chunk (0 = one batch)")
    ap.add_argument("--fused", action="store_true", help="fused AdamW")
    ap.add_argument("--attn", default="", help="attention implementation of the tower (sdpa | eager; default = transformers')")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (text tower + user tower)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the text encoder's forward")
    ap.add_argument("--count-comm", action="store_true", help="count bytes handed to collectives")
    ap.add_argument("--profile", action="store_true", help="cProfile the timed steps; top functions go to the result")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    if a.worker:
        if not a.data:
            raise SystemExit("--worker needs --data <prepared folder>")
        worker(a)
        return 0
    import torch

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    variants, meta = presets(a.preset)
    if a.only:
        keep = set(a.only.split(","))
        unknown = keep - {v.name for v in variants}
        if unknown:
            raise SystemExit(f"--only: unknown variant(s) {sorted(unknown)} of preset {a.preset}")
        variants = [v for v in variants if v.name in keep]
    t0 = time.time()
    a.data_dir = prepare_data(work, meta["synthetic"])
    peak = None if gpu else matmul_peak()
    header = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "preset": a.preset,
              "machine": f"{platform.node()} {platform.processor() or platform.machine()} x{os.cpu_count()} cores",
              "device": torch.cuda.get_device_name(0) if gpu else "CPU", "torch": torch.__version__,
              "cpu_matmul_peak_flops": peak, "data": str(a.data_dir)}
    print(f"[bench] {header}", flush=True)
    paper = paper_model(a.data_dir)
    out = Path(a.out or work / "train_throughput.json")
    from lmrec_common.publish import atomic_write_json

    results, skipped, walls = [], [], []

    def write() -> dict:
        doc = {"header": header, "checks": checks(results, peak), "results": results, "skipped": skipped, "paper": paper}
        atomic_write_json(out, doc)
        return doc

    for v in [] if a.paper else variants:
        left = None if a.budget_s is None else a.budget_s - (time.time() - t0)
        if left is not None and left < max([60.0, *walls]):
            skipped.append(v.name)
            continue
        t1 = time.time()
        results.append(run_variant(v, a, gpu, meta["precision"], None if left is None else min(a.variant_timeout, left)))
        walls.append(time.time() - t1)
        write()
    if skipped:
        print(f"[bench] --budget-s {a.budget_s:g}: not started, out of time: {', '.join(skipped)}", flush=True)
    doc = write()
    print(f"[bench] wrote {out} in {time.time() - t0:.0f}s\n")
    print(tables(results, peak, paper))
    if results:
        print("\n" + checks_table(doc["checks"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
