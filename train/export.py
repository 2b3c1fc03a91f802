"""The self-describing final export (docs/CONTRACTS.md section 3) and its loader.

    model, info = load_final("work/checkpoints/sample/final")   # CPU, eval mode
    prepare_item_tower(model, prepared.items)                     # text/hybrid: tokens + frozen features
    items = model.all_item_vectors(); users = model.user_vectors(hist, event_types)

The exported model is always an inference model: LoRA adapters are merged into the base weights
and the text tower is recorded as ``text_mode: "frozen"`` (the training mode is in export.json), so
inference needs no peft. Only the rank that holds the consolidated state dict calls export_final.
export.json records the sha256 of every other file of final/ (``files_sha256``); load_final and warm_start
verify them first and refuse a folder whose files differ, are missing or were added (ExportIntegrityError,
naming the file). Exports written before ``files_sha256`` are checked against their ``weights_sha256``.
``item_ids.parquet`` (one ``item_id`` string per model item, row i = model item i) lets the next
stages map tonight's catalogue onto the model's item space by id (inference, warm start).

Warm start (``init_from=<previous run>/final`` in the train config):

    report = warm_start(model, "work/checkpoints/nightly-2026-11-26/final", tonight_item_ids, tonight_event_types)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lmrec_common.config import dump_yaml
from lmrec_common.manifest import base_manifest, sha256_file, sha256_strings
from lmrec_common.publish import staged_dir
from train.model import RecModelConfig, SeqRecModel

KIND = "lmrec.model"
SCHEMA_VERSION = 1
ITEM_TOWER_DIR = "item_tower"
ITEM_IDS_FILE = "item_ids.parquet"
EXPORT_FILE = "export.json"


class ExportIntegrityError(ValueError):
    """A final/ whose files are not those its export.json records (damaged, modified, missing or added)."""


def merge_lora_state_dict(sd: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """peft LoRA keys -> the plain encoder's keys with W <- W + scaling * B @ A.

    ``text_encoder.base_model.model.X.base_layer.weight`` + ``X.lora_A.default.weight`` (r, in) +
    ``X.lora_B.default.weight`` (out, r) -> ``text_encoder.X.weight``. Works on a consolidated state
    dict (so after ZeRO-3 gathering too)."""
    out: dict[str, torch.Tensor] = {}
    lora_a = {k: v for k, v in sd.items() if ".lora_A." in k}
    for k, v in sd.items():
        if ".lora_A." in k or ".lora_B." in k or "lora_embedding" in k or "lora_magnitude" in k:
            continue
        nk = k
        if k.endswith(".base_layer.weight"):
            stem = k[: -len(".base_layer.weight")]
            a = next((lora_a[x] for x in lora_a if x.startswith(stem + ".lora_A.")), None)
            if a is not None:
                b = sd[next(x for x in sd if x.startswith(stem + ".lora_B."))]
                v = (v.float() + scaling * (b.float() @ a.float())).to(v.dtype)
        nk = nk.replace(".base_layer.", ".")
        nk = re.sub(r"^text_encoder\.base_model\.model\.", "text_encoder.", nk)
        out[nk] = v
    return out


def inference_model_config(cfg: RecModelConfig) -> RecModelConfig:
    d = cfg.to_dict()
    if cfg.item_tower != "id":
        d["text_model_path"] = ITEM_TOWER_DIR  # relative to final/
        d["text_mode"] = "pool" if cfg.text_mode == "pool" else "frozen"  # pool keeps its learned pooling
        d["gradient_checkpointing"] = False
    return RecModelConfig.from_dict(d)


def export_final(final_dir: str | Path, state_dict: dict[str, torch.Tensor], model_cfg: RecModelConfig,
                 text_model_dir: str | Path | None, train_cfg: Any, data_manifest: dict, metrics: dict,
                 extra: dict | None = None, item_ids: list[str] | None = None) -> dict:
    """Write final/ atomically (built under a hidden sibling, then renamed). Returns export.json.
    ``item_ids``: the item_id strings of the training catalogue in item_idx order (-> item_ids.parquet)."""
    if item_ids is not None and len(item_ids) != model_cfg.num_items:
        raise ValueError(f"export_final: {len(item_ids)} item ids for a model with num_items={model_cfg.num_items}")
    sd = {k: v.detach().to("cpu") for k, v in state_dict.items()}
    if model_cfg.item_tower != "id" and model_cfg.text_mode == "lora":
        sd = merge_lora_state_dict(sd, model_cfg.lora_alpha / model_cfg.lora_r)
    sd = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    inf_cfg = inference_model_config(model_cfg)
    with staged_dir(final_dir) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "model_config.json").write_text(json.dumps(inf_cfg.to_dict(), indent=2) + "\n")
        if text_model_dir is not None and model_cfg.item_tower != "id":
            from transformers import AutoConfig, AutoTokenizer

            AutoConfig.from_pretrained(str(text_model_dir), local_files_only=True,
                                       trust_remote_code=False).save_pretrained(str(tmp / ITEM_TOWER_DIR))
            try:
                AutoTokenizer.from_pretrained(str(text_model_dir), local_files_only=True,
                                              trust_remote_code=False).save_pretrained(str(tmp / ITEM_TOWER_DIR))
            except (OSError, ValueError):
                pass  # an item tower without tokenizer files: inference must use the prepared input_ids
        (tmp / "train_config.yaml").write_text(dump_yaml(train_cfg))
        (tmp / "data_manifest.json").write_text(json.dumps(data_manifest, indent=2, default=str) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if item_ids is not None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"item_id": pa.array([str(x) for x in item_ids], pa.string())}), str(tmp / ITEM_IDS_FILE))
        info = base_manifest(KIND, SCHEMA_VERSION)
        files_sha = {f: sha256_file(tmp / f) for f in _export_files(tmp)}  # every file but export.json
        weights_sha = files_sha["model.safetensors"]
        info.update({
            "model_version": weights_sha[:12],
            "weights_sha256": weights_sha,
            "files_sha256": files_sha,
            "trained_text_mode": model_cfg.text_mode if model_cfg.item_tower != "id" else None,
            "data_version": data_manifest.get("version"),
            "num_items": model_cfg.num_items,
            "item_tower": model_cfg.item_tower,
        })
        info.update(extra or {})
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return info


def _export_files(p: Path) -> list[str]:
    """Every entry under final/ (posix paths relative to it) except export.json; folders are not listed."""
    return sorted(f.relative_to(p).as_posix() for f in p.rglob("*")
                  if not f.is_dir() and f.relative_to(p).as_posix() != EXPORT_FILE)


def verify_export(p: Path, info: dict, error: type[Exception] = ExportIntegrityError) -> None:
    """Raise ``error`` naming the first file of final/ that is not what export.json records."""
    listed = info.get("files_sha256")
    if listed is None:  # an export from before files_sha256: verify what it records, the weights
        want = info.get("weights_sha256")
        if want and sha256_file(p / "model.safetensors") != want:
            raise error(f"{p / 'model.safetensors'}: sha256 differs from weights_sha256 in {p / EXPORT_FILE} (damaged or "
                        "modified); export the model again")
        return
    if not isinstance(listed, dict) or listed.get("model.safetensors") != info.get("weights_sha256"):
        raise error(f"{p / EXPORT_FILE}: files_sha256 does not agree with weights_sha256 (export.json was edited)")
    present = _export_files(p)
    for f in sorted(set(listed) - set(present)):
        raise error(f"{p / f}: missing (listed in {EXPORT_FILE}); export the model again")
    for f in sorted(set(present) - set(listed)):
        raise error(f"{p / f}: not part of the export (not listed in {EXPORT_FILE}); remove it or export again")
    for f in sorted(listed):
        if (p / f).is_symlink() or sha256_file(p / f) != listed[f]:
            raise error(f"{p / f}: sha256 differs from the one {EXPORT_FILE} records (damaged or modified); export the "
                        "model again")


def _read_export_info(p: Path, missing_error: type[Exception], kind_error: type[Exception], what: str,
                      integrity_error: type[Exception] = ExportIntegrityError) -> dict:
    """export.json of a final/ folder, after checking the folder holds a whole, unmodified export of our kind."""
    need = ["model.safetensors", "model_config.json", "export.json"]
    missing = [n for n in need if not (p / n).is_file()]
    if missing:
        raise missing_error(f"{p} is not {what} (missing {missing})")
    try:
        info = json.loads((p / "export.json").read_text())
    except (OSError, ValueError) as e:  # a torn or garbled export.json is damage, named like the other files
        raise integrity_error(f"{p / EXPORT_FILE}: not readable JSON ({type(e).__name__}: {e}); export the model again") from None
    if not isinstance(info, dict):
        raise integrity_error(f"{p / EXPORT_FILE}: not an export record (a JSON {type(info).__name__}); export the model again")
    if info.get("kind") != KIND or info.get("schema_version") != SCHEMA_VERSION:
        raise kind_error(f"{p}/export.json: kind {info.get('kind')!r} schema {info.get('schema_version')} is not "
                         f"{KIND!r} schema {SCHEMA_VERSION}")
    verify_export(p, info, integrity_error)
    return info


def load_final(path: str | Path) -> tuple[SeqRecModel, dict]:
    """Rebuild the exported model on CPU in eval mode. info: export.json + model_config, metrics,
    data_manifest (dicts) and path."""
    p = Path(path)
    # every refusal is an ExportIntegrityError (inference and train print it as one line): a folder missing the
    # weights (half copied) or holding another kind of export is as unusable as one with a changed file
    info = _read_export_info(p, ExportIntegrityError, ExportIntegrityError, what="a final export")
    cfg = RecModelConfig.from_dict(json.loads((p / "model_config.json").read_text()))
    text_dir = p / ITEM_TOWER_DIR if cfg.item_tower != "id" else None
    model = SeqRecModel(cfg, text_model_path=str(text_dir) if text_dir else None, load_text_weights=False)
    sd = load_file(str(p / "model.safetensors"))
    res = model.load_state_dict(sd, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise ValueError(f"{p}/model.safetensors does not match model_config.json: missing {res.missing_keys[:5]}, "
                         f"unexpected {res.unexpected_keys[:5]}")
    model.eval()
    for name in ("metrics", "data_manifest"):
        f = p / f"{name}.json"
        info[name] = json.loads(f.read_text()) if f.is_file() else {}
    info["model_config"] = cfg.to_dict()
    info["path"] = str(p)
    return model, info


def prepare_item_tower(model: SeqRecModel, items, batch_size: int | None = None, progress=None,
                       cache_dir: str | None = None) -> None:
    """Register the catalogue's tokens (items table of the prepared folder; may hold items added
    after training: scored from text alone) and precompute the frozen text features (on the model's
    device; cache_dir: train/text_cache.py)."""
    if not model.uses_text:
        return
    from train.data import item_token_tensors

    ids, lens = item_token_tensors(items, model.cfg.pad_token_id)
    model.set_item_tokens(ids, lens)
    model.precompute_text_features(batch_size, progress=progress, cache_dir=cache_dir)


# ================================================================================================ warm start
class WarmStartError(ValueError):
    """init_from names something that cannot initialise this model (not a final/, incompatible config)."""


# RecModelConfig fields that must agree between the previous final and tonight's model: they decide
# what every copied tensor means (a d_model or tower change is a new model, not a warm start)
_MUST_MATCH = ("item_tower", "d_model", "n_layers", "n_heads", "pooling", "normalize")
# HF config fields of the item tower that decide the encoder's weights' meaning
_TEXT_ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "vocab_size", "max_position_embeddings", "hidden_act", "type_vocab_size")


def final_item_ids(final_dir: str | Path, data_manifest: dict, num_items: int,
                   tonight_ids: list[str] | None = None, tonight_items_sha256: str | None = None) -> list[str]:
    """The item_id strings of a final's item space (row i = model item i).

    Looked up in order: ``item_ids.parquet`` in the final; tonight's catalogue when its items_sha256
    equals the one the final was trained on; the ``items/`` of the training version next to where
    data_prep wrote it (data_manifest config.output_dir). Errors name every place looked at."""
    p = Path(final_dir)
    f = p / ITEM_IDS_FILE
    if f.is_file():
        import pyarrow.parquet as pq

        ids = [str(x) for x in pq.read_table(str(f), columns=["item_id"]).column("item_id").to_pylist()]
        if len(ids) != num_items:
            raise WarmStartError(f"{f}: {len(ids)} item ids, but {p}/model_config.json has num_items={num_items}")
        return ids
    want = (data_manifest.get("vocab") or {}).get("items_sha256")
    if tonight_ids is not None and want and want == tonight_items_sha256 and len(tonight_ids) == num_items:
        return list(tonight_ids)
    version = data_manifest.get("version")
    looked = [str(f)]
    out = (data_manifest.get("config") or {}).get("output_dir")
    if version and out:
        c = Path(out) / version / "items"
        looked.append(str(c))
        if c.is_dir():
            import datasets

            ids = [str(x) for x in datasets.load_from_disk(str(c)).data.table.column("item_id").to_pylist()]
            if len(ids) == num_items and (not want or sha256_strings(ids) == want):
                return ids
    raise WarmStartError(f"init_from {p}: cannot find the item ids of the model's item space (looked at {looked}); "
                         f"export the previous run again with this code version (it writes {ITEM_IDS_FILE})")


def _canonical_key(k: str) -> str:
    """A trainable model's key -> the key of the (LoRA-merged, plain) exported state dict."""
    k = re.sub(r"^text_encoder\.base_model\.model\.", "text_encoder.", k)
    return k.replace(".base_layer.", ".")


def _check_compatible(old: RecModelConfig, new: RecModelConfig, final_dir: Path, text_model_dir: str | Path | None) -> None:
    bad = [f"{k}: {getattr(old, k)!r} (previous) vs {getattr(new, k)!r} (this run)"
           for k in _MUST_MATCH if getattr(old, k) != getattr(new, k)]
    if new.item_tower != "id" and old.item_tower == new.item_tower and text_model_dir is not None:
        old_tc = final_dir / ITEM_TOWER_DIR / "config.json"
        new_tc = Path(text_model_dir) / "config.json"
        if not old_tc.is_file():
            bad.append(f"{old_tc} is missing (the previous item tower cannot be checked)")
        elif new_tc.is_file():
            a, b = json.loads(old_tc.read_text()), json.loads(new_tc.read_text())
            bad += [f"text model {k}: {a.get(k)!r} (previous) vs {b.get(k)!r} ({text_model_dir})"
                    for k in _TEXT_ARCH_KEYS if a.get(k) != b.get(k)]
    if bad:
        raise WarmStartError(f"init_from {final_dir} is incompatible with this run's model: {'; '.join(bad)}. "
                             "Train from scratch (init_from=\"\") or use the previous run's model settings.")


@torch.no_grad()
def warm_start(model: SeqRecModel, final_dir: str | Path, item_ids: list[str], event_types: list[str] | None = None,
               text_model_dir: str | Path | None = None, items_sha256: str | None = None) -> dict:
    """Initialise ``model`` (freshly built for tonight's data) in place from a previous run's final/.

    - item-dependent tensors are mapped by item_id: ``item_emb`` rows and ``id_mask`` entries of items
      in both catalogues are copied (id_mask becomes max(tonight's seen flag, the previous flag): a
      trained id row stays in use even if the item had no event in tonight's training part); new items
      keep their fresh init; items gone from tonight's catalogue are dropped;
    - ``type_emb`` rows are mapped by event-type name (manifest ``event_types``);
    - every other tensor (user tower, projections, text encoder incl. LoRA base weights) is copied when
      its shape matches, else left fresh and listed under ``skipped``; LoRA adapters start fresh (B = 0,
      so the merged previous weights are reproduced exactly).
    Call it BEFORE precompute_text_features (the encoder weights may change) and after set_seen_items.
    Raises WarmStartError when the previous model is another architecture (d_model, tower, text model...).
    Returns a report: items_carried, items_new, items_dropped, tensors_copied, skipped, model_version."""
    from safetensors.torch import load_file

    p = Path(final_dir)
    info = _read_export_info(p, WarmStartError, WarmStartError, what="a final/ export (init_from)",
                             integrity_error=WarmStartError)
    old_cfg = RecModelConfig.from_dict(json.loads((p / "model_config.json").read_text()))
    new_cfg = model.cfg
    _check_compatible(old_cfg, new_cfg, p, text_model_dir)
    dm_file = p / "data_manifest.json"
    dm = json.loads(dm_file.read_text()) if dm_file.is_file() else {}
    old_sd = load_file(str(p / "model.safetensors"))

    # ---- item space: new item idx -> old item idx (-1 = new item)
    old_ids = final_item_ids(p, dm, old_cfg.num_items, item_ids, items_sha256)
    pos = {s: i for i, s in enumerate(old_ids)}
    new_to_old = np.fromiter((pos.get(str(s), -1) for s in item_ids), dtype=np.int64, count=len(item_ids))
    carried = np.flatnonzero(new_to_old >= 0)  # new indices
    src = torch.from_numpy(new_to_old[carried])
    dst = torch.from_numpy(carried)

    # ---- event types: new type idx -> old type idx by name
    old_types = list(dm.get("event_types") or [])
    new_types = list(event_types or [])

    sd = model.state_dict()
    copied, skipped = [], []
    handled = set()
    for k, t in sd.items():
        ok = _canonical_key(k)
        if ".lora_A." in k or ".lora_B." in k:
            skipped.append(f"{k} (LoRA adapter: starts fresh)")
            continue
        if k == "item_emb.weight" and ok in old_sd:
            o = old_sd[ok]
            if o.shape[1] != t.shape[1]:
                raise WarmStartError(f"init_from {p}: item_emb width {o.shape[1]} != {t.shape[1]}")
            t[dst] = o[src].to(t.dtype)
            t[-1] = o[-1].to(t.dtype)  # padding row
            handled.add(ok)
            copied.append(k)
            continue
        if k == "id_mask" and ok in old_sd:
            t[dst] = torch.maximum(t[dst], old_sd[ok][src].to(t.dtype))
            handled.add(ok)
            copied.append(k)
            continue
        if k == "type_emb.weight" and ok in old_sd and old_types and new_types:
            o = old_sd[ok]
            pairs = [(i, old_types.index(n)) for i, n in enumerate(new_types) if n in old_types and old_types.index(n) < o.size(0)]
            for i, j in pairs:
                if i < t.size(0):
                    t[i] = o[j].to(t.dtype)
            handled.add(ok)
            copied.append(k)
            continue
        if ok not in old_sd:
            skipped.append(f"{k} (not in the previous model)")
            continue
        o = old_sd[ok]
        handled.add(ok)
        if o.shape != t.shape:
            skipped.append(f"{k} (shape {tuple(o.shape)} -> {tuple(t.shape)})")
            continue
        t.copy_(o.to(t.dtype))
        copied.append(k)
    # the state_dict tensors share storage with the parameters/buffers, except for plain attributes
    # reassigned later; load them back explicitly so the copy is exact whatever the module does
    model.load_state_dict(sd, strict=True)
    unused = sorted(set(old_sd) - handled)
    return {
        "init_from": str(p),
        "model_version": info.get("model_version"),
        "data_version": dm.get("version"),
        "items_carried": int(len(carried)),
        "items_new": int(len(item_ids) - len(carried)),
        "items_dropped": int(len(old_ids) - len(carried)),
        "tensors_copied": len(copied),
        "tensors_total": len(sd),
        "skipped": skipped,
        "unused_previous": unused,
    }
