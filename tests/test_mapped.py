"""lmrec_common/mapped.py: the resident pages a full scan of a memory-mapped prepared shard leaves behind are
released, and the data reads the same afterwards (Linux: /proc/self/smaps tells the resident size per mapping)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from lmrec_common.mapped import dataset_files, read_only_mappings, release_mapped_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux's")


def _resident_kib(path: str) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's header line
            inside = len(head) == 6 and head[5].strip() == path
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_release_drops_the_pages_a_scan_touched_and_the_data_stays_readable(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    lists = [rng.integers(0, 1000, size=int(n)).astype(np.int32).tolist() for n in rng.integers(1, 60, size=40_000)]
    datasets.Dataset.from_dict({"item_idx": lists}).save_to_disk(str(tmp_path / "seq"))
    ds = datasets.load_from_disk(str(tmp_path / "seq"))
    files = dataset_files(ds)
    assert files and all(Path(f).is_file() for f in files)
    col = ds.data.table.column("item_idx")
    before = int(sum(np.asarray(c.values).astype(np.int64).sum() for c in col.chunks))  # a full scan: every page touched
    path = str(Path(files[0]).resolve())
    assert read_only_mappings(files), "load_from_disk memory-maps the Arrow file"
    touched = _resident_kib(path)
    assert touched >= 3000  # ~1M int32 values
    advised = release_mapped_pages(files)
    assert advised >= touched * 1024
    assert _resident_kib(path) < touched / 10
    after = int(sum(np.asarray(c.values).astype(np.int64).sum() for c in col.chunks))  # the same views, read again
    assert after == before
    assert _resident_kib(path) >= touched * 0.9  # faulted back in from the file


def test_nothing_but_read_only_mappings_of_the_named_files_is_touched(tmp_path):
    anon = np.arange(1_000_000, dtype=np.int64)  # anonymous memory: MADV_DONTNEED would zero it
    other = tmp_path / "not_mapped.arrow"
    other.write_bytes(b"x" * 4096)
    assert read_only_mappings([other]) == []
    assert release_mapped_pages([other]) == 0
    assert release_mapped_pages([]) == 0
    assert int(anon.sum()) == 999_999 * 1_000_000 // 2
    assert dataset_files(None) == []


def test_scattered_window_reads_release_their_pages_as_they_go(tmp_path, monkeypatch):
    """Training reads a few users' windows per batch at random positions of the mapped shards: FlatValues counts
    each scattered read as the kernel's fault-around and releases every RELEASE_BYTES, so many batches of random
    reads leave a bounded resident set instead of the whole file, and every gathered value is right."""
    import datasets

    import train.data
    from train.data import FAULT_AROUND, flat_list_column, latest_windows

    budget = 2 << 20
    monkeypatch.setattr(train.data, "RELEASE_BYTES", budget)  # the 64 MiB default, scaled to a test-sized file
    rng = np.random.default_rng(1)
    n_users = 200_000
    lens = rng.integers(1, 40, size=n_users)
    lists = [rng.integers(0, 50_000, size=int(n)).astype(np.int32).tolist() for n in lens]
    datasets.Dataset.from_dict({"item_idx": lists}).save_to_disk(str(tmp_path / "seq"))
    ds = datasets.load_from_disk(str(tmp_path / "seq"))
    vals, offs = flat_list_column(ds, "item_idx")
    path = str(Path(dataset_files(ds)[0]).resolve())
    size_kib = Path(path).stat().st_size // 1024
    assert size_kib > 8 * budget // 1024  # a file several release budgets large
    peak = 0
    for _ in range(300):  # 300 batches of 128 random users: together they touch most of the file
        users = rng.integers(0, n_users, size=128)
        starts, ends = offs[users], offs[users + 1] - offs[users]
        n, (win,) = latest_windows(starts, ends, 20, (vals, -1))
        for i in (0, 63, 127):  # spot-check against the lists
            want = lists[users[i]][-20:]
            assert win[i, 20 - len(want):].tolist() == want and int(n[i]) == len(want)
        peak = max(peak, _resident_kib(path))
    # bounded by the release budget plus the pages of the batch in flight, not by the file
    assert peak <= (budget + 128 * FAULT_AROUND) // 1024 + 1024 < size_kib / 2
