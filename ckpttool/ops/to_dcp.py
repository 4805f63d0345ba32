"""``to-dcp``: write a ``torch.distributed.checkpoint`` folder from any checkpoint ckpttool reads.

The folder is what ``dcp.save`` writes (``.metadata`` + ``__0_0.distcp``), so an FSDP/FSDP2 job
at any world size resumes from a ``.pt``, a safetensors file or folder, a Hugging Face folder,
a DeepSpeed ZeRO folder or another DCP folder with ``dcp.load``. Each tensor is one chunk (the
whole tensor; ``dcp.load`` reshards it to the loading job's layout), copied from the input
with ``copy_file_range`` (a cast streams through memory one chunk at a time), read back and
checked; the folder is written beside its destination and renamed into place. torch is not
imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError
from ..model import TensorRef
from ..readers import open_checkpoint
from ..readers.distributed import LogicalStorage, model_state_dict
from ..tree import get_path
from ..unpickling.policy import refuse_dangerous
from ..writers import dcp as dcp_writer
from ..writers import numeric
from .consolidate import rename_model
from .dcp_files import write_folder
from .dcp_plan import Flat, flatten, name_optimizers
from .left_out import LeftOut
from .prepare import cast_targets, check_cast, input_files, key_ops
from .ranks import Ranks

Progress = Callable[[int], None]


@dataclass
class DcpResult:
    src: str
    dst: str
    kind: str  # the input's format
    selected: str  # "everything", "model weights", or the entry chosen
    tensors: int  # keys holding tensors
    items: int  # tensor items stored (tied keys share one)
    values: int  # keys holding pickled values
    bytes: int
    files: list[str] = field(default_factory=list)
    optimizers: list[str] = field(default_factory=list)  # optimizers named by parameter keys
    left_out: list[LeftOut] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)  # objects written as plain values
    renamed: int = 0
    cast: int = 0
    verified: bool = False


def _select(root: Any, src: str, key: str | None, model_only: bool) -> tuple[Any, str]:
    if model_only:
        found = model_state_dict(root)
        if found is None:
            raise CheckpointError(src, "holds no model state dict", remedy="key")
        node, path = found
        return node, f"model weights ({path})" if path else "model weights"
    if key is not None:
        try:
            return get_path(root, key), key
        except (KeyError, TypeError):
            raise CheckpointError(src, f"no entry {key!r}", remedy="key") from None
    return root, "everything"


def _choose(
    root: Any, src: str, how: tuple[str | None, bool, str | None, tuple[str, ...]], ops: Any
) -> tuple[dict[Any, Any], str, list[str], int]:
    """(what is written, how it is described, the optimizers named, keys renamed); ``how``:
    (key, model_only, under, not_parameters)."""
    key, model_only, under, skip = how
    root, renamed, _idle = rename_model(root, ops, src)
    model = model_state_dict(root) if isinstance(root, dict) else None
    chosen, label = _select(root, src, key, model_only)
    chosen, optimizers = name_optimizers(chosen, model[0] if model else None, src, skip)
    if under:
        chosen = {under: chosen}
    if not isinstance(chosen, dict) or isinstance(chosen, TensorRef):
        raise CheckpointError(src, f"{label} is not a dict of entries: DCP saves a dict")
    return chosen, label, optimizers, renamed


def _plan(
    flat: Flat, chosen: Any, dtype: str | None, src: str
) -> tuple[list[dcp_writer.TensorItem], int]:
    """One item per distinct tensor (tied keys share it), with its output dtype; the casts."""
    castable = cast_targets(chosen) if dtype else set()
    items: dict[Any, dcp_writer.TensorItem] = {}
    cast = 0
    for fqn, path, ref in flat.tensors:
        storage = ref.storage
        logical = storage.tensor if isinstance(storage, LogicalStorage) else None
        out = (logical.out_dtype if logical is not None else None) or ref.dtype
        if dtype and id(ref) in castable and numeric.can_cast(ref.dtype, dtype):
            out = dtype
        if out != ref.dtype and logical is None and not numeric.can_cast(ref.dtype, out):
            raise CheckpointError(src, f"tensor {fqn!r} cannot be cast to {out}")
        assert storage is not None
        ident = (
            id(ref)
            if logical is not None
            else (
                storage.file,
                storage.key,
                ref.storage_offset,
                ref.shape,
                ref.stride,
                repr(ref.metadata),
            )
        )
        key = (ident, out)
        item = items.get(key)
        if item is None:
            item = items[key] = dcp_writer.TensorItem([], [], ref, out, _phase(ref, out))
            cast += out != ref.dtype
        item.fqns.append(fqn)
        item.paths.append(path)
    return list(items.values()), cast


def _phase(ref: TensorRef, out: str) -> int | None:
    """The source offset modulo 4096 of a tensor copied verbatim (None: it passes memory)."""
    storage = ref.storage
    if out != ref.dtype or storage is None:
        return None
    if isinstance(storage, LogicalStorage) and storage.tensor is not None:
        segs = storage.tensor.segments
        return segs[0].offset % 4096 if segs else None
    if not ref.is_contiguous() or storage.compressed or storage.big_endian:
        return None
    return (storage.offset + ref.storage_offset * ref.itemsize) % 4096


def to_dcp(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    key: str | None = None,
    model_only: bool = False,
    under: str | None = None,
    not_parameters: tuple[str, ...] = (),
    dtype: str | None = None,
    strip_prefix: str | tuple[str, ...] = (),
    add_prefix: str | tuple[str, ...] = (),
    replace_prefix: tuple[tuple[str, str], ...] = (),
    verify: bool = True,
    force: bool = False,
    progress: Callable[[int], Progress | None] | None = None,
    files: int = 1,
    ranks: Ranks | None = None,
) -> DcpResult:
    """Write ``src`` as a DCP folder ``dst`` that ``torch.distributed.checkpoint.load`` reads.

    Args:
        src: a file, a Hugging Face or safetensors folder, a DCP or DeepSpeed folder.
        dst: the output folder (an existing DCP folder is replaced only with ``force``).
        key, model_only: write only this entry (``"model"``) / the model state dict, its keys
            at the top; under: nest what is written under this key (keys ``model.<name>``).
        not_parameters: patterns (``frozen.*``) of model keys that an optimizer numbering its
            parameters does not hold, when its naming is otherwise ambiguous.
        dtype: cast the model's floating-point weights (optimizer state keeps its dtypes).
        strip_prefix, add_prefix, replace_prefix: key surgery on the model state dict.
        verify: read the folder back; force: replace an existing DCP folder at ``dst``;
        progress: called with the total bytes, returns a callback fed bytes written.
        files, ranks: spread the tensors over ``files`` rank files (``__R_0.distcp``), or
            write them with the processes ``ranks`` (each its own file; rank 0 ``.metadata``).

    Numbered optimizers are keyed by name (:mod:`.optim_names`), objects made plain
    (:mod:`.dcp_plan`). Example: ``to_dcp("best.pt", "ckpt/step-0")``.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    check_cast(dtype)
    ckpt = open_checkpoint(src)
    dcp_writer.check_folder_target(input_files(ckpt), dst, force=force)
    refuse_dangerous(src, ckpt.verdict)
    how = (key, model_only, under, tuple(not_parameters))
    ops = key_ops(strip_prefix, add_prefix, replace_prefix)
    chosen, label, optimizers, renamed = _choose(ckpt.root, src, how, ops)
    flat = flatten(chosen, src, label)
    tensors, cast = _plan(flat, chosen, dtype, src)
    total = sum(t.nbytes for t in tensors)
    result = DcpResult(
        src, dst, ckpt.format, label, len(flat.tensors), len(tensors), len(flat.values), total,
        optimizers=optimizers, left_out=flat.left_out, replaced=flat.replaced, renamed=renamed,
        cast=cast, verified=verify,
    )  # fmt: skip
    values = [dcp_writer.ValueItem(f, p, v) for f, p, v in flat.values]
    cb = progress and progress(total)
    names = write_folder(dst, values, tensors, flat.order, (verify, files, ranks), cb)
    result.files = [os.path.join(dst, n) for n in [dcp_writer.METADATA, *names]]
    return result
