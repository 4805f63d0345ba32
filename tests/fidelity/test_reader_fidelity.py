"""What the reader lists matches what torch builds: legacy protocols, Python 2 strings,
conj/neg bits, meta tensors, NEWOBJ vs calls, containers reached twice (reported as aliases,
bounded against shared-reference bombs), and what convert says it verified."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pytest
import torch

import ckpttool
from ckpttool.analysis.report import build
from ckpttool.model import Opaque
from ckpttool.tree import alias_names, aliases

from . import zoo


def _save(obj: object, path: Path, **kw: object) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, path, **kw)  # type: ignore[arg-type]
    return str(path)


@pytest.mark.parametrize("protocol", [1, 2, 3, 4, 5])
def test_legacy_files_at_every_pickle_protocol_are_read(tmp_path: Path, protocol: int) -> None:
    sd = zoo.state_dict()
    path = _save(
        {"model": sd}, tmp_path / "l.pt", pickle_protocol=protocol,
        _use_new_zipfile_serialization=False,
    )  # fmt: skip
    ckpt = ckpttool.open_checkpoint(path)
    assert ckpt.format == "legacy"
    assert [(t.name, t.shape) for t in ckpt.tensors()] == [
        (f"model.{k}", tuple(v.shape)) for k, v in sd.items()
    ]


def test_python2_str_with_non_ascii_bytes_is_decoded_as_torch_does(tmp_path: Path) -> None:
    path = str(tmp_path / "py2.pt")
    zoo._py2_str(path)
    assert torch.load(path)["name"] == "caf\u00e9 \u2713"  # torch: encoding="utf-8"
    assert ckpttool.open_checkpoint(path).root["name"] == "caf\u00e9 \u2713"


def test_conj_and_neg_bits_are_read(tmp_path: Path) -> None:
    z = zoo.ints(4).view(torch.complex64)
    path = _save({"c": z.conj(), "n": z.clone().conj().imag}, tmp_path / "z.pt")
    got = {t.name: t.ref.metadata for t in ckpttool.open_checkpoint(path).tensors()}
    assert got == {"c": {"conj": True}, "n": {"neg": True}}


def test_newobj_and_calls_are_told_apart(tmp_path: Path) -> None:
    path = _save(
        {"cfg": zoo.Config(), "red": zoo.Reduced(1, "b"), "ns": argparse.Namespace(a=1)},
        tmp_path / "o.pt",
    )
    root = ckpttool.open_checkpoint(path).root
    assert all(isinstance(v, Opaque) for v in root.values())
    assert (root["cfg"].how, root["red"].how, root["ns"].how) == ("newobj", "call", "newobj")
    assert root["red"].args == (1, "b")


def test_meta_tensors_are_reported(tmp_path: Path) -> None:
    path = _save(zoo._meta(), tmp_path / "m.pt")
    report = build(ckpttool.open_checkpoint(path))
    assert report["meta_tensors"] == [
        {"name": "m", "dtype": "float32", "shape": [2, 3], "kind": "tensor"},
        {"name": "p", "dtype": "float32", "shape": [4], "kind": "parameter"},
    ]
    assert "2 tensors saved from the meta device (m, p): dtype and shape only" in report["warnings"]


def test_a_container_reached_twice_is_reported_under_every_path(tmp_path: Path) -> None:
    sd = zoo.state_dict()
    path = _save({"model": sd, "ema": sd, "nested": {"again": sd}}, tmp_path / "s.pt")
    report = build(ckpttool.open_checkpoint(path))
    assert report["aliases"] == [
        {"path": "ema", "same_as": "model"},
        {"path": "nested.again", "same_as": "model"},
    ]
    rows = {t["name"]: t["aliases"] for t in report["tensors"]}
    assert rows == {f"model.{k}": [f"ema.{k}", f"nested.again.{k}"] for k in sd}
    assert [s["path"] for s in report["state_dicts"]] == ["model", "ema", "nested.again"]
    ema = next(e for e in report["entries"] if e["path"] == "ema")
    assert ema["value"] == "OrderedDict holding 4 tensors (the same object as 'model')"


def test_shared_reference_bomb_stays_bounded() -> None:
    """40 levels that each hold the next twice: 2**40 paths, walked in 80 steps."""
    from ckpttool.model import StorageInfo, TensorRef

    leaf = {"w": TensorRef(StorageInfo("0", "float32", 1, "cpu", "", 0), 0, (1,), (1,))}
    node: object = leaf
    for _ in range(40):
        node = [node, node]
    pairs = aliases(node)
    assert len(pairs) == 40
    names, more = alias_names(["0." * 40 + "w"], pairs, limit=1000)
    assert more and sum(len(v) for v in names.values()) <= 1000


def test_convert_says_what_it_verified(tmp_path: Path) -> None:
    src = _save({"t": zoo.ints(3)}, tmp_path / "a.pt")
    result = ckpttool.convert(src, tmp_path / "b.pt")
    assert result.verified and result.verification == "structure and storage bytes re-read"
    skipped = ckpttool.convert(src, tmp_path / "c.pt", verify=False)
    assert not skipped.verified and skipped.verification == ""


def test_plain_objects_keep_empty_bytes(tmp_path: Path) -> None:
    src = _save(
        {"ns": argparse.Namespace(a=1), "e": b"", "b": b"xy"}, tmp_path / "a.pt", pickle_protocol=3
    )
    dst = tmp_path / "b.pt"
    ckpttool.convert(src, dst, plain_objects=True)
    assert torch.load(dst, weights_only=True) == {"ns": {"a": 1}, "e": b"", "b": b"xy"}


def test_dotted_global_is_written_so_that_it_resolves(tmp_path: Path) -> None:
    """torch.save at protocol 4 spells torch.channels_last as torch._utils + torch.channels_last;
    the writer keeps that spelling and writes it with STACK_GLOBAL (protocol 4), which is the
    only way pickle resolves a dotted name."""
    import pickle

    from ckpttool.writers.pt_pickle import dumps

    path = _save({"f": torch.channels_last, "n": 1}, tmp_path / "c.pt", pickle_protocol=4)
    root = ckpttool.open_checkpoint(path).root
    data = dumps(root, {}, {})
    assert data[:2] == b"\x80\x04"
    assert pickle.loads(data) == {"f": torch.channels_last, "n": 1}
    plain = dumps({"n": 1, "e": b""}, {}, {})  # protocol 2 when nothing needs more
    assert plain[:2] == b"\x80\x02" and pickle.loads(plain) == {"n": 1, "e": b""}


def test_plain_objects_flatten_slotted_state(tmp_path: Path) -> None:
    src = _save({"s": zoo.Slotted(1, "y"), "d": zoo.SlottedWithDict()}, tmp_path / "a.pt")
    dst = tmp_path / "b.pt"
    ckpttool.convert(src, dst, plain_objects=True)
    assert torch.load(dst, weights_only=True) == {
        "s": {"x": 1, "y": "y"},
        "d": {"x": 1, "extra": "d"},
    }


def test_renaming_keys_keeps_how_objects_were_built(tmp_path: Path) -> None:
    from . import compare

    sd = {f"module.{k}": v for k, v in zoo.state_dict().items()}
    src = _save({"model": sd, "cfg": zoo.Config(), "red": zoo.Reduced(2, "x")}, tmp_path / "a.pt")
    dst = tmp_path / "b.pt"
    ckpttool.convert(src, dst, strip_prefix="module.", allow_user_classes=True)
    want, got = compare.load(src), compare.load(str(dst))
    assert list(got["model"]) == [k.removeprefix("module.") for k in want["model"]]
    assert compare.first_diff(compare.canon(want["cfg"]), compare.canon(got["cfg"])) is None
    assert compare.first_diff(compare.canon(want["red"]), compare.canon(got["red"])) is None
