"""``to-safetensors``: stream a checkpoint's tensors into safetensors, one tensor at a time.

The header is computed from metadata alone; then each contiguous tensor's bytes are copied
straight from the input (``copy_file_range``) and only non-contiguous, cast or big-endian
tensors pass through memory. Tied tensors are stored once with their aliases recorded.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import dtypes
from ..analysis.describe import numpy_scalar_value
from ..analysis.state_dicts import default_state_dict
from ..errors import ArgumentError, CheckpointError
from ..model import Checkpoint, Opaque, TensorRef
from ..progress import phased
from ..readers.hf_folder import output_notes
from ..readers.safetensors import ALIASES_KEY  # __metadata__: JSON {alias: stored name}
from ..tree import children, get_path, iter_tensors
from ..writers import copy as bytecopy
from ..writers import numeric
from ..writers.atomic import atomic_file
from ..writers.numeric import has_view_bits
from ..writers.safetensors import Item, assign_shards, reader_notes, verify_file, write_file
from ..writers.shards import write_shards
from .keys import KeyCollisionError, KeyOps
from .left_out import (
    COMPOSITE_TENSOR,
    NONE_ENTRY,
    NOT_SCALAR,
    OUTSIDE_STATE_DICT,
    RESERVED_KEY,
    LeftOut,
)
from .prepare import cast_targets, check_cast, dense_entries, key_ops, open_source, parse_size

Progress = Callable[[int], None]
RESERVED_METADATA = ("format", ALIASES_KEY)


@dataclass
class SafetensorsResult:
    src: str
    dst: str
    tensors: int
    bytes: int
    files: list[str]
    aliases: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    left_out: list[LeftOut] = field(default_factory=list)
    renamed: int = 0
    verified: bool = False
    notes: list[str] = field(default_factory=list)  # dtypes new readers only; two weight sets
    idle: list[tuple[str, str]] = field(default_factory=list)  # renames that did nothing
    # a wrapper prefix every written key still carries (module., _orig_mod.): a bare model's
    # load_state_dict fails on it
    kept_prefix: str | None = None


# -- choosing the tensors -----------------------------------------------------------------
def _select(
    ckpt: Checkpoint, key: str | None, all_tensors: bool
) -> tuple[Any, list[tuple[str, Any]]]:
    """(the chosen node, its (name, value) entries) — values are tensors or None."""
    if all_tensors:
        return ckpt.root, dense_entries(ckpt.root)
    if key is not None:
        try:
            node = get_path(ckpt.root, key)
        except KeyError:
            raise CheckpointError(ckpt.path, f"no entry {key!r}", remedy="key") from None
    else:
        found = default_state_dict(ckpt.root)
        if found is None:
            if not ckpt.tensors():
                raise CheckpointError(ckpt.path, "holds no tensors: nothing to write")
            if ckpt.format == "torchscript":
                raise CheckpointError(ckpt.path, "is a TorchScript archive", remedy="all_tensors")
            raise CheckpointError(ckpt.path, "no state dict found", remedy="key_or_all")
        node = found.node
    if isinstance(node, dict) and not isinstance(node, Opaque):
        entries = [(k, v) for k, v in node.items()]
        if all(isinstance(k, str) for k, _ in entries) and all(
            isinstance(v, TensorRef) or v is None for _, v in entries
        ):
            return node, entries
    return node, dense_entries(node)


def scalar_metadata(
    root: Any, chosen: Any, all_: bool = False
) -> tuple[dict[str, str], list[LeftOut]]:
    """Top-level scalar entries (epoch, step, best metric) as strings; what was left out."""
    meta: dict[str, str] = {}
    left: list[LeftOut] = []
    if not isinstance(root, dict) or isinstance(root, Opaque) or (root is chosen and not all_):
        return meta, left
    for name, value in children(root, ""):
        if value is chosen:
            continue
        if isinstance(value, Opaque) and numpy_scalar_value(value) is not None:
            value = numpy_scalar_value(value)
        if isinstance(value, (bool, int, float, str)) and len(str(value)) <= 1000:
            if name in RESERVED_METADATA:
                left.append(LeftOut(name, RESERVED_KEY))
            else:
                meta[name] = str(value)
        elif isinstance(value, TensorRef):
            if not all_:
                left.append(LeftOut(name, OUTSIDE_STATE_DICT))
        elif not (all_ and _holds_tensor(value)):
            left.append(LeftOut(name, NOT_SCALAR))
    return meta, left


def _holds_tensor(node: Any) -> bool:
    return next(iter_tensors(node), None) is not None


def _shared_groups(items: list[Item]) -> list[list[Item]]:
    """Groups of tensors whose bytes overlap in the same storage (truly shared)."""
    by_storage: dict[tuple[str, str], list[Item]] = {}
    for it in items:
        s = it.ref.storage
        if s is not None and it.ref.numel:
            by_storage.setdefault((s.file, s.key), []).append(it)
    groups = []
    for members in by_storage.values():
        if len(members) < 2:
            continue
        spans = sorted(
            ((m.ref.extent()[0] * m.ref.itemsize, m.ref.extent()[1] * m.ref.itemsize, i), m)
            for i, m in enumerate(members)
        )
        current: list[Item] = []
        end = -1
        for (lo, hi, _), m in spans:
            if current and lo < end:
                current.append(m)
                end = max(end, hi)
            else:
                if len(current) > 1:
                    groups.append(current)
                current, end = [m], hi
        if len(current) > 1:
            groups.append(current)
    return groups


def _same_view(a: TensorRef, b: TensorRef) -> bool:
    """Same elements with the same values (a conjugate/negative view of a tensor is not it)."""
    return (a.storage_offset, a.shape, a.stride, a.dtype, has_view_bits(a)) == (
        b.storage_offset,
        b.shape,
        b.stride,
        b.dtype,
        has_view_bits(b),
    ) and (a.metadata == b.metadata or not has_view_bits(a))


def cannot_store(ref: TensorRef, out_dtype: str) -> str | None:
    """Why safetensors (0.8's format) cannot hold this tensor as ``out_dtype``, or None."""
    info = dtypes.get(ref.dtype)
    if ref.kind == "quantized" or info.is_quantized:
        return f"is a quantized {ref.dtype} tensor, which safetensors cannot store"
    if ref.dtype == "float4_e2m1fn_x2":  # F4 counts values, not bytes: a header of its own
        return "is float4_e2m1fn_x2, which ckpttool cannot write to safetensors yet"
    if dtypes.get(out_dtype).safetensors is None:
        return f"is {out_dtype}, which safetensors cannot store"
    return None


def _check_names(src: str, argument: str, wanted: tuple[str, ...], names: list[str]) -> None:
    """Refuse a name in ``wanted`` that is none of the output's tensor ``names``."""
    import difflib

    known = set(names)
    for name in wanted:
        if name not in known:
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else f" ({len(names)} tensors)"
            raise ArgumentError(src, argument, f"no tensor named {name!r} in the output{hint}")


def to_safetensors(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    key: str | None = None,
    all_tensors: bool = False,
    strip_prefix: str | tuple[str, ...] = (),
    add_prefix: str | tuple[str, ...] = (),
    replace_prefix: tuple[tuple[str, str], ...] = (),
    dtype: str | None = None,
    metadata: dict[str, str] | None = None,
    duplicate_shared: bool = False,
    keep: tuple[str, ...] = (),
    max_shard_size: int | str | None = None,
    verify: bool = True,
    force: bool = False,
    progress: Callable[[int], Progress | None] | None = None,
) -> SafetensorsResult:
    """Write the model state dict of ``src`` (or ``key``, or every tensor) as safetensors.

    Without ``max_shard_size`` ``dst`` is a file; with it, a folder of
    ``model-0000K-of-0000N.safetensors`` shards plus ``model.safetensors.index.json``.
    Tied tensors are stored once (the first name, or one in ``keep``) and their aliases
    recorded in ``__metadata__["ckpttool.aliases"]``; ``duplicate_shared`` writes copies.
    A file whose pickle can run code is refused; objects of user classes are never written
    (the output holds tensors and strings only), so they need no permission.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    shard_limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    check_cast(dtype)
    ops = key_ops(strip_prefix, add_prefix, replace_prefix)
    # user classes are fine (no permission asked): only tensors and strings are written
    ckpt = open_source(src, dst, force=force, in_place=None, is_dir=shard_limit is not None)
    chosen, tensors, left_out = _chosen_tensors(ckpt, src, key, all_tensors)
    renamed_sd = _renamed(src, ops, tensors)
    renamed = sum(1 for a, b in zip(tensors, renamed_sd, strict=True) if a != b)
    items = _plan_items(src, chosen, renamed_sd, dtype)
    _check_names(src, "keep", keep, list(renamed_sd))
    groups = _shared_groups(items)
    aliases: dict[str, str] = {}
    if not duplicate_shared:
        items, aliases = _store_once(items, groups, keep)
    meta, left = _output_metadata(ckpt, chosen, all_tensors, metadata, aliases)
    total = sum(it.nbytes for it in items)
    result = SafetensorsResult(
        src, dst, len(items), total, [], aliases, meta, left_out + left, renamed
    )
    result.notes = reader_notes(items)
    result.idle = ops.idle(tensors) if ops else []
    result.kept_prefix = _wrapper_prefix(renamed_sd) if not (all_tensors or ops) else None
    cb = progress(total) if progress else None
    shards = None
    if shard_limit is not None:
        shards = assign_shards(items, groups if duplicate_shared else [], shard_limit)
    result.files = _write(dst, items, shards, meta, cb, verify, total)
    result.verified = verify
    result.notes += output_notes(ckpt.facts, dst, shard_limit is not None)
    return result


def _wrapper_prefix(names: Any) -> str | None:
    """The DataParallel/DDP or torch.compile prefix that every name carries, if any."""
    from ..analysis.state_dicts import detect_prefix

    prefix = detect_prefix(names)
    return prefix if prefix and prefix.startswith(("module.", "_orig_mod.")) else None


def _write(
    dst: str,
    items: list[Item],
    shards: list[list[Item]] | None,
    meta: dict[str, str],
    cb: Progress | None,
    verify: bool,
    total: int,
) -> list[str]:
    """Write the output (a file, or a folder of ``shards``) atomically; the files written."""
    sources = bytecopy.Sources()
    try:
        if shards is None:
            with atomic_file(dst, weight_set=True) as tmp:
                write_file(tmp, items, meta, sources, cb, verify)
                if verify:
                    verify_file(tmp, items, meta, sources, phased(cb))
            return [dst]
        return _write_shards(dst, shards, meta, sources, cb, verify, total)
    finally:
        sources.close()


def _chosen_tensors(
    ckpt: Checkpoint, src: str, key: str | None, all_tensors: bool
) -> tuple[Any, OrderedDict[str, TensorRef], list[LeftOut]]:
    """(the chosen node, its tensors by name, its None entries): step 1, what to write."""
    chosen, entries = _select(ckpt, key, all_tensors)
    left_out = [
        LeftOut(name, COMPOSITE_TENSOR if v == COMPOSITE_TENSOR else NONE_ENTRY)
        for name, v in entries
        if not isinstance(v, TensorRef)
    ]
    tensors: OrderedDict[str, TensorRef] = OrderedDict()
    for name, v in entries:
        if isinstance(v, TensorRef):
            if name in tensors and tensors[name] is not v:
                raise CheckpointError(
                    src, f"two tensors would both be named {name!r}", remedy="choose_key"
                )
            tensors[name] = v
    if not tensors:
        parts = [item for item in left_out if item.reason == COMPOSITE_TENSOR]
        if parts:  # only sparse, nested or subclass tensors: say which
            raise CheckpointError(
                src,
                f"holds no tensors safetensors can store: {parts[0].name!r} is "
                + parts[0].description,
            )
        raise CheckpointError(src, "holds no tensors to write")
    return chosen, tensors, left_out


def _renamed(
    src: str, ops: KeyOps, tensors: OrderedDict[str, TensorRef]
) -> OrderedDict[str, TensorRef]:
    """The tensors under their output names (step 2: the key renames)."""
    try:
        return ops.apply(tensors) if ops else tensors
    except KeyCollisionError as exc:
        raise CheckpointError(
            src, f"renaming would make {exc.first!r} and {exc.second!r} both {exc.new!r}"
        ) from None


def _plan_items(
    src: str, chosen: Any, renamed_sd: OrderedDict[str, TensorRef], dtype: str | None
) -> list[Item]:
    """One output item per tensor, with the dtype it is stored as (step 3)."""
    items: list[Item] = []
    castable = cast_targets(chosen) if dtype else set()
    for name, ref in renamed_sd.items():
        out_dtype = ref.dtype
        if dtype and id(ref) in castable and numeric.can_cast(ref.dtype, dtype):
            out_dtype = dtype
        problem = cannot_store(ref, out_dtype)
        if problem:
            raise CheckpointError(src, f"tensor {name!r} {problem}")
        items.append(Item(name, ref, out_dtype))
    return items


def _store_once(
    items: list[Item], groups: list[list[Item]], keep: tuple[str, ...]
) -> tuple[list[Item], dict[str, str]]:
    """Tied tensors stored once: (the items left, {alias: stored name})."""
    aliases: dict[str, str] = {}
    drop: set[str] = set()
    for group in groups:
        first = next((m for m in group if m.name in keep), group[0])
        for m in group:
            if m is first:
                continue
            if _same_view(m.ref, first.ref) and m.dtype == first.dtype:
                aliases[m.name] = first.name
                drop.add(m.name)
    return [it for it in items if it.name not in drop], aliases


def _output_metadata(
    ckpt: Checkpoint,
    chosen: Any,
    all_tensors: bool,
    metadata: dict[str, str] | None,
    aliases: dict[str, str],
) -> tuple[dict[str, str], list[LeftOut]]:
    """The output's ``__metadata__`` (carried, scalars, the caller's, aliases); what was left
    out of it."""
    meta, left = scalar_metadata(ckpt.root, chosen, all_tensors)
    carried = ckpt.facts.get("metadata") or {}  # a safetensors input's own metadata
    for k in RESERVED_METADATA:
        if metadata and k in metadata:
            raise CheckpointError(None, f"the metadata cannot set the reserved key {k!r}")
    meta = {
        **{k: v for k, v in carried.items() if k not in RESERVED_METADATA},
        **meta,
        **(metadata or {}),
        "format": "pt",
    }
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    return meta, left


def _write_shards(
    dst: str,
    shards: list[list[Item]],
    meta: dict[str, str],
    sources: bytecopy.Sources,
    cb: Progress | None,
    verify: bool,
    total: int,
) -> list[str]:
    """Write the shards and their index into the folder ``dst`` (atomically); the files."""

    def write_one(path: str, shard: list[Item]) -> None:
        write_file(path, shard, meta, sources, cb, verify)
        if verify:
            verify_file(path, shard, meta, sources, phased(cb))

    return write_shards(dst, shards, total, write_one)
