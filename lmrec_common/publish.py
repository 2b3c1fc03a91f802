"""Atomic writes: a crash or a kill never leaves a half-written output where a reader would take it
for a whole one.

Files: write to a temporary sibling, fsync, ``os.replace``. Folders: build under a hidden temporary
sibling (``.tmp-<name>-<pid>-<rand>``), then swap into place with renames; the old folder, if any,
is moved aside first and deleted after the swap, so a reader sees the old folder, or the new one,
or (for the instant between two renames) none, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def temp_sibling(final: str | os.PathLike, tag: str = "tmp") -> Path:
    """A fresh hidden folder next to ``final`` (same filesystem, so the final rename is atomic)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{tag}-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the finished folder ``tmp`` to ``final``, replacing an existing ``final`` whole."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, tag: str = "tmp") -> Iterator[Path]:
    """``with staged_dir(out) as tmp: write into tmp`` -> published to ``out`` only on success."""
    tmp = temp_sibling(final, tag)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, final)


def clean_stale_temps(parent: str | os.PathLike, name: str) -> list[Path]:
    """Remove leftovers of killed runs (``.tmp-<name>-*``/``.old-<name>-*``) under ``parent``."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        if p.name.startswith((f".tmp-{name}-", f".old-{name}-", f".stage-{name}-")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed
