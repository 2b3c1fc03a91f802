"""Resident pages of memory-mapped Arrow files.

The prepared data is read memory-mapped (``datasets.load_from_disk``): a full-column scan at startup (range checks,
item counts, the examples' offsets) touches every page of the columns it reads, and those pages then count in the
process's resident set for as long as the mapping lives, although the training loop afterwards reads only the few
users of each batch. At 5M users that was ~600 MiB per rank of file-backed RSS (docs/SCALE.md), growing with the
data. ``release_mapped_pages`` tells the kernel this process no longer needs them (``madvise(MADV_DONTNEED)`` on the
read-only file mappings of the given files): the pages stay in the page cache, the mapping stays valid, and a later
read faults the page back in from the file. Only read-only mappings of the named files are touched, never anonymous
or writable memory (where MADV_DONTNEED would discard data). Linux only; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from pathlib import Path

MADV_DONTNEED = 4  # linux/mman-common.h


@functools.cache
def _libc():
    name = ctypes.util.find_library("c") or "libc.so.6"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    lib.madvise.restype = ctypes.c_int
    return lib


def read_only_mappings(paths) -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's read-only mappings of the files ``paths`` (from /proc/self/maps)."""
    want = {os.path.realpath(str(p)) for p in paths}
    out = []
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or "w" in parts[1]:
            continue
        path = parts[5].strip()
        if path.endswith(" (deleted)") or path not in want:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        out.append((start, end, path))
    return out


def release_mapped_pages(paths) -> int:
    """Drop this process's resident pages of the read-only mappings of ``paths``; returns the bytes of mappings
    advised (0 off Linux or when none is mapped). Safe to call at any time: the data stays readable."""
    if not sys.platform.startswith("linux"):
        return 0
    maps = read_only_mappings(paths)
    if not maps:
        return 0
    lib = _libc()
    done = 0
    for start, end, _ in maps:  # /proc/self/maps ranges are page-aligned
        if lib.madvise(ctypes.c_void_p(start), end - start, MADV_DONTNEED) == 0:
            done += end - start
    return done


def dataset_files(*datasets) -> list[str]:
    """The Arrow files behind Hugging Face datasets (``Dataset.cache_files``; in-memory datasets have none)."""
    return [f["filename"] for ds in datasets if ds is not None for f in getattr(ds, "cache_files", None) or []]
