"""Tensors saved from the meta device: rows of inspect's tensor table.

torch pickles them as ``_rebuild_meta_tensor_no_storage(dtype, size, stride, requires_grad)``
(no storage); ckpttool keeps that call as written and reads dtype, shape and stride from it.
"""

from __future__ import annotations

from typing import Any

from .. import dtypes
from ..model import Opaque, TensorRef
from ..tree import walk
from ..unpickling.unpickler import global_name

_META = "torch._utils._rebuild_meta_tensor_no_storage"
_PARAMETER_CALLS = ("torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state")


def meta_tensors(root: Any) -> list[tuple[int, dict[str, Any]]]:
    """Tensors saved from the meta device (dtype and shape, no storage): kept by ckpttool as
    the rebuild calls torch wrote, listed here so that inspect shows them. Each is a tensor
    table row (device ``meta``, no storage), with the number of stored tensors before it."""
    out: list[tuple[int, dict[str, Any]]] = []
    params: set[str] = set()
    stored = 0  # TensorRefs met so far: the tensor table's order
    for path, node in walk(root):
        stored += isinstance(node, TensorRef)
        if not isinstance(node, Opaque):
            continue
        if node.global_name in _PARAMETER_CALLS:
            params.add(path)
        if node.global_name != _META or len(node.args) < 3:
            continue
        owner = path.removesuffix(".__args__.0")
        name = owner if owner in params else path
        dtype = (global_name(node.args[0]) or "?").removeprefix("torch.")
        shape, stride = (_ints(a) for a in node.args[1:3])
        out.append((stored, _meta_row(name, dtype, shape, stride, name != path)))
    return out


def _ints(value: Any) -> list[int] | None:
    if isinstance(value, Opaque) and value.args:  # torch.Size((2, 3))
        value = value.args[0]
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return list(value)
    return None


def _meta_row(
    name: str, dtype: str, shape: list[int] | None, stride: list[int] | None, param: bool
) -> dict[str, Any]:
    numel = 1
    for n in shape or ():
        numel *= n
    itemsize = dtypes.DTYPES[dtype].itemsize if dtype in dtypes.DTYPES else 0
    return {
        "name": name,
        "dtype": dtype,
        "shape": shape,
        "stride": stride,
        "storage_offset": 0,
        "device": "meta",
        "nbytes": numel * itemsize if shape is not None else 0,
        "storage": None,
        "kind": "parameter" if param else "tensor",
        "shared_with": [],
        "aliases": [],
    }
