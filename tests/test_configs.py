"""Every YAML under configs/ loads into its stage's typed config (STYLE.md #10)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from lmrec_common.config import load_config

ROOT = Path(__file__).resolve().parent.parent
STAGES = {
    "data_prep": ("data_prep.config", "DataPrepConfig"),
    "train": ("train.config", "TrainConfig"),
    "inference": ("inference.config", "InferenceConfig"),
    "serve": ("inference.serve.config", "ServeConfig"),
}


def _yamls():
    out = []
    for stage in STAGES:
        out += sorted((ROOT / "configs" / stage).rglob("*.yaml"))
    return out


def test_configs_folders_hold_only_known_stages():
    assert sorted(p.name for p in (ROOT / "configs").iterdir() if p.is_dir()) == sorted(STAGES)


def test_every_yaml_loads():
    checked = 0
    for path in _yamls():
        stage = path.relative_to(ROOT / "configs").parts[0]
        mod, cls = STAGES[stage]
        cfg = load_config(getattr(importlib.import_module(mod), cls), path)
        assert cfg is not None
        checked += 1
    # one per stage at least; the number is printed so a silently empty walk is visible
    print(f"checked {checked} YAML configs")
    assert checked >= 3 and checked == len(_yamls())


@pytest.mark.parametrize("override, key", [
    ("max_steps=-1", "max_steps"), ("epochs=-2", "epochs"), ("eval_every=-1", "eval_every"),
    ("save_every=-5", "save_every"), ("log_every=0", "log_every"), ("seed=-1", "seed"), ("seed=4294967296", "seed"),
    ("keep_last=0", "keep_last"), ("eval_max_users=-1", "eval_max_users"), ("final_eval_max_users=-1", "final_eval_max_users"),
    ("num_workers=-1", "num_workers"),
    ("early_stopping_patience=-1", "early_stopping_patience"), ("stop_after_steps=-1", "stop_after_steps"),
    ("global_batch_size=-8", "global_batch_size"), ("max_train_wall_s=nan", "max_train_wall_s"),
    ("eval_every_epochs=inf", "eval_every_epochs"),
    ("model.n_heads=0", "model.n_heads"), ("model.d_model=0", "model.d_model"), ("model.n_layers=0", "model.n_layers"),
    ("model.max_len=0", "model.max_len"), ("model.text_batch_size=0", "model.text_batch_size"),
    ("model.lora_r=0", "model.lora_r"), ("model.lora_dropout=1.0", "model.lora_dropout"),
    ("model.temperature=inf", "model.temperature"),
    ("model.num_negatives=-1", "model.num_negatives"), ("model.popularity_alpha=-0.5", "model.popularity_alpha"),
    ("model.pool_heads=0", "model.pool_heads"), ("model.pool_rank=0", "model.pool_rank"),
    ("optim.lr=0", "optim.lr"), ("optim.eps=0", "optim.eps"), ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"), ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio"),
    ("optim.grad_clip=-1", "optim.grad_clip"), ("optim.text_lr=nan", "optim.text_lr"), ("optim.betas=[0.9,1.0]", "optim.betas"),
])
def test_train_config_out_of_range_names_the_key(override, key):
    """Values that used to run and produce garbage (max_steps=-1 exported an untrained model) or crash inside a
    library (n_heads=0: ZeroDivisionError) are refused at load, naming the key once (not model.model.x)."""
    from lmrec_common.config import ConfigError
    from train.config import TrainConfig

    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')} "):
        load_config(TrainConfig, None, [override])
