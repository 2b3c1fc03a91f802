"""Imports follow the direction of data (DESIGN.md): lmrec_common <- data_prep <- train <- inference,
and the model file knows nothing of distribution, precision or logging frameworks (STYLE.md #3)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["lmrec_common", "data_prep", "train", "inference"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    mods: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
    return mods


def test_stages_import_only_earlier_stages():
    checked = 0
    for i, pkg in enumerate(ORDER):
        later = ORDER[i + 1:]
        for f in sorted((ROOT / pkg).rglob("*.py")):
            bad = [m for m in _imports(f) if m.split(".")[0] in later]
            assert not bad, f"{f.relative_to(ROOT)} imports later stage(s) {bad}"
            checked += 1
    assert checked >= 4


def test_model_file_imports_no_distributed_or_precision_framework():
    model = ROOT / "train" / "model.py"
    assert model.is_file(), "train/model.py holds the recommender module"
    forbidden = ("accelerate", "deepspeed", "torch.distributed", "torch.cuda.amp", "tensorboard", "wandb")
    bad = [m for m in _imports(model) if m.startswith(forbidden)]
    assert not bad, f"train/model.py imports {bad}"
