"""Key surgery on state dicts: rename keys, strip/add/replace a prefix, refuse collisions.

Nothing here mutates its input; renaming returns new mappings.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

# The dtypes a writer can cast floating-point tensors to.
CAST_DTYPES = ("float16", "bfloat16", "float32", "float64")

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


@dataclass(frozen=True)
class KeyOps:
    """Key surgery applied to state dicts, in this order: strip, replace, add."""

    strip: tuple[str, ...] = ()
    replace: tuple[tuple[str, str], ...] = ()
    add: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.strip or self.replace or self.add)

    def idle(self, keys: Any) -> list[tuple[str, str]]:
        """The operations that rename no key, applied in order to ``keys``: ``("strip", P)``
        when no key carries P, ``("replace", "OLD=NEW")``, ``("add", P)`` when every key
        already carries P.

        Example:
            >>> KeyOps(strip=("zzz.",)).idle(["fc.weight"])
            [('strip', 'zzz.')]
        """
        names = [k for k in keys if isinstance(k, str)]
        out: list[tuple[str, str]] = []
        steps = [("strip", p, p, "") for p in self.strip]
        steps += [("replace", f"{old}={new}", old, new) for old, new in self.replace]
        for action, arg, old, new in steps:
            renamed = [new + k[len(old) :] if k.startswith(old) else k for k in names]
            if not any(k.startswith(old) for k in names) or renamed == names:
                out.append((action, arg))
            names = renamed
        for p in self.add:
            if all(k.startswith(p) for k in names):
                out.append(("add", p))
            names = [k if k.startswith(p) else p + k for k in names]
        return out

    def apply(self, sd: Any) -> Any:
        for p in self.strip:
            sd = strip_prefix(sd, p)
        for old, new in self.replace:
            sd = replace_prefix(sd, old, new)
        for p in self.add:
            sd = add_prefix(sd, p)
        return sd
