"""The globals the tree picklers write by name (``torch._utils._rebuild_tensor_v2``), never
imported, and where CPython's C pickler finds them.

The C pickler writes a global only after importing its module and finding the very object in
it. ``pt_cpickle`` therefore names each global it writes by a key of this module, unique to
its run (:func:`lend`), which this module resolves (PEP 562) while the run lasts; it then spells
the real name in place of each key.
"""

from __future__ import annotations

from typing import Any


class GlobalRef:
    """A global written by name (``torch._utils._rebuild_tensor_v2``)."""

    __slots__ = ("module", "name")
    __name__ = "GlobalRef"

    def __init__(self, full: str) -> None:
        self.module, _, self.name = full.rpartition(".")

    def __call__(self, *args: Any) -> Any:  # pickle insists that reduce functions are callable
        raise TypeError("placeholder")


_lent: dict[str, Any] = {}  # key -> the object a running C pickler writes as this module's key


def lend(key: str, obj: Any) -> None:
    """Make ``obj`` this module's attribute ``key`` until :func:`take_back`."""
    _lent[key] = obj


def take_back(keys: list[str]) -> None:
    for key in keys:
        _lent.pop(key, None)


def __getattr__(name: str) -> Any:
    try:
        return _lent[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
