"""``consolidate``: one ordinary file from a folder of shards (DCP, DeepSpeed ZeRO).

The output's header (the pickle of a ``.pt``, the JSON of a safetensors file) is written
first, from metadata only; then each logical tensor is copied segment by segment from the
shards (``copy_file_range``), read back in a background thread and checked against its source.
Private memory stays near one copy buffer, whatever the size of the model; torch is imported
only to cast dtypes.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import dtypes
from ..errors import CheckpointError
from ..model import Checkpoint, StorageInfo, TensorRef
from ..readers.distributed import (
    LogicalStorage,
    LogicalTensor,
    copy_logical,
    iter_logical_chunks,
    model_state_dict,
)
from ..tree import KEEP as _KEEP_NODE
from ..tree import get_path, iter_tensors, transform
from ..writers import copy as bytecopy
from ..writers.atomic import atomic_file, atomic_shards
from ..writers.pt import verify_pt
from ..writers.pt_pickle import OutStorage, dumps
from ..writers.safetensors import Item, assign_shards, header_bytes, verify_file
from ..writers.zipwriter import ZipWriter
from .keys import KeyCollisionError, KeyOps
from .prepare import check_cast, key_ops, open_source

Progress = Callable[[int], None]
INDEX_NAME = "model.safetensors.index.json"  # as ops/to_safetensors writes it


@dataclass
class ConsolidateResult:
    src: str
    dst: str
    kind: str  # the input's kind: "dcp", "zero-2", ...
    world_size: int
    format: str  # "pt" or "safetensors"
    selected: str  # "model weights", "everything", or the entry chosen
    tensors: int
    bytes: int
    files: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    renamed: int = 0
    cast: int = 0
    verified: bool = False


def _logical(ref: TensorRef) -> LogicalTensor:
    storage = ref.storage
    if not isinstance(storage, LogicalStorage) or storage.tensor is None:
        raise CheckpointError(None, "a tensor of the checkpoint is not a logical tensor")
    return storage.tensor


def _select(ckpt: Checkpoint, select: str) -> tuple[Any, str]:
    """(the chosen node, how it is described)."""
    if select == "all":
        return ckpt.root, "everything"
    if select == "model":
        found = model_state_dict(ckpt.root)
        if found is None:
            keys = ", ".join(str(k) for k in ckpt.root)
            raise CheckpointError(
                ckpt.path, f"holds no model state dict (its entries: {keys})", remedy="key_or_all"
            )
        node, path = found
        return node, f"model weights ({path})" if path else "model weights"
    try:
        return get_path(ckpt.root, select), select
    except (KeyError, TypeError):
        keys = ", ".join(str(k) for k in ckpt.root)
        raise CheckpointError(ckpt.path, f"has no entry {select!r} (it holds {keys})") from None


def _rename(node: Any, ops: KeyOps, src: str) -> tuple[Any, int]:
    if not ops or not isinstance(node, dict):
        return node, 0
    try:
        renamed = ops.apply(node)
    except KeyCollisionError as exc:
        raise CheckpointError(
            src, f"renaming would make {exc.first!r} and {exc.second!r} both {exc.new!r}"
        ) from None
    return renamed, sum(1 for a, b in zip(node, renamed, strict=True) if a != b)


def _rename_model(chosen: Any, ops: KeyOps, src: str) -> tuple[Any, int]:
    """Apply the key operations to the model state dict inside ``chosen``."""
    if not ops:
        return chosen, 0
    found = model_state_dict(chosen) if isinstance(chosen, dict) else None
    if found is None:
        raise CheckpointError(src, "holds no model state dict to rename keys in")
    old = found[0]
    new, renamed = _rename(old, ops, src)
    if old is chosen:
        return new, renamed
    if found[1] == "":  # weights at the top level beside other entries
        rest = {k: v for k, v in chosen.items() if k not in old}
        return {**new, **rest}, renamed
    return transform(chosen, lambda n: new if n is old else _KEEP_NODE), renamed


def _out_dtype(t: LogicalTensor, dtype: str | None) -> str:
    if dtype and t.group == "model" and dtypes.get(t.dtype).is_floating:
        return dtype
    return t.out_dtype or t.dtype


# -- copying one logical tensor ------------------------------------------------------------
def _check_copy(fd: int, start: int, tensor: LogicalTensor, sources: bytecopy.Sources) -> int:
    """Read a copied tensor back from the output, check every segment against its source
    (its recorded CRC-32, else its bytes), and return the CRC-32 of the whole record."""
    total = 0
    pos = start
    buf = bytearray(min(bytecopy.CHUNK, max(tensor.nbytes, 1)))
    view = memoryview(buf)
    for seg in tensor.segments:
        crc, left, off = 0, seg.nbytes, pos
        while left:
            want = min(left, len(buf))
            got = os.preadv(fd, [view[:want]], off)
            if got != want:
                raise bytecopy.CopyMismatch("is cut short in the output")
            crc = zlib.crc32(view[:want], crc)
            total = zlib.crc32(view[:want], total)
            off += want
            left -= want
        if seg.crc is not None:
            if crc != seg.crc:
                raise bytecopy.CopyMismatch(f"does not match the CRC-32 recorded in {seg.file}")
        else:
            diff = bytecopy.compare_ranges(sources.fd(seg.file), seg.offset, fd, pos, seg.nbytes)
            if diff is not None:
                raise bytecopy.CopyMismatch(f"differs from {seg.file} at byte {diff}")
        pos += seg.nbytes
    return total


def _write_cast(
    tensor: LogicalTensor, dtype: str, fd: int, sources: bytecopy.Sources, cb: Progress | None
) -> int:
    """Write the tensor cast to ``dtype`` chunk by chunk; return the CRC-32 written."""
    src = StorageInfo("cast", tensor.dtype, 0, "cpu", "", 0)
    crc = 0
    for piece in iter_logical_chunks(tensor, sources):
        data = bytecopy.recode(bytearray(piece), src, dtype)
        bytecopy.write_all(fd, data)
        crc = zlib.crc32(data, crc)
        if cb:
            cb(len(piece))
    return crc


def _write_tensor(
    tensor: LogicalTensor,
    dtype: str,
    fd: int,
    start: int,
    sources: bytecopy.Sources,
    background: bytecopy.Background,
    cb: Progress | None,
) -> tuple[int | None, Any]:
    """Write one tensor at ``fd``'s position: (its CRC-32 if already known, a read-back job)."""
    if dtype != tensor.dtype:
        return _write_cast(tensor, dtype, fd, sources, cb), None
    copy_logical(tensor, fd, sources, cb)
    job = background.submit(_check_copy, fd, start, tensor, sources)
    background.submit(bytecopy.start_writeback, fd, start, tensor.nbytes)
    return None, job


def _result_of(job: Any, path: str, name: str) -> int:
    try:
        return int(job.result())
    except bytecopy.CopyMismatch as exc:
        raise CheckpointError(
            path, f"verification failed: tensor {name!r} {exc}; nothing was written"
        ) from None


# -- the .pt writer ------------------------------------------------------------------------
def _write_pt(
    tmp: str, root: Any, dtype: str | None, sources: bytecopy.Sources, cb: Progress | None
) -> tuple[list[tuple[str, TensorRef]], dict[int, OutStorage], dict[int, str], list[OutStorage]]:
    """Write ``root`` as a torch zip at ``tmp``: the pickle first, then every tensor's record."""
    named = list(iter_tensors(root))
    storage_of: dict[int, OutStorage] = {}
    dtype_of: dict[int, str] = {}
    outs: list[OutStorage] = []
    for _name, ref in named:
        if id(ref) in storage_of:
            continue
        t = _logical(ref)
        out = OutStorage(str(len(outs)), _out_dtype(t, dtype), t.numel, ref.storage)
        storage_of[id(ref)] = out
        dtype_of[id(ref)] = out.dtype
        outs.append(out)
    pkl = dumps(root, storage_of, dtype_of)
    archive = "archive"
    fd = os.open(tmp, os.O_RDWR)
    background = bytecopy.Background()
    try:
        zw = ZipWriter(fd)
        zw.add_bytes(f"{archive}/data.pkl", pkl)
        zw.add_bytes(f"{archive}/.format_version", b"1")
        zw.add_bytes(f"{archive}/.storage_alignment", b"64")
        zw.add_bytes(f"{archive}/byteorder", b"little")
        pending: list[tuple[int, OutStorage, Any]] = []
        for out in outs:
            assert isinstance(out.source, LogicalStorage) and out.source.tensor is not None
            start = zw.begin(f"{archive}/data/{out.key}", out.nbytes)
            crc, job = _write_tensor(
                out.source.tensor, out.dtype, fd, start, sources, background, cb
            )
            out.crc = crc
            out.read_back = job is not None
            zw.end()
            pending.append((len(zw.entries) - 1, out, job))
        zw.add_bytes(f"{archive}/version", b"3")
        serial = f"{zlib.crc32(pkl):08x}{len(outs):08x}".encode()
        zw.add_bytes(f"{archive}/.data/serialization_id", serial)
        for index, out, job in pending:
            if job is not None:
                assert isinstance(out.source, LogicalStorage) and out.source.tensor is not None
                out.crc = _result_of(job, tmp, out.source.tensor.name)
            assert out.crc is not None
            zw.set_crc(index, out.crc)
        zw.finish()
    finally:
        background.close()
        os.close(fd)
    return named, storage_of, dtype_of, outs


# -- the safetensors writer ----------------------------------------------------------------
def _write_st(
    path: str,
    items: list[Item],
    meta: dict[str, str],
    sources: bytecopy.Sources,
    cb: Progress | None,
) -> None:
    pos = 0
    for it in items:
        it.begin = pos
        pos += it.nbytes
    header = header_bytes(items, meta)
    fd = os.open(path, os.O_RDWR)
    background = bytecopy.Background()
    try:
        bytecopy.write_all(fd, header)
        for it in items:
            start = len(header) + it.begin
            it.crc, it.job = _write_tensor(
                _logical(it.ref), it.dtype, fd, start, sources, background, cb
            )
        end = os.lseek(fd, 0, os.SEEK_CUR)
        if end != len(header) + pos:
            raise OSError(f"wrote {end} bytes, expected {len(header) + pos}")
        for it in items:
            if it.job is not None:
                it.crc = _result_of(it.job, path, it.name)
                it.read_back = True
    finally:
        background.close()
        os.close(fd)


def _scalars(root: Any) -> dict[str, str]:
    """Top-level scalar entries (step, epoch) as safetensors metadata strings."""
    out: dict[str, str] = {}
    if isinstance(root, dict):
        for k, v in root.items():
            if isinstance(k, str) and isinstance(v, (int, float, str)) and k != "format":
                out[k] = str(v)
    return out


def _safetensors_items(src: str, chosen: Any, dtype: str | None) -> tuple[list[Item], list[str]]:
    items: list[Item] = []
    seen: set[str] = set()
    for name, ref in iter_tensors(chosen):
        t = _logical(ref)
        out_dtype = _out_dtype(t, dtype)
        if dtypes.get(out_dtype).safetensors is None:
            raise CheckpointError(
                src, f"tensor {name!r} is {out_dtype}, which safetensors cannot store"
            )
        if name in seen:
            raise CheckpointError(src, f"two tensors would both be named {name!r}")
        seen.add(name)
        items.append(Item(name, ref, out_dtype))
    left_out: list[str] = []
    if isinstance(chosen, dict):
        for name, node in chosen.items():
            if not isinstance(node, TensorRef) and not any(True for _ in iter_tensors(node)):
                left_out.append(f"{name} (not a tensor)")
    return items, left_out


def consolidate(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    select: str = "model",
    dtype: str | None = None,
    strip_prefix: str | tuple[str, ...] = (),
    add_prefix: str | tuple[str, ...] = (),
    replace_prefix: tuple[tuple[str, str], ...] = (),
    max_shard_size: int | str | None = None,
    output_format: str | None = None,
    verify: bool = True,
    force: bool = False,
    progress: Callable[[int], Progress | None] | None = None,
) -> ConsolidateResult:
    """Write one ``.pt`` or safetensors file from a distributed checkpoint folder.

    Args:
        src: a DCP folder (``.metadata`` + ``*.distcp``) or another sharded folder
            ``open_checkpoint`` presents as logical tensors.
        dst: the output file (``.safetensors`` suffix: safetensors; else a torch zip), or with
            ``max_shard_size`` a folder of Hugging Face safetensors shards.
        select: ``"model"`` (the model state dict, loadable by ``load_state_dict``), ``"all"``
            (the whole nested object, as ``dcp_to_torch_save`` writes it) or a dotted entry
            path such as ``"optim"``.
        dtype: cast the model's floating-point weights (optimizer state keeps its dtypes).
        strip_prefix, add_prefix, replace_prefix: key surgery on the model state dict.
        max_shard_size: bytes (or ``"5GB"``) per safetensors shard.
        output_format: ``"pt"`` or ``"safetensors"`` (default: from ``dst``'s suffix).
        verify: read every tensor back and re-open the output before it replaces ``dst``.
        force: replace an existing output.
        progress: called with the total bytes; returns a callback fed bytes written.

    Returns:
        A :class:`ConsolidateResult`.

    Example:
        >>> consolidate("ckpt/step-100", "model.safetensors")  # doctest: +SKIP
    """
    src, dst = os.fspath(src), os.fspath(dst)
    limit = max_shard_size
    if isinstance(limit, str):
        from .to_safetensors import parse_size

        limit = parse_size(limit)
    fmt = output_format or ("safetensors" if dst.endswith(".safetensors") or limit else "pt")
    if fmt not in ("pt", "safetensors"):
        raise CheckpointError(None, f"unknown output format {fmt!r} (pt or safetensors)")
    if limit is not None and fmt != "safetensors":
        raise CheckpointError(None, "shards are written as safetensors only")
    check_cast(dtype)
    ckpt = open_source(src, dst, force=force, in_place=None, is_dir=limit is not None)
    dc = ckpt.facts.get("distributed")
    if dc is None:
        raise CheckpointError(src, "is not a distributed checkpoint folder (DCP or DeepSpeed)")
    ops = key_ops(strip_prefix, add_prefix, replace_prefix)
    chosen, label = _select(ckpt, select)
    chosen, renamed = _rename_model(chosen, ops, src)
    result = ConsolidateResult(src, dst, dc.kind, dc.world_size, fmt, label, 0, 0, renamed=renamed)
    refs = list(dict((id(r), r) for _, r in iter_tensors(chosen)).values())
    if not refs:
        raise CheckpointError(src, f"{label} holds no tensors to write")
    result.tensors = len(refs)
    # the casts asked for (not DeepSpeed's buffers widened to fp32 by default: out_dtype)
    result.cast = sum(1 for r in refs if dtype and _out_dtype(_logical(r), dtype) != r.dtype)
    result.bytes = sum(r.numel * dtypes.get(_out_dtype(_logical(r), dtype)).itemsize for r in refs)
    cb = progress(sum(r.nbytes for r in refs)) if progress else None
    sources = bytecopy.Sources()
    try:
        if fmt == "pt":
            with atomic_file(dst) as tmp:
                named, storage_of, dtype_of, outs = _write_pt(tmp, chosen, dtype, sources, cb)
                if verify:
                    verify_pt(tmp, named, storage_of, dtype_of, outs)
            result.files = [dst]
        else:
            _consolidate_st(src, dst, chosen, ckpt.root, dtype, limit, verify, sources, cb, result)
    finally:
        sources.close()
    result.verified = verify
    return result


def _consolidate_st(
    src: str,
    dst: str,
    chosen: Any,
    root: Any,
    dtype: str | None,
    limit: int | None,
    verify: bool,
    sources: bytecopy.Sources,
    cb: Progress | None,
    result: ConsolidateResult,
) -> None:
    items, result.left_out = _safetensors_items(src, chosen, dtype)
    meta = {**_scalars(root), "format": "pt"}
    if limit is None:
        with atomic_file(dst) as tmp:
            _write_st(tmp, items, meta, sources, cb)
            if verify:
                verify_file(tmp, items, meta, sources)
        result.files = [dst]
        return
    shards = assign_shards(items, [], limit)
    n = len(shards)
    with atomic_shards(dst) as tmpdir:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            path = os.path.join(tmpdir, fname)
            open(path, "wb").close()
            _write_st(path, shard, meta, sources, cb)
            if verify:
                verify_file(path, shard, meta, sources)
            weight_map.update((it.name, fname) for it in shard)
            result.files.append(os.path.join(dst, fname))
        index = {
            "metadata": {"total_size": sum(it.nbytes for it in items)},
            "weight_map": weight_map,
        }
        with open(os.path.join(tmpdir, INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    result.files.append(os.path.join(dst, INDEX_NAME))
