"""The DCP writer: the folder ``torch.distributed.checkpoint.save`` writes, without torch.

A rank's file (``__0_0.distcp``) is a run of items, each a complete torch zip as ``torch.save``
writes it to a stream (offsets relative to the item): first the pickled values, then one item
per tensor chunk (``data.pkl`` rebuilding a contiguous tensor from storage ``0``, the storage
record, the archive's small records). Tensor bytes are written by the caller's ``write_data``
(a kernel copy or a streamed cast), read back in the background and their CRC-32 patched into
the item's zip headers afterwards. Then ``.metadata`` (:mod:`.dcp_metadata`) names every item.
:func:`verify_folder` re-reads the folder with ckpttool's own DCP reader.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import dtypes
from ..errors import CheckpointError
from ..model import StorageInfo, TensorRef
from . import copy as bytecopy
from .crc import crc32
from .dcp_metadata import Entry, Stored, metadata_bytes
from .pt_pickle import OutStorage, dumps
from .zipwriter import ZipWriter, add_torch_header

METADATA = ".metadata"
ARCHIVE = "archive"  # torch.save names a stream's archive "archive"
PAGE_ALIGN_FROM = 1 << 20  # records at least this big keep their source's offset modulo 4096


@dataclass(eq=False)
class TensorItem:
    """One tensor of the output, stored as one chunk (the whole tensor)."""

    fqns: list[str]  # every key that names it (tied weights: one item, several keys)
    paths: list[tuple[Any, ...]]
    ref: TensorRef  # the source
    dtype: str  # the output dtype
    phase: int | None = None  # keep data at this offset modulo 4096 (page-aligned copies)
    stored: Stored | None = None
    start: int = 0  # absolute offset of the bytes in the file
    crc: int | None = None  # CRC-32 of the bytes, once known
    job: Any = None  # the background read-back that yields it
    read_back: bool = False
    zip: tuple[ZipWriter, int] | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.ref.shape

    @property
    def nbytes(self) -> int:
        return self.ref.numel * dtypes.get(self.dtype).itemsize


@dataclass(eq=False)
class ValueItem:
    """One pickled value of the output (a step count, a learning rate, a list of names)."""

    fqn: str
    path: tuple[Any, ...]
    value: Any
    stored: Stored | None = None


WriteData = Callable[[TensorItem, int], None]  # write the item's bytes at fd's position


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        stride[d] = stride[d + 1] * max(shape[d + 1], 1)
    return tuple(stride)


def tensor_pickle(dtype: str, shape: tuple[int, ...]) -> bytes:
    """``data.pkl`` of ``torch.save(t)`` for a contiguous CPU tensor over storage ``0``."""
    numel = 1
    for s in shape:
        numel *= s
    storage = StorageInfo("0", dtype, numel, "cpu", "", 0)
    ref = TensorRef(storage, 0, shape, _contiguous(shape), dtype=dtype)
    out = OutStorage("0", dtype, numel)
    return dumps(ref, {id(ref): out}, {id(ref): dtype})


def _serial(pkl: bytes, n: int) -> bytes:
    return f"{crc32(pkl):020d}{n:020d}".encode()


def _value_item(fd: int, rel: str, item: ValueItem) -> None:
    base = os.lseek(fd, 0, os.SEEK_CUR)
    pkl = dumps(item.value, {}, {})
    zw = ZipWriter(fd)
    add_torch_header(zw, ARCHIVE, pkl)
    zw.add_bytes(f"{ARCHIVE}/version", b"3\n")
    zw.add_bytes(f"{ARCHIVE}/.data/serialization_id", _serial(pkl, 0))
    zw.finish()
    item.stored = Stored(rel, base, zw.pos - base)


def _tensor_item(
    fd: int,
    rel: str,
    item: TensorItem,
    pkl: bytes,
    write_data: WriteData,
) -> None:
    base = os.lseek(fd, 0, os.SEEK_CUR)
    zw = ZipWriter(fd)
    add_torch_header(zw, ARCHIVE, pkl)
    if item.phase is not None and item.nbytes >= PAGE_ALIGN_FROM:  # absolute page phase
        phase = (item.phase - base) % 4096
        item.start = zw.begin(f"{ARCHIVE}/data/0", item.nbytes, align=4096, phase=phase)
    else:
        item.start = zw.begin(f"{ARCHIVE}/data/0", item.nbytes)
    write_data(item, fd)
    zw.end()
    item.zip = (zw, len(zw.entries) - 1)
    zw.add_bytes(f"{ARCHIVE}/version", b"3\n")
    zw.add_bytes(f"{ARCHIVE}/.data/serialization_id", _serial(pkl, 1))
    zw.finish()
    item.stored = Stored(rel, base, zw.pos - base)


def write_rank_file(
    path: str,
    rel: str,
    values: list[ValueItem],
    tensors: list[TensorItem],
    write_data: WriteData,
) -> None:
    """Write one ``.distcp`` file: the values' items, then the tensors' (CRCs patched last).

    Every item gets its ``stored`` place; a tensor's ``crc`` is known when this returns (a
    read-back that finds the copy differs from its source raises :class:`CheckpointError`).
    """
    templates: dict[tuple[str, tuple[int, ...]], bytes] = {}
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        for v in values:
            _value_item(fd, rel, v)
        for t in tensors:
            key = (t.dtype, t.shape)
            pkl = templates.get(key)
            if pkl is None:
                pkl = templates[key] = tensor_pickle(t.dtype, t.shape)
            _tensor_item(fd, rel, t, pkl, write_data)
        for t in tensors:
            if t.job is not None:
                try:
                    t.crc = int(t.job.result())
                except bytecopy.CopyMismatch as exc:
                    raise CheckpointError(
                        path, f"verification failed: tensor {t.fqns[0]!r} {exc}"
                    ) from None
                t.read_back = True
            assert t.crc is not None and t.zip is not None
            zw, index = t.zip
            zw.set_crc(index, t.crc)
            t.zip = None
    finally:
        os.close(fd)


def entries_of(values: list[ValueItem], tensors: list[TensorItem], order: list[str]) -> list[Entry]:
    """The metadata entries of every key, in ``order``."""
    by: dict[str, Entry] = {}
    for v in values:
        by[v.fqn] = Entry(v.fqn, v.path, stored=v.stored)
    for t in tensors:
        assert t.stored is not None
        for fqn, path in zip(t.fqns, t.paths, strict=True):
            zeros = (0,) * len(t.shape)
            by[fqn] = Entry(fqn, path, t.dtype, t.shape, ((zeros, t.shape, t.stored),))
    return [by[fqn] for fqn in order]


def write_metadata(folder: str, entries: list[Entry], checkpoint_id: str) -> None:
    data = metadata_bytes(entries, checkpoint_id)
    with open(os.path.join(folder, METADATA), "wb") as f:
        f.write(data)


def verify_folder(
    folder: str, values: list[ValueItem], tensors: list[TensorItem], order: list[str]
) -> None:
    """Re-read the folder with ckpttool's DCP reader: every key, dtype, shape and value as
    planned, each record where it was written with the CRC-32 written (bytes that were not
    read back while writing are read now)."""
    from ..readers import dcp as dcp_reader

    def fail(what: str) -> CheckpointError:
        return CheckpointError(folder, f"verification failed: {what}; nothing was written")

    try:
        dc = dcp_reader.read(folder, {})
    except CheckpointError as exc:
        raise fail(f"ckpttool cannot read it back ({exc.message})") from None
    if dc.facts.get("order") != order:
        raise fail("the keys differ from those written")
    by = dc.by_name()
    for v in values:
        if not _same(dc.entries.get(v.fqn, _MISSING), v.value):
            raise fail(f"value {v.fqn!r} reads back differently")
    for t in tensors:
        for fqn in t.fqns:
            got = by.get(fqn)
            if got is None or got.dtype != t.dtype or got.shape != t.shape:
                raise fail(f"tensor {fqn!r} reads back with another dtype or shape")
            if t.nbytes and (
                len(got.segments) != 1
                or got.segments[0].offset != t.start
                or got.segments[0].crc != t.crc
            ):
                raise fail(f"tensor {fqn!r} is not where it was written")
        if not t.read_back and t.nbytes:
            path = os.path.join(folder, t.stored.relative_path if t.stored else "")
            fd = os.open(path, os.O_RDONLY)
            try:
                if bytecopy.crc_range(fd, t.start, t.nbytes) != t.crc:
                    raise fail(f"tensor {t.fqns[0]!r}'s bytes differ from what was written")
            finally:
                os.close(fd)


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    """Equal plain values, a NaN equal to a NaN (a run's ``best_loss`` may be one)."""
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        same_kind = type(a) is type(b)
        return same_kind and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and bool(a == b)


def _dcp_file(name: str) -> bool:
    import re

    return name == METADATA or re.fullmatch(r"__\d+(_\d+\.distcp|\.metadata)", name) is not None


def check_folder_target(inputs: list[str], dst: str, *, force: bool) -> None:
    """Refuse an output folder that would clobber something without being asked to.

    An existing ``dst`` is replaced only with ``force``, and only when it holds nothing but a
    DCP checkpoint's files (``.metadata``, ``__R_N.distcp``), so no other file is ever lost.
    """
    from .atomic import _same_file, resolve_output

    shown, dst = dst, resolve_output(dst)
    for src in inputs:
        if os.path.exists(dst) and (
            _same_file(src, dst) or os.path.dirname(os.path.abspath(src)) == os.path.abspath(dst)
        ):
            raise CheckpointError(shown, "output is the input (or holds it)")
    if os.path.lexists(dst):
        if not os.path.isdir(dst):
            raise CheckpointError(shown, "output exists and is not a folder")
        if not force:
            raise CheckpointError(shown, "output exists", remedy="force")
        others = sorted(n for n in os.listdir(dst) if not _dcp_file(n))
        if others:
            raise CheckpointError(
                shown, f"output folder holds other files than a DCP checkpoint ({others[0]})"
            )
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise CheckpointError(shown, f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CheckpointError(shown, f"permission denied: cannot write in {parent}")
