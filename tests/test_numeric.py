"""Casts, byte swaps and strided gathers without torch (issue 15), with torch as the oracle.

Every cast is compared with torch's ``.to(dtype)`` bit for bit: all 2^16 float16 and bfloat16
patterns, all 256 patterns of each float8 kind, and a large random sample of float32/float64
bit patterns plus the special values (zeros, infinities, the largest finite values, the edges
of the subnormals, ties at every rounding boundary). NaN bits are compared as NaN-ness only:
torch's own NaN bits depend on the CPU and the code path (a contiguous float32 tensor becomes
bfloat16 0xFFFF, a strided one 0x7FC0), and ours are fixed (see ``test_nan_bits_are_fixed``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from ckpttool import open_checkpoint
from ckpttool.model import StorageInfo
from ckpttool.writers import numeric

UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
SIGNED = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
TARGETS = ["float64", "float32", "float16", "bfloat16"]
FLOAT8 = list(numeric.FLOAT8)


@pytest.fixture(params=["compiled", "numpy"])
def kernels(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a cast test with the compiled casts (where they were built) and with numpy's."""
    from ckpttool.writers import cast_kernels

    if request.param == "compiled" and cast_kernels._fastcast is None:
        pytest.skip("the compiled casts were not built (no C compiler?)")
    before = cast_kernels.use_compiled(request.param == "compiled")
    yield request.param
    cast_kernels.use_compiled(before)


def torch_cast(bits: np.ndarray, src: str, dst: str) -> tuple[np.ndarray, np.ndarray]:
    """(torch's bits of ``bits`` cast src -> dst, where the result is NaN)."""
    size = bits.dtype.itemsize
    t = torch.from_numpy(bits.view(np.dtype(f"i{size}") if size > 1 else np.uint8).copy())
    out = t.view(getattr(torch, src)).to(getattr(torch, dst))
    nan = torch.isnan(out.double()).numpy()
    raw = out.view(SIGNED[out.element_size()]).numpy().view(UINT[out.element_size()])
    return raw, nan


def assert_same_as_torch(bits: np.ndarray, src: str, dst: str) -> None:
    got = numeric.cast_bits(bits, src, dst)
    want, nan = torch_cast(bits, src, dst)
    assert got.dtype == want.dtype and got.shape == want.shape
    got_nan = np.isnan(_as_f64(got, dst))
    assert np.array_equal(got_nan, nan), f"{src}->{dst}: NaN-ness differs"
    bad = np.nonzero((got != want) & ~nan)[0]
    assert bad.size == 0, (
        f"{src}->{dst}: {bad.size} values differ, e.g. input {bits[bad[0]]:#x}: "
        f"ours {got[bad[0]]:#x}, torch {want[bad[0]]:#x}"
    )


def tbytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes in C order (what safetensors stores)."""
    dense = torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)
    return dense.reshape(-1).view(torch.uint8).numpy().tobytes()


def _as_f64(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return bits.view({"float64": np.float64, "float32": np.float32, "float16": np.float16}[dtype])


def f32_specials() -> np.ndarray:
    """float32 bit patterns at every boundary that matters for float16 and bfloat16."""
    edges = [
        0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 1, 0x80000001,
        0x007FFFFF, 0x00800000, 0x3F800000, 0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001,
        0x477FFFFF, 0x47800000, 0x33000000, 0x33000001, 0x32FFFFFF, 0x33800000, 0x387FC000,
        0x38800000, 0x387FE000, 0x7F7F8000, 0x7F7F7FFF, 0x7F7FC000,
        0x7F800001, 0x7FC00000, 0xFFC00001, 0x7FFFFFFF, 0xFFFFFFFF,
    ]  # fmt: skip
    # ties and neighbours around every bfloat16 boundary (low 16 bits 0x7FFF/0x8000/0x8001)
    # and every float16 rounding position of normal and subnormal ranges
    highs = np.arange(0, 1 << 16, 97, dtype=np.uint32) << 16
    lows = np.array([0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x0FFF, 0x1000, 0x1001], dtype=np.uint32)
    ties = (highs[:, None] | lows[None, :]).reshape(-1)
    return np.concatenate([np.array(edges, dtype=np.uint32), ties])


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("dst", ["float64", "float32", "bfloat16"])
def test_every_float16_pattern(dst: str) -> None:
    assert_same_as_torch(np.arange(1 << 16, dtype=np.uint16), "float16", dst)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("dst", ["float64", "float32", "float16"])
def test_every_bfloat16_pattern(dst: str) -> None:
    assert_same_as_torch(np.arange(1 << 16, dtype=np.uint16), "bfloat16", dst)


@pytest.mark.parametrize("src", FLOAT8)
@pytest.mark.parametrize("dst", TARGETS)
def test_every_float8_pattern(src: str, dst: str) -> None:
    assert_same_as_torch(np.arange(256, dtype=np.uint8), src, dst)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("dst", ["float64", "float16", "bfloat16"])
def test_float32_random_and_specials(dst: str) -> None:
    rng = np.random.default_rng(15)
    sample = rng.integers(0, 1 << 32, 2_000_000, dtype=np.uint64).astype(np.uint32)
    normal = rng.standard_normal(500_000).astype(np.float32).view(np.uint32)  # weights
    assert_same_as_torch(np.concatenate([f32_specials(), sample, normal]), "float32", dst)


@pytest.mark.parametrize("dst", ["float32", "float16", "bfloat16"])
def test_float64_random_and_specials(dst: str) -> None:
    """float64 -> float16/bfloat16 rounds through float32, as torch does (double rounding)."""
    rng = np.random.default_rng(64)
    sample = rng.integers(0, 1 << 63, 500_000, dtype=np.uint64) << np.uint64(1)
    sample |= rng.integers(0, 2, 500_000, dtype=np.uint64)
    with np.errstate(invalid="ignore"):  # signalling NaNs among the specials
        wide = f32_specials().view(np.float32).astype(np.float64).view(np.uint64)
    near = wide[:, None] + np.array([0, 1, (1 << 29) - 1, 1 << 29, (1 << 29) + 1], np.uint64)
    tricky = np.array([1 + 2**-11 + 2**-40, 65519.99999999, 1 + 2**-8 + 2**-40]).view(np.uint64)
    bits = np.concatenate([sample, wide, near.reshape(-1), tricky])
    assert_same_as_torch(bits, "float64", dst)


def test_double_rounding_like_torch() -> None:
    """1 + 2^-11 + 2^-40 is above the float16 tie, but float32 rounds it onto the tie first."""
    bits = np.array([1 + 2**-11 + 2**-40], dtype=np.float64).view(np.uint64)
    assert numeric.cast_bits(bits, "float64", "float16").view(np.float16)[0] == 1.0


@pytest.mark.usefixtures("kernels")
def test_nan_bits_are_fixed() -> None:
    """NaN keeps its sign and top payload bits and becomes quiet, on every CPU."""
    f32 = np.array([0x7F800001, 0xFFC00000, 0x7FA00000, 0x7FFFFFFF], dtype=np.uint32)
    assert numeric.cast_bits(f32, "float32", "bfloat16").tolist() == [
        0x7FC0, 0xFFC0, 0x7FE0, 0x7FFF
    ]  # fmt: skip
    assert numeric.cast_bits(f32, "float32", "float16").tolist() == [
        0x7E00, 0xFE00, 0x7F00, 0x7FFF
    ]  # fmt: skip
    f16 = np.array([0x7C01, 0xFE00], dtype=np.uint16)
    assert numeric.cast_bits(f16, "float16", "float32").tolist() == [0x7FC02000, 0xFFC00000]
    bf16 = np.array([0x7F81], dtype=np.uint16)  # widening bfloat16 is exact, as torch's
    assert numeric.cast_bits(bf16, "bfloat16", "float32").tolist() == [0x7F810000]


def test_cast_works_in_blocks_and_refuses_what_it_cannot() -> None:
    bits = np.arange(3 * (1 << 16) + 5, dtype=np.uint32) * np.uint32(40503)
    assert_same_as_torch(bits, "float32", "bfloat16")  # several kernel blocks and a tail
    assert not numeric.can_cast("int32", "float16")
    assert not numeric.can_cast("float32", "float8_e4m3fn")
    with pytest.raises(ValueError, match="cannot cast"):
        numeric.cast_bits(bits, "int32", "float16")


# -- byte order ----------------------------------------------------------------------------------
def _storage(dtype: str, big: bool) -> StorageInfo:
    return StorageInfo("0", dtype, 0, "cpu", "", 0, big_endian=big)


@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        ("float32", [1.5, -2.0, 3.25]),
        ("float64", [1e300, -0.0]),
        ("int64", [1, -2, 1 << 40]),
        ("complex64", [1 + 2j, -3.5 - 0.25j]),
        ("complex128", [1e-300 + 7j]),
    ],
)
def test_big_endian_chunks_are_swapped_by_unit(dtype: str, values: list[complex]) -> None:
    t = torch.tensor(values, dtype=getattr(torch, dtype))
    unit = t.element_size() // (2 if t.is_complex() else 1)
    raw = t.view(torch.uint8).numpy().reshape(-1, unit)[:, ::-1].tobytes()  # big-endian bytes
    got = numeric.recode(raw, _storage(dtype, True), dtype)
    assert bytes(got) == t.view(torch.uint8).numpy().tobytes()
    if dtype in ("float32", "float64"):  # swap and cast in one step
        back = numeric.recode(raw, _storage(dtype, True), "bfloat16")
        assert bytes(back) == t.to(torch.bfloat16).view(torch.uint8).numpy().tobytes()


def test_untyped_storage_is_never_swapped() -> None:
    """torch's loader swaps a big-endian storage in units of its own dtype: uint8, not at all."""
    raw = bytes(range(8))
    assert bytes(numeric.recode(raw, _storage("uint8", True), "uint8")) == raw


# -- gathering views straight from torch.save files ------------------------------------------------
def _views() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 7, 5, generator=g)
    return {
        "transposed": base[0].t(),
        "permuted": base.permute(2, 0, 1),
        "sliced": base[1:5:2, ::3, 1:],
        "expanded": torch.arange(4.0).expand(3, 4),
        "stride0_inner": torch.arange(3.0)[:, None].expand(3, 5),
        "offset": torch.arange(100.0)[37:61].view(4, 6),
        "scalar": torch.tensor(2.5),
        "scalar_view": torch.arange(9.0)[4],
        "empty": torch.empty(0, 5),
        "empty_strided": torch.randn(4, 6, generator=g)[:, 2:2],
        "half_t": torch.randn(8, 3, generator=g).half().t(),
        "bf16_t": torch.randn(8, 3, generator=g).bfloat16().t(),
        "f8": torch.randn(7, 5, generator=g).to(torch.float8_e4m3fn).t(),
        "u16": torch.arange(30, dtype=torch.int32).to(torch.uint16).view(5, 6).t(),
        "u8_as_u16": torch.arange(24, dtype=torch.uint8).view(torch.uint16).view(3, 4)[:, 1:],
        "c128": torch.randn(3, 4, dtype=torch.complex128, generator=g).t(),
        "bool": (torch.arange(12) % 3 == 0).view(3, 4).t(),
    }


@pytest.fixture(scope="module")
def views_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("numeric") / "views.pt"
    torch.save(_views(), path)
    return path


@pytest.mark.parametrize("chunk", [16, 64, numeric.CHUNK])
def test_gather_equals_torch_contiguous(views_file: Path, chunk: int) -> None:
    """Every view, gathered in pieces of at most ``chunk`` bytes, equals torch's .contiguous()."""
    want = torch.load(views_file, weights_only=True)
    ckpt = open_checkpoint(views_file)
    fd = os.open(views_file, os.O_RDONLY)
    try:
        for info in ckpt.tensors():
            pieces = list(numeric.iter_tensor_bytes(info.ref, fd=fd, chunk=chunk))
            item = want[info.name].element_size()
            assert all(len(p) <= max(chunk, item) for p in pieces), info.name
            assert b"".join(pieces) == tbytes(want[info.name]), info.name
    finally:
        os.close(fd)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_gather_and_cast_equal_torch(views_file: Path, dtype: str) -> None:
    want = torch.load(views_file, weights_only=True)
    ckpt = open_checkpoint(views_file)
    for info in ckpt.tensors():
        if not numeric.can_cast(info.dtype, dtype):
            continue
        got = b"".join(numeric.iter_tensor_bytes(info.ref, dtype, chunk=96))
        assert got == tbytes(want[info.name].to(getattr(torch, dtype))), info.name


def test_contiguous_source_streams_in_bounded_pieces(tmp_path: Path) -> None:
    """A contiguous 8 MB tensor cast to bfloat16 comes in pieces of at most the chunk size."""
    path = tmp_path / "big.pt"
    t = torch.randn(1 << 21, generator=torch.Generator().manual_seed(1))
    torch.save({"w": t}, path)
    ref = open_checkpoint(path).tensors()[0].ref
    sizes = []
    out = bytearray()
    for piece in numeric.iter_tensor_bytes(ref, "bfloat16", chunk=1 << 20):
        sizes.append(len(piece))
        out += piece
    assert max(sizes) <= 1 << 20 and len(sizes) >= 4
    assert bytes(out) == tbytes(t.to(torch.bfloat16))


def test_random_strided_views_gather_like_torch(tmp_path: Path) -> None:
    """40 random as_strided views (1-4 dims, overlapping, stride 0, offsets, permutations) of
    one storage, gathered in random small pieces, equal torch's .contiguous() (and a cast)."""
    rng = np.random.default_rng(2026)
    base = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    views = {}
    for i in range(40):
        ndim = int(rng.integers(1, 5))
        shape = [int(rng.integers(1, 7)) for _ in range(ndim)]
        stride = [int(rng.integers(0, 40)) for _ in range(ndim)]
        offset = int(rng.integers(0, 100))
        views[f"v{i}"] = base.as_strided(shape, stride, offset)
    path = tmp_path / "random.pt"
    torch.save(views, path)
    want = torch.load(path, weights_only=True)
    for info in open_checkpoint(path).tensors():
        chunk = int(rng.integers(4, 200))
        got = b"".join(numeric.iter_tensor_bytes(info.ref, chunk=chunk))
        assert got == tbytes(want[info.name]), (info.name, info.shape, info.stride)
        cast = b"".join(numeric.iter_tensor_bytes(info.ref, "bfloat16", chunk=chunk))
        assert cast == tbytes(want[info.name].to(torch.bfloat16)), info.name


# -- every rounding case, the threaded kernels, the pipeline (issue 22) ---------------------------
@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("dst", ["float16", "bfloat16"])
def test_float32_every_exponent_and_every_dropped_bit_pattern(dst: str) -> None:
    """For every sign and exponent (zeros and subnormals, normals, the float16 subnormal and
    overflow edges, infinities and NaNs): every pattern of the mantissa bits the cast drops
    (13 for float16, 16 for bfloat16, so every tie and its neighbours), under kept bits that
    are all zeros, all ones, and random."""
    rng = np.random.default_rng(22)
    dropped = 13 if dst == "float16" else 16
    low = np.arange(1 << dropped, dtype=np.uint32)
    kept_bits = 23 - dropped
    exps = np.arange(256, dtype=np.uint32)
    if dst == "bfloat16":  # 2^16 low patterns: a sample of exponents keeps this quick
        exps = np.unique(np.concatenate([exps[:3], exps[-3:], rng.choice(exps, 10)]))
    kept = np.array([0, (1 << kept_bits) - 1, *rng.integers(0, 1 << kept_bits, 2)], np.uint32)
    heads = (exps[:, None] << np.uint32(23)) | (kept[None, :] << np.uint32(dropped))
    heads = np.concatenate([heads.reshape(-1), heads.reshape(-1) | np.uint32(0x80000000)])
    assert_same_as_torch((heads[:, None] | low[None, :]).reshape(-1), "float32", dst)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("float32", "float16"),
        ("float32", "bfloat16"),
        ("float16", "bfloat16"),
        ("bfloat16", "float32"),
    ],
)
def test_threaded_cast_equals_one_thread_and_torch(
    src: str, dst: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckpttool.writers import cast_kernels

    rng = np.random.default_rng(7)
    n = 2 * cast_kernels.PART + 12345  # several parts and a tail
    values = rng.standard_normal(n).astype(np.float32)
    values[::1001] = 0
    values[5::4099] = np.nan
    values[7::9973] = 1e-40  # float32 subnormals
    bits = (
        numeric.cast_bits(values.view(np.uint32), "float32", src)
        if src != "float32"
        else (values.view(np.uint32))
    )
    monkeypatch.setattr(cast_kernels, "threads", lambda: 3)
    many = numeric.cast_bits(bits, src, dst)
    monkeypatch.setattr(cast_kernels, "threads", lambda: 1)
    one = numeric.cast_bits(bits, src, dst)
    assert np.array_equal(many, one)
    assert_same_as_torch(bits, src, dst)


def test_ahead_keeps_order_passes_errors_and_stops_early(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from ckpttool.writers import cast_kernels
    from ckpttool.writers.cast_kernels import ahead

    monkeypatch.setattr(cast_kernels, "overlap", lambda: True)  # a thread, whatever the cores

    assert list(ahead(iter(range(100)), depth=3)) == list(range(100))

    def failing():  # type: ignore[no-untyped-def]
        yield 1
        raise OSError("read failed")

    got = []
    with pytest.raises(OSError, match="read failed"):
        for item in ahead(failing()):
            got.append(item)
    assert got == [1]
    produced = []

    def endless():  # type: ignore[no-untyped-def]
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    for item in ahead(endless()):
        if item == 5:
            break
    assert len(produced) <= 8  # stopped soon after the consumer left
    assert not any(t.name == "ckpttool-ahead" for t in threading.enumerate())
