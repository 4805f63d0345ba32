"""Walking the unpickled object tree without recursion, naming each node by its dotted path."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .model import Opaque, TensorRef

# nn.Module attributes whose contents appear in state_dict() without the attribute's own name.
_TRANSPARENT_ATTRS = frozenset({"_parameters", "_buffers", "_modules"})


def key_str(key: Any) -> str:
    """How a mapping key appears in a dotted path."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool) or key is None:
        return repr(key)
    if isinstance(key, int):
        return str(key)
    return repr(key)


def join(prefix: str, part: str) -> str:
    return f"{prefix}.{part}" if prefix else part


def children(node: Any, path: str) -> list[tuple[str, Any]]:
    """The named children of a container node (empty for leaves)."""
    if isinstance(node, Opaque):
        out: list[tuple[str, Any]] = [(join(path, key_str(k)), v) for k, v in node.items()]
        out += [(join(path, str(i)), v) for i, v in enumerate(node.list_items)]
        state = node.state
        states = state if isinstance(state, tuple) else (state,)
        for st in states:
            if isinstance(st, dict):
                for k, v in st.items():
                    if k in _TRANSPARENT_ATTRS and isinstance(v, dict):
                        out += [(join(path, key_str(k2)), v2) for k2, v2 in v.items()]
                    else:
                        out.append((join(path, key_str(k)), v))
            elif st is not None:
                out.append((join(path, "__state__"), st))
        if node.args:
            out.append((join(path, "__args__"), node.args))
        return out
    if isinstance(node, dict):
        return [(join(path, key_str(k)), v) for k, v in node.items()]
    if isinstance(node, (list, tuple)):
        return [(join(path, str(i)), v) for i, v in enumerate(node)]
    if isinstance(node, (set, frozenset)):
        return [(join(path, str(i)), v) for i, v in enumerate(node)]
    return []


def walk(root: Any) -> Iterator[tuple[str, Any]]:
    """Yield (path, node) in document order, entering each container once.

    Containers reached again through another reference (a memoised, shared object) are yielded
    but not entered a second time, so a shared-reference DAG costs its size, not its path count;
    tensors are leaves and are yielded under every name they are reached by (tied weights).
    """
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("", root)]
    while stack:
        path, node = stack.pop()
        yield path, node
        if isinstance(node, (dict, list, tuple, set, frozenset)):  # Opaque is a dict
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.extend(reversed(children(node, path)))


def iter_tensors(root: Any) -> Iterator[tuple[str, TensorRef]]:
    for path, node in walk(root):
        if isinstance(node, TensorRef):
            yield path, node


def get_path(root: Any, path: str) -> Any:
    """Follow a dotted path of mapping keys / indices (``model``, ``optimizer.state``)."""
    node = root
    if not path:
        return node
    for part in path.split("."):
        for name, child in children(node, ""):
            if name == part:
                node = child
                break
        else:
            raise KeyError(path)
    return node
