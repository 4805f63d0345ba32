"""``consolidate``: one ordinary file from a folder of shards (DCP, DeepSpeed ZeRO).

The output's header (the pickle of a ``.pt``, the JSON of a safetensors file) is written
first, from metadata only; then each logical tensor is copied segment by segment from the
shards (``copy_file_range``), read back in a background thread and checked against its source.
Private memory stays near one copy buffer, whatever the size of the model; torch is imported
only to cast dtypes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import dtypes
from ..errors import CheckpointError
from ..model import Checkpoint, TensorRef
from ..progress import phased
from ..readers.distributed import model_state_dict
from ..tree import KEEP as _KEEP_NODE
from ..tree import get_path, iter_tensors, transform
from ..unpickling.policy import check_writable
from ..writers import copy as bytecopy
from ..writers.atomic import atomic_file
from ..writers.pt import verify_pt
from ..writers.safetensors import Item, assign_shards, verify_file
from ..writers.shards import write_shards
from .keys import KeyCollisionError, KeyOps
from .logical_write import Progress, logical, out_dtype, write_pt, write_st
from .prepare import check_cast, key_ops, open_source, remaining_globals
from .ranks import Ranks, rank0_writes, write_shards_together


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
    notes: list[str] = field(default_factory=list)  # what the user should know about it
    idle: list[tuple[str, str]] = field(default_factory=list)  # renames that did nothing


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


def rename_model(chosen: Any, ops: KeyOps, src: str) -> tuple[Any, int, list[tuple[str, str]]]:
    """Apply the key operations to the model state dict inside ``chosen``: (the result, the
    keys renamed, the operations that renamed nothing)."""
    if not ops:
        return chosen, 0, []
    found = model_state_dict(chosen) if isinstance(chosen, dict) else None
    if found is None:
        raise CheckpointError(src, "holds no model state dict to rename keys in")
    old = found[0]
    new, renamed = _rename(old, ops, src)
    idle = ops.idle(old)
    if old is chosen:
        return new, renamed, idle
    if found[1] == "":  # weights at the top level beside other entries
        rest = {k: v for k, v in chosen.items() if k not in old}
        return {**new, **rest}, renamed, idle
    return transform(chosen, lambda n: new if n is old else _KEEP_NODE), renamed, idle


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
        t = logical(ref)
        if ref.storage_offset or ref.numel != t.numel or not ref.is_contiguous():
            raise CheckpointError(
                src, f"tensor {name!r} is a view of a larger storage: write it to a .pt file"
            )
        want = out_dtype(t, dtype)
        if dtypes.get(want).safetensors is None:
            raise CheckpointError(src, f"tensor {name!r} is {want}, which safetensors cannot store")
        if name in seen:
            raise CheckpointError(src, f"two tensors would both be named {name!r}")
        seen.add(name)
        items.append(Item(name, ref, want))
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
    allow_user_classes: bool = False,
    progress: Callable[[int], Progress | None] | None = None,
    ranks: Ranks | None = None,
) -> ConsolidateResult:
    """Write one ``.pt`` or safetensors file from a folder of shards (a ConsolidateResult).

    Args:
        src: a DCP or DeepSpeed folder (a folder ``open_checkpoint`` reads as shards).
        dst: the output file (``.safetensors`` suffix: safetensors; else a torch zip), or with
            ``max_shard_size`` a folder of Hugging Face safetensors shards.
        select: ``"model"`` (the model state dict, loadable by ``load_state_dict``), ``"all"``
            (the whole nested object, as ``dcp_to_torch_save`` writes it) or a dotted entry
            path such as ``"optim"``.
        dtype: cast the model's floating-point weights (optimizer state keeps its dtypes).
        strip_prefix, add_prefix, replace_prefix: key surgery on the model state dict.
        max_shard_size, output_format: bytes (or ``"5GB"``) per safetensors shard; ``"pt"``
            or ``"safetensors"`` (default: from ``dst``'s suffix).
        verify: read every tensor back and re-open the output before it replaces ``dst``.
        force, allow_user_classes: replace an existing output; write user classes (convert).
        progress: called with the total bytes; returns a callback fed bytes written.
        ranks: the processes writing together (``Ranks.from_environment()`` under torchrun):
            each writes its share of the shards, rank 0 the index; one file: rank 0 writes it.

    Example:
        >>> consolidate("ckpt/step-100", "model.safetensors")  # doctest: +SKIP
    """
    src, dst = os.fspath(src), os.fspath(dst)
    fmt, limit = _output_format(dst, output_format, max_shard_size, dtype)
    shards = limit is not None
    ckpt = open_source(src, dst, force=force, in_place=None, is_dir=shards, distributed=True)
    dc = _distributed(ckpt, src)
    chosen, label = _select(ckpt, select)
    ops = key_ops(strip_prefix, add_prefix, replace_prefix)
    chosen, renamed, idle = rename_model(chosen, ops, src)
    _consent(src, ckpt, chosen if fmt == "pt" else None, allow_user_classes)
    result = ConsolidateResult(
        src, dst, dc.kind, dc.world_size, fmt, label, 0, 0, renamed=renamed, verified=verify,
        notes=_notes(dc, select), idle=idle,
    )  # fmt: skip
    total = _count(chosen, dtype, result)
    args = (chosen, ckpt.root, dtype, limit, verify, progress and progress(total), result, ranks)
    if ranks is not None and ranks.world > 1 and limit is None:
        rank0_writes(lambda: _write(src, dst, fmt, *args), ranks)  # one file: rank 0 writes it
    else:
        _write(src, dst, fmt, *args)
    result.verified = verify
    return result


def _consent(src: str, ckpt: Checkpoint, chosen: Any, allow_user_classes: bool) -> None:
    """Objects go into a ``.pt`` only (``chosen`` None: safetensors, tensors only): user
    classes need consent, as in ``convert``."""
    if chosen is not None:
        unsafe = remaining_globals(chosen)
        check_writable(src, ckpt.verdict, unsafe, allow_user_classes=allow_user_classes)


def _write(
    src: str,
    dst: str,
    fmt: str,
    chosen: Any,
    root: Any,
    dtype: str | None,
    limit: int | None,
    verify: bool,
    cb: Progress | None,
    result: ConsolidateResult,
    ranks: Ranks | None,
) -> None:
    with contextlib.closing(bytecopy.Sources()) as sources:
        if fmt == "pt":
            result.files = _consolidate_pt(dst, chosen, dtype, verify, sources, cb)
        else:
            args = (chosen, root, dtype, limit, verify, sources, cb, result, ranks)
            _consolidate_st(src, dst, *args)


def _notes(dc: Any, select: str) -> list[str]:
    """What the user should know about the output (frozen params DeepSpeed would drop)."""
    unlisted = dc.facts.get("frozen_unlisted") or []
    if not unlisted or select not in ("model", "all"):
        return []
    shown = ", ".join(unlisted[:3]) + (" and more" if len(unlisted) > 3 else "")
    many, it = ("s", "them") if len(unlisted) > 1 else ("", "it")
    return [
        f"kept the frozen parameter{many} {shown}: a ZeRO-1 save does not list {it}, and "
        f"DeepSpeed's zero_to_fp32 drops {it}"
    ]


def _output_format(
    dst: str, output_format: str | None, max_shard_size: int | str | None, dtype: str | None
) -> tuple[str, int | None]:
    """("pt" or "safetensors", the shard size in bytes or None) from what was asked; the
    cast asked for is checked too."""
    check_cast(dtype)
    limit = max_shard_size
    if isinstance(limit, str):
        from .prepare import parse_size

        limit = parse_size(limit)
    fmt = output_format or ("safetensors" if dst.endswith(".safetensors") or limit else "pt")
    if fmt not in ("pt", "safetensors"):
        raise CheckpointError(None, f"unknown output format {fmt!r} (pt or safetensors)")
    if limit is not None and fmt != "safetensors":
        raise CheckpointError(None, "shards are written as safetensors only")
    return fmt, limit


def _count(chosen: Any, dtype: str | None, result: ConsolidateResult) -> int:
    """Fill in the tensors, casts and output bytes of ``result``; return the input bytes."""
    refs = list(dict((id(r), r) for _, r in iter_tensors(chosen)).values())
    if not refs:
        raise CheckpointError(result.src, f"{result.selected} holds no tensors to write")
    result.tensors = len(refs)
    # the casts asked for (not DeepSpeed's buffers widened to fp32 by default: out_dtype)
    result.cast = sum(1 for r in refs if dtype and out_dtype(logical(r), dtype) != r.dtype)
    result.bytes = sum(r.numel * dtypes.get(out_dtype(logical(r), dtype)).itemsize for r in refs)
    return sum(r.nbytes for r in refs)


def _distributed(ckpt: Checkpoint, src: str) -> Any:
    """The checkpoint's :class:`DistributedCheckpoint` (refused when it is an ordinary file)."""
    dc = ckpt.facts.get("distributed")
    if dc is None:
        from ..readers.folders import enclosing_folder

        folder = enclosing_folder(src)
        if folder is not None:  # a file of one: a DeepSpeed states file, a .distcp
            said = f"is one file of a folder of shards: pass the folder, {folder}"
            raise CheckpointError(src, said)
        raise CheckpointError(src, "is not a distributed checkpoint folder (DCP or DeepSpeed)")
    return dc


def _consolidate_pt(
    dst: str,
    chosen: Any,
    dtype: str | None,
    verify: bool,
    sources: bytecopy.Sources,
    cb: Progress | None,
) -> list[str]:
    with atomic_file(dst) as tmp:
        plan = write_pt(tmp, chosen, dtype, sources, cb, verify)
        if verify:
            verify_pt(tmp, plan, phased(cb))
    return [dst]


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
    ranks: Ranks | None = None,
) -> None:
    items, result.left_out = _safetensors_items(src, chosen, dtype)
    meta = {**_scalars(root), "format": "pt"}
    if limit is None:
        with atomic_file(dst, weight_set=True) as tmp:
            write_st(tmp, items, meta, sources, cb, verify)
            if verify:
                verify_file(tmp, items, meta, sources, phased(cb))
        result.files = [dst]
        return

    def write_one(path: str, shard: list[Item]) -> None:
        write_st(path, shard, meta, sources, cb, verify)
        if verify:
            verify_file(path, shard, meta, sources, phased(cb))

    total = sum(it.nbytes for it in items)
    shards = assign_shards(items, [], limit)
    if ranks is not None and ranks.world > 1:
        result.files = write_shards_together(dst, shards, total, write_one, ranks)
    else:
        result.files = write_shards(dst, shards, total, write_one)
