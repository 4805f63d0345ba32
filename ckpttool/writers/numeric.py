"""Tensor values without torch: strided gathers, byte-order swaps and float casts, streamed.

:func:`iter_tensor_bytes` yields a tensor's elements in dense C order, little-endian, in the
dtype asked for, in pieces of at most :data:`CHUNK` bytes: a contiguous source is read through
a mapping of the file (page cache, not private memory) one piece at a time, a strided view is
gathered piece by piece. :func:`recode` does the same for a chunk of storage bytes.

Casts between float64, float32, float16 and bfloat16 (from those and the float8 kinds) give
the bits torch's ``.to(dtype)`` gives: round to nearest even, overflow to infinity, subnormals
kept, and float64 to float16/bfloat16 rounded through float32 as torch does. NaN stays NaN of
the same sign, quiet, keeping its top payload bits (what x86 conversion instructions do);
torch's own NaN bits vary with the CPU and the code path (0xFFFF, 0x7FC0, ...), so only
NaN-ness can be compared with it.

Byte order follows torch's loader: a big-endian storage is swapped in units of its own dtype,
so the bytes of an untyped (uint8) storage are never swapped, whatever dtype views them.

numpy is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import TYPE_CHECKING, Any

from .. import dtypes
from ..model import StorageInfo, TensorRef
from .cast_kernels import KERNELS, Ring, cast_into, compiled
from .cast_kernels import fix_nan as _fix_nan

if TYPE_CHECKING:
    import numpy as np

CHUNK = 16 << 20  # bytes per piece yielded (bounded memory)
_BLOCK = 1 << 16  # elements per kernel step: temporaries stay in the CPU's L2 cache

CAST_TARGETS = ("float64", "float32", "float16", "bfloat16")
FLOAT8 = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
CAST_SOURCES = (*CAST_TARGETS, *FLOAT8)


def can_cast(src: str, dst: str) -> bool:
    """Whether :func:`cast_bits` converts ``src`` elements to ``dst`` (same dtype: always)."""
    return src == dst or (src in CAST_SOURCES and dst in CAST_TARGETS)


def _unit(dtype: str) -> tuple[int, int]:
    """(bytes per byte-order unit, units per element): complex numbers swap each half."""
    size = dtypes.get(dtype).itemsize
    return (size // 2, 2) if dtype.startswith("complex") else (size, 1)


def bits_dtype(dtype: str, big_endian: bool = False) -> np.dtype[Any]:
    """The numpy dtype that holds one element's bits as unsigned integers in the given order.

    Complex elements are a structured pair of unsigned integers, so that swapping the byte order
    swaps each half. Bits are copied exactly (no float, no bool normalisation).
    """
    import numpy as np

    unit, count = _unit(dtype)
    code = (">" if big_endian and unit > 1 else "<") + f"u{unit}"
    if count == 2:
        return np.dtype([("re", code), ("im", code)])
    return np.dtype(code)


def native(bits: np.ndarray) -> np.ndarray:
    """``bits`` in little-endian order (a copy only if it was big-endian)."""
    dt = bits.dtype
    fields = [f[0] for f in dt.fields.values()] if dt.fields else [dt]
    if not any(f.byteorder == ">" for f in fields):
        return bits
    if dt.fields:
        import numpy as np

        little = np.dtype([(n, f[0].newbyteorder("<")) for n, f in dt.fields.items()])
        return bits.astype(little)
    return bits.astype(dt.newbyteorder("<"))


# -- the cast kernels (little-endian unsigned bits in, bits out) --------------------------------
# float32 sources are rounded by integer kernels (numpy's own float16 cast is slow and its NaN
# bits vary); 1- and 2-byte sources go through a table of every pattern, built once by them.
@cache
def _float8_to_f32_table(dtype: str) -> np.ndarray:
    """The float32 bits of each of the 256 values of a float8 kind (NaN: quiet, sign kept)."""
    import numpy as np

    from ..analysis.arrays import as_float32

    values = as_float32(np.arange(256, dtype=np.uint8), dtype)
    table = values.view(np.uint32).copy()
    nan = np.isnan(values)
    sign = (np.arange(256, dtype=np.uint32) & 0x80) << 24
    keep_sign = dtype in ("float8_e4m3fn", "float8_e5m2")  # the fnuz kinds and e8m0: one NaN
    table[nan] = 0x7FC00000 | (sign[nan] if keep_sign else 0)
    return table


def _to_f32(bits: np.ndarray, src: str) -> np.ndarray:
    """Exact float32 values of ``bits`` (a source dtype of at most 32 bits)."""
    import numpy as np

    if src == "float32":
        return bits.view(np.float32)
    if src == "bfloat16":
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if src == "float16":
        x = bits.view(np.float16).astype(np.float32)
        _fix_nan(x.view(np.uint32), bits, 16, 5, 10, 32, 8, 23)
        return x
    if src in FLOAT8:
        return _float8_to_f32_table(src)[bits].view(np.float32)
    raise ValueError(f"cannot cast {src}")


@cache
def _table(src: str, dst: str) -> np.ndarray:
    """``dst`` bits of every pattern of a 1- or 2-byte ``src``, indexed by the pattern."""
    import numpy as np

    patterns = np.arange(256 if src in FLOAT8 else 1 << 16, dtype=bits_dtype(src))
    out = np.ascontiguousarray(_from_f32(_to_f32(patterns, src), dst))
    out.setflags(write=False)
    return out


def _f32_to_f16(u: np.ndarray) -> np.ndarray:
    """float32 bits rounded to float16 bits, nearest even (F. Giesen's branch-free method)."""
    import numpy as np

    U = np.uint32
    sign = u & U(0x80000000)
    f = u ^ sign
    t = f >> U(13)  # normal range: rebias the exponent, round the 13 dropped bits to even
    t &= U(1)
    t += f
    t += U(0xC8000FFF)  # ((15 - 127) << 23) + 0xFFF, modulo 2**32
    t >>= U(13)
    small = f < U(113 << 23)  # float16 subnormals and zero: let a float addition round
    if small.any():
        half = np.float32(0.5)  # 2**-1: aligns float16's smallest subnormal with bit 0
        t[small] = (f[small].view(np.float32) + half).view(np.uint32) - half.view(np.uint32)
    big = f >= U(143 << 23)  # 65536 and above: infinity (NaN fixed by the caller)
    if big.any():
        t[big] = np.where(f[big] > U(0x7F800000), U(0x7E00), U(0x7C00))
    t |= sign >> U(16)
    return t.astype(np.uint16)


def _from_f32(x: np.ndarray, dst: str) -> np.ndarray:
    """float32 values rounded to ``dst`` (nearest even), as bits."""
    import numpy as np

    u = x.view(np.uint32)
    if dst == "float32":
        return u
    if dst == "float64":
        out64 = x.astype(np.float64).view(np.uint64)
        _fix_nan(out64, u, 32, 8, 23, 64, 11, 52)
        return out64
    if dst == "float16":
        out = _f32_to_f16(u)
        _fix_nan(out, u, 32, 8, 23, 16, 5, 10)
        return out
    if dst == "bfloat16":
        t = u >> np.uint32(16)
        t &= np.uint32(1)
        t += np.uint32(0x7FFF)
        t += u  # wraps only for NaN, fixed below
        t >>= np.uint32(16)
        out = t.astype(np.uint16)
        _fix_nan(out, u, 32, 8, 23, 16, 8, 7)
        return out
    raise ValueError(f"cannot cast to {dst}")


def table_for(src: str, dst: str) -> np.ndarray | None:
    """The table of every ``src`` pattern :func:`_cast_block` looks ``dst`` bits up in (1- and
    2-byte sources), or None where it computes them (float64, float32, bfloat16 widened)."""
    if src in ("float64", "float32") or (src == "bfloat16" and dst in ("float32", "float64")):
        return None
    return _table(src, dst)


def _cast_block(bits: np.ndarray, src: str, dst: str) -> np.ndarray:
    import numpy as np

    if src == "float64":
        if dst == "float64":
            return bits
        x = bits.view(np.float64).astype(np.float32)  # float16/bfloat16 round through float32,
        _fix_nan(x.view(np.uint32), bits, 64, 11, 52, 32, 8, 23)  # as torch does
        return _from_f32(x, dst)
    table = table_for(src, dst)
    if table is None:
        return _from_f32(_to_f32(bits, src), dst)
    return np.take(table, bits)


def cast_bits(bits: np.ndarray, src: str, dst: str, ring: Ring | None = None) -> np.ndarray:
    """Cast a 1-D array of little-endian ``src`` bits to ``dst`` bits, as torch rounds.

    Args:
        bits: unsigned integers holding ``src`` elements (:func:`bits_dtype`; big-endian ones
            are swapped first).
        src: a dtype of :data:`CAST_SOURCES` (or ``dst`` itself).
        dst: a dtype of :data:`CAST_TARGETS`.
        ring: where to take the output buffer from (reused; else a new array).

    Returns:
        A new contiguous array of unsigned integers holding ``dst`` elements.

    Example:
        >>> cast_bits(np.array([0x3F800000], np.uint32), "float32", "bfloat16")
        array([16256], dtype=uint16)
    """
    import numpy as np

    if src == dst:
        return np.ascontiguousarray(bits)
    if not can_cast(src, dst):
        raise ValueError(f"cannot cast {src} to {dst}")

    bits = np.ascontiguousarray(native(bits)).reshape(-1)
    with np.errstate(all="ignore"):  # overflow to inf and signalling NaNs are expected
        if bits.size <= _BLOCK and (src, dst) not in KERNELS and not compiled(src, dst):
            return np.ascontiguousarray(_cast_block(bits, src, dst))
        dt = bits_dtype(dst)
        if ring is None:
            out = np.empty(bits.size, dtype=dt)
        else:
            out = ring.get(bits.size * dt.itemsize).view(dt)
        table = None if compiled(src, dst) else table_for(src, dst)
        cast_into(bits, out, src, dst, _cast_block, table)
    return out


# -- streaming ------------------------------------------------------------------------------------
def swaps(storage: StorageInfo) -> bool:
    """torch swaps a big-endian storage in units of the storage's own dtype."""
    return storage.big_endian and dtypes.get(storage.dtype).itemsize > 1


def iter_tensor_bytes(
    ref: TensorRef,
    dtype: str | None = None,
    *,
    fd: int | None = None,
    chunk: int = CHUNK,
    ring: Ring | None = None,
) -> Iterator[memoryview]:
    """The tensor's elements, dense C order, little-endian, as ``dtype``, in bounded pieces.

    Args:
        ref: the tensor as a reader found it (any strides, offset, stride-0 expansion).
        dtype: the output dtype (default the tensor's own); see :func:`can_cast`.
        fd: an open descriptor of the storage's file (else the file is opened per call).
        chunk: the most bytes of output (and of gathered input) held at once.
        ring: reuse its buffers for cast and gathered pieces (each piece is then valid only
            until the ring hands its buffer out again); else every piece is a new array.

    Returns:
        An iterator of contiguous byte views whose concatenation is the output tensor.

    Example:
        >>> b"".join(iter_tensor_bytes(info.ref, "bfloat16"))
    """
    from ..analysis.arrays import iter_chunks, tensor_array

    dst = dtype or ref.dtype
    if not can_cast(ref.dtype, dst):
        raise ValueError(f"cannot cast {ref.dtype} to {dst}")
    storage = ref.storage
    if storage is None:
        raise ValueError("the tensor has no storage in the file")
    if ref.numel == 0:
        return
    arr = tensor_array(ref, fd=fd).view(bits_dtype(ref.dtype, swaps(storage)))
    size = max(dtypes.get(ref.dtype).itemsize, dtypes.get(dst).itemsize)
    limit = max(1, chunk // size)
    if _transposed(arr):
        pieces = _tiled_pieces(arr, limit, ring if dst == ref.dtype else None)
    else:
        pieces = iter_chunks(arr, limit)
    meta = ref.metadata if isinstance(ref.metadata, dict) else {}
    conj, neg = bool(meta.get("conj")), bool(meta.get("neg"))
    for piece in pieces:
        yield _encode(piece, ref.dtype, dst, conj=conj, neg=neg, ring=ring)


def has_view_bits(ref: TensorRef) -> bool:
    """Whether the tensor is a conjugate or negative view (its stored bytes are not its values)."""
    meta = ref.metadata if isinstance(ref.metadata, dict) else {}
    return bool(meta.get("conj") or meta.get("neg"))


def resolve_view_bits(bits: np.ndarray, dtype: str, *, conj: bool, neg: bool) -> np.ndarray:
    """Apply a tensor's conjugate / negative view bits to its raw little-endian bits, as torch's
    ``resolve_conj()`` / ``resolve_neg()`` do (floats: flip the sign bit, so NaNs keep their
    payload; integers: two's-complement negation)."""
    import numpy as np

    if not (conj or neg):
        return bits
    bits = np.array(bits, copy=True)
    info = dtypes.get(dtype)
    if bits.dtype.fields:  # complex: a (re, im) pair of unsigned integers
        sign = bits.dtype.fields["re"][0].type(1 << (bits.dtype.fields["re"][0].itemsize * 8 - 1))
        if neg:
            bits["re"] ^= sign
        if conj != neg:  # conj negates the imaginary part, neg negates it again
            bits["im"] ^= sign
    elif neg and info.is_floating:
        bits ^= bits.dtype.type(1 << (bits.dtype.itemsize * 8 - 1))
    elif neg and dtype.startswith(("int", "uint")):
        signed = np.dtype(f"<i{bits.dtype.itemsize}")
        bits = (-bits.view(signed)).view(bits.dtype)
    return bits


_TILE = 64  # elements of the last axis copied at a time by a transposing gather


def _transposed(arr: np.ndarray) -> bool:
    """Whether the last axis is not the one closest together in memory (a transpose or a
    permute): copying in C order would then stride through memory for every element."""
    if arr.ndim < 2 or arr.shape[-1] < 2:
        return False
    closest = min(abs(st) for n, st in zip(arr.shape, arr.strides, strict=True) if n > 1)
    return abs(arr.strides[-1]) > closest


def _tiled_pieces(arr: np.ndarray, limit: int, ring: Ring | None = None) -> Iterator[np.ndarray]:
    """C-order pieces of at most ``limit`` elements, each copied tile by tile along the last
    axis so that reads stay close together (about 10x faster than numpy's copy of a transpose)."""
    import numpy as np

    row = arr[0].size
    if row > limit:  # rows longer than a piece: row by row (a 1-D row is cut in pieces)
        for i in range(arr.shape[0]):
            if arr.ndim > 2:
                yield from _tiled_pieces(arr[i], limit, ring)
            else:
                for j in range(0, row, limit):
                    yield np.ascontiguousarray(arr[i, j : j + limit])
        return
    step = max(1, limit // max(row, 1))
    for i in range(0, arr.shape[0], step):
        block = arr[i : i + step]
        if ring is None:
            out = np.empty(block.shape, dtype=block.dtype)
        else:
            out = ring.get(block.size * block.dtype.itemsize).view(block.dtype)
            out = out.reshape(block.shape)
        for j in range(0, block.shape[-1], _TILE):
            out[..., j : j + _TILE] = block[..., j : j + _TILE]
        yield out.reshape(-1)


def _encode(
    piece: np.ndarray,
    src: str,
    dst: str,
    *,
    conj: bool = False,
    neg: bool = False,
    ring: Ring | None = None,
) -> memoryview:
    import numpy as np

    piece = resolve_view_bits(native(piece), src, conj=conj, neg=neg)
    if src != dst:
        piece = cast_bits(piece, src, dst, ring)
    return np.ascontiguousarray(piece).reshape(-1).view(np.uint8).data


def recode(
    data: bytes | bytearray | memoryview,
    storage: StorageInfo,
    dtype: str,
    ring: Ring | None = None,
) -> bytearray | memoryview:
    """A chunk of ``storage``'s bytes (whole elements), little-endian and cast to ``dtype``:
    a new bytearray, or with ``ring`` a view of one of its buffers (valid until reused).

    Example:
        >>> recode(chunk, src, "float16")  # a float32 storage chunk as float16 bytes
    """
    import numpy as np

    src = storage.dtype
    if not can_cast(src, dtype):
        raise ValueError(f"cannot cast {src} to {dtype}")
    bits = np.frombuffer(data, dtype=bits_dtype(src, swaps(storage)))
    encoded = _encode(bits, src, dtype, ring=ring)
    return encoded if ring is not None else bytearray(encoded)
