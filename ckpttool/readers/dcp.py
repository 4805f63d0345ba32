"""``torch.distributed.checkpoint`` folders (FSDP/FSDP2, torchtitan, accelerate, Lightning).

A DCP folder holds ``.metadata`` (one pickle of ``Metadata``: every flattened key's global
shape, dtype and chunk boxes, the nesting path of each key, and where each chunk's item lies)
and ``__R_T.distcp`` files, each a run of items: complete, uncompressed torch zips of one
chunk tensor (or of one pickled non-tensor value), at ``(offset, length)``.

Everything is read as data: the metadata classes become placeholders that record their state,
and each item's storage record is located through the zip directory without reading tensor
bytes. The result is a :class:`~ckpttool.readers.distributed.DistributedCheckpoint`. This module
reads the metadata; :mod:`.dcp_items` locates each item's bytes.
"""

from __future__ import annotations

import io
import re
from typing import Any

from .. import dtypes
from ..errors import CheckpointError, DangerousCheckpointError
from ..model import Opaque
from ..source import basename, getsize, isdir, isfile, join, read_bytes
from ..unpickling.unpickler import DTypeRef
from .dcp_globals import MCORE_CLASSES
from .dcp_globals import META as _META
from .dcp_globals import allowed as _allowed
from .dcp_items import Item, chunk_item, read_item, will_read
from .dcp_items import chunk_segments as _chunk_segments  # also reached here by its tests
from .distributed import (
    DistributedCheckpoint,
    LogicalTensor,
    Segment,
    as_logical,
    check_segments,
    merge_segments,
)

METADATA = ".metadata"
MAX_METADATA_BYTES = 256 << 20

_OPTIMIZER_KEYS = frozenset({"optim", "optimizer", "optimizers", "optim_state", "optimizer_state"})
_MODEL_KEYS = frozenset({"model", "models", "module", "state_dict", "model_state_dict"})
_LIGHTNING_OPTIMIZER = re.compile(r"optimizer_\d+")  # Lightning's FSDP strategy saves these
# Lightning's FSDP strategy saves the rest of its checkpoint (epoch, global_step, hparams...)
# beside the shards with torch.save; its consolidate_checkpoint merges it in at the top level.
LIGHTNING_META = "meta.pt"
_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp")
_ITEM_FILE = re.compile(r"__\d+_\d+\.distcp|[^/\\]+\.distcp")


def is_dcp_folder(path: str) -> bool:
    """A folder whose ``.metadata`` begins like a pickle (the bytes decide, not the names)."""
    meta = join(path, METADATA)
    if not isdir(path) or not isfile(meta):
        return False
    try:
        head = read_bytes(meta, 2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


# -- reading the metadata pickle ---------------------------------------------------------------
def _fields(obj: Any, what: str, meta: str) -> dict[str, Any]:
    """A dataclass placeholder's fields (its pickled ``__dict__``, or dict + slots)."""
    if not isinstance(obj, Opaque):
        raise CheckpointError(meta, f"{what} is a {type(obj).__name__}, not a DCP record")
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2:
        merged: dict[str, Any] = {}
        for part in state:
            if isinstance(part, dict):
                merged.update(part)
        return merged
    if isinstance(state, dict):
        return state
    if state is None and not obj.args:
        return {}
    raise CheckpointError(meta, f"{what} ({obj.global_name}) has an unexpected layout")


def _ints(value: Any, what: str, meta: str) -> tuple[int, ...]:
    if isinstance(value, Opaque) and value.global_name == "torch.Size":
        value = value.args[0] if value.args else ()
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise CheckpointError(meta, f"{what} is not a tuple of non-negative integers")
    return tuple(value)


def _dtype_of(props: Any, fqn: str, meta: str) -> str:
    """The dtype name in a TensorProperties placeholder, refusing non-strided layouts."""
    if not isinstance(props, Opaque):
        raise CheckpointError(meta, f"{fqn!r} has no tensor properties")
    state = props.state
    if isinstance(state, tuple) and len(state) >= 2:  # __getstate__: (dtype, layout, ...)
        dtype, layout = state[0], state[1]
    elif isinstance(state, dict):
        dtype, layout = state.get("dtype"), state.get("layout")
    else:
        raise CheckpointError(meta, f"the tensor properties of {fqn!r} have an unknown layout")
    if not isinstance(dtype, DTypeRef) or dtype.name not in dtypes.DTYPES:
        raise CheckpointError(meta, f"{fqn!r} has an unknown dtype ({dtype!r})")
    layout_name = ""
    if isinstance(layout, type) and issubclass(layout, Opaque):
        layout_name = layout.__ck_global__
    elif isinstance(layout, Opaque) and layout.global_name == "torch.serialization._get_layout":
        layout_name = str(layout.args[0]) if layout.args else ""
    elif layout is None:
        layout_name = "torch.strided"
    if layout_name != "torch.strided":
        raise CheckpointError(
            meta, f"{fqn!r} has layout {layout_name or layout!r}; only strided tensors are read"
        )
    return dtype.name


# The .metadata the verdict unpickled last (item_ranges), kept for the read that follows it: by
# path, (its bytes, the tree, the globals it names). Taken once; used only for the same bytes.
_METADATA_TREE: dict[str, tuple[bytes, Any, dict[str, str]]] = {}


def _unpickle_metadata(folder: str, seen: dict[str, str], *, keep: bool = False) -> Any:
    """The folder's ``.metadata`` tree, checked (``keep``: for the next call, which then does
    not unpickle the same bytes again: a thousand-tensor model's takes ~45 ms)."""
    from ..unpickling.scan import unpickle

    meta = join(folder, METADATA)
    size = getsize(meta)
    if size > MAX_METADATA_BYTES:
        raise CheckpointError(meta, f"is {size:,} bytes, more than a DCP metadata file needs")
    local: dict[str, str] = {}
    data = read_bytes(meta, MAX_METADATA_BYTES + 1)
    if len(data) > MAX_METADATA_BYTES:
        raise CheckpointError(meta, "grew past the size a DCP metadata file needs")
    parsed = _METADATA_TREE.pop(meta, None)
    try:
        if parsed is not None and parsed[0] == data:
            root, local = parsed[1], dict(parsed[2])
        else:
            with io.BytesIO(data) as f:
                root, _ = unpickle(meta, f, METADATA, None, local)
    finally:
        for name, kind in local.items():
            if not _allowed(name):
                seen.setdefault(name, kind)
    dangerous = [g for g, k in local.items() if k == "dangerous" and not _allowed(g)]
    if dangerous:
        raise DangerousCheckpointError(meta, dangerous)
    unknown = [g for g in local if not _allowed(g)]
    if unknown:
        raise CheckpointError(
            meta,
            f"names {unknown[0]}, which no DCP version ckpttool knows writes "
            "(a newer torch or a custom planner?)",
        )
    if not isinstance(root, Opaque) or root.global_name not in (
        _META + "Metadata",
        MCORE_CLASSES[0],
    ):
        raise CheckpointError(meta, "does not hold a DCP Metadata object")
    if keep:  # one folder's at a time: a scan of many folders keeps none of theirs
        _METADATA_TREE.clear()
        _METADATA_TREE[meta] = (data, root, local)
    return root


def _storage_index(
    folder: str, storage_data: Any, sizes: dict[str, int]
) -> dict[tuple[str, tuple[int, ...] | None], Item]:
    meta = join(folder, METADATA)
    if not isinstance(storage_data, dict):
        raise CheckpointError(meta, "has no storage index (a custom storage writer?)")
    out: dict[tuple[str, tuple[int, ...] | None], Item] = {}
    for index, info in storage_data.items():
        idx = _fields(index, "a storage index key", meta)
        fqn = idx.get("fqn")
        if not isinstance(fqn, str):
            raise CheckpointError(meta, "a storage index key has no name")
        offset = idx.get("offset")
        key = (fqn, None if offset is None else _ints(offset, f"the offset of {fqn!r}", meta))
        rec = _fields(info, f"the storage record of {fqn!r}", meta)
        transforms = rec.get("transform_descriptors")
        if transforms:
            raise CheckpointError(
                meta,
                f"item {fqn!r} is stored through transforms {list(transforms)!r} "
                "(compression?), which ckpttool does not read",
            )
        rel, off, length = rec.get("relative_path"), rec.get("offset"), rec.get("length")
        if isinstance(rel, Opaque) and rel.args:  # a pathlib path
            rel = "/".join(str(a) for a in rel.args)
        if not isinstance(rel, str) or not _ITEM_FILE.fullmatch(rel):
            raise CheckpointError(meta, f"item {fqn!r} lies in an unexpected file {rel!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (off, length)):
            raise CheckpointError(meta, f"item {fqn!r} has no offset/length")
        assert isinstance(off, int) and isinstance(length, int)
        path = join(folder, rel)
        if path not in sizes:
            try:
                sizes[path] = getsize(path)
            except OSError:
                raise CheckpointError(path, "is missing (named by .metadata)") from None
        if off < 0 or length <= 0 or off + length > sizes[path]:
            raise CheckpointError(path, f"is truncated: item {fqn!r} lies past its end")
        out[key] = Item(path, off, length)
    return out


def _group(path: tuple[Any, ...]) -> str:
    """model, optimizer or other, from the first key of the nesting path (or of a flat key)."""
    top = path[0] if path else ""
    if len(path) == 1 and isinstance(top, str):
        top = top.split(".", 1)[0]
        if top not in _OPTIMIZER_KEYS:
            return "model"  # a flat state dict saved as it is
    if top in _OPTIMIZER_KEYS or (isinstance(top, str) and _LIGHTNING_OPTIMIZER.fullmatch(top)):
        return "optimizer"
    if top in _MODEL_KEYS:
        return "model"
    return "other"


def _tensor(
    folder: str,
    fqn: str,
    path: tuple[Any, ...],
    md: dict[str, Any],
    index: dict[tuple[str, tuple[int, ...] | None], Item],
    seen: dict[str, str],
    cache: dict[Any, Any],
) -> LogicalTensor:
    meta = join(folder, METADATA)
    dtype = _dtype_of(md.get("properties"), fqn, meta)
    shape = _ints(md.get("size"), f"the size of {fqn!r}", meta)
    itemsize = dtypes.get(dtype).itemsize
    chunks = md.get("chunks")
    if not isinstance(chunks, list):
        raise CheckpointError(meta, f"{fqn!r} has no chunk list")
    segments: list[Segment] = []
    for chunk in chunks:
        c = _fields(chunk, f"a chunk of {fqn!r}", meta)
        offs = _ints(c.get("offsets"), f"a chunk offset of {fqn!r}", meta)
        sizes = _ints(c.get("sizes"), f"a chunk size of {fqn!r}", meta)
        if (
            len(offs) != len(shape)
            or len(sizes) != len(shape)
            or any(o + s > g for o, s, g in zip(offs, sizes, shape, strict=True))
        ):
            raise CheckpointError(meta, f"a chunk of {fqn!r} lies outside its shape {list(shape)}")
        st = index.get((fqn, offs))
        if st is None:
            raise CheckpointError(meta, f"the chunk of {fqn!r} at {list(offs)} is not stored")
        start, crc = chunk_item(st, fqn, dtype, sizes, seen, cache)
        segments += _chunk_segments(shape, itemsize, offs, sizes, st.file, start, crc)
    tensor = LogicalTensor(fqn, dtype, shape, merge_segments(segments), _group(path), path)
    check_segments(folder, tensor)
    return tensor


def _read_keys(
    folder: str,
    sdm: dict[Any, Any],
    planner: dict[Any, Any],
    index: dict[tuple[str, tuple[int, ...] | None], Item],
    seen: dict[str, str],
) -> tuple[list[LogicalTensor], dict[str, Any]]:
    """The logical tensors and the unpickled values that ``state_dict_metadata`` names."""
    meta = join(folder, METADATA)
    tensors: list[LogicalTensor] = []
    entries: dict[str, Any] = {}
    cache: dict[Any, Any] = {}  # data.pkl bytes -> chunk template; (file, offset) -> header
    for fqn, md in sdm.items():
        if not isinstance(fqn, str):
            raise CheckpointError(meta, f"has a key that is not a string ({fqn!r})")
        path = planner.get(fqn)
        if not (isinstance(path, (tuple, list)) and path):
            path = (fqn,)
        path = tuple(path)
        kind = md.global_name if isinstance(md, Opaque) else type(md).__name__
        if kind == _META + "TensorStorageMetadata":
            t = _tensor(folder, fqn, path, _fields(md, fqn, meta), index, seen, cache)
            tensors.append(t)
        elif kind == _META + "BytesStorageMetadata":
            st = index.get((fqn, None))
            if st is None:
                raise CheckpointError(meta, f"value {fqn!r} is not stored")
            entries[fqn] = as_logical(read_item(st, fqn, seen), fqn, folder)
        else:
            raise CheckpointError(meta, f"{fqn!r} is a {kind}, which ckpttool does not read")
    return tensors, entries


def _lightning_meta(folder: str, sizes: dict[str, int], seen: dict[str, str]) -> dict[str, Any]:
    """The entries of Lightning's ``meta.pt`` beside the shards, if there is one (a torch zip)."""
    from . import torch_zip

    path = join(folder, LIGHTNING_META)
    try:
        if not isfile(path) or read_bytes(path, 4) != b"PK\x03\x04":
            return {}
        size = getsize(path)
    except OSError:
        return {}
    root = torch_zip.read(path, size, seen).root
    if not isinstance(root, dict) or not all(isinstance(k, str) for k in root):
        raise CheckpointError(path, "does not hold a dict of named entries (Lightning's meta.pt)")
    sizes[path] = size
    return {k: as_logical(v, k, folder) for k, v in root.items()}


def read(folder: str, seen: dict[str, str] | None = None) -> DistributedCheckpoint:
    """Read a DCP folder's structure: metadata, item directories, no tensor bytes.

    Args:
        folder: the checkpoint folder (``.metadata`` and ``*.distcp``).
        seen: collects every global any pickle names (for the dangerous-pickle report).

    Returns:
        A :class:`DistributedCheckpoint` of kind ``"dcp"``.
    """
    seen = {} if seen is None else seen
    meta = join(folder, METADATA)
    root = _unpickle_metadata(folder, seen)
    fields = _fields(root, "Metadata", meta)
    sdm = fields.get("state_dict_metadata")
    if not isinstance(sdm, dict):
        raise CheckpointError(meta, "has no state_dict_metadata")
    planner = fields.get("planner_data")
    planner = planner if isinstance(planner, dict) else {}
    sizes: dict[str, int] = {meta: getsize(meta)}
    index = _storage_index(folder, fields.get("storage_data"), sizes)
    will_read(index.values())
    tensors, entries = _read_keys(folder, sdm, planner, index, seen)
    order = [fqn for fqn in sdm if isinstance(fqn, str)]
    extra = _lightning_meta(folder, sizes, seen)
    clash = [k for k in extra if k in order or any(t.path[:1] == (k,) for t in tensors)]
    if clash:
        raise CheckpointError(
            join(folder, LIGHTNING_META), f"holds {clash[0]!r}, which the shards hold too"
        )
    entries.update(extra)
    order += list(extra)
    tensor_dtypes: dict[str, int] = {}
    for t in tensors:
        tensor_dtypes[t.dtype] = tensor_dtypes.get(t.dtype, 0) + 1
    files = [(p, sizes[p]) for p in sorted(sizes)]
    ranks = {m.group(1) for p in sizes if (m := _RANK_FILE.fullmatch(basename(p)))}
    facts: dict[str, Any] = {
        "order": order,
        "dcp_version": fields.get("version"),
        "flattened": bool(planner),
        "dtypes": tensor_dtypes,
        "paths": {fqn: tuple(p) for fqn, p in planner.items() if isinstance(p, (tuple, list))},
    }
    if extra:
        facts["lightning_meta"] = LIGHTNING_META
    if isinstance(fields.get("mcore_data"), dict):  # megatron-core 0.8-0.15's MCoreMetadata
        facts["mcore_data"] = fields["mcore_data"]
    return DistributedCheckpoint(
        path=folder,
        kind="dcp",
        world_size=len(ranks),
        files=files,
        tensors=tensors,
        entries=entries,
        facts=facts,
    )


def item_ranges(folder: str) -> list[tuple[str, int, int, bool]]:
    """Every item ``.metadata`` names: (file, offset, length, read with weights_only=False)."""
    meta = join(folder, METADATA)
    fields = _fields(_unpickle_metadata(folder, {}, keep=True), "Metadata", meta)
    sdm = fields.get("state_dict_metadata")
    if not isinstance(sdm, dict):
        raise CheckpointError(meta, "has no state_dict_metadata")
    index = _storage_index(folder, fields.get("storage_data"), {meta: getsize(meta)})
    plain = {
        fqn
        for fqn, md in sdm.items()
        if isinstance(md, Opaque) and md.global_name == _META + "BytesStorageMetadata"
    }
    return [(it.file, it.offset, it.length, key[0] in plain) for key, it in index.items()]
