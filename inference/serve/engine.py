"""What the online service computes, without HTTP: one loaded final/ + tonight's catalogue, and its answers.

    eng = Engine.load(cfg)                                   # cfg: ServeConfig (loads final/ once, encodes the catalogue)
    eng.recommend(["i3", "i7"], None, k=20, exclude=[])      # the nightly table's answer for this history
    eng.search("red shoes", ["i3"], None, k=20, exclude=[])  # text query blended with the history (search_history_weight)

Everything that decides a recommendation goes through the nightly job's own functions (inference/run.py):
``encode_model_catalogue`` (catalogue in the model's item space, cold items, text-feature cache, unavailable items),
``history_windows`` (the latest max_len events, left-padded), ``score_windows`` (user tower + exact top-K with the
seen and unavailable items excluded) and ``fallback_popularity`` / ``fallback_order`` / ``fallback_topk`` (the popular
list of users the model cannot score). So /v1/recommend with a user's prepared history returns the nightly table's
row for that user (tests/test_serve.py checks every user of a sample).

An Engine never changes once built: requests read it from several threads at once (the model runs in inference
mode, nothing is written), and a reload builds a new Engine beside it and swaps the reference (inference/serve/app.py).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inference.config import InferenceConfig
from inference.run import (InferenceError, encode_model_catalogue, fallback_order, fallback_popularity, fallback_topk,
                           history_windows, score_windows, serving_users, user_vectors_bucketed)
from inference.serve.config import ServeConfig
from inference.topk import order_topk, resolve_method
from lmrec_common.log import fmt_secs

# the table's settings a followed nightly run decides (its _manifest.json "config"): the service scores as it did
FOLLOWED_SETTINGS = ("exclude_seen", "exclude_unavailable", "cold_item_ids", "fallback_days", "max_history")


class ServeError(RuntimeError):
    """Nothing to serve (no published table, a missing model or data folder): the service does not start."""


class RequestError(ValueError):
    """A request the engine cannot answer as asked (e.g. search on a model without a text tower): a 4xx, not a crash."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


# ============================================================================================ what to serve
@dataclass(frozen=True)
class Source:
    """A model + the prepared version + the scoring settings, and a signature that changes when any of them does."""

    model_dir: str
    prepared_dir: str  # the version folder
    icfg: InferenceConfig  # the scoring settings (inference/run.py reads these)
    table: str = ""  # follow_recs: the resolved run folder of the followed table
    signature: tuple = field(default=())


def check_passed(recs_root: str | os.PathLike, name: str, folder: Path) -> str | None:
    """None when the morning check's report ``<recs_root>/_checks/<name>.json`` says ok for run folder ``folder``;
    else why not (no report yet, problems found, or a report of another run of that date)."""
    from inference.check import report_path

    try:
        rep = json.loads(report_path(recs_root, name.removeprefix("dt=")).read_text())
    except (OSError, ValueError):
        return "not checked (no readable _checks report)"
    if os.path.realpath(str(rep.get("run_folder", ""))) != str(folder):
        return "its check report is of another run of that date"
    if not rep.get("ok"):
        return f"its morning check found {len(rep.get('problems') or [])} problem(s)"
    return None


def newest_table(recs_root: str | os.PathLike, checked: bool = False) -> Path:
    """The run folder of the newest published ``dt=YYYY-MM-DD`` table under ``recs_root`` (the link resolved once);
    ``checked``: the newest whose morning check passed (``check_passed``)."""
    from lmrec_common.publish import resolve_table

    root = Path(recs_root)
    if not root.is_dir():
        raise ServeError(f"follow_recs: {root} does not exist (the nightly inference's output_dir)")
    dates = sorted((p for p in root.iterdir() if p.name.startswith("dt=")), key=lambda p: p.name, reverse=True)
    passed_over = []
    for p in dates:
        try:
            folder = resolve_table(p)
        except FileNotFoundError:
            continue
        why = check_passed(root, p.name, folder) if checked else None
        if why is None:
            return folder
        passed_over.append(f"{p.name}: {why}")
    if passed_over:
        raise ServeError(f"follow_recs with follow_checked: no table under {root} passed its morning check "
                         f"({'; '.join(passed_over[:3])}); run python -m inference.check on it")
    raise ServeError(f"follow_recs: no published table under {root} (no dt=* folder with _SUCCESS)")


def resolve_source(cfg: ServeConfig) -> Source:
    """What the config names now (cheap: a few small files; the reload poll calls it)."""
    from data_prep.schema import PreparedDataError, resolve_prepared

    if cfg.follow_recs:
        table = newest_table(cfg.follow_recs, checked=cfg.follow_checked)
        man = json.loads((table / "_manifest.json").read_text())
        model = man["model"]
        if cfg.follow_variant:
            found = [v["model"] for v in man.get("variants", []) if v.get("name") == cfg.follow_variant]
            if not found:
                raise ServeError(f"follow_variant: table {table} has no variant {cfg.follow_variant!r} "
                                 f"(it has {[v.get('name') for v in man.get('variants', [])]})")
            model = found[0]
        tcfg = man.get("config") or {}
        icfg = cfg.inference_config(model["path"], man["data"]["path"])
        for k in FOLLOWED_SETTINGS:
            if k in tcfg:
                setattr(icfg, k, tcfg[k])
        icfg.run_date = man["run_date"]
        return Source(model_dir=model["path"], prepared_dir=man["data"]["path"], icfg=icfg, table=str(table),
                      signature=("table", str(table), model["path"]))
    # a link (a deploy repoints one) is resolved once: the load reads the folder the signature names, and /v1/model
    # reports it, not wherever the link points by then
    mdir = Path(os.path.realpath(cfg.model_dir))
    try:
        export = json.loads((mdir / "export.json").read_text())
    except (OSError, ValueError) as e:
        raise ServeError(f"model_dir: {cfg.model_dir} is not a final/ export ({type(e).__name__}: {e})") from None
    try:
        version = resolve_prepared(cfg.prepared_dir)
    except PreparedDataError as e:
        raise ServeError(f"prepared_dir: {e}") from None
    # every file's hash (weights, item_tower/, item ids): a new export that changes any of them is a new model; exports
    # from before files_sha256 have only the weights' hash
    files = json.dumps(export.get("files_sha256") or export.get("weights_sha256"), sort_keys=True)
    sig = ("model", str(mdir), files, os.path.realpath(version))
    return Source(model_dir=str(mdir), prepared_dir=str(version), icfg=cfg.inference_config(str(mdir), str(version)),
                  signature=sig)


# ============================================================================================ query text
def encode_query_text(model, tokens: dict, normalize: bool) -> torch.Tensor:
    """Tokenized query texts (input_ids, attention_mask: (B, L), right-padded) -> (B, d): the item tower's text part,
    computed as for an item whose text is the query (train/model.py query_text_vectors). An item's own text gives
    that item's text vector."""
    vec = model.query_text_vectors(tokens["input_ids"], tokens["attention_mask"])
    return F.normalize(vec, dim=-1) if normalize else vec


def _moments(m: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and covariance (d, d) of the rows ``rows`` of m (N, d), in float64: the std of <x, m_i> over those
    rows is sqrt(x^T C x), for any x, without scoring them."""
    x = m[rows].double()
    mu = x.mean(0)
    xc = x - mu
    return mu, (xc.T @ xc) / max(x.shape[0], 1)


# ============================================================================================ the engine
class Engine:
    """One final/ and tonight's catalogue, encoded once (see the module docstring). Build with Engine.load."""

    def __init__(self):
        raise TypeError("use Engine.load(cfg)")

    @classmethod
    def load(cls, cfg: ServeConfig, source: Source | None = None, log=print) -> "Engine":
        from data_prep.schema import load_prepared
        from train.export import load_final

        t0 = time.time()
        self = object.__new__(cls)
        src = source or resolve_source(cfg)
        self.cfg, self.source, self.icfg = cfg, src, src.icfg
        device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.device = device
        model, info = load_final(src.model_dir)
        self.model = model.to(device).eval()
        self.info = info
        self.model_version = str(info.get("model_version"))
        prepared = load_prepared(src.prepared_dir)
        self.data_version = prepared.version
        pm = prepared.manifest
        items = prepared.items.data.table
        tonight_ids = np.array(items.column("item_id").to_pylist(), dtype=object)
        avail = np.asarray(items.column("available").to_numpy(zero_copy_only=False), dtype=bool)
        log(f"[serve] model {src.model_dir} (version {self.model_version}, item_tower {model.cfg.item_tower}) | data "
            f"{prepared.path} (version {prepared.version})" + (f" | following table {src.table}" if src.table else ""))
        # ---- search's text space (search_text_space): the frozen encoder's own, or the item tower's text part
        # (an export records its encoder as frozen; the mode it was trained in says whether the weights are pretrained)
        self.search_space = None
        if model.uses_text:
            trained = info.get("trained_text_mode") or model.cfg.text_mode
            frozen = trained in ("frozen", "pool")
            if cfg.search_text_space == "encoder" and not frozen:
                raise ServeError(f"search_text_space: encoder needs a frozen text encoder (text_mode frozen or pool); "
                                 f"{src.model_dir} fine-tuned it (text_mode {trained}): use model or auto")
            self.search_space = ("encoder" if cfg.search_text_space == "encoder"
                                 or (cfg.search_text_space == "auto" and frozen) else "model")
        # ---- the catalogue, exactly as the nightly job encodes it (the text-feature cache is read, never written here)
        cat = encode_model_catalogue(model, info, src.model_dir, prepared, tonight_ids, avail, self.icfg, device,
                                     write_cache=False, tag="[serve] ",
                                     keep_encoder_features=self.search_space == "encoder")
        self.cat = cat
        self.n_items = len(tonight_ids)
        sdt = torch.bfloat16 if self.icfg.score_dtype == "bfloat16" else torch.float32
        self.sdt = sdt
        self.cat_scores = cat.vectors.to(sdt)  # what the top-K multiplies (the tower gathers from cat.vectors, float32)
        self.unavail_idx = torch.nonzero(cat.unavailable, as_tuple=False).flatten()
        self.method = resolve_method(self.icfg.topk_method, self.n_items)
        self.T = min(self.icfg.max_history or model.cfg.max_len, model.cfg.max_len)
        # ---- the fallback list (users the model cannot score), as the nightly job ranks it
        run_date = self.icfg.resolved_run_date()
        pop, self.fallback_what = fallback_popularity(prepared, serving_users(prepared), self.icfg, run_date)
        self.fallback = (*fallback_order(pop, cat.excluded), pop)
        # ---- ids: item_id (as data_prep normalised it) -> tonight's row; answers carry the table's id type
        self.id_normalization = (pm.get("counts") or {}).get("id_normalization", "exact")
        keys = [str(x) for x in tonight_ids]
        self.index = {s: i for i, s in enumerate(keys)}
        self.item_id_type = pm.get("item_id_type", "string")
        self.item_ids_out = [int(s) for s in keys] if self.item_id_type == "int64" else keys
        self.event_types = list(pm.get("event_types") or [])
        self.event_index = {name: i for i, name in enumerate(self.event_types)}
        if cfg.default_event_type and cfg.default_event_type not in self.event_index:
            raise ServeError(f"default_event_type: {cfg.default_event_type!r} is not one of the prepared event types "
                             f"{self.event_types}")
        self.default_event = self.event_index.get(cfg.default_event_type, 0)
        # ---- search: the query's text vector against the items' text vectors, blended with the user's scores
        self.search_ready = bool(model.uses_text)
        if self.search_ready:
            self._prepare_search(prepared)
        self.loaded_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.load_s = time.time() - t0
        log(f"[serve] ready: {self.n_items} items ({cat.counts['candidates']} candidates), max_len {self.T}, top-K "
            f"{self.method}, search {f'on ({self.search_space} text space)' if self.search_ready else 'off (no text tower)'}, "
            f"loaded in {fmt_secs(self.load_s)}")
        return self

    def _prepare_search(self, prepared) -> None:
        from data_prep.items import load_tokenizer

        tk = prepared.manifest.get("tokenizer") or {}
        self.tokenizer, _ = load_tokenizer(tk.get("path") or self.model.cfg.text_model_path)
        self.max_text_tokens = int(tk.get("max_text_tokens") or 64)
        self.tok_lock = threading.Lock()  # a fast tokenizer called from two threads can fail ("Already borrowed")
        m, cat = self.model, self.cat
        with torch.inference_mode():
            if self.search_space == "encoder":  # the encoder's pooled outputs, unit length (cosine)
                text = F.normalize(cat.items.in_tonight_order(cat.items.encoder_features), dim=-1)
                cat.items.unwhitened = None  # a whitened model's extra copy is not needed once in the matrix below
            else:  # the items' text part (model rows in chunks, then tonight's order), normalised like item vectors
                text = cat.items.in_tonight_order(cat.items.text_vectors(m, batch_size=4096))
            cand = torch.from_numpy(np.flatnonzero(~cat.excluded)).to(self.device)
            self.mu_text, self.cov_text = _moments(text, cand)
            self.mu_item, self.cov_item = _moments(cat.vectors, cand)
            self.search_text = text.float().contiguous()  # (N, H) or (N, d): what a query is compared with
            self.candidate_mask = torch.from_numpy(~cat.excluded).to(self.device)  # what a query's sharpness is read over
            self.n_candidates = int(self.candidate_mask.sum())

    # ------------------------------------------------------------------------------------------ helpers
    def describe(self) -> dict:
        c = self.cat.counts
        return {"model_version": self.model_version, "model_dir": str(Path(self.source.model_dir).resolve()),
                "item_tower": self.model.cfg.item_tower, "data_version": self.data_version,
                "prepared_dir": self.source.prepared_dir, "table": self.source.table or None, "loaded_at": self.loaded_at,
                "load_s": round(self.load_s, 2), "catalogue": {"items": self.n_items, "candidates": c["candidates"],
                                                              "unavailable": c["items_unavailable"],
                                                              "new_text_only": c["items_new_text_only"]},
                "max_len": self.T, "event_types": self.event_types,
                "settings": {k: getattr(self.icfg, k) for k in FOLLOWED_SETTINGS} | {"run_date": self.icfg.resolved_run_date()},
                "fallback": self.fallback_what, "search": {"available": self.search_ready,
                                                           "history_weight": self.cfg.search_history_weight,
                                                           "broad_history_weight": self.cfg.search_broad_history_weight,
                                                           "sharpness_range": list(self.cfg.search_sharpness_range),
                                                           "text_space": self.search_space}}

    def lookup(self, ids: list) -> np.ndarray:
        """Item ids (str or int, as the events have them) -> tonight's rows (int64), -1 = not in tonight's catalogue."""
        if not ids:
            return np.zeros(0, np.int64)
        keys = [str(x) for x in ids]
        if self.id_normalization != "exact":
            import pyarrow as pa

            from data_prep.validate import normalize_ids

            keys = normalize_ids(pa.array(keys, pa.string()), self.id_normalization)[0].to_pylist()
        get = self.index.get
        return np.fromiter((get(s, -1) for s in keys), dtype=np.int64, count=len(keys))

    def event_codes(self, names: list | None, n: int) -> np.ndarray:
        if names is None:
            return np.full(n, self.default_event, np.int64)
        out = np.empty(n, np.int64)
        for i, name in enumerate(names):
            j = self.event_index.get(name)
            if j is None:
                raise RequestError(f"event_types[{i}]", f"{name!r} is not one of the model's event types {self.event_types}")
            out[i] = j
        return out

    def prepare_history(self, history: list, event_types: list | None, exclude: list, exclude_history: bool) -> dict:
        """The request's history -> the user tower's window, the items to leave out, and counts."""
        rows = self.lookup(history)
        ets = self.event_codes(event_types, len(history))
        known = rows >= 0
        vals, ets = rows[known], ets[known]
        offs = np.array([0, len(vals)], np.int64)
        hist, et, w, _ = history_windows(vals, offs, ets, self.cat.to_model, self.T, space="tonight")
        ex = self.lookup(exclude)
        ex = ex[ex >= 0]
        seen = np.concatenate([vals, ex]) if exclude_history else ex
        return dict(hist=hist, et=et, usable=bool(w[0] > 0), vals=vals, seen=seen, exclude_rows=ex,
                    unknown_items=int((~known).sum()), window=int(w[0]))

    def _ids(self, idx: np.ndarray) -> list:
        return [self.item_ids_out[i] for i in idx.tolist()]

    # ------------------------------------------------------------------------------------------ answers
    def recommend(self, history: list, event_types: list | None = None, k: int = 20, exclude: list | None = None) -> dict:
        """The top-k for this history, as the nightly table would list it: the user tower over the latest max_len known
        items, exact top-k, the history (exclude_seen), ``exclude`` and unavailable items left out. A history with no item
        the model can score gets the fallback list (the nightly job's popular items), ``source`` = fallback."""
        h = self.prepare_history(history, event_types, exclude or [], self.icfg.exclude_seen)
        if h["usable"]:
            seen = torch.from_numpy(h["seen"])
            offs = torch.tensor([0, len(seen)], dtype=torch.int64)
            sc, idx, _ = score_windows(self.model, h["hist"], h["et"], self.cat.vectors, self.cat_scores, k, self.device,
                                       self.sdt, seen_offsets=offs, seen_items=seen, unavailable_idx=self.unavail_idx,
                                       item_chunk=self.n_items, method=self.method)
            idx, sc, source = idx[0].cpu().numpy(), sc[0].float().cpu().numpy(), "model"
        else:
            # fallback_topk always leaves the user's own items out (as the nightly job's fallback rows do), and ``exclude``
            fb = np.concatenate([h["vals"], h["exclude_rows"]])
            idx2, sc2 = fallback_topk(*self.fallback[:2], self.fallback[2], k, np.array([0, len(fb)], np.int64), fb)
            idx, sc, source = idx2[0], sc2[0], "fallback"
        ok = idx >= 0
        return {"items": self._ids(idx[ok]), "scores": [float(x) for x in sc[ok]], "source": source,
                "model_version": self.model_version, "unknown_items": h["unknown_items"], "history_used": h["window"]}

    def encode_queries(self, texts: list[str]) -> torch.Tensor:
        """Query vectors for the query strings, tokenized as data_prep tokenized item texts, in the search's text space:
        (B, H) unit-length encoder outputs (encoder) or (B, d) item-tower text vectors (model, encode_query_text)."""
        with self.tok_lock:
            tok = self.tokenizer(texts, truncation=True, max_length=self.max_text_tokens, add_special_tokens=True,
                                 padding=True, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items()}
        with torch.inference_mode():
            if self.search_space == "encoder":
                return F.normalize(self.model.query_encoder_features(tok["input_ids"], tok["attention_mask"]), dim=-1)
            return encode_query_text(self.model, tok, self.model.cfg.normalize).float()

    def query_sharpness(self, z_text: torch.Tensor) -> torch.Tensor:
        """(B, N) standardised text scores -> (B,) how sharply each query points at a few items: the best candidate's
        z-score minus the tenth best's. A query naming an item ("lego castle") stands out of the catalogue (median
        2.3-3.4 on the sample and MovieLens-100K, but 1.7 on Amazon Toys, whose titles are alike); a query naming a need
        that many items meet ("comedy", "garden") does not (0.7-0.9). docs/SERVE.md, "Broad queries"."""
        z = z_text.masked_fill(~self.candidate_mask[None, :], float("-inf"))
        top = z.topk(min(10, self.n_candidates), dim=1).values
        return (top[:, 0] - top[:, -1]).nan_to_num(0.0, posinf=0.0, neginf=0.0)

    def adaptive_weight(self, sharpness: torch.Tensor, broad: float | None = None,
                        sharpness_range: tuple[float, float] | None = None) -> torch.Tensor:
        """(B,) sharpness -> (B,) history weights: the broad weight (search_broad_history_weight) at or below the low end
        of the sharpness range (search_sharpness_range), search_history_weight at or above its high end, linear
        between; without a broad weight, search_history_weight for every query. ``broad`` / ``sharpness_range``
        replace the config's (bench/search_eval.py chooses them so)."""
        lo, hi = self.cfg.search_sharpness_range if sharpness_range is None else sharpness_range
        ws = self.cfg.search_history_weight
        wb = broad if broad is not None else ws if self.cfg.search_broad_history_weight is None \
            else self.cfg.search_broad_history_weight
        frac = ((sharpness.float() - lo) / max(hi - lo, 1e-9)).clamp(0.0, 1.0)
        return wb + (ws - wb) * frac

    def search_parts(self, q: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Query vectors q (B, t), user vectors u (B, d) or None -> the standardised text scores (<q, t_i> - mu_q) / sd_q
        (B, N), the standardised history scores (<u, v_i> - mu_u) / sd_u (B, N) or None, and each query's sharpness
        (B,). The means and standard deviations over the candidates come from the catalogue's moments (_moments)."""
        qd = q.double()
        sd_q = torch.einsum("bi,ij,bj->b", qd, self.cov_text, qd).clamp(min=1e-24).sqrt()
        z = (q.float() @ self.search_text.T - (qd @ self.mu_text).float()[:, None]) / sd_q.float()[:, None]
        zu = None
        if u is not None:
            ud = u.double()
            sd_u = torch.einsum("bi,ij,bj->b", ud, self.cov_item, ud).clamp(min=1e-24).sqrt()
            zu = (u.float() @ self.cat.vectors.T - (ud @ self.mu_item).float()[:, None]) / sd_u.float()[:, None]
        return z, zu, self.query_sharpness(z)

    @staticmethod
    def blend(z: torch.Tensor, zu: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
        """(1 - w) z + w zu for standardised text and history scores (B, N) and one weight, or one per row (B,)."""
        if isinstance(w, torch.Tensor):
            w = w[:, None]
        return (1.0 - w) * z + w * zu

    def search_scores(self, q: torch.Tensor, u: torch.Tensor | None, w: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The search scores of every catalogue item: q (B, t), u (B, d) or None (text alone) -> scores (B, N) =
        (1 - w) z_text + w z_history (search_parts), the weights w (B,) and each query's sharpness (B,). w: one weight
        for every row, or None = each query's own (adaptive_weight of its sharpness); without u every w is 0. Masking
        (unavailable, seen) is the caller's. bench/search_eval.py ranks with the same parts."""
        z, zu, sharp = self.search_parts(q, u)
        if zu is None:
            return z, torch.zeros(q.shape[0]), sharp
        ww = self.adaptive_weight(sharp) if w is None else torch.full((q.shape[0],), float(w))
        return self.blend(z, zu, ww), ww, sharp

    def search(self, query: str, history: list | None = None, event_types: list | None = None, k: int = 20,
               exclude: list | None = None, history_weight: float | None = None) -> dict:
        """Items for the query text, personalised by the history:
        score_i = (1 - w) (<q, t_i> - mu_q) / sd_q + w (<u, v_i> - mu_u) / sd_u, with q the query's text vector, t_i
        item i's text vector (both in the search_text_space: the frozen encoder's unit-length pooled outputs, or the item
        tower's text part), u the user vector of the history, v_i the item vector, mu and sd the mean and standard
        deviation of each score over the catalogue's candidates; w = the request's history_weight, else this query's
        own (adaptive_weight: search_history_weight for a query that names an item, up to search_broad_history_weight for
        one that many items meet). w = 0, or a history with no usable item: plain text search. The history's items are
        left out when search_exclude_seen; ``exclude`` and unavailable items always."""
        if not self.search_ready:
            raise RequestError("query", f"this model ({self.model.cfg.item_tower} item tower) has no text tower to encode a "
                               "query with; /v1/search needs a text or hybrid model", status=409)
        h = self.prepare_history(history or [], event_types, exclude or [], self.cfg.search_exclude_seen)
        q = self.encode_queries([query])  # (1, d)
        fixed = None if history_weight is None else float(history_weight)
        may_weigh = fixed > 0 if fixed is not None else \
            max(self.cfg.search_history_weight, self.cfg.search_broad_history_weight or 0.0) > 0
        personal = h["usable"] and may_weigh
        with torch.inference_mode():
            u = None
            if personal:
                u = user_vectors_bucketed(self.model, h["hist"], h["et"], self.device, buckets=1,
                                          item_table=self.cat.vectors).float()
            sc, ww, sharp = self.search_scores(q, u, fixed)
            sc[:, self.unavail_idx] = float("-inf")
            sc[:, torch.from_numpy(h["seen"]).to(sc.device)] = float("-inf")
            top, idx = order_topk(*sc.topk(min(k, sc.shape[1]), dim=1))  # ties in item order, as the nightly top-K
        top, idx = top[0].cpu().numpy(), idx[0].cpu().numpy()
        ok = idx >= 0
        return {"items": self._ids(idx[ok]), "scores": [float(x) for x in top[ok]], "personalised": personal,
                "history_weight": round(float(ww[0]), 4), "query_sharpness": round(float(sharp[0]), 4),
                "model_version": self.model_version, "unknown_items": h["unknown_items"], "history_used": h["window"]}


__all__ = ["Engine", "RequestError", "ServeError", "Source", "resolve_source", "newest_table", "encode_query_text",
           "InferenceError"]
