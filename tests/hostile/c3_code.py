"""Issue 18, classes 6 to 8: code that loading imports and runs.

Class 6: callables no allowlist vets (sympy parses strings with ``eval``; fsspec's
``LocalFileOpener`` and ``wave.Wave_write`` create files; ``typing.get_type_hints`` evaluates
annotation strings) and classes of modules the victim has installed (``d/site`` here).
Class 7: TorchScript archives, whose ``code/`` runs on load (``__setstate__``).
Class 8: DCP folders, whose non-tensor items are ``torch.save`` bytes that ``dcp.load`` and
``dcp_to_torch_save`` read with ``weights_only=False``.

Builders of classes 6 (whole modules), 7 and 8 import torch; the others write bytes.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from . import pk
from .c3base import (
    DANGEROUS,
    DCP,
    JIT,
    SITE,
    STORAGES,
    UNREADABLE,
    UNVETTED,
    add,
    expr,
    marker,
    os_system,
    sh,
    state,
    user_module,
)
from .pk import Call, G, NewObj
from .zipw import torch_zip


def _zip(payload: Any) -> bytes:
    return torch_zip(pk.dumps(state(payload)), STORAGES)


# --- class 6: unvetted code ------------------------------------------------------------------
KNOWN_SINK = (UNVETTED,)  # a scanner may name these "unvetted" rather than "dangerous"
_SINK_NOTE = "runs code when called; 'unvetted code' is as right as 'dangerous'"


def _sink(id: str, mod: str, name: str, args, needs: tuple[str, ...] = ()) -> None:  # type: ignore[no-untyped-def]
    add(
        id, 6, DANGEROUS, lambda d: _zip(Call(G(mod, name), args(d))),
        also=KNOWN_SINK, payload=True, needs=needs, note=_SINK_NOTE,
    )  # fmt: skip


for _name, _args in {
    "S": lambda d: (expr(d),),
    "sympify": lambda d: (expr(d),),
    "N": lambda d: (expr(d),),
    "Tuple": lambda d: (expr(d),),
    "FiniteSet": lambda d: (expr(d),),
    "Integral": lambda d: (expr(d), "x"),
    "Poly": lambda d: (expr(d),),
}.items():
    _sink(f"c6_sympy_{_name}_evaluates_a_string", "sympy", _name, _args, ("sympy",))
_sink(
    "c6_fsspec_local_file_opener_creates_a_file",
    "fsspec.implementations.local",
    "LocalFileOpener",
    lambda d: (marker(d), "wb"),
    ("fsspec",),
)
_sink("c6_wave_wave_write_creates_a_file", "wave", "Wave_write", lambda d: (marker(d),))
add(
    "c6_typing_get_type_hints_evaluates_annotations",
    6,
    DANGEROUS,
    lambda d: _zip(
        Call(
            G("typing", "get_type_hints"),
            (
                pk.Build(
                    Call(G("types", "SimpleNamespace"), ()), {"__annotations__": {"x": expr(d)}}
                ),
            ),
        )
    ),
    also=KNOWN_SINK,
    payload=True,
    note=_SINK_NOTE,
)

_NET = (
    "class Net:\n"
    "    def __setstate__(self, state):\n"
    "        open(MARKER, 'w').close()\n"
    "        self.__dict__.update(state)\n"
)
add(
    "c6_user_class_setstate",
    6,
    UNVETTED,
    lambda d: _zip(NewObj(G(user_module(d, "c3u_net", _NET), "Net"), (), {"depth": 3})),
    payload=True,
    site=True,
)
add(
    "c6_user_module_runs_code_on_import",
    6,
    UNVETTED,
    lambda d: _zip(
        G(user_module(d, "c3u_config", "open(MARKER, 'w').close()\nCONFIG = 1\n"), "CONFIG")
    ),
    payload=True,
    site=True,
    note="the pickle only names a constant of the module: importing it runs the module",
)
add(
    "c6_user_function_called_with_plain_values",
    6,
    UNVETTED,
    lambda d: _zip(
        Call(
            G(
                user_module(
                    d, "c3u_fn", "def helper(x):\n    open(MARKER, 'w').close()\n    return x\n"
                ),
                "helper",
            ),
            (3,),
        )
    ),
    also=(DANGEROUS,),
    payload=True,
    site=True,
    note="an unknown function called: 'dangerous' is as right as 'unvetted code'",
)

_TINY = (
    "import torch\n"
    "class TinyNet(torch.nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.fc = torch.nn.Linear(2, 2)\n"
    "    def __setstate__(self, state):\n"
    "        open(MARKER, 'w').close()\n"
    "        super().__setstate__(state)\n"
)


@contextlib.contextmanager
def imported(d: Path, name: str, source: str) -> Iterator[ModuleType]:
    """Import module ``name`` from ``d/site`` for the build only (the tests never keep it)."""
    user_module(d, name, source)
    sys.path.insert(0, str(Path(d) / SITE))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(Path(d) / SITE))
        sys.modules.pop(name, None)


def _whole_model(d: Path) -> Path:
    import torch

    p = Path(d) / "model.pt"
    with imported(d, "c3u_tinynet", _TINY) as mod, torch.random.fork_rng():
        net = mod.TinyNet()
        with torch.no_grad():
            net.fc.weight.copy_(torch.arange(4.0).reshape(2, 2))
            net.fc.bias.zero_()
        torch.save(net, p)
    return p


add(
    "c6_pickled_whole_nn_module_of_a_user_module",
    6,
    UNVETTED,
    build=_whole_model,
    payload=True,
    site=True,
)


def _linear(d: Path) -> Path:
    import torch

    p = Path(d) / "linear.pt"
    with torch.random.fork_rng():
        torch.save(torch.nn.Linear(2, 2), p)
    return p


add(
    "c6_pickled_whole_torch_linear",
    6,
    UNVETTED,
    build=_linear,
    loads=True,
    note="no payload: a whole torch.nn module is a class loading instantiates (not plain data)",
)


# --- class 7: TorchScript --------------------------------------------------------------------
def _script(d: Path, on_load: bool, name: str = "scripted.pt") -> Path:
    from . import jitmods

    p = Path(d) / name
    if on_load:
        jitmods.save_file_on_load(str(p), marker(d))
    else:
        jitmods.save_plain(str(p))
    return p


add("c7_torchscript_module", 7, UNVETTED, build=lambda d: _script(d, False), loads=True)
add(
    "c7_torchscript_setstate_creates_a_file_jit_load",
    7,
    UNVETTED,
    build=lambda d: _script(d, True),
    loader=JIT,
    payload=True,
    note="scripted __setstate__ runs torch.from_file(MARKER, shared=True, size=4)",
)
add(
    "c7_torchscript_setstate_creates_a_file_torch_load",
    7,
    UNVETTED,
    build=lambda d: _script(d, True, "model.pt"),
    payload=True,
    note="torch.load hands a TorchScript archive to torch.jit.load",
)


# --- class 8: DCP folders --------------------------------------------------------------------
class Reduce:
    """Pickles as ``fn(*args)``; what an attacker puts in a state dict before ``dcp.save``."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


def _dcp_save(folder: Path, extra: Any) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(6.0).reshape(2, 3), "extra": extra}, checkpoint_id=str(folder))


def dcp_folder(extra: Any):  # type: ignore[no-untyped-def]
    def build(d: Path) -> Path:
        folder = Path(d) / "dcp"
        _dcp_save(folder, extra(d) if callable(extra) else extra)
        return folder

    return build


add(
    "c8_dcp_extra_item_os_system",
    8,
    DANGEROUS,
    build=dcp_folder(lambda d: Reduce(os.system, sh(d))),
    loader=DCP,
    payload=True,
)
add(
    "c8_dcp_extra_item_nested_payload",
    8,
    DANGEROUS,
    build=dcp_folder(lambda d: {"epoch": 3, "hooks": [1, Reduce(os.system, sh(d))]}),
    loader=DCP,
    payload=True,
)


def _dcp_metadata(d: Path) -> Path:
    """A benign folder whose ``.metadata`` pickle runs a payload before the real metadata."""
    folder = dcp_folder({"step": 3})(d)
    meta = folder / ".metadata"
    meta.write_bytes(pk.proto(2) + pk.enc(os_system(d)) + pk.POP + meta.read_bytes())
    return folder


add("c8_dcp_metadata_pickle_payload", 8, DANGEROUS, build=_dcp_metadata, loader=DCP, payload=True)


def _dcp_user(d: Path) -> Path:
    with imported(d, "c3u_dcpnet", _NET) as mod:
        obj = mod.Net()
        obj.depth = 3
        return dcp_folder(obj)(d)


add(
    "c8_dcp_extra_item_user_class",
    8,
    UNVETTED,
    build=_dcp_user,
    loader=DCP,
    payload=True,
    site=True,
)


def _distcp_alone(d: Path) -> Path:
    folder = dcp_folder(lambda d: Reduce(os.system, sh(d)))(d)
    return next(folder.glob("*.distcp"))


add(
    "c8_dcp_data_file_scanned_alone",
    8,
    DANGEROUS,
    build=_distcp_alone,
    also=(UNREADABLE,),
    loader=DCP,
    payload=True,
    note="the .distcp named on its own: its bytes item still holds the payload",
)
