"""Exclusive locks on the data_prep output folder (one run per output_dir) and on the forget ledger.

    with output_dir_lock(out_dir):      # refuses at once when another data_prep run holds it
        ...

A ``flock`` on a small file that stays in place (``output_dir/.lock``, ``output_dir/forget/.lock``), as inference
locks ``recs/.lock-dt=<date>``: the kernel releases it when the holder dies, so a kill -9 never leaves a stale lock,
and the file is never deleted (deleting a lock file lets a third process lock a fresh file while a second one
still holds the old one).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from data_prep.schema import DataPrepError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: str, wait: bool = False) -> Iterator[Path]:
    """Hold an exclusive flock on ``path`` (created if missing) for the ``with`` block. ``wait=False``: raise
    DataPrepError(``busy``) at once when another process holds it; ``wait=True``: block until it is free."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise DataPrepError(busy) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person looking (the lock is the flock)
        except OSError:
            pass
        yield path
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def output_dir_lock(out_dir: Path) -> contextlib.AbstractContextManager[Path]:
    """One data_prep run per output_dir: a second concurrent run stops before reading anything."""
    p = out_dir / LOCK_FILE
    return exclusive_lock(p, f"another data_prep run holds {p} (same output_dir); wait for it to finish or kill it, "
                             "then run again")
