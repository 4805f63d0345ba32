"""Find the state dicts inside a checkpoint tree and the wrapper prefix their keys carry."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..model import Opaque, TensorRef
from ..tree import is_composite, walk

# Prefixes that wrappers add to every key: DataParallel/DDP, torch.compile, Lightning's
# LightningModule holding `self.model`, Fabric, FSDP.
KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.", "_forward_module.", "_fsdp_wrapped_module.")
# Where training checkpoints keep the model's weights, most specific first.
MODEL_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "net",
    "network",
    "model_state",
    "module",
    "ema",
    "weights",
    "params",
)


@dataclass(frozen=True)
class StateDictInfo:
    path: str  # dotted path from the root ("" for the root itself)
    tensors: int
    prefix: str | None  # a wrapper prefix every key carries, e.g. "module."
    keys: tuple[str, ...]
    source: str = "dict"  # "dict", or "module" for a whole pickled nn.Module
    node: Any = field(default=None, repr=False, compare=False)  # the mapping or module itself


def is_state_dict(node: Any) -> bool:
    """A mapping of string keys whose values are tensors (None allowed, as for missing buffers;
    sparse, nested and subclass tensors count as tensors)."""
    if not isinstance(node, dict) or isinstance(node, Opaque) or not node:
        return False
    has_tensor = False
    for k, v in node.items():
        if not isinstance(k, str):
            return False
        if isinstance(v, TensorRef) or is_composite(v):
            has_tensor = True
        elif v is not None:
            return False
    return has_tensor


def detect_prefix(keys: Iterable[str]) -> str | None:
    """The wrapper prefix (possibly stacked, ``module._orig_mod.``) that every key carries."""
    keys = [k for k in keys if k != "_metadata"]
    if not keys:
        return None
    prefix = ""
    while True:
        for known in KNOWN_PREFIXES:
            p = prefix + known
            if all(k.startswith(p) and len(k) > len(p) for k in keys):
                prefix = p
                break
        else:
            return prefix or None


def _is_module(node: Any) -> bool:
    return (
        isinstance(node, Opaque)
        and isinstance(node.state, dict)
        and ("_parameters" in node.state or "_modules" in node.state)
    )


def find_state_dicts(root: Any) -> list[StateDictInfo]:
    """State dicts in the tree, outermost first, not entering one found already, nor a sparse,
    nested or subclass tensor (a jagged tensor's ``_metadata_cache`` is not a state dict)."""
    found: list[StateDictInfo] = []
    taken: list[str] = []
    for path, node in walk(root, enter=lambda v: not is_composite(v)):
        if any(path == t or path.startswith(t + ".") for t in taken if t or path):
            continue
        if _under_optimizer(path) or _is_param_state(node):
            continue  # optimizer.state.0 = {exp_avg: T, ...} is per-parameter state
        if is_state_dict(node):
            keys = tuple(node.keys())
            n = sum(1 for v in node.values() if isinstance(v, TensorRef) or is_composite(v))
            found.append(StateDictInfo(path, n, detect_prefix(keys), keys, node=node))
            taken.append(path)
        elif _is_module(node):
            from ..tree import iter_tensors

            names = [n for n, _ in iter_tensors(node)]
            if names:
                found.append(
                    StateDictInfo(path, len(names), detect_prefix(names), (), "module", node)
                )
                taken.append(path)
        if path == "" and (found or _is_module(node)):
            break
    return found


_OPTIMIZER_KEYS = ("optim", "opt_state", "scheduler", "scaler")
_PARAM_STATE_KEYS = frozenset(
    [
        "step",
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "momentum_buffer",
        "square_avg",
        "acc_delta",
        "sum",
        "mu",
        "eta",
        "prev",
        "step_size",
        "ax",
        "exp_inf",
    ]
)


def _under_optimizer(path: str) -> bool:
    """Inside an optimizer's state (``optimizer.state.3``, ``optimizer_states.0.state.fc.w``)."""
    return _optimizer_folder(path.rpartition(".")[0])


@functools.lru_cache(maxsize=4096)  # siblings share their folder: asked once per folder
def _optimizer_folder(folder: str) -> bool:
    return any(any(o in part.lower() for o in _OPTIMIZER_KEYS) for part in folder.split("."))


def _is_param_state(node: Any) -> bool:
    """Per-parameter optimizer state ({step, exp_avg, exp_avg_sq}), whatever it is keyed by."""
    return isinstance(node, dict) and bool(node) and set(node) <= _PARAM_STATE_KEYS


def default_state_dict(root: Any) -> StateDictInfo | None:
    """The model's weights in a checkpoint: a bare state dict, ``model`` & co. in a training
    checkpoint, else the largest state dict, else a whole pickled module."""
    found = find_state_dicts(root)
    sds = [s for s in found if s.source == "dict"]
    if not sds:
        return next((s for s in found if s.source == "module"), None)
    paths = {s.path: s for s in sds}
    for key in ("", *MODEL_KEYS):
        if key in paths:
            return paths[key]
    return max(sds, key=lambda s: s.tensors)
