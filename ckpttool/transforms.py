"""Pure functions on the checkpoint tree: find the state dicts inside, rename their keys.

Nothing here mutates its input; renaming returns new mappings.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .model import Opaque, TensorRef
from .tree import walk

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
    """A mapping of string keys whose values are tensors (None allowed, as for missing buffers)."""
    if not isinstance(node, dict) or isinstance(node, Opaque) or not node:
        return False
    has_tensor = False
    for k, v in node.items():
        if not isinstance(k, str):
            return False
        if isinstance(v, TensorRef):
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
    """State dicts in the tree, outermost first, not entering one found already."""
    found: list[StateDictInfo] = []
    taken: list[str] = []
    for path, node in walk(root):
        if any(path == t or path.startswith(t + ".") for t in taken if t or path):
            continue
        if _under_optimizer(path) or _is_param_state(node):
            continue  # optimizer.state.0 = {exp_avg: T, ...} is per-parameter state
        if is_state_dict(node):
            keys = tuple(node.keys())
            n = sum(1 for v in node.values() if isinstance(v, TensorRef))
            found.append(StateDictInfo(path, n, detect_prefix(keys), keys, node=node))
            taken.append(path)
        elif _is_module(node):
            from .tree import iter_tensors

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
    return any(any(o in part.lower() for o in _OPTIMIZER_KEYS) for part in path.split(".")[:-1])


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


# -- key surgery ---------------------------------------------------------------------------
M = TypeVar("M", bound=Mapping[str, Any])


class KeyCollisionError(ValueError):
    def __init__(self, first: str, second: str, new: str) -> None:
        self.first, self.second, self.new = first, second, new
        super().__init__(f"renaming would make {first!r} and {second!r} both {new!r}")


def rename_keys(state_dict: Mapping[str, Any], rename: Any) -> OrderedDict[str, Any]:
    """A new OrderedDict with ``rename(key)`` applied to every key, refusing collisions.

    The ``_metadata`` attribute that ``load_state_dict`` uses for version hooks is renamed the
    same way (its keys are module paths without the trailing dot; "" is the root module).
    """
    out: OrderedDict[str, Any] = (
        OrderedDict()
        if isinstance(state_dict, OrderedDict) or not isinstance(state_dict, dict)
        else {}  # type: ignore[assignment]
    )
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        new = rename(key)
        if new in out:
            raise KeyCollisionError(origin[new], key, new)
        out[new] = value
        origin[new] = key
    metadata = getattr(state_dict, "_metadata", None)
    if isinstance(metadata, Mapping) and isinstance(out, OrderedDict):
        new_meta: OrderedDict[str, Any] = OrderedDict()
        for key, value in metadata.items():
            renamed = rename(key + "." if key else "")
            new_meta[renamed[:-1] if renamed.endswith(".") else renamed] = value
        out._metadata = new_meta  # type: ignore[attr-defined]
    return out


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> OrderedDict[str, Any]:
    """Remove ``prefix`` from the keys that carry it (others are kept as they are)."""
    return rename_keys(state_dict, lambda k: k[len(prefix) :] if k.startswith(prefix) else k)


def add_prefix(state_dict: Mapping[str, Any], prefix: str) -> OrderedDict[str, Any]:
    """Add ``prefix`` to every key that does not already carry it (never ``module.module.``).

    Running it twice is a no-op. (A model with a child really named ``module`` is the one case
    this cannot tell apart; rename such keys with ``rename_keys``.)
    """
    return rename_keys(state_dict, lambda k: k if k.startswith(prefix) else prefix + k)


def replace_prefix(state_dict: Mapping[str, Any], old: str, new: str) -> OrderedDict[str, Any]:
    """Replace ``old`` by ``new`` at the start of the keys that carry ``old``."""
    return rename_keys(state_dict, lambda k: new + k[len(old) :] if k.startswith(old) else k)
