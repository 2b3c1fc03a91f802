"""Manifests: what a stage read, how it was configured, what it wrote, and by which code.

Every stage writes ``manifest.json`` beside its output (DESIGN.md); these helpers give the common
fields (schema version, code version, time, host) and file fingerprints."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

from lmrec_common import __version__


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_strings(items) -> str:
    """Order-sensitive hash of a sequence of strings (vocabularies)."""
    h = hashlib.sha256()
    for s in items:
        b = str(s).encode("utf-8", "surrogateescape")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def git_commit(root: str | os.PathLike | None = None) -> str | None:
    """The checkout's commit, 12 hex digits, with ``-dirty`` when a tracked file differs from it; None outside a git
    checkout or without git. ``root`` defaults to lmrec's own checkout."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=30)
        if sha.returncode != 0 or not sha.stdout.strip():
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


_CODE_VERSION: str | None = None


def code_version() -> str:
    """Package version plus the git commit when run from a checkout (``0.1.0+g1a2b3c4d5e6f[-dirty]``)."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        commit = git_commit()
        _CODE_VERSION = __version__ + (f"+g{commit}" if commit else "")
    return _CODE_VERSION


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def base_manifest(kind: str, schema_version: int) -> dict[str, Any]:
    return {
        "kind": kind,
        "schema_version": schema_version,
        "code_version": code_version(),
        "created_at": now_iso(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
    }


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    if not p.is_file():
        raise FileNotFoundError(f"no manifest at {p}")
    with open(p, encoding="utf-8") as f:
        return json.load(f)
