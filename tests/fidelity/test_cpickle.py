"""The tree pickle written by CPython's C pickler (``writers/pt_cpickle.py``) is byte for byte
the Python pickler's (``TreePickler``), or it is not used: every zoo case, the edge cases where
the two picklers differ, and torch loading a converted file object for object."""

from __future__ import annotations

import pickle
import sys
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest

import ckpttool
from ckpttool.errors import CheckpointError
from ckpttool.ops.convert import plan_storages
from ckpttool.writers import pickle_globals
from ckpttool.writers.pt_cpickle import pickle_fast
from ckpttool.writers.pt_pickle import pickle_python, pickle_tree

from ..conftest import REAL_WORLD, REAL_WORLD_REASON
from . import compare, zoo
from .outcomes import real_world_files

RW_FILES = real_world_files(str(REAL_WORLD))

# zoo cases the C pickler must write (the others go to the Python pickler: empty bytes,
# protocol 4); a regression to the Python pickler fails here, not only in the benchmarks
FAST = {
    "numpy",  # classes as values (numpy.ndarray), objects called and built with __new__
    "objects",  # dtypes as values, argparse.Namespace & co.
    "meta",
    "quantized",
    "whole-module",
    "dtypes",
    "dtypes-legacy",
    "views",
    "conj",
    "sparse",
    "parameters",
    "optimizer",
    "rng",
    "grad-scaler",
    "shared-containers",
    "storage-direct",
    "subclass-attrs",
    "py2-str-legacy",
}


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo-cpickle")


def _both(root: Any, storage_of: dict[int, Any], dtype_of: dict[int, str]) -> tuple[Any, Any]:
    try:
        slow: Any = pickle_python(root, storage_of, dtype_of)
    except Exception as exc:  # the C pickler must then give up too
        slow = exc
    return pickle_fast(root, storage_of, dtype_of), slow


@pytest.mark.parametrize("name", sorted(zoo.CASES))
def test_zoo_case_pickles_the_same(name: str, zoo_dir: Path) -> None:
    case = zoo.CASES[name]
    try:
        path = zoo.write(case, str(zoo_dir))
    except Exception as exc:  # e.g. no gloo here: the round-trip tests say so
        pytest.skip(f"cannot write {name}: {exc}")
    try:
        ckpt = ckpttool.open_checkpoint(path)
        plan = plan_storages(ckpt.root, None, {})
    except CheckpointError:
        pytest.skip("refused before pickling (see outcomes.EXPECTED_REFUSALS)")
    fast, slow = _both(ckpt.root, plan.storage_of, plan.dtype_of)
    if name in FAST:
        assert fast is not None, f"{name}: the C pickler gave up"
    if fast is not None:
        assert not isinstance(slow, Exception), f"the Python pickler raised {slow!r}"
        assert fast.data == slow.data
        assert fast.globals == slow.globals and fast.protocol == slow.protocol == 2
    assert not pickle_globals._lent  # every key taken back


@pytest.mark.skipif(not RW_FILES, reason=REAL_WORLD_REASON)
@pytest.mark.parametrize("name", RW_FILES or ["absent"])
def test_real_world_file_pickles_the_same(name: str) -> None:
    try:
        ckpt = ckpttool.open_checkpoint(str(REAL_WORLD / name))
        plan = plan_storages(ckpt.root, None, {})
    except CheckpointError:
        pytest.skip("refused before pickling")
    fast, slow = _both(ckpt.root, plan.storage_of, plan.dtype_of)
    if fast is not None:
        assert not isinstance(slow, Exception) and fast.data == slow.data
        assert fast.globals == slow.globals


def _dict(n: int) -> dict[str, int]:
    return {f"k{i}": i for i in range(n)}


EDGES: dict[str, Any] = {
    # where the C pickler's last batch differs: the Python pickler writes these
    **{f"dict-{n}": _dict(n) for n in (999, 1000, 1001, 1002, 2000, 2001)},
    **{f"list-{n}": list(range(n)) for n in (1000, 1001, 2001)},
    "set-1001": set(range(1001)),
    "frozenset-2001": frozenset(range(2001)),
    "ordered-1001": OrderedDict((i, i) for i in range(1001)),
    "empty-bytes": {"e": b"", "b": b"xy"},
    "bytes": {"b": b"xy", "c": b"\xff\x00", "again": b"xy"},
    "bytearray": [bytearray(b"ab"), bytearray()],
    "complex-set": [complex(1, 2), {1, 2}, frozenset({3})],
    "shared": (lambda x: {"a": x, "b": x, "t": (x, x)})([1, "s"]),
    "strings": ["latin1", "\u00e9t\u00e9", "\ud800", "a" * 300, "a"],
    "ints": [0, 255, 256, 65535, 65536, -1, 2**31, -(2**31) - 1, 2**70, True, None, 1.5],
    "marker-like": {f"c{pickle_globals.__name__}\ng0_0\n": 1},
}


@pytest.mark.parametrize("name", sorted(EDGES))
def test_edge_cases_pickle_the_same(name: str) -> None:
    fast, slow = _both(EDGES[name], {}, {})
    assert not isinstance(slow, Exception)
    if fast is not None:
        assert fast.data == slow.data and fast.globals == slow.globals
    assert pickle_tree(EDGES[name], {}, {}).data == slow.data
    assert pickle.loads(slow.data) == EDGES[name]


def test_the_c_pickler_gives_up_where_the_bytes_would_differ() -> None:
    """The cases above are not all written by the Python pickler: only those that must be."""
    gave_up = {name for name in EDGES if _both(EDGES[name], {}, {})[0] is None}
    assert gave_up == {
        "dict-1000",
        "dict-1001",
        "dict-2000",
        "dict-2001",
        "list-1001",
        "list-2001",
        "set-1001",
        "frozenset-2001",
        "empty-bytes",
    }
    # the Python pickler's spelling of empty bytes (torch.save's at protocol 2), not bytes()
    assert b"c_codecs\nencode\n" in pickle_tree({"e": b""}, {}, {}).data


def test_a_key_met_in_the_data_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lent key is spelt as its name only where the pickler wrote it: were the random key in
    a string of the tree, the count would not match and the Python pickler writes the tree."""
    from ckpttool.writers import pt_cpickle
    from ckpttool.writers.pickle_globals import GlobalRef

    monkeypatch.setattr(pt_cpickle, "_nonce", lambda: f"g{'00' * 8}_")
    key = f"c{pickle_globals.__name__}\ng{'00' * 8}_0\n"
    tree = {"s": key, "f": GlobalRef("torch.float16")}
    assert pickle_fast(tree, {}, {}) is None
    assert pickle_fast({"f": GlobalRef("torch.float16")}, {}, {}) is not None
    written = pickle_tree(tree, {}, {})
    assert written.data == pickle_python(tree, {}, {}).data
    assert written.data.count(b"ctorch\nfloat16\n") == 1


def test_deep_tree_goes_to_the_python_pickler() -> None:
    deep: Any = 1
    for _ in range(sys.getrecursionlimit() + 100):
        deep = [deep]
    fast, slow = _both(deep, {}, {})
    assert fast is None and not isinstance(slow, Exception)
    assert not pickle_globals._lent


def test_converted_file_loads_in_torch_as_the_input(tmp_path: Path) -> None:
    """A convert whose pickle the C pickler wrote: torch loads the same objects, and the bytes
    are what the Python pickler writes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = zoo.write(zoo.CASES["optimizer"], str(tmp_path))
    dst = tmp_path / "out.pt"
    ckpttool.convert(src, dst)
    assert compare.same(src, str(dst)) is None
    ckpt = ckpttool.open_checkpoint(src)
    plan = plan_storages(ckpt.root, None, {})
    fast = pickle_fast(ckpt.root, plan.storage_of, plan.dtype_of)
    assert fast is not None
    assert fast.data == pickle_python(ckpt.root, plan.storage_of, plan.dtype_of).data
    written = ckpttool.open_checkpoint(dst)
    assert len(written.tensors()) == len(ckpt.tensors())


def _opaque_class(module: str, name: str) -> type:
    from ckpttool.model import Opaque

    meta: Any = type(Opaque)
    return meta(name, (Opaque,), {"__ck_global__": f"{module}.{name}", "__ck_module__": module,
                                  "__ck_qualname__": name})  # fmt: skip


def test_objects_and_classes_the_reader_made_are_lent_and_put_back() -> None:
    from ckpttool.unpickling.records import DTypeRef

    cls = _opaque_class("somepkg.mod", "Thing")
    called = cls([1, 2])  # REDUCE: Thing([1, 2])
    built = cls.__new__(cls, 3)  # NEWOBJ: Thing.__new__(Thing, 3)
    built.__setstate__({"x": 1})
    built["k"] = "v"
    tree = {"a": called, "b": built, "cls": cls, "dtype": DTypeRef("float16"), "again": called}
    own = cls.__dict__["__module__"], DTypeRef.__module__
    fast, slow = _both(tree, {}, {})
    assert fast is not None and not isinstance(slow, Exception)
    assert fast.data == slow.data and fast.globals == slow.globals
    assert fast.globals == ["somepkg.mod.Thing", "torch.float16"]
    assert (cls.__dict__["__module__"], DTypeRef.__module__) == own  # put back
    assert not pickle_globals._lent


def test_an_object_in_its_own_arguments_goes_to_the_python_pickler() -> None:
    """Memoised once its arguments are written (they hold it), an object's items and state are
    written twice by the Python pickler, once by the C pickler: the C pickler's run is dropped
    (it did not ask for the object's items a second time)."""
    cls = _opaque_class("somepkg.mod", "Node")
    inner: list[Any] = []
    node = cls(inner)
    node.__setstate__({"name": "n"})
    inner.append(node)
    fast, slow = _both({"n": node}, {}, {})
    assert fast is None and not isinstance(slow, Exception)
    import pickletools

    builds = [op for op, _, _ in pickletools.genops(slow.data) if op.name == "BUILD"]
    assert len(builds) == 2  # the Python pickler's BUILD, twice
    plain = cls([1])
    plain.__setstate__({"name": "n"})
    assert _both({"n": plain}, {}, {})[0] is not None
