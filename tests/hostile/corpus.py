"""Hostile and broken checkpoint files, generated at test time.

Every file is built from raw bytes with ``struct``, the raw zip writer in ``zipw`` and the
opcode-level pickle writer in ``pk``. Nothing here unpickles anything or imports a payload
target. Payloads only ever create a marker file (``marker_path(tmp_dir)``, absolute path
embedded in the payload), and only if something wrongly executes them.

``CASES`` is the corpus: ``Case(id, build, expect)`` where ``build(tmp_dir)`` writes the
file(s) under ``tmp_dir`` and returns the path to hand to the tool, and ``expect`` is

* ``"error"``     - bad input: ``ckpttool inspect`` exits 1;
* ``"dangerous"`` - the file names dangerous globals: exit 3;
* ``"ok"``        - safe but odd: must inspect successfully, exit 0.

``also_ok`` lists other outcomes that are acceptable for a few resource-bomb and
ambiguous-policy cases (see each ``note``); keep it empty wherever one answer is right.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import pk, zipw
from .pk import Build, Call, G, NewObj, ODict, PersId
from .zipw import DEFLATED, ZEntry, build_zip, patch, torch_entries, torch_zip

ERROR, DANGEROUS, OK = "error", "dangerous", "ok"
EXIT_CODES = {OK: 0, ERROR: 1, DANGEROUS: 3}

MARKER_NAME = "PWNED"
CANARY_MODULE = "ckpttool_canary_mod"
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
LEGACY_SYS_INFO = {
    "protocol_version": LEGACY_PROTOCOL,
    "little_endian": True,
    "type_sizes": {"short": 2, "int": 4, "long": 4},
}
GIB = 2**30


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path], Path]
    expect: str
    also_ok: tuple[str, ...] = ()
    values: dict[str, Any] | None = None  # expected tensor values (nested lists) by key
    stderr_contains: tuple[str, ...] = ()  # case-insensitive substrings for stderr
    forbid_in_output: tuple[str, ...] = ()  # must not appear raw in stdout or stderr
    check_name: bool = True  # stderr must contain the input's file name
    drop_dac: bool = False  # run the tool without root's file-permission override
    torch_loads: bool | None = None  # sanity: can torch.load(weights_only=True) read it?
    tags: frozenset[str] = field(default_factory=frozenset)
    note: str = ""

    @property
    def allowed(self) -> tuple[str, ...]:
        return (self.expect, *self.also_ok)


def marker_path(tmp_dir: Path) -> Path:
    return Path(tmp_dir).resolve() / MARKER_NAME


def install_canary(site_dir: Path, marker: Path) -> Path:
    """Write ``CANARY_MODULE`` into ``site_dir``: importing it (or calling it) writes ``marker``.

    The test puts ``site_dir`` on the tool's PYTHONPATH, so any import of a pickle's global
    module by the tool leaves the marker behind.
    """
    site_dir.mkdir(parents=True, exist_ok=True)
    src = (
        "from pathlib import Path\n"
        f"_MARKER = Path({str(marker)!r})\n"
        "_MARKER.write_text('imported ckpttool_canary_mod')\n"
        "def touch(*a, **k):\n"
        "    _MARKER.write_text('called ckpttool_canary_mod.touch')\n"
        "class Net:\n"
        "    def __setstate__(self, state):\n"
        "        _MARKER.write_text('ckpttool_canary_mod.Net.__setstate__')\n"
    )
    path = site_dir / f"{CANARY_MODULE}.py"
    path.write_text(src)
    return path


# --- payloads --------------------------------------------------------------------------------


def sh_touch(tmp_dir: Path) -> str:
    return f"touch {shlex.quote(str(marker_path(tmp_dir)))}"


def py_touch(tmp_dir: Path) -> str:
    return f"open({str(marker_path(tmp_dir))!r}, 'w').close()"


def argv_touch(tmp_dir: Path) -> list[str]:
    return ["touch", str(marker_path(tmp_dir))]


# --- file builders ---------------------------------------------------------------------------


def f32(*xs: float) -> bytes:
    return struct.pack(f"<{len(xs)}f", *xs)


W_VALUES = [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
W_BYTES = f32(0, 1, 2, 3, 4, 5)


def basic_obj() -> dict:
    return {"w": pk.tensor("0", 6, (2, 3)), "b": pk.tensor("1", 3, (3,))}


def basic_storages() -> dict[str, bytes]:
    return {"0": W_BYTES, "1": f32(0.5, -1.5, 2.25)}


BASIC_VALUES = {"w": W_VALUES, "b": [0.5, -1.5, 2.25]}


def basic_zip() -> bytes:
    return torch_zip(pk.dumps(basic_obj()), basic_storages())


def in_zip(obj: Any, proto: int = 2, storages: dict[str, bytes] | None = None) -> bytes:
    return torch_zip(pk.dumps(obj, proto), storages)


def legacy_file(
    main: bytes,
    storages: list[tuple[str, int, bytes]] = (),  # (key, numel, raw bytes)
    *,
    magic: bytes | None = None,
    protocol: bytes | None = None,
    sys_info: bytes | None = None,
    keys: bytes | None = None,
) -> bytes:
    """torch's legacy (pre-1.6) format: five pickles, then per storage ``<q numel`` + data."""
    out = [
        magic if magic is not None else pk.dumps(LEGACY_MAGIC),
        protocol if protocol is not None else pk.dumps(LEGACY_PROTOCOL),
        sys_info if sys_info is not None else pk.dumps(LEGACY_SYS_INFO),
        main,
        keys if keys is not None else pk.dumps([k for k, _, _ in storages]),
    ]
    for _, numel, data in storages:
        out.append(struct.pack("<q", numel) + data)
    return b"".join(out)


def basic_legacy() -> bytes:
    main = pk.dumps({"w": pk.legacy_tensor("0", 6, (2, 3))})
    return legacy_file(main, [("0", 6, W_BYTES)])


def safetensors_file(header: Any, data: bytes = b"", *, raw_header: bytes | None = None) -> bytes:
    hb = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + data


def st_basic_header() -> dict:
    return {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]},
    }


ST_DATA = W_BYTES + f32(0.5, -1.5, 2.25)


def writer(name: str, make: Callable[[Path], bytes]) -> Callable[[Path], Path]:
    """A ``build`` that writes ``make(tmp_dir)`` to ``tmp_dir / name``."""

    def build(tmp_dir: Path) -> Path:
        p = Path(tmp_dir) / name
        p.write_bytes(make(Path(tmp_dir)))
        return p

    return build


CASES: list[Case] = []


def case(id: str, expect: str, make: Callable[[Path], bytes], name: str = "model.pt", **kw) -> None:
    CASES.append(Case(id=id, build=writer(name, make), expect=expect, **kw))


def payload_case(id: str, payload: Callable[[Path], Any], proto: int = 2, **kw) -> None:
    """A torch zip whose state dict holds a real tensor next to ``payload(tmp_dir)``."""

    def make(d: Path) -> bytes:
        obj = {"w": pk.tensor("0", 6, (2, 3)), "extra": payload(d)}
        return torch_zip(pk.dumps(obj, proto), {"0": W_BYTES})

    case(id, DANGEROUS, make, torch_loads=False, tags=frozenset({"payload"}), **kw)


# --- dangerous: code-execution payloads ------------------------------------------------------

payload_case("payload_builtins_exec", lambda d: Call(G("builtins", "exec"), (py_touch(d),)))
payload_case("payload_builtins_eval", lambda d: Call(G("builtins", "eval"), (py_touch(d),)))
payload_case("payload_os_system", lambda d: Call(G("os", "system"), (sh_touch(d),)))
payload_case("payload_posix_system", lambda d: Call(G("posix", "system"), (sh_touch(d),)))
payload_case("payload_subprocess_popen", lambda d: Call(G("subprocess", "Popen"), (argv_touch(d),)))
payload_case("payload_subprocess_call", lambda d: Call(G("subprocess", "call"), (argv_touch(d),)))
payload_case(
    "payload_subprocess_check_output",
    lambda d: Call(G("subprocess", "check_output"), (argv_touch(d),)),
)
payload_case(
    "payload_py2_commands_getoutput",
    lambda d: Call(G("commands", "getoutput"), (sh_touch(d),)),
    note="_compat_pickle maps commands -> subprocess for protocol < 3",
)
payload_case(
    "payload_py2_builtin_eval",
    lambda d: Call(G("__builtin__", "eval"), (py_touch(d),)),
    note="_compat_pickle maps __builtin__ -> builtins",
)
payload_case(
    "payload_getattr_import",
    lambda d: Call(
        Call(G("builtins", "getattr"), (Call(G("builtins", "__import__"), ("os",)), "system")),
        (sh_touch(d),),
    ),
)
payload_case(
    "payload_proto4_os_system",
    lambda d: Call(G("os", "system"), (sh_touch(d),)),
    proto=4,
)
payload_case(
    "payload_in_persistent_id",
    lambda d: PersId(("storage", Call(G("os", "system"), (sh_touch(d),)), "0", "cpu", 1)),
)
payload_case(
    "payload_nested_load_from_bytes",
    lambda d: Call(
        G("torch.storage", "_load_from_bytes"),
        (legacy_file(pk.dumps(Call(G("os", "system"), (sh_touch(d),)))),),
    ),
    note="the bytes argument is itself a legacy torch file whose main pickle is a payload",
)
payload_case(
    "payload_nested_load_from_bytes_bare_pickle",
    lambda d: Call(
        G("torch.storage", "_load_from_bytes"),
        (pk.dumps(Call(G("builtins", "exec"), (py_touch(d),)), 3),),
    ),
    proto=3,
    note="BINBYTES argument that is a bare payload pickle (torch.load runs its first pickle)",
)


def _stack_global_memo(d: Path) -> bytes:
    # protocol 4: "os" and "system" are memoized, fetched back with BINGET, then STACK_GLOBAL.
    body = b"".join(
        [
            pk.EMPTY_DICT,
            pk.MEMOIZE,  # memo 0: the dict
            pk.unicode("w"),
            pk.enc(pk.tensor("0", 6, (2, 3)), 4),
            pk.SETITEM,
            pk.unicode("os"),
            pk.MEMOIZE,  # memo 1
            pk.unicode("system"),
            pk.MEMOIZE,  # memo 2
            pk.POP,
            pk.POP,
            pk.unicode("extra"),
            pk.binget(1),
            pk.binget(2),
            pk.STACK_GLOBAL,
            pk.MEMOIZE,
            pk.unicode(sh_touch(d)),
            pk.TUPLE1,
            pk.REDUCE,
            pk.SETITEM,
            pk.STOP,
        ]
    )
    return torch_zip(pk.proto(4) + pk.frame(body), {"0": W_BYTES})


case(
    "payload_proto4_stack_global_memo",
    DANGEROUS,
    _stack_global_memo,
    torch_loads=False,
    tags=frozenset({"payload"}),
)


def _proto0(ops: Callable[[Path], bytes]) -> Callable[[Path], bytes]:
    # protocol 0 top-level dict {'extra': <payload>}; the tool must still see the global.
    return lambda d: torch_zip(b"(dp0\nS'extra'\np1\n" + ops(d) + b"s.")


case(
    "payload_proto0_global_reduce",
    DANGEROUS,
    _proto0(lambda d: pk.global_("os", "system") + b"(" + pk.string0(sh_touch(d)) + b"tR"),
    torch_loads=False,
    tags=frozenset({"payload"}),
)
case(
    "payload_proto0_inst",
    DANGEROUS,
    _proto0(lambda d: b"(" + pk.string0(sh_touch(d)) + pk.inst("os", "system")),
    torch_loads=False,
    tags=frozenset({"payload"}),
)
case(
    "payload_proto0_obj",
    DANGEROUS,
    _proto0(lambda d: b"(" + pk.global_("os", "system") + pk.string0(sh_touch(d)) + b"o"),
    torch_loads=False,
    tags=frozenset({"payload"}),
)


def _global_unused(d: Path) -> bytes:
    # names os.system but never calls it: GLOBAL then POP inside an ordinary state dict.
    body = (
        pk.EMPTY_DICT
        + pk.binunicode("w")
        + pk.enc(pk.tensor("0", 6, (2, 3)))
        + pk.global_("os", "system")
        + pk.POP
        + pk.SETITEM
        + pk.STOP
    )
    return torch_zip(pk.proto(2) + body, {"0": W_BYTES})


case(
    "payload_global_named_not_called",
    DANGEROUS,
    _global_unused,
    torch_loads=False,
    tags=frozenset({"payload"}),
    note="the contract says 'names dangerous globals'; naming alone is enough",
)


# legacy (pre-zip) format
def _legacy_payload(where: str) -> Callable[[Path], bytes]:
    def make(d: Path) -> bytes:
        evil = pk.dumps(Call(G("os", "system"), (sh_touch(d),)))
        main = pk.dumps({"w": pk.legacy_tensor("0", 6, (2, 3))})
        if where == "main":
            return legacy_file(pk.dumps({"extra": Call(G("os", "system"), (sh_touch(d),))}))
        if where == "magic":
            return legacy_file(main, [("0", 6, W_BYTES)], magic=evil)
        if where == "sys_info":
            return legacy_file(main, [("0", 6, W_BYTES)], sys_info=evil)
        if where == "keys":
            return legacy_file(main, [("0", 6, W_BYTES)], keys=evil)
        raise AssertionError(where)

    return make


for _where in ("main", "magic", "sys_info", "keys"):
    case(
        f"legacy_payload_in_{_where}",
        DANGEROUS,
        _legacy_payload(_where),
        torch_loads=False,
        tags=frozenset({"payload", "legacy"}),
    )


def _polyglot(d: Path) -> bytes:
    evil = legacy_file(pk.dumps({"extra": Call(G("os", "system"), (sh_touch(d),))}))
    return build_zip(torch_entries(pk.dumps(basic_obj()), basic_storages()), prefix=evil)


case(
    "polyglot_legacy_payload_then_benign_zip",
    DANGEROUS,
    _polyglot,
    torch_loads=False,
    tags=frozenset({"payload", "legacy"}),
    note="zipfile.is_zipfile() is True (EOCD at the end); torch decides by the first bytes",
)


def _torchscript(where: tuple[str, ...]) -> Callable[[Path], bytes]:
    def make(d: Path) -> bytes:
        evil = Call(G("os", "system"), (sh_touch(d),))
        net = NewObj(G("__torch__", "Net"), (), {"training": False, "w": pk.tensor("0", 6, (2, 3))})
        data = {"extra": evil, "net": net} if "data" in where else net
        consts = (evil,) if "constants" in where else ()
        r = "archive"
        entries = [
            ZEntry(f"{r}/data.pkl", pk.dumps(data)),
            ZEntry(f"{r}/code/__torch__.py", b"class Net(Module):\n  __parameters__ = []\n"),
            ZEntry(f"{r}/code/__torch__.py.debug_pkl", pk.dumps(())),
            ZEntry(f"{r}/constants.pkl", pk.dumps(consts)),
            ZEntry(f"{r}/version", b"3\n"),
            ZEntry(f"{r}/byteorder", b"little"),
            ZEntry(f"{r}/data/0", W_BYTES),
        ]
        return build_zip(entries)

    return make


case(
    "torchscript_payload_in_data_and_constants",
    DANGEROUS,
    _torchscript(("data", "constants")),
    torch_loads=False,
    tags=frozenset({"payload"}),
)
case(
    "torchscript_payload_only_in_constants",
    DANGEROUS,
    _torchscript(("constants",)),
    also_ok=(ERROR,),
    torch_loads=False,
    tags=frozenset({"payload"}),
    note="refusing TorchScript archives outright (exit 1) is also safe",
)

# --- import canary ---------------------------------------------------------------------------


def _canary(d: Path) -> bytes:
    net = NewObj(
        G(CANARY_MODULE, "Net"),
        (),
        {"training": True, "_parameters": ODict((("weight", pk.tensor("0", 6, (2, 3))),))},
    )
    return in_zip({"model": net}, storages={"0": W_BYTES})


case(
    "canary_module_like_object",
    OK,
    _canary,
    torch_loads=False,
    note=f"GLOBAL {CANARY_MODULE}.Net; the module writes the marker when imported",
)

# --- zip structure tricks --------------------------------------------------------------------


def _entries() -> list[ZEntry]:
    return torch_entries(pk.dumps(basic_obj()), basic_storages())


case(
    "zip_bad_crc_data_pkl",
    ERROR,
    lambda d: build_zip(patch(_entries(), "/data.pkl", crc=0xDEADBEEF)),
    also_ok=(OK,),
    note="torch ignores CRCs and loads it; refusing (1) or reading it like torch (0) are fine",
)


def _bad_crc_earlier(d: Path) -> bytes:
    # byteorder first (before data.pkl) with a wrong CRC
    es = patch(_entries(), "/byteorder", crc=0x12345678)
    return build_zip([es[3], *es[:3], *es[4:]])


case(
    "zip_bad_crc_byteorder_before_data_pkl",
    ERROR,
    _bad_crc_earlier,
    also_ok=(OK,),
    note="as zip_bad_crc_data_pkl, with the bad entry before data.pkl in the file",
)
case(
    "zip_local_name_differs_from_central",
    ERROR,
    lambda d: build_zip(patch(_entries(), "/data.pkl", local_name="archive/data.pkX")),
)


def _dupe(payload: bool) -> Callable[[Path], bytes]:
    def make(d: Path) -> bytes:
        es = _entries()
        second = (
            {"w": pk.tensor("0", 6, (2, 3)), "extra": Call(G("os", "system"), (sh_touch(d),))}
            if payload
            else {"w": pk.tensor("0", 6, (3, 2))}
        )
        return build_zip([*es, ZEntry("archive/data.pkl", pk.dumps(second))])

    return make


case("zip_duplicate_data_pkl", ERROR, _dupe(False))
case(
    "zip_duplicate_data_pkl_second_is_payload",
    ERROR,
    _dupe(True),
    also_ok=(DANGEROUS,),
    note="ambiguous archive; refusing (1) or flagging the payload (3) are both safe",
)


def _two_roots(d: Path) -> bytes:
    a = torch_entries(pk.dumps(basic_obj()), basic_storages(), root="a")
    b = torch_entries(pk.dumps({"w": pk.tensor("0", 6, (6,))}), {"0": W_BYTES}, root="b")
    return build_zip(a + b)


case("zip_two_roots", ERROR, _two_roots)


def _bad_crc_payload(d: Path) -> bytes:
    evil = {"w": pk.tensor("0", 6, (2, 3)), "extra": Call(G("os", "system"), (sh_touch(d),))}
    return build_zip(patch(_entries(), "/data.pkl", data=pk.dumps(evil), crc=0xDEADBEEF))


case(
    "zip_bad_crc_data_pkl_payload",
    DANGEROUS,
    _bad_crc_payload,
    also_ok=(ERROR,),
    torch_loads=False,
    tags=frozenset({"payload"}),
    note="torch ignores CRCs and would run it: report it (3) or refuse the file (1), never 0",
)
case(
    "zip_version_needed_148",
    ERROR,
    lambda d: build_zip(patch(_entries(), "/byteorder", version_needed=148)),
    note="zipfile raises NotImplementedError('zip file version 14.8'); found by run_fuzz.py",
)
case(
    "zip_compressed_size_4gib_stored",
    ERROR,
    lambda d: build_zip(patch(_entries(), "/byteorder", declared_csize=0xFFFF0000)),
    tags=frozenset({"bomb"}),
    note="6-byte STORED entry whose headers claim ~4 GiB compressed; found by run_fuzz.py",
)
case(
    "zip_local_header_offset_2pow63",
    ERROR,
    lambda d: build_zip(patch(_entries(), "/byteorder", declared_offset=2**63 + 5)),
    note="zip64 extra puts the local header at 2**63+5; found by run_fuzz.py (OverflowError)",
)
case(
    "zip_eocd_cd_offset_shifted",
    ERROR,
    lambda d: build_zip(_entries(), eocd_cd_shift=4096),
    note="zipfile turns this into negative header offsets (fuzz: OverflowError in os.pread)",
)
case(
    "zip64_eocd_cd_offset_shifted_2pow63",
    ERROR,
    lambda d: build_zip(_entries(), zip64_eocd_cd_shift=2**63 + 4096),
    note="header offsets below -2**63 after zipfile's correction; found by run_fuzz.py",
)
case(
    "zip_local_header_offset_past_eof",
    ERROR,
    lambda d: build_zip(patch(_entries(), "/data.pkl", declared_offset=1 << 20)),
)
case(
    "zip_compressed_size_4gib_deflated",
    ERROR,
    lambda d: build_zip(patch(_entries(), "/data.pkl", method=DEFLATED, declared_csize=0xFFFF0000)),
    tags=frozenset({"bomb"}),
)
case(
    "zip_encrypted_flag",
    ERROR,
    lambda d: build_zip(patch(_entries(), "/data.pkl", flags=0x1)),
)
case(
    "zip_prepended_junk",
    ERROR,
    lambda d: build_zip(_entries(), prefix=b"JUNK" * 16),
    note="zipfile opens it, torch (first-bytes check) does not: not a torch zip",
)
case(
    "zip_missing_data_pkl",
    ERROR,
    lambda d: build_zip([e for e in _entries() if not e.name.endswith("/data.pkl")]),
)
case("zip_empty_archive", ERROR, lambda d: build_zip([]))


def _bomb(target: str, real: int, declared: int) -> Callable[[Path], bytes]:
    def make(d: Path) -> bytes:
        stream = zipw.deflate_zeros(real)
        if target == "data.pkl":
            return build_zip(
                patch(
                    _entries(),
                    "/data.pkl",
                    method=DEFLATED,
                    raw=stream,
                    declared_size=declared,
                    crc=0,
                )
            )
        n = declared // 4  # the pickle agrees with the declared size
        obj = {"w": pk.tensor("0", n, (n,))}
        es = torch_entries(pk.dumps(obj), {"0": b""})
        es = patch(es, "/data/0", method=DEFLATED, raw=stream, declared_size=declared, crc=0)
        return build_zip(es)

    return make


case(
    "zip_bomb_data_pkl_declared_16gib",
    ERROR,
    _bomb("data.pkl", 2 * GIB, 16 * GIB),
    tags=frozenset({"bomb"}),
    note="~2 MiB file; deflate stream really inflates to 2 GiB; headers say 16 GiB (zip64)",
)
case(
    "zip_bomb_data_pkl_lying_small_size",
    ERROR,
    _bomb("data.pkl", 2 * GIB, 300),
    tags=frozenset({"bomb"}),
    note="declares 300 bytes but inflates to 2 GiB: must stop at the declared size",
)
case(
    "zip_bomb_storage_declared_16gib",
    ERROR,
    _bomb("data/0", 2 * GIB, 16 * GIB),
    tags=frozenset({"bomb"}),
    note="deflated storage record (torch never compresses them), 16 GiB declared",
)

# --- torch zip content errors ----------------------------------------------------------------


def _random_pkl(d: Path) -> bytes:
    import pickletools  # static disassembler only: never executes anything

    for seed in range(1000):
        blob = b"\x80\x02" + random.Random(seed).randbytes(256)
        try:
            for _ in pickletools.genops(blob):
                pass
        except Exception:
            return build_zip(patch(_entries(), "/data.pkl", data=blob))
    raise AssertionError("no invalid random pickle found")


case("zip_random_bytes_data_pkl", ERROR, _random_pkl)
case(
    "zip_storage_record_missing",
    ERROR,
    lambda d: build_zip([e for e in _entries() if not e.name.endswith("/data/1")]),
)
case(
    "zip_storage_record_short",
    ERROR,
    lambda d: build_zip(patch(_entries(), "/data/0", data=W_BYTES[:20])),
)
case(
    "zip_storage_record_oversized",
    ERROR,
    lambda d: build_zip(patch(_entries(), "/data/0", data=W_BYTES + b"\0" * 64)),
    note="pickle says 6 floats (24 bytes), record holds 88",
)
case(
    "zip_storage_numel_exceeds_record",
    ERROR,
    lambda d: in_zip({"w": pk.tensor("0", 2**40, (2**40,))}, storages={"0": W_BYTES}),
    note="CVE-2026-24747 style: numel 2**40 over a 24-byte record; must not allocate",
)
case(
    "zip_view_beyond_storage",
    ERROR,
    lambda d: in_zip({"w": pk.tensor("0", 6, (2, 3), offset=4)}, storages={"0": W_BYTES}),
    note="offset 4 + extent 6 > numel 6",
)
case(
    "zip_view_stride_beyond_storage",
    ERROR,
    lambda d: in_zip({"w": pk.tensor("0", 6, (2, 3), stride=(100, 1))}, storages={"0": W_BYTES}),
)
case(
    "zip_negative_size",
    ERROR,
    lambda d: in_zip({"w": pk.tensor("0", 6, (-2, -3), stride=(3, 1))}, storages={"0": W_BYTES}),
)
case(
    "zip_byteorder_middle",
    ERROR,
    lambda d: torch_zip(pk.dumps(basic_obj()), basic_storages(), byteorder=b"middle"),
)

# --- pickle resource bombs -------------------------------------------------------------------


def _bytearray8(d: Path) -> bytes:
    # ~42-byte pickle: {'w': BYTEARRAY8 <declares 6 GiB> ...} with the data absent
    body = pk.EMPTY_DICT + pk.unicode("w") + pk.bytearray8_header(6 * GIB) + b"\0" * 8
    return torch_zip(pk.proto(5) + body)


case(
    "pickle_bytearray8_declares_6gib",
    ERROR,
    _bytearray8,
    tags=frozenset({"bomb"}),
    note="the pickle is ~30 bytes; must not allocate 6 GiB",
)
case(
    "pickle_bytearray8_huge_after_storage_persid",
    ERROR,
    lambda d: torch_zip(
        pk.proto(2)
        + pk.enc(PersId(("storage", G("torch", "FloatStorage"), "0", "cpu", 6)))
        + pk.bytearray8_header(2**40),
        {"0": W_BYTES},
    ),
    tags=frozenset({"bomb"}),
    note="found by run_fuzz.py: CPython prints 'SystemError: deallocated bytearray object has"
    " exported buffers' (a 2nd stderr line) when this follows a resolved storage id",
)
case(
    "pickle_bytearray_reduce_6gib",
    ERROR,
    lambda d: in_zip({"w": Call(G("builtins", "bytearray"), (6 * GIB,))}),
    also_ok=(OK, DANGEROUS),
    tags=frozenset({"bomb"}),
    note="builtins.bytearray(6 GiB): never call it; reporting it as an opaque call is fine",
)
case(
    "pickle_long4_declares_2gib",
    ERROR,
    lambda d: torch_zip(pk.proto(2) + b"\x8b" + struct.pack("<I", 2**31 - 1) + b"\0" * 8),
    tags=frozenset({"bomb"}),
)
case(
    "pickle_binunicode8_declares_8gib",
    ERROR,
    lambda d: torch_zip(pk.proto(4) + b"\x8d" + struct.pack("<Q", 8 * GIB) + b"abc."),
    tags=frozenset({"bomb"}),
)
case(
    "pickle_binget_missing_memo",
    ERROR,
    lambda d: torch_zip(pk.proto(2) + pk.EMPTY_DICT + pk.POP + pk.binget(7) + pk.STOP),
)
case(
    "pickle_stack_underflow",
    ERROR,
    lambda d: torch_zip(pk.proto(2) + pk.SETITEM + pk.STOP),
)
case("pickle_empty_data_pkl", ERROR, lambda d: torch_zip(b""))


def _dag_bomb(d: Path) -> bytes:
    # L0 = []; L(i+1) = [L(i), L(i)] (memo refs), 100 levels: 2**100 paths, ~1 KiB of pickle
    ops = [pk.proto(2), pk.EMPTY_DICT, pk.binunicode("w"), pk.EMPTY_LIST, pk.binput(0)]
    for i in range(1, 101):
        ops += [pk.POP, pk.EMPTY_LIST, pk.MARK, pk.binget(i - 1), pk.binget(i - 1)]
        ops += [pk.APPENDS, pk.binput(i)]
    ops += [pk.SETITEM, pk.STOP]
    return torch_zip(b"".join(ops))


case(
    "pickle_shared_reference_dag_bomb",
    ERROR,
    _dag_bomb,
    also_ok=(OK,),
    tags=frozenset({"bomb"}),
    note="fine if it reports without walking every path (bounded output and time)",
)


def _deep(kind: str, depth: int = 200_000) -> Callable[[Path], bytes]:
    def make(d: Path) -> bytes:
        if kind == "list":
            body = pk.EMPTY_LIST * depth + pk.APPEND * (depth - 1)
        else:
            key = pk.binunicode("a")
            body = pk.EMPTY_DICT + (key + pk.EMPTY_DICT) * (depth - 1) + pk.SETITEM * (depth - 1)
        obj = pk.EMPTY_DICT + pk.binunicode("w") + body + pk.SETITEM
        return torch_zip(pk.proto(2) + obj + pk.STOP)

    return make


for _kind in ("list", "dict"):
    case(
        f"pickle_200k_deep_{_kind}s",
        ERROR,
        _deep(_kind),
        also_ok=(OK,),
        tags=frozenset({"bomb"}),
        note="no RecursionError traceback; a depth limit (exit 1) or bounded output (0)",
    )

# --- truncations -----------------------------------------------------------------------------


def _truncation_offsets(n: int, interesting: list[int]) -> list[int]:
    offs = {1, 2, 3, 4, 8, 16, 29, 30, 31, 63, 64, 65, 100, n // 4, n // 2, 3 * n // 4}
    offs |= {n - 1, n - 2, n - 21, n - 22, n - 23}
    offs |= set(interesting)
    return sorted(o for o in offs if 0 < o < n)


def _zip_interesting() -> list[int]:
    data = basic_zip()
    cd = data.rfind(b"PK\x01\x02", 0, data.rfind(b"PK\x05\x06"))
    first_cd = data.find(b"PK\x01\x02")
    starts = [i for i in range(len(data)) if data.startswith(b"PK\x03\x04", i)]
    return [first_cd - 1, first_cd, first_cd + 1, cd, *starts[1:4]]


def _legacy_interesting() -> list[int]:
    import pickletools

    data, pos, ends = basic_legacy(), 0, []
    for _ in range(5):  # end offset of each of the five pickles (static parse)
        for _op, _arg, p in pickletools.genops(data[pos:]):
            last = p
        pos += last + 1
        ends.append(pos)
    return [e + k for e in ends for k in (-1, 0, 1)] + [ends[-1] + 8]


def _truncated(base: Callable[[], bytes], n: int) -> Callable[[Path], bytes]:
    return lambda d: base()[:n]


for _off in _truncation_offsets(len(basic_zip()), _zip_interesting()):
    case(f"trunc_zip_at_{_off}", ERROR, _truncated(basic_zip, _off), tags=frozenset({"trunc"}))
for _off in _truncation_offsets(len(basic_legacy()), _legacy_interesting()):
    case(
        f"trunc_legacy_at_{_off}",
        ERROR,
        _truncated(basic_legacy, _off),
        tags=frozenset({"trunc", "legacy"}),
    )

# --- safetensors -----------------------------------------------------------------------------


def st(header: Any = None, data: bytes = ST_DATA, **kw) -> Callable[[Path], bytes]:
    return lambda d: safetensors_file(st_basic_header() if header is None else header, data, **kw)


def st_case(id: str, expect: str, make: Callable[[Path], bytes], **kw) -> None:
    case(id, expect, make, name="model.safetensors", tags=frozenset({"safetensors"}), **kw)


def _hdr(**tensors: dict) -> dict:
    h = st_basic_header()
    h.update(tensors)
    return h


st_case("st_ok_basic", OK, st(), values=BASIC_VALUES, torch_loads=True)
st_case("st_header_len_2pow63", ERROR, lambda d: struct.pack("<Q", 2**63) + b'{"a":1}' + ST_DATA)
st_case(
    "st_header_len_larger_than_file",
    ERROR,
    lambda d: struct.pack("<Q", 10_000) + json.dumps(st_basic_header()).encode() + ST_DATA,
)
st_case("st_file_shorter_than_length_field", ERROR, lambda d: b"\x05\x00\x00")
st_case(
    "st_header_len_cuts_json",
    ERROR,
    lambda d: struct.pack("<Q", 20) + json.dumps(st_basic_header()).encode() + ST_DATA,
)
st_case("st_header_zero_length", ERROR, lambda d: struct.pack("<Q", 0) + ST_DATA)
st_case("st_header_not_json", ERROR, st(raw_header=b"this is not json at all!"))
st_case(
    "st_header_not_utf8",
    ERROR,
    st(
        raw_header=b'{"w\xff\xfe": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}',
        data=W_BYTES,
    ),
)
st_case("st_header_json_array", ERROR, st(raw_header=b"[1, 2, 3]"))
st_case(
    "st_duplicate_keys",
    ERROR,
    st(
        raw_header=b'{"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},'
        b' "w": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]}}'
    ),
)
st_case(
    "st_metadata_non_string_values",
    ERROR,
    st(_hdr(__metadata__={"format": "pt", "epoch": 3, "nested": {"a": [1]}})),
)
st_case(
    "st_overlapping_offsets",
    ERROR,
    st(_hdr(b={"dtype": "F32", "shape": [3], "data_offsets": [12, 24]}), data=W_BYTES),
)
st_case(
    "st_negative_offsets",
    ERROR,
    st(_hdr(b={"dtype": "F32", "shape": [3], "data_offsets": [-12, 0]})),
)
st_case(
    "st_gap_between_offsets",
    ERROR,
    st(_hdr(b={"dtype": "F32", "shape": [3], "data_offsets": [28, 40]}), data=ST_DATA + b"\0" * 4),
)
st_case(
    "st_shape_dtype_mismatch",
    ERROR,
    st(_hdr(b={"dtype": "F32", "shape": [4], "data_offsets": [24, 36]})),
)
st_case(
    "st_shape_overflow",
    ERROR,
    st(_hdr(b={"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [24, 36]})),
)
st_case(
    "st_shape_u64_overflow",
    ERROR,
    st(_hdr(b={"dtype": "F32", "shape": [2**64 + 3], "data_offsets": [24, 36]})),
)
st_case(
    "st_unknown_dtype",
    ERROR,
    st(_hdr(b={"dtype": "F128", "shape": [3], "data_offsets": [24, 36]})),
)
st_case(
    "st_dtype_not_a_string",
    ERROR,
    st(_hdr(b={"dtype": ["F32"], "shape": [3], "data_offsets": [24, 36]})),
    note="found by run_fuzz.py (TypeError: unhashable type: 'list')",
)
st_case(
    "st_entry_not_an_object",
    ERROR,
    st(_hdr(b=[1, 2, 3])),
)
st_case(
    "st_shape_not_a_list",
    ERROR,
    st(_hdr(b={"dtype": "F32", "shape": {"0": 3}, "data_offsets": [24, 36]})),
)
st_case(
    "st_offsets_wrong_arity",
    ERROR,
    st(_hdr(b={"dtype": "F32", "shape": [3], "data_offsets": [24, 36, 48]})),
)
st_case("st_trailing_data", ERROR, st(data=ST_DATA + b"TRAILING"))
st_case("st_truncated_data", ERROR, st(data=ST_DATA[:30]))
st_case(
    "st_escape_sequence_keys",
    OK,
    st(
        {
            "\x1b[31mred": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "\x1b]0;pwned-title\x07b": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]},
        }
    ),
    forbid_in_output=("\x1b", "\x07"),
    torch_loads=True,
)


def _index(weight_map: dict[str, str], shards: dict[str, bytes]) -> Callable[[Path], Path]:
    def build(tmp_dir: Path) -> Path:
        folder = Path(tmp_dir) / "model"
        folder.mkdir()
        for rel, data in shards.items():
            p = (folder / rel).resolve()
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        idx = folder / "model.safetensors.index.json"
        idx.write_text(json.dumps({"metadata": {"total_size": 36}, "weight_map": weight_map}))
        return idx

    return build


_W_ONLY = safetensors_file(
    {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, W_BYTES
)
_B_ONLY = safetensors_file(
    {"b": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}, f32(0.5, -1.5, 2.25)
)
CASES.append(
    Case(
        "index_ok_two_shards",
        _index(
            {"w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
            {
                "model-00001-of-00002.safetensors": _W_ONLY,
                "model-00002-of-00002.safetensors": _B_ONLY,
            },
        ),
        OK,
        values=BASIC_VALUES,
        tags=frozenset({"safetensors", "index"}),
    )
)
CASES.append(
    Case(
        "index_missing_shard",
        _index(
            {"w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
            {"model-00001-of-00002.safetensors": _W_ONLY},
        ),
        ERROR,
        tags=frozenset({"safetensors", "index"}),
    )
)
CASES.append(
    Case(
        "index_weight_map_outside_folder",
        _index(
            {"w": "model-00001-of-00002.safetensors", "b": "../x.safetensors"},
            {"model-00001-of-00002.safetensors": _W_ONLY, "../x.safetensors": _B_ONLY},
        ),
        ERROR,
        tags=frozenset({"safetensors", "index"}),
        note="../x.safetensors exists and is valid: refuse the traversal, not a missing file",
    )
)
CASES.append(
    Case(
        "index_weight_map_absolute_path",
        _index(
            {"w": "model-00001-of-00002.safetensors", "b": "/etc/passwd"},
            {"model-00001-of-00002.safetensors": _W_ONLY},
        ),
        ERROR,
        tags=frozenset({"safetensors", "index"}),
    )
)

# --- not checkpoints / odd filesystem objects ------------------------------------------------

case("empty_file", ERROR, lambda d: b"")
case("one_byte_file", ERROR, lambda d: b"\x80")
case("text_file", ERROR, lambda d: b"hello, this is a README, not weights\n" * 3)
case(
    "html_file",
    ERROR,
    lambda d: b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>\n",
    note="what a failed wget of a model URL gives you",
)
case("png_header", ERROR, lambda d: b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + b"\0" * 17)
case(
    "git_lfs_pointer",
    ERROR,
    lambda d: (
        b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"4d7a" * 16 + b"\nsize 123\n"
    ),
    name="pytorch_model.bin",
    stderr_contains=("git lfs pull",),
)
case(
    "gzip_file",
    ERROR,
    lambda d: bytes.fromhex("1f8b0800000000000003") + b"\x03\x00" + b"\0" * 8,
    name="model.pt.gz",
)


def _dir(tmp_dir: Path) -> Path:
    p = Path(tmp_dir) / "model.pt"
    p.mkdir()
    return p


def _fifo(tmp_dir: Path) -> Path:
    p = Path(tmp_dir) / "model.pt"
    os.mkfifo(p)
    return p


def _symlink_loop(tmp_dir: Path) -> Path:
    a, b = Path(tmp_dir) / "model.pt", Path(tmp_dir) / "other.pt"
    a.symlink_to(b.name)
    b.symlink_to(a.name)
    return a


def _dangling_symlink(tmp_dir: Path) -> Path:
    a = Path(tmp_dir) / "model.pt"
    a.symlink_to("does-not-exist.pt")
    return a


def _unreadable(tmp_dir: Path) -> Path:
    p = Path(tmp_dir) / "model.pt"
    p.write_bytes(basic_zip())
    p.chmod(0)
    return p


def _control_name(tmp_dir: Path) -> Path:
    p = Path(tmp_dir) / "evil\n\x1b[2Jname\r.pt"
    p.write_bytes(b"garbage")
    return p


CASES.append(Case("directory", _dir, ERROR, note="an empty directory named model.pt"))
CASES.append(Case("fifo", _fifo, ERROR, note="must not block opening it"))
CASES.append(Case("symlink_loop", _symlink_loop, ERROR))
CASES.append(Case("dangling_symlink", _dangling_symlink, ERROR))
CASES.append(Case("nonexistent_file", lambda d: Path(d) / "nope.pt", ERROR))
CASES.append(
    Case(
        "unreadable_file",
        _unreadable,
        ERROR,
        drop_dac=True,
        note="chmod 000; root reads anyway, so the tool runs without CAP_DAC_OVERRIDE",
    )
)
CASES.append(
    Case(
        "filename_with_control_chars",
        _control_name,
        ERROR,
        check_name=False,
        forbid_in_output=("\x1b",),
        note="the one stderr line must escape the newline/ESC/CR in the name",
    )
)

# --- safe but odd: must inspect fine ---------------------------------------------------------

case("ok_basic_zip", OK, lambda d: basic_zip(), values=BASIC_VALUES, torch_loads=True)
case(
    "ok_basic_legacy",
    OK,
    lambda d: basic_legacy(),
    values={"w": W_VALUES},
    torch_loads=True,
    tags=frozenset({"legacy"}),
)
case(
    "ok_empty_state_dict",
    OK,
    lambda d: in_zip({}),
    values={},
    torch_loads=True,
)


def _proto4(d: Path) -> bytes:
    # protocol 4 with FRAME, SHORT_BINUNICODE, STACK_GLOBAL and MEMOIZE/BINGET reuse
    rebuild = pk.unicode("torch._utils") + pk.unicode("_rebuild_tensor_v2") + pk.STACK_GLOBAL
    fstor = pk.unicode("torch") + pk.unicode("FloatStorage") + pk.STACK_GLOBAL
    odict = pk.unicode("collections") + pk.unicode("OrderedDict") + pk.STACK_GLOBAL
    body = b"".join(
        [
            pk.EMPTY_DICT,
            pk.MEMOIZE,  # 0
            pk.MARK,
            pk.unicode("w"),
            rebuild,
            pk.MEMOIZE,  # 1
            pk.MARK,  # args of _rebuild_tensor_v2
            pk.MARK,  # the persistent id tuple
            pk.unicode("storage"),
            pk.MEMOIZE,  # 2
            fstor,
            pk.MEMOIZE,  # 3
            pk.unicode("0"),
            pk.unicode("cpu"),
            pk.MEMOIZE,  # 4
            pk.integer(6),
            pk.TUPLE,
            pk.BINPERSID,
            pk.integer(0),
            pk.enc((2, 3), 4),
            pk.enc((3, 1), 4),
            pk.NEWFALSE,
            odict,
            pk.MEMOIZE,  # 5
            pk.EMPTY_TUPLE,
            pk.REDUCE,
            pk.TUPLE,
            pk.REDUCE,
            pk.unicode("b"),
            pk.binget(1),
            pk.MARK,
            pk.MARK,
            pk.binget(2),
            pk.binget(3),
            pk.unicode("1"),
            pk.binget(4),
            pk.integer(3),
            pk.TUPLE,
            pk.BINPERSID,
            pk.integer(0),
            pk.enc((3,), 4),
            pk.enc((1,), 4),
            pk.NEWFALSE,
            pk.binget(5),
            pk.EMPTY_TUPLE,
            pk.REDUCE,
            pk.TUPLE,
            pk.REDUCE,
            pk.SETITEMS,
            pk.STOP,
        ]
    )
    return torch_zip(pk.proto(4) + pk.frame(body), basic_storages())


case("ok_protocol4_memoized", OK, _proto4, values=BASIC_VALUES, torch_loads=True)
case(
    "ok_protocol5_plain",
    OK,
    lambda d: in_zip(basic_obj(), proto=5, storages=basic_storages()),
    values=BASIC_VALUES,
    torch_loads=True,
)


def _module_like(d: Path) -> bytes:
    param = Call(
        G("torch._utils", "_rebuild_parameter"), (pk.tensor("0", 6, (2, 3)), True, ODict())
    )
    sub = NewObj(
        G("mymodel", "Head"),
        (),
        {"training": True, "_parameters": ODict((("bias", pk.tensor("1", 3, (3,))),))},
    )
    state = {
        "training": True,
        "_parameters": ODict((("weight", param),)),
        "_buffers": ODict(),
        "_modules": ODict((("head", sub),)),
        "_forward_hooks": ODict(),
    }
    return in_zip(NewObj(G("mymodel", "Net"), (), state), storages=basic_storages())


case(
    "ok_pickled_module_object",
    OK,
    _module_like,
    torch_loads=False,
    note="torch.save(model) of a user class: GLOBAL mymodel.Net + NEWOBJ + BUILD",
)
case(
    "ok_argparse_namespace",
    OK,
    lambda d: in_zip(
        {
            "args": NewObj(G("argparse", "Namespace"), (), {"lr": 0.1, "name": "run1"}),
            "model": basic_obj(),
            "epoch": 7,
        },
        storages=basic_storages(),
    ),
    torch_loads=False,
)


def _np_array(module: str) -> Build:
    data = struct.pack("<3d", 1.0, 2.0, 3.0)
    dtype = pk.np_dtype("f8")
    arr = Call(G(module, "_reconstruct"), (G("numpy", "ndarray"), (0,), b"b"))
    return Build(arr, (1, (3,), dtype, False, data))


case(
    "ok_numpy1_names",
    OK,
    lambda d: in_zip(
        {"model": basic_obj(), "rng": _np_array("numpy.core.multiarray")},
        storages=basic_storages(),
    ),
    torch_loads=False,
    note="numpy 1.x wrote numpy.core.multiarray._reconstruct",
)
case(
    "ok_numpy2_names",
    OK,
    lambda d: in_zip(
        {
            "model": basic_obj(),
            "best_acc": Call(
                G("numpy._core.multiarray", "scalar"),
                (pk.np_dtype("f8"), struct.pack("<d", 0.875)),
            ),
            "rng": _np_array("numpy._core.multiarray"),
        },
        storages=basic_storages(),
    ),
    torch_loads=False,
)
case(
    "ok_int_keyed_dict",
    OK,
    lambda d: in_zip(
        {
            "state": {0: {"step": 3, "exp_avg": pk.tensor("0", 6, (2, 3))}, 1: {"step": 3}},
            "param_groups": [{"lr": 0.01, "params": [0, 1]}],
        },
        storages={"0": W_BYTES},
    ),
    torch_loads=True,
)
case(
    "ok_tensor_with_python_attrs",
    OK,
    lambda d: in_zip(
        {
            "w": Call(
                G("torch._tensor", "_rebuild_from_type_v2"),
                (
                    G("torch._utils", "_rebuild_tensor_v2"),
                    G("torch", "Tensor"),
                    (
                        PersId(("storage", G("torch", "FloatStorage"), "0", "cpu", 6)),
                        0,
                        (2, 3),
                        (3, 1),
                        False,
                        ODict(),
                    ),
                    {"quant_scale": 0.5, "tag": "calibrated"},
                ),
            )
        },
        storages={"0": W_BYTES},
    ),
    values={"w": W_VALUES},
    torch_loads=True,
)
case(
    "ok_shared_storage_views",
    OK,
    lambda d: in_zip(
        {
            "w": pk.tensor("0", 6, (2, 3)),
            "row1": pk.tensor("0", 6, (3,), offset=3),
            "col0": pk.tensor("0", 6, (2,), stride=(3,)),
            "wT": pk.tensor("0", 6, (3, 2), stride=(1, 3)),
        },
        storages={"0": W_BYTES},
    ),
    values={
        "w": W_VALUES,
        "row1": [3.0, 4.0, 5.0],
        "col0": [0.0, 3.0],
        "wT": [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]],
    },
    torch_loads=True,
)
case(
    "ok_big_endian_byteorder",
    OK,
    lambda d: torch_zip(
        pk.dumps(basic_obj()),
        {"0": struct.pack(">6f", 0, 1, 2, 3, 4, 5), "1": struct.pack(">3f", 0.5, -1.5, 2.25)},
        byteorder=b"big",
    ),
    values=BASIC_VALUES,
    torch_loads=True,
    note="storages really are big-endian; values must come out right",
)
case(
    "ok_no_byteorder_entry",
    OK,
    lambda d: torch_zip(pk.dumps(basic_obj()), basic_storages(), byteorder=None),
    values=BASIC_VALUES,
    torch_loads=True,
    note="torch < 1.10 wrote no byteorder record; little-endian is implied",
)
case(
    "ok_escape_sequence_keys",
    OK,
    lambda d: in_zip(
        {
            "\x1b[31mred": pk.tensor("0", 6, (2, 3)),
            "\x1b]0;pwned-title\x07tail": pk.tensor("1", 3, (3,)),
            "carriage\rreturn": pk.tensor("1", 3, (3,)),
        },
        storages=basic_storages(),
    ),
    forbid_in_output=("\x1b", "\x07", "\r"),
    torch_loads=True,
)
case(
    "ok_mixed_dtypes",
    OK,
    lambda d: in_zip(
        {
            "h": pk.tensor("0", 2, (2,), dtype="float16"),
            "bf": pk.tensor("1", 2, (2,), dtype="bfloat16"),
            "i": pk.tensor("2", 2, (2,), dtype="int64"),
            "m": pk.tensor("3", 3, (3,), dtype="bool"),
        },
        storages={
            "0": struct.pack("<2e", 1.5, -2.0),
            "1": bytes.fromhex("c03f0040"),  # bf16 1.5, 2.0
            "2": struct.pack("<2q", -(2**40), 7),
            "3": b"\x01\x00\x01",
        },
    ),
    values={"h": [1.5, -2.0], "bf": [1.5, 2.0], "i": [-(2**40), 7], "m": [True, False, True]},
    torch_loads=True,
)


def _torch_save(d: Path) -> bytes:
    import torch  # only the test process; the tool under test must not need it

    p = Path(d) / ".torch_save_tmp.pt"
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    torch.save({"w": t, "b": torch.tensor([0.5, -1.5, 2.25])}, p)
    data = p.read_bytes()
    p.unlink()
    return data


case(
    "ok_real_torch_save",
    OK,
    _torch_save,
    values=BASIC_VALUES,
    torch_loads=True,
    tags=frozenset({"needs_torch"}),
)


def by_id() -> dict[str, Case]:
    out: dict[str, Case] = {}
    for c in CASES:
        assert c.id not in out, f"duplicate case id {c.id}"
        assert c.expect in EXIT_CODES and all(a in EXIT_CODES for a in c.also_ok), c.id
        out[c.id] = c
    return out


CASES_BY_ID = by_id()
