"""Structure-level mutations of the formats made of pickle streams: pre-1.0 tar checkpoints,
the legacy (pre-1.6) file, ``.npy`` object arrays and plain pickles.

* tar (``TAR_KINDS``): ``inner`` (any pickle of any member: ``sys_info``, ``pickle``, each pickle
  of ``storages`` and ``tensors``, even those after raw storage bytes), ``count`` (the storage or
  tensor count, so that torch reads raw bytes as pickles), ``link`` (a member made a symbolic or
  hard link to another, or to a member holding a payload), ``dup`` (a second member of the same
  name: ``tarfile`` takes the last), ``rename``, ``pax`` (a PAX header renaming a member),
  ``type`` (the member's type flag), ``drop``, ``header`` (a header field, checksum fixed);
* legacy (``LEGACY_KINDS``): ``inner`` on one of its five pickles, ``extra`` (a pickle slipped in
  front of or after the main one), ``keys`` (the storage-key list);
* npy / pickle (``STREAM_KINDS``): ``inner`` on the pickle.
"""

from __future__ import annotations

import io
import pickletools
import random
import struct
import tarfile
from dataclasses import dataclass, field

try:
    from ..hostile import pk
    from ..hostile.pk import G
except ImportError:
    from hostile import pk
    from hostile.pk import G
from .pickle_mut import PICKLE_KINDS, mutate_pickle
from .snippets import Snippets

TAR_KINDS = ("inner", "count", "link", "dup", "rename", "pax", "type", "drop", "header")
LEGACY_KINDS = ("inner", "extra", "keys")
STREAM_KINDS = ("inner",)


def pickle_end(data: bytes, start: int = 0) -> int | None:
    """The offset just after the pickle that starts at ``start`` (None: not a pickle)."""
    try:
        for op, _arg, pos in pickletools.genops(io.BytesIO(data[start:])):
            if op.name == "STOP":
                return start + pos + 1
    except Exception:
        return None
    return None


# -- a pre-1.0 tar checkpoint ------------------------------------------------------------------
def tar_checkpoint() -> bytes:
    """What torch < 0.4 wrote: sys_info, storages (with raw bytes), tensors, pickle."""
    raw = struct.pack("<6f", 0, 1, 2, 3, 4, 5)
    storages = (
        pk.dumps(1)
        + pk.dumps((1, "cpu", G("torch", "FloatStorage")))
        + struct.pack("<q", 6)
        + raw
        + pk.dumps([])
    )
    dims = struct.pack("<i", 2) + bytes(4) + struct.pack("<2q", 2, 3) + struct.pack("<2q", 3, 1)
    tensors = (
        pk.dumps(1) + pk.dumps((10, 1, G("torch", "FloatTensor"))) + dims + struct.pack("<q", 0)
    )
    main = pk.dumps({"w": pk.PersId("10"), "step": 3})
    info = pk.dumps({"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}})
    return write_tar(
        [
            TMember("sys_info", info),
            TMember("pickle", main),
            TMember("storages", storages),
            TMember("tensors", tensors),
        ]
    )


@dataclass
class TMember:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    pax: dict[str, str] = field(default_factory=dict)


def write_tar(members: list[TMember]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type, info.linkname, info.mtime = m.type, m.linkname, 0
            info.pax_headers = dict(m.pax)
            regular = m.type in (tarfile.REGTYPE, tarfile.AREGTYPE)
            info.size = len(m.data) if regular else 0
            tar.addfile(info, io.BytesIO(m.data) if regular else None)
    return out.getvalue()


def read_tar(data: bytes) -> list[TMember] | None:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            out = []
            for info in tar.getmembers():
                f = tar.extractfile(info) if info.isreg() else None
                out.append(TMember(info.name, f.read() if f else b"", info.type, info.linkname))
            return out
    except Exception:  # not a tar we can read
        return None


def _segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each pickle of a ``storages`` or ``tensors`` stream, as torch reads it."""
    out: list[tuple[int, int]] = []
    pos = 0
    count_end = pickle_end(data, pos)
    if count_end is None:
        return out
    out.append((pos, count_end))
    pos = count_end
    while pos < len(data):
        end = pickle_end(data, pos)
        if end is None:
            break
        out.append((pos, end))
        pos = end
        if data[pos : pos + 8] and pickle_end(data, pos) is None:
            pos = _skip_raw(data, pos)
    return out


def _skip_raw(data: bytes, pos: int) -> int:
    """Past the raw bytes torch reads after a storage's or a tensor's pickle."""
    if len(data) >= pos + 8:
        (n,) = struct.unpack("<q", data[pos : pos + 8])
        if 0 <= n < len(data):  # a storage: numel, then numel * 4 bytes (float32 bases)
            nxt = pos + 8 + 4 * n
            if nxt <= len(data) and pickle_end(data, nxt) is not None:
                return nxt
    if len(data) >= pos + 8:  # a tensor: ndim, 4 bytes, sizes, strides, offset
        (ndim,) = struct.unpack("<i", data[pos : pos + 4])
        if 0 <= ndim < 64:
            return min(len(data), pos + 8 + 16 * ndim + 8)
    return len(data)


def mutate_tar(
    data: bytes, rng: random.Random, snip: Snippets, kind: str
) -> tuple[bytes, str] | None:
    members = read_tar(data)
    if not members:
        return None
    if kind == "header":
        return _tar_header(data, rng)
    label = _TAR[kind](members, rng, snip)
    return (write_tar(members), label) if label else None


def _tar_inner(members: list[TMember], rng: random.Random, snip: Snippets) -> str | None:
    regs = [m for m in members if m.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and m.data]
    if not regs:
        return None
    m = rng.choice(regs)
    segs = _segments(m.data) if m.name in ("storages", "tensors") else [(0, len(m.data))]
    if not segs:
        return None
    a, b = rng.choice(segs)
    kind = rng.choice(PICKLE_KINDS)
    new = mutate_pickle(m.data[a:b], rng, snip, kind)
    if new is None:
        return None
    m.data = m.data[:a] + new + m.data[b:]
    return f"inner[{m.name}].{kind}"


def _by_name(members: list[TMember], name: str) -> TMember | None:
    return next((m for m in members if m.name == name), None)


def _tar_count(members: list[TMember], rng: random.Random, snip: Snippets) -> str | None:
    m = _by_name(members, rng.choice(["storages", "tensors"]))
    end = pickle_end(m.data) if m else None
    if m is None or end is None:
        return None
    m.data = pk.dumps(rng.choice([0, 2, 3, 100, -1])) + m.data[end:]
    return "count"


def _tar_link(members: list[TMember], rng: random.Random, snip: Snippets) -> str | None:
    victim = rng.choice(members)
    kind = rng.choice([tarfile.SYMTYPE, tarfile.LNKTYPE])
    if rng.random() < 0.6:  # the link points at a new member that holds a payload pickle
        members.insert(0, TMember("evil", snip.pickle()))
        target = "evil"
    else:
        target = rng.choice([m.name for m in members] + ["/etc/hostname", "../x"])
    victim.type, victim.linkname, victim.data = kind, target, b""
    return "link"


def _tar_dup(members: list[TMember], rng: random.Random, snip: Snippets) -> str | None:
    m = rng.choice(members)
    data = snip.pickle() if m.name in ("pickle", "sys_info") else pk.dumps(1) + snip.pickle()
    members.insert(rng.randrange(len(members) + 1), TMember(m.name, data))
    return "dup"


def _tar_rename(members: list[TMember], rng: random.Random, snip: Snippets) -> str | None:
    m = rng.choice(members)
    m.name = rng.choice(
        [f"./{m.name}", f"{m.name}/", m.name.upper(), f"a/../{m.name}", f"/{m.name}"]
    )
    return "rename"


def _tar_pax(members: list[TMember], rng: random.Random, snip: Snippets) -> str | None:
    target = rng.choice(["pickle", "storages", "tensors", "sys_info"])
    members.append(TMember("evil", snip.pickle(), pax={"path": target}))
    return "pax"


def _tar_type(members: list[TMember], rng: random.Random, snip: Snippets) -> str | None:
    m = rng.choice(members)
    m.type = rng.choice(
        [tarfile.DIRTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.CONTTYPE, b"Z"]
    )
    if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE):
        m.data = b""
    return "type"


def _tar_drop(members: list[TMember], rng: random.Random, snip: Snippets) -> str | None:
    members.remove(rng.choice(members))
    return "drop"


def _tar_header(data: bytes, rng: random.Random) -> tuple[bytes, str] | None:
    """One field of one 512-byte header changed, its checksum recomputed."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            offsets = [i.offset for i in tar.getmembers()]
    except Exception:
        return None
    if not offsets:
        return None
    buf = bytearray(data)
    at = rng.choice(offsets)
    lo, hi = rng.choice([(0, 100), (124, 136), (156, 157), (157, 257), (100, 108), (345, 500)])
    field_ = rng.choice([b"0" * (hi - lo - 1) + b"\0", rng.randbytes(hi - lo), b"77777777777\0"])
    buf[at + lo : at + hi] = field_[: hi - lo].ljust(hi - lo, b"\0")
    buf[at + 148 : at + 156] = b" " * 8
    chk = sum(buf[at : at + 512])
    buf[at + 148 : at + 156] = f"{chk:06o}\0 ".encode()
    return bytes(buf), "header"


_TAR = {
    "inner": _tar_inner,
    "count": _tar_count,
    "link": _tar_link,
    "dup": _tar_dup,
    "rename": _tar_rename,
    "pax": _tar_pax,
    "type": _tar_type,
    "drop": _tar_drop,
}


# -- the legacy file, .npy, plain pickles -----------------------------------------------------
def split_legacy(data: bytes) -> tuple[list[bytes], bytes] | None:
    """The five pickles of a legacy file and the raw storage bytes after them."""
    parts, pos = [], 0
    for _ in range(5):
        end = pickle_end(data, pos)
        if end is None:
            return None
        parts.append(data[pos:end])
        pos = end
    return parts, data[pos:]


def mutate_legacy(
    data: bytes, rng: random.Random, snip: Snippets, kind: str
) -> tuple[bytes, str] | None:
    split = split_legacy(data)
    if split is None:
        return None
    parts, tail = split
    if kind == "inner":
        i = rng.choice([3, 3, 3, 0, 1, 2, 4])  # mostly the main pickle
        pkind = rng.choice(PICKLE_KINDS)
        new = mutate_pickle(parts[i], rng, snip, pkind)
        if new is None:
            return None
        parts[i] = new
        label = f"inner[{i}].{pkind}"
    elif kind == "extra":
        parts.insert(rng.choice([0, 3, 4, 5]), snip.pickle())
        label = "extra"
    else:
        parts[4] = pk.dumps(rng.choice([[], ["0", "0"], ["0", "1", "2"], [snip.marker]]))
        label = "keys"
    return b"".join(parts) + tail, label


def mutate_stream(
    data: bytes, rng: random.Random, snip: Snippets, kind: str
) -> tuple[bytes, str] | None:
    """``inner`` on a plain pickle or on the pickle after a ``.npy`` header."""
    start = 0
    if data.startswith(b"\x93NUMPY"):
        (hlen,) = struct.unpack("<H", data[8:10])
        start = 10 + hlen
    pkind = rng.choice(PICKLE_KINDS)
    new = mutate_pickle(data[start:], rng, snip, pkind)
    return (data[:start] + new, f"inner.{pkind}") if new is not None else None
