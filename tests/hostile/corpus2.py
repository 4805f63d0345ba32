"""Hostile corpus, round 2 (issue 10): every file here can run code when ``torch.load``
(``weights_only=False``) or ``pickle.load`` reads it, so ``inspect``, ``convert`` and ``scan``
must all exit 3 and write nothing.

Families, one per class of the issue:

* ``callable``: callables a denylist does not know, each called through REDUCE (class 1);
* ``dotted``: attribute paths resolved by protocol-4 ``find_class`` (class 2);
* ``wrapper``: every way a pickle reaches the loader: raw pickles, protocol 0/1, no PROTO,
  every pickle of a legacy file, decoys, call chains, hex ints, mutations, tar (class 3);
* ``parse``: torch's reading differs from a naive one: member names, local headers, frames,
  central directories (class 4).

Built from bytes with ``pk`` and ``zipw``; payloads only ever touch the marker file.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import pk
from .corpus import LEGACY_MAGIC, W_BYTES, legacy_file, py_touch, sh_touch
from .pk import Build, Call, G, NewObj
from .zipw import ZEntry, build_zip, patch, torch_entries, torch_zip


@dataclass(frozen=True)
class Case2:
    id: str
    family: str
    build: Callable[[Path], Path]
    note: str = ""


CASES2: list[Case2] = []


def _case(id: str, family: str, make: Callable[[Path], bytes], name: str = "model.pt") -> None:
    def build(d: Path) -> Path:
        p = Path(d) / name
        p.write_bytes(make(Path(d)))
        return p

    CASES2.append(Case2(id, family, build))


def _state(extra: Any) -> dict[str, Any]:
    return {"w": pk.tensor("0", 6, (2, 3)), "extra": extra}


def _zip_state(extra: Any) -> bytes:
    return torch_zip(pk.dumps(_state(extra)), {"0": W_BYTES})


def _zip_of(payload: Callable[[Path], Any], proto: int = 2) -> Callable[[Path], bytes]:
    return lambda d: torch_zip(pk.dumps(_state(payload(d)), proto), {"0": W_BYTES})


# --- class 1: callables a denylist does not know ---------------------------------------------
_CALLABLES: dict[str, tuple[str, str, Callable[[Path], tuple[Any, ...]]]] = {
    "pydoc_pipepager": ("pydoc", "pipepager", lambda d: ("x", sh_touch(d))),
    "uuid_get_command_stdout": ("uuid", "_get_command_stdout", lambda d: ("touch", str(d))),
    "osx_support_read_output": ("_osx_support", "_read_output", lambda d: (sh_touch(d),)),
    "imaplib_imap4_stream": ("imaplib", "IMAP4_stream", lambda d: (sh_touch(d),)),
    "torch_collect_env_run": ("torch.utils.collect_env", "run", lambda d: (sh_touch(d),)),
    "torch_inductor_run_compile_cmd": (
        "torch._inductor.cpp_builder",
        "run_compile_cmd",
        lambda d: (sh_touch(d), str(d)),
    ),
    "torch_fx_exec_with_source": (
        "torch.fx.graph_module",
        "_exec_with_source",
        lambda d: (py_touch(d), {}),
    ),
    "idlelib_get_entity": ("idlelib.calltip", "get_entity", lambda d: (py_touch(d),)),
    "doctest_debug_script": ("doctest", "debug_script", lambda d: (py_touch(d),)),
    "numpy_f2py_getlincoef": (
        "numpy.f2py.crackfortran",
        "getlincoef",
        lambda d: (py_touch(d), {}),
    ),
    "xxsubinterpreters_run_string": (
        "_xxsubinterpreters",
        "run_string",
        lambda d: (0, py_touch(d)),
    ),
    "ensurepip_run_pip": ("ensurepip", "_run_pip", lambda d: (["--version"],)),
    "test_script_helper": (
        "test.support.script_helper",
        "assert_python_ok",
        lambda d: ("-c", py_touch(d)),
    ),
    "torch_datapipes_basichandlers": (
        "torch.utils.data.datapipes.utils.decoder",
        "basichandlers",
        lambda d: ("pickle", b"cos\nsystem\n(S'true'\ntR."),
    ),
    "torch_dynamo_config_load_config": ("torch._dynamo.config", "load_config", lambda d: (b"",)),
    "venv_create": ("venv", "create", lambda d: (str(d / "venv"),)),
    "logging_filehandler": ("logging", "FileHandler", lambda d: (str(d / "PWNED"),)),
    "logging_config_dictconfig": ("logging.config", "dictConfig", lambda d: ({"version": 1},)),
    "frozen_importlib_call": (
        "_frozen_importlib",
        "_call_with_frames_removed",
        lambda d: (G("builtins", "exec"), py_touch(d)),
    ),
    "cpp_extension_load_inline": (
        "torch.utils.cpp_extension",
        "load_inline",
        lambda d: ("x", "int x;"),
    ),
    "linecache_getline": ("linecache", "getline", lambda d: ("/etc/passwd", 1)),
    "thirdparty_function": ("somepackage.tasks", "run_everything", lambda d: (sh_touch(d),)),
    "thirdparty_class_with_code": (
        "somepackage.jobs",
        "Job",
        lambda d: ({"cmd": sh_touch(d)},),
    ),
    "torch_unlisted_function": ("torch.serialization", "load", lambda d: (str(d / "x.pt"),)),
}
for _id, (_m, _n, _args) in _CALLABLES.items():
    _case(
        f"c1_{_id}",
        "callable",
        _zip_of(lambda d, m=_m, n=_n, a=_args: Call(G(m, n), a(d))),
    )

_CHAINS: dict[str, Callable[[Path], Any]] = {
    "functools_partial": lambda d: Call(
        Call(G("functools", "partial"), (G("os", "system"), sh_touch(d))), ()
    ),
    "operator_attrgetter": lambda d: Call(
        Call(G("_operator", "attrgetter"), ("system",)), (G("os", "path"),)
    ),
    "operator_methodcaller": lambda d: Call(
        Call(G("_operator", "methodcaller"), ("system", sh_touch(d))),
        (Call(G("importlib", "import_module"), ("os",)),),
    ),
    "pydoc_locate": lambda d: Call(Call(G("pydoc", "locate"), ("os.system",)), (sh_touch(d),)),
    "pkgutil_resolve_name": lambda d: Call(
        Call(G("pkgutil", "resolve_name"), ("os:system",)), (sh_touch(d),)
    ),
    "defaultdict_factory_is_a_function": lambda d: Call(
        G("collections", "defaultdict"), (G("somepackage.tasks", "cleanup"),)
    ),
    "rebuild_from_type_calls_func": lambda d: Call(
        G("torch._tensor", "_rebuild_from_type_v2"),
        (G("somepackage.tasks", "run_everything"), G("torch", "Tensor"), (sh_touch(d),), {}),
    ),
}
for _id, _make in _CHAINS.items():
    _case(f"c1_{_id}", "callable", _zip_of(lambda d, mk=_make: mk(d)))

# --- class 2: dotted names resolved attribute by attribute (protocol >= 4) -------------------
_DOTTED = [
    ("builtins", "eval.__call__"),
    ("builtins", "eval.__self__.exec"),
    ("argparse", "_os.system"),
    ("logging", "os.system"),
    ("torch", "os.system"),
    ("torch.serialization", "pickle.loads"),
    ("numpy.lib._datasource", "os.system"),
    ("torch.fx.experimental.symbolic_shapes", "ShapeEnv.evaluate_guards_expression"),
    ("typing", "ForwardRef._evaluate"),
    ("idlelib.calltip", "Calltip.fetch_tip"),
    ("idlelib.run", "Executive.runcode"),
    ("idlelib.debugobj", "ObjectTreeItem.SetText"),
    ("torch.utils._config_module", "ConfigModule.load_config"),
    ("torch._ops", "ops.load_library"),
]
for _m, _n in _DOTTED:
    _id = f"c2_{_m}_{_n}".replace(".", "_").replace("__", "_")
    _case(_id, "dotted", _zip_of(lambda d, m=_m, n=_n: Call(G(m, n), (sh_touch(d),)), proto=4))
_case(
    "c2_dotted_name_only_referenced",
    "dotted",
    _zip_of(lambda d: G("argparse", "_os.system"), proto=4),
)


# --- class 3: every pickle the loader runs, whatever the wrapper ------------------------------
def _os_system(d: Path) -> Call:
    return Call(G("os", "system"), (sh_touch(d),))


_case("c3_raw_pickle_proto2", "wrapper", lambda d: pk.dumps(_os_system(d)), "model.pkl")
_case(
    "c3_raw_pickle_proto4_runpy",
    "wrapper",
    lambda d: pk.dumps(Call(G("runpy", "_run_code"), (py_touch(d), {})), 4),
    "weights.bin",
)
_case(
    "c3_protocol0_text_pickle_named_txt",
    "wrapper",
    lambda d: pk.global_("os", "system") + b"(" + pk.string0(sh_touch(d)) + b"tR.",
    "README.txt",
)
_case(
    "c3_protocol1_no_proto_in_zip",
    "wrapper",
    lambda d: torch_zip(pk.enc(_state(_os_system(d)), 1) + pk.STOP, {"0": W_BYTES}),
)
_case(
    "c3_proto_less_raw_binary",
    "wrapper",
    lambda d: pk.enc(_os_system(d), 2) + pk.STOP,
    "model.ckpt",
)
_case(
    "c3_legacy_payload_in_protocol_pickle",
    "wrapper",
    lambda d: legacy_file(pk.dumps({}), protocol=pk.dumps(_os_system(d))),
)
_case(
    "c3_legacy_payload_in_main_after_benign",
    "wrapper",
    lambda d: legacy_file(pk.dumps({"ok": 1, "extra": _os_system(d)})),
)
_case(
    "c3_legacy_magic_ok_payload_in_keys_proto0",
    "wrapper",
    lambda d: legacy_file(
        pk.dumps({}), keys=pk.global_("os", "system") + b"(" + pk.string0(sh_touch(d)) + b"tR."
    ),
)
_DECOYS: dict[str, Any] = {
    "complex_string": Call(G("builtins", "complex"), ("1j",)),
    "set_of_string": Call(G("builtins", "set"), ("ab",)),
    "codecs_encode_odd": Call(G("_codecs", "encode"), (b"x", "rot13")),
    "bytearray_odd": Call(G("builtins", "bytearray"), ((1, 2),)),
}
for _id, _decoy in _DECOYS.items():
    _case(
        f"c3_decoy_{_id}_before_payload",
        "wrapper",
        lambda d, dec=_decoy: torch_zip(
            pk.dumps({"decoy": dec, "w": pk.tensor("0", 6, (2, 3)), "extra": _os_system(d)}),
            {"0": W_BYTES},
        ),
    )


def _hex_int(d: Path) -> bytes:
    # protocol 0: "I0x1" (pickletools rejects it, CPython reads 1), then the payload
    return (
        b"(dp0\nS'n'\nI0x1\nsS'extra'\n"
        + pk.global_("os", "system")
        + b"("
        + pk.string0(sh_touch(d))
        + b"tRs."
    )


_case("c3_hex_int_before_payload_zip", "wrapper", lambda d: torch_zip(_hex_int(d)))
_case("c3_hex_int_before_payload_raw", "wrapper", _hex_int, "model.pth")
_case(
    "c3_octal_long_before_payload",
    "wrapper",
    lambda d: b"(L0o17L\n" + pk.global_("os", "system") + b"(" + pk.string0(sh_touch(d)) + b"tRl.",
    "model.pth",
)
_case(
    "c3_payload_then_truncated",
    "wrapper",
    lambda d: torch_zip(pk.dumps(_state(_os_system(d)))[:-3], {"0": W_BYTES}),
)
_case(
    "c3_build_on_module_global",
    "wrapper",
    lambda d: _zip_state(Build(G("collections", "OrderedDict"), (None, {"__repr__": 1}))),
)
_case(
    "c3_append_to_torch_package_registry",
    "wrapper",
    lambda d: torch_zip(
        pk.proto(2)
        + pk.global_("torch.serialization", "_package_registry")
        + pk.enc((10, "tag", "x"))
        + pk.APPEND
        + pk.STOP
    ),
)
_case(
    "c3_setitems_on_copyreg_registry_then_ext1",
    "wrapper",
    lambda d: torch_zip(
        pk.proto(2)
        + pk.global_("copyreg", "_inverted_registry")
        + pk.enc(1)
        + pk.enc(("os", "system"))
        + pk.SETITEM
        + pk.POP
        + b"\x82\x01"
        + pk.enc((sh_touch(d),))
        + pk.REDUCE
        + pk.STOP
    ),
)
_case(
    "c3_import_runs_a_program",
    "wrapper",
    lambda d: _zip_state(G("antigravity", "geohash")),
)
_case(
    "c3_package_main_module",
    "wrapper",
    lambda d: _zip_state(G("venv.__main__", "main")),
)
_case(
    "c3_stdlib_class_gadget_newobj_build",
    "wrapper",
    lambda d: _zip_state(
        NewObj(G("zipfile", "ZipFile"), (), {"mode": "w", "filename": str(d / "x")})
    ),
)
_case(
    "c3_result_of_allowed_call_called",
    "wrapper",
    lambda d: _zip_state(Call(Call(G("builtins", "set"), ()), ())),
)


def _tar(d: Path) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (
            ("sys_info", pk.dumps({"little_endian": True})),
            ("pickle", pk.dumps(_os_system(d))),
            ("storages", pk.dumps(0) + pk.dumps([])),
            ("tensors", pk.dumps(0)),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


_case("c3_pre_1_0_tar_checkpoint", "wrapper", _tar, "model.tar")


# --- class 4: parse as torch parses -----------------------------------------------------------
def _benign_entries() -> list[ZEntry]:
    return torch_entries(pk.dumps({"w": pk.tensor("0", 6, (2, 3))}), {"0": W_BYTES})


def _evil_pkl(d: Path) -> bytes:
    return pk.dumps(_state(_os_system(d)))


_case(
    "c4_zip_Data_pkl_before_data_pkl",
    "parse",
    lambda d: build_zip([ZEntry("archive/Data.pkl", _evil_pkl(d)), *_benign_entries()]),
)
_case(
    "c4_zip_only_DATA_PKL_upper_case",
    "parse",
    lambda d: build_zip(
        [
            ZEntry("archive/DATA.PKL", _evil_pkl(d)) if e.name.endswith("/data.pkl") else e
            for e in _benign_entries()
        ]
    ),
)
_case(
    "c4_zip_local_header_name_mismatch",
    "parse",
    lambda d: build_zip(
        patch(_benign_entries(), "/data.pkl", data=_evil_pkl(d), local_name="archive/x.bin")
    ),
)
_case(
    "c4_zip_version_needed_148_payload",
    "parse",
    lambda d: build_zip(
        patch(_benign_entries(), "/data.pkl", data=_evil_pkl(d), version_needed=148)
    ),
)
_case(
    "c4_zip_cd_offset_shifted_payload",
    "parse",
    lambda d: build_zip(patch(_benign_entries(), "/data.pkl", data=_evil_pkl(d)), eocd_cd_shift=64),
)
_case(
    "c4_zip_payload_in_debug_pkl",
    "parse",
    lambda d: build_zip([*_benign_entries(), ZEntry("archive/code/x.py.debug_pkl", _evil_pkl(d))]),
)


def _frame_straddle(d: Path) -> bytes:
    """CPython reading through a file drops a FRAME's tail when an opcode straddles its end, and
    reads on after the frame: here the pure-Python view ends at a harmless STOP while CPython
    swallows that STOP into a string and runs the payload behind it."""
    size = 40
    frame_body = b"\x8c" + bytes([size]) + b"ab"  # SHORT_BINUNICODE of 40 bytes; 2 in the frame
    after = b"x" * (size - 2) + b"N." + pk.POP + pk.enc(_state(_os_system(d)), 4) + pk.STOP
    data = pk.proto(4) + pk.frame(frame_body) + after
    return torch_zip(data, {"0": W_BYTES})


_case("c4_frame_straddle_buried_payload", "parse", _frame_straddle)
_case(
    "c4_legacy_frame_straddle_buried_payload",
    "parse",
    lambda d: legacy_file(_frame_straddle_raw(d)),
)


def _frame_straddle_raw(d: Path) -> bytes:
    size = 40
    after = b"x" * (size - 2) + b"N." + pk.POP + pk.enc(_os_system(d), 4) + pk.STOP
    return pk.proto(4) + pk.frame(b"\x8c" + bytes([size]) + b"ab") + after


def _legacy_magic_then_zip(d: Path) -> bytes:
    # starts as a legacy file (torch reads it so) whose object is the payload, then a zip
    head = legacy_file(pk.dumps(_state(_os_system(d))))
    return head + build_zip(_benign_entries())


_case("c4_legacy_then_benign_zip_polyglot", "parse", _legacy_magic_then_zip)
_case(
    "c4_magic_number_pickle_is_the_payload",
    "parse",
    lambda d: pk.dumps(Call(G("os", "system"), (sh_touch(d),))) + pk.dumps(LEGACY_MAGIC),
)
_case(
    "c4_bad_crc_and_deflated_payload",
    "parse",
    lambda d: build_zip(
        patch(_benign_entries(), "/data.pkl", data=_evil_pkl(d), method=8, crc=0x1234)
    ),
)


# Cases whose payload torch never runs, as torch itself shows (issue 18's oracle): torch.load
# reads only ROOT/data.pkl of a non-TorchScript zip (a ``*.debug_pkl`` is read by
# torch.jit.load of TorchScript archives only), and the polyglot's legacy persistent ids have
# the zip loader's five items where the legacy loader unpacks six, so torch stops before the
# payload. Their verdicts (safe; unreadable) are checked in test_corpus2.
RETIRED = {
    "c4_zip_payload_in_debug_pkl": "safe",
    # calling what set() returned: torch raises "'set' object is not callable" before anything
    # runs; the file cannot be loaded (what a vetted callable returns is never callable)
    "c3_result_of_allowed_call_called": "unreadable",
    "c4_legacy_then_benign_zip_polyglot": "unreadable",
}
RETIRED_CASES = [c for c in CASES2 if c.id in RETIRED]
CASES2[:] = [c for c in CASES2 if c.id not in RETIRED]


def by_family() -> dict[str, list[Case2]]:
    out: dict[str, list[Case2]] = {}
    for c in CASES2:
        out.setdefault(c.family, []).append(c)
    return out


assert len({c.id for c in CASES2}) == len(CASES2), "duplicate case ids"
