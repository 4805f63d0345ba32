"""The opcode walker and the default-deny policy on real pickles of benign objects (no false
alarms) and on hand-built hostile ones (how each global is used decides its kind)."""

from __future__ import annotations

import argparse
import collections
import datetime
import decimal
import enum
import fractions
import pathlib
import pickle
import pickletools
import types
import uuid
from pathlib import Path

import pytest

from ckpttool.unpickling.discover import scan_file
from ckpttool.unpickling.opscan import walk, walk_all
from ckpttool.unpickling.policy import DANGEROUS, DATA, TORCH, USER, classify, judge


class Color(enum.Enum):
    RED = 1


class Config:
    def __init__(self) -> None:
        self.lr = 0.1


def kinds(data: bytes) -> dict[str, str]:
    return {g.name: g.kind for g in judge([walk(data)]).globals}


@pytest.mark.parametrize("proto", [0, 1, 2, 4, 5])
def test_plain_data_is_data_at_every_protocol(proto: int) -> None:
    obj = {
        "ns": argparse.Namespace(lr=0.1),
        "simple": types.SimpleNamespace(a=1),
        "posix": pathlib.PurePosixPath("/a/b"),
        "path": pathlib.PosixPath("/a/b"),
        "when": datetime.datetime(2024, 1, 2, tzinfo=datetime.timezone.utc),
        "delta": datetime.timedelta(days=1),
        "dec": decimal.Decimal("1.5"),
        "frac": fractions.Fraction(1, 3),
        "id": uuid.UUID(int=5),
        "od": collections.OrderedDict(a=1),
        "dd": collections.defaultdict(list, a=[1]),
        "dq": collections.deque([1, 2], maxlen=3),
        "fs": frozenset({1}),
        "c": complex(1, 2),
    }
    got = kinds(pickle.dumps(obj, proto))
    assert set(got.values()) <= {TORCH, DATA}, got


def test_user_classes_and_enums_are_user_code_not_dangerous() -> None:
    for proto in (0, 1, 2, 4):
        got = kinds(pickle.dumps({"cfg": Config(), "color": Color.RED}, proto))
        name = f"{__name__}.Config"
        assert got[name] == USER, (proto, got)
        assert got[f"{__name__}.Color"] == USER, (proto, got)
        assert DANGEROUS not in got.values(), (proto, got)


def test_protocol_1_object_base_is_data() -> None:
    got = kinds(pickle.dumps(Config(), 1))  # copyreg._reconstructor(cls, builtins.object, None)
    assert got["copyreg._reconstructor"] == DATA and got["builtins.object"] == DATA, got


def test_numpy_and_torch_generator_state_are_data(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    path = tmp_path / "rng.pt"
    torch.save({"a": np.arange(3.0), "s": np.float64(1.5), "g": torch.Generator()}, path)
    got = {g.name: g.kind for g in scan_file(str(path)).globals}
    assert got["torch._C.Generator"] == DATA
    assert set(got.values()) <= {TORCH, DATA}, got


def test_default_deny_judges_by_use() -> None:
    # the same module-level function: referenced is user code, called is dangerous
    ref = b"\x80\x02csomepkg.mod\nhelper\n."
    call = b"\x80\x02csomepkg.mod\nhelper\n)R."
    assert kinds(ref) == {"somepkg.mod.helper": USER}
    assert kinds(call) == {"somepkg.mod.helper": DANGEROUS}
    # a class called with plain values (how enum members pickle) vs with an object
    assert kinds(b"\x80\x02csomepkg.mod\nMode\nK\x01\x85R.") == {"somepkg.mod.Mode": USER}
    assert kinds(b"\x80\x02csomepkg.mod\nMode\n}\x85R.")["somepkg.mod.Mode"] == DANGEROUS
    # a standard-library class built by NEWOBJ outside the data list
    assert kinds(b"\x80\x02czipfile\nZipFile\n)\x81.")["zipfile.ZipFile"] == DANGEROUS
    # BUILD or SETITEM on a module-level object
    assert kinds(b"\x80\x02csomepkg\nREGISTRY\nK\x01K\x02s.")["somepkg.REGISTRY"] == DANGEROUS
    assert kinds(b"\x80\x02csomepkg\nThing\n}b.")["somepkg.Thing"] == DANGEROUS
    # calling what a call returned
    assert kinds(b"\x80\x02csomepkg\nThing\n)\x81)R.")["somepkg.Thing"] == DANGEROUS


def test_defaultdict_factory_must_be_allowed() -> None:
    ok = b"\x80\x02ccollections\ndefaultdict\nc__builtin__\nlist\n\x85R."
    bad = b"\x80\x02ccollections\ndefaultdict\ncsomepkg\nfactory\n\x85R."
    assert kinds(ok) == {"collections.defaultdict": DATA, "builtins.list": DATA}
    assert kinds(bad)["somepkg.factory"] == DANGEROUS


def test_walker_reads_what_cpython_reads() -> None:
    hexed = b"(I0x1\nI010\nL0o7L\ncos\nsystem\n(S'true'\ntRl."
    with pytest.raises(ValueError):  # pickletools cannot read it; CPython can
        list(pickletools.genops(hexed))
    w = walk(hexed)
    assert w.error is None and w.end == len(hexed)
    assert [g.full for g in w.globals] == ["os.system"]
    # protocol-0 strings feed STACK_GLOBAL; PROTO 4 in the middle; Python 2 names mapped
    sg = b"S'builtins'\nS'eval'\n\x93(S'1'\ntR."
    assert kinds(sg) == {"builtins.eval": DANGEROUS}
    assert [g.full for g in walk(b"c__builtin__\nset\n.").globals] == ["builtins.set"]
    assert [g.full for g in walk(b"\x80\x03c__builtin__\nset\n.").globals] == ["__builtin__.set"]


def test_walker_stops_where_cpython_stops() -> None:
    w = walk(b"\x80\x020cos\nsystem\n)R.")  # POP on an empty stack: CPython raises first
    assert w.error and not w.globals
    assert walk(b"\x80\x06.").error  # unsupported protocol


def test_frame_straddle_is_seen_both_ways() -> None:
    buried = b"cos\nsystem\n(S'true'\ntR."
    body = b"\x8c\x28ab"  # a 40-byte string of which 2 bytes lie in the frame
    data = b"\x80\x04\x95" + len(body).to_bytes(8, "little") + body
    data += b"x" * 38 + b"N." + b"0" + buried
    first, second = walk_all(data)
    assert first.straddle and [g.full for g in first.globals] == ["os.system"]
    assert second.globals == [] and second.end is not None  # the other reading sees nothing


def test_classify_by_name_alone() -> None:
    assert classify("torch._utils._rebuild_tensor_v2") == TORCH
    assert classify("argparse.Namespace") == DATA
    assert classify("os.system") == DANGEROUS
    assert classify("mymodel.Net") == USER


def test_dcp_folder_scans_safe(tmp_path: Path) -> None:
    import warnings

    torch = pytest.importorskip("torch")
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"w": torch.zeros(2, 3)}, "step": 3}, checkpoint_id=str(tmp_path))
    from ckpttool.ops.scan import scan

    result = scan([tmp_path])
    assert [f.verdict for f in result.files] == ["safe", "safe"], [
        (g.name, g.kind) for f in result.files for g in f.globals
    ]


def test_writers_carry_user_classes_only_when_asked_and_never_a_callable(tmp_path: Path) -> None:
    import os

    torch = pytest.importorskip("torch")
    from click.testing import CliRunner

    from ckpttool.cli import cli

    model_file, ref_file, out = tmp_path / "model.pt", tmp_path / "ref.pt", tmp_path / "out.pt"
    torch.save(torch.nn.Linear(2, 2), model_file)  # a whole pickled module: user code
    torch.save({"act": torch.nn.functional.relu, "w": torch.zeros(2)}, ref_file)
    runner = CliRunner()
    res = runner.invoke(cli, ["convert", str(model_file), str(out)])
    assert res.exit_code == 1 and "--allow-user-classes" in res.output and not out.exists()
    res = runner.invoke(cli, ["convert", str(model_file), str(out), "--allow-user-classes"])
    assert res.exit_code == 0, res.output
    got = torch.load(out, weights_only=False)  # our own output of a class torch defines
    assert isinstance(got, torch.nn.Linear)
    os.unlink(out)
    res = runner.invoke(cli, ["convert", str(ref_file), str(out), "--allow-user-classes"])
    assert res.exit_code == 1 and "a callable" in res.output and not out.exists()
    res = runner.invoke(cli, ["to-safetensors", str(model_file), str(tmp_path / "m.safetensors")])
    assert res.exit_code == 0, res.output  # only tensors are written: no permission needed
    res = runner.invoke(cli, ["scan", str(model_file), str(ref_file)])
    assert res.exit_code == 5 and res.stdout.count("unvetted code") == 2, res.output


@pytest.mark.parametrize("op", [b"T", b"X", b"B", b"\x8d", b"\x8e", b"\x96", b"\x8c", b"U", b"C"])
def test_long_arguments_are_stepped_over_not_lost(op: bytes) -> None:
    n = 255 if op in (b"\x8c", b"U", b"C") else 5000  # longer than the text kept (4096)
    width = {b"\x8d": 8, b"\x8e": 8, b"\x96": 8, b"\x8c": 1, b"U": 1, b"C": 1}.get(op, 4)
    arg = op + n.to_bytes(width, "little") + b"a" * n
    data = b"\x80\x04" + arg + b"0" + b"cos\nsystem\n(S'true'\ntR."
    w = walk(data)
    assert w.error is None and w.end == len(data)
    assert kinds(data) == {"os.system": DANGEROUS}


@pytest.mark.parametrize("proto", [0, 1, 2])
def test_empty_bytes_and_object_base_are_data(proto: int) -> None:
    """Protocol <= 2 pickles ``b''`` as ``bytes()``; protocol 0/1 objects name builtins.object
    as copyreg's base: both are what torch.save writes for plain values."""
    got = kinds(pickle.dumps({"b": b"", "ns": argparse.Namespace(x=b"")}, proto))
    assert set(got.values()) <= {TORCH, DATA}, got


def _stack_global(module: str, name: str, tail: bytes) -> bytes:
    def unicode(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()

    return b"\x80\x04" + unicode(module) + unicode(name) + b"\x93" + tail + b"."


def test_torch_constant_through_an_attribute_path_is_data_only_when_referenced() -> None:
    # what torch.save(..., pickle_protocol=4) writes for torch.channels_last
    assert kinds(_stack_global("torch._utils", "torch.channels_last", b"")) == {
        "torch._utils.torch.channels_last": DATA
    }
    called = _stack_global("torch._utils", "torch.channels_last", b")R")
    assert kinds(called) == {"torch._utils.torch.channels_last": DANGEROUS}
    other = _stack_global("torch._utils", "torch.load", b"")
    assert kinds(other) == {"torch._utils.torch.load": DANGEROUS}


def test_builtin_types_called_with_computed_values_stay_suspect() -> None:
    # bytes(<result of a call>): the call itself is judged, bytes is not given a pass for it
    data = b"\x80\x02cbuiltins\nbytes\ncos\ngetcwd\n)R\x85R."
    got = kinds(data)
    assert got["os.getcwd"] == DANGEROUS


def test_zip64_extra_field_longer_than_its_bytes_is_one_line(tmp_path: Path) -> None:
    """Found by tests/fuzz/run_fuzz.py (50,000 inputs): a zip64 extra field in the central
    directory that declares more bytes than it has made the scan raise struct.error."""
    import zipfile

    from ckpttool.errors import CheckpointError
    from ckpttool.readers import open_checkpoint

    path = tmp_path / "bad_extra.pt"
    info = zipfile.ZipInfo("archive/data.pkl")
    info.extra = b"\x01\x00\x00\x61" + b"\xff" * 8  # tag 1 (zip64), claims 0x6100 bytes
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(info, pickle.dumps({"a": 1}, 2))
    try:
        open_checkpoint(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
