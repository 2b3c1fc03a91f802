"""The recommender: an item tower (learned ids, a pretrained HF text encoder, or both) and a causal
user tower over the sequence of item vectors, trained at every position to predict the next item.

    model = SeqRecModel(RecModelConfig(num_items=3706, item_tower="id"))
    cat = Catalogue.from_items(prepared.items, model)     # train/catalogue.py: the items' side (tokens, features ...)
    out = model(hist, event_types, targets, catalogue=cat)  # {"loss": scalar, ...}; training only
    items = cat.item_vectors(model)                       # (I, d) for evaluation / inference
    users = model.user_vectors(hist, event_types, item_table=items)  # (B, d);  scores = users @ items.T

The model holds weights only (id rows and id_mask, text encoder, projections, pooling and its basis, the user
tower): what a catalogue item is (its tokens, frozen features, token states, a borrowed id row) comes from the
Catalogue passed in.

Conventions used everywhere below:
- item index ``i`` in ``0..num_items-1`` is row ``i`` of the prepared ``items`` table; ``-1`` is padding.
- histories are LEFT-padded: ``hist[:, -1]`` is always the latest real item, so the user state is the
  output at the last position and position embeddings count back from the end (position
  ``max_len-1`` is always the newest event, whatever the history length).
- ``event_types`` uses the manifest's ``event_types`` indices; padding positions may hold anything.

This file knows nothing of distribution, precision or logging (STYLE.md #3; a test parses the imports).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

PAD = -1


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout. On accelerators this is F.dropout (a fused kernel). On CPU, F.dropout draws
    one Bernoulli per element with a scalar generator, which was 23% of a MovieLens-1M training step;
    here four 16-bit uniforms come from each int64 draw of torch's own generator (so seeding and the
    checkpointed RNG state still make runs exact), 5x faster (bench: docs/PERF.md). Keep rate is
    quantised to 1/65536."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    n = x.numel()
    r = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64).view(torch.int16)[:n].view(x.shape)
    scale = (r >= (-32768 + round(p * 65536))).to(x.dtype).mul_(1.0 / (1.0 - p))
    return x * scale


class _LinearSoftmaxCE(torch.autograd.Function):
    """Mean cross-entropy of the logits ``u @ table.T`` (N, C) against (N,) labels, fused with the
    matmul and computed in row chunks: the forward walks ``chunk`` rows at a time, turns each chunk's
    logits in place into softmax - onehot and accumulates both gradients right away (``G @ table`` and
    ``G.T @ u``); the backward only scales them. The (N, C) logits never exist at once (memory O(chunk x
    C) instead of three (N, C) buffers), there is no separate backward pass over them, and the working
    set stays cache-sized. Same FLOPs as the unfused path (one product forward, two for the gradients)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, table: torch.Tensor, labels: torch.Tensor, chunk: int,
                masked: torch.Tensor | None) -> torch.Tensor:
        need_u, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = u.size(0)
        gu = torch.empty(n, u.size(1), dtype=torch.float32, device=u.device) if need_u else None
        gt = torch.zeros(table.shape, dtype=torch.float32, device=table.device) if need_t else None
        total = torch.zeros((), dtype=torch.float32, device=u.device)
        for s in range(0, n, chunk):
            uc, lab = u[s : s + chunk], labels[s : s + chunk]
            x = (uc @ table.T).float()  # (c, C)
            if masked is not None:
                mask_columns_(x, masked[s : s + chunk], lab)
            lse = torch.logsumexp(x, dim=1)
            total += (lse - x.gather(1, lab[:, None]).squeeze(1)).sum()
            if need_u or need_t:
                g = x.sub_(lse[:, None]).exp_()
                g[torch.arange(g.size(0), device=g.device), lab] -= 1.0
                g = g.to(table.dtype)
                if need_u:
                    gu[s : s + chunk] = g @ table
                if need_t:
                    gt += (g.T @ uc.to(g.dtype)).float()
        ctx.save_for_backward(*(t for t in (gu, gt) if t is not None))
        ctx.has = (need_u, need_t)
        ctx.dtypes = (u.dtype, table.dtype)
        ctx.n = n
        return total / n

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        saved = list(ctx.saved_tensors)
        scale = g / ctx.n
        gu = (saved.pop(0) * scale).to(ctx.dtypes[0]) if ctx.has[0] else None
        gt = (saved.pop(0) * scale).to(ctx.dtypes[1]) if ctx.has[1] else None
        return gu, gt, None, None, None


def linear_softmax_cross_entropy(u: torch.Tensor, table: torch.Tensor, labels: torch.Tensor,
                                 chunk_bytes: int = 16 << 20, masked: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE of softmax(u @ table.T) over rows, fp32 logits, (N, C) never materialised (chunks of
    ``chunk_bytes`` of logits). ``masked`` (N, M) long: per row, columns left out of its softmax (-1 =
    none; a row's own label is never left out)."""
    if u.size(0) == 0:
        return (u.sum() + table.sum()) * 0.0
    if masked is not None and masked.shape[0] != u.size(0):
        raise ValueError(f"masked has {masked.shape[0]} rows, u has {u.size(0)}")
    chunk = max(64, chunk_bytes // (4 * max(table.size(0), 1)))
    return _LinearSoftmaxCE.apply(u, table, labels, chunk, masked)


def mask_columns_(x: torch.Tensor, cols: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """x (N, C) logits, cols (N, M) columns to leave out of each row's softmax (-1 = none): set to -inf in
    place, except each row's label column, which always stays."""
    keep = x.gather(1, labels[:, None])
    x.scatter_(1, torch.where(cols >= 0, cols, labels[:, None]), -math.inf)
    return x.scatter_(1, labels[:, None], keep)


def mask_columns(x: torch.Tensor, cols: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mask_columns_ out of place, for logits autograd is tracking (the in-place scatters would overwrite a tensor
    that the backward of the op which made it still needs)."""
    drop = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    drop.scatter_(1, torch.where(cols >= 0, cols, labels[:, None]), True)
    drop.scatter_(1, labels[:, None], False)
    return x.masked_fill(drop, -math.inf)


def seen_before(hist: torch.Tensor, tmask: torch.Tensor) -> torch.Tensor:
    """hist (B, T) left-padded with -1, tmask (B, T) the positions with a target -> (N, T): for each such
    position t (row-major, as ``x[tmask]``), the items hist[b, 0..t], -1 elsewhere."""
    T = hist.size(1)
    upto = torch.ones(T, T, dtype=torch.bool, device=hist.device).tril()  # [t, s]: s <= t
    rows, cols = tmask.nonzero(as_tuple=True)
    h = hist[rows]  # (N, T)
    return torch.where(upto[cols] & (h >= 0), h, torch.full_like(h, -1))


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


@dataclass
class RecModelHyper:
    """The user-settable architecture; the train config's ``model:`` section is this plus sampling
    options, and RecModelConfig adds what the data decides (catalogue size, event types, pad id)."""

    item_tower: Literal["id", "text", "hybrid"] = "hybrid"
    # text tower (text / hybrid): a local HF folder or "bundled:all-MiniLM-L6-v2"
    text_model_path: str = "bundled:all-MiniLM-L6-v2"
    # frozen: features computed once; lora / full: the whole encoder trained (every item of a step through it);
    # pool: the encoder frozen, each item's last-layer token states cached once, and a learned attention pooling
    # over them trained with the recommender (exact, over the whole catalogue every step: affordable on a CPU);
    # top: the encoder's top ``top_layers`` layers trained over each item's cached input to them (the lower layers
    # frozen, run once per item), every item a step needs through them fresh (no stale vectors: use it with
    # sampled_softmax, or the full softmax puts the whole catalogue through the trained layers every step)
    text_mode: Literal["frozen", "lora", "full", "pool", "top"] = "frozen"
    top_layers: int = 1  # text_mode top: how many of the encoder's last layers are trained
    pool_heads: int = 4  # text_mode pool: attention-pooling heads (each a learned query over an item's tokens)
    pool_rank: int = 64  # text_mode pool: principal axes of the token states the pooling works in
    pooling: Literal["mean", "cls", "last"] = "mean"  # "last" for decoders (right-padded tokens)
    text_batch_size: int = 256  # items per encoder call in Catalogue.prepare / all_item_vectors
    # user tower
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 1
    max_len: int = 200
    dropout: float = 0.2
    # hybrid only: share of item id rows zeroed per training step (each item's row drops for the whole
    # step, in histories and candidates alike), so the model also learns to score items from text alone
    # on the scale of warm ones, which is how never-trained (cold) items are scored. 0 = off.
    id_dropout: float = 0.0
    # text / hybrid: the adaptor from the encoder's pooled output (H) to the item space (d). "mlp": Linear-GELU-Linear;
    # "linear": one Linear, so the text part of an item is a linear function of its encoder features (a smoother
    # prior: items with similar text stay close, the id rows carry what is item-specific)
    text_adaptor: Literal["mlp", "linear"] = "mlp"
    # text / hybrid: dropout on the encoder's pooled output before the adaptor, in training only (one mask per item
    # and step: the step's item table is computed once). Regularises the text side as ``dropout`` does the user tower.
    text_dropout: float = 0.0
    # text_mode pool: dropout on the pooled token coordinates before the pooling's output map, in training only (one
    # mask per item and step). text_dropout does not reach the pooling's path, so without this the model can lean on
    # the un-dropped pooled term and the text dropout's regularisation is bypassed.
    pool_dropout: float = 0.0
    # text_mode frozen / pool: 0 = off; r >= 1 = the encoder's pooled outputs are centred, projected on their top r
    # (at most the encoder's width: a larger r keeps every axis)
    # principal axes over the catalogue and each axis scaled to unit variance (PCA whitening) before text_dropout and
    # the adaptor. Fitted once, on a new model's first catalogue (Catalogue.prepare), then part of the model (exported;
    # resume, warm start and inference keep it). The encoder's outputs are anisotropic (a large common mean, a variance
    # falling ~80x over MiniLM's first 256 axes); whitening gives the adaptor and the text dropout evenly scaled inputs.
    text_whiten: int = 0
    use_event_types: bool = True
    # LoRA (text_mode == "lora")
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["query", "key", "value", "dense"])
    gradient_checkpointing: bool = False
    # scores = <user, item> / temperature; normalize=True makes it a cosine
    normalize: bool = False
    temperature: float = 1.0
    # loss
    loss: Literal["full_softmax", "sampled_softmax"] = "full_softmax"
    # the items of the history up to each position leave that position's softmax (full, or the sampled
    # candidates; the target always stays), as evaluation and inference exclude them: the loss stops spending gradient on
    # pushing down items that can never be recommended to this user. For catalogues where a user does not
    # consume an item twice (films, books); leave off where repeats happen (groceries, music): there the loss
    # must learn which seen items come back. Off by default (it is a property of the catalogue); on in the ML-1M
    # hybrid configs, where configs/train/ml1m_hybrid.yaml holds the measured gain (docs/RESULTS.md).
    exclude_seen_in_loss: bool = False

    def validate(self) -> None:
        for k in ("d_model", "n_layers", "n_heads", "max_len", "text_batch_size", "lora_r", "lora_alpha", "pool_heads", "pool_rank",
                  "top_layers"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout {self.lora_dropout} must be in [0, 1)")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout} must be in [0, 1)")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"id_dropout {self.id_dropout} must be in [0, 1)")
        for k in ("text_dropout", "pool_dropout"):
            if not 0.0 <= getattr(self, k) < 1.0:
                raise ValueError(f"{k} {getattr(self, k)} must be in [0, 1)")
        if self.text_adaptor not in ("mlp", "linear"):
            raise ValueError(f"text_adaptor {self.text_adaptor!r} must be 'mlp' or 'linear'")
        if self.id_dropout > 0 and self.item_tower != "hybrid":
            raise ValueError(f"id_dropout {self.id_dropout} needs item_tower hybrid (got {self.item_tower!r}): "
                             "it drops id rows in favour of the text vector")
        if self.pool_dropout > 0 and (self.text_mode != "pool" or self.item_tower == "id"):
            raise ValueError(f"pool_dropout {self.pool_dropout} needs text_mode pool with a text or hybrid item_tower (got "
                             f"text_mode {self.text_mode!r}, item_tower {self.item_tower!r}): it drops the pooled token "
                             "coordinates; text_dropout is the frozen text vector's")
        if self.text_whiten < 0:
            raise ValueError(f"text_whiten {self.text_whiten} must be >= 0 (0 = off, r = principal axes kept)")
        if self.text_whiten and (self.item_tower == "id" or self.text_mode not in ("frozen", "pool")):
            raise ValueError(f"text_whiten {self.text_whiten} needs text_mode frozen or pool with a text or hybrid item_tower "
                             f"(got text_mode {self.text_mode!r}, item_tower {self.item_tower!r}): it is fitted once on "
                             "features that a trained encoder would move")
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature {self.temperature} must be a finite number > 0")

    @classmethod
    def hyper_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(RecModelHyper)]


@dataclass
class RecModelConfig(RecModelHyper):
    num_items: int = 0
    num_event_types: int = 1
    pad_token_id: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RecModelConfig":
        d = dict(d)
        if d.pop("bce_click_weight", 0.0):  # exports from before the click head was removed (docs/RESULTS.md) hold 0.0
            raise ValueError("this model was trained with the BCE click head (bce_click_weight > 0), which lmrec no "
                             "longer has (docs/RESULTS.md, 'The seed article's click head'): retrain it")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown RecModelConfig key(s) {unknown}")
        return cls(**d)


# --------------------------------------------------------------------------------------------- user tower
class CausalBlock(nn.Module):
    """Pre-LN transformer block: x + MHA(LN(x)) ; x + FFN(LN(x))."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), Dropout(dropout), nn.Linear(4 * d, d))
        self.drop = Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x (B, T, d); mask (B, 1, T, T) bool, True = may attend
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, h, T, dh)
        if self.training and self.attn_dropout > 0 and x.device.type == "cpu":
            # the same math as SDPA's reference path, with the cheap CPU dropout on the weights
            w = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(d // self.n_heads))
            w = torch.softmax(w.masked_fill(~mask, float("-inf")), dim=-1)
            a = dropout(w, self.attn_dropout, True) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, d)))
        return x + self.drop(self.ff(self.ln2(x)))

    def forward_last(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """The block's output at the LAST position only (inference: the user state is the last
        position's): keys and values for every position, but the query, the attention output, the
        projection and the FFN for one position. x (B, T, d), key_mask (B, 1, 1, T) -> (B, 1, d).
        Same numbers as forward(x, mask)[:, -1:] (the last query's causal row is the key mask)."""
        B, T, d = x.shape
        # (the q rows of the other positions are computed and dropped: calling the module, not
        # slicing its weight, keeps ZeRO-3's per-module parameter gathering in charge)
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        dh = d // self.n_heads
        k, v = (t.reshape(B, T, self.n_heads, dh).transpose(1, 2) for t in (k, v))
        q = q[:, -1:].reshape(B, 1, self.n_heads, dh).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        x = x[:, -1:] + self.proj(a.transpose(1, 2).reshape(B, 1, d))
        return x + self.ff(self.ln2(x))


# --------------------------------------------------------------------------------------------- text tower helpers
def pool_hidden(hidden: torch.Tensor, attn: torch.Tensor, how: str) -> torch.Tensor:
    """hidden (N, L, H), attn (N, L) 1 = token, right-padded -> (N, H)."""
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        last = attn.sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    m = attn.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def load_text_encoder(path: str, with_weights: bool = True) -> nn.Module:
    """AutoModel from a local folder (never downloads). ``with_weights=False`` builds the architecture
    only (the caller fills the weights from a state dict). Never runs code shipped in the folder:
    an ``auto_map`` config is refused (RemoteCodeError) and trust_remote_code is always False."""
    from transformers import AutoConfig, AutoModel

    from lmrec_common.models import check_no_remote_code, quiet_hf_progress

    check_no_remote_code(path)
    try:
        conf = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # a folder without a usable config.json
        raise ValueError(f"text model path {path}: not a Hugging Face transformer folder ({e})") from None
    if with_weights:
        # float32 master weights whatever the folder stores: transformers 5 loads a checkpoint saved in
        # fp16/bf16 (Qwen, an fp16 export) in that dtype by default, and LoRA/full fine-tuning would
        # then run AdamW on half-precision weights; bf16/fp16 compute comes from mixed precision
        with quiet_hf_progress():
            enc = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False).float()
    else:
        enc = AutoModel.from_config(conf, trust_remote_code=False)
    # the pooler head of BERT-likes is unused here: drop it so DDP does not see unused parameters
    if getattr(enc, "pooler", None) is not None:
        enc.pooler = None
    return enc


def encoder_layers(enc: nn.Module) -> nn.ModuleList:
    """The stack of transformer layers of a BERT-like encoder (``encoder.layer``: BERT, RoBERTa, MiniLM, ELECTRA...);
    text_mode top trains the last of them. Other architectures raise a ValueError that says so."""
    layers = getattr(getattr(enc, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"text_mode top needs a BERT-like encoder (encoder.layer), not {type(enc).__name__}: use "
                         "text_mode lora / full / pool with this model")
    return layers


def bidirectional_mask(enc: nn.Module, hidden: torch.Tensor, attn: torch.Tensor):
    """The attention mask ``enc``'s own forward would give its layers for (N, L) ``attn`` (1 = token): transformers 5's
    masking utilities (whatever the attention implementation wants), else the additive (N, 1, 1, L) mask of 4.x."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers 4.x
        return enc.get_extended_attention_mask(attn, attn.shape, dtype=hidden.dtype)
    return create_bidirectional_mask(config=enc.config, inputs_embeds=hidden, attention_mask=attn)


@torch.no_grad()
def principal_axes(x: torch.Tensor, r: int, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``r`` principal axes of the rows of ``x`` (M, H), taken as centred, and their variances: (vec (H, r) float64,
    val (r,) float64), largest first. The second moment is summed in float64 over chunks of rows (bounded memory on
    millions of token rows); each axis' sign is fixed (its largest entry positive), so a fit is deterministic."""
    H, dev = x.size(1), x.device
    cov = torch.zeros(H, H, dtype=torch.float64, device=dev)
    for s in range(0, x.size(0), chunk):
        c = x[s : s + chunk].double()
        cov += c.T @ c
    val, vec = torch.linalg.eigh(cov / max(x.size(0), 1))  # ascending
    vec, val = vec[:, -r:].flip(1), val[-r:].flip(0)
    return vec * torch.sign(vec[vec.abs().argmax(0), torch.arange(r, device=dev)]), val


class AttentionPool(nn.Module):
    """The trained part of text_mode pool: ``heads`` learned queries attend over an item's tokens, each token
    given by the coordinates of its departure from the item's mean state on the top principal axes of those
    departures over the catalogue (``z``, whitened; train/catalogue.py Catalogue.prepare), and a linear map turns
    the pooled coordinates into a correction ADDED to the item's projected mean-pooled text vector. The map
    starts at zero, so before training the item vectors are the frozen hybrid's; the queries start random
    (logits of unit scale) so the map gets a gradient from the first step. z (N, L, r), attn (N, L) 1 = token
    -> (N, d). Cost per token is O(heads x r), not O(H^2): the whole catalogue is pooled at every step."""

    def __init__(self, rank: int, heads: int, d: int, drop: float = 0.0):
        super().__init__()
        self.p = drop  # pool_dropout
        self.query = nn.Parameter(torch.randn(heads, rank))
        self.out = nn.Linear(heads * rank, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        logits = torch.einsum("nlr,kr->nkl", z, self.query) / math.sqrt(z.size(-1))  # (N, k, L)
        w = torch.softmax(logits.masked_fill(attn[:, None, :] == 0, -math.inf), dim=-1)
        pooled = torch.einsum("nkl,nlr->nkr", w, z)  # (N, k, r)
        return self.out(dropout(pooled.flatten(1), self.p, self.training))


# --------------------------------------------------------------------------------------------- the model
class SeqRecModel(nn.Module):
    TOP_CHUNK = 128  # text_mode top: items per call of the trained layers (sorted by length: little padding)

    def __init__(self, cfg: RecModelConfig, text_model_path: str | None = None, load_text_weights: bool = True):
        """``text_model_path``: the already resolved local folder of the item tower (defaults to
        ``cfg.text_model_path``; callers resolve ``bundled:`` names through lmrec_common.models)."""
        super().__init__()
        cfg.validate()
        if cfg.num_items < 1:
            raise ValueError("RecModelConfig.num_items must be >= 1")
        self.cfg = cfg
        d = cfg.d_model
        self.uses_ids = cfg.item_tower in ("id", "hybrid")
        self.uses_text = cfg.item_tower in ("text", "hybrid")

        if self.uses_ids:
            # row num_items is the padding row (never a candidate)
            self.item_emb = nn.Embedding(cfg.num_items + 1, d)
            nn.init.normal_(self.item_emb.weight, std=0.02)
            # 1 for items seen in training: only those use their id row (cold items: text alone)
            # (persistent: exported with the weights, a fact of the training data)
            self.register_buffer("id_mask", torch.ones(cfg.num_items))
        if self.uses_text:
            enc = load_text_encoder(text_model_path or cfg.text_model_path, with_weights=load_text_weights)
            hidden = enc.config.hidden_size
            if cfg.text_mode == "frozen":
                enc.requires_grad_(False)
                enc.eval()
            elif cfg.text_mode == "pool":
                if cfg.pool_rank > hidden:
                    raise ValueError(f"pool_rank {cfg.pool_rank} exceeds the text encoder's hidden size {hidden}")
                enc.requires_grad_(False)
                enc.eval()
                self.text_pool = AttentionPool(cfg.pool_rank, cfg.pool_heads, d, cfg.pool_dropout)
                # the principal axes of token departures from their item's mean (H, r) and their spread (r,): fitted
                # once on the training catalogue, then part of the model (inference projects new items on them)
                self.register_buffer("pool_basis", torch.zeros(hidden, cfg.pool_rank))
                self.register_buffer("pool_scale", torch.ones(cfg.pool_rank))
            elif cfg.text_mode == "top":
                layers = encoder_layers(enc)
                if not 1 <= cfg.top_layers < len(layers):
                    raise ValueError(f"top_layers {cfg.top_layers} must be between 1 and {len(layers) - 1}: the text encoder "
                                     f"has {len(layers)} layers and at least one stays frozen below the trained ones")
                enc.requires_grad_(False)
                for layer in layers[len(layers) - cfg.top_layers:]:
                    layer.requires_grad_(True)
            elif cfg.text_mode == "lora":
                from peft import LoraConfig, get_peft_model

                enc = get_peft_model(enc, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                     target_modules=list(cfg.lora_target_modules), bias="none"))
            if cfg.gradient_checkpointing and cfg.text_mode != "frozen" and hasattr(enc, "gradient_checkpointing_enable"):
                enc.gradient_checkpointing_enable()
            self.text_encoder = enc
            self.text_hidden = hidden  # H: the width of the pooled encoder output (Catalogue.features)
            width = hidden
            if cfg.text_whiten:
                # r above the encoder's width (a recipe's 384 with a smaller encoder) keeps every axis: min(r, H)
                r = min(cfg.text_whiten, hidden)
                # the features' mean (H,), principal axes (H, r) and spread (r,): fitted once on the training catalogue
                # (fit_text_whitening), then part of the model; all zero = not fitted yet
                self.register_buffer("text_center", torch.zeros(hidden))
                self.register_buffer("text_basis", torch.zeros(hidden, r))
                self.register_buffer("text_scale", torch.ones(r))
                width = r
            if cfg.text_adaptor == "linear":
                self.text_proj = nn.Sequential(nn.Linear(width, d))
            else:
                self.text_proj = nn.Sequential(nn.Linear(width, d), nn.GELU(), nn.Linear(d, d))
        # The catalogue's tensors (token ids, frozen features, pooled-token states, borrowed id rows, training
        # candidates) are not part of the model: train/catalogue.py holds them and they come in as the
        # ``catalogue`` argument of item_vectors / user_vectors / forward.
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.type_emb = nn.Embedding(max(cfg.num_event_types, 1), d) if cfg.use_event_types else None
        self.emb_drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(CausalBlock(d, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)

    def train(self, mode: bool = True) -> "SeqRecModel":
        super().train(mode)
        if self.uses_text and self.cfg.text_mode in ("frozen", "pool"):
            self.text_encoder.eval()  # never trained: its dropout would only add noise to cached features
        return self

    # ----------------------------------------------------------------------------------------- item tower
    # Every method below that needs item text takes ``catalogue`` (train/catalogue.py Catalogue): the token ids,
    # frozen features and pooled-token states of the items, which the model reads but does not hold. An id-only
    # model needs no catalogue (item i is id row i) except for training's candidate list and the cold borrowing.
    def set_seen_items(self, n_train_events: torch.Tensor) -> None:
        """Items with no training event get no id vector (their id row would only ever be pushed down
        as a negative): they are scored from text alone in hybrid mode. (They are also left out of the
        full-softmax candidates: Catalogue.set_training_counts, from the same counts.) id_mask is
        exported with the weights: a fact of the training data the model was trained on."""
        if self.uses_ids:
            seen = (n_train_events[: self.cfg.num_items] > 0).to(self.pos_emb.weight.device)
            self.id_mask = seen.to(self.id_mask.device, self.id_mask.dtype)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Pooled encoder output of items given by their token ids (N, L) right-padded and lengths (N,) -> (N, H)."""
        L = int(lengths.max().clamp(min=1))
        ids = tokens[:, :L]
        attn = (torch.arange(L, device=ids.device)[None, :] < lengths[:, None]).long()
        out = self.text_encoder(input_ids=ids, attention_mask=attn)
        return pool_hidden(out.last_hidden_state, attn, self.cfg.pooling)

    def _encode_text(self, idx: torch.Tensor, catalogue) -> torch.Tensor:
        """Pooled encoder output for catalogue items idx (N,) -> (N, H) (a hook: bench/train_throughput.py buckets it)."""
        if catalogue is None or catalogue.tokens is None:
            raise RuntimeError("text item tower: pass the catalogue (train/catalogue.py Catalogue, with the items' tokens)")
        if self.cfg.text_mode == "top":
            return self._encode_top(idx, catalogue)
        return self.encode_text(catalogue.tokens[idx], catalogue.lengths[idx])

    def lower_states(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Text_mode top: (N, L) token ids with (N,) lengths >= 1 -> the frozen lower layers' output, the trained
        layers' input, for every real token: (sum of lengths, H) float16 in row-major token order."""
        L = int(lengths.max())
        attn = (torch.arange(L, device=tokens.device)[None, :] < lengths[:, None]).long()
        out = self.text_encoder(input_ids=tokens[:, :L], attention_mask=attn, output_hidden_states=True)
        h = out.hidden_states[len(out.hidden_states) - 1 - self.cfg.top_layers]  # [0] = embeddings, [i] = after layer i
        return h.float()[attn.bool()].to(torch.float16)

    def _encode_top(self, idx: torch.Tensor, catalogue) -> torch.Tensor:
        """Text_mode top: items idx (N,) through the trained top layers from their cached lower states
        (Catalogue.prepare) -> the pooled output (N, H), as the whole encoder would give it. Chunks of TOP_CHUNK items
        sorted by length: a step's ~1,500 titles padded to the longest of them (up to 64 tokens) would be ~5x the real
        tokens, and here every padded token costs a layer's FLOPs."""
        layers = encoder_layers(self.text_encoder)
        trained = layers[len(layers) - self.cfg.top_layers:]
        dtype = next(trained[-1].parameters()).dtype  # float32 master weights (bf16 under ZeRO)

        def top(h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
            h = h.to(dtype)
            mask = bidirectional_mask(self.text_encoder, h, attn)
            for layer in trained:
                y = layer(h, attention_mask=mask)
                h = y[0] if isinstance(y, tuple) else y  # transformers 4.x returns a tuple
            return pool_hidden(h, attn, self.cfg.pooling)

        return self._over_token_states(idx, catalogue, self.TOP_CHUNK, top)

    def _over_token_states(self, idx: torch.Tensor, catalogue, chunk: int, fn) -> torch.Tensor:
        """Pool and top modes: ``fn`` over the cached token states of items idx (N,) (Catalogue.prepare: packed rows,
        catalogue.state_offs), in chunks of ``chunk`` items sorted by token count, each padded to its own longest:
        fn((c, L, ·) states, (c, L) attention 1 = token) -> (c, ·). Returns (N, ·) in idx's order."""
        offs = catalogue.state_offs
        if offs is None or catalogue.states is None or offs.numel() != catalogue.size + 1:
            raise RuntimeError(f"text_mode {self.cfg.text_mode}: call catalogue.prepare(model) first (the items' token states)")
        start = offs[idx]
        lens = offs[idx + 1] - start
        order = torch.argsort(lens)
        out = []
        for s in range(0, idx.numel(), chunk):
            o = order[s : s + chunk]
            pos = torch.arange(int(lens[o].max().clamp(min=1)), device=idx.device)[None, :]
            attn = (pos < lens[o][:, None]).long()  # (c, L)
            out.append(fn(catalogue.states[torch.where(attn.bool(), start[o][:, None] + pos, start[o][:, None])], attn))
        return torch.cat(out)[torch.argsort(order)]

    def token_states(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text_mode pool: (N, L) token ids with (N,) lengths >= 1 -> (mean-pooled last-layer states (N, H) float32,
        the tokens' departures from their item's mean, (sum of lengths, H) float16 in row-major token order)."""
        L = int(lengths.max())
        attn = (torch.arange(L, device=tokens.device)[None, :] < lengths[:, None]).long()
        h = self.text_encoder(input_ids=tokens[:, :L], attention_mask=attn).last_hidden_state.float()
        mean = pool_hidden(h, attn, "mean")
        return mean, (h - mean[:, None])[attn.bool()].to(torch.float16)

    @torch.no_grad()
    def fit_pool_basis(self, dep: torch.Tensor) -> None:
        """Text_mode pool: fit the principal axes of token departures (rows of ``dep``, (M, H)) and their spread
        (pool_basis (H, r), pool_scale (r,)), once, on the training catalogue: then part of the model (exported;
        resume, warm start and inference keep it, so new items land in the space the pooling was trained on).
        Deterministic: each axis' sign is fixed."""
        vec, val = principal_axes(dep, self.pool_basis.size(1))
        self.pool_basis = vec.float().to(self.pool_basis.device)
        self.pool_scale = val.clamp(min=1e-12).sqrt().float().to(self.pool_scale.device)

    def pool_coordinates(self, dep: torch.Tensor) -> torch.Tensor:
        """Text_mode pool: token departures (M, H) -> their z coordinates (M, r) on the pool basis, whitened."""
        return (dep.float() @ self.pool_basis) / self.pool_scale

    def _pool_term(self, idx: torch.Tensor, catalogue, chunk: int = 4096) -> torch.Tensor:
        """Pool mode: the learned pooling's correction to the text vectors of items idx (N,) -> (N, d), in chunks of
        similar token counts (little padding, bounded memory)."""
        return self._over_token_states(idx, catalogue, chunk,
                                       lambda z, attn: self.text_pool(z.to(self.text_pool.query.dtype), attn))

    @torch.no_grad()
    def fit_text_whitening(self, feats: torch.Tensor) -> None:
        """text_whiten r: fit the mean (text_center), top r principal axes (text_basis) and their spread (text_scale) of
        the pooled encoder outputs ``feats`` (N, H) of the training catalogue, once: then part of the model, so new items
        are whitened as the training items were. Deterministic (each axis' sign fixed). An axis' variance is floored at
        1e-3 of the largest, so directions the catalogue hardly spans (MiniLM's outputs are rank-deficient) are not
        blown up into noise."""
        center = feats.double().mean(0)
        vec, val = principal_axes(feats.double() - center, self.text_basis.size(1))
        floor = max(float(val[0]), 1e-12) * 1e-3
        self.text_center = center.float().to(self.text_center.device)
        self.text_basis = vec.float().to(self.text_basis.device)
        self.text_scale = val.clamp(min=floor).sqrt().float().to(self.text_scale.device)

    def whitening_fitted(self) -> bool:
        return not self.cfg.text_whiten or bool(self.text_basis.any())

    def whiten(self, feats: torch.Tensor) -> torch.Tensor:
        """text_whiten: pooled encoder outputs (N, H) -> their whitened coordinates (N, r), float32 (outside autocast:
        the small axes are differences that bf16 would drown)."""
        if not self.whitening_fitted():
            raise RuntimeError("text_whiten: the whitening is not fitted: call catalogue.prepare(model) first")
        with torch.autocast(device_type=feats.device.type, enabled=False):
            return ((feats.float() - self.text_center) @ self.text_basis) / self.text_scale

    def project_text(self, feats: torch.Tensor, whitened: bool = False) -> torch.Tensor:
        """Pooled encoder outputs (N, H) -> the text part of the item vectors without the pool term (N, d).
        ``whitened``: feats are already the whitened coordinates (N, r) (a prepared catalogue's, text_whiten)."""
        if self.cfg.text_whiten and not whitened:
            feats = self.whiten(feats)
        feats = feats.to(self.text_proj[0].weight.dtype)
        if self.training and self.cfg.text_dropout > 0:
            feats = dropout(feats, self.cfg.text_dropout, True)
        return self.text_proj(feats)

    def text_vectors(self, uniq: torch.Tensor, catalogue) -> torch.Tensor:
        """Projected text part of the item vectors of distinct catalogue indices uniq (N,) -> (N, d)."""
        mode = self.cfg.text_mode
        if mode in ("frozen", "pool"):
            if catalogue is None or catalogue.features is None or catalogue.features.size(0) != catalogue.size:
                raise RuntimeError(f"{mode} text tower: call catalogue.prepare(model) first (the items' frozen features)")
            vec = self.project_text(catalogue.features[uniq], whitened=catalogue.whitened)
        else:
            vec = self.project_text(self._encode_text(uniq, catalogue))
        return vec + self._pool_term(uniq, catalogue).to(vec.dtype) if mode == "pool" else vec

    def query_text_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Texts that are not catalogue items (a search query), tokenized (B, L) right-padded -> (B, d): the item
        tower's text part computed as for an item with that text (encoder -> pooling -> text_proj, + the learned
        pooling's term in text_mode pool, on coordinates made as Catalogue.prepare makes them)."""
        if self.cfg.text_mode == "pool":
            h = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()  # (B, L, H)
            mean = pool_hidden(h, attention_mask, "mean")
            vec = self.project_text(mean)
            z = self.pool_coordinates((h - mean[:, None]).to(torch.float16))  # (B, L, r)
            return vec + self.text_pool(z.to(self.text_pool.query.dtype), attention_mask).to(vec.dtype)
        return self.project_text(self.query_encoder_features(input_ids, attention_mask))

    def query_encoder_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Texts tokenized (B, L) right-padded -> (B, H) float32: the text encoder's pooled output, as
        Catalogue.prepare computes an item's ``encoder_features`` (mean-pooled in text_mode pool, else ``pooling``;
        before any whitening). The space of the online service's search_text_space encoder."""
        h = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        return pool_hidden(h, attention_mask, "mean" if self.cfg.text_mode == "pool" else self.cfg.pooling)

    def item_vectors(self, item_idx: torch.Tensor, catalogue=None) -> torch.Tensor:
        """item_idx (N,) of valid catalogue indices (no padding) -> (N, d). Each distinct item goes through the
        text tower once (torch.unique + inverse gather). ``catalogue``: required with a text tower; out of
        training its borrowed id rows (Catalogue.borrow_cold_ids) are used."""
        uniq, inv = torch.unique(item_idx, return_inverse=True)
        vec = self.text_vectors(uniq, catalogue) if self.uses_text else None
        if self.uses_ids:
            known = uniq < self.cfg.num_items  # items added after training have no id row
            rows = torch.where(known, uniq, torch.full_like(uniq, self.cfg.num_items))
            mask = torch.zeros_like(uniq, dtype=self.item_emb.weight.dtype)
            mask[known] = self.id_mask[uniq[known]].to(mask.dtype)
            borrow = getattr(catalogue, "borrow", None)
            if self.cfg.item_tower == "id":
                mask = torch.ones_like(mask)
            elif self.training and self.cfg.id_dropout > 0:
                # one draw per distinct item: the same item has or lacks its id row everywhere this step
                keep = torch.rand(mask.shape, device=mask.device) >= self.cfg.id_dropout
                mask = mask * keep.to(mask.dtype)
            elif not self.training and borrow is not None and borrow.numel():
                lend = borrow[uniq]  # uniq < catalogue size: borrow_cold_ids covered the catalogue
                use = (mask == 0) & (lend >= 0)
                rows = torch.where(use, lend, rows)
                mask = torch.where(use, torch.ones_like(mask), mask)
            ids = self.item_emb(rows) * mask[:, None]
            vec = ids if vec is None else vec + ids
        if self.cfg.normalize:
            vec = F.normalize(vec, dim=-1)
        return vec[inv]

    def space_size(self, catalogue=None) -> int:
        """Items that can be scored: the catalogue's rows (>= cfg.num_items with new items), else cfg.num_items."""
        return catalogue.size if catalogue is not None else self.cfg.num_items

    @torch.no_grad()
    def all_item_vectors(self, catalogue=None, batch_size: int | None = None) -> torch.Tensor:
        """(I, d) for every item of the catalogue (evaluation / inference), in chunks of batch_size items."""
        n = self.space_size(catalogue)
        bs = batch_size or (self.cfg.text_batch_size if self.uses_text and self.cfg.text_mode != "frozen" else n)
        dev = self.pos_emb.weight.device
        return torch.cat([self.item_vectors(torch.arange(s, min(s + bs, n), device=dev), catalogue) for s in range(0, n, bs)])

    # ----------------------------------------------------------------------------------------- user tower
    def _states_from_vectors(self, hist: torch.Tensor, event_types: torch.Tensor | None, hist_vec: torch.Tensor,
                             last_only: bool = False) -> torch.Tensor:
        """hist (B, T) left-padded with -1, hist_vec (B, T, d) -> states (B, T, d), or (B, 1, d) for the
        last position alone with ``last_only`` (no dropout path: evaluation / inference)."""
        B, T = hist.shape
        if T > self.cfg.max_len:
            raise ValueError(f"history length {T} exceeds max_len {self.cfg.max_len}")
        valid = hist != PAD  # (B, T)
        x = hist_vec * math.sqrt(self.cfg.d_model) * valid[..., None]
        pos = torch.arange(self.cfg.max_len - T, self.cfg.max_len, device=hist.device)  # newest event = max_len-1
        x = x + self.pos_emb(pos)[None]
        if self.type_emb is not None and event_types is not None:
            et = event_types.clamp(0, self.type_emb.num_embeddings - 1)
            x = x + self.type_emb(et) * valid[..., None]
        x = self.emb_drop(x)
        # causal + key padding; a padded query may attend to itself so no row is all -inf (NaN)
        causal = torch.ones(T, T, dtype=torch.bool, device=hist.device).tril()
        mask = causal[None] & (valid[:, None, :] | torch.eye(T, dtype=torch.bool, device=hist.device)[None])
        mask = mask[:, None]  # (B, 1, T, T)
        if last_only and not self.training:
            for blk in self.blocks[:-1]:
                x = blk(x, mask)
            return self.ln_f(self.blocks[-1].forward_last(x, mask[:, :, -1:]))
        for blk in self.blocks:
            if self.cfg.gradient_checkpointing and self.training:
                x = checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        return self.ln_f(x)

    def _hist_vectors(self, hist: torch.Tensor, table: torch.Tensor | None = None, catalogue=None) -> torch.Tensor:
        valid = hist != PAD
        flat = hist.clamp(min=0).reshape(-1)
        if table is not None:
            vec = table[flat].to(self.pos_emb.weight.dtype)
        else:
            vec = self.item_vectors(flat, catalogue)
        return vec.view(*hist.shape, -1) * valid[..., None]

    def user_states(self, hist: torch.Tensor, event_types: torch.Tensor | None = None, catalogue=None) -> torch.Tensor:
        """hist (B, T) item idx, LEFT-padded with -1; event_types (B, T) -> (B, T, d)."""
        return self._states_from_vectors(hist, event_types, self._hist_vectors(hist, catalogue=catalogue))

    def user_vectors(self, hist: torch.Tensor, event_types: torch.Tensor | None = None,
                     item_table: torch.Tensor | None = None, catalogue=None) -> torch.Tensor:
        """(B, d): the state at the last position (= the newest real event, histories are left-padded).

        ``item_table``: the (I, d) output of all_item_vectors() when the caller holds it already
        (evaluation, inference): history items are gathered from it instead of going through the item
        tower again (then no ``catalogue`` is needed). Out of training mode the last layer computes the
        last position only."""
        hv = self._hist_vectors(hist, item_table, catalogue)
        u = self._states_from_vectors(hist, event_types, hv, last_only=not self.training)[:, -1]
        return F.normalize(u, dim=-1) if self.cfg.normalize else u

    def score(self, user_vec: torch.Tensor, item_vec: torch.Tensor) -> torch.Tensor:
        """(B, d) x (I, d) -> (B, I) logits. The temperature scales the (B, d) side: dividing the
        (B, I) logits instead cost ~10% of a full-softmax training step on CPU."""
        if self.cfg.temperature != 1.0:
            user_vec = user_vec / self.cfg.temperature
        return user_vec @ item_vec.T

    # ----------------------------------------------------------------------------------------- training
    def forward(self, hist: torch.Tensor, event_types: torch.Tensor | None, targets: torch.Tensor,
                negatives: torch.Tensor | None = None, neg_log_q: torch.Tensor | None = None,
                item_log_q: torch.Tensor | None = None, catalogue=None) -> dict[str, torch.Tensor]:
        """Next-item loss at every position, over the items of ``catalogue`` (train/catalogue.py; required with a
        text tower; its training candidates, Catalogue.set_training_counts, are the full softmax's columns).

        hist, targets (B, T): targets[:, t] is the item after hist[:, t]; -1 = no target (ignored).
        full_softmax: logits against all items. sampled_softmax: candidates = the batch's distinct
        targets plus ``negatives`` (K,), logits corrected by log q (``item_log_q`` (I,) = log of each
        item's expected count among the candidates, provided by the caller) -- Yi et al. 2019.
        Returns {"loss", "ce", "n_targets"}."""
        B, T = hist.shape
        tmask = targets != PAD  # (B, T)
        n_t = tmask.sum()
        if self.cfg.loss == "full_softmax":
            # (I, d); with a lora/full text tower this is one encoder pass over the whole catalogue per step, so
            # use it for small catalogues only (sampled_softmax, or text_mode pool, otherwise)
            table = self.item_vectors(torch.arange(self.space_size(catalogue), device=hist.device), catalogue)
            states = self._states_from_vectors(hist, event_types, self._hist_vectors(hist, table))
            u = states[tmask]  # (N, d)
            if self.cfg.normalize:
                u = F.normalize(u, dim=-1)
            tgt = targets[tmask]
            cand_vec, labels = table, tgt
            cand_idx, cand_pos = (catalogue.cand_idx, catalogue.cand_pos) if catalogue is not None else (None, None)
            gathered = cand_pos is not None and cand_pos.numel() == table.size(0)
            if gathered:
                # candidates = items with training events only: gather their rows (cheaper than
                # masking (N, I) logits with -inf) and renumber the labels into that list
                labels = cand_pos[tgt]
                if bool((labels < 0).any()):
                    bad = tgt[labels < 0][:5].tolist()
                    raise ValueError(f"training targets {bad} are not training candidates (set_training_counts counts disagree with the batch)")
                cand_vec = table[cand_idx]
            ut = u / self.cfg.temperature if self.cfg.temperature != 1.0 else u  # as in score()
            masked = None
            if self.cfg.exclude_seen_in_loss:
                masked = seen_before(hist, tmask)
                if gathered:  # item rows -> columns of cand_vec (-1: not a candidate anyway)
                    masked = torch.where(masked >= 0, cand_pos[masked.clamp(min=0)], masked)
            ce = linear_softmax_cross_entropy(ut, cand_vec, labels, masked=masked)  # fused with the (N, C) product
        else:
            # candidates: distinct batch targets + sampled negatives; every needed item encoded once
            tgt = targets[tmask]
            neg = negatives if negatives is not None else tgt.new_zeros(0)
            need = torch.cat([hist[hist != PAD], tgt, neg])
            uniq, inv = torch.unique(need, return_inverse=True)
            vec = self.item_vectors(uniq, catalogue)  # (U, d)
            n_h = int((hist != PAD).sum())
            hist_vec = torch.zeros(B, T, vec.size(1), dtype=vec.dtype, device=vec.device)
            hist_vec[hist != PAD] = vec[inv[:n_h]]
            states = self._states_from_vectors(hist, event_types, hist_vec)
            u = states[tmask]
            if self.cfg.normalize:
                u = F.normalize(u, dim=-1)
            cand = torch.unique(torch.cat([tgt, neg]))  # (C,) sorted
            cand_vec = vec[torch.searchsorted(uniq, cand)]
            logits = self.score(u, cand_vec).float()  # (N, C)
            if item_log_q is not None:
                logits = logits - item_log_q[cand].float()[None]
            label = torch.searchsorted(cand, tgt)
            if self.cfg.exclude_seen_in_loss:  # history items that are among the candidates -> their columns
                seen = seen_before(hist, tmask)
                col = torch.searchsorted(cand, seen.clamp(min=0)).clamp(max=cand.numel() - 1)
                logits = mask_columns(logits, torch.where((seen >= 0) & (cand[col] == seen), col, -1), label)
            ce = F.cross_entropy(logits, label)
        return {"loss": ce, "ce": ce, "n_targets": n_t}

    # ----------------------------------------------------------------------------------------- bookkeeping
    def param_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters."""
        tot = sum(p.numel() for p in self.parameters())
        tr = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return tr, tot
