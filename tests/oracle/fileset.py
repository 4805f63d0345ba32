"""Every file we have, as ``(source, id)`` -> a path: the committed fixtures, the fidelity zoo's
``torch.save`` outputs, the hostile corpora (round 1, round 2, round 3 once it lands), two DCP
folders and the real-world checkpoints (read in place, never copied; absent: none).

``ids()`` lists the units without building anything (for test parametrization); ``build_all``
writes the generated ones under a folder (each corpus case in a folder of its own, since a
payload's marker is written next to the file it came from).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..conftest import (
    EXPECTED_FIXTURES,
    FIXTURES,
    REAL_WORLD,
    REAL_WORLD_REASON,  # noqa: F401  (re-exported for the tests)
    REAL_WORLD_RECORDS,
)

Unit = tuple[str, str]  # (source, id)


def _corpus(name: str) -> list[Any]:
    """The cases of ``tests.hostile.<name>`` (``[]`` when that module does not exist yet)."""
    try:
        mod = importlib.import_module(f"tests.hostile.{name}")
    except ImportError as exc:
        if exc.name and exc.name.endswith(name):
            return []
        raise
    for attr in ("CASES3", "CASES2", "CASES"):
        cases = getattr(mod, attr, None)
        if cases:
            return list(cases)
    return []


CORPORA = ("corpus", "corpus2", "corpus3")


def _zoo_cases() -> dict[str, Any]:
    try:
        from ..fidelity import zoo
    except ImportError:  # torch missing: no zoo
        return {}
    return zoo.CASES


DCP_CASES = ("plain", "extra-objects", "payload-extra")
# megatron-core 0.16's torch_dist iteration folder: its .metadata caches torch's own SavePlan
# dataclasses (allowlisted as data), read by DCP's loader (0.15's pickles megatron's classes)
MEGATRON_CASES = ("mcore-0.16",)


def ids() -> list[Unit]:
    out: list[Unit] = [("fixtures", n) for n in sorted(EXPECTED_FIXTURES)]
    out += [("zoo", n) for n in _zoo_cases()]
    for c in CORPORA:
        out += [(c, case.id) for case in _corpus(c)]
    out += [("dcp", n) for n in DCP_CASES]
    out += [("megatron", n) for n in MEGATRON_CASES]
    out += [("real-world", r["file"]) for r in REAL_WORLD_RECORDS]
    return out


class _Payload:
    """Pickled by ``__reduce__`` as a call that writes ``path`` (pickling it runs nothing)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.path!r}, 'w').close()",))


def _dcp(case: str, folder: Path, reuse: bool = False) -> Path:
    out = folder / f"dcp-{case}"
    if reuse and (out / ".metadata").is_file():
        return out
    import torch
    import torch.distributed.checkpoint as dcp

    sd: dict[str, Any] = {"w": torch.arange(6.0).reshape(2, 3), "step": 7}
    if case == "extra-objects":
        sd["extra"] = {"names": ["a", "b"], "lr": 0.5, "t": torch.ones(2)}
    elif case == "payload-extra":
        sd["extra"] = _Payload(folder / "PWNED")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(out))
    return out


@dataclass(frozen=True)
class Built:
    """A unit on disk: its path, the loader the victim uses (None: the usual one for the
    input) and folders of modules the victim has installed."""

    path: Path
    kind: str | None = None
    sys_path: tuple[str, ...] = ()


Builder = Callable[[], "Path | Built | None"]


def _builders(
    folder: Path, source: str | None = None, reuse: bool = False
) -> Iterator[tuple[Unit, Builder]]:
    for unit, make in _all_builders(folder, reuse):
        if source is None or unit[0] == source:
            yield unit, make


def _all_builders(folder: Path, reuse: bool = False) -> Iterator[tuple[Unit, Builder]]:
    for n in sorted(EXPECTED_FIXTURES):
        yield ("fixtures", n), lambda n=n: FIXTURES / n
    zoo_cases = _zoo_cases()
    if zoo_cases:
        from ..fidelity import zoo

        zdir = folder / "zoo"
        for name, case in zoo_cases.items():

            def make(case: Any = case, name: str = name) -> Path:
                d = zdir / name
                if reuse and (d / f"{name}.pt").is_file():
                    return d / f"{name}.pt"
                d.mkdir(parents=True, exist_ok=True)
                return Path(zoo.write(case, str(d)))

            yield ("zoo", name), make
    for c in CORPORA:
        for case in _corpus(c):

            def build(case: Any = case, c: str = c) -> Built:
                d = folder / c / case.id
                if d.exists():
                    shutil.rmtree(d)
                d.mkdir(parents=True)
                p = Path(case.build(d))
                # round 3 says how the victim loads a case, and which modules it has installed
                loader = getattr(case, "loader", None)
                site = (str(d / "site"),) if getattr(case, "site", False) else ()
                return Built(p, loader if loader in ("jit", "dcp", "numpy") else None, site)

            yield (c, case.id), build
    for n in DCP_CASES:
        yield ("dcp", n), lambda n=n: _dcp(n, folder / "dcp", reuse)
    for n in MEGATRON_CASES:
        yield ("megatron", n), lambda n=n: FIXTURES / "megatron" / n / "iter_0000010"
    for r in REAL_WORLD_RECORDS:
        yield ("real-world", r["file"]), lambda f=r["file"]: REAL_WORLD / f


# torch.save writes a random .data/serialization_id: the torch-built sources are kept and reused
# while what made them is unchanged (their records are then found in the oracle's cache)
_REUSED = {"zoo": "fidelity/zoo.py", "dcp": "oracle/fileset.py"}


def _stamp(source: str) -> str:
    tests = Path(__file__).resolve().parents[1]
    h = hashlib.sha256((tests / _REUSED[source]).read_bytes())
    try:
        from importlib.metadata import version

        h.update(version("torch").encode())
    except Exception:
        h.update(b"?")
    return h.hexdigest()


def build_all(folder: Path, source: str | None = None) -> dict[Unit, Built | str]:
    """Build every unit (of ``source``) under ``folder``: what was built, or the builder's error.

    ``zoo`` and ``dcp`` are reused from an earlier build in the same folder when the code that
    made them and torch's version are the same (a stamp file says so)."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp_file = folder / ".stamp"
    reuse = source in _REUSED and stamp_file.is_file() and stamp_file.read_text() == _stamp(source)
    out: dict[Unit, Built | str] = {}
    cwd = os.getcwd()
    if source in _REUSED and not reuse:
        shutil.rmtree(folder)
        folder.mkdir(parents=True)
    for unit, make in _builders(folder, source, reuse):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = make()
            out[unit] = p if isinstance(p, Built) else Built(Path(p)) if p else "no path"
        except Exception as exc:  # a broken builder is reported by its test, not here
            out[unit] = f"build failed: {type(exc).__name__}: {exc}"
        finally:
            os.chdir(cwd)
    if source in _REUSED and not reuse:
        stamp_file.write_text(_stamp(source))
    return out
