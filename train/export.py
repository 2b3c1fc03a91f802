"""The self-describing final export (docs/CONTRACTS.md section 3) and its loader.

    model, info = load_final("work/checkpoints/sample/final")   # CPU, eval mode; weights only
    cat = Catalogue.from_items(prepared.items, model)             # train/catalogue.py: the items (tokens ...)
    cat.prepare(model)                                            # text/hybrid: the frozen features
    items = cat.item_vectors(model); users = model.user_vectors(hist, event_types, item_table=items)
    (inference maps tonight's catalogue onto the final's item space with Catalogue.for_tonight)

final/ opens with the standard tools: ``item_tower/`` is a Hugging Face model folder (config, weights,
tokenizer), so ``transformers.AutoModel.from_pretrained("final/item_tower")`` gives the trained text
encoder; a LoRA run also writes its adapter in peft's format to ``item_tower_lora/`` (the merged
weights in item_tower/ are peft's own merge of it). model.safetensors holds the rest of the recommender
(the text encoder's weights are stored once, in item_tower/); exports written before item_tower/ held
weights carry the encoder in model.safetensors and still load.

The exported model is always an inference model: LoRA adapters are merged into the base weights
and the text tower is recorded as ``text_mode: "frozen"`` (the training mode is in export.json), so
inference needs no peft. Only the rank that holds the consolidated state dict calls export_final.
export.json records the sha256 of every other file of final/ (``files_sha256``); load_final and warm_start
verify them first and refuse a folder whose files differ, are missing or were added (ExportIntegrityError,
naming the file). Exports written before ``files_sha256`` are checked against their ``weights_sha256``.
``item_ids.parquet`` (one ``item_id`` string per model item, row i = model item i) is required: it lets the
next stages map tonight's catalogue onto the model's item space by id (inference, warm start).

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
from train.catalogue import map_ids
from train.model import RecModelConfig, SeqRecModel

KIND = "lmrec.model"
SCHEMA_VERSION = 1
ITEM_TOWER_DIR = "item_tower"
LORA_ADAPTER_DIR = "item_tower_lora"  # peft adapter of a LoRA run (adapter_config.json + adapter_model.safetensors)
TEXT_PREFIX = "text_encoder."  # the recommender's keys of the item tower's encoder
ITEM_IDS_FILE = "item_ids.parquet"
EXPORT_FILE = "export.json"


class ExportIntegrityError(ValueError):
    """A final/ whose files are not those its export.json records (damaged, modified, missing or added), or
    that lacks item_ids.parquet (exports from before the item ids existed)."""


def inference_model_config(cfg: RecModelConfig) -> RecModelConfig:
    d = cfg.to_dict()
    if cfg.item_tower != "id":
        d["text_model_path"] = ITEM_TOWER_DIR  # relative to final/
        d["text_mode"] = "pool" if cfg.text_mode == "pool" else "frozen"  # pool keeps its learned pooling
        d["gradient_checkpointing"] = False
    return RecModelConfig.from_dict(d)


def export_final(final_dir: str | Path, state_dict: dict[str, torch.Tensor], model_cfg: RecModelConfig,
                 text_model_dir: str | Path | None, train_cfg: Any, data_manifest: dict, metrics: dict,
                 extra: dict | None = None, *, item_ids: list[str]) -> dict:
    """Write final/ atomically (built under a hidden sibling, then renamed). Returns export.json.
    ``item_ids``: the item_id strings of the training catalogue in item_idx order (-> item_ids.parquet).
    ``text_model_dir``: the local folder of the text model the run started from (text/hybrid towers: its
    architecture, tokenizer and the weights the state dict does not hold, e.g. BERT's unused pooler)."""
    if item_ids is None or len(item_ids) != model_cfg.num_items:
        raise ValueError(f"export_final: {None if item_ids is None else len(item_ids)} item ids for a model with "
                         f"num_items={model_cfg.num_items} (item_ids.parquet is required)")
    has_text = model_cfg.item_tower != "id"
    if has_text and text_model_dir is None:
        raise ValueError("export_final: a text/hybrid model needs text_model_dir (the item tower's architecture and tokenizer)")
    sd = {k: v.detach().to("cpu") for k, v in state_dict.items()}
    enc_sd = {k[len(TEXT_PREFIX):]: sd.pop(k) for k in [k for k in sd if k.startswith(TEXT_PREFIX)]}
    sd = {k: _fp32(v) for k, v in sd.items()}
    inf_cfg = inference_model_config(model_cfg)
    lora_base = str(text_model_dir)
    warm = (extra or {}).get("warm_start") or {}
    if warm.get("init_from"):  # warm start copied the previous final's merged encoder into the LoRA base weights
        lora_base = str(Path(warm["init_from"]) / ITEM_TOWER_DIR)
    with staged_dir(final_dir) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "model_config.json").write_text(json.dumps(inf_cfg.to_dict(), indent=2) + "\n")
        if has_text:
            _save_item_tower(tmp, enc_sd, model_cfg, text_model_dir, lora_base)
        (tmp / "train_config.yaml").write_text(dump_yaml(train_cfg))
        (tmp / "data_manifest.json").write_text(json.dumps(data_manifest, indent=2, default=str) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"item_id": pa.array([str(x) for x in item_ids], pa.string())}), str(tmp / ITEM_IDS_FILE))
        info = base_manifest(KIND, SCHEMA_VERSION)
        files_sha = {f: sha256_file(tmp / f) for f in _export_files(tmp)}  # every file but export.json
        weights_sha = files_sha["model.safetensors"]
        info.update({
            "model_version": _model_version(files_sha),
            "weights_sha256": weights_sha,
            "files_sha256": files_sha,
            "trained_text_mode": model_cfg.text_mode if has_text else None,
            "data_version": data_manifest.get("version"),
            "num_items": model_cfg.num_items,
            "item_tower": model_cfg.item_tower,
        })
        info.update(extra or {})
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return info


def _fp32(v: torch.Tensor) -> torch.Tensor:
    return (v.float() if v.is_floating_point() else v).contiguous()


def _model_version(files_sha: dict[str, str]) -> str:
    """Short hash of the weights: model.safetensors' sha256, and with an item tower the sha256 of
    model.safetensors and item_tower/'s weight files together (both hold trained weights)."""
    tower = sorted(f for f in files_sha if f.startswith(ITEM_TOWER_DIR + "/") and f.endswith(".safetensors"))
    if not tower:
        return files_sha["model.safetensors"][:12]
    return sha256_strings(f"{f}:{files_sha[f]}" for f in ["model.safetensors", *tower])[:12]


def _load_exact(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    res = module.load_state_dict(sd, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise ValueError(f"export_final: the state dict's {what} does not match its architecture: missing "
                         f"{res.missing_keys[:5]}, unexpected {res.unexpected_keys[:5]}")


def _save_item_tower(dest: Path, enc_sd: dict[str, torch.Tensor], cfg: RecModelConfig, text_model_dir: str | Path,
                     lora_base: str) -> None:
    """final/item_tower/: the trained encoder as a Hugging Face model folder (config, fp32 weights, tokenizer).
    A LoRA encoder is rebuilt as in training (peft on the text model), given the trained weights, saved as
    a peft adapter in final/item_tower_lora/ (base_model_name_or_path = ``lora_base``) and merged by peft.
    Modules the recommender drops (BERT's pooler, unused) keep the text model's weights, so the folder is
    a whole model: AutoModel.from_pretrained loads it without fresh initialisation."""
    from transformers import AutoModel, AutoTokenizer

    from lmrec_common.models import check_no_remote_code, quiet_hf_progress

    src = str(text_model_dir)
    check_no_remote_code(src)
    with quiet_hf_progress():
        enc = AutoModel.from_pretrained(src, local_files_only=True, trust_remote_code=False).float()
    pooler = getattr(enc, "pooler", None)
    if pooler is not None:
        enc.pooler = None  # as train.model.load_text_encoder builds it
    if cfg.text_mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = list(cfg.lora_target_modules)
        peft_model = get_peft_model(enc, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                    target_modules=targets, bias="none"))
        _load_exact(peft_model, enc_sd, "LoRA text encoder")
        conf = peft_model.peft_config["default"]
        conf.base_model_name_or_path = lora_base
        if pooler is not None:  # trained without a pooler: a base that has one gets no adapter there
            conf.exclude_modules = [f"pooler.{n}" for n, _ in pooler.named_modules() if n and n.split(".")[-1] in targets] or None
        peft_model.save_pretrained(str(dest / LORA_ADAPTER_DIR))
        enc = peft_model.merge_and_unload()
    else:
        _load_exact(enc, enc_sd, "text encoder")
    if pooler is not None:
        enc.pooler = pooler
    with quiet_hf_progress():
        enc.save_pretrained(str(dest / ITEM_TOWER_DIR))
    try:
        AutoTokenizer.from_pretrained(src, local_files_only=True, trust_remote_code=False).save_pretrained(str(dest / ITEM_TOWER_DIR))
    except (OSError, ValueError):
        pass  # an item tower without tokenizer files: inference must use the prepared input_ids


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
    if not (p / ITEM_IDS_FILE).is_file() and ITEM_IDS_FILE not in (info.get("files_sha256") or {}):
        # (listed but gone: verify_export reports the damage)
        raise integrity_error(f"{p / ITEM_IDS_FILE}: missing: this export has no item ids (row i = model item i), which "
                              "lmrec requires; train it again with this code version, which writes them")
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
    sd = load_file(str(p / "model.safetensors"))
    # exports before item_tower/ held weights keep the encoder in model.safetensors
    tower_weights = text_dir is not None and not any(k.startswith(TEXT_PREFIX) for k in sd)
    model = SeqRecModel(cfg, text_model_path=str(text_dir) if text_dir else None, load_text_weights=tower_weights)
    res = model.load_state_dict(sd, strict=False)
    missing = [k for k in res.missing_keys if not (tower_weights and k.startswith(TEXT_PREFIX))]
    if missing or res.unexpected_keys:
        raise ValueError(f"{p}/model.safetensors does not match model_config.json: missing {missing[:5]}, "
                         f"unexpected {res.unexpected_keys[:5]}")
    model.eval()
    for name in ("metrics", "data_manifest"):
        f = p / f"{name}.json"
        info[name] = json.loads(f.read_text()) if f.is_file() else {}
    info["model_config"] = cfg.to_dict()
    info["path"] = str(p)
    return model, info


# ================================================================================================ warm start
class WarmStartError(ValueError):
    """init_from names something that cannot initialise this model (not a final/, incompatible config)."""


# RecModelConfig fields that must agree between the previous final and tonight's model: they decide
# what every copied tensor means (a d_model or tower change is a new model, not a warm start)
# (text_whiten: the text adaptor's input is the whitened coordinates or the encoder's raw output; weights learned on one
# would be copied onto the other when the widths agree)
_MUST_MATCH = ("item_tower", "d_model", "n_layers", "n_heads", "pooling", "normalize", "text_whiten")
# HF config fields of the item tower that decide the encoder's weights' meaning
_TEXT_ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "vocab_size", "max_position_embeddings", "hidden_act", "type_vocab_size")


def final_item_ids(final_dir: str | Path, num_items: int) -> list[str]:
    """The item_id strings of a final's item space (row i = model item i), from its ``item_ids.parquet``."""
    p = Path(final_dir)
    f = p / ITEM_IDS_FILE
    if not f.is_file():
        raise WarmStartError(f"{f}: missing: a final export holds its model's item ids; train it again with this code version")
    import pyarrow.parquet as pq

    ids = [str(x) for x in pq.read_table(str(f), columns=["item_id"]).column("item_id").to_pylist()]
    if len(ids) != num_items:
        raise WarmStartError(f"{f}: {len(ids)} item ids, but {p}/model_config.json has num_items={num_items}")
    return ids


def _previous_state_dict(p: Path, cfg: RecModelConfig) -> dict[str, torch.Tensor]:
    """A final's whole recommender state dict: model.safetensors plus the encoder of item_tower/ (TEXT_PREFIX keys)."""
    sd = load_file(str(p / "model.safetensors"))
    if cfg.item_tower != "id" and not any(k.startswith(TEXT_PREFIX) for k in sd):
        from train.model import load_text_encoder

        sd.update({TEXT_PREFIX + k: v for k, v in load_text_encoder(str(p / ITEM_TOWER_DIR)).state_dict().items()})
    return sd


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
               text_model_dir: str | Path | None = None) -> dict:
    """Initialise ``model`` (freshly built for tonight's data) in place from a previous run's final/.

    - item-dependent tensors are mapped by item_id: ``item_emb`` rows and ``id_mask`` entries of items
      in both catalogues are copied (id_mask becomes max(tonight's seen flag, the previous flag): a
      trained id row stays in use even if the item had no event in tonight's training part); new items
      keep their fresh init; items gone from tonight's catalogue are dropped;
    - ``type_emb`` rows are mapped by event-type name (manifest ``event_types``);
    - every other tensor (user tower, projections, text encoder incl. LoRA base weights) is copied when
      its shape matches, else left fresh and listed under ``skipped``; LoRA adapters start fresh (B = 0,
      so the merged previous weights are reproduced exactly).
    Call it BEFORE Catalogue.prepare (the encoder weights may change) and after set_seen_items.
    Raises WarmStartError when the previous model is another architecture (d_model, tower, text model...).
    Returns a report: items_carried, items_new, items_dropped, tensors_copied, skipped, model_version."""
    p = Path(final_dir)
    info = _read_export_info(p, WarmStartError, WarmStartError, what="a final/ export (init_from)",
                             integrity_error=WarmStartError)
    old_cfg = RecModelConfig.from_dict(json.loads((p / "model_config.json").read_text()))
    new_cfg = model.cfg
    _check_compatible(old_cfg, new_cfg, p, text_model_dir)
    dm_file = p / "data_manifest.json"
    dm = json.loads(dm_file.read_text()) if dm_file.is_file() else {}
    old_sd = _previous_state_dict(p, old_cfg)

    # ---- item space: new item idx -> old item idx (-1 = new item)
    old_ids = final_item_ids(p, old_cfg.num_items)
    new_to_old = map_ids([str(s) for s in item_ids], old_ids)
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
