"""``tabulate``, imported without ``importlib.metadata``.

tabulate 0.10 asks ``importlib.metadata`` for its own version when it is imported, and that
import pulls in ``email``, ``socket``, ``csv`` and more: about 30 ms of the 200 ms an
``inspect`` takes. While tabulate is imported here, ``importlib.metadata`` is a stand-in that
knows no distribution (tabulate then calls itself version "unknown"); the real module is
imported as usual by anything that asks for it later.
"""

from __future__ import annotations

import sys
import types


def _import_quietly() -> types.ModuleType:
    if "tabulate" in sys.modules or "importlib.metadata" in sys.modules:
        import tabulate as module

        return module
    stand_in = types.ModuleType("importlib.metadata")

    class PackageNotFoundError(ModuleNotFoundError):
        pass

    def version(name: str) -> str:
        raise PackageNotFoundError(name)

    stand_in.PackageNotFoundError = PackageNotFoundError  # type: ignore[attr-defined]
    stand_in.version = version  # type: ignore[attr-defined]
    sys.modules["importlib.metadata"] = stand_in
    try:
        import tabulate as module
    finally:
        if sys.modules.get("importlib.metadata") is stand_in:
            del sys.modules["importlib.metadata"]
    return module


_tabulate = _import_quietly()
tabulate = _tabulate.tabulate
tabulate_formats: list[str] = list(_tabulate.tabulate_formats)

__all__ = ["tabulate", "tabulate_formats"]
