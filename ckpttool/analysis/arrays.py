"""A tensor's elements as a numpy array, read from the file without torch and without the rest.

:func:`tensor_array` maps only the byte range of the storage that one tensor views and returns a
read-only strided view of it (page cache, not private memory), in the tensor's own dtype where
numpy has one and as raw bits where it has not (bfloat16 and the float8 kinds as ``uint16`` /
``uint8``; :func:`as_float64` / :func:`as_float32` decode them). Big-endian storages come back
as big-endian numpy dtypes, so values are right whatever the file's byte order.

numpy is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

from .. import dtypes
from ..errors import CheckpointError
from ..model import StorageInfo, TensorRef
from ..source import is_url, open_source, open_zip, preadv

if TYPE_CHECKING:
    import numpy as np

# torch dtype name -> numpy type code of the element as stored (raw bits where numpy has no such
# float). complex32 is a (real, imaginary) pair of float16: a structured dtype, see _np_dtype.
_NUMPY_CODES = {
    "float64": "f8",
    "float32": "f4",
    "float16": "f2",
    "bfloat16": "u2",
    "float8_e4m3fn": "u1",
    "float8_e5m2": "u1",
    "float8_e4m3fnuz": "u1",
    "float8_e5m2fnuz": "u1",
    "float8_e8m0fnu": "u1",
    "float4_e2m1fn_x2": "u1",
    "complex128": "c16",
    "complex64": "c8",
    "int64": "i8",
    "int32": "i4",
    "int16": "i2",
    "int8": "i1",
    "uint64": "u8",
    "uint32": "u4",
    "uint16": "u2",
    "uint8": "u1",
    "bool": "b1",
    "qint8": "i1",
    "quint8": "u1",
    "qint32": "i4",
    "quint4x2": "u1",
    "quint2x4": "u1",
    "bits8": "u1",
    "bits16": "u2",
    "bits1x8": "u1",
    "bits2x4": "u1",
    "bits4x2": "u1",
}
# dtypes whose array holds raw bits that as_float64 decodes
RAW_FLOATS = frozenset(
    [
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
    ]
)
# dtypes that have no numeric value per element (packed sub-byte kinds): compared as bits only
PACKED = frozenset(["float4_e2m1fn_x2", "quint4x2", "quint2x4", "bits1x8", "bits2x4", "bits4x2"])


def numpy_dtype(dtype: str, big_endian: bool = False) -> np.dtype[Any]:
    """The numpy dtype that holds one element of torch dtype ``dtype`` as it lies in the file."""
    import numpy as np

    order: Literal[">", "<"] = ">" if big_endian else "<"
    if dtype == "complex32":
        return np.dtype([("real", order + "f2"), ("imag", order + "f2")])
    code = _NUMPY_CODES.get(dtype)
    if code is None:
        raise ValueError(f"no numpy equivalent for dtype {dtype}")
    dt = np.dtype(code)
    return dt.newbyteorder(order) if dt.itemsize > 1 else dt


def _storage_bytes(storage: StorageInfo, lo: int, hi: int, fd: int | None) -> Any:
    """A buffer holding bytes [lo, hi) of the storage (an mmap slice; inflated if deflated).

    Returns (buffer, offset of byte ``lo`` within it).
    """
    segments = getattr(storage, "segments", ())  # a distributed checkpoint's logical storage
    if segments:
        return _segment_bytes(storage, segments, lo, hi, fd)
    if storage.compressed:
        # a deflated zip record cannot be mapped: inflate this one record (never the file)
        with open_zip(storage.file) as zf, zf.open(storage.record or "") as f:
            f.seek(lo)
            data = f.read(hi - lo)
        if len(data) != hi - lo:
            raise CheckpointError(storage.file, f"record {storage.record} is truncated")
        return data, 0
    start = storage.offset + lo
    if is_url(storage.file):  # read by range requests: this tensor's bytes, not the file
        data = bytearray(hi - lo)
        src = fd if fd is not None else open_source(storage.file)
        if preadv(src, memoryview(data), start) != hi - lo:
            raise CheckpointError(storage.file, "is truncated: a storage is cut short")
        return data, 0
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    length = storage.offset + hi - aligned
    own = fd is None
    use_fd = os.open(storage.file, os.O_RDONLY) if fd is None else fd
    try:
        if os.fstat(use_fd).st_size < aligned + length:
            raise CheckpointError(storage.file, "is truncated: a storage is cut short")
        mapped = mmap.mmap(use_fd, length, offset=aligned, access=mmap.ACCESS_READ)
    finally:
        if own:
            os.close(use_fd)
    return mapped, start - aligned


def _segment_bytes(storage: StorageInfo, segments: Any, lo: int, hi: int, fd: int | None) -> Any:
    """Bytes [lo, hi) of a storage made of segments of several files (``Segment.dest`` order):
    mapped when one segment holds them all, else gathered (that range only)."""
    inside = [s for s in segments if s.dest < hi and s.dest + s.nbytes > lo]
    if len(inside) == 1:
        seg = inside[0]
        start = seg.offset + lo - seg.dest
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        use_fd = os.open(seg.file, os.O_RDONLY) if fd is None else fd
        try:
            mapped = mmap.mmap(
                use_fd, start + hi - lo - aligned, offset=aligned, access=mmap.ACCESS_READ
            )
        finally:
            if fd is None:
                os.close(use_fd)
        return mapped, start - aligned
    out = bytearray(hi - lo)
    for seg in inside:
        a, b = max(lo, seg.dest), min(hi, seg.dest + seg.nbytes)
        with open(seg.file, "rb") as f:
            f.seek(seg.offset + a - seg.dest)
            if f.readinto(memoryview(out)[a - lo : b - lo]) != b - a:
                raise CheckpointError(seg.file, "is truncated: a tensor is cut short")
    return out, 0


def tensor_array(ref: TensorRef, *, fd: int | None = None) -> np.ndarray:
    """The tensor's elements as a read-only numpy view of the file's bytes.

    Only the byte range of the storage that the tensor views is mapped (a deflated zip record is
    inflated, that record only). Storage offset and strides are honoured, so a transposed or
    sliced view reads as torch would build it.

    Args:
        ref: the tensor, as a reader found it (``TensorInfo.ref``).
        fd: an open descriptor of ``ref.storage.file`` to map from (else the file is opened).

    Returns:
        An array of ``ref.shape`` in the tensor's dtype (big-endian files give big-endian
        dtypes); bfloat16 and float8 tensors come as raw ``uint16``/``uint8`` bits (decode them
        with :func:`as_float64`), complex32 as a structured (real, imag) float16 pair.

    Example:
        >>> arr = tensor_array(ckpt.tensors()[0].ref)
        >>> as_float64(arr, "bfloat16").max()
    """
    import numpy as np
    from numpy.lib.stride_tricks import as_strided

    storage = ref.storage
    if storage is None:
        raise ValueError("the tensor has no storage in the file")
    # offsets and strides count elements of the tensor's dtype, also over an untyped storage;
    # torch swaps a big-endian storage in units of the storage's own dtype, so the bytes of an
    # untyped (uint8) storage viewed as uint16 or float8 are never swapped
    swapped = storage.big_endian and dtypes.get(storage.dtype).itemsize > 1
    dt = numpy_dtype(ref.dtype, swapped)
    if ref.numel == 0:
        return np.zeros(ref.shape, dtype=dt)
    lo, hi = ref.extent()
    item = dt.itemsize
    if lo < 0 or hi * item > storage.nbytes:
        raise CheckpointError(storage.file, "a tensor's view lies outside its storage")
    buf, delta = _storage_bytes(storage, lo * item, hi * item, fd)
    base = np.frombuffer(buf, dtype=dt, count=hi - lo, offset=delta)
    strides = tuple(s * item for s in ref.stride)
    first = (ref.storage_offset - lo) * item
    view = as_strided(base[first // item :], shape=ref.shape, strides=strides, writeable=False)
    return view


# -- decoding raw floats ------------------------------------------------------------------------
@cache
def _float8_table(dtype: str) -> Any:
    """The 256 float64 values of a float8 kind, indexed by its byte."""
    import numpy as np

    out = np.empty(256, dtype=np.float64)
    for b in range(256):
        out[b] = _float8_value(dtype, b)
    out.setflags(write=False)
    return out


def _float8_value(dtype: str, b: int) -> float:
    nan = float("nan")
    if dtype == "float8_e8m0fnu":
        return nan if b == 0xFF else 2.0 ** (b - 127)
    if dtype == "float8_e5m2":
        exp_bits, mant_bits, bias = 5, 2, 15
    elif dtype == "float8_e4m3fn":
        exp_bits, mant_bits, bias = 4, 3, 7
    elif dtype == "float8_e4m3fnuz":
        exp_bits, mant_bits, bias = 4, 3, 8
    elif dtype == "float8_e5m2fnuz":
        exp_bits, mant_bits, bias = 5, 2, 16
    else:
        raise ValueError(dtype)
    sign = -1.0 if b & 0x80 else 1.0
    exp = (b >> mant_bits) & ((1 << exp_bits) - 1)
    mant = b & ((1 << mant_bits) - 1)
    top = (1 << exp_bits) - 1
    if dtype.endswith("fnuz") and b == 0x80:
        return nan  # the one NaN; there is no negative zero and no infinity
    if dtype == "float8_e4m3fn" and exp == top and mant == (1 << mant_bits) - 1:
        return nan  # S.1111.111; no infinities
    if dtype == "float8_e5m2" and exp == top:
        return sign * float("inf") if mant == 0 else nan
    if exp == 0:
        return sign * (mant / (1 << mant_bits)) * 2.0 ** (1 - bias)
    return sign * (1 + mant / (1 << mant_bits)) * 2.0 ** (exp - bias)


def as_float64(array: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """The values of ``array`` (as :func:`tensor_array` returns it for ``dtype``) as float64.

    Complex dtypes give complex128; bool and integer dtypes their values (quantized tensors
    their raw integers, not dequantized). Always native-endian.

    Args:
        array: elements as :func:`tensor_array` returns them.
        dtype: the tensor's torch dtype name.
        out: a float64 array of ``array``'s shape to write into (reused buffers avoid fresh
            memory per piece); ignored for complex dtypes.

    Raises:
        ValueError: for packed sub-byte dtypes (float4_e2m1fn_x2, quint4x2, bits...), which have
            no value per array element.
    """
    import numpy as np

    if dtype in PACKED:
        raise ValueError(f"{dtype} packs several values per byte: no element values")
    if dtype == "complex32":
        return array["real"].astype(np.float64) + 1j * array["imag"].astype(np.float64)
    if dtype.startswith("complex"):
        return array.astype(np.complex128)
    if out is None:
        out = np.empty(array.shape, dtype=np.float64)
    if dtype == "bfloat16":
        np.copyto(out, np.left_shift(array, 16, dtype=np.uint32).view(np.float32))
    elif dtype == "float8_e5m2":
        np.copyto(out, np.left_shift(array, 8, dtype=np.uint16).view(np.float16))
    elif dtype in RAW_FLOATS:
        np.take(_float8_table(dtype), array, out=out)
    else:
        np.copyto(out, array, casting="unsafe")
    return out


def as_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """Like :func:`as_float64`, in float32 (complex64 for complex dtypes)."""
    import numpy as np

    if dtype == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("float16", "float32") or dtype.startswith(("int", "uint", "bool", "q")):
        return array.astype(np.float32)
    out = as_float64(array, dtype)
    return out.astype(np.complex64 if np.iscomplexobj(out) else np.float32)


def bits_view(array: np.ndarray) -> np.ndarray:
    """The elements as 1-D native-endian unsigned integers (bit equality; NaN == same NaN).

    complex128 elements become two uint64 each. Copies only what is not already contiguous
    native-endian.
    """
    import numpy as np

    dt = array.dtype
    fields = [f[0] for f in dt.fields.values()] if dt.fields else [dt]
    if any(f.byteorder == ">" for f in fields):
        array = array.astype(_native(dt))
    flat = np.ascontiguousarray(array).reshape(-1)
    width = dt.itemsize
    return flat.view(np.uint64 if width > 8 else np.dtype(f"u{width}"))


def _native(dt: np.dtype[Any]) -> np.dtype[Any]:
    import numpy as np

    if dt.fields is not None:
        return np.dtype([(name, f[0].newbyteorder("=")) for name, f in dt.fields.items()])
    return dt.newbyteorder("=")


def iter_chunks(array: np.ndarray, max_elements: int = 1 << 20) -> Iterator[np.ndarray]:
    """The elements of ``array`` in C order, as 1-D pieces of at most ``max_elements``.

    Each piece copies only itself (a strided view is gathered piece by piece, never whole);
    two arrays of the same shape are cut at the same places, so pieces line up.
    """
    if array.ndim == 0:
        yield array.reshape(1)
        return
    if array.size == 0:
        return
    if array.ndim == 1:
        for i in range(0, array.shape[0], max_elements):
            yield array[i : i + max_elements]
        return
    row = array[0].size
    if row > max_elements:
        for i in range(array.shape[0]):
            yield from iter_chunks(array[i], max_elements)
        return
    step = max(1, max_elements // max(row, 1))
    for i in range(0, array.shape[0], step):
        yield array[i : i + step].reshape(-1)
