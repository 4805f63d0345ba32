"""The opening steps every writing command shares: key operations, the cast, the input's files,
refusing dangerous inputs, and which tensors a cast applies to.

Example:
    >>> ops = key_ops(strip="module.")
    >>> check_cast("bfloat16")
    >>> ckpt = open_source("best.pth", "out.pt", force=False, in_place=False)
"""

from __future__ import annotations

import re
from typing import Any, cast

from .. import dtypes
from ..analysis.state_dicts import find_state_dicts
from ..errors import CheckpointError
from ..model import Checkpoint, Opaque, TensorRef
from ..readers import open_checkpoint
from ..tree import iter_tensors, walk
from ..unpickling.policy import refuse_dangerous
from ..writers.atomic import check_target
from .keys import CAST_DTYPES, KeyOps
from .left_out import COMPOSITE_TENSOR

Prefixes = str | tuple[str, ...]
Replacements = tuple[str, str] | tuple[tuple[str, str], ...]


def key_ops(strip: Prefixes = (), add: Prefixes = (), replace: Replacements = ()) -> KeyOps:
    """One :class:`KeyOps` from the library's arguments, each a string or a tuple of them
    (``replace``: one ``(old, new)`` pair or a tuple of pairs)."""
    one_pair = bool(replace) and isinstance(replace[0], str)
    pairs = cast(tuple[tuple[str, str], ...], (replace,) if one_pair else tuple(replace))
    return KeyOps(
        strip=(strip,) if isinstance(strip, str) else tuple(strip),
        add=(add,) if isinstance(add, str) else tuple(add),
        replace=pairs,
    )


def check_cast(dtype: str | None) -> None:
    """Refuse a cast to a dtype the writers cannot produce."""
    if dtype is not None and dtype not in CAST_DTYPES:
        raise CheckpointError(
            None, f"cannot cast to {dtype!r}: the dtype must be one of {', '.join(CAST_DTYPES)}"
        )


def input_files(ckpt: Checkpoint) -> list[str]:
    """Every file the checkpoint is made of (an index and its shards, a folder's shards), so
    that no output replaces one of them."""
    dc = ckpt.facts.get("distributed")
    if dc is not None:
        return [ckpt.path, *(p for p, _ in dc.files)]
    return [ckpt.path, *dict.fromkeys(s.file for s in ckpt.storages.values() if s.file)]


def open_source(
    src: str,
    dst: str,
    *,
    force: bool,
    in_place: bool | None,
    is_dir: bool = False,
    distributed: bool = False,
) -> Checkpoint:
    """Open ``src``, refuse an output that would clobber something, refuse a dangerous input
    (and a folder of shards unless the command consolidates them: ``distributed``)."""
    ckpt = open_checkpoint(src)
    if ckpt.facts.get("distributed") is not None and not distributed:
        raise CheckpointError(
            src, "is a distributed checkpoint folder (DCP or DeepSpeed)", remedy="consolidate"
        )
    check_target(input_files(ckpt), dst, force=force, in_place=in_place, is_dir=is_dir)
    refuse_dangerous(src, ckpt.verdict)
    return ckpt


def cast_targets(chosen: Any) -> set[int]:
    """The floating tensors (by ``id``) a cast applies to: the weights of the model state dicts
    under the chosen node; where there are none (an optimizer chosen), every tensor except 0-dim
    ones and those named ``step``, so that bookkeeping such as Adam's step counters stays exact.
    """
    sds = [s for s in find_state_dicts(chosen) if s.source in ("dict", "module")]
    if sds:
        refs = (ref for sd in sds for _, ref in iter_tensors(sd.node))
    else:
        refs = (
            ref
            for name, ref in iter_tensors(chosen)
            if ref.shape and name.rsplit(".", 1)[-1] != "step"
        )
    return {id(ref) for ref in refs if dtypes.get(ref.dtype).is_floating}


# Rebuilds of tensors that are not one strided view of one storage: their inner tensors (indices,
# values, offsets, a DTensor's local shard) are parts, not tensors of the model.
_COMPOSITE = frozenset(
    (
        "torch._utils._rebuild_sparse_tensor",
        "torch._utils._rebuild_sparse_csr_tensor",
        "torch._utils._rebuild_nested_tensor",
        "torch._utils._rebuild_wrapper_subclass",
        "torch._tensor._rebuild_from_type_v2",  # left opaque: a subclass ckpttool does not model
        "torch.nested._internal.nested_tensor._rebuild_njt",
    )
)


def is_composite(value: Any) -> bool:
    return isinstance(value, Opaque) and value.global_name in _COMPOSITE


def dense_entries(node: Any) -> list[tuple[str, Any]]:
    """``(name, tensor)`` for every plain tensor under ``node``, and ``(name, COMPOSITE_TENSOR)``
    for each sparse, nested or subclass tensor, whose parts are not written."""
    return [
        (path, COMPOSITE_TENSOR if is_composite(value) else value)
        for path, value in walk(node, enter=lambda v: not is_composite(v))
        if isinstance(value, TensorRef) or is_composite(value)
    ]


def parse_size(text: str) -> int:
    """``5GB`` (decimal, as Hugging Face writes it), ``500MiB`` (binary) or a byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    number, unit = float(m.group(1)), (m.group(2) or "").upper()
    powers = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
    base = 1024 if "I" in unit else 1000
    size = int(number * base ** powers[unit.rstrip("B").rstrip("I")])
    if size <= 0:
        raise ValueError(f"not a positive size: {text!r}")
    return size
