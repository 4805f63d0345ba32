"""torch's legacy (non-zip) format: magic number, protocol, sys info, object, keys, raw storages."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from ..errors import CheckpointError
from ..model import Checkpoint, StorageInfo
from ..source import file_view, open_source
from ..tree import walk
from ..unpickling.scan import check_views, unpickle
from ..unpickling.unpickler import LEGACY_MAGIC, LEGACY_PROTOCOL, StorageType, StorageValue

_MAGIC_LONG1 = b"\x8a\x0a" + LEGACY_MAGIC.to_bytes(10, "little")
_MAGIC_TEXT = b"L" + str(LEGACY_MAGIC).encode() + b"L\n."  # protocols 0 and 1


def looks_legacy(head: bytes) -> bool:
    """Whether a file's first bytes are torch's pickled legacy magic number, at any pickle
    protocol ``torch.save(..., pickle_protocol=N)`` writes: 0-1 (text LONG), 2-3 (PROTO,
    LONG1), 4-5 (PROTO, FRAME, LONG1)."""
    if head.startswith(_MAGIC_TEXT):
        return True
    if len(head) < 2 or head[0] != 0x80 or not 2 <= head[1] <= 5:
        return False
    body = head[2:]
    if head[1] >= 4 and body[:1] == b"\x95":  # FRAME and its 8-byte length
        body = body[9:]
    return body.startswith(_MAGIC_LONG1)


def read(path: str, file_bytes: int, seen: dict[str, str] | None = None) -> Checkpoint:
    seen = {} if seen is None else seen
    with open_source(path) as raw, file_view(raw) as f:
        magic, _ = unpickle(path, f, "the magic number", seen=seen, end=file_bytes)
        if magic != LEGACY_MAGIC:
            raise CheckpointError(path, "is a pickle file, but not a torch checkpoint")
        protocol, _ = unpickle(path, f, "the protocol version", seen=seen, end=file_bytes)
        if protocol != LEGACY_PROTOCOL:
            raise CheckpointError(path, f"unsupported legacy protocol version {protocol!r}")
        sys_info, _ = unpickle(path, f, "the system info", seen=seen, end=file_bytes)
        little = not (isinstance(sys_info, dict) and sys_info.get("little_endian") is False)
        declared = _Declared(path, little)
        root, unpickler = unpickle(
            path, f, "the pickled object", declared.resolve, seen, end=file_bytes
        )
        keys, _ = unpickle(path, f, "the storage key list", seen=seen, end=file_bytes)
        if not isinstance(keys, list) or not all(isinstance(k, (str, int)) for k in keys):
            raise CheckpointError(path, "the storage key list is corrupt")
        storages, pos = _locate(declared, raw, keys, f.tell(), file_bytes)

    for ref in unpickler.tensors:
        if ref.storage is not None:
            ref.storage = storages[ref.storage.key]
    _locate_saved_storages(root, storages)
    check_views(path, unpickler.tensors)
    facts: dict[str, Any] = {
        "protocol_version": protocol,
        "sys_info": sys_info if isinstance(sys_info, dict) else None,
        "trailing_bytes": file_bytes - pos,
    }
    if unpickler.module_sources:
        facts["module_sources"] = sorted(set(unpickler.module_sources))
    return Checkpoint(
        path=path,
        format="legacy",
        file_bytes=file_bytes,
        root=root,
        storages=storages,
        globals=list(seen),
        facts=facts,
    )


def _locate_saved_storages(root: Any, storages: dict[str, StorageInfo]) -> None:
    """Point each storage saved directly (``torch.save({"s": t.untyped_storage()})``) at its
    located record, as the tensors are: until then it holds the placeholder, whose offset is
    unknown (-1), and a writer would copy its bytes from there."""
    for _, node in walk(root):
        if isinstance(node, StorageValue):
            node.base = storages[node.base.key]


class _Declared:
    """The storages the pickle declares (by persistent id), before their bytes are located."""

    def __init__(self, path: str, little: bool) -> None:
        self.path = path
        self.little = little
        self.declared: dict[str, tuple[StorageType, str, int]] = {}
        self.placeholders: dict[str, StorageInfo] = {}

    def resolve(
        self, storage_type: StorageType, key: str, location: str, numel: int
    ) -> StorageInfo:
        seen = self.declared.get(key)
        if seen is None:
            self.declared[key] = (storage_type, location, numel)
            self.placeholders[key] = StorageInfo(
                key, storage_type.dtype, numel, location, self.path, -1, big_endian=not self.little
            )
        elif seen[0].dtype != storage_type.dtype or seen[2] != numel:
            raise CheckpointError(self.path, f"storage {key!r} is declared twice with other sizes")
        return self.placeholders[key]


def _locate(
    declared: _Declared, source: Any, keys: list[Any], pos: int, file_bytes: int
) -> tuple[dict[str, StorageInfo], int]:
    """Each listed storage's bytes, which follow the key list in its order, each after an
    8-byte element count; returns the storages and the position after the last one."""
    path, little, placeholders = declared.path, declared.little, declared.placeholders
    storages: dict[str, StorageInfo] = {}
    for key in map(str, keys):
        if key not in placeholders:
            raise CheckpointError(path, f"storage {key!r} is listed but no tensor uses it")
        if key in storages:
            raise CheckpointError(path, f"storage {key!r} is listed twice")
        ph = placeholders[key]
        check = _count_check(source, path, key, pos, ph.numel, little)
        expect = getattr(source, "expect", None)  # a URL: checked when the bytes are first read
        if expect is None:
            check()
        else:
            expect(pos + 8, pos + 8 + ph.nbytes, check)
        start = pos + 8
        end = start + ph.nbytes
        if end > file_bytes:
            raise CheckpointError(path, f"is truncated: storage {key!r} is cut short")
        storages[key] = StorageInfo(
            key, ph.dtype, ph.numel, ph.location, path, start, big_endian=not little
        )
        pos = end
    missing = set(placeholders) - set(storages)
    if missing:
        raise CheckpointError(path, f"storage {sorted(missing)[0]!r} is missing from the file")
    return storages, pos


def _count_check(
    source: Any, path: str, key: str, pos: int, numel: int, little: bool
) -> Callable[[], None]:
    """The check that the 8-byte element count before a storage's bytes is the pickle's."""

    def check() -> None:
        header = source.pread(8, pos)
        if len(header) < 8:
            raise CheckpointError(path, f"is truncated: storage {key!r} is missing")
        (found,) = struct.unpack("<q" if little else ">q", header)
        if found != numel:
            raise CheckpointError(
                path, f"storage {key!r} holds {found} elements but the pickle says {numel}"
            )

    return check
