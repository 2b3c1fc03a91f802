"""The catalogue: what the items of one item space are, as the model sees them. The model (train/model.py) holds
weights only; everything about the items themselves lives here, behind one API used by training, evaluation, the
export's consumers, the nightly inference and the online service:

    cat = Catalogue.from_items(prepared.items, model)             # training / evaluation: row i = prepared item i
    cat = Catalogue.build(prepared.items, model)                  # the same, prepared (from_items + prepare)
    cat = Catalogue.for_tonight(model, info, final_dir, prepared)   # inference: tonight's items in a final's item space
    cat.set_training_counts(n_train_events)                       # training only: the full softmax's candidates
    encoded = cat.prepare(model, cache_dir=...)                   # frozen features (text-feature cache) / pool states
    borrowed = cat.borrow_cold_ids(model)                         # hybrid, serving: cold items borrow a warm id row
    vecs = cat.item_vectors(model)                                # (size, d); tonight's order: cat.in_tonight_order(vecs)
    out = model(hist, event_types, targets, catalogue=cat)        # a training step reads the catalogue's tensors
    rows = map_ids(tonight_item_ids, final_item_ids)              # one catalogue onto another by item id (-1: absent)

What a Catalogue holds (all tensors on one device, ``cat.to(device)``; nothing here is a model parameter or part of a
checkpoint or of final/, so DDP and ZeRO see only weights):

- ``size``: rows of the item space. Row i < model.cfg.num_items is the model's item i (its id row); rows past it are
  items the model never saw (tonight's new items: scored from text alone);
- ``tokens`` (size, L) right-padded with the model's pad id and ``lengths`` (size,): every item's token ids (text and
  hybrid towers; None for an id-only tower);
- ``features`` (size, H) float32: the frozen encoder's pooled output per item (``prepare``; text_mode frozen, and pool,
  whose features are the mean-pooled states), kept between runs by the text-feature cache (train/text_cache.py);
  with the model's ``text_whiten`` r, their whitened coordinates (size, r) instead (``whitened`` True);
- ``encoder_features`` (size, H), a view: the encoder's own pooled outputs, i.e. ``features`` when not whitened, else
  ``unwhitened``, which ``prepare(keep_encoder_features=True)`` keeps (the online search in the encoder's own space);
- ``states`` (sum of lengths, r) and ``state_offs`` (size + 1,): text_mode pool, every token's coordinates on the
  model's pool basis (item i's at rows state_offs[i]:state_offs[i + 1]); text_mode top, every token's state at the
  input of the trained top layers, (sum of lengths, H) float16, the same offsets;
- ``borrow`` (size,) long: serving-time cold start, the warm row whose id vector each item borrows (-1 none);
- ``cand_idx`` (C,) / ``cand_pos`` (size,): training's full-softmax candidates (items with training events) and each
  item's column among them (-1 not a candidate); both empty = every item;
- ``to_model`` (N,) / ``present`` (size,): for_tonight only, tonight's item n -> its row (-1: an id-only model's new
  item, which cannot be scored) and which rows are real items tonight (model items missing tonight are stubs).

Lives in train/ because training builds it before inference exists (imports follow the data: lmrec_common <- data_prep
<- train <- inference). For the items, inference and the online service use this module and train.export.load_final,
and call no model method in a set order: the model's item-side methods all take the catalogue.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


class CatalogueError(ValueError):
    """Tonight's catalogue cannot be mapped onto a model's item space (inference turns it into InferenceError)."""


def _device(model) -> torch.device:
    return model.pos_emb.weight.device


class Catalogue:
    """One item space's items (see the module docstring). Build with from_items, for_tonight or from_tokens."""

    def __init__(self, size: int, tokens: torch.Tensor | None = None, lengths: torch.Tensor | None = None):
        if tokens is not None and (tokens.dim() != 2 or lengths is None or lengths.shape != (tokens.size(0),)
                                   or tokens.size(0) != size):
            raise ValueError(f"Catalogue: expected ({size}, L) token ids and ({size},) lengths, got "
                             f"{None if tokens is None else tuple(tokens.shape)} / {None if lengths is None else tuple(lengths.shape)}")
        self.size = int(size)
        self.tokens = None if tokens is None else tokens.to(torch.long)
        self.lengths = None if lengths is None else lengths.to(torch.long)
        self.features: torch.Tensor | None = None
        self.whitened = False  # features are the model's whitened coordinates (text_whiten), not the encoder's outputs
        self.unwhitened: torch.Tensor | None = None  # whitened features' encoder outputs (prepare(keep_encoder_features))
        self.states: torch.Tensor | None = None
        self.state_offs: torch.Tensor | None = None
        self.borrow: torch.Tensor | None = None
        self.cand_idx: torch.Tensor | None = None
        self.cand_pos: torch.Tensor | None = None
        self.to_model: np.ndarray | None = None
        self.present: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, lengths: torch.Tensor) -> "Catalogue":
        """Items given by their token ids (I, L) right-padded and lengths (I,): row i = item i."""
        return cls(tokens.size(0), tokens, lengths)

    @classmethod
    def from_items(cls, items, model) -> "Catalogue":
        """The prepared ``items`` table (data_prep: row i = item_idx i, tokenized once) in ``model``'s item space: the
        training catalogue, or a later one whose rows past the model's num_items are new items (text alone)."""
        if not model.uses_text:
            return cls(len(items))
        from train.data import item_token_tensors

        ids, lens = item_token_tensors(items, model.cfg.pad_token_id)
        return cls(ids.size(0), ids, lens)

    @classmethod
    def build(cls, items, model, batch_size: int | None = None, progress: Callable[[int], None] | None = None,
              cache_dir: str | None = None) -> "Catalogue":
        """from_items + prepare: the prepared ``items`` ready to score with ``model`` (on the model's device)."""
        cat = cls.from_items(items, model)
        cat.prepare(model, batch_size, progress=progress, cache_dir=cache_dir)
        return cat.to(_device(model))

    @classmethod
    def for_tonight(cls, model, info: dict, final_dir: str | Path, prepared, tonight_ids: np.ndarray | None = None) -> "Catalogue":
        """Tonight's prepared catalogue in the item space of the model of ``final_dir`` (``info``: load_final's): items
        the model knows keep their row (their id vector), new items are appended after the model's items (scored from
        text; an id-only model cannot score them: to_model -1), and model items missing tonight keep their row as a
        1-token stub that is never a candidate (``present`` False)."""
        if tonight_ids is None:
            tonight_ids = np.array(prepared.items.data.table.column("item_id").to_pylist(), dtype=object)
        n_model = int(model.cfg.num_items)
        model_ids = model_item_ids(info, prepared, Path(final_dir))
        to_model, space = build_item_space(model_ids, tonight_ids, n_model, model.uses_text)
        cat = cls(space)
        if model.uses_text:
            from train.data import item_token_tensors

            pad = model.cfg.pad_token_id
            ids, lens = item_token_tensors(prepared.items, pad)  # (N, L), (N,)
            table = torch.full((space, ids.size(1)), pad, dtype=torch.long)
            tlens = torch.ones(space, dtype=torch.long)  # model items missing tonight: a 1-token stub, never a candidate
            rows = torch.from_numpy(to_model)
            table[rows], tlens[rows] = ids, lens.clamp(min=1)
            cat = cls(space, table, tlens)
        cat.to_model = to_model
        cat.present = torch.zeros(space, dtype=torch.bool)
        cat.present[torch.from_numpy(to_model[to_model >= 0])] = True
        return cat

    def to(self, device: torch.device | str) -> "Catalogue":
        """Move every tensor to ``device`` (in place; returns self)."""
        for name in ("tokens", "lengths", "features", "unwhitened", "states", "state_offs", "borrow", "cand_idx", "cand_pos"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    @property
    def encoder_features(self) -> torch.Tensor | None:
        """(size, H) the encoder's pooled outputs: ``features`` unless whitened, then what prepare kept (or None)."""
        return self.unwhitened if self.whitened else self.features

    def set_training_counts(self, n_train_events: torch.Tensor) -> None:
        """Training's full-softmax candidates: items with a training event. The others (cold items), as never-positive
        negatives, would only have their text vectors pushed down, the opposite of what cold-start scoring needs.
        (The model's own half of these counts: SeqRecModel.set_seen_items, its exported id_mask.)"""
        seen = n_train_events[: self.size] > 0
        dev = self.tokens.device if self.tokens is not None else seen.device
        seen = seen.to(dev)
        if bool(seen.all()):
            self.cand_idx, self.cand_pos = seen.new_zeros(0, dtype=torch.long), seen.new_zeros(0, dtype=torch.long)
        else:
            self.cand_idx = seen.nonzero().squeeze(1)
            self.cand_pos = torch.full(seen.shape, -1, dtype=torch.long, device=seen.device)
            self.cand_pos[self.cand_idx] = torch.arange(self.cand_idx.numel(), device=seen.device)

    # ------------------------------------------------------------------------------------------------ text tower
    @torch.no_grad()
    def prepare(self, model, batch_size: int | None = None, progress: Callable[[int], None] | None = None,
                cache_dir: str | None = None, write_cache: bool = True, keep_encoder_features: bool = False) -> int:
        """Run ``model``'s frozen text encoder over the catalogue once (moving the catalogue to the model's device):
        ``features`` (size, H), and in text_mode pool the token ``states`` too (the model's pool basis is fitted here
        when it has none: a new model). With ``cache_dir`` (frozen features only) items whose features that directory
        holds for this encoder are not encoded again, and the directory is updated (train/text_cache.py;
        write_cache=False: read only). ``keep_encoder_features``: when ``features`` become whitened coordinates, also
        keep the encoder's pooled outputs (``unwhitened``, read through ``encoder_features``). Returns how many
        items went through the encoder. Id-only model: nothing."""
        if not model.uses_text:
            return 0
        self.to(_device(model))
        self.borrow = None  # computed from other features
        self.whitened = False
        self.unwhitened = None
        if model.cfg.text_mode == "pool":  # mean features and token coordinates, once (cache_dir not used)
            self._prepare_states(model, batch_size, progress)
            self._fit_whitening(model, keep_encoder_features)
            return self.size
        if model.cfg.text_mode == "top":  # the trained layers' input, once (cache_dir not used)
            self._prepare_lower_states(model, batch_size, progress)
            return self.size
        n = self.size
        bs = batch_size or model.cfg.text_batch_size
        dev = self.tokens.device
        feats = torch.zeros(n, model.text_hidden, device=dev)
        todo = torch.ones(n, dtype=torch.bool)
        cache = keys = None
        if cache_dir:
            from train.text_cache import item_keys, open_cache

            cache = open_cache(cache_dir, model.text_encoder, model.cfg.pooling, dev.type, write_cache)
        if cache is not None:
            keys = item_keys(self.tokens, self.lengths)
            index, cached = cache.load()
            if index and cached.size(1) == feats.size(1):
                rows = torch.tensor([index.get(k, -1) for k in keys], dtype=torch.long)
                todo = rows < 0
                feats[~todo.to(dev)] = cached[rows[~todo]].to(dev)
                if progress:
                    progress(int((~todo).sum()))
        was = model.text_encoder.training
        model.text_encoder.eval()
        # sort by length so each chunk is padded to similar lengths (3-5x faster on long-tailed titles)
        lens = self.lengths.masked_fill(~todo.to(dev), -1)
        order = torch.argsort(lens, stable=True)[n - int(todo.sum()):]
        for s in range(0, order.numel(), bs):
            idx = order[s : s + bs]
            feats[idx] = model._encode_text(idx, self).float()
            if progress:
                progress(len(idx))
        model.text_encoder.train(was)
        self.features = feats
        if cache is not None and (bool(todo.any()) or not cache.path.is_file()):
            cache.save(keys, feats)  # the encoder's own outputs: a whitening is the model's, applied below
        self._fit_whitening(model, keep_encoder_features)
        return int(todo.sum())

    def _fit_whitening(self, model, keep_encoder_features: bool = False) -> None:
        """text_whiten: a new model's whitening is fitted on this (its training) catalogue's features (a model that has
        one, on resume, warm start or inference, keeps it), and ``features`` become their whitened coordinates (N, r),
        once here rather than at every step (the pool's token coordinates are made the same way)."""
        self.whitened = False
        if not model.cfg.text_whiten:
            return
        if keep_encoder_features:
            self.unwhitened = self.features  # the whitening below makes a new tensor
        if not model.whitening_fitted():
            model.fit_text_whitening(self.features)
        self.features = torch.cat([model.whiten(self.features[s : s + 65536]) for s in range(0, self.size, 65536)])
        self.whitened = True

    def _prepare_states(self, model, batch_size: int | None, progress: Callable[[int], None] | None) -> None:
        """Pool mode: features <- the mean-pooled last-layer states (the frozen tower's features), states <- every
        token's z coordinates (its departure from its item's mean on the model's pool basis, whitened). The basis is
        fitted here when the model has none (a new model: PCA over the whole catalogue, deterministic), else the
        model's own is used (resume, warm start, inference), so new items land in the space the pooling was trained on."""
        lens, offs = self._token_layout()
        dep = torch.zeros(int(offs[-1]), model.text_hidden, dtype=torch.float16, device=offs.device)  # until projected
        mean = torch.zeros(self.size, model.text_hidden, device=offs.device)
        was = model.text_encoder.training
        model.text_encoder.eval()
        for idx, rows in self._length_chunks(lens, offs, batch_size or model.cfg.text_batch_size):
            mean[idx], dep[rows] = model.token_states(self.tokens[idx], lens[idx])
            if progress:
                progress(len(idx))
        model.text_encoder.train(was)
        if not bool(model.pool_basis.any()):
            model.fit_pool_basis(dep)
        z = torch.cat([model.pool_coordinates(dep[s : s + 65536]) for s in range(0, dep.size(0), 65536)]) \
            if dep.size(0) else dep.new_zeros(0, model.pool_basis.size(1)).float()
        self.features, self.states, self.state_offs = mean, z, offs

    def _prepare_lower_states(self, model, batch_size: int | None, progress: Callable[[int], None] | None) -> None:
        """Top mode: states <- every token's output of the encoder's frozen lower layers (model.lower_states), the
        input of the layers that are trained; they never change, so every step runs the top layers alone."""
        lens, offs = self._token_layout()
        states = torch.zeros(int(offs[-1]), model.text_hidden, dtype=torch.float16, device=offs.device)
        was = model.text_encoder.training
        model.text_encoder.eval()
        for idx, rows in self._length_chunks(lens, offs, batch_size or model.cfg.text_batch_size):
            states[rows] = model.lower_states(self.tokens[idx], lens[idx])
            if progress:
                progress(len(idx))
        model.text_encoder.train(was)
        self.features, self.states, self.state_offs = None, states, offs

    def _token_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every item's token rows packed one after another (pool and top states): (lengths >= 1 (size,), offsets
        (size + 1,): item i's tokens at rows offsets[i]:offsets[i + 1])."""
        lens = self.lengths.clamp(min=1)
        offs = torch.zeros(self.size + 1, dtype=torch.long, device=lens.device)
        offs[1:] = torch.cumsum(lens, 0)
        return lens, offs

    @staticmethod
    def _length_chunks(lens: torch.Tensor, offs: torch.Tensor, bs: int):
        """The items in chunks of ``bs`` sorted by length (little padding per encoder call): per chunk, its item indices
        and the packed rows of their real tokens in row-major order (what a (c, L) padded output's [mask] gives)."""
        order = torch.argsort(lens)
        for s in range(0, lens.numel(), bs):
            idx = order[s : s + bs]
            pos = torch.arange(int(lens[idx].max()), device=lens.device)[None, :]
            yield idx, (offs[idx][:, None] + pos)[pos < lens[idx][:, None]]

    # ------------------------------------------------------------------------------------------------ vectors
    @torch.no_grad()
    def item_vectors(self, model, batch_size: int | None = None) -> torch.Tensor:
        """(size, d): every row's item vector (model.all_item_vectors over this catalogue)."""
        return model.all_item_vectors(self, batch_size)

    @torch.no_grad()
    def text_vectors(self, model, batch_size: int = 4096) -> torch.Tensor:
        """(size, d) float32: every row's text part alone (model.text_vectors), normalised as item vectors are."""
        dev = _device(model)
        tv = torch.cat([model.text_vectors(torch.arange(s, min(s + batch_size, self.size), device=dev), self).float()
                        for s in range(0, self.size, batch_size)])
        return F.normalize(tv, dim=-1) if model.cfg.normalize else tv

    def in_tonight_order(self, rows_x: torch.Tensor) -> torch.Tensor:
        """(size, ...) per row of the item space -> (N, ...) float32 per item of tonight's catalogue (for_tonight), rows
        of items that cannot be scored set to 0."""
        tm = self.to_model
        rows = torch.from_numpy(np.where(tm >= 0, tm, 0)).to(rows_x.device)
        out = rows_x[rows].float()
        out[torch.from_numpy(tm < 0).to(out.device)] = 0.0
        return out

    # ------------------------------------------------------------------------------------------------ cold items
    def lenders_and_borrowers(self, model, present: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(warm rows that may lend their id row, rows without one that would borrow), both restricted to ``present``
        (default: the rows that are real items tonight, for_tonight; every row otherwise)."""
        if model.cfg.item_tower != "hybrid":
            raise ValueError(f"borrow_cold_ids needs item_tower hybrid (id rows + text), not {model.cfg.item_tower!r}")
        n = self.size
        dev = _device(model)
        warm = torch.zeros(n, dtype=torch.bool, device=dev)
        k = min(n, model.cfg.num_items)
        warm[:k] = model.id_mask[:k].to(dev) > 0
        present = self.present if present is None else present
        ok = torch.ones(n, dtype=torch.bool, device=dev) if present is None else present.to(dev, torch.bool)
        if ok.shape != (n,):
            raise ValueError(f"borrow_cold_ids: present has shape {tuple(ok.shape)}, expected ({n},)")
        return (warm & ok).nonzero().squeeze(1), (~warm & ok).nonzero().squeeze(1)

    @torch.no_grad()
    def borrow_cold_ids(self, model, present: torch.Tensor | None = None, chunk: int = 2048,
                        progress: Callable[[int], None] | None = None) -> int:
        """Serving-time cold start of the hybrid tower: every item without a usable id row (no training event, or added
        after training) borrows the id row of the warm item nearest to it by cosine of the model's projected text
        vectors, so it is scored like that item's text twin instead of from text alone (on which warm items always have
        the extra id term). Evaluation and inference only (the model ignores ``borrow`` in training mode); computed for
        this model (its id_mask) and these features: prepare() clears it. ``present``: see lenders_and_borrowers.
        Returns how many borrowed. Measured on ML-1M cold start (docs/RESULTS.md): a trade of warm-target accuracy for cold."""
        widx, cidx = self.lenders_and_borrowers(model, present)
        n, dev = self.size, _device(model)
        if self.features is not None and self.features.size(0) == n:  # precomputed: no second encoder pass
            text = model.project_text(self.features, whitened=self.whitened).float()
        else:
            was = model.training
            model.eval()
            bs = model.cfg.text_batch_size
            text = torch.cat([model.text_vectors(torch.arange(s, min(s + bs, n), device=dev), self).float() for s in range(0, n, bs)])
            model.train(was)
        text = F.normalize(text, dim=-1)
        borrow = torch.full((n,), -1, dtype=torch.long, device=dev)
        if widx.numel() and cidx.numel():
            wv = text[widx]
            for s in range(0, cidx.numel(), chunk):
                c = cidx[s : s + chunk]
                best_v = torch.full((c.numel(),), -math.inf, device=dev)
                best_i = torch.zeros(c.numel(), dtype=torch.long, device=dev)
                for w in range(0, widx.numel(), 65536):  # (chunk, 65536) float32 block: 512 MiB at most
                    v, i = (text[c] @ wv[w : w + 65536].T).max(dim=1)
                    better = v > best_v  # strict: on a tie across blocks the earlier block keeps it
                    best_v, best_i = torch.where(better, v, best_v), torch.where(better, i + w, best_i)
                borrow[c] = widx[best_i]
                if progress:
                    progress(c.numel())
        self.borrow = borrow
        return int((borrow >= 0).sum())


# ================================================================================================ item space mapping
def map_ids(ids, space_ids) -> np.ndarray:
    """(N,) int64: the row of each of ``ids`` in the item space ``space_ids`` (row i = item id space_ids[i]); -1 = not
    in it. How every stage maps one catalogue onto another: inference (build_item_space), warm start (export.py)."""
    pos = {s: i for i, s in enumerate(space_ids)}
    return np.fromiter((pos.get(s, -1) for s in ids), dtype=np.int64, count=len(ids))


def model_item_ids(info: dict, prepared, final_dir: Path) -> np.ndarray | None:
    """item_id strings of the model's item space (row i = model item i), or None when tonight's catalogue IS that space
    (same item vocabulary hash). The ids are final/item_ids.parquet (required: load_final refuses a final without it),
    read by train.export.final_item_ids, shared with warm start."""
    from train.export import final_item_ids

    dm = info.get("data_manifest") or {}
    want = (dm.get("vocab") or {}).get("items_sha256")
    have = (prepared.manifest.get("vocab") or {}).get("items_sha256")
    n_model = int(info["model_config"]["num_items"])
    if want and want == have:
        return None
    if not want and dm.get("version") == prepared.version and len(prepared.items) == n_model:
        return None
    try:
        ids = final_item_ids(final_dir, n_model)
    except Exception as e:  # WarmStartError names the file and what is wrong with it
        raise CatalogueError(
            f"tonight's catalogue ({prepared.path}, items_sha256 {str(have)[:12]}) differs from the one the model in {final_dir} "
            f"was trained on (version {dm.get('version')!r}, items_sha256 {str(want)[:12]}), and the model's item ids "
            f"cannot be read: {e}") from None
    return np.array(ids, dtype=object)


def build_item_space(model_ids: np.ndarray | None, tonight_ids: np.ndarray, n_model: int, text_capable: bool) -> tuple[np.ndarray, int]:
    """Map tonight's items (N,) to model item indices.

    Known items keep their model index; new items get n_model, n_model+1, ... (text-only vectors)
    when the model has a text tower, else -1 (an id-only model cannot score them).
    Returns (to_model (N,) int64, model-space size)."""
    n = len(tonight_ids)
    if model_ids is None:
        if n < n_model:
            raise CatalogueError(f"catalogue has {n} items but the model has {n_model} (same vocabulary hash?)")
        to_model = np.arange(n, dtype=np.int64)
        if not text_capable:
            to_model[n_model:] = -1
        return to_model, (n if text_capable else n_model)
    to_model = map_ids(tonight_ids, model_ids)
    new = to_model < 0
    if text_capable:
        to_model[new] = n_model + np.arange(int(new.sum()), dtype=np.int64)
        return to_model, n_model + int(new.sum())
    return to_model, n_model
