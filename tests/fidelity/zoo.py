"""A deterministic zoo of small, real ``torch.save`` outputs.

Every value is derived from integers (``torch.arange``), never from float training, so the
files hold the same values on every CPU. ``CASES`` maps a case name to a :class:`Case`;
:func:`write` saves one into a folder. The classes below are pickled by reference as
``tests.fidelity.zoo.<Name>``: whole modules, a dataclass, a ``__slots__`` class, a tensor
subclass.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import pickle
import struct
import sys
import tempfile
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


# -- classes pickled by reference -------------------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 4)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(4, 2, bias=False)
        self.register_buffer("steps", torch.arange(3))
        self.label = "tiny"


class SharedSub(nn.Module):
    """A submodule used twice (reached by two paths)."""

    def __init__(self) -> None:
        super().__init__()
        block = nn.Linear(2, 2)
        self.a = block
        self.b = block


@dataclass
class Config:
    lr: float = 0.5
    layers: list[int] = field(default_factory=lambda: [1, 2])
    name: str = "cfg"


@dataclass(frozen=True)
class FrozenConfig:
    width: int
    tags: tuple[str, ...] = ("a",)


class Slotted:
    __slots__ = ("x", "y")

    def __init__(self, x: int, y: Any) -> None:
        self.x = x
        self.y = y

    def __eq__(self, other: object) -> bool:
        return type(other) is Slotted and (self.x, self.y) == (other.x, other.y)  # type: ignore[union-attr]


class SlottedWithDict:
    __slots__ = ("__dict__", "x")

    def __init__(self) -> None:
        self.x = 1
        self.extra = "d"


class Reduced:
    """Pickled through ``__reduce__`` as a call: ``Reduced(a, b)``."""

    def __init__(self, a: int, b: str) -> None:
        self.a, self.b = a, b

    def __reduce__(self) -> Any:
        return (Reduced, (self.a, self.b))


class NewArgs(int):
    """``__getnewargs__``: NEWOBJ with arguments."""

    def __new__(cls, value: int, label: str = "") -> NewArgs:
        self = super().__new__(cls, value)
        self.label = label
        return self

    def __getnewargs__(self) -> tuple[Any, ...]:
        return (int(self), self.label)


class NewArgsEx:
    """``__getnewargs_ex__``: NEWOBJ_EX at protocol 4."""

    def __new__(cls, *args: Any, scale: int = 1) -> NewArgsEx:
        self = super().__new__(cls)
        self.scale = scale
        return self

    def __getnewargs_ex__(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return ((), {"scale": self.scale})


class ListSub(list):  # type: ignore[type-arg]
    pass


class DictSub(dict):  # type: ignore[type-arg]
    pass


class Tagged(torch.Tensor):
    """A tensor subclass (pickled through ``_rebuild_from_type_v2``)."""


class MainTensor(torch.Tensor):
    """A tensor subclass as a script defines it: pickled as ``__main__.MyTensor``."""


MainTensor.__module__ = "__main__"
MainTensor.__name__ = MainTensor.__qualname__ = "MyTensor"


# -- building blocks --------------------------------------------------------------------------
def ints(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.arange(n).to(dtype)


def _linear_weights(model: nn.Module) -> nn.Module:
    """Integer-derived weights, so bytes do not depend on the CPU."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_((torch.arange(p.numel()).reshape(p.shape) - i) / 8)
    return model


def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return _linear_weights(TinyNet())  # type: ignore[return-value]


def state_dict() -> OrderedDict[str, torch.Tensor]:
    sd = tiny_net().state_dict()
    return OrderedDict((k, v.detach().clone()) for k, v in sd.items())


# -- dtypes -----------------------------------------------------------------------------------
def _all_dtypes() -> dict[str, torch.dtype]:
    names = [
        "float32", "float64", "float16", "bfloat16", "complex32", "complex64", "complex128",
        "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
        "float4_e2m1fn_x2", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2",
        "uint1", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7",
        "int1", "int2", "int3", "int4", "int5", "int6", "int7",
    ]  # fmt: skip
    return {n: getattr(torch, n) for n in names if hasattr(torch, n)}


def dtype_tensor(dtype: torch.dtype) -> torch.Tensor:
    """Six elements of ``dtype`` made from bytes 0..N (every dtype, even unusual ones)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = (torch.arange(6 * max(itemsize, 1)) % 61).to(torch.uint8)
    return raw.view(dtype) if itemsize else raw


def _dtypes_case(legacy: bool = False) -> dict[str, Any]:
    """Every dtype torch can save and load again (in the legacy format: fewer)."""
    out = {}
    for name, dt in _all_dtypes().items():
        try:
            t = dtype_tensor(dt)
            buf = io.BytesIO()
            torch.save(t, buf, _use_new_zipfile_serialization=not legacy)
            buf.seek(0)
            torch.load(buf)
        except (RuntimeError, TypeError, KeyError, AttributeError):
            continue
        out[name] = t
    return out


def _safetensors_dtypes() -> dict[str, Any]:
    """Every dtype safetensors 0.8 has a code for (the float8 kinds, complex64 included)."""
    names = [
        "float64", "float32", "float16", "bfloat16", "complex64", "int8", "int16", "int32",
        "int64", "uint8", "uint16", "uint32", "uint64", "bool", "float8_e4m3fn", "float8_e5m2",
        "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    ]  # fmt: skip
    return {n: dtype_tensor(getattr(torch, n)) for n in names if hasattr(torch, n)}


# -- views, bits, exotic tensors --------------------------------------------------------------
def _views(same_dtype: bool = False) -> dict[str, Any]:
    base = ints(24).reshape(4, 6)
    out = {
        "base": base,
        "row": base[1],
        "col": base[:, 2],
        "t": base.t(),
        "offset": base[2:, 3:],
        "step": base[::2, ::3],
        "expanded": ints(3).expand(4, 3),
        "overlap": torch.as_strided(base, (3, 4), (1, 2), 1),
        "empty": base[4:],
        "scalar": torch.tensor(7),
        "zero_stride": torch.as_strided(base, (2, 2), (0, 0), 5),
    }
    if not same_dtype:  # torch.save refuses one storage under two typed-storage dtypes, but
        # a uint8 storage may be viewed as the dtypes torch saves as untyped storages
        raw = torch.arange(24, dtype=torch.uint8)
        out.update(
            raw=raw,
            as_u16=raw.view(torch.uint16),
            as_f8=raw[4:].view(torch.float8_e4m3fn),
            as_u32=raw[8:16].view(torch.uint32),
        )
    return out


def _conj() -> dict[str, Any]:
    z = ints(8).view(torch.complex64)
    return {"z": z, "conj": z.conj(), "conj_tail": z.conj()[1:]}


def _neg() -> dict[str, Any]:
    z = ints(8).view(torch.complex64)
    return {"conj_imag": z.conj().imag, "neg_head": z.conj().imag[:1]}


def _quantized() -> dict[str, Any]:
    x = ints(12).reshape(3, 4) / 4
    return {
        "per_tensor": torch.quantize_per_tensor(x, 0.25, 3, torch.quint8),
        "per_tensor_qint8": torch.quantize_per_tensor(x, 0.5, 0, torch.qint8),
        "per_tensor_qint32": torch.quantize_per_tensor(x, 0.5, 1, torch.qint32),
        "per_channel": torch.quantize_per_channel(
            x,
            torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64),
            torch.tensor([0, 1, 2]),
            0,
            torch.quint8,
        ),
        "packed4": torch.quantize_per_tensor(ints(8) / 4, 0.25, 0, torch.quint4x2),
        "packed2": torch.quantize_per_tensor(ints(8) / 4, 0.25, 0, torch.quint2x4),
    }


def _sparse() -> dict[str, Any]:
    rows = [[0, 1, 0, 2], [3, 0, 0, 0], [0, 0, 4, 5], [0, 6, 0, 0]]
    dense = torch.tensor(rows, dtype=torch.float32)
    return {
        "coo": dense.to_sparse(),
        "csr": dense.to_sparse_csr(),
        "csc": dense.to_sparse_csc(),
        "bsr": dense.to_sparse_bsr((2, 2)),
        "bsc": dense.to_sparse_bsc((2, 2)),
    }


def _nested_strided() -> dict[str, Any]:
    return {"nt": torch.nested.nested_tensor([ints(3), ints(5)])}


def _nested_jagged() -> dict[str, Any]:
    return {"njt": torch.nested.nested_tensor([ints(3), ints(5)], layout=torch.jagged)}


def _nested_jagged_state_dict() -> dict[str, Any]:
    njt = torch.nested.nested_tensor([ints(3), ints(5)], layout=torch.jagged)
    return {"model": {"w": ints(2), "njt": njt}}


def _meta() -> dict[str, Any]:
    return {
        "m": torch.empty(2, 3, device="meta"),
        "p": nn.Parameter(torch.empty(4, device="meta")),
        "real": ints(2),
    }


def _subclass_attrs() -> dict[str, Any]:
    t = ints(4)
    t.note = "attr"  # type: ignore[attr-defined]
    p = nn.Parameter(ints(3))
    p.tag = 5  # type: ignore[attr-defined]
    sub = ints(2).as_subclass(Tagged)
    sub.extra = [1, 2]  # type: ignore[attr-defined]
    return {"attr": t, "param_attr": p, "sub": sub, "grad": ints(2).requires_grad_()}


def _parameters() -> dict[str, Any]:
    return {"p": nn.Parameter(ints(3)), "frozen": nn.Parameter(ints(2), requires_grad=False)}


@contextlib.contextmanager
def _gloo() -> Iterator[None]:
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group(
            "gloo", init_method=f"file://{os.path.join(d, 'pg')}", rank=0, world_size=1
        )
        try:
            yield
        finally:
            dist.destroy_process_group()


def _dtensor() -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    return {
        "w": distribute_tensor(ints(6).reshape(2, 3), mesh, [Shard(0)]),
        "b": distribute_tensor(ints(3), mesh, [Replicate()]),
    }


# -- training state ---------------------------------------------------------------------------
def _optimizer() -> dict[str, Any]:
    model = tiny_net()
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    # Adam's moments come from float math: replace them by integer-derived values.
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim():
                st[k] = (torch.arange(v.numel()).reshape(v.shape) / 16).to(v.dtype)
    sgd = torch.optim.SGD(model.parameters(), lr=0.25, momentum=0.5)
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "sgd": sgd.state_dict(),
        "scheduler": sched.state_dict(),
        "cosine": torch.optim.lr_scheduler.CosineAnnealingLR(sgd, 3).state_dict(),
        "epoch": 3,
    }


def _rng() -> dict[str, Any]:
    import random

    torch.manual_seed(1234)
    random.seed(1234)
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _grad_scaler() -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return {"scaler": scaler.state_dict()}


def _shared_containers() -> dict[str, Any]:
    sd = state_dict()
    lst = [1, 2]
    return {"model": sd, "ema": sd, "lists": [lst, lst], "again": {"inner": sd}}


def _plain_values() -> dict[Any, Any]:
    return {
        "set": {1, 2, 3},
        "frozenset": frozenset({"a"}),
        "bytes": b"\x00\xffab",
        "empty_bytes": b"",
        "bytearray": bytearray(b"xy"),
        "complex": complex(1.5, -2),
        "none": None,
        "inf": float("inf"),
        "ninf": float("-inf"),
        "nan": float("nan"),
        "big": 2**70,
        "neg": -5,
        "tuple": (1, (2, 3), []),
        "str": "héllo ✓",
        "bool": True,
        "not an identifier!": 1,
        "dotted.key": 2,
        "": "empty key",
        7: "int key",
        (1, 2): "tuple key",
        None: "none key",
        "t": ints(3),
    }


def _objects() -> dict[str, Any]:
    return {
        "config": Config(),
        "frozen": FrozenConfig(4),
        "slotted": Slotted(1, ints(2)),
        "slotted_dict": SlottedWithDict(),
        "reduced": Reduced(3, "b"),
        "newargs": NewArgs(5, "five"),
        "uuid": uuid.UUID(int=12345),
        "namespace": argparse.Namespace(lr=0.1, arch="tiny", layers=[1, 2]),
        "listsub": ListSub([1, ints(2)]),
        "dictsub": DictSub(a=1, t=ints(2)),
        "dtype": torch.float16,
        "device": torch.device("cpu"),
        "size": torch.Size([2, 3]),
        "layout": torch.strided,
    }


def _numpy() -> dict[str, Any]:
    import numpy as np

    return {
        "array": np.arange(6, dtype=np.float32).reshape(2, 3),
        "scalar": np.float64(1.5),
        "int": np.int64(7),
        "dtype": np.dtype("int16"),
        "t": ints(2),
    }


@contextlib.contextmanager
def _on_cuda0() -> Iterator[None]:
    """Storages tagged ``cuda:0``, as a GPU save writes them (see ``ckpttool.testing``)."""
    from ckpttool.testing import saved_as

    with saved_as("cuda:0"):
        yield


def _storage_direct() -> dict[str, Any]:
    t = torch.arange(4, dtype=torch.uint8)
    return {"s": t.untyped_storage(), "typed": ints(3)._typed_storage(), "t": t}


def _storage_direct_legacy() -> dict[str, Any]:
    """Typed storages saved on their own, one before and one after a tensor that shares it
    (torch cannot load an untyped storage from the legacy format: it looks up a dtype on the
    UntypedStorage class)."""
    shared = torch.arange(5)
    later = ints(4)
    return {
        "typed": ints(3)._typed_storage(),
        "half": ints(5, torch.float16)._typed_storage(),
        "bools": torch.tensor([True, False, True])._typed_storage(),
        "first": shared._typed_storage(),
        "view": shared[1:],
        "t": later[2:],
        "after": later._typed_storage(),
    }


def _whole_module() -> Any:
    return tiny_net()


def _shared_module() -> Any:
    return _linear_weights(SharedSub())


# -- legacy, hand-made ------------------------------------------------------------------------
def _py2_str(path: str) -> None:
    """A legacy file whose pickled ``str`` holds non-ASCII UTF-8 bytes, as Python 2 wrote them."""
    buf = io.BytesIO()
    marker = "Z" * 11
    torch.save({"name": marker, "t": ints(3)}, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    old = b"X" + struct.pack("<I", len(marker)) + marker.encode()
    text = "caf\u00e9 \u2713".encode()
    new = b"U" + bytes([len(text)]) + text  # SHORT_BINSTRING: a py2 str
    assert data.count(old) == 1
    with open(path, "wb") as f:
        f.write(data.replace(old, new))


def _inst_obj(path: str) -> None:
    """A legacy file whose object pickle uses protocol 0's INST and OBJ opcodes (as Python 2
    wrote instances): INST without arguments is ``cls.__new__(cls)``, OBJ with arguments is a
    call ``cls(*args)``."""
    head = b"".join(
        pickle.dumps(v, protocol=2)
        for v in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True})
    )
    body = (
        b"(dp0\nVcfg\np1\n"
        b"(itests.fidelity.zoo\nConfig\np2\n"  # INST, no arguments
        b"(dp3\nVlr\np4\nF0.5\nsVlayers\np5\n(lp6\nI1\naI2\nasVname\np7\nVcfg\np8\nsb"
        b"sVred\np9\n"
        b"(ctests.fidelity.zoo\nReduced\np10\nI3\nVb\np11\no"  # OBJ with arguments
        b"sVagain\np12\ng2\ns."  # the memo: the same object twice
    )
    with open(path, "wb") as f:
        f.write(head + body + pickle.dumps([], protocol=2))


def _main_subclass(path: str) -> None:
    """A tensor subclass saved from a script (``__main__.MyTensor``, with an attribute): the
    class stands in ``__main__`` only while torch.save runs, as it would in that script."""
    main = sys.modules["__main__"]
    main.MyTensor = MainTensor  # type: ignore[attr-defined]
    try:
        t = ints(3).as_subclass(MainTensor)
        t.note = "x"  # type: ignore[attr-defined]
        torch.save({"t": t, "plain": ints(2)}, path)
    finally:
        delattr(main, "MyTensor")


# -- the registry -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], Any] | None  # None: ``raw`` writes the file itself
    zip: bool = True
    protocol: int = 2
    raw: Callable[[str], None] | None = None
    context: Callable[[], contextlib.AbstractContextManager[None]] | None = None
    user_classes: bool = False  # pickles classes of this module (whole modules, dataclasses)
    importable: bool = True  # its classes import in the test process (not __main__'s)


def _cases() -> dict[str, Case]:
    cases = [
        Case("dtypes", _dtypes_case),
        Case("dtypes-legacy", lambda: _dtypes_case(legacy=True), zip=False),
        Case("safetensors-dtypes", _safetensors_dtypes),
        Case("views", _views),
        Case("views-legacy", lambda: _views(same_dtype=True), zip=False),
        Case("conj", _conj),
        Case("neg", _neg),
        Case("quantized", _quantized),
        Case("quantized-legacy", _quantized, zip=False),
        Case("sparse", _sparse),
        Case("nested-strided", _nested_strided),
        Case("nested-jagged", _nested_jagged),
        Case("nested-jagged-state-dict", _nested_jagged_state_dict),
        Case("meta", _meta),
        Case("dtensor", _dtensor, context=_gloo),
        Case("subclass-attrs", _subclass_attrs, user_classes=True),
        Case("parameters", _parameters),
        Case("optimizer", _optimizer),
        Case("rng", _rng),
        Case("grad-scaler", _grad_scaler),
        Case("shared-containers", _shared_containers),
        Case("plain-values", _plain_values),
        Case("objects", _objects, user_classes=True),
        Case("objects-p4", _objects, protocol=4, user_classes=True),
        Case("newobj-ex-p4", lambda: {"x": NewArgsEx(scale=3)}, protocol=4, user_classes=True),
        Case("storage-direct", _storage_direct),
        Case("whole-module", _whole_module, user_classes=True),
        Case("whole-module-legacy", _whole_module, zip=False, user_classes=True),
        Case("shared-module", _shared_module, user_classes=True),
        Case("channels-last-p4", lambda: {"f": torch.channels_last, "t": ints(2)}, protocol=4),
        Case("py2-str-legacy", None, raw=_py2_str),
        Case("numpy", _numpy, user_classes=True),
        Case("cuda-tagged", _optimizer, context=_on_cuda0),
        Case("cuda-tagged-legacy", _tagged_legacy, zip=False, context=_on_cuda0),
        Case("whole-module-p4", _whole_module, protocol=4, user_classes=True),
        Case("inst-obj-legacy", None, raw=_inst_obj, user_classes=True),
        Case("main-subclass", None, raw=_main_subclass, user_classes=True, importable=False),
    ]
    for p in (1, 2, 3, 4, 5):
        cases.append(Case(f"legacy-p{p}", _legacy_mix, zip=False, protocol=p, user_classes=True))
        cases.append(Case(f"legacy-p{p}-weights", _weights_mix, zip=False, protocol=p))
        if p != 2:
            cases.append(Case(f"zip-p{p}", _legacy_mix, protocol=p, user_classes=True))
            cases.append(Case(f"storage-direct-p{p}", _storage_direct, protocol=p))
        cases.append(
            Case(f"storage-direct-legacy-p{p}", _storage_direct_legacy, zip=False, protocol=p)
        )
    return {c.name: c for c in cases}


def _weights_mix() -> dict[str, Any]:
    """What ``torch.load(weights_only=True)`` accepts: tensors, parameters, plain values."""
    sd = state_dict()
    return {"model": sd, "tied": sd["fc1.weight"], "p": nn.Parameter(ints(2)), "epoch": 2, "b": b""}


def _tagged_legacy() -> dict[str, Any]:
    sd = state_dict()
    return {"model": sd, "view": sd["fc1.weight"][1:], "p": nn.Parameter(ints(2)), "epoch": 2}


def _legacy_mix() -> dict[str, Any]:
    sd = state_dict()
    return {
        "model": sd,
        "view": sd["fc1.weight"][1:],
        "epoch": 2,
        "empty": b"",
        "blob": b"ab",
        "cfg": Config(),
        "ns": argparse.Namespace(a=1),
        "p": nn.Parameter(ints(2)),
    }


CASES: dict[str, Case] = _cases()


def write(case: Case, folder: str) -> str:
    """Save ``case`` into ``folder``; return the file's path."""
    path = os.path.join(folder, f"{case.name}.pt")
    if case.raw is not None:
        case.raw(path)
        return path
    assert case.build is not None
    ctx = case.context() if case.context else contextlib.nullcontext()
    with ctx, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = case.build()
        torch.save(
            obj,
            path,
            pickle_protocol=case.protocol,
            _use_new_zipfile_serialization=case.zip,
        )
    return path


def _unused() -> None:  # keep imports used by type checkers
    _ = (dataclasses, pickle)
