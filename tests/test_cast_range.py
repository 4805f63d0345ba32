"""Casts spread over the cores (issue 22, ``writers/cast_range.py``): the bytes are torch's,
the CRC-32 is the bytes', a failure in any thread reaches the caller with every thread stopped,
and both writers take this path for a plain cast (and give torch's values through it)."""

from __future__ import annotations

import os
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ckpttool
from ckpttool.writers import cast_range as cr
from ckpttool.writers.crc import crc32_combine

N = 3 * (cr.PIECE // 4) + 1234  # float32 elements: three whole pieces and a short one
HEAD = 4096 + 12  # bytes before the range in the input file (an unaligned start)


def _values(n: int) -> torch.Tensor:
    """Every kind of float32: normals, float16 subnormals and ties, zeros, inf, NaN."""
    i = torch.arange(n, dtype=torch.int64)
    x = ((i * 2654435761 + 7) % (1 << 32)).to(torch.int32).view(torch.float32).clone()
    x[::97] = 0.0
    x[5::1009] = float("inf")
    x[11::13] *= 2.0**-100  # many float16 subnormals and underflows
    return x


_INT = {2: (torch.int16, np.uint16), 4: (torch.int32, np.uint32)}
_NAN_ABOVE = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80, torch.float32: 0x7F800000}


def _bits(t: torch.Tensor) -> np.ndarray:
    signed, unsigned = _INT[t.element_size()]
    return t.contiguous().view(signed).numpy().view(unsigned)


def _same_as_torch(got: np.ndarray, want: torch.Tensor) -> None:
    """Bit for bit, NaN-ness only for NaNs (their payload: tests/test_numeric.py)."""
    w = _bits(want)
    mag = np.uint32(0x7FFFFFFF) if w.itemsize == 4 else np.uint16(0x7FFF)
    nan = (w & mag) > _NAN_ABOVE[want.dtype]
    assert np.array_equal((got & mag) > _NAN_ABOVE[want.dtype], nan)
    assert np.array_equal(got[~nan], w[~nan])


@pytest.fixture(params=[1, 2, 3])
def threads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(cr, "workers", lambda: request.param)
    return int(request.param)


PAIRS = [
    ("float32", "float16"),
    ("float32", "bfloat16"),
    ("bfloat16", "float32"),  # a kernel of its own
    ("float16", "float32"),  # the others: a table of every pattern
    ("float16", "bfloat16"),
    ("float8_e4m3fn", "bfloat16"),
]


@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_cast_range_is_torchs_cast_with_its_crc(
    tmp_path: Path, threads: int, src: str, dst: str
) -> None:
    x = _values(N).to(getattr(torch, src))
    size = x.element_size()
    path = tmp_path / "in.bin"
    path.write_bytes(b"h" * HEAD + x.view(torch.uint8).numpy().tobytes() + b"tail")
    seen: list[int] = []
    out_item = torch.empty((), dtype=getattr(torch, dst)).element_size()
    with open(path, "rb") as fin, open(tmp_path / "out.bin", "w+b") as fout:
        fout.write(b"0123")
        got_crc = cr.cast_range(fin.fileno(), HEAD, N, src, fout.fileno(), 4, dst, seen.append)
        assert fout.tell() == 4  # the file position is the caller's
    out = (tmp_path / "out.bin").read_bytes()
    assert out[:4] == b"0123" and len(out) == 4 + out_item * N
    assert got_crc == zlib.crc32(out[4:])
    assert sum(seen) == out_item * N and len(seen) == -(-N * size // cr.PIECE)  # in order
    got = np.frombuffer(out[4:], _INT[out_item][1])
    _same_as_torch(got, x.to(getattr(torch, dst)))


@pytest.fixture
def in_flight(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Pieces being cast right now (a spy around ``_piece``; each takes a little while)."""
    import time

    real = cr._piece
    now: list[int] = []

    def piece(*args: object) -> int:
        now.append(1)
        try:
            time.sleep(0.01)
            return real(*args)  # type: ignore[arg-type]
        finally:
            now.pop()

    monkeypatch.setattr(cr, "_piece", piece)
    return now


def test_a_short_input_fails_once_every_piece_has_stopped(
    tmp_path: Path, threads: int, in_flight: list[int]
) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(_values(N).numpy().tobytes()[: 4 * (N - 10)])  # the last piece is short
    out = open(tmp_path / "out.bin", "w+b")  # noqa: SIM115
    with open(src, "rb") as fin, out, pytest.raises(EOFError):
        cr.cast_range(fin.fileno(), 0, N, "float32", out.fileno(), 0, "bfloat16")
    assert in_flight == []  # nothing writes into the output once the caller has the error


def test_an_error_in_a_thread_reaches_the_caller_once_every_piece_has_stopped(
    tmp_path: Path, threads: int, in_flight: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    spied = cr._piece
    calls: list[int] = []

    def piece(*args: object) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return spied(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(cr, "_piece", piece)
    src = tmp_path / "in.bin"
    src.write_bytes(_values(N).numpy().tobytes())
    out = open(tmp_path / "out.bin", "w+b")  # noqa: SIM115
    with open(src, "rb") as fin, out, pytest.raises(OSError, match="No space"):
        cr.cast_range(fin.fileno(), 0, N, "float32", out.fileno(), 0, "float16")
    assert in_flight == []


def test_workers_are_kept_between_casts(tmp_path: Path) -> None:
    """Threads (and their buffers) are started once, not per storage."""
    src = tmp_path / "in.bin"
    src.write_bytes(_values(N).numpy().tobytes())
    names: list[set[str]] = []
    for _ in range(3):
        with open(src, "rb") as fin, open(tmp_path / "out.bin", "w+b") as out:
            cr.cast_range(fin.fileno(), 0, N, "float32", out.fileno(), 0, "float16")
        names.append({str(t.ident) for t in threading.enumerate() if t.name == "ckpttool-cast"})
    assert names[0] and names[0] == names[1] == names[2]


def test_crc32_combine_equals_the_crc_of_the_whole() -> None:
    rng = np.random.default_rng(3)
    for n1, n2 in [(0, 0), (0, 5), (5, 0), (1, 1), (1000, 3), (7, 1 << 16), (4097, 12345)]:
        a, b = rng.bytes(n1), rng.bytes(n2)
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), n2) == zlib.crc32(a + b)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The dtypes cast through the cores (the writers call cast_range via cast_here)."""
    used: list[str] = []
    real = cr.cast_range

    def spy(*args: object, **kw: object) -> int:
        used.append(str(args[6]))
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(cr, "cast_range", spy)
    return used


@pytest.mark.parametrize(
    ("src", "dtype"), [("float32", "float16"), ("float32", "bfloat16"), ("float16", "float32")]
)
def test_convert_casts_through_the_cores_like_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, src: str, dtype: str
) -> None:
    used = _spy(monkeypatch)
    size = torch.empty((), dtype=getattr(torch, src)).element_size()
    big = _values((N + 100) * 4 // size).to(getattr(torch, src))  # over MIN_BYTES
    sd = {"w": big, "view": big[100:].view(-1, 2), "small": _values(10).to(big.dtype)}
    torch.save(sd, tmp_path / "in.pt")
    ckpttool.convert(tmp_path / "in.pt", tmp_path / "out.pt", dtype=dtype)
    assert used == [dtype]  # the big storage (shared by two tensors), not the small one
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for name, t in sd.items():
        want = t.to(getattr(torch, dtype))
        _same_as_torch(_bits(got[name]), want.contiguous())
    assert got["view"].untyped_storage().data_ptr() == got["w"].untyped_storage().data_ptr()


def test_to_safetensors_casts_through_the_cores_like_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    used = _spy(monkeypatch)
    big = _values(N + 100)
    sd = {"w": big[100:], "t": big[: 2 * 3000].view(2, 3000).t()}  # an offset; a transpose
    torch.save(sd, tmp_path / "in.pt")
    ckpttool.to_safetensors(tmp_path / "in.pt", tmp_path / "out.safetensors", dtype="bfloat16")
    assert used == ["bfloat16"]  # "w" only: "t" is gathered
    got = load_file(tmp_path / "out.safetensors")
    for name, t in sd.items():
        _same_as_torch(_bits(got[name]), t.to(torch.bfloat16).contiguous())
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_casts_with_workers_of_its_own(tmp_path: Path) -> None:
    """A fork copies only the forking thread: a child of a process that has cast before must
    start its own workers rather than queue pieces for threads it does not have (a hang)."""
    src = tmp_path / "in.bin"
    src.write_bytes(_values(N).numpy().tobytes())
    with open(src, "rb") as fin, open(tmp_path / "parent.bin", "w+b") as out:
        want = cr.cast_range(fin.fileno(), 0, N, "float32", out.fileno(), 0, "float16")
    import warnings

    with warnings.catch_warnings():  # Python 3.12+ warns of fork() with threads: the point here
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the cast finishes with the parent's CRC
        code = 1
        try:
            import signal

            signal.alarm(60)  # a hang fails the test instead of blocking it
            with open(src, "rb") as fin, open(tmp_path / "child.bin", "w+b") as out:
                got = cr.cast_range(fin.fileno(), 0, N, "float32", out.fileno(), 0, "float16")
            code = 0 if got == want else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (tmp_path / "child.bin").read_bytes() == (tmp_path / "parent.bin").read_bytes()
