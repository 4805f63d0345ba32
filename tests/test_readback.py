"""The writers' read-back checks (copy.read_back, consolidate's segment check) find a changed
byte on every path: the input's recorded CRC-32, a byte comparison (small ranges), CRC-32s of
both sides (big ranges) and a consolidated segment without a recorded CRC-32."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest

from ckpttool.ops.logical_write import _read_segment
from ckpttool.readers.distributed import Segment
from ckpttool.writers import copy as bytecopy


def _pair(tmp_path: Path, n: int, flip: int | None) -> tuple[int, int, bytes]:
    data = bytearray(os.urandom(n))
    (tmp_path / "src").write_bytes(b"x" * 100 + data)
    if flip is not None:
        data[flip] ^= 0x10
    (tmp_path / "dst").write_bytes(b"y" * 7 + data)
    return os.open(tmp_path / "src", os.O_RDONLY), os.open(tmp_path / "dst", os.O_RDONLY), data


@pytest.mark.parametrize("n", [1000, 3 << 20])  # a byte comparison, then CRC-32s of both
def test_read_back_without_a_recorded_crc(tmp_path: Path, n: int) -> None:
    src, dst, data = _pair(tmp_path, n, None)
    assert bytecopy.read_back(dst, 7, n, src, 100, None) == zlib.crc32(data)
    os.close(src)
    os.close(dst)
    flip = n - 3
    src, dst, _ = _pair(tmp_path, n, flip)
    with pytest.raises(bytecopy.CopyMismatch, match=f"at byte {flip}$"):
        bytecopy.read_back(dst, 7, n, src, 100, None)
    os.close(src)
    os.close(dst)


def test_read_back_against_the_recorded_crc(tmp_path: Path) -> None:
    src, dst, data = _pair(tmp_path, 5000, None)
    good = zlib.crc32(data)
    assert bytecopy.read_back(dst, 7, 5000, src, 100, good) == good
    with pytest.raises(bytecopy.CopyMismatch, match="CRC-32 recorded"):
        bytecopy.read_back(dst, 7, 5000, src, 100, good ^ 1)
    os.close(src)
    os.close(dst)


@pytest.mark.parametrize("n", [1000, 3 << 20])
def test_consolidated_segment_without_a_crc_is_compared_with_its_shard(
    tmp_path: Path, n: int
) -> None:
    src, dst, data = _pair(tmp_path, n, None)
    sources = bytecopy.Sources()
    sources.fds[str(tmp_path / "src")] = src
    seg = Segment(str(tmp_path / "src"), 100, n, 0)
    assert _read_segment(dst, 7, seg, sources, bytearray(1 << 16), 0) == zlib.crc32(data)
    os.close(dst)
    src2, dst, _ = _pair(tmp_path, n, 17)
    os.close(src2)
    with pytest.raises(bytecopy.CopyMismatch, match=r"at byte 17$"):
        _read_segment(dst, 7, seg, sources, bytearray(1 << 16), 0)
    os.close(dst)
    sources.close()
