"""One model per loader torch (or numpy) really has: which pickles it runs from a file, in
which order, and with which ``persistent_load``. Each model adds walks and problems to a
:class:`Found`; :mod:`.discover` picks the models that apply to a file.

* torch zip (:func:`torch_zip`): ``ROOT/data.pkl`` as miniz finds it; a ``constants.pkl``
  record makes it TorchScript, which ``torch.load`` hands to ``torch.jit.load``;
* legacy (:func:`pickle_chain`): magic number, protocol, system info, the object (legacy
  ``persistent_load``), the storage keys: five pickles in a row; a file whose first pickle is
  not the magic number is a plain pickle (``pickle.load`` reads that one only);
* pre-1.0 tar (:func:`tar_file`): ``storages`` (a count, then per storage a pickle and raw
  bytes, then the views pickle), ``tensors`` (a count, then per tensor a pickle and raw
  sizes), then ``pickle`` with the tar ``persistent_load``, members as ``tarfile`` resolves them;
* numpy (:func:`npy`): an ``.npy`` whose dtype holds objects is followed by a pickle.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tarfile

from .opscan import PickleWalk, walk_all
from .parsed import remember_parsed
from .zipmodel import ZipModel, local_entries, member, read_zip

if TYPE_CHECKING:  # tarfile and ast are imported where a tar or an .npy needs them
    import tarfile

DANGEROUS, UNVETTED, UNREADABLE = "dangerous", "unvetted code", "unreadable"
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
MAX_COUNT = 1 << 20  # storages or tensors a tar file may declare
_STORAGE_SIZES = {
    **dict.fromkeys(("Double", "Long", "ComplexFloat"), 8),
    **dict.fromkeys(("Float", "Int", "QInt32"), 4),
    **dict.fromkeys(("Half", "Short", "BFloat16"), 2),
    **dict.fromkeys(("Byte", "Char", "Bool", "QInt8", "QUInt8", "QUInt4x2", "QUInt2x4"), 1),
    "ComplexDouble": 16,
}


@dataclass
class Found:
    """The walks of every pickle a loader runs from one file, and what stops a proof."""

    walks: list[PickleWalk] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (verdict kind, reason)
    notes: list[str] = field(default_factory=list)

    def problem(self, kind: str, reason: str) -> None:
        if (kind, reason) not in self.problems:
            self.problems.append((kind, reason))

    def walk(self, buf: Any, start: int, end: int, what: str, mode: str) -> PickleWalk:
        """Walk one pickle the loader runs; a pickle it cannot finish makes the file
        unreadable (what ran before the failure is judged all the same)."""
        found = walk_all(buf, start, end, mode)
        self.walks.extend(found)
        first = found[0]
        if first.crashed:
            self.problem(UNREADABLE, f"{what} could not be scanned ({first.error})")
        elif first.error is not None:
            self.problem(UNREADABLE, f"{what} cannot be loaded: {first.error}")
        if first.straddle:
            self.problem(UNREADABLE, f"{what}: an opcode straddles the end of a FRAME")
        if first.frame_end is not None:
            self.problem(UNREADABLE, f"{what}: STOP inside a FRAME (readers resume elsewhere)")
        for kind, reason, _at in first.findings:
            self.problem(kind, f"{what}: {reason}")
        return first


def torch_zip(
    buf: Any, base: int, size: int, what: str, found: Found, model: ZipModel | None = None
) -> None:
    """A torch zip at ``buf[base : base + size]``, read the way ``torch.load`` reads it
    (``model``: that archive's :func:`read_zip`, when the caller has read it already).

    Where the archive is ambiguous (readers may see different entries), every ``*.pkl``
    entry any reading finds is walked too, so that the worst of them decides."""
    model = model if model is not None else read_zip(buf, base, size)
    for reason in model.ambiguities:
        found.problem(UNREADABLE, f"{what}: ambiguous zip: {reason}")
    if model.ambiguities or model.error is not None:
        seen: set[tuple[int, int]] = set()
        for e in [*model.entries, *local_entries(buf, base, base + size)]:
            if e.name.lower().endswith("pkl") and (e.header, e.csize) not in seen:
                seen.add((e.header, e.csize))
                _member_walk(buf, e, f"{what}: {e.name}", found, "zip", required=False)
    if model.error is not None:
        found.problem(UNREADABLE, f"{what}: torch cannot open it: {model.error}")
        return
    prefix = model.root + "/"
    if any(not e.name.startswith(prefix) for e in model.entries):
        found.problem(UNREADABLE, f"{what}: zip entries lie outside the root folder {model.root!r}")
        return
    if "constants.pkl" in model.records():
        found.problem(
            UNVETTED, f"{what}: a TorchScript archive: torch.load runs its code/ (torch.jit.load)"
        )
        for e in model.entries:  # still name what its pickles reach for
            if e.name.lower().endswith(".pkl"):
                _member_walk(buf, e, f"{what}: {e.name}", found, "any", required=False)
        return
    want = prefix.lower() + "data.pkl"
    matches = [e for e in model.entries if e.name.lower() == want]
    if not matches:
        found.problem(UNREADABLE, f"{what}: no {model.root}/data.pkl record")
    for e in matches:  # more than one: ambiguous already; each is what torch may read
        _member_walk(buf, e, f"{what}: {e.name}", found, "zip", required=True)


def _member_walk(buf: Any, e: Any, what: str, found: Found, mode: str, *, required: bool) -> None:
    data = member(buf, e)
    if data is None:
        if required:
            found.problem(UNREADABLE, f"{what} cannot be read to scan it")
        return
    if required:
        w = found.walk(data, 0, len(data), what, mode)
        if w.end == len(data) and w.error is None and not w.straddle:
            remember_parsed(data)
    else:  # only its globals count: torch does not read it as a pickle of its own
        found.walks.extend(walk_all(data, 0, len(data), mode))


def pickle_chain(buf: Any, start: int, end: int, what: str, found: Found) -> None:
    """Pickles read from ``start`` as ``torch.load`` reads a non-zip file (legacy format), or
    as ``pickle.load`` reads a plain pickle (the first one only)."""
    first = found.walk(buf, start, end, what, "none")
    value = first.value
    if first.end is None or value is None or value.kind != "int" or value.num != LEGACY_MAGIC:
        if first.end == end and first.error is None and not first.straddle:
            _remember_whole(buf, start, end)  # a DCP .metadata, say: read whole, parsed
        return  # a plain pickle: torch.load stops after it, pickle.load reads nothing more
    pos = first.end
    for name, mode in (("protocol", "none"), ("system info", "none"), ("object", "legacy"),
                       ("storage keys", "none")):  # fmt: skip
        w = found.walk(buf, pos, end, f"{what} ({name})", mode)
        if w.end is None:
            return
        pos = w.end


_REMEMBER_MAX = 256 << 20  # a bigger plain pickle is rare; hashing it would cost more than it saves


def _remember_whole(buf: Any, start: int, end: int) -> None:
    """Record a plain pickle that fills its file and that the walk parsed to its STOP, so
    that the reader's unpickling (:func:`.scan.unpickle`) need not walk it again (DCP's
    ``.metadata``: a pickle of every chunk of every tensor, half a million opcodes with
    Adam state)."""
    if start != 0 or end - start > _REMEMBER_MAX:
        return
    try:
        view = memoryview(buf)  # a local file; a remote one has no buffer (and is small)
    except TypeError:
        return
    remember_parsed(view[start:end])


def npy(buf: Any, start: int, end: int, what: str, found: Found) -> None:
    """An ``.npy`` array: ``np.load(allow_pickle=True)`` unpickles the data of object arrays."""
    parsed = _npy_header(bytes(buf[start : min(end, start + _NPY_HEAD)]), what, found)
    if parsed is None:
        return
    header, data = parsed
    if _holds_objects(header):
        found.walk(buf, start + data, end, f"{what} (object array)", "none")
    else:
        _check_size(header, end - start - data, what, found)


_NPY_HEAD = 12 + (1 << 16)  # magic, version, length, and the longest header read


def _npy_header(head: bytes, what: str, found: Found) -> tuple[Any, int] | None:
    """(the header dict, where the data starts) as numpy reads them (a literal only)."""
    if len(head) < 10 or head[:6] != b"\x93NUMPY":
        found.problem(UNREADABLE, f"{what}: not an .npy array")
        return None
    (n,), at = (
        (struct.unpack("<H", head[8:10]), 10)
        if head[6] == 1
        else (struct.unpack("<I", head[8:12]), 12)
    )
    import ast

    try:
        header = ast.literal_eval(head[at : at + min(n, 1 << 16)].decode("latin-1"))
        header["descr"]
    except (ValueError, SyntaxError, KeyError, TypeError, MemoryError, RecursionError):
        found.problem(UNREADABLE, f"{what}: an .npy header numpy cannot read")
        return None
    return header, at + n


def _holds_objects(header: Any) -> bool:
    return "O" in repr(header["descr"])  # object fields anywhere: the data is a pickle


def _check_size(header: Any, have: int, what: str, found: Found) -> None:
    need = _array_bytes(header)
    if need is None or need > have:
        found.problem(UNREADABLE, f"{what}: the array's data is shorter than its shape")


def _array_bytes(header: Any) -> int | None:
    """Bytes of a numeric array's data, from its header (dtype from the literal only)."""
    import numpy as np

    try:
        count = 1
        for d in header["shape"]:
            count *= int(d)
        return count * int(np.lib.format.descr_to_dtype(header["descr"]).itemsize)
    except (KeyError, TypeError, ValueError):
        return None


def npz(buf: Any, what: str, found: Found) -> int:
    """An ``.npz``: numpy reads it with Python's ``zipfile``, and any member that starts as an
    ``.npy`` as an array. Only headers are read, and the data of object arrays (a pickle).
    Returns how many arrays it holds."""
    import io
    import zipfile

    from .zipmodel import _BufFile

    arrays = 0
    try:
        with zipfile.ZipFile(_BufFile(buf, 0, len(buf))) as zf:
            for info in zf.infolist():
                name = f"{what}: {info.filename}"
                with zf.open(info) as fh:
                    head = fh.read(_NPY_HEAD)
                if head[:6] != b"\x93NUMPY":
                    continue
                arrays += 1
                parsed = _npy_header(head, name, found)
                if parsed is None:
                    continue
                header, data = parsed
                if not _holds_objects(header):
                    _check_size(header, info.file_size - data, name, found)
                elif info.file_size > 1 << 28:
                    found.problem(UNREADABLE, f"{name}: an object array too large to scan")
                else:
                    blob = zf.read(info)
                    found.walk(blob, data, len(blob), f"{name} (object array)", "none")
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, io.UnsupportedOperation) as exc:
        found.problem(UNREADABLE, f"{what}: numpy cannot open it ({type(exc).__name__})")
    return arrays


def tar_file(f: Any, what: str, found: Found) -> bool:
    """A pre-1.0 tar checkpoint, if ``tarfile`` opens ``f`` (torch's first try on a non-zip
    file); returns whether it did. Every pickle torch reads from it is walked, also those
    that follow raw storage bytes."""
    import tarfile  # here: only a file that is no zip is tried as a tar (5 ms to import)

    try:
        tar = tarfile.open(fileobj=f, mode="r:", format=tarfile.PAX_FORMAT)  # noqa: SIM115
    except (tarfile.TarError, OSError, EOFError, ValueError):
        return False
    with tar:  # in torch's order: what ran before a failure counts
        steps = (("storages", _tar_storages), ("tensors", _tar_tensors), ("pickle", _tar_pickle))
        for name, step in steps:
            blob = _tar_member(tar, name, what, found)
            if blob is None or not step(blob, what, found):
                break  # torch stops here (KeyError, a link, a pickle it cannot finish)
    return True


def _tar_pickle(data: bytes, what: str, found: Found) -> bool:
    return found.walk(data, 0, len(data), f"{what}: tar 'pickle'", "tar").end is not None


def _tar_member(tar: tarfile.TarFile, name: str, what: str, found: Found) -> bytes | None:
    """A member's bytes as ``tar.extract`` / ``tar.extractfile`` give them to torch."""
    import tarfile  # imported already by tar_file, which opened ``tar``

    try:
        info = tar.getmember(name)  # the last member of that name, as tarfile picks it
        if info.issym() and name != "pickle":  # extract() makes the link; open() follows it
            found.problem(
                UNREADABLE,
                f"{what}: tar member {name!r} is a symbolic link (torch reads "
                "whatever it points to on the loading machine)",
            )
            return None
        if info.islnk() or info.issym():
            # what extract() falls back to for a hard link, and what extractfile() reads
            info = tar._find_link_target(info)  # type: ignore[attr-defined]
        if info.size > 1 << 31:
            found.problem(UNREADABLE, f"{what}: tar member {name!r} is too large to scan")
            return None
        fh = tar.extractfile(info)
        if fh is None:  # a fifo, a device, a folder: torch fails on it
            found.problem(UNREADABLE, f"{what}: tar member {name!r} is not a file")
            return None
        return fh.read()
    except KeyError:
        found.problem(UNREADABLE, f"{what}: no tar member {name!r} (torch cannot load it)")
    except RecursionError:  # links that point at each other: tarfile (and torch) give up
        found.problem(UNREADABLE, f"{what}: tar member {name!r} is a link in a cycle of links")
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        found.problem(UNREADABLE, f"{what}: tar member {name!r} unreadable ({type(exc).__name__})")
    return None


def _count(data: bytes, what: str, found: Found) -> tuple[int, int] | None:
    """The count pickled first in a tar member (storages, tensors), and where it ends."""
    w = found.walk(data, 0, len(data), what, "none")
    v = w.value
    if w.end is None:
        return None
    if v is None or v.kind != "int" or v.num is None or not 0 <= v.num <= MAX_COUNT:
        found.problem(UNREADABLE, f"{what}: a count the walk cannot read")
        return None
    return v.num, w.end


def _tar_storages(data: bytes, what: str, found: Found) -> bool:
    what = f"{what}: tar 'storages'"
    counted = _count(data, what, found)
    if counted is None:
        return False
    num, pos = counted
    for i in range(num):
        w = found.walk(data, pos, len(data), f"{what} (storage {i})", "none")
        args = w.value.items if w.end is not None and w.value is not None else None
        kind = args[2] if args is not None and len(args) == 3 else None
        size = _storage_size(kind.gref.full) if kind is not None and kind.gref else None
        if w.end is None or size is None or w.end + 8 > len(data):
            found.problem(UNREADABLE, f"{what}: storage {i} cannot be followed")
            return False
        (numel,) = struct.unpack("<q", data[w.end : w.end + 8])
        pos = w.end + 8 + numel * size
        if numel < 0 or pos > len(data):
            found.problem(UNREADABLE, f"{what}: storage {i} is cut short")
            return False
    return found.walk(data, pos, len(data), f"{what} (views)", "none").end is not None


def _storage_size(name: str) -> int | None:
    for prefix in ("torch.cuda.", "torch."):
        if name.startswith(prefix) and name.endswith("Storage"):
            return _STORAGE_SIZES.get(name[len(prefix) : -len("Storage")])
    return None


def _tar_tensors(data: bytes, what: str, found: Found) -> bool:
    what = f"{what}: tar 'tensors'"
    counted = _count(data, what, found)
    if counted is None:
        return False
    num, pos = counted
    for i in range(num):
        w = found.walk(data, pos, len(data), f"{what} (tensor {i})", "none")
        if w.end is None or w.end + 8 > len(data):
            return False
        (ndim,) = struct.unpack("<i", data[w.end : w.end + 4])
        pos = w.end + 8 + 16 * ndim + 8
        if not 0 <= ndim <= 1 << 16 or pos > len(data):
            found.problem(UNREADABLE, f"{what}: tensor {i} is cut short")
            return False
    return True
