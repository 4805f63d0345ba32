"""``convert``: re-save a checkpoint as a CPU-tagged torch zip file, with key surgery.

The fast path never materialises a tensor: the pickle is rewritten (locations set to ``cpu``,
keys renamed) and each storage record is copied byte for byte from the input with
``copy_file_range``. Only dtype casts, big-endian inputs and compressed records pass through
memory, one chunk at a time. The output is written atomically and verified by reading it back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import dtypes
from ..analysis.state_dicts import find_state_dicts
from ..errors import CheckpointError
from ..model import Checkpoint, Opaque, TensorRef
from ..progress import phased
from ..readers.hf_folder import note as folder_note
from ..tree import KEEP, get_path, transform, walk
from ..unpickling.policy import check_writable
from ..unpickling.unpickler import StorageValue
from ..writers.atomic import atomic_file
from ..writers.pt import StoragePlan, pickle_for, verify_pt, write_pt
from ..writers.pt_pickle import OutStorage, Pickled
from .keys import KeyCollisionError, KeyOps
from .plain import MemoryStorage, judge_weights_only, make_plain
from .prepare import cast_targets, check_cast, key_ops, open_source

Progress = Callable[[int], None]


VERIFICATION = "structure and storage bytes re-read"
"""What ``verify`` proves: the output re-opened by ckpttool's reader has the tensors (names,
dtypes, shapes, strides, offsets, storages) that were written, and every storage record's bytes
have the CRC-32 computed from the input. It does not load the output with torch (that costs
``import torch``); the differential tests in ``tests/fidelity`` do that."""
VERIFICATION_CLONED = "structure re-read; storage bytes re-read, or where cloned, extents compared"
"""The same where records were cloned (:mod:`ckpttool.writers.clone`): a cloned range is
proven to share the input's blocks (FIEMAP), so it holds the input's bytes, without reading
them; its CRC-32 is the input record's, not recomputed."""


@dataclass
class ConvertResult:
    src: str
    dst: str
    tensors: int
    storages: int
    bytes: int
    renamed: list[tuple[str, int]] = field(default_factory=list)  # (state dict path, keys)
    # key operations that renamed nothing: (state dict path, action, argument), see KeyOps.idle
    idle: list[tuple[str, str, str]] = field(default_factory=list)
    key_unused: bool = False  # ``key`` named a state dict, but no key operation was asked for
    replaced: list[str] = field(default_factory=list)  # plain-object replacements
    cast: int = 0  # storages cast to another dtype
    notes: list[str] = field(default_factory=list)
    # globals the output pickles that torch.load(weights_only=True) refuses, from the pickle
    # written (its default allowlist, torch 2.13)
    unsafe_globals: list[str] = field(default_factory=list)
    # whether torch.load(weights_only=True) opens the output, judged from the globals the
    # written pickle names and its protocol
    weights_only: bool = False
    verified: bool = False
    # what verification checked (empty when it was skipped): the output is re-read by
    # ckpttool's own reader, not loaded with torch
    verification: str = ""


# -- planning -----------------------------------------------------------------------------
def _select(ckpt: Checkpoint, only: str | None) -> Any:
    if only is None:
        return ckpt.root
    try:
        return get_path(ckpt.root, only)
    except KeyError:
        top = ", ".join(repr(k) for k in list(ckpt.root)[:8]) if isinstance(ckpt.root, dict) else ""
        raise CheckpointError(
            ckpt.path, f"no entry {only!r} to select" + (f" (top-level keys: {top})" if top else "")
        ) from None


def _rename(path: str, root: Any, ops: KeyOps, key: str | None, result: ConvertResult) -> Any:
    if not ops and key is None:
        return root
    if key is not None:
        try:
            target = get_path(root, key)
        except KeyError:
            raise CheckpointError(path, f"no entry {key!r}", remedy="key") from None
        if not isinstance(target, dict) or isinstance(target, Opaque):
            raise CheckpointError(path, f"{key!r} is not a state dict", remedy="key")
        targets = [(key, target)]
        if not ops:  # it names a state dict, but nothing renames it
            result.key_unused = True
            return root
    else:
        found = find_state_dicts(root)
        sds = [s for s in found if s.source == "dict"]
        if not sds:
            if found:
                raise CheckpointError(
                    path,
                    "holds a whole pickled module, not a state dict: key options do not apply",
                )
            raise CheckpointError(path, "no state dict found to rename", remedy="choose_key")
        targets = [(s.path, s.node) for s in sds]
    replacements: dict[int, Any] = {}
    for sd_path, sd in targets:
        try:
            new = ops.apply(sd)
        except KeyCollisionError as exc:
            where = f" in {sd_path!r}" if sd_path else ""
            raise CheckpointError(
                path,
                f"renaming would make {exc.first!r} and {exc.second!r} both {exc.new!r}{where}",
            ) from None
        changed = sum(1 for a, b in zip(sd, new, strict=True) if a != b)
        result.renamed.append((sd_path, changed))
        result.idle += [(sd_path, action, arg) for action, arg in ops.idle(sd)]
        replacements[id(sd)] = new
    return transform(root, lambda n: replacements.get(id(n), KEEP))


def plan_storages(
    root: Any, cast: str | None, memory: dict[str, MemoryStorage] | None = None
) -> StoragePlan:
    """Number the output storages in order of first use, as torch.save does.

    ``memory`` holds the storages made in memory (plain-object replacements), by source key.
    """
    castable = cast_targets(root) if cast else set()
    outs: list[OutStorage] = []
    by_source: dict[tuple[str, str], OutStorage] = {}
    storage_of: dict[int, OutStorage] = {}
    dtype_of: dict[int, str] = {}
    named: list[tuple[str, TensorRef]] = []
    for name, node in walk(root):
        if isinstance(node, TensorRef):
            named.append((name, node))
            src = node.storage
        elif isinstance(node, StorageValue):  # a storage saved directly
            src = node.base
        else:
            continue
        ref = node
        assert src is not None
        ident = (src.file, src.key)
        out = by_source.get(ident)
        if out is None:
            dtype = src.dtype
            if (
                cast
                and isinstance(ref, TensorRef)
                and id(ref) in castable
                and dtypes.get(dtype).is_floating
                and dtype != cast
                and ref.kind != "quantized"
            ):
                dtype = cast
            out = OutStorage(str(len(outs)), dtype, src.numel, source=src)
            by_source[ident] = out
            outs.append(out)
        storage_of[id(ref)] = out
        if isinstance(ref, StorageValue):
            if out.dtype != src.dtype:
                raise CheckpointError(
                    src.file, f"storage {src.key!r} is saved directly: it cannot be cast"
                )
            continue
        out.tensors.append(name)
        if out.dtype != out.source.dtype and ref.dtype == out.source.dtype:  # type: ignore[union-attr]
            dtype_of[id(ref)] = out.dtype
    return StoragePlan(outs, storage_of, dtype_of, named, {} if memory is None else memory)


def _pickle_checked(
    src: str,
    ckpt: Checkpoint,
    root: Any,
    plan: StoragePlan,
    result: ConvertResult,
    plain_objects: bool,
    allow_user_classes: bool,
) -> Pickled:
    """The output's pickle, once the globals it names may be written; records whether
    ``torch.load(weights_only=True)`` opens it (with ``plain_objects``, it must)."""
    pickled = pickle_for(root, plan)
    judged = judge_weights_only(pickled)
    result.unsafe_globals, result.weights_only = judged.refused, judged.loadable
    check_writable(src, ckpt.verdict, judged.refused, allow_user_classes=allow_user_classes)
    if plain_objects and not judged.loadable:
        raise CheckpointError(
            src,
            "cannot replace objects by plain equivalents: torch.load(weights_only=True) would "
            f"still refuse the output ({judged.why()})",
        )
    return pickled


# -- the command -----------------------------------------------------------------------------
def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    strip_prefix: str | tuple[str, ...] = (),
    add_prefix: str | tuple[str, ...] = (),
    replace_prefix: tuple[str, str] | tuple[tuple[str, str], ...] = (),
    key: str | None = None,
    only: str | None = None,
    dtype: str | None = None,
    plain_objects: bool = False,
    allow_user_classes: bool = False,
    verify: bool = True,
    force: bool = False,
    in_place: bool = False,
    progress: Callable[[int], Progress | None] | None = None,
) -> ConvertResult:
    """Re-save ``src`` as a torch zip file at ``dst`` with every storage tagged ``cpu``.

    ``strip_prefix="module."`` / ``add_prefix="module."`` rename the keys of every state dict
    found (or of ``key``); ``only`` writes just one entry (e.g. ``"model"``); ``dtype`` casts
    floating-point storages; ``plain_objects`` replaces objects torch's ``weights_only``
    loader refuses by plain equivalents; objects of user classes are written only with
    ``allow_user_classes`` (dangerous globals and references to callables never).
    ``progress(total_bytes)`` may return a callback that receives byte counts. Raises
    :class:`CheckpointError` on bad input or a failed write; nothing is left behind then.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    ops = key_ops(strip_prefix, add_prefix, replace_prefix)
    check_cast(dtype)
    ckpt = open_source(src, dst, force=force, in_place=in_place)
    if ckpt.format == "torchscript":
        raise CheckpointError(
            src,
            "is a TorchScript archive (code and weights): convert does not rewrite it",
            remedy="extract_torchscript",
        )
    two_sets = folder_note(ckpt.facts.get("folder"))  # an input folder with two weight sets
    result = ConvertResult(src, dst, 0, 0, 0, notes=[two_sets] if two_sets else [])
    root = _select(ckpt, only)
    root = _rename(src, root, ops, key, result)
    memory: dict[str, MemoryStorage] = {}
    if plain_objects:
        root, result.replaced = make_plain(src, root, memory)
    plan = plan_storages(root, dtype, memory)
    pickled = _pickle_checked(src, ckpt, root, plan, result, plain_objects, allow_user_classes)
    result.tensors = len(plan.named)
    result.storages = len(plan.outs)
    result.bytes = sum(o.nbytes for o in plan.outs)
    result.cast = sum(1 for o in plan.outs if o.source and o.dtype != o.source.dtype)
    cb = progress(result.bytes) if progress else None
    with atomic_file(dst) as tmp:
        write_pt(tmp, pickled.data, plan, cb, check_copies=verify)
        if verify:
            verify_pt(tmp, plan, phased(cb))
            result.verified = True
            cloned = any(o.cloned for o in plan.outs)
            result.verification = VERIFICATION_CLONED if cloned else VERIFICATION
    return result
