"""Atomic writes: a crash or a kill never leaves a half-written output where a reader would take it
for a whole one.

Files: write to a temporary sibling, fsync, ``os.replace``. Folders: build under a hidden temporary
sibling (``.tmp-<name>-<pid>-<rand>``), then swap into place with renames; the old folder, if any,
is moved aside first and deleted after the swap, so a reader sees the old folder, or the new one,
or (for the instant between two renames) none, never a mix.

Tables that readers list and then read while a rerun replaces them (the nightly ``recs/dt=<date>``): each
run is an immutable folder ``<root>/_runs/<name>/run=<run_id>/`` and ``<root>/<name>`` is a relative
symlink to the current one, replaced with one rename (``place_run`` + ``point_to``). A reader resolves the
link once (``resolve_table``) and reads that folder: it stays whole for ``grace_s`` after it was
replaced (``sweep_runs``, called by a later run, removes it after that).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
import time
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
            if p.is_dir() and not p.is_symlink():  # a symlink (a pointer of point_to) is unlinked, never followed
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ============================================================================ run folders behind a pointer
RUNS_DIR = "_runs"  # leading underscore: Spark, Hive, pyarrow.dataset and DuckDB's dt=* globs skip it
RUN_PREFIX = "run="


def run_dir(root: str | os.PathLike, name: str, run_id: str) -> Path:
    """``<root>/_runs/<name>/run=<run_id>``: where run ``run_id`` of table ``name`` lives once placed."""
    return Path(root) / RUNS_DIR / name / f"{RUN_PREFIX}{run_id}"


def place_run(stage: str | os.PathLike, root: str | os.PathLike, name: str, run_id: str) -> Path:
    """Rename the finished staging folder (same filesystem as ``root``) to its run folder and return it. Nothing
    points at it yet: readers still get the previous run until ``point_to``."""
    dest = run_dir(root, name, run_id)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(stage, dest)  # a fresh run_id: dest does not exist
    _fsync_dir(dest.parent)
    return dest


def _exchange(a: Path, b: Path) -> bool:
    """renameat2(RENAME_EXCHANGE): swap two names atomically (Linux >= 3.15 on ext4, xfs, btrfs, tmpfs). False
    where the system or the filesystem (NFS) cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def point_to(root: str | os.PathLike, name: str, dest: str | os.PathLike) -> Path:
    """Make ``<root>/<name>`` the relative symlink to run folder ``dest``, atomically: a new link made beside it
    replaces the old one with one rename, so every reader resolves to the old run or the new one, never
    to nothing. The run folder the link leaves gets its mtime set to now (its grace period starts; sweep_runs).
    Also the way to roll back by hand: ``point_to("recs", "dt=D", "recs/_runs/dt=D/run=<id>")``. A real folder there (a table of the layout before run folders) is swapped for the link in one
    step too (RENAME_EXCHANGE; where the filesystem has none, two renames, and a kill between them leaves
    it under ``.old-<name>-*``, which ``recover_table`` puts back) and then kept under ``_runs/<name>/`` like
    any replaced run. Returns ``<root>/<name>``."""
    root = Path(root)
    link = root / name
    target = os.path.relpath(dest, root)
    tmp = root / f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}"
    os.symlink(target, tmp)
    try:
        if link.is_symlink() or not link.exists():
            prev = Path(os.path.realpath(link)) if link.is_symlink() else None
            if prev is not None and prev.is_dir() and prev != Path(os.path.realpath(dest)):
                os.utime(prev)  # its mtime = when it stopped being current (set first: a kill here only keeps it longer)
            os.replace(tmp, link)  # rename(2) over a symlink: atomic
        else:  # a real folder: the old layout's table
            legacy = run_dir(root, name, _legacy_run_id(link))
            legacy.parent.mkdir(parents=True, exist_ok=True)
            os.utime(link)
            if _exchange(tmp, link):
                os.rename(tmp, legacy)  # tmp is now the old folder
            else:
                old = root / f".old-{name}-{os.getpid()}-{secrets.token_hex(4)}"
                os.rename(link, old)
                os.replace(tmp, link)
                os.rename(old, legacy)
    finally:
        if tmp.is_symlink():
            tmp.unlink()
    _fsync_dir(root)
    return link


def _legacy_run_id(folder: Path) -> str:
    try:
        rid = str(json.loads((folder / "_manifest.json").read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        rid = ""
    ok = rid and all(c.isalnum() or c in "-_.T" for c in rid)
    return f"legacy-{rid if ok else secrets.token_hex(4)}"


def resolve_table(path: str | os.PathLike) -> Path:
    """What a reader does first: resolve ``<root>/<name>`` once to the folder of the current run (a table of the
    old layout, a real folder, resolves to itself) and check its ``_SUCCESS``. Read that folder, not the link:
    it is never changed, and stays for the grace period after a rerun replaces it. FileNotFoundError when there
    is no published table."""
    d = Path(os.path.realpath(path))
    if not (d / "_SUCCESS").is_file():
        raise FileNotFoundError(f"no published table at {path} (no _SUCCESS in {d})")
    return d


def recover_table(root: str | os.PathLike, name: str) -> list[str]:
    """Before a run (holding the table's lock): when a kill between the two renames of an old-layout swap left no
    table and the old folder under ``.old-<name>-*``, put it back; then remove leftovers of killed runs."""
    root = Path(root)
    notes = []
    final = root / name
    if not final.exists() and not final.is_symlink():
        olds = sorted((p for p in root.glob(f".old-{name}-*") if (p / "_SUCCESS").is_file()), key=lambda p: p.stat().st_mtime)
        if olds:
            os.replace(olds[-1], final)
            notes.append(f"restored {olds[-1].name} -> {name}")
    for p in clean_stale_temps(root, name):
        notes.append(f"removed stale {p.name}")
    return notes


def _mtime(p: Path) -> float | None:
    try:
        return p.stat().st_mtime
    except OSError:
        return None


def sweep_runs(root: str | os.PathLike, name: str, grace_s: float, now: float | None = None) -> list[Path]:
    """Remove the run folders of table ``name`` that are not current and have not been for ``grace_s`` seconds;
    the caller holds the table's lock. A run folder's own mtime is when point_to moved the link away from it
    (or when it was placed, for one never pointed at), its ``_SUCCESS`` when it was published: it goes once the
    later of the two is ``grace_s`` old. Returns what was removed."""
    root = Path(root)
    runs = root / RUNS_DIR / name
    if not runs.is_dir():
        return []
    now = time.time() if now is None else now
    link = root / name
    cur = Path(os.path.realpath(link)) if link.is_symlink() else None
    removed = []
    for p in sorted(runs.iterdir()):
        if not p.name.startswith(RUN_PREFIX) or (cur is not None and p.resolve() == cur):
            continue
        times = [t for t in (_mtime(p / "_SUCCESS"), _mtime(p)) if t is not None]
        if times and now - max(times) >= grace_s:
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(p)
    if not link.is_symlink() and not link.exists():
        with contextlib.suppress(OSError):
            runs.rmdir()  # nothing left of a table nobody points at
    return removed
