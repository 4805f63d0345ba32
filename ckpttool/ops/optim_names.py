"""Naming a plain torch optimizer's parameters by the model's keys, as FSDP/DCP expects them.

``optimizer.state_dict()`` numbers the parameters ``0..N-1`` in the order of its param groups;
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` keys the same state by the
parameters' names. Without the model, the numbers are matched to the model state dict's
tensors statically, under what ``model.parameters()`` guarantees:

- parameters come in the state dict's order, skipping buffers and frozen tensors the optimizer
  does not hold, and each param group lists its parameters in that order (``model.parameters()``
  and filters of ``named_parameters()`` do);
- a tied weight is one parameter, named by its first key;
- only floating-point (or complex) tensors can be parameters, and a parameter's per-element
  state (``exp_avg``, ``momentum_buffer``...) has its shape;
- torch's own buffers (BatchNorm's ``running_mean``, ``running_var``, ``num_batches_tracked``)
  are not parameters, nor are the keys the caller names (``not_parameters`` patterns).

Every assignment that satisfies these is counted; exactly one is used, otherwise the optimizer
is refused as ambiguous, saying which parameters could not be told apart.
"""

from __future__ import annotations

from typing import Any

from .. import dtypes
from ..errors import CheckpointError
from ..model import Opaque, TensorRef

MAX_STEPS = 2_000_000  # work bound of the matching (far above any real model's)
TORCH_BUFFERS = frozenset({"running_mean", "running_var", "num_batches_tracked"})


def is_numbered(node: Any) -> bool:
    """Whether ``node`` is an optimizer state dict that numbers its parameters."""
    if not isinstance(node, dict) or isinstance(node, Opaque):
        return False
    state, groups = node.get("state"), node.get("param_groups")
    if not isinstance(state, dict) or not isinstance(groups, list) or not groups:
        return False
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in state):
        return False  # keyed by name already (DCP, DeepSpeed's consolidated moments)
    ids = [p for g in groups if isinstance(g, dict) for p in g.get("params", ())]
    return bool(ids) and all(isinstance(p, int) and not isinstance(p, bool) for p in ids)


def _candidates(model: dict[str, Any], skip: tuple[str, ...]) -> list[tuple[str, TensorRef]]:
    """The tensors that can be parameters, by first key (tied aliases dropped)."""
    from fnmatch import fnmatchcase

    seen: set[tuple[Any, ...]] = set()
    out = []
    for name, ref in model.items():
        if not isinstance(name, str) or not isinstance(ref, TensorRef):
            continue
        if name.rsplit(".", 1)[-1] in TORCH_BUFFERS or any(fnmatchcase(name, p) for p in skip):
            continue
        s = ref.storage
        ident = (
            (s.file, s.key, ref.storage_offset, ref.shape, ref.stride, ref.dtype)
            if s is not None
            else (id(ref),)
        )
        if ident in seen:
            continue
        seen.add(ident)
        info = dtypes.get(ref.dtype)
        if info.is_floating or ref.dtype.startswith("complex"):
            out.append((name, ref))
    return out


def _shape_of_state(state: Any) -> tuple[int, ...] | None:
    """The shape a parameter's per-element state shows (None: no such state)."""
    if not isinstance(state, dict):
        return None
    shapes = {v.shape for v in state.values() if isinstance(v, TensorRef) and v.shape != ()}
    if len(shapes) == 1:
        return shapes.pop()
    return None if not shapes else (-1,)  # several shapes: matches nothing


def _count(groups: list[list[tuple[int, ...] | None]], cands: list[tuple[int, ...]]) -> Any:
    """(number of assignments capped at 2, one assignment as (group, position) picks) of the
    groups' parameters to candidate positions: every group an order-preserving subsequence,
    no position used twice. A forward pass over the positions, one layer of states (how far
    each group got) at a time, so that models with thousands of tensors need no recursion."""
    n_groups, needed = len(groups), sum(len(g) for g in groups)
    layer: dict[tuple[int, ...], tuple[int, Any]] = {(0,) * n_groups: (1, None)}
    steps = 0

    def add(
        into: dict[tuple[int, ...], tuple[int, Any]], key: tuple[int, ...], n: int, path: Any
    ) -> None:
        old = into.get(key)
        into[key] = (n, path) if old is None else (min(2, old[0] + n), old[1])

    for j, have in enumerate(cands):
        left = len(cands) - j - 1  # positions after this one
        nxt: dict[tuple[int, ...], tuple[int, Any]] = {}
        for progress, (n, path) in layer.items():
            if needed - sum(progress) <= left:
                add(nxt, progress, n, path)  # position j is not a parameter of the optimizer
            for g in range(n_groups):
                k = progress[g]
                if k < len(groups[g]) and (groups[g][k] is None or groups[g][k] == have):
                    key = (*progress[:g], k + 1, *progress[g + 1 :])
                    if needed - sum(key) <= left:
                        add(nxt, key, n, ((g, j), path))
        layer = nxt
        steps += len(layer)
        if steps > MAX_STEPS:
            raise _TooMany
    count, path = layer.get(tuple(len(g) for g in groups), (0, None))
    picks = []
    while path is not None:
        pick, path = path
        picks.append(pick)
    return count, tuple(reversed(picks))


class _TooMany(Exception):
    pass


def parameter_names(
    osd: dict[str, Any], model: dict[str, Any], where: str, skip: tuple[str, ...] = ()
) -> dict[int, str]:
    """{parameter number: model key} for an optimizer state dict, or refuse (see the module);
    ``skip``: patterns of model keys that are not parameters."""
    groups_ids = [list(g.get("params", ())) for g in osd["param_groups"]]
    all_ids = [p for ids in groups_ids for p in ids]
    if len(set(all_ids)) != len(all_ids):
        raise CheckpointError(where, "lists a parameter number twice in its param groups")
    state = osd["state"]
    wanted = [[_shape_of_state(state.get(p)) for p in ids] for ids in groups_ids]
    cands = _candidates(model, skip)
    try:
        count, picks = _count(wanted, [ref.shape for _, ref in cands])
    except _TooMany:
        count, picks = 2, ()
    if count == 0:
        raise CheckpointError(
            where,
            f"numbers {len(all_ids)} parameters that cannot be matched to the model's "
            f"{len(cands)} floating-point tensors in order (shapes of their state differ)",
            remedy="not_parameters",
        )
    if count > 1:
        unknown = sum(1 for ids in wanted for w in ids if w is None)
        why = f"; {unknown} of them have no state to show their shape" if unknown else ""
        raise CheckpointError(
            where,
            f"numbers {len(all_ids)} parameters that match the model's {len(cands)} "
            f"floating-point tensors in more than one way{why}: cannot name them",
            remedy="not_parameters",
        )
    names: dict[int, str] = {}
    done = [0] * len(groups_ids)
    for g, j in picks:
        names[groups_ids[g][done[g]]] = cands[j][0]
        done[g] += 1
    return names


def named(osd: dict[str, Any], names: dict[int, str]) -> dict[str, Any]:
    """The optimizer state dict keyed by names, as ``get_optimizer_state_dict`` returns it."""
    state = {names[p]: s for p, s in osd["state"].items() if p in names}
    groups = []
    for g in osd["param_groups"]:
        groups.append({**g, "params": [names[p] for p in g["params"]]})
    out = dict(osd)
    out["state"] = state
    out["param_groups"] = groups
    return out
