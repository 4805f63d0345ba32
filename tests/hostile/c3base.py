"""The case record and shared helpers of issue 18's corpus (see ``corpus3.py``)."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import pk
from .corpus import W_BYTES, marker_path
from .pk import Call, G

# The verdicts `ckpttool scan` must give (issue 18's vocabulary).
SAFE, DANGEROUS, UNVETTED, UNREADABLE = "safe", "dangerous", "unvetted code", "unreadable"
VERDICTS = (SAFE, DANGEROUS, UNVETTED, UNREADABLE)

# How confirm3 loads a case, as torch or numpy really would.
TORCH, JIT, DCP, NUMPY, FOLDER = "torch", "jit", "dcp", "numpy", "folder"
SITE = "site"  # the case folder's sub-folder that holds modules the case imports


@dataclass(frozen=True)
class Case3:
    """One case: ``build(d)`` writes a file or folder under ``d`` and returns its path.

    ``expect`` is the verdict ``ckpttool scan`` must give; ``also`` the others that are as
    right (kept for a few cases where two answers are honest, each with its ``note``).
    ``payload``: loading it with ``loader`` really runs code that creates ``marker_path(d)``
    (confirmed by the tests); ``loads``: for a case without payload, whether that load
    succeeds (benign and class-10 files load; unreadable ones do not). ``site``: confirm
    puts ``d/site`` on ``sys.path`` (the victim has the module installed). ``needs``:
    modules the payload needs at load time.
    """

    id: str
    cls: int  # the class of issue 18 (1..11); 0 for the benign set
    build: Callable[[Path], Path]
    expect: str
    also: tuple[str, ...] = ()
    loader: str = TORCH
    payload: bool = False
    site: bool = False
    needs: tuple[str, ...] = ()
    loads: bool | None = None  # without payload: does the real loader succeed? (None: unchecked)
    note: str = ""

    @property
    def accepted(self) -> tuple[str, ...]:
        return (self.expect, *self.also)

    @property
    def hostile(self) -> bool:
        """Not safe: the CLI must exit non-zero and every writer must refuse."""
        return self.expect != SAFE


REGISTRY: list[Case3] = []


def add(
    id: str,
    cls: int,
    expect: str,
    make: Callable[[Path], bytes] | None = None,
    *,
    name: str = "model.pt",
    build: Callable[[Path], Path] | None = None,
    **kw: Any,
) -> None:
    """Register a case: ``make(d)`` gives the bytes of ``d/name`` (or ``build`` does it all)."""
    if build is None:
        assert make is not None

        def build(d: Path, make: Callable[[Path], bytes] = make) -> Path:
            p = Path(d) / name
            p.write_bytes(make(Path(d)))
            return p

    assert expect in VERDICTS, expect
    REGISTRY.append(Case3(id, cls, build, expect, **kw))


# --- payloads: each only ever creates the marker file of the case folder ---------------------


def marker(d: Path) -> str:
    return str(marker_path(d))


def sh(d: Path) -> str:
    return f"touch {shlex.quote(marker(d))}"


def py(d: Path) -> str:
    return f"open({marker(d)!r}, 'w').close()"


def expr(d: Path) -> str:
    """A Python expression that creates the marker (for eval-like sinks)."""
    return f"__import__('os').system({sh(d)!r})"


def argv(d: Path) -> list[str]:
    return ["touch", marker(d)]


def os_system(d: Path) -> Call:
    return Call(G("os", "system"), (sh(d),))


def exec_(d: Path) -> Call:
    return Call(G("builtins", "exec"), (py(d),))


def state(extra: Any) -> dict[str, Any]:
    """A state dict with one real tensor next to ``extra``."""
    return {"w": pk.tensor("0", 6, (2, 3)), "extra": extra}


STORAGES = {"0": W_BYTES}


def user_module(d: Path, name: str, source: str) -> str:
    """Write module ``name`` into ``d/site`` (where confirm finds it); returns the name."""
    site = Path(d) / SITE
    site.mkdir(exist_ok=True)
    (site / f"{name}.py").write_text(f"MARKER = {marker(d)!r}\n" + source)
    return name
