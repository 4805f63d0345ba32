"""``diff --values`` in flat memory (issue 22): compared pieces of a mapped input are unmapped
as the comparison goes, so resident memory does not grow to the size of a tensor pair."""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ckpttool.ops.diff import diff
from ckpttool.ops.mapped import release as _release


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile line")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_release_unmaps_the_pages_of_a_compared_piece(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    size = 64 << 20
    path.write_bytes(np.arange(size // 4, dtype=np.uint32).tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        arr = np.frombuffer(mapped, np.uint32)
        before = _rss_file_kb()
        total = sum(int(p.sum(dtype=np.uint64)) for p in np.split(arr, 8))  # touch every page
        touched = _rss_file_kb()
        assert touched - before > 48 << 10  # KiB: the mapping is resident now
        for piece in np.split(arr, 8):
            _release(piece[1:])  # a view that does not start on a page boundary
        assert _rss_file_kb() < touched - (48 << 10)
        assert int(arr.sum(dtype=np.uint64)) == total  # the data is still there (page cache)
    finally:
        os.close(fd)


def test_release_ignores_memory_that_is_not_a_mapping() -> None:
    piece = np.arange(1 << 20, dtype=np.float64)
    _release(piece)
    _release(piece[::2])
    assert piece[-1] == (1 << 20) - 1


def test_values_of_big_tensors_still_compare_exactly(tmp_path: Path) -> None:
    a = {
        "w": torch.arange(3 << 20, dtype=torch.float32),
        "h": torch.ones(5, 7, dtype=torch.float16),
    }
    b = {"w": a["w"].clone(), "h": a["h"].clone()}
    b["w"][(3 << 20) - 2] += 1
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    result = diff(tmp_path / "a.pt", tmp_path / "b.pt", values=True)
    changed = {t.key: t for t in result.changed}
    assert list(changed) == ["w"]
    stats = changed["w"].stats
    assert stats is not None and stats.differing == 1 and stats.max_abs == 1.0
