"""Model wrappers (DataParallel, DDP, ``torch.compile``) and the key prefixes they add.

``unwrap`` finds the bare module; ``fix_state_dict`` renames a state dict's keys to fit a
model however it is wrapped. Importing this module does not import torch.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = ["FixResult", "fix_state_dict", "unwrap"]


# -- unwrap -------------------------------------------------------------------------------------
def _inner(model: Any) -> Any | None:
    """The module a wrapper holds, or None when ``model`` is no known wrapper."""
    from torch import nn

    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    # torch.compile's OptimizedModule (torch._dynamo.eval_frame); checked by name so that
    # importing dynamo is not needed.
    if type(model).__name__ == "OptimizedModule" and isinstance(
        model._modules.get("_orig_mod"), nn.Module
    ):
        return model._modules["_orig_mod"]
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DataParallel, DistributedDataParallel and ``torch.compile``.

    Wrappers may be stacked in any order (``DDP(torch.compile(m))``, ``torch.compile(DDP(m))``);
    all are removed. A module that is not wrapped is returned as it is.
    """
    seen = 0
    inner = _inner(model)
    while inner is not None:
        model = inner
        inner = _inner(model)
        seen += 1
        if seen > 64:
            raise ValueError("module wrappers nested more than 64 deep (a cycle?)")
    return model


# -- fix_state_dict -----------------------------------------------------------------------------
@dataclass
class FixResult:
    """What :func:`fix_state_dict` did, and what still does not fit the model.

    Attributes:
        state_dict: a new dict whose keys fit the model (the input is never modified).
        stripped: the wrapper prefix removed from every key (e.g. ``"module."``), or None.
        added: the wrapper prefix added to every key (e.g. ``"module."``), or None. When both
            sides share an outer prefix, these name the part after it: ``module.`` keys fixed
            for ``DDP(torch.compile(m))`` report ``added="_orig_mod."``.
        missing: keys the model expects that ``state_dict`` lacks, after the fix.
        unexpected: keys in ``state_dict`` that the model does not have, after the fix.
    """

    state_dict: collections.OrderedDict[str, Any]
    stripped: str | None = None
    added: str | None = None
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """True if keys were renamed."""
        return self.stripped is not None or self.added is not None

    @property
    def ok(self) -> bool:
        """True if ``model.load_state_dict(self.state_dict, strict=True)`` will find every key."""
        return not self.missing and not self.unexpected

    def summary(self) -> str:
        """One line for logs: what changed, and how many keys are still missing/unexpected."""
        parts = []
        if self.stripped:
            parts.append(f"stripped {self.stripped!r}")
        if self.added:
            parts.append(f"added {self.added!r}")
        if not parts:
            parts.append("keys unchanged")
        if self.ok:
            parts.append("all keys match")
        else:
            parts.append(f"{len(self.missing)} missing, {len(self.unexpected)} unexpected")
            shown = (self.missing or self.unexpected)[:3]
            parts.append("e.g. " + ", ".join(shown))
        return "; ".join(parts)


def _keys(state_dict: Mapping[str, Any]) -> list[str]:
    return [k for k in state_dict if k != "_metadata"]


def fix_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> FixResult:
    """Rename ``state_dict``'s keys to the prefixes ``model`` expects.

    ``model`` may be bare or wrapped in DataParallel, DistributedDataParallel or
    ``torch.compile`` (stacked too); ``state_dict`` may come from any of these. The wrapper prefix
    each side carries on every key (``module.``, ``_orig_mod.``, ``module._orig_mod.``, ... see
    :data:`ckpttool.transforms.KNOWN_PREFIXES`) is detected, the file's prefix is stripped and
    the model's added. The ``_metadata`` that ``load_state_dict`` uses for version hooks is
    renamed the same way. If renaming would match fewer of the model's keys than leaving the
    keys alone, they are left alone.

    Returns:
        a :class:`FixResult`; ``model.load_state_dict(result.state_dict, strict=True)`` works
        when ``result.ok``.

    Raises:
        ValueError: ``state_dict`` looks like a whole training checkpoint (pass its model entry,
            e.g. ``ckpt["model"]``), or renaming would make two keys equal.
    """
    from ..analysis.state_dicts import detect_prefix
    from ..ops.keys import KeyCollisionError, rename_keys

    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, not {type(state_dict).__name__}")
    _refuse_training_checkpoint(state_dict)
    wanted = list(model.state_dict().keys())
    given = _keys(state_dict)
    have = detect_prefix(given) or ""
    want = detect_prefix(wanted) or ""

    def rename(key: str) -> str:
        return want + key[len(have) :] if key.startswith(have) else key

    try:
        fixed = rename_keys(state_dict, lambda k: k)  # a copy, _metadata included
        stripped = added = None
        if set(given) != set(wanted) and have != want:
            candidate = rename_keys(state_dict, rename)
            if _matches(candidate, wanted) >= _matches(state_dict, wanted):
                fixed = candidate
                if want.startswith(have):  # e.g. "" -> "module.", "module." -> "module._orig_mod."
                    added = want[len(have) :]
                elif have.startswith(want):  # e.g. "module." -> ""
                    stripped = have[len(want) :]
                else:  # e.g. "module." -> "_orig_mod."
                    stripped, added = have, want
    except KeyCollisionError as exc:
        raise ValueError(f"cannot fix the keys: {exc}") from None

    wanted_set = set(wanted)
    fixed_keys = _keys(fixed)
    fixed_set = set(fixed_keys)
    return FixResult(
        state_dict=fixed,
        stripped=stripped,
        added=added,
        missing=[k for k in wanted if k not in fixed_set],
        unexpected=[k for k in fixed_keys if k not in wanted_set],
    )


def _matches(state_dict: Mapping[str, Any], wanted: list[str]) -> int:
    keys = set(_keys(state_dict))
    return sum(1 for k in wanted if k in keys)


def _refuse_training_checkpoint(state_dict: Mapping[str, Any]) -> None:
    import torch

    values = list(state_dict.values())
    if any(isinstance(v, torch.Tensor) for v in values):
        return
    for name, value in state_dict.items():
        if isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values()):
            raise ValueError(
                f"this looks like a training checkpoint, not a state dict: pass its model "
                f"entry, e.g. ckpt[{name!r}]"
            )
