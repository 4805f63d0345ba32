"""The items of ``.distcp`` files: where one chunk's tensor bytes lie, and as which segments.

An item is a complete, uncompressed torch zip of one chunk tensor (or of one pickled value) at
``(offset, length)`` of a rank's file, or an entry of the safetensors data that
``SerializationFormat.SAFETENSORS`` appends. Only zip directories, ``data.pkl`` and headers are
read here, never tensor bytes; :mod:`ckpttool.readers.dcp` reads the metadata that names them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .. import dtypes
from ..errors import CheckpointError
from ..model import TensorRef
from ..source import LocalSource, getsize, is_url, read_bytes
from .distributed import Segment

EDGE = 4096  # an item's zip headers and data.pkl lie in its first bytes, its directory in its last
ADVISE_MIN = 16  # edges in one file: fewer are read unadvised (a few waits at most)


class Item:
    """Where one item lies: a .distcp file, an offset and a length."""

    __slots__ = ("file", "length", "offset")

    def __init__(self, file: str, offset: int, length: int) -> None:
        self.file = file
        self.offset = offset
        self.length = length


def will_read(items: Iterable[Item]) -> None:
    """Advise the kernel of every item's first and last bytes (its zip's headers and pickle,
    its directory), which reading the items takes next: a folder out of the page cache then
    has them read in one queue, not one wait after another (local files)."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for st in items:
        if is_url(st.file):
            return
        edges = ranges.setdefault(st.file, [])
        edges.append((st.offset, min(st.length, EDGE)))
        if st.length > EDGE:
            edges.append((st.offset + st.length - EDGE, EDGE))
    for file, edges in ranges.items():
        if len(edges) >= ADVISE_MIN:
            try:
                src = LocalSource(file)
            except OSError:  # advice only: reading the items says what is wrong
                continue
            with src:
                src.will_read(edges)


def _head(st: Item) -> bytes:
    return read_bytes(st.file, 9, st.offset)


def _check_head(st: Item, what: str) -> None:
    if not _head(st).startswith(b"PK\x03\x04"):
        raise CheckpointError(st.file, f"item {what!r} at offset {st.offset} is not a torch zip")


def _safetensors_header(st: Item, cache: dict[Any, Any]) -> tuple[dict[str, Any], int]:
    """The header of the safetensors file that ``SerializationFormat.SAFETENSORS`` appends to a
    rank's file after its pickled values; its tensor items all point at its start."""
    import json

    key = (st.file, st.offset)
    if key not in cache:
        n = int.from_bytes(read_bytes(st.file, 8, st.offset), "little")
        if n > 100 << 20:
            raise CheckpointError(st.file, f"the safetensors header at {st.offset} is too big")
        raw = read_bytes(st.file, n, st.offset + 8)
        try:
            header = json.loads(raw)
        except ValueError:
            raise CheckpointError(
                st.file, f"the safetensors header at {st.offset} is corrupt"
            ) from None
        if not isinstance(header, dict) or len(raw) != n:
            raise CheckpointError(st.file, f"the safetensors header at {st.offset} is corrupt")
        cache[key] = (header, st.offset + 8 + n)
    return cache[key]


def _safetensors_chunk(
    st: Item, fqn: str, dtype: str, sizes: tuple[int, ...], cache: dict[Any, Any]
) -> tuple[int, int | None]:
    header, data_start = _safetensors_header(st, cache)
    entry = header.get(fqn)
    if not isinstance(entry, dict):
        raise CheckpointError(st.file, f"the safetensors data at {st.offset} lacks {fqn!r}")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    known = dtypes.SAFETENSORS_DTYPES.get(code) if isinstance(code, str) else None
    nbytes = _numel(sizes) * dtypes.get(dtype).itemsize
    if (
        known is None
        or known.name != dtype
        or not isinstance(shape, list)
        or tuple(shape) != sizes
        or not (isinstance(offsets, list) and len(offsets) == 2)
        or not all(isinstance(v, int) for v in offsets)
        or offsets[1] - offsets[0] != nbytes
        or offsets[0] < 0
    ):
        raise CheckpointError(
            st.file, f"the safetensors entry of {fqn!r} does not match the metadata"
        )
    start = data_start + offsets[0]
    if start + nbytes > getsize(st.file):
        raise CheckpointError(st.file, f"is truncated: item {fqn!r} is cut short")
    return start, None


def read_item(st: Item, what: str, seen: dict[str, str]) -> Any:
    """Unpickle one item (a torch zip at a sub-range of its .distcp file)."""
    from . import torch_zip

    _check_head(st, what)
    return torch_zip.read(st.file, st.length, seen, base=st.offset).root


class _Template:
    """What one chunk item's ``data.pkl`` says (identical pickles say the same thing)."""

    __slots__ = ("contiguous", "dtype", "itemsize", "key", "nbytes", "shape", "storage_offset")

    def __init__(self, root: Any, st: Item, fqn: str) -> None:
        if not isinstance(root, TensorRef) or root.storage is None:
            raise CheckpointError(st.file, f"item {fqn!r} at offset {st.offset} is not a tensor")
        storage = root.storage
        if storage.compressed or storage.big_endian:
            raise CheckpointError(
                st.file, f"item {fqn!r} is not stored as plain little-endian bytes"
            )
        self.dtype, self.shape = root.dtype, root.shape
        self.key = storage.record.split("/", 1)[1] if storage.record else storage.key
        self.nbytes = storage.nbytes
        self.contiguous = root.is_contiguous()
        self.storage_offset = root.storage_offset
        self.itemsize = root.itemsize


def chunk_item(
    st: Item,
    fqn: str,
    dtype: str,
    sizes: tuple[int, ...],
    seen: dict[str, str],
    cache: dict[Any, Any],
) -> tuple[int, int | None]:
    """Absolute offset of a chunk item's tensor bytes (and their CRC-32 when the storage
    record is exactly the chunk), after checking the item holds what the metadata says.

    Items of one shape pickle the same ``data.pkl``: it is unpickled once, and later items
    only have their zip directory read.
    """
    import zipfile

    from . import torch_zip

    head = _head(st)
    if len(head) == 9 and head[8:9] == b"{":  # SerializationFormat.SAFETENSORS
        return _safetensors_chunk(st, fqn, dtype, sizes, cache)
    if not head.startswith(b"PK\x03\x04"):
        raise CheckpointError(st.file, f"item {fqn!r} at offset {st.offset} is not a torch zip")
    archive = torch_zip.ZipArchive(st.file, st.length, st.offset)
    try:
        if not archive.has("data.pkl"):
            raise CheckpointError(st.file, f"item {fqn!r} has no data.pkl")
        if archive.has("byteorder") and archive.read_small("byteorder", 16).strip() != b"little":
            raise CheckpointError(st.file, f"item {fqn!r} is not little-endian")
        pkl = archive.read_small("data.pkl")
        tpl = cache.get(pkl)
        if tpl is None:
            root = torch_zip._read(archive, st.file, st.length, seen).root
            tpl = cache[pkl] = _Template(root, st, fqn)
        info = archive.entries.get(tpl.key)
        if info is None or info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(st.file, f"item {fqn!r} has no plain storage record")
        if info.file_size != tpl.nbytes:
            raise CheckpointError(st.file, f"item {fqn!r}'s storage record has the wrong size")
        offset = archive.data_offset(info)
        if offset - st.offset + info.file_size > st.length:
            raise CheckpointError(st.file, f"is truncated: item {fqn!r} is cut short")
    finally:
        archive.close()
    if tpl.dtype != dtype or tpl.shape != sizes or not tpl.contiguous:
        raise CheckpointError(
            st.file,
            f"item {fqn!r} holds a {tpl.dtype} tensor of shape {list(tpl.shape)}, "
            f"the metadata says a contiguous {dtype} {list(sizes)}",
        )
    whole = tpl.storage_offset == 0 and tpl.nbytes == _numel(sizes) * tpl.itemsize
    crc = (info.CRC if info.CRC or not info.file_size else None) if whole else None
    return offset + tpl.storage_offset * tpl.itemsize, crc


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def chunk_segments(
    shape: tuple[int, ...],
    itemsize: int,
    box_offsets: tuple[int, ...],
    box_sizes: tuple[int, ...],
    file: str,
    start: int,
    crc: int | None = None,
) -> list[Segment]:
    """The rows of a C-order chunk ``box`` of a tensor of ``shape`` as segments.

    ``crc`` is the CRC-32 of the chunk's whole bytes (kept when the chunk is one segment).
    """
    n = len(shape)
    strides = [1] * n
    for d in range(n - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    j = -1  # the last dimension the chunk does not span fully
    for d in range(n):
        if box_sizes[d] != shape[d]:
            j = d
    if j <= 0:  # one run: the whole tensor or a box split only along dim 0
        numel = 1
        for s in box_sizes:
            numel *= s
        dest = sum(o * st for o, st in zip(box_offsets, strides, strict=True))
        if not numel:
            return []
        return [Segment(file, start, numel * itemsize, dest * itemsize, crc)]
    run = box_sizes[j] * strides[j]  # elements per contiguous run
    segments: list[Segment] = []
    src = start
    outer = [range(box_sizes[d]) for d in range(j)]
    import itertools

    for idx in itertools.product(*outer):
        dest = sum((box_offsets[d] + i) * strides[d] for d, i in enumerate(idx))
        dest += box_offsets[j] * strides[j]
        segments.append(Segment(file, src, run * itemsize, dest * itemsize))
        src += run * itemsize
    return segments
