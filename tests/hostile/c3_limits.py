"""Issue 18, classes 9 to 11: input that cannot be read, input that costs work, numpy files.

Class 9: empty, truncated, random files and a pickle whose FRAME claims more bytes than
follow: torch cannot load any of them (the tests check), so the verdict is ``unreadable``.
Class 10: cycles, deep nesting and a memo DAG with 2**40 paths: plain data torch loads at
once; every command must finish within ``contract.MAX_SECONDS``.
Class 11: ``.npy``/``.npz`` files whose object arrays ``np.load(allow_pickle=True)`` unpickles.
"""

from __future__ import annotations

import ast
import io
import random
import struct
import zipfile
from pathlib import Path
from typing import Any

from . import pk
from . import tarckpt as T
from .c3base import (
    DANGEROUS,
    FOLDER,
    NUMPY,
    SAFE,
    STORAGES,
    UNREADABLE,
    add,
    os_system,
    state,
)
from .corpus import LEGACY_MAGIC
from .pk import Raw
from .zipmz import torch_layout

GOOD = pk.dumps({"w": pk.tensor("0", 6, (2, 3))})


# --- class 9: unreadable ---------------------------------------------------------------------
def _c9(id: str, make, name: str = "model.pt", **kw: Any) -> None:  # type: ignore[no-untyped-def]
    add(id, 9, UNREADABLE, make, name=name, loads=False, **kw)


def _frame_overclaim() -> bytes:
    body = pk.unicode("w") + pk.POP + pk.NONE + pk.STOP
    return pk.proto(4) + b"\x95" + struct.pack("<Q", 1000) + body  # FRAME says 1000 bytes


_c9("c9_empty_file", lambda d: b"")
_c9(
    "c9_truncated_zip_half",
    lambda d: torch_layout(GOOD, STORAGES)[: len(torch_layout(GOOD, STORAGES)) // 2],
)
_c9("c9_truncated_zip_end_record_cut", lambda d: torch_layout(GOOD, STORAGES)[:-10])
_c9("c9_random_bytes", lambda d: random.Random(18).randbytes(4096))
_c9("c9_zip_magic_then_random_bytes", lambda d: b"PK\x03\x04" + random.Random(19).randbytes(4092))
_c9("c9_frame_claims_more_than_follows_raw_pickle", lambda d: _frame_overclaim(), "model.pkl")
_c9(
    "c9_frame_claims_more_than_follows_in_zip", lambda d: torch_layout(_frame_overclaim(), STORAGES)
)
_c9("c9_truncated_pickle_in_zip", lambda d: torch_layout(GOOD[:-6], STORAGES))
_c9("c9_legacy_magic_number_only", lambda d: pk.dumps(LEGACY_MAGIC))
_c9(
    "c9_zip_without_data_pkl",
    lambda d: _without(torch_layout(GOOD, STORAGES)),
)
_c9(
    "c9_tar_without_pickle_member",
    lambda d: T.tar_bytes([T.Member(n, x) for n, x in T.benign_parts().items() if n != "pickle"]),
    "model.tar",
)
_c9("c9_text_file", lambda d: b"this is not a checkpoint\n")


def _without(zip_bytes: bytes) -> bytes:
    """The same archive with data.pkl renamed (same length) in every header."""
    return zip_bytes.replace(b"archive/data.pkl", b"archive/data.pkx")


def npy(
    descr: str, shape: tuple[int, ...], body: bytes, *, version: int = 1, fortran: bool = False
) -> bytes:
    """A ``.npy`` file: magic, version, header dict (padded to 64), then ``body`` as is."""
    header = f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}"
    assert isinstance(ast.literal_eval(header), dict)
    size_fmt = "<H" if version == 1 else "<I"
    pre = 6 + 2 + struct.calcsize(size_fmt)
    pad = (-(pre + len(header) + 1)) % 64
    hb = (header + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack(size_fmt, len(hb)) + hb + body


_c9(
    "c9_npy_data_shorter_than_its_shape",
    lambda d: npy("'<f4'", (100,), b"\0" * 10),
    "arrays.npy",
    loader=NUMPY,
)


# --- class 10: bounded work ------------------------------------------------------------------
def _c10(id: str, expect: str = SAFE, **kw: Any) -> None:
    add(id, 10, expect, loads=True, **kw)


def _saved(make_obj, name: str = "model.pt"):  # type: ignore[no-untyped-def]
    def build(d: Path) -> Path:
        import torch

        p = Path(d) / name
        torch.save(make_obj(torch), p)
        return p

    return build


def _self_dict(torch: Any) -> Any:
    d = {"t": torch.ones(2)}
    d["self"] = d
    return d


def _self_list(torch: Any) -> Any:
    x: list[Any] = [torch.ones(2)]
    x.append(x)
    return x


def _mutual(torch: Any) -> Any:
    a: dict[str, Any] = {"t": torch.ones(2)}
    a["b"] = {"a": a}
    return a


def _self_ns(torch: Any) -> Any:
    import types

    ns = types.SimpleNamespace(t=torch.ones(2))
    ns.me = ns
    return {"ns": ns}


_c10("c10_self_referencing_dict", build=_saved(_self_dict), note="issue 18's 2 KB file")
_c10("c10_self_referencing_list", build=_saved(_self_list))
_c10("c10_mutually_referencing_dicts", build=_saved(_mutual))
_c10("c10_self_referencing_namespace", build=_saved(_self_ns))

DEPTH = 100_000
CAPPED = (UNREADABLE,)  # refusing past a documented depth is honest too; hanging is not
_CAP_NOTE = "plain data; a tool may stop at a documented limit and say unreadable instead"


def _deep(kind: str) -> bytes:
    if kind == "lists":
        nest = b"](" * DEPTH + b"]" + b"e" * DEPTH
    elif kind == "tuples":
        nest = b"(" * DEPTH + b")" + b"t" * DEPTH
    else:
        key = pk.binunicode("k")
        nest = (b"}(" + key) * (DEPTH // 2) + b"}" + b"u" * (DEPTH // 2)
    return torch_layout(pk.dumps(state(Raw(nest))), STORAGES)


for _kind in ("lists", "tuples", "dicts"):
    _c10(
        f"c10_deeply_nested_{_kind}",
        make=lambda d, k=_kind: _deep(k),
        also=CAPPED,
        note=_CAP_NOTE,
    )


def _dag(leaf: Any) -> bytes:
    """L0 = leaf; L(i) = [L(i-1), L(i-1)] through the memo: 2**40 paths, 40 lists."""
    ops = [pk.enc(leaf), pk.binput(0), pk.POP]
    for i in range(1, 41):
        ops += [
            pk.EMPTY_LIST,
            pk.MARK,
            pk.binget(i - 1),
            pk.binget(i - 1),
            pk.APPENDS,
            pk.binput(i),
        ]
        ops += [pk.POP] if i < 40 else []
    return torch_layout(pk.dumps(state(Raw(b"".join(ops)))), STORAGES)


_c10("c10_memo_dag_2_pow_40_paths", make=lambda d: _dag([]), also=CAPPED, note=_CAP_NOTE)
_c10(
    "c10_memo_dag_2_pow_40_paths_to_a_tensor",
    make=lambda d: _dag(pk.tensor("0", 6, (2, 3))),
    also=CAPPED,
    note=_CAP_NOTE,
)


# --- class 11: numpy files -------------------------------------------------------------------
def _obj_npy(d: Path, **kw: Any) -> bytes:
    return npy("'|O'", (1,), pk.dumps([os_system(d)]), **kw)


def npz(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = method
            zf.writestr(info, data)
    return out.getvalue()


def _c11(id: str, make, name: str, expect: str = DANGEROUS, **kw: Any) -> None:  # type: ignore[no-untyped-def]
    hostile = expect == DANGEROUS
    add(
        id,
        11,
        expect,
        make,
        name=name,
        loader=NUMPY,
        payload=hostile,
        loads=None if hostile else True,
        **kw,
    )


F32 = struct.pack("<6f", 0, 1, 2, 3, 4, 5)
I64 = struct.pack("<6q", 0, 1, 2, 3, 4, 5)

_c11("c11_npy_object_array_payload", _obj_npy, "arrays.npy")
_c11(
    "c11_npy_structured_dtype_with_object_field",
    lambda d: npy("[('a', '|O'), ('b', '<f4')]", (1,), pk.dumps([os_system(d)])),
    "arrays.npy",
)
_c11("c11_npy_version_2_header_object_array", lambda d: _obj_npy(d, version=2), "arrays.npy")
_c11("c11_npz_object_member", lambda d: npz({"arr_0.npy": _obj_npy(d)}), "arrays.npz")
_c11(
    "c11_npz_numeric_and_object_members",
    lambda d: npz({"w.npy": npy("'<f4'", (2, 3), F32), "meta.npy": _obj_npy(d)}),
    "arrays.npz",
)
_c11(
    "c11_npz_deflated_object_member",
    lambda d: npz({"arr_0.npy": _obj_npy(d)}, zipfile.ZIP_DEFLATED),
    "arrays.npz",
)
_c11(
    "c11_npz_member_without_npy_suffix",
    lambda d: npz({"notes.txt": _obj_npy(d)}),
    "arrays.npz",
    note="NpzFile reads any member that starts with the .npy magic as an array",
)


def _folder(d: Path) -> Path:
    folder = Path(d) / "run"
    folder.mkdir()
    (folder / "model.pt").write_bytes(torch_layout(GOOD, STORAGES))
    (folder / "extras.npz").write_bytes(npz({"arr_0.npy": _obj_npy(d)}))
    return folder


add(
    "c11_folder_with_checkpoint_and_object_npz",
    11,
    DANGEROUS,
    build=_folder,
    loader=FOLDER,
    payload=True,
    note="scan of the folder must judge the .npz too",
)
_c11("c11_npy_float32", lambda d: npy("'<f4'", (2, 3), F32), "arrays.npy", SAFE)
_c11(
    "c11_npy_int64_fortran_order",
    lambda d: npy("'<i8'", (3, 2), I64, fortran=True),
    "arrays.npy",
    SAFE,
)
_c11(
    "c11_npz_numeric",
    lambda d: npz({"w.npy": npy("'<f4'", (2, 3), F32), "i.npy": npy("'<i8'", (6,), I64)}),
    "arrays.npz",
    SAFE,
)
_c11(
    "c11_npz_compressed_numeric",
    lambda d: npz({"w.npy": npy("'<f4'", (2, 3), F32)}, zipfile.ZIP_DEFLATED),
    "arrays.npz",
    SAFE,
)
