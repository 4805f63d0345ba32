"""Checks that the hostile corpus itself is well-formed, independent of ckpttool.

* every case builds, deterministically, small, without ever creating the marker;
* a static opcode scan (pickletools.genops: a disassembler, it executes nothing) finds a
  dangerous global in every "dangerous" case and none in the "ok" cases;
* torch's own ``torch.load(weights_only=True)`` refuses every payload without creating the
  marker or importing the canary, loads the "ok" files it can load with the recorded
  values, and refuses the broken files it is able to notice. ``torch.load`` is never
  called with ``weights_only=False`` and nothing is ever ``pickle.load``-ed.
"""

from __future__ import annotations

import io
import json
import pickletools
import shutil
import struct
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest

from . import pk, zipw
from .corpus import (
    CANARY_MODULE,
    CASES,
    CASES_BY_ID,
    DANGEROUS,
    ERROR,
    OK,
    Case,
    install_canary,
    marker_path,
)

DANGEROUS_NAMES = {
    "builtins.exec",
    "builtins.eval",
    "builtins.getattr",
    "builtins.__import__",
    "__builtin__.eval",
    "os.system",
    "posix.system",
    "subprocess.Popen",
    "subprocess.call",
    "subprocess.check_output",
    "commands.getoutput",
    "torch.storage._load_from_bytes",
}

# Broken files torch.load(weights_only=True) accepts anyway (torch does not check CRCs,
# local-vs-central names or duplicate names); ckpttool must be stricter.
TORCH_TOLERATES = {
    "zip_bad_crc_data_pkl",
    "zip_bad_crc_byteorder_before_data_pkl",
    "zip_local_name_differs_from_central",
    "zip_version_needed_148",
    "zip_duplicate_data_pkl",
    "zip_duplicate_data_pkl_second_is_payload",
    "unreadable_file",  # root
}
# Never handed to torch: bombs would really allocate (torch's weights_only unpickler
# allows builtins.bytearray and tries the 6 GiB), the FIFO would block, the 200k-deep
# structures blow the recursion limit in torch's unpickler/repr.
TORCH_SKIP = {"fifo"}


def _build(case: Case, root: Path) -> Path:
    d = root / case.id
    d.mkdir(parents=True)
    return case.build(d)


# --- static scan ---------------------------------------------------------------------------


def pickle_globals(blob: bytes) -> tuple[set[str], bool]:
    """Names of GLOBAL/INST/STACK_GLOBAL in one pickle, and whether it parsed to STOP.

    STACK_GLOBAL operands are tracked through the string pushes and the memo
    (MEMOIZE/PUT/GET), which is enough for everything the corpus writes.
    """
    names: set[str] = set()
    strings: list[object] = []
    memo: dict[int, object] = {}
    complete = False
    try:
        for op, arg, _pos in pickletools.genops(blob):
            n = op.name
            if n in ("GLOBAL", "INST"):
                names.add(arg.replace(" ", "."))
                strings.append(None)
            elif n in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                strings.append(arg)
            elif n == "MEMOIZE":
                memo[len(memo)] = strings[-1] if strings else None
            elif n in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = strings[-1] if strings else None
            elif n in ("BINGET", "LONG_BINGET", "GET"):
                strings.append(memo.get(int(arg)))
            elif n == "STACK_GLOBAL":
                mod, name = strings[-2:] if len(strings) >= 2 else (None, None)
                names.add(f"{mod}.{name}")
                strings.append(None)
            elif n == "STOP":
                complete = True
            else:
                strings.append(None)
    except Exception:
        pass
    return names, complete


def pickle_starts(blob: bytes) -> list[int]:
    """Start offsets of consecutive pickles (legacy format: five in a row, then data)."""
    starts, pos = [], 0
    while pos < len(blob) and len(starts) < 8:
        end = None
        try:
            for _op, _arg, p in pickletools.genops(blob[pos:]):
                end = p
        except Exception:
            break
        starts.append(pos)
        pos += end + 1
    return starts


def file_globals(path: Path) -> set[str]:
    """All globals named by any pickle in the file (zip entries or legacy stream)."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    names: set[str] = set()
    blobs: list[bytes] = []
    if not data.startswith(b"PK\x03\x04"):  # legacy / polyglot: decided by the first bytes
        blobs += [data[s:] for s in pickle_starts(data)]
    else:
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for info in zf.infolist():
                    if info.filename.endswith(".pkl") and info.file_size < 1 << 24:
                        try:
                            with zf.open(info) as f:
                                blobs.append(f.read(1 << 24))
                        except Exception:  # bad CRC: read the raw (STORED) bytes instead
                            h = info.header_offset
                            nlen, elen = struct.unpack("<HH", data[h + 26 : h + 30])
                            start = h + 30 + nlen + elen
                            blobs.append(data[start : start + info.compress_size])
        except Exception:  # zipfile refuses the archive (version, damage): nothing to scan
            pass
    for b in blobs:
        found, _ = pickle_globals(b)
        names |= found
        # nested pickles in bytes arguments (torch.storage._load_from_bytes)
        for op, arg, _ in _safe_genops(b):
            if op.name in ("BINBYTES", "SHORT_BINBYTES", "BINUNICODE") and arg:
                raw = arg if isinstance(arg, bytes) else arg.encode("latin-1", "replace")
                for s in pickle_starts(raw):
                    names |= pickle_globals(raw[s:])[0]
    return names


def _safe_genops(b: bytes):
    try:
        yield from pickletools.genops(b)
    except Exception:
        return


# --- tests ---------------------------------------------------------------------------------


def test_ids_unique_and_valid() -> None:
    assert len(CASES_BY_ID) == len(CASES)
    for c in CASES:
        assert c.id.isidentifier(), c.id
        assert c.expect not in c.also_ok, c.id
    assert len(CASES) >= 150


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_builds_deterministic_small_no_marker(case: Case, tmp_path: Path) -> None:
    t0 = time.monotonic()
    p = _build(case, tmp_path)
    assert time.monotonic() - t0 < 2.0
    assert not marker_path(p.parent).exists()
    assert tmp_path in p.parents
    regular = p.is_file() and not p.is_symlink() and case.id != "unreadable_file"
    if regular and "needs_torch" not in case.tags:
        first = p.read_bytes()
        shutil.rmtree(tmp_path / case.id)
        assert _build(case, tmp_path).read_bytes() == first, "not deterministic"
    if regular:
        assert p.stat().st_size < 4 << 20


def test_static_scan_sees_payloads(tmp_path: Path) -> None:
    missing, dirty = [], []
    for c in CASES:
        if c.id in ("fifo",):
            continue
        names = file_globals(_build(c, tmp_path))
        if c.expect == DANGEROUS and not names & DANGEROUS_NAMES:
            missing.append((c.id, sorted(names)))
        if c.expect == OK and names & DANGEROUS_NAMES:
            dirty.append((c.id, sorted(names & DANGEROUS_NAMES)))
    assert not missing, f"dangerous cases naming no dangerous global: {missing}"
    assert not dirty, f"ok cases naming dangerous globals: {dirty}"


def test_static_scan_sees_stack_global_memo(tmp_path: Path) -> None:
    names = file_globals(_build(CASES_BY_ID["payload_proto4_stack_global_memo"], tmp_path))
    assert "os.system" in names


def test_marker_payload_strings_embed_the_absolute_marker(tmp_path: Path) -> None:
    for c in CASES:
        if "payload" not in c.tags:
            continue
        if c.id in ("payload_global_named_not_called", "payload_nested_load_from_bytes"):
            continue  # no payload string / it sits inside a nested pickle
        p = _build(c, tmp_path)
        data = p.read_bytes()
        assert str(marker_path(p.parent)).encode() in data, c.id


def test_zip_bombs_are_real(tmp_path: Path) -> None:
    """The bomb streams really inflate past the declared/limit sizes (checked by streaming)."""
    import zlib

    stream = zipw.deflate_zeros(64 << 20)
    d = zlib.decompressobj(-15)
    total, chunk = 0, stream
    while chunk:
        total += len(d.decompress(chunk, 1 << 24))
        chunk = d.unconsumed_tail
    assert total == 64 << 20 and d.eof
    p = _build(CASES_BY_ID["zip_bomb_data_pkl_declared_16gib"], tmp_path)
    with zipfile.ZipFile(p) as zf:
        info = zf.getinfo("archive/data.pkl")
        assert info.file_size == 16 << 30 and info.compress_size < 4 << 20


# --- torch cross-checks --------------------------------------------------------------------

torch = pytest.importorskip("torch")


def _torch_load(path: Path, safe_globals=()):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if safe_globals:
            with torch.serialization.safe_globals(list(safe_globals)):
                return torch.load(path, weights_only=True, map_location="cpu")
        return torch.load(path, weights_only=True, map_location="cpu")


def _tolist(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {k: _tolist(v) for k, v in x.items()}
    return x


def to_protocol2(blob: bytes) -> bytes:
    """Transcode the protocol 4/5 stream of an "ok" case to protocol-2 opcodes.

    torch's weights_only unpickler knows none of FRAME, MEMOIZE, SHORT_BINUNICODE or
    STACK_GLOBAL (not even in torch's own protocol-4 files), so to use torch as the oracle
    for those cases the stream is rewritten op by op: FRAME dropped, MEMOIZE -> BINPUT n,
    SHORT_BINUNICODE -> BINUNICODE, "str str STACK_GLOBAL" -> GLOBAL. A static rewrite:
    nothing is executed.
    """
    out: list[tuple[str, bytes, object]] = []
    memo = 0
    for op, arg, pos in pickletools.genops(blob):
        n = op.name
        raw = blob[pos : pos + 1 + _arg_len(blob, pos, op)]
        if n == "PROTO":
            out.append((n, b"\x80\x02", None))
        elif n == "FRAME":
            continue
        elif n == "MEMOIZE":
            out.append(("BINPUT", pk.binput(memo), None))
            memo += 1
        elif n in ("SHORT_BINUNICODE", "BINUNICODE8"):
            out.append(("BINUNICODE", pk.binunicode(arg), arg))
        elif n == "STACK_GLOBAL":
            (n1, _, mod), (n2, _, name) = out[-2:]
            assert n1 == n2 == "BINUNICODE", "transcoder only handles str str STACK_GLOBAL"
            del out[-2:]
            out.append(("GLOBAL", pk.global_(mod, name), None))
        else:
            out.append((n, raw, arg))
    return b"".join(b for _, b, _ in out)


def _arg_len(blob: bytes, pos: int, op) -> int:
    """Byte length of the argument of the opcode at ``pos`` (for copying it verbatim)."""
    nxt = None
    for _op, _arg, p in pickletools.genops(blob[pos:]):
        if p > 0:
            nxt = p
            break
    return (nxt - 1) if nxt is not None else len(blob) - pos - 1


def _protocol2_copy(path: Path) -> Path:
    with zipfile.ZipFile(path) as zf:
        entries = [zipw.ZEntry(i.filename, zf.read(i)) for i in zf.infolist()]
    out = [
        zipw.ZEntry(e.name, to_protocol2(e.data) if e.name.endswith("data.pkl") else e.data)
        for e in entries
    ]
    q = path.with_name("protocol2.pt")
    q.write_bytes(zipw.build_zip(out))
    return q


PAYLOADS = [c for c in CASES if c.expect == DANGEROUS]


@pytest.mark.slow
@pytest.mark.parametrize("case", PAYLOADS, ids=[c.id for c in PAYLOADS])
def test_torch_weights_only_refuses_payloads(case: Case, tmp_path: Path, monkeypatch) -> None:
    site = tmp_path / "site"
    p = _build(case, tmp_path)
    marker = marker_path(p.parent)
    install_canary(site, marker)
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do
        _torch_load(p)
    assert not marker.exists()
    assert CANARY_MODULE not in sys.modules


@pytest.mark.slow
def test_torch_does_not_import_canary(tmp_path: Path, monkeypatch) -> None:
    case = CASES_BY_ID["canary_module_like_object"]
    p = _build(case, tmp_path)
    marker = marker_path(p.parent)
    install_canary(tmp_path / "site", marker)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(Exception):  # noqa: B017
        _torch_load(p)
    assert not marker.exists() and CANARY_MODULE not in sys.modules


def _np_globals():
    np = pytest.importorskip("numpy")
    mu = np._core.multiarray
    return [mu.scalar, mu._reconstruct, np.ndarray, np.dtype, type(np.dtype("f8"))]


def _ns_globals():
    import argparse

    return [argparse.Namespace]


# ok cases that need extra allowlisting (benign classes) for torch to load them
EXTRA_SAFE = {"ok_numpy2_names": _np_globals, "ok_argparse_namespace": _ns_globals}
FRAMED = {"ok_protocol4_memoized", "ok_protocol5_plain"}
OKS = [c for c in CASES if c.expect == OK]


@pytest.mark.slow
@pytest.mark.parametrize("case", OKS, ids=[c.id for c in OKS])
def test_ok_cases_load_with_torch(case: Case, tmp_path: Path) -> None:
    p = _build(case, tmp_path)
    if "safetensors" in case.tags:
        from safetensors.torch import load_file

        if p.name.endswith(".index.json"):
            wm = json.loads(p.read_text())["weight_map"]
            got = {}
            for shard in sorted(set(wm.values())):
                got.update(load_file(p.parent / shard))
        else:
            got = load_file(p)
    elif case.id in FRAMED:
        got = _torch_load(_protocol2_copy(p))
    elif case.id in EXTRA_SAFE:
        got = _torch_load(p, EXTRA_SAFE[case.id]())
    elif case.torch_loads is False:
        pytest.skip("torch cannot load user classes / numpy-1 names without running them")
    else:
        got = _torch_load(p)
    assert not marker_path(p.parent).exists()
    if case.values is not None:
        for k, v in case.values.items():
            assert _tolist(got[k]) == v, k
        if not case.values:
            assert got == {}
    if case.id == "ok_tensor_with_python_attrs":
        assert got["w"].quant_scale == 0.5 and got["w"].tag == "calibrated"
    if case.id == "ok_numpy2_names":
        assert float(got["best_acc"]) == 0.875 and got["rng"].tolist() == [1.0, 2.0, 3.0]


ERRORS = [c for c in CASES if c.expect == ERROR and "bomb" not in c.tags]


@pytest.mark.slow
@pytest.mark.parametrize("case", ERRORS, ids=[c.id for c in ERRORS])
def test_broken_files_refused_by_reference_loaders(case: Case, tmp_path: Path) -> None:
    if case.id in TORCH_SKIP:
        pytest.skip("would block or allocate")
    p = _build(case, tmp_path)
    if "index" in case.tags:
        pytest.skip("torch has no index.json loader")
    if case.id in TORCH_TOLERATES:
        if case.id != "unreadable_file":
            got = _torch_load(p)  # documents the leniency; ckpttool must be stricter
            assert _tolist(got["w"]) == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
        return
    if "safetensors" in case.tags:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        with pytest.raises(SafetensorError):
            load_file(p)
    else:
        with pytest.raises(Exception):  # noqa: B017 - torch raises many different types
            _torch_load(p)
    assert not marker_path(p.parent).exists()
