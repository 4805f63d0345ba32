"""The ``.metadata`` pickle of a DCP folder, written without torch.

``torch.distributed.checkpoint``'s ``FileSystemWriter.finish`` pickles one ``Metadata`` dataclass:
``state_dict_metadata`` (each flattened key's ``TensorStorageMetadata``: dtype, global size,
chunk boxes; or ``BytesStorageMetadata``), ``planner_data`` (each key's path in the nested state
dict), ``storage_data`` (``MetadataIndex`` -> ``_StorageInfo``: file, offset, length),
``storage_meta`` and ``version``. Here the same objects are built as placeholders of those
classes (never imported) and pickled by :mod:`.pt_pickle`'s pickler, built as torch 2.13's
pickle builds them: dataclasses by ``__new__`` then their ``__dict__``, ``TensorProperties``
from its ``__getstate__`` tuple, ``torch.Size`` and the layout by a call.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass
from typing import Any

from ..model import Opaque
from ..unpickling.unpickler import DTypeRef
from .crc import crc32
from .pt_pickle import dumps

DCP_VERSION = "1.0.0"  # torch 2.13's CURRENT_DCP_VERSION
_META = "torch.distributed.checkpoint.metadata"
_FS = "torch.distributed.checkpoint.filesystem"
_classes: dict[str, type[Opaque]] = {}


def _cls(module: str, name: str) -> type[Opaque]:
    full = f"{module}.{name}"
    cls = _classes.get(full)
    if cls is None:
        meta: Any = type(Opaque)
        cls = _classes[full] = meta(
            name,
            (Opaque,),
            {"__ck_global__": full, "__ck_module__": module, "__ck_qualname__": name},
        )
    return cls


def _new(module: str, name: str, state: Any) -> Opaque:
    """``cls.__new__(cls)`` then BUILD with ``state`` (how pickle rebuilds a dataclass)."""
    cls = _cls(module, name)
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    return obj


def _call(module: str, name: str, *args: Any) -> Opaque:
    """``module.name(*args)`` (REDUCE)."""
    return _cls(module, name)(*args)


def size(dims: tuple[int, ...]) -> Opaque:
    return _call("torch", "Size", tuple(dims))


@dataclass(frozen=True)
class Stored:
    """Where one item lies: a file of the folder (``__0_0.distcp``), an offset and a length."""

    relative_path: str
    offset: int
    length: int


@dataclass(frozen=True)
class Entry:
    """One flattened key of the checkpoint: a tensor (``dtype``, ``shape``, its chunks) or a
    pickled value (``dtype`` None)."""

    fqn: str
    path: tuple[Any, ...]
    dtype: str | None = None
    shape: tuple[int, ...] = ()
    chunks: tuple[tuple[tuple[int, ...], tuple[int, ...], Stored], ...] = ()  # offsets, sizes
    stored: Stored | None = None  # a value's item


def _properties(dtype: str, shared: dict[str, Any]) -> Opaque:
    """``TensorProperties`` as its ``__getstate__`` tuple; the layout, the memory format and
    the dtype are one object each, pickled once and then referenced, as torch's pickle does."""
    if not shared:
        shared["layout"] = _call("torch.serialization", "_get_layout", "torch.strided")
        shared["format"] = _call(_META, "_MEM_FORMAT_ENCODING", 0)
    ref = shared.setdefault(dtype, DTypeRef(dtype))
    state = (ref, shared["layout"], False, shared["format"], False)
    return _new(_META, "TensorProperties", state)


def _storage_info(st: Stored) -> Opaque:
    # one string object per file name (the pickle memoises by identity: the same bytes
    # whichever process built the record)
    rel = sys.intern(st.relative_path)
    state = {"relative_path": rel, "offset": st.offset, "length": st.length}
    return _new(_FS, "_StorageInfo", state)


def _describe(entry: Entry, storage: dict[Any, Any], shared: dict[str, Any]) -> Opaque:
    """The entry's ``TensorStorageMetadata`` or ``BytesStorageMetadata``; its items go into
    ``storage`` keyed by ``MetadataIndex``."""
    if entry.dtype is None:
        assert entry.stored is not None
        index = _new(_META, "MetadataIndex", {"fqn": entry.fqn, "index": None})
        storage[index] = _storage_info(entry.stored)
        return _new(_META, "BytesStorageMetadata", {})
    chunks = []
    for i, (offsets, sizes, st) in enumerate(entry.chunks):
        chunk = {"offsets": size(offsets), "sizes": size(sizes)}
        chunks.append(_new(_META, "ChunkStorageMetadata", chunk))
        state = {"fqn": entry.fqn, "index": i, "offset": size(offsets)}
        index = _new(_META, "MetadataIndex", state)
        storage[index] = _storage_info(st)
    props = _properties(entry.dtype, shared)
    state = {"properties": props, "size": size(entry.shape), "chunks": chunks}
    return _new(_META, "TensorStorageMetadata", state)


def metadata_bytes(entries: list[Entry], checkpoint_id: str) -> bytes:
    """The ``.metadata`` pickle for ``entries`` (in this order), as ``dcp.save`` writes it.

    ``save_id`` is derived from the content, so the same input always gives the same bytes.
    """
    sdm: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    planner = {}
    shared: dict[str, Any] = {}
    for entry in entries:
        entry = Entry(sys.intern(entry.fqn), entry.path, entry.dtype, entry.shape,
                      entry.chunks, entry.stored)  # fmt: skip
        sdm[entry.fqn] = _describe(entry, storage, shared)
        planner[entry.fqn] = tuple(entry.path)

    digest = crc32("\n".join(repr(e) for e in entries).encode())
    meta: dict[str, Any] = {
        "checkpoint_id": checkpoint_id,
        "save_id": str(uuid.UUID(int=(digest << 96) | len(entries), version=4)),
        "load_id": None,
        "modules": [],
    }
    state = {
        "state_dict_metadata": sdm,
        "planner_data": planner,
        "storage_data": storage,
        "storage_meta": _new(_META, "StorageMeta", meta),
        "version": DCP_VERSION,
    }
    return dumps(_new(_META, "Metadata", state), {}, {})
