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
