"""Structure-level zip mutations, on a model of the archive that is written back the way
``torch.save`` writes it (local headers with zero sizes and a data descriptor, 64-byte aligned
data through an ``FB`` extra field, a zip64 end record and locator, then the end record), so
that an unmutated model gives a file torch loads like the original.

Kinds (``ZIP_KINDS``): ``inner`` (a ``.pkl`` member through :mod:`.pickle_mut`), ``comment``
and ``trailing`` (short or whole end-record signatures after the real one, junk), ``prefix``
(a pickle or junk before the archive, offsets moved or not), ``eocd`` and ``zip64`` (end-record
fields), ``cd_field`` / ``cd_extra`` (central-directory fields and extra fields), ``local``
(local headers: sizes, names, extra fields, descriptors), ``dup`` / ``rename`` / ``add`` /
``drop`` / ``reorder`` (entries), ``shared`` (a decoy directory entry sharing a member's local
header), ``deflate``.
"""

from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib
from dataclasses import dataclass, field

from .pickle_mut import PICKLE_KINDS, mutate_pickle
from .snippets import Snippets

ZIP_KINDS = (
    "inner",
    "comment",
    "trailing",
    "prefix",
    "eocd",
    "zip64",
    "cd_field",
    "cd_extra",
    "local",
    "dup",
    "rename",
    "add",
    "drop",
    "reorder",
    "shared",
    "deflate",
)
_U32 = 0xFFFFFFFF


@dataclass
class ZMember:
    name: str
    data: bytes
    local_name: str | None = None  # None: the central name
    flags: int = 0x0808  # torch: data descriptor + UTF-8
    method: int = 0
    crc: int | None = None  # None: the real CRC
    sizes_in_local: bool = False  # torch writes zeros there, the real ones in the descriptor
    descriptor: bool = True
    local_extra: bytes | None = None  # None: torch's FB padding to 64 bytes
    cd_extra: bytes = b""
    cd_comment: bytes = b""
    cd_csize: int | None = None
    cd_usize: int | None = None
    offset_delta: int = 0
    share: ZMember | None = None  # a central-only entry pointing at ``share``'s local header
    in_cd: bool = True


@dataclass
class ZModel:
    members: list[ZMember]
    prefix: bytes = b""
    absolute: bool = True  # offsets count the prefix (a polyglot) or not
    comment: bytes = b""
    trailing: bytes = b""
    zip64: bool = True
    eocd: dict[str, int] = field(default_factory=dict)  # disk cd_disk n_disk n cd_size cd_offset
    z64: dict[str, int] = field(default_factory=dict)  # n cd_size cd_offset locator

    @classmethod
    def parse(cls, data: bytes) -> ZModel | None:
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                members = [
                    ZMember(i.filename, zf.read(i), method=i.compress_type) for i in zf.infolist()
                ]
        except Exception:  # not a zip we can read: nothing to mutate structurally
            return None
        return cls(members)

    def write(self) -> bytes:
        out = bytearray(self.prefix)
        shift = 0 if self.absolute else len(self.prefix)
        offsets: dict[int, int] = {}
        for m in self.members:
            if m.share is None:
                offsets[id(m)] = len(out) - shift
                out += _local(m, len(out))
        cd_start = len(out)
        entries = 0
        for m in self.members:
            if not m.in_cd:
                continue
            target = m.share if m.share is not None else m
            out += _central(m, target, offsets.get(id(target), 0) + m.offset_delta)
            entries += 1
        cd_size = len(out) - cd_start
        cd_off = cd_start - shift
        if self.zip64:
            rec = len(out) - shift
            z = {"n": entries, "cd_size": cd_size, "cd_offset": cd_off, "locator": rec, **self.z64}
            out += struct.pack("<4sQHHII", b"PK\x06\x06", 44, 0x1E, 45, 0, 0)
            out += struct.pack("<QQQQ", z["n"], z["n"], z["cd_size"], z["cd_offset"])
            out += struct.pack("<4sIQI", b"PK\x06\x07", 0, z["locator"], 1)
        e = {
            "disk": 0,
            "cd_disk": 0,
            "n_disk": entries,
            "n": entries,
            "cd_size": cd_size,
            "cd_offset": cd_off,
            "comment_len": len(self.comment),
            **self.eocd,
        }
        out += struct.pack(
            "<IHHHHIIH",
            0x06054B50,
            e["disk"] & 0xFFFF,
            e["cd_disk"] & 0xFFFF,
            e["n_disk"] & 0xFFFF,
            e["n"] & 0xFFFF,
            e["cd_size"] & _U32,
            e["cd_offset"] & _U32,
            e["comment_len"] & 0xFFFF,
        )
        return bytes(out + self.comment + self.trailing)


def _stored(m: ZMember) -> bytes:
    if m.method == 8:
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        return c.compress(m.data) + c.flush()
    return m.data


def _crc(m: ZMember) -> int:
    return zlib.crc32(m.data) if m.crc is None else m.crc & _U32


def _local(m: ZMember, at: int) -> bytes:
    name = (m.local_name if m.local_name is not None else m.name).encode("utf-8", "replace")
    stored = _stored(m)
    extra = m.local_extra
    if extra is None:
        pad = (-(at + 30 + len(name) + 4)) % 64
        extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
    crc, csize, usize = (_crc(m), len(stored), len(m.data)) if m.sizes_in_local else (0, 0, 0)
    head = struct.pack(
        "<IHHHHHIIIHH",
        0x04034B50,
        0,
        m.flags,
        m.method,
        0,
        0,
        crc,
        csize,
        usize,
        len(name),
        len(extra),
    )
    desc = (
        struct.pack("<IIII", 0x08074B50, _crc(m), len(stored), len(m.data)) if m.descriptor else b""
    )
    return head + name + extra + stored + desc


def _central(m: ZMember, target: ZMember, off: int) -> bytes:
    name = m.name.encode("utf-8", "replace")
    stored = _stored(target)
    csize = len(stored) if m.cd_csize is None else m.cd_csize
    usize = len(target.data) if m.cd_usize is None else m.cd_usize
    return (
        struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            0,
            0,
            m.flags,
            target.method if m.share is not None else m.method,
            0,
            0,
            _crc(target) if m.crc is None else m.crc & _U32,
            csize & _U32,
            usize & _U32,
            len(name),
            len(m.cd_extra),
            len(m.cd_comment),
            0,
            0,
            0,
            off & _U32,
        )
        + name
        + m.cd_extra
        + m.cd_comment
    )


# -- mutations ----------------------------------------------------------------------------------
def _pkl_index(model: ZModel, rng: random.Random) -> int | None:
    idx = [i for i, m in enumerate(model.members) if m.name.endswith(".pkl") and m.share is None]
    return rng.choice(idx) if idx else None


def _root(model: ZModel) -> str:
    for m in model.members:
        if "/" in m.name:
            return m.name.split("/", 1)[0]
    return "archive"


def _interesting(rng: random.Random, real: int) -> int:
    return rng.choice([0, 1, real - 1, real + 1, real + 22, real * 2, 0xFFFF, _U32, real])


def mutate_zip(
    data: bytes, rng: random.Random, snip: Snippets, kind: str
) -> tuple[bytes, str] | None:
    """``data`` with one structural mutation of ``kind`` (and its detailed label)."""
    model = ZModel.parse(data)
    if model is None or not model.members:
        return None
    label = _MUTATIONS[kind](model, rng, snip)
    if not label:
        return None
    return model.write(), label


def _inner(model: ZModel, rng: random.Random, snip: Snippets) -> str | None:
    i = _pkl_index(model, rng)
    if i is None:
        return None
    kind = rng.choice(PICKLE_KINDS)
    new = mutate_pickle(model.members[i].data, rng, snip, kind)
    if new is None:
        return None
    model.members[i].data = new
    return f"inner.{kind}"


def _eocd_sig(rng: random.Random, model: ZModel) -> bytes:
    """A short end-record signature, a whole fake end record, or junk."""
    return rng.choice(
        [
            b"PK\x05\x06" + bytes(rng.randrange(0, 18)),
            b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 1, 1, 46, 0, 0),
            b"PK\x06\x07" + bytes(16),
            rng.randbytes(rng.randrange(1, 40)),
            b"PK\x05\x06",
        ]
    )


def _comment(model: ZModel, rng: random.Random, snip: Snippets) -> str:
    model.comment = _eocd_sig(rng, model) + (
        rng.randbytes(rng.randrange(0, 8)) if rng.random() < 0.5 else b""
    )
    if rng.random() < 0.2:
        model.eocd["comment_len"] = rng.choice([0, len(model.comment) + 1, 0xFFFF])
    return "comment"


def _trailing(model: ZModel, rng: random.Random, snip: Snippets) -> str:
    model.trailing = _eocd_sig(rng, model) * rng.choice([1, 2])
    return "trailing"


def _prefix(model: ZModel, rng: random.Random, snip: Snippets) -> str:
    model.prefix = snip.pickle() if rng.random() < 0.6 else rng.randbytes(rng.randrange(1, 64))
    model.absolute = rng.random() < 0.5
    return "prefix"


def _eocd(model: ZModel, rng: random.Random, snip: Snippets) -> str:
    f = rng.choice(["disk", "cd_disk", "n_disk", "n", "cd_size", "cd_offset"])
    real = {"n": len(model.members), "n_disk": len(model.members)}.get(f, 0)
    model.eocd[f] = (
        _interesting(rng, real) if f in ("n", "n_disk") else rng.choice([0, 1, 46, _U32])
    )
    return "eocd"


def _zip64(model: ZModel, rng: random.Random, snip: Snippets) -> str:
    if rng.random() < 0.3:
        model.zip64 = False
        return "zip64"
    f = rng.choice(["n", "cd_size", "cd_offset", "locator"])
    model.z64[f] = rng.choice([0, 1, 46, 2**32, 2**63, 2**64 - 1])
    return "zip64"


def _cd_field(model: ZModel, rng: random.Random, snip: Snippets) -> str:
    m = (
        model.members[_pkl_index(model, rng) or 0]
        if rng.random() < 0.6
        else rng.choice(model.members)
    )
    f = rng.choice(["flags", "method", "crc", "cd_csize", "cd_usize", "offset_delta", "cd_comment"])
    if f == "flags":
        m.flags ^= rng.choice([1, 8, 0x40, 0x800, 0x2000])
    elif f == "method":
        m.method = rng.choice([1, 8, 12, 14, 99])
    elif f == "crc":
        m.crc = rng.randrange(1 << 32)
    elif f in ("cd_csize", "cd_usize"):
        setattr(m, f, _interesting(rng, len(m.data)))
    elif f == "offset_delta":
        m.offset_delta = rng.choice([-30, -1, 1, 4, 30, 64])
    else:
        m.cd_comment = rng.randbytes(rng.randrange(1, 20))
    return "cd_field"


def _cd_extra(model: ZModel, rng: random.Random, snip: Snippets) -> str:
    m = rng.choice(model.members)
    body = rng.choice([b"", bytes(8), bytes(16), bytes(24), bytes(28), struct.pack("<Q", 2**40)])
    hid = rng.choice([0x0001, 0x0001, 0x4246, 0x5455, 0x7075, 0xCAFE])
    claimed = rng.choice([len(body), len(body) + 4, max(len(body) - 4, 0)])
    m.cd_extra += struct.pack("<HH", hid, claimed) + body
    return "cd_extra"


def _local_mut(model: ZModel, rng: random.Random, snip: Snippets) -> str:
    m = rng.choice([x for x in model.members if x.share is None] or model.members)
    f = rng.choice(["sizes", "descriptor", "name", "extra"])
    if f == "sizes":
        m.sizes_in_local = True
        m.flags &= ~0x08 if rng.random() < 0.5 else 0xFFFF
    elif f == "descriptor":
        m.descriptor = False
    elif f == "name":
        m.local_name = rng.choice(
            [m.name + "x", m.name.upper(), "", m.name[:-1], _root(model) + "/data.pkl"]
        )
    else:
        m.local_extra = rng.choice(
            [b"", rng.randbytes(rng.randrange(1, 12)), struct.pack("<HH", 1, 16) + bytes(16)]
        )
    return "local"


def _name_variant(rng: random.Random, name: str, root: str) -> str:
    base = name.split("/", 1)[1] if "/" in name else name
    return rng.choice(
        [
            name,
            name.upper(),
            f"{root}/{base.capitalize()}",
            f"./{name}",
            f"/{name}",
            f"{name}/",
            name.replace("/", "\\"),
            f"evil/{base}",
            f"{root}/../{name}",
            f"{root}/x/{base}",
        ]
    )


def _dup(model: ZModel, rng: random.Random, snip: Snippets) -> str:
    i = _pkl_index(model, rng)
    if i is None:
        return ""
    src = model.members[i]
    name = _name_variant(rng, src.name, _root(model)) if rng.random() < 0.5 else src.name
    data = snip.pickle() if rng.random() < 0.8 else src.data
    new = ZMember(name, data)
    model.members.insert(i if rng.random() < 0.5 else len(model.members), new)
    return "dup"


def _rename(model: ZModel, rng: random.Random, snip: Snippets) -> str:
    m = (
        model.members[_pkl_index(model, rng) or 0]
        if rng.random() < 0.5
        else rng.choice(model.members)
    )
    m.name = _name_variant(rng, m.name, _root(model))
    if rng.random() < 0.5:
        m.local_name = None
    return "rename"


def _add(model: ZModel, rng: random.Random, snip: Snippets) -> str:
    root = _root(model)
    name = rng.choice(
        [
            f"{root}/constants.pkl",
            f"{root}/evil.pkl",
            f"{root}/data/99",
            f"{root}/extra/data.pkl",
            f"{root}/code/__torch__.py",
            f"{root}/.data/version",
            f"{root}/debug_pkl",
        ]
    )
    model.members.insert(rng.randrange(len(model.members) + 1), ZMember(name, snip.pickle()))
    return "add"


def _drop(model: ZModel, rng: random.Random, snip: Snippets) -> str:
    m = rng.choice(model.members)
    if rng.random() < 0.5:
        m.in_cd = False
    else:
        model.members.remove(m)
        for x in model.members:
            if x.share is m:
                x.share = None
    return "drop"


def _reorder(model: ZModel, rng: random.Random, snip: Snippets) -> str:
    rng.shuffle(model.members)
    return "reorder"


def _shared(model: ZModel, rng: random.Random, snip: Snippets) -> str:
    """A decoy directory entry named like a pickle, sharing a pickle's local header."""
    i = _pkl_index(model, rng)
    if i is None:
        return ""
    target = model.members[i]
    name = rng.choice([f"{_root(model)}/decoy.pkl", f"{_root(model)}/a.pkl", target.name])
    size = rng.choice([0, 1, 2, 8, 16])
    decoy = ZMember(name, b"", share=target, cd_csize=size, cd_usize=size)
    model.members.insert(rng.choice([0, i, len(model.members)]), decoy)
    return "shared"


def _deflate(model: ZModel, rng: random.Random, snip: Snippets) -> str:
    m = rng.choice([x for x in model.members if x.share is None] or model.members)
    m.method = 8
    return "deflate"


_MUTATIONS = {
    "inner": _inner,
    "comment": _comment,
    "trailing": _trailing,
    "prefix": _prefix,
    "eocd": _eocd,
    "zip64": _zip64,
    "cd_field": _cd_field,
    "cd_extra": _cd_extra,
    "local": _local_mut,
    "dup": _dup,
    "rename": _rename,
    "add": _add,
    "drop": _drop,
    "reorder": _reorder,
    "shared": _shared,
    "deflate": _deflate,
}
