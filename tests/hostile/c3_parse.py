"""Issue 18, classes 1 and 2: files that torch reads differently from a naive parser.

Class 1: zips as miniz reads them (torch's ``PyTorchStreamReader``): the end record is the
last ``PK\\x05\\x06`` with at least 22 bytes after it; a zip64 locator before it wins; only
the first ``count`` central entries exist; names match case-insensitively and a duplicate
resolves by miniz's sort; the root folder is the first central entry's; data starts after
the *local* header's name and extra; local headers of ``torch.save`` carry no sizes.

Class 2: pre-1.0 tar checkpoints, every pickle ``legacy_load`` reads and every member as
``tarfile`` resolves it.
"""

from __future__ import annotations

import struct
import tarfile
from pathlib import Path

from . import pk
from . import tarckpt as T
from .c3base import DANGEROUS, UNREADABLE, add, exec_, os_system, py, state
from .corpus import W_BYTES
from .pk import Call, G, PersId
from .zipmz import DEFLATED, Cd, Dir, MzZip, torch_layout, torch_names

# --- class 1: the zip as miniz reads it ------------------------------------------------------
AMBIGUOUS = (UNREADABLE,)  # "cannot prove what torch reads" is as right as "dangerous"
ST = {"0": W_BYTES}


def _evil(d: Path) -> bytes:
    return pk.dumps(state(os_system(d)))


GOOD = pk.dumps({"w": pk.tensor("0", 6, (2, 3))})


def _zip(id: str, make, note: str = "", also: tuple[str, ...] = AMBIGUOUS) -> None:  # type: ignore[no-untyped-def]
    add(id, 1, DANGEROUS, make, payload=True, also=also, note=note)


def _entries(z: MzZip, pkl: bytes, root: str = "archive") -> list[Cd]:
    return [Cd(n, z.local(n, d)) for n, d in torch_names(pkl, ST, root)]


def _finish(z: MzZip, cds: list[Cd], *, zip64: bool = True) -> bytes:
    d = z.central(cds)
    if zip64:
        z.end64(d)
    z.end(d)
    return z.bytes()


_zip(
    "c1_torch_layout_sizes_zero_in_local_headers",
    lambda d: torch_layout(_evil(d), ST),
    "the layout torch.save writes: local headers with a data descriptor and sizes 0",
    also=(),
)
_zip(
    "c1_short_eocd_signature_in_comment",
    lambda d: torch_layout(_evil(d), ST, comment=b"release PK\x05\x06" + b"\0" * 8),
    "miniz skips an end signature with fewer than 22 bytes after it; zipfile gives up",
)
_zip(
    "c1_short_eocd_signature_in_comment_no_zip64",
    lambda d: torch_layout(_evil(d), ST, zip64_end=False, comment=b"PK\x05\x06\0\0"),
)
_zip(
    "c1_junk_after_eocd",
    lambda d: torch_layout(_evil(d), ST, trailer=b"J" * 100),
)
_zip(
    "c1_junk_with_short_eocd_signature_after_eocd",
    lambda d: torch_layout(_evil(d), ST, trailer=b"J" * 10 + b"PK\x05\x06" + b"\0" * 6),
)


def _two_dirs(d: Path, which: str) -> bytes:
    """A benign and a hostile directory; the end records point torch at the hostile one."""
    z = MzZip()
    good = _entries(z, GOOD)
    evil = [Cd("archive/data.pkl", z.local("archive/data.pkl", _evil(d))), *good[1:]]
    d_good, d_evil = z.central(good), z.central(evil)
    if which == "comment":  # a whole end record in the comment of the real one: miniz takes it
        fake = struct.pack(
            "<IHHHHIIH", 0x06054B50, 0, 0, d_evil.count, d_evil.count, d_evil.size,
            d_evil.offset, 0,
        )  # fmt: skip
        z.end(d_good, comment=fake)
    else:  # the zip64 record (which miniz prefers) names the hostile one, the classic the other
        z.end64(d_evil)
        z.end(d_good)
    return z.bytes()


_zip(
    "c1_full_eocd_in_comment_points_to_payload_directory",
    lambda d: _two_dirs(d, "comment"),
)
_zip(
    "c1_zip64_end_record_points_to_payload_directory",
    lambda d: _two_dirs(d, "zip64"),
)


def _decoy(d: Path, first: bool) -> bytes:
    z = MzZip()
    cds = _entries(z, _evil(d))
    decoy = Cd("archive/decoy.pkl", 0, usize=2, csize=2)  # 2 bytes at data.pkl's offset
    cds = [cds[0], decoy, *cds[1:]] if first else [*cds, decoy]
    return _finish(z, cds)


_zip("c1_decoy_pkl_entry_shares_data_pkl_offset", lambda d: _decoy(d, False))
_zip("c1_decoy_pkl_entry_next_to_data_pkl_shares_offset", lambda d: _decoy(d, True))


def _dup(d: Path, evil_name: str, evil_first: bool, adjacent: bool) -> bytes:
    """Two entries matching ``data.pkl`` (miniz compares names case-insensitively).

    Which one torch reads depends on miniz's (unstable) sort; each layout here was checked to
    make torch read the hostile one."""
    z = MzZip()
    names = torch_names(GOOD, ST)
    good = Cd(names[0][0], z.local(names[0][0], GOOD))
    evil = Cd(evil_name, z.local(evil_name, _evil(d)))
    rest = [Cd(n, z.local(n, data)) for n, data in names[1:]]
    pair = [evil, good] if evil_first else [good, evil]
    cds = [*pair, *rest] if adjacent else [pair[0], *rest, pair[1]]
    return _finish(z, cds)


_zip(
    "c1_duplicate_data_pkl_differing_in_case",
    lambda d: _dup(d, "archive/DATA.pkl", False, True),
    "two entries whose names differ only in case: torch finds the second, zipfile the first",
)
_zip(
    "c1_duplicate_data_pkl_exact_name",
    lambda d: _dup(d, "archive/data.pkl", False, True),
)
_zip(
    "c1_duplicate_data_pkl_case_first_and_last",
    lambda d: _dup(d, "archive/Data.Pkl", False, False),
)
add(
    "c1_duplicate_data_pkl_torch_reads_the_benign_one",
    1,
    UNREADABLE,
    lambda d: _dup(d, "archive/DATA.PKL", True, True),
    also=(DANGEROUS,),
    loads=True,
    note="miniz's sort happens to pick the benign copy: proving that is modelling its heap sort",
)


def _upper(d: Path) -> bytes:
    z = MzZip()
    return _finish(z, [Cd(n.upper(), z.local(n.upper(), x)) for n, x in torch_names(_evil(d), ST)])


_zip("c1_every_name_upper_case", _upper, "ARCHIVE/DATA.PKL: miniz matches data.pkl")


def _local_name(d: Path) -> bytes:
    z = MzZip()
    names = torch_names(_evil(d), ST)
    i = z.local("archive/zzzz.bin", names[0][1])  # the local header names something else
    cds = [Cd(names[0][0], i), *[Cd(n, z.local(n, data)) for n, data in names[1:]]]
    return _finish(z, cds)


_zip("c1_local_header_name_differs_from_central", _local_name)


def _local_extra(d: Path) -> bytes:
    """The local extra field (whose length only the local header gives) holds a benign pickle
    where a reader that trusts the central directory's lengths expects the data."""
    z = MzZip()
    names = torch_names(_evil(d), ST)
    i = z.local(names[0][0], names[0][1], extra=struct.pack("<HH", 0x4242, len(GOOD)) + GOOD)
    cds = [Cd(names[0][0], i), *[Cd(n, z.local(n, data)) for n, data in names[1:]]]
    return _finish(z, cds)


_zip("c1_local_extra_field_hides_a_benign_pickle", _local_extra)


def _count_hides(d: Path) -> bytes:
    """The end record counts one entry less than the directory holds: miniz never sees the
    last one, a benign duplicate ``data.pkl`` that zipfile (reading by size) takes instead."""
    z = MzZip()
    cds = _entries(z, _evil(d))
    dup = Cd("archive/data.pkl", z.local("archive/data.pkl", GOOD))
    full = z.central([*cds, dup])
    z.end64(Dir(full.offset, full.size, full.count - 1))
    z.end(full, count=full.count - 1)
    return z.bytes()


_zip("c1_eocd_count_hides_a_benign_duplicate", _count_hides)


def _roots(d: Path, evil_first: bool) -> bytes:
    """Entries outside the root folder (the first central entry's): torch refuses the file."""
    z = MzZip()
    evil = _entries(z, _evil(d), "evil")
    good = _entries(z, GOOD, "archive")
    return _finish(z, [*evil, *good] if evil_first else [*good, *evil])


add(
    "c1_entries_outside_the_root_folder_payload_set_first",
    1,
    UNREADABLE,
    lambda d: _roots(d, True),
    also=(DANGEROUS,),
    loads=False,
    note="torch 2.13 refuses an archive with entries outside its root folder (checked)",
)
add(
    "c1_entries_outside_the_root_folder_payload_set_last",
    1,
    UNREADABLE,
    lambda d: _roots(d, False),
    also=(DANGEROUS,),
    loads=False,
)
_zip(
    "c1_empty_root_folder_names_start_with_slash",
    lambda d: _finish(z := MzZip(), _entries(z, _evil(d), "")),
)
_zip(
    "c1_zip64_extra_fields_on_every_entry",
    lambda d: torch_layout(_evil(d), ST, zip64_entries=True),
    also=(),
)


def _deflated(d: Path) -> bytes:
    z = MzZip()
    names = torch_names(_evil(d), ST)
    i = z.local(names[0][0], names[0][1], method=DEFLATED)
    return _finish(z, [Cd(names[0][0], i), *[Cd(n, z.local(n, x)) for n, x in names[1:]]])


_zip("c1_deflated_data_pkl", _deflated, also=())


# --- class 2: pre-1.0 tar checkpoints --------------------------------------------------------
def _tar(id: str, make, note: str = "") -> None:  # type: ignore[no-untyped-def]
    add(id, 2, DANGEROUS, make, name="model.tar", payload=True, note=note)


FS = G("torch", "FloatStorage")


def _parts(**over: bytes) -> dict[str, bytes]:
    parts = T.benign_parts()
    parts.update(over)
    return parts


_tar(
    "c2_tar_payload_in_pickle_member",
    lambda d: T.checkpoint(_parts(pickle=pk.dumps({"w": PersId("2000"), "x": os_system(d)}))),
)
_tar(
    "c2_tar_payload_in_storage_count",
    lambda d: T.checkpoint(
        _parts(storages=T.storages_member([], count=pk.dumps(os_system(d))), pickle=pk.dumps({}))
    ),
    "the leading pickle of 'storages' (os.system returns 0: zero storages follow)",
)


def _storages(d: Path, where: str) -> bytes:
    evil_args = pk.dumps((1001, os_system(d), FS))  # location = os.system(...)'s result
    if where == "second_args":
        items = [T.Storage(1000, T.W_DATA), T.Storage(1001, T.W_DATA, args=evil_args)]
        return T.storages_member(items)
    if where == "first_args":
        return T.storages_member(
            [T.Storage(1000, T.W_DATA, args=pk.dumps((1000, os_system(d), FS)))]
        )
    views = pk.proto(2) + pk.enc(os_system(d)) + pk.POP + pk.enc([]) + pk.STOP
    return T.storages_member([T.Storage(1000, T.W_DATA)], views=views)


_tar(
    "c2_tar_payload_in_second_storage_args_after_raw_bytes",
    lambda d: T.checkpoint(_parts(storages=_storages(d, "second_args"))),
)
_tar(
    "c2_tar_payload_in_first_storage_args",
    lambda d: T.checkpoint(_parts(storages=_storages(d, "first_args"))),
)
_tar(
    "c2_tar_payload_in_storage_views_after_raw_bytes",
    lambda d: T.checkpoint(_parts(storages=_storages(d, "views"))),
)


def _tensors(d: Path) -> bytes:
    evil = pk.dumps((2001, 1000, Call(G("builtins", "exec"), (py(d),))))
    return T.tensors_member([T.Tensor(2000, 1000, (2, 3)), T.Tensor(2001, 1000, (6,), args=evil)])


_tar(
    "c2_tar_payload_in_second_tensor_args_after_raw_dims",
    lambda d: T.checkpoint(_parts(tensors=_tensors(d))),
)
_tar(
    "c2_tar_payload_in_tensor_count",
    lambda d: T.checkpoint(
        _parts(tensors=T.tensors_member([], count=pk.dumps(os_system(d))), pickle=pk.dumps({}))
    ),
)


def _linked(d: Path, member: str, kind: bytes) -> bytes:
    """``member`` is a link to a member named ``x`` that holds the hostile version."""
    parts = T.benign_parts()
    if member == "pickle":
        parts["pickle"] = pk.dumps({"w": PersId("2000"), "x": os_system(d)})
    elif member == "storages":
        parts["storages"] = _storages(d, "first_args")
    else:
        parts["tensors"] = _tensors(d)
    members = [T.Member(n, data) for n, data in parts.items() if n != member]
    members += [T.Member("x", parts[member]), T.Member(member, kind=kind, linkname="x")]
    return T.tar_bytes(members)


_tar("c2_tar_pickle_member_is_a_symlink", lambda d: _linked(d, "pickle", tarfile.SYMTYPE))
_tar("c2_tar_pickle_member_is_a_hard_link", lambda d: _linked(d, "pickle", tarfile.LNKTYPE))
_tar("c2_tar_storages_member_is_a_hard_link", lambda d: _linked(d, "storages", tarfile.LNKTYPE))
_tar("c2_tar_tensors_member_is_a_hard_link", lambda d: _linked(d, "tensors", tarfile.LNKTYPE))


def _dup_member(d: Path) -> bytes:
    parts = T.benign_parts()
    evil = pk.dumps({"w": PersId("2000"), "x": os_system(d)})
    return T.checkpoint(parts, [T.Member("pickle", evil)])  # tarfile: the last one wins


_tar("c2_tar_duplicate_pickle_member_last_wins", _dup_member)


def _pax(d: Path) -> bytes:
    parts = T.benign_parts()
    evil = pk.dumps({"w": PersId("2000"), "x": exec_(d)})
    return T.tar_bytes(
        [
            T.Member("storages", parts["storages"]),
            T.Member("tensors", parts["tensors"]),
            T.Member("decoy", evil, pax={"path": "pickle"}),  # the ustar name says 'decoy'
        ]
    )


_tar("c2_tar_pax_header_renames_a_member_to_pickle", _pax)
