"""safetensors: an 8-byte header length, a JSON header, then dense little-endian tensor bytes.

The header is validated here rather than trusted to the safetensors library, which accepts some
files its own spec forbids (duplicate keys, for one).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from typing import Any

from .. import dtypes
from ..errors import CheckpointError
from ..model import Checkpoint, StorageInfo, TensorRef
from ..source import open_source

MAX_HEADER = 100 * 1000 * 1000  # the limit the safetensors library itself applies
ALIASES_KEY = "ckpttool.aliases"  # __metadata__ entry to-safetensors writes: {alias: stored}


def _no_duplicates(path: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise CheckpointError(path, f"safetensors header lists {k!r} twice")
            out[k] = v
        return out

    return hook


def read_header(path: str, file_bytes: int) -> tuple[int, dict[str, Any]]:
    with open_source(path) as f:
        head = f.pread(8, 0)
        if len(head) < 8:
            raise CheckpointError(path, "is truncated: no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise CheckpointError(path, f"safetensors header length {n:,} is absurd")
        if 8 + n > file_bytes:
            raise CheckpointError(path, "is truncated: the safetensors header is cut short")
        raw = f.pread(n, 8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(path, "safetensors header is not UTF-8") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates(path))
    except json.JSONDecodeError as exc:
        raise CheckpointError(path, f"safetensors header is not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise CheckpointError(path, "safetensors header is nested too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "safetensors header is not a JSON object")
    return 8 + n, header


_Entry = tuple[int, int, str, str, tuple[int, ...]]  # (begin, end, name, dtype, shape)


def read(path: str, file_bytes: int) -> Checkpoint:
    data_start, header = read_header(path, file_bytes)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise CheckpointError(path, "safetensors __metadata__ must map strings to strings")
    entries = [_entry(path, name, entry) for name, entry in header.items()]
    entries.sort()
    _check_tiling(path, entries, data_start, file_bytes)
    root: dict[str, TensorRef] = {}
    storages: dict[str, StorageInfo] = {}
    order = {name: i for i, name in enumerate(header)}
    for begin, _end, name, dtype_name, shape in sorted(entries, key=lambda e: order[e[2]]):
        numel = 1
        for s in shape:
            numel *= s
        storage = StorageInfo(name, dtype_name, numel, "", path, data_start + begin)
        stride = tuple(_contiguous_strides(shape))
        root[name] = TensorRef(storage, 0, shape, stride, dtype=dtype_name)
        storages[name] = storage
    return Checkpoint(
        path=path,
        format="safetensors",
        file_bytes=file_bytes,
        root=root,
        storages=storages,
        globals=[],
        facts={"metadata": metadata},
    )


def recorded_aliases(
    path: str, metadata: dict[str, str] | None, stored: Iterable[str]
) -> dict[str, str]:
    """``__metadata__["ckpttool.aliases"]`` (JSON {alias: stored name}: tied tensors that
    ``to-safetensors`` stored once), checked against the ``stored`` tensor names."""
    raw = (metadata or {}).get(ALIASES_KEY)
    if raw is None:
        return {}
    try:
        aliases = json.loads(raw)
    except ValueError:
        aliases = None
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise CheckpointError(path, f"its {ALIASES_KEY!r} metadata is not a map of tensor names")
    names = set(stored)
    for alias, target in aliases.items():
        if alias in names:
            raise CheckpointError(path, f"alias {alias!r} is also a stored tensor")
        if target not in names:
            raise CheckpointError(path, f"alias {alias!r} names {target!r}, which is not stored")
    return aliases


def _entry(path: str, name: str, entry: Any) -> _Entry:
    """One header entry, checked: its dtype is known, its shape fits its data_offsets."""
    if not isinstance(entry, dict):
        raise CheckpointError(path, f"safetensors entry {name!r} is not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str) or code not in dtypes.SAFETENSORS_DTYPES:
        raise CheckpointError(path, f"tensor {name!r} has unknown dtype {code!r}")
    if not isinstance(shape, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise CheckpointError(path, f"tensor {name!r} has an invalid shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(path, f"tensor {name!r} has invalid data_offsets")
    dtype = dtypes.SAFETENSORS_DTYPES[code]
    numel = 1
    for s in shape:
        numel *= s
    if numel * dtype.itemsize != offsets[1] - offsets[0]:
        raise CheckpointError(
            path,
            f"tensor {name!r}: shape {shape} of {code} needs {numel * dtype.itemsize:,} "
            f"bytes but data_offsets span {offsets[1] - offsets[0]:,}",
        )
    return (offsets[0], offsets[1], name, dtype.name, tuple(shape))


def _check_tiling(path: str, entries: list[_Entry], data_start: int, file_bytes: int) -> None:
    """The sorted entries' bytes follow each other without gaps or overlaps to the file's end."""
    pos = 0
    for begin, end, name, _, _ in entries:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else "leaves a gap before it"
            raise CheckpointError(path, f"tensor {name!r} {what} (data_offsets)")
        pos = end
    if data_start + pos != file_bytes:
        if data_start + pos > file_bytes:
            raise CheckpointError(path, "is truncated: tensor data is cut short")
        raise CheckpointError(
            path, f"has {file_bytes - data_start - pos:,} unexpected bytes after the last tensor"
        )


def _contiguous_strides(shape: tuple[int, ...]) -> list[int]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return list(reversed(strides))
