"""The compiled casts (``ckpttool/writers/_fastcast.c``, issue 22) against numpy's kernels and
tables, which tests/test_numeric.py compares with torch (and runs again with this extension).

Every 2-byte pattern, every position of an odd value (zero, subnormal, infinity, NaN) inside
the groups of 16 that the float16 -> bfloat16 loop takes at a time, lengths that leave a tail,
buffers at odd addresses, and the arguments the extension refuses.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from ckpttool.writers import cast_kernels, numeric

fast = cast_kernels._fastcast
needs_fast = pytest.mark.skipif(fast is None, reason="the compiled casts were not built")
KIND = cast_kernels._KIND
BITS = {"float32": np.uint32, "float16": np.uint16, "bfloat16": np.uint16}
PAIRS = [(s, d) for s in KIND for d in KIND if s != d]


@pytest.fixture
def numpy_only() -> Iterator[None]:
    before = cast_kernels.use_compiled(False)
    yield
    cast_kernels.use_compiled(before)


def numpy_cast(bits: np.ndarray, src: str, dst: str) -> np.ndarray:
    before = cast_kernels.use_compiled(False)
    try:
        return numeric.cast_bits(bits, src, dst)
    finally:
        cast_kernels.use_compiled(before)


def fast_cast(bits: np.ndarray, src: str, dst: str) -> np.ndarray:
    out = np.empty(bits.size, BITS[dst])
    fast.cast(KIND[src], KIND[dst], bits, out)
    return out


def assert_same(bits: np.ndarray, src: str, dst: str) -> None:
    got, want = fast_cast(bits, src, dst), numpy_cast(bits, src, dst)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, (
        f"{src}->{dst}: {bad.size} differ, e.g. {bits[bad[0]]:#x}: "
        f"compiled {got[bad[0]]:#x}, numpy {want[bad[0]]:#x}"
    )


def test_ci_builds_the_extension() -> None:
    """CI installs with a compiler (.ci/run says so): a build that silently lost the
    extension is a failure there."""
    if not os.environ.get("CKPTTOOL_EXPECT_COMPILED"):
        pytest.skip("only CI promises a C compiler (CKPTTOOL_EXPECT_COMPILED=1)")
    assert fast is not None and cast_kernels.compiled("float16", "bfloat16")


@needs_fast
@pytest.mark.parametrize(("src", "dst"), [p for p in PAIRS if p[0] != "float32"])
def test_every_two_byte_pattern(src: str, dst: str) -> None:
    assert_same(np.arange(1 << 16, dtype=np.uint16), src, dst)


@needs_fast
@pytest.mark.parametrize("dst", ["float16", "bfloat16"])
def test_float32_random_and_every_dropped_bit_pattern(dst: str) -> None:
    rng = np.random.default_rng(2)
    dropped = 13 if dst == "float16" else 16
    heads = np.append(np.arange(0, 256, 5), [254, 255]).astype(np.uint32) << np.uint32(23)
    heads = np.concatenate([heads, heads | np.uint32(0x80000000)])
    every = (heads[:, None] | np.arange(1 << dropped, dtype=np.uint32)[None, :]).reshape(-1)
    sample = rng.integers(0, 1 << 32, 1_000_000, dtype=np.uint64).astype(np.uint32)
    assert_same(np.concatenate([every, sample]), "float32", dst)


@needs_fast
@pytest.mark.parametrize(
    "odd", [0x0000, 0x8000, 0x0001, 0x83FF, 0x03FF, 0x7C00, 0xFC00, 0x7C01, 0xFE00]
)
def test_float16_to_bfloat16_odd_values_at_every_place_in_a_group(odd: int) -> None:
    """One zero/subnormal/infinity/NaN among normals, at each of 16 places, in lengths with a
    tail: the loop redoes only that group, one element at a time."""
    rng = np.random.default_rng(odd)
    for n in (1, 15, 16, 17, 47, 64):
        for place in range(min(n, 17)):
            bits = rng.integers(0x0400, 0x7C00, n, dtype=np.uint16) | np.uint16(
                0x8000 * (place % 2)
            )
            bits[place] = odd
            assert_same(bits, "float16", "bfloat16")


@needs_fast
@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_buffers_at_odd_addresses(src: str, dst: str) -> None:
    """Loads and stores need no alignment (a piece of a file read at any offset)."""
    rng = np.random.default_rng(3)
    size, n = np.dtype(BITS[src]).itemsize, 1001
    raw = bytearray(rng.integers(0, 256, n * size + 1, dtype=np.uint8).tobytes())
    bits = np.frombuffer(raw, BITS[src], count=n, offset=1)
    out_raw = bytearray(n * np.dtype(BITS[dst]).itemsize + 3)
    out = np.frombuffer(out_raw, BITS[dst], count=n, offset=3)
    fast.cast(KIND[src], KIND[dst], bits, out)
    assert np.array_equal(out, numpy_cast(np.array(bits), src, dst))


@needs_fast
def test_it_refuses_what_it_cannot_do() -> None:
    a = np.zeros(8, np.uint32)
    with pytest.raises(ValueError, match="no cast"):
        fast.cast(0, 0, a, np.zeros(8, np.uint32))
    with pytest.raises(ValueError, match="no cast"):
        fast.cast(3, 1, a, np.zeros(8, np.uint16))
    with pytest.raises(ValueError, match="sizes"):
        fast.cast(0, 1, a, np.zeros(7, np.uint16))
    with pytest.raises(ValueError, match="overlap"):
        fast.cast(0, 1, a, a.view(np.uint16)[:8])
    with pytest.raises(TypeError):
        fast.cast(0, 1, a, bytes(16))  # a destination must be writable


@needs_fast
def test_the_writers_path_uses_it_and_numpy_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """cast_blocks calls the extension once for a whole range; turned off, numpy's kernels
    give the same bits."""
    calls: list[int] = []
    real = fast.cast

    class Spy:
        @staticmethod
        def cast(*args: object) -> None:
            calls.append(1)
            real(*args)

    monkeypatch.setattr(cast_kernels, "_fastcast", Spy)
    bits = np.random.default_rng(4).standard_normal(300_000).astype(np.float16).view(np.uint16)
    out = np.empty_like(bits)
    cast_kernels.cast_blocks(bits, out, "float16", "bfloat16", numeric._cast_block)
    assert calls == [1]
    cast_kernels.use_compiled(False)
    try:
        again = np.empty_like(bits)
        cast_kernels.cast_blocks(bits, again, "float16", "bfloat16", numeric._cast_block,
                                 table=numeric.table_for("float16", "bfloat16"))  # fmt: skip
    finally:
        cast_kernels.use_compiled(True)
    assert calls == [1] and np.array_equal(out, again)
