"""Walking the unpickled object tree without recursion, naming each node by its dotted path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .nodes import Opaque, TensorRef

_FROM_TYPE = "torch._tensor._rebuild_from_type_v2"
# nn.Module attributes whose contents appear in state_dict() without the attribute's own name.
_TRANSPARENT_ATTRS = frozenset({"_parameters", "_buffers", "_modules"})
# Rebuilds of tensors that are not one strided view of one storage: their inner tensors (indices,
# values, offsets, a jagged tensor's cached max/min sequence lengths, a DTensor's local shard)
# are parts, not tensors of the model.
COMPOSITE_REBUILDS = frozenset(
    (
        "torch._utils._rebuild_sparse_tensor",
        "torch._utils._rebuild_sparse_csr_tensor",
        "torch._utils._rebuild_nested_tensor",
        "torch._utils._rebuild_wrapper_subclass",
        _FROM_TYPE,  # left opaque: a subclass ckpttool does not model (DTensor, jagged)
        "torch.nested._internal.nested_tensor._rebuild_njt",
    )
)


def is_composite(node: Any) -> bool:
    """A sparse, nested or subclass tensor kept as the pickle built it (see
    ``COMPOSITE_REBUILDS``): one tensor of the model, made of parts."""
    return isinstance(node, Opaque) and node.global_name in COMPOSITE_REBUILDS


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
        state, args = node.state, node.args
        if node.global_name == _FROM_TYPE and len(args) == 4 and state is None:
            # a tensor subclass kept as torch wrote it (DTensor, a jagged NestedTensor):
            # name its tensors by the attributes its state sets (``w._local_tensor``)
            state, args = args[3], args[:3]
        if (
            isinstance(state, tuple)
            and len(state) == 2
            and (state[0] is None or isinstance(state[0], dict))
            and isinstance(state[1], dict)
        ):
            states: tuple[Any, ...] = state  # (__dict__, slots) as pickle writes it
        else:
            states = (state,)
        for st in states:
            if isinstance(st, dict):
                for k, v in st.items():
                    if k in _TRANSPARENT_ATTRS and isinstance(v, dict):
                        out += [(join(path, key_str(k2)), v2) for k2, v2 in v.items()]
                    else:
                        out.append((join(path, key_str(k)), v))
            elif st is not None:
                out.append((join(path, "__state__"), st))
        if args:
            out.append((join(path, "__args__"), args))
        return out
    if isinstance(node, TensorRef):
        # A per-channel quantized tensor's scales and zero points are tensors too.
        out = []
        if node.quantizer is not None:
            out.append((join(path, "__quantizer__"), node.quantizer))
        if node.attributes:
            out.append((join(path, "__dict__"), node.attributes))
        return out
    if isinstance(node, dict):
        return [(join(path, key_str(k)), v) for k, v in node.items()]
    if isinstance(node, (list, tuple)):
        return [(join(path, str(i)), v) for i, v in enumerate(node)]
    if isinstance(node, (set, frozenset)):
        return [(join(path, str(i)), v) for i, v in enumerate(node)]
    return []


def walk(root: Any, enter: Callable[[Any], bool] | None = None) -> Iterator[tuple[str, Any]]:
    """Yield (path, node) in document order, entering each container once.

    Containers reached again through another reference (a memoised, shared object) are yielded
    but not entered a second time, so a shared-reference DAG costs its size, not its path count;
    tensors are leaves and are yielded under every name they are reached by (tied weights).
    ``enter(node)`` False: the node is yielded but what is inside it is not.
    """
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("", root)]
    pop, push, add = stack.pop, stack.extend, seen.add
    while stack:
        path, node = pop()
        yield path, node
        if enter is not None and not enter(node):
            continue
        if isinstance(node, _ENTERED):  # Opaque is a dict
            if id(node) in seen:
                continue
            add(id(node))
            kids = children(node, path)
            if kids:
                push(reversed(kids))


_ENTERED = (dict, list, tuple, set, frozenset, TensorRef)


def aliases(root: Any) -> list[tuple[str, str]]:
    """``(path, first_path)`` for every container reached again through another reference
    (``{'model': sd, 'ema': sd}`` gives ``[('ema', 'model')]``), in document order.

    Costs what :func:`walk` costs (one entry per reference), so shared-reference bombs stay
    cheap; expanding the names beneath an alias is :func:`alias_names`' job, and bounded there.
    """
    first: dict[int, str] = {}
    out: list[tuple[str, str]] = []
    for path, node in walk(root):
        if _worth_aliasing(node):
            if id(node) in first:
                out.append((path, first[id(node)]))
            else:
                first[id(node)] = path
    return out


def _worth_aliasing(node: Any) -> bool:
    """Mutable containers, and tuples that hold tensors or containers (a shared ``(0.9, 0.999)``
    is a value, not an alias worth reporting)."""
    if isinstance(node, (dict, list, set, frozenset)):
        return bool(len(node)) or isinstance(node, Opaque)
    if isinstance(node, tuple):
        return any(isinstance(v, (TensorRef, dict, list, tuple)) for v in node)
    return False


def alias_names(
    names: list[str], pairs: list[tuple[str, str]], limit: int = 10_000
) -> tuple[dict[str, list[str]], bool]:
    """Every other path by which each of ``names`` is reached through the ``pairs`` of
    :func:`aliases`: ``{'model.w': ['ema.w']}``. At most ``limit`` names are made (aliases of
    aliases multiply); the flag says whether some were left out."""
    by_first: dict[str, list[str]] = {}
    for alias, first_path in pairs:
        by_first.setdefault(first_path, []).append(alias)
    out: dict[str, list[str]] = {}
    made = 0
    for name in names:
        todo, found = [name], []
        while todo:
            current = todo.pop()
            for i, ch in enumerate(current):
                if ch != ".":
                    continue
                for alias in by_first.get(current[:i], ()):
                    if made >= limit or len(current) > 4096:  # cycles through other paths
                        return out, True
                    new = alias + current[i:]
                    found.append(new)
                    made += 1
                    if not alias.startswith(current[:i] + "."):
                        todo.append(new)  # a cycle (x.me is x) names each path once only
        if found:
            out[name] = found
    return out, False


def iter_tensors(root: Any) -> Iterator[tuple[str, TensorRef]]:
    for path, node in walk(root):
        if isinstance(node, TensorRef):
            yield path, node


def get_path(root: Any, path: str) -> Any:
    """Follow a dotted path of mapping keys / indices (``model``, ``optimizer.state``).

    Keys may contain dots themselves (``{"run.v2": {...}}``): at each level the longest key
    that matches the rest of the path wins.
    """
    node = root
    parts = path.split(".") if path else []
    while parts:
        names = dict(children(node, ""))
        for n in range(len(parts), 0, -1):
            name = ".".join(parts[:n])
            if name in names:
                node, parts = names[name], parts[n:]
                break
        else:
            raise KeyError(path)
    return node


_KEEP = object()


def transform(root: Any, replace: Any) -> Any:
    """A copy of the tree in which ``replace(node)`` substitutes nodes (return ``KEEP`` for none).

    Shared references stay shared and cycles are preserved; leaves are not copied.
    """
    import sys

    memo: dict[int, Any] = {}

    def go(node: Any) -> Any:
        out: Any
        key = id(node)
        if key in memo:
            return memo[key]
        new = replace(node)
        if new is not _KEEP:
            memo[key] = new
            return new
        if isinstance(node, Opaque):
            cls = type(node)
            out = cls.__new__(cls, *(go(a) for a in node.args), **node.kwargs)
            out.__dict__["ck_how"] = node.__dict__.get("ck_how", "call")
            memo[key] = out
            for k, v in node.items():
                dict.__setitem__(out, go(k), go(v))
            out.__dict__["ck_list"] = [go(v) for v in node.list_items]
            out.__dict__["ck_state"] = go(node.state)
            return out
        if isinstance(node, dict):
            out = type(node)()
            memo[key] = out
            for k, v in node.items():
                out[go(k)] = go(v)
            if getattr(node, "__dict__", None):
                out.__dict__.update({k: go(v) for k, v in node.__dict__.items()})
            return out
        if isinstance(node, list):
            out = []
            memo[key] = out
            out.extend(go(v) for v in node)
            return out
        if isinstance(node, tuple):
            out = tuple(go(v) for v in node)
            memo[key] = out
            return out
        if isinstance(node, (set, frozenset)):
            out = type(node)(go(v) for v in node)
            memo[key] = out
            return out
        return node

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20000))
    try:
        return go(root)
    finally:
        sys.setrecursionlimit(limit)


KEEP = _KEEP
