"""The read's fast paths (issue 22, "parse at C speed") against what they replace.

* zipfile's listing of an archive is kept from the verdict by a digest of the bytes zipfile
  read for it (``unpickling/parsed.py``): a read of the same bytes reuses it, a read of an
  archive whose directory changed in any byte lists it afresh, and what the read returns is
  the same either way;
* the cyclic garbage collector is paused while the verdict walks, and left as it was;
* the one-pass view extent, the depth check over containers, ``StorageInfo.quick`` and the
  short path for ``('storage', ...)`` persistent ids give what the longer code gave.
"""

from __future__ import annotations

import gc
import io
import itertools
import random
import zipfile
from pathlib import Path
from typing import Any

import pytest

from ckpttool.errors import CheckpointError
from ckpttool.model import StorageInfo, TensorRef
from ckpttool.nodes import PACKED
from ckpttool.readers import file_verdict, open_checkpoint, torch_zip
from ckpttool.unpickling import opscan, parsed, scan
from ckpttool.unpickling.records import StorageType, StorageValue
from ckpttool.unpickling.unpickler import SafeUnpickler

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SMALL = FIXTURES / "single_gpu_state_dict.pt"


def _listing(ckpt: Any) -> Any:
    return (
        sorted((k, s.record, s.offset, s.crc, s.numel, s.dtype) for k, s in ckpt.storages.items()),
        ckpt.facts,
    )


def test_the_read_reuses_the_verdicts_listing_of_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed._DIRS.clear()
    cold = _listing(torch_zip.read(str(SMALL), SMALL.stat().st_size))  # zipfile lists it
    file_verdict(str(SMALL))  # the verdict keeps zipfile's listing
    opened: list[Any] = []
    real = torch_zip.ZipArchive._open_zip

    def counting(self: Any) -> Any:
        opened.append(self)
        return real(self)

    monkeypatch.setattr(torch_zip.ZipArchive, "_open_zip", counting)
    warm = _listing(torch_zip.read(str(SMALL), SMALL.stat().st_size))
    assert opened == []  # listed by the verdict, not again
    assert warm == cold
    parsed._DIRS.clear()
    torch_zip.read(str(SMALL), SMALL.stat().st_size)
    assert len(opened) == 1  # nothing kept: listed afresh


def test_a_directory_changed_after_the_verdict_is_listed_afresh(tmp_path: Path) -> None:
    """Same size, one byte of the central directory changed (a record's name): the read
    must see the new name, not the listing the verdict kept."""
    path = tmp_path / "ckpt.pt"
    data = bytearray(SMALL.read_bytes())
    path.write_bytes(data)
    file_verdict(str(path))
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/data/0"))
    cd = data.rfind(info.filename.encode(), len(data) - 65536)  # its central-directory name
    assert cd > 0
    data[cd + len(info.filename) - 1] = ord("9")  # data/0 -> data/9 in the directory only
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="data/0 is missing"):
        torch_zip.read(str(path), len(data))


def test_the_collector_is_paused_and_left_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    states: list[bool] = []
    real = opscan.walk

    def walk(*args: Any, **kwargs: Any) -> Any:
        states.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(opscan, "walk", walk)
    assert gc.isenabled()
    open_checkpoint(SMALL)
    assert gc.isenabled() and states and not any(states)
    gc.disable()
    try:
        open_checkpoint(SMALL)
        assert not gc.isenabled()  # the caller's choice stands
    finally:
        gc.enable()


def _extent_before(ref: TensorRef) -> tuple[int, int]:
    """``TensorRef.extent`` as it was written before its one-pass form."""
    if ref.numel == 0:
        return (ref.storage_offset, ref.storage_offset)
    last = ref.storage_offset + sum(
        (s - 1) * st for s, st in zip(ref.shape, ref.stride, strict=True)
    )
    first = ref.storage_offset + sum(
        (s - 1) * st for s, st in zip(ref.shape, ref.stride, strict=True) if st < 0
    )
    per = PACKED.get(ref.dtype, 1)
    return (first // per, -(-(last + 1) // per))


def test_the_one_pass_extent_is_the_two_pass_one() -> None:
    rng = random.Random(22)
    for _ in range(3000):
        ndim = rng.randrange(0, 5)
        shape = tuple(rng.choice([0, 1, 2, 3, 7]) for _ in range(ndim))
        stride = tuple(rng.randrange(-9, 30) for _ in range(ndim))
        dtype = rng.choice(["float32", "quint4x2", "quint2x4", "uint8"])
        ref = TensorRef(None, rng.randrange(0, 50), shape, stride, dtype=dtype)
        assert ref.extent() == _extent_before(ref), (shape, stride, dtype)


def _depth_before(root: Any, limit: int) -> bool:
    """Whether the depth check as it was written before refused ``root``."""
    stack: list[tuple[Any, int]] = [(root, 0)]
    seen: set[int] = set()
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, (dict, list, tuple, set, frozenset)):
            if id(node) in seen:
                continue
            seen.add(id(node))
            kids = list(node.values()) if isinstance(node, dict) else list(node)
            stack.extend((k, depth + 1) for k in kids)
    return False


@pytest.mark.parametrize(
    ("depth", "leaf"), list(itertools.product([998, 999, 1000, 1001], [None, 1, (), [], {}]))
)
def test_the_depth_check_refuses_what_it_refused(depth: int, leaf: Any) -> None:
    root: Any = leaf
    for i in range(depth):
        root = [root] if leaf is not None or i else []
    refused = _depth_before(root, scan.MAX_DEPTH)
    try:
        scan._check_depth("f", "data.pkl", root)
    except CheckpointError as exc:
        assert refused, exc
    else:
        assert not refused


def test_storage_info_quick_is_the_dataclass() -> None:
    fields = ("3", "float16", 12, "cuda:0", "/x.pt", 4096, "archive/data/3", False, True, 77)
    quick, slow = StorageInfo.quick(*fields), StorageInfo(*fields)
    assert quick == slow and hash(quick) == hash(slow) and repr(quick) == repr(slow)
    with pytest.raises(AttributeError):
        quick.offset = 0  # type: ignore[misc]  # still frozen


@pytest.mark.parametrize(
    "pid",
    [
        ("storage", "T", "0", "cpu", 4),
        ("storage", "T", "0", "cpu", True),  # a bool is an int to the long path
        ("storage", "T", b"0", b"cpu", 4),  # bytes are decoded by the long path
        (b"storage", "T", "0", "cpu", 4),
        ("storage", "T", 7, "cpu", 4),
        ("storage", "T", "0", "cpu", -1),
        ("storage", "T", "0", "cpu", 4, ("0", 1, 2)),
    ],
)
def test_the_short_storage_path_is_the_long_one(pid: tuple[Any, ...]) -> None:
    calls: list[tuple[Any, ...]] = []
    info = StorageInfo("0", "float32", 4, "cpu", "f", 0)

    def resolve(*args: Any) -> StorageInfo:
        calls.append(args)
        return info

    kind = StorageType("torch.FloatStorage", "float32")
    pid = tuple(kind if x == "T" else x for x in pid)
    results = []
    for method in ("persistent_load", "_persistent_load"):
        u = SafeUnpickler(io.BytesIO(), resolve)
        try:
            got = getattr(u, method)(pid)
        except Exception as exc:  # the same refusal either way
            results.append((type(exc).__name__, str(exc)))
            continue
        assert isinstance(got, StorageValue)
        results.append((got.base, got.type_name, got.offset, got.size))
    assert results[0] == results[1]
    assert len(calls) in (0, 2) and (not calls or calls[0] == calls[1])


class _Other(StorageValue):  # not the exact type: the short path does not apply
    __slots__ = ()


def _ref_picture(ref: TensorRef) -> Any:
    return tuple(getattr(ref, slot) for slot in TensorRef.__slots__)


@pytest.mark.parametrize(
    "args",
    [
        (0, (2, 3), (3, 1), False, None, None),
        (5, (4,), (1,), True, None, None),
        (0, (), (), False, None, {}),
        (1, (2, 0), (0, 1), 1, None, None),  # requires_grad must be True itself
        (0, (2, 3), (3,), False, None, None),  # lengths differ
        (-1, (2,), (1,), False, None, None),
        (True, (2,), (1,), False, None, None),
        (0, (2, -3), (3, 1), False, None, None),
        (0, (2, 3), (3, -1), False, None, None),
        (0, [2, 3], (3, 1), False, None, None),
        (0, (2, True), (3, 1), False, None, None),
        (0, (2,), (1,), False, None, {"conj": True}),
        (0, tuple([1] * 65), tuple([1] * 65), False, None, None),
    ],
)
def test_the_short_rebuild_path_is_the_long_one(args: tuple[Any, ...]) -> None:
    info = StorageInfo("0", "float16", 100, "cpu", "f", 0)
    pictures = []
    for cls in (StorageValue, _Other):
        u = SafeUnpickler(io.BytesIO())
        try:
            ref = u._rebuild_tensor_v2(cls(info, "torch.HalfStorage", 3), *args)
        except Exception as exc:  # the same refusal either way
            pictures.append((type(exc).__name__, str(exc)))
            continue
        assert u.tensors == [ref]
        pictures.append(_ref_picture(ref))
    assert pictures[0] == pictures[1]


class _Sliced:
    """A buffer without the buffer protocol, as a remote file's is: indexing and slicing."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: Any) -> Any:
        return self.data[key]

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        return self.data.find(sub, start, end)


def test_the_walk_reads_a_buffer_it_can_only_slice() -> None:
    from ckpttool.unpickling.loaders import Found, pickle_chain

    from .hostile.test_fast_paths import _walk

    with zipfile.ZipFile(SMALL) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    plain, sliced = opscan.walk(data), opscan.walk(_Sliced(data))
    assert plain.error is None and plain.ops > 100
    assert _walk(sliced) == _walk(plain)
    legacy = (FIXTURES / "legacy_format.pt").read_bytes()  # five pickles, storages between
    found = [Found(), Found()]
    pickle_chain(legacy, 0, len(legacy), "the file", found[0])
    pickle_chain(_Sliced(legacy), 0, len(legacy), "the file", found[1])
    assert len(found[0].walks) == 5 and not found[0].problems
    assert [_walk(w) for w in found[1].walks] == [_walk(w) for w in found[0].walks]


def _pid(*items: bytes) -> bytes:
    """A protocol-2 pickle: MARK, the items, TUPLE, BINPERSID, STOP."""
    return b"\x80\x02(" + b"".join(items) + b"tQ."


_STR = b"X\x07\x00\x00\x00storage"
_TYPE = b"ctorch\nFloatStorage\n"
_REST = b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01"


@pytest.mark.parametrize(
    "data",
    [
        _pid(_STR, _TYPE, _REST),  # torch.save's id
        _pid(_STR, b"K\x01", _REST),  # no storage class: a finding
        _pid(b"C\x07storage", _TYPE, _REST),  # bytes: torch decodes it
        _pid(_STR, _TYPE, _REST, b"N"),  # six items: not the zip loader's
        _pid(_STR, _TYPE, b"X\x01\x00\x00\x000K\x01"),  # four items
        _pid(b"X\x07\x00\x00\x00Storage", _TYPE, _REST),
        b"\x80\x02(" + _STR + _TYPE + _REST + b"tQQ.",  # a storage used as an id
        b"\x80\x02K\x01Q.",  # not a tuple
        b"\x80\x02)Q.",  # an empty tuple
    ],
)
@pytest.mark.parametrize("mode", ["zip", "legacy", "tar", "none", "any"])
def test_the_short_persistent_id_path_is_the_handlers(
    data: bytes, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .hostile.test_fast_paths import _walk

    fast = opscan.walk(data, persid_mode=mode)
    monkeypatch.setattr(opscan, "_run", opscan._run_reference)
    reference = opscan.walk(data, persid_mode=mode)
    assert _walk(fast) == _walk(reference)
    assert [sorted(g.uses) for g in fast.globals] == [sorted(g.uses) for g in reference.globals]


def test_tensor_info_of_is_the_dataclass() -> None:
    from ckpttool.model import TensorInfo

    storage = StorageInfo("0", "float32", 12, "cpu", "f", 0)
    ref = TensorRef(storage, 2, (2, 5), (5, 1), dtype="float32", requires_grad=True)
    quick = TensorInfo.of("model.w", ref)
    slow = TensorInfo("model.w", "float32", (2, 5), (5, 1), 2, storage, "tensor", True, ref)
    assert quick == slow and hash(quick) == hash(slow) and repr(quick) == repr(slow)
    assert quick.ref is ref and quick.numel == 10
    with pytest.raises(AttributeError):
        quick.name = "x"  # type: ignore[misc]  # still frozen


@pytest.mark.parametrize(
    "path",
    ["", "w", "model.w", "optimizer.state.0.exp_avg", "a.OPTIM.b", "a.b.optimizer", "scaler.x.y"],
)
def test_the_optimizer_folder_test_is_the_per_part_one(path: str) -> None:
    from ckpttool.analysis import state_dicts

    keys = state_dicts._OPTIMIZER_KEYS
    before = any(any(o in part.lower() for o in keys) for part in path.split(".")[:-1])
    assert state_dicts._under_optimizer(path) == before
