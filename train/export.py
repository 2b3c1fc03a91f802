"""The self-describing final export (docs/CONTRACTS.md section 3) and its loader.

    model, info = load_final("work/checkpoints/sample/final")   # CPU, eval mode
    prepare_item_tower(model, prepared.items)                     # text/hybrid: tokens + frozen features
    items = model.all_item_vectors(); users = model.user_vectors(hist, event_types)

The exported model is always an inference model: LoRA adapters are merged into the base weights
and the text tower is recorded as ``text_mode: "frozen"`` (the training mode is in export.json), so
inference needs no peft. Only the rank that holds the consolidated state dict calls export_final.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmrec_common.config import dump_yaml
from lmrec_common.manifest import base_manifest, sha256_file
from lmrec_common.publish import staged_dir
from train.model import RecModelConfig, SeqRecModel

KIND = "lmrec.model"
SCHEMA_VERSION = 1
ITEM_TOWER_DIR = "item_tower"


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
        d["text_mode"] = "frozen"
        d["gradient_checkpointing"] = False
    return RecModelConfig.from_dict(d)


def export_final(final_dir: str | Path, state_dict: dict[str, torch.Tensor], model_cfg: RecModelConfig,
                 text_model_dir: str | Path | None, train_cfg: Any, data_manifest: dict, metrics: dict,
                 extra: dict | None = None) -> dict:
    """Write final/ atomically (built under a hidden sibling, then renamed). Returns export.json."""
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

            AutoConfig.from_pretrained(str(text_model_dir), local_files_only=True).save_pretrained(str(tmp / ITEM_TOWER_DIR))
            try:
                AutoTokenizer.from_pretrained(str(text_model_dir), local_files_only=True).save_pretrained(str(tmp / ITEM_TOWER_DIR))
            except (OSError, ValueError):
                pass  # an item tower without tokenizer files: inference must use the prepared input_ids
        (tmp / "train_config.yaml").write_text(dump_yaml(train_cfg))
        (tmp / "data_manifest.json").write_text(json.dumps(data_manifest, indent=2, default=str) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        info = base_manifest(KIND, SCHEMA_VERSION)
        weights_sha = sha256_file(tmp / "model.safetensors")
        info.update({
            "model_version": weights_sha[:12],
            "weights_sha256": weights_sha,
            "trained_text_mode": model_cfg.text_mode if model_cfg.item_tower != "id" else None,
            "data_version": data_manifest.get("version"),
            "num_items": model_cfg.num_items,
            "item_tower": model_cfg.item_tower,
        })
        info.update(extra or {})
        (tmp / "export.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return info


def load_final(path: str | Path) -> tuple[SeqRecModel, dict]:
    """Rebuild the exported model on CPU in eval mode. info: export.json + model_config, metrics,
    data_manifest (dicts) and path."""
    p = Path(path)
    need = ["model.safetensors", "model_config.json", "export.json"]
    missing = [n for n in need if not (p / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{p} is not a final export (missing {missing})")
    info = json.loads((p / "export.json").read_text())
    if info.get("kind") != KIND or info.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{p}/export.json: kind {info.get('kind')!r} schema {info.get('schema_version')} is not "
                         f"{KIND!r} schema {SCHEMA_VERSION}")
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


def prepare_item_tower(model: SeqRecModel, items, batch_size: int | None = None, progress=None) -> None:
    """Register the catalogue's tokens (items table of the prepared folder; may hold items added
    after training: scored from text alone) and precompute the frozen text features."""
    if not model.uses_text:
        return
    from train.data import item_token_tensors

    ids, lens = item_token_tensors(items, model.cfg.pad_token_id)
    model.set_item_tokens(ids, lens)
    model.precompute_text_features(batch_size, progress=progress)
