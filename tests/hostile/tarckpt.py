"""Pre-1.0 torch checkpoints: a tar with members ``storages``, ``tensors`` and ``pickle``, as
``torch.serialization._legacy_load.legacy_load`` reads them.

What torch reads, in order (every pickle with ``pickle.load``, so every one can run code):

* ``storages``: a pickle ``n``; then ``n`` times a pickle ``(key, location, storage_type)``
  followed by the raw storage (``<q numel`` then ``numel * itemsize`` bytes); then a pickle,
  the list of storage views ``(target, root, offset, numel)``;
* ``tensors``: a pickle ``n``; then ``n`` times a pickle ``(key, storage_key, tensor_type)``
  followed by ``<i ndim``, 4 bytes, ``ndim`` sizes and strides (``<q``) and ``<q offset``;
* ``pickle``: the object, with persistent ids: an int-like key of a tensor or storage, or a
  tuple whose first item is returned as is (``(class, source_file, source)``).

Members are found with ``tarfile``, so links, duplicates and PAX names resolve as it does.
"""

from __future__ import annotations

import io
import struct
import tarfile
from dataclasses import dataclass, field
from typing import Any

from . import pk
from .pk import G


@dataclass(frozen=True)
class Storage:
    key: int
    data: bytes  # float32 little-endian values
    args: bytes | None = None  # the (key, location, type) pickle as is (None: the real one)

    def pickle(self) -> bytes:
        if self.args is not None:
            return self.args
        return pk.dumps((self.key, "cpu", G("torch", "FloatStorage")))


@dataclass(frozen=True)
class Tensor:
    key: int
    storage: int
    size: tuple[int, ...]
    args: bytes | None = None  # the (key, storage_key, type) pickle as is

    def pickle(self) -> bytes:
        if self.args is not None:
            return self.args
        return pk.dumps((self.key, self.storage, G("torch", "FloatTensor")))


def storages_member(
    storages: list[Storage], *, count: bytes | None = None, views: bytes | None = None
) -> bytes:
    out = [count if count is not None else pk.dumps(len(storages))]
    for s in storages:
        out += [s.pickle(), struct.pack("<q", len(s.data) // 4), s.data]
    out.append(views if views is not None else pk.dumps([]))
    return b"".join(out)


def tensors_member(tensors: list[Tensor], *, count: bytes | None = None) -> bytes:
    out = [count if count is not None else pk.dumps(len(tensors))]
    for t in tensors:
        stride = pk.contiguous_stride(t.size)
        nd = len(t.size)
        out += [
            t.pickle(),
            struct.pack("<i", nd) + b"\0" * 4,
            struct.pack(f"<{nd}q", *t.size),
            struct.pack(f"<{nd}q", *stride),
            struct.pack("<q", 0),
        ]
    return b"".join(out)


@dataclass
class Member:
    name: str
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE  # SYMTYPE / LNKTYPE for links
    linkname: str = ""
    pax: dict[str, str] = field(default_factory=dict)  # PAX records (e.g. path=...)


def tar_bytes(members: list[Member]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type, info.linkname, info.mtime, info.mode = m.kind, m.linkname, 0, 0o644
            info.pax_headers = dict(m.pax)
            if m.kind == tarfile.REGTYPE:
                info.size = len(m.data)
                tar.addfile(info, io.BytesIO(m.data))
            else:
                tar.addfile(info)
    return out.getvalue()


# The benign checkpoint every case starts from: one float tensor w = [[0, 1, 2], [3, 4, 5]].
W_DATA = struct.pack("<6f", 0, 1, 2, 3, 4, 5)
STORAGE_KEY, TENSOR_KEY = 1000, 2000


def benign_parts(main: Any = None) -> dict[str, bytes]:
    """The three members of a benign checkpoint; ``main``: the object (default {'w': w})."""
    obj = {"w": pk.PersId(str(TENSOR_KEY))} if main is None else main
    return {
        "storages": storages_member([Storage(STORAGE_KEY, W_DATA)]),
        "tensors": tensors_member([Tensor(TENSOR_KEY, STORAGE_KEY, (2, 3))]),
        "pickle": pk.dumps(obj),
    }


def checkpoint(parts: dict[str, bytes], extra: list[Member] = ()) -> bytes:  # type: ignore[assignment]
    members = [Member("sys_info", pk.dumps({"little_endian": True}))]
    members += [Member(n, d) for n, d in parts.items()]
    return tar_bytes([*members, *extra])
