"""What a DCP output holds: the tree flattened as ``dcp.save`` flattens it, values made plain,
plain optimizers named by the model's keys.

``torch.distributed.checkpoint`` flattens a nested state dict into dotted keys
(``_traverse.traverse_state_dict``): mappings are entered (keys as ``str``), lists are entered
when they hold tensors or mappings, anything else is one pickled value. Tensors become tensor
items, everything else value items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError
from ..model import Opaque, TensorRef
from ..tree import KEEP, is_composite, transform
from .left_out import COMPOSITE_DCP, NOT_PLAIN, TENSOR_IN_VALUE, LeftOut
from .optim_names import is_numbered, named, parameter_names
from .plain import NotPlain, plain_equivalent

Path = tuple[Any, ...]


@dataclass
class Flat:
    """The flattened tree: tensors and values by dotted key, in order, and what was left out."""

    order: list[str] = field(default_factory=list)
    tensors: list[tuple[str, Path, TensorRef]] = field(default_factory=list)
    values: list[tuple[str, Path, Any]] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)  # objects written as plain equivalents


def _mapping(v: Any) -> bool:
    return isinstance(v, dict) and not isinstance(v, Opaque)


def _terminal(v: Any) -> bool:
    """DCP's ``_is_terminal``: a list is entered when it holds tensors or mappings."""
    if _mapping(v):
        return False
    if not isinstance(v, list):
        return True
    for e in v:
        if _mapping(e) or (isinstance(e, list) and not _terminal(e)):
            return False
        if isinstance(e, TensorRef) or is_composite(e):
            return False
    return True


def flatten(root: dict[Any, Any], where: str, label: str) -> Flat:
    """The leaves of ``root`` (``label``) as DCP names them (``a.b.0.c``) with their paths."""
    flat = Flat()
    stack: list[tuple[Path, Any]] = [((str(k),), v) for k, v in reversed(list(root.items()))]
    while stack:
        path, value = stack.pop()
        if _mapping(value):
            stack += [((*path, str(k)), v) for k, v in reversed(list(value.items()))]
        elif not _terminal(value):
            stack += [((*path, i), v) for i, v in reversed(list(enumerate(value)))]
        else:
            _leaf(flat, path, value, where)
    if not flat.tensors:
        raise CheckpointError(where, f"{label} holds no tensors to write")
    return flat


def _leaf(flat: Flat, path: Path, value: Any, where: str) -> None:
    fqn = ".".join(str(p) for p in path)
    if fqn in flat.order:
        raise CheckpointError(where, f"two entries would both be named {fqn!r} in the DCP keys")
    if isinstance(value, TensorRef):
        if value.kind == "quantized" or value.storage is None:
            flat.left_out.append(LeftOut(fqn, COMPOSITE_DCP))
            return
        flat.order.append(fqn)
        flat.tensors.append((fqn, path, value))
        return
    if is_composite(value):
        flat.left_out.append(LeftOut(fqn, COMPOSITE_DCP))
        return
    try:
        plain = _plain(value, flat, fqn)
    except NotPlain:
        flat.left_out.append(LeftOut(fqn, NOT_PLAIN))
        return
    except _HoldsTensor:
        flat.left_out.append(LeftOut(fqn, TENSOR_IN_VALUE))
        return
    flat.order.append(fqn)
    flat.values.append((fqn, path, plain))


class _HoldsTensor(Exception):
    pass


def _plain(value: Any, flat: Flat, fqn: str, depth: int = 0) -> Any:
    """``value`` with every object replaced by its plain equivalent (numbers, dicts, lists)."""
    if depth > 100:
        raise NotPlain("too deep")
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return value
    if isinstance(value, TensorRef) or is_composite(value):
        raise _HoldsTensor
    if isinstance(value, Opaque):
        made: dict[str, Any] = {}
        plain = plain_equivalent(value, made)
        if made or isinstance(plain, TensorRef):  # a numpy array: a tensor inside a value
            raise _HoldsTensor
        flat.replaced.append(f"{fqn}: {value.global_name}")
        return _plain(plain, flat, fqn, depth + 1)
    if isinstance(value, dict):
        out = type(value)() if type(value) is not dict else {}
        for k, v in value.items():
            out[_plain(k, flat, fqn, depth + 1)] = _plain(v, flat, fqn, depth + 1)
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(v, flat, fqn, depth + 1) for v in value]
        return items if isinstance(value, list) else type(value)(items)
    raise NotPlain(type(value).__name__)


# -- optimizers by parameter number -------------------------------------------------------------
def name_optimizers(
    root: Any, model: dict[str, Any] | None, where: str, skip: tuple[str, ...] = ()
) -> tuple[Any, list[str]]:
    """``root`` with every optimizer state dict that numbers its parameters keyed by the model's
    names instead (``get_optimizer_state_dict``'s layout); the paths of those renamed."""
    from ..tree import walk

    found = [(path, node) for path, node in walk(root) if is_numbered(node)]
    if not found:
        return root, []
    if model is None:
        raise CheckpointError(
            where,
            f"holds an optimizer state dict ({found[0][0] or 'the root'}) that numbers its "
            "parameters, and no model state dict to name them by",
        )
    renamed: dict[int, Any] = {}
    for path, node in found:
        names = parameter_names(node, model, f"{where}: optimizer {path or '(root)'}", skip)
        renamed[id(node)] = named(node, names)
    new = transform(root, lambda n: renamed.get(id(n), KEEP))
    return new, [p for p, _ in found]
