"""``open_checkpoint`` against the committed fixtures and the real-world files.

Expected figures come from ``fixtures/EXPECTED.json`` (written by the fixture generator with
torch) and ``../shared/real-world/expected.jsonl`` (computed from those files' bytes).
"""

from __future__ import annotations

import _compat_pickle
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ckpttool.analysis import report
from ckpttool.errors import CheckpointError
from ckpttool.readers import open_checkpoint
from ckpttool.unpickling.policy import classify

# safetensors' dtype codes -> torch's names (written out here, not taken from ckpttool).
SAFETENSORS_CODES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "F16": "float16",
    "BF16": "bfloat16",
    "U32": "uint32",
    "I32": "int32",
    "F32": "float32",
    "U64": "uint64",
    "I64": "int64",
    "F64": "float64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def py3_name(name: str) -> str:
    """A global's name the way pickle maps Python 2 names (``__builtin__.exec``)."""
    module, _, attr = name.rpartition(".")
    if (module, attr) in _compat_pickle.NAME_MAPPING:
        module, attr = _compat_pickle.NAME_MAPPING[(module, attr)]
    else:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{attr}"


def fixture_path(fixtures_dir: Path, name: str) -> Path:
    return fixtures_dir / name


# -- committed fixtures ------------------------------------------------------------------------
def test_fixture_matches_expected(
    fixture_name: str,
    fixtures_dir: Path,
    expected_fixtures: dict[str, Any],
    in_tmp_cwd: Path,
) -> None:
    exp = expected_fixtures[fixture_name]
    ckpt = open_checkpoint(fixtures_dir / fixture_name)
    tensors = ckpt.tensors()
    storages = list(ckpt.storages.values())

    assert ckpt.format == exp["format"]
    assert len(tensors) == exp["tensors"]
    assert len(storages) == exp["storages"]
    assert sum(s.nbytes for s in storages) == exp["storage_bytes"]
    assert sum(t.nbytes for t in tensors) == exp["tensor_bytes"]
    assert Counter(s.location for s in storages if s.location) == Counter(exp["locations"])
    assert Counter(t.dtype for t in tensors) == Counter(exp["dtypes"])

    keys = list(ckpt.root) if isinstance(ckpt.root, dict) else None
    if exp["format"] in ("safetensors", "hf-sharded"):
        # The file orders names its own way (the generator recorded the in-memory dict order).
        assert sorted(keys or []) == sorted(exp["top_level_keys"])
    elif exp["format"] == "zip" or exp["format"] == "legacy":
        assert keys == exp["top_level_keys"]

    by_name = {t.name: t for t in tensors}
    for entry_path, e in exp["entries"].items():
        name = entry_path.replace("/", ".")
        assert name in by_name, f"{name} missing; have {sorted(by_name)}"
        t = by_name[name]
        assert t.dtype == e["dtype"], name
        assert list(t.shape) == e["shape"], name
        assert list(t.stride) == e["stride"], name
        assert t.storage_offset == e["storage_offset"], name
        assert t.storage is not None
        assert t.storage.nbytes == e["storage_nbytes"], name
        assert t.device == (e["location"] or ""), name
    # Reading metadata never ran the pickle: nothing appeared in the working directory.
    assert list(in_tmp_cwd.iterdir()) == []


def test_reader_works_from_any_cwd(fixtures_dir: Path, in_tmp_cwd: Path) -> None:
    rel = os.path.relpath(fixtures_dir / "tied_weights.pt", in_tmp_cwd)
    assert open_checkpoint(rel).path == rel


def test_tied_weights_share_storages(fixtures_dir: Path) -> None:
    ckpt = open_checkpoint(fixtures_dir / "tied_weights.pt")
    t = {x.name: x for x in ckpt.tensors()}
    assert t["embed.weight"].storage is t["lm_head.weight"].storage
    assert t["attn.k.weight"].storage is t["attn.qkv.weight"].storage
    assert t["embed.weight"].storage is not t["attn.qkv.weight"].storage
    assert t["attn.k.weight"].storage_offset == 64
    assert len(ckpt.storages) == 2
    rep = report.build(ckpt)
    assert sorted(map(sorted, rep["shared"])) == [
        ["attn.k.weight", "attn.qkv.weight"],
        ["embed.weight", "lm_head.weight"],
    ]
    shared = {row["name"]: row["shared_with"] for row in rep["tensors"]}
    assert shared["lm_head.weight"] == ["embed.weight"]
    assert shared["attn.k.weight"] == ["attn.qkv.weight"]


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
@pytest.mark.parametrize("records", [40, 3])
def test_record_headers_are_advised_before_they_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, records: int
) -> None:
    """A file out of the page cache reads its thousand local headers in one queue: every
    storage record's header the reader reads was advised first (``WILLNEED``), and nothing
    else was; a file of a few records is read unadvised."""
    import zipfile

    import torch

    path = tmp_path / "many.pt"
    torch.save({f"w{i}": torch.full((3,), float(i)) for i in range(records)}, path)
    with zipfile.ZipFile(path) as zf:
        headers = {i.header_offset for i in zf.infolist() if "/data/" in i.filename}
    assert len(headers) == records
    advised: list[tuple[int, int]] = []
    reads: list[tuple[int, int]] = []
    fadvise, pread = os.posix_fadvise, os.pread

    def spy_fadvise(fd: int, off: int, n: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_WILLNEED
        advised.append((off, off + n))
        fadvise(fd, off, n, advice)

    def spy_pread(fd: int, n: int, off: int) -> bytes:
        if off in headers:
            reads.append((off, off + n))
        return pread(fd, n, off)

    monkeypatch.setattr(os, "posix_fadvise", spy_fadvise)
    monkeypatch.setattr(os, "pread", spy_pread)
    ckpt = open_checkpoint(path)
    assert len(ckpt.storages) == records
    assert {start for start, _ in reads} == headers  # each header read for its data offset
    if records < 16:
        assert advised == []
        return
    assert {start for start, _ in advised} == headers
    for start, end in reads:
        assert any(a <= start and end <= b for a, b in advised), (start, end)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_advice_the_kernel_refuses_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Advice is only advice: a filesystem that refuses it reads the file all the same."""
    import errno

    import torch

    path = tmp_path / "many.pt"
    torch.save({f"w{i}": torch.full((3,), float(i)) for i in range(40)}, path)
    calls: list[int] = []

    def refuse(fd: int, off: int, n: int, advice: int) -> None:
        calls.append(off)
        raise OSError(errno.ESPIPE, "Illegal seek")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    ckpt = open_checkpoint(path)
    assert calls and len(ckpt.storages) == 40


def test_noncontiguous_views(fixtures_dir: Path) -> None:
    ckpt = open_checkpoint(fixtures_dir / "noncontiguous_view.pt")
    t = {x.name: x for x in ckpt.tensors()}
    assert (t["transposed"].shape, t["transposed"].stride) == ((4, 3), (1, 4))
    assert not t["transposed"].ref.is_contiguous()
    assert (t["column"].shape, t["column"].stride, t["column"].storage_offset) == ((8,), (4,), 1)
    assert not t["column"].ref.is_contiguous()
    assert (t["rows"].storage_offset, t["rows"].stride) == (8, (4, 1))
    assert t["rows"].ref.is_contiguous()
    assert t["expanded"].stride == (0, 1)
    # views of one storage: 'rows' and 'column' live in the same 32-element storage
    assert t["rows"].storage is t["column"].storage
    assert t["rows"].storage.numel == 32
    for x in t.values():
        lo, hi = x.ref.extent()
        assert 0 <= lo <= hi <= x.storage.numel, x.name


def test_legacy_fixture(fixtures_dir: Path) -> None:
    ckpt = open_checkpoint(fixtures_dir / "legacy_format.pt")
    assert ckpt.format == "legacy"
    t = {x.name: x for x in ckpt.tensors()}
    assert t["fc2.weight"].storage is t["fc2.weight_tied"].storage
    assert {s.location for s in ckpt.storages.values()} == {"cuda:0"}
    assert ckpt.facts["protocol_version"] == 1001
    assert ckpt.facts["trailing_bytes"] == 0


def test_safetensors_fixture(fixtures_dir: Path) -> None:
    ckpt = open_checkpoint(fixtures_dir / "model.safetensors")
    assert ckpt.format == "safetensors"
    assert ckpt.globals == []
    assert {s.location for s in ckpt.storages.values()} == {""}
    assert ckpt.facts["metadata"] == {"format": "pt"}
    # offsets point into the data section: the last tensor ends at the end of the file
    end = max(s.offset + s.nbytes for s in ckpt.storages.values())
    assert end == ckpt.file_bytes == os.path.getsize(fixtures_dir / "model.safetensors")


@pytest.mark.parametrize("how", ["folder", "index"])
def test_sharded_fixture(fixtures_dir: Path, expected_fixtures: dict[str, Any], how: str) -> None:
    exp = expected_fixtures["sharded"]
    folder = fixtures_dir / "sharded"
    ckpt = open_checkpoint(folder if how == "folder" else folder / exp["index"])
    assert ckpt.format == "hf-sharded"
    assert ckpt.facts["shards"] == exp["shards"]
    files = {Path(s.file).name for s in ckpt.storages.values()}
    assert files == set(exp["shards"])
    assert ckpt.file_bytes == sum(os.path.getsize(folder / s) for s in exp["shards"])


def test_sharded_shard_missing(fixtures_dir: Path, tmp_path: Path) -> None:
    src = fixtures_dir / "sharded"
    (tmp_path / "model.safetensors.index.json").write_bytes(
        (src / "model.safetensors.index.json").read_bytes()
    )
    first = "model-00001-of-00002.safetensors"
    (tmp_path / first).write_bytes((src / first).read_bytes())
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path)
    assert str(info.value) == (
        f"{tmp_path / 'model.safetensors.index.json'}: shard model-00002-of-00002.safetensors "
        "is missing"
    )


def test_torchscript_recognised(fixtures_dir: Path) -> None:
    ckpt = open_checkpoint(fixtures_dir / "torchscript_module.pt")
    assert ckpt.format == "torchscript"
    assert sorted(t.name for t in ckpt.tensors()) == ["bias", "weight"]
    kinds = {g["name"]: g["kind"] for g in report.build(ckpt)["globals"]}
    scripted = [n for n in kinds if n.startswith("__torch__.")]
    assert scripted and all(kinds[n] == "unvetted code" for n in scripted)
    assert "dangerous" not in kinds.values()
    assert ckpt.verdict is not None and ckpt.verdict.kind == "unvetted code"
    assert any("TorchScript" in r for r in ckpt.verdict.reasons("unvetted code"))


def test_malicious_inspected_without_running(
    fixtures_dir: Path, expected_fixtures: dict[str, Any], in_tmp_cwd: Path
) -> None:
    exp = expected_fixtures["malicious.pt"]
    marker = exp["payload"]["creates"]
    assert marker == "CKPTTOOL_PWNED"
    ckpt = open_checkpoint(fixtures_dir / "malicious.pt")
    ckpt.tensors()
    rep = report.build(ckpt)
    assert not (in_tmp_cwd / marker).exists()
    assert not (fixtures_dir.parent / marker).exists()
    kinds = {g["name"]: g["kind"] for g in rep["globals"]}
    for name in exp["unsafe_globals"]:
        assert kinds[py3_name(name)] == "dangerous", name
    assert [t.name for t in ckpt.tensors()] == ["weight"]
    assert list(in_tmp_cwd.iterdir()) == []


# -- real-world files --------------------------------------------------------------------------
def _torch_dtype(rec: dict[str, Any], code: str) -> str:
    return SAFETENSORS_CODES[code] if rec["format"] == "safetensors" else code


def test_real_world_matches_expected(
    rw_record: dict[str, Any], real_world: Path, in_tmp_cwd: Path
) -> None:
    rec = rw_record
    path = real_world / rec["file"]
    ckpt = open_checkpoint(path)
    tensors = ckpt.tensors()
    storages = list(ckpt.storages.values())

    assert ckpt.format == rec["format"]
    assert ckpt.file_bytes == rec["bytes"] == path.stat().st_size
    assert len(tensors) == rec["num_tensors"]
    if rec["num_storages"] is not None:
        assert len(storages) == rec["num_storages"]
    assert sum(s.nbytes for s in storages) == rec["storage_bytes"]
    assert sum(t.nbytes for t in tensors) == rec["tensor_bytes"]
    assert Counter(s.location for s in storages if s.location) == Counter(rec["locations"])
    want_dtypes = Counter({_torch_dtype(rec, k): v for k, v in rec["dtypes"].items()})
    assert Counter(t.dtype for t in tensors) == want_dtypes
    if "storage_dtypes" in rec:
        assert Counter(s.dtype for s in storages) == Counter(rec["storage_dtypes"])
    if "tensor_kinds" in rec:
        assert Counter(t.kind for t in tensors) == Counter(rec["tensor_kinds"])
    if rec["top_keys"] is not None:
        assert isinstance(ckpt.root, dict)
        assert [str(k) for k in ckpt.root] == rec["top_keys"]
    if "archive_name" in rec:
        assert ckpt.facts["archive_name"] == rec["archive_name"]
    if rec["format"] == "safetensors":
        assert ckpt.facts["metadata"] == rec["metadata"]
    if "globals" in rec:
        assert set(ckpt.globals) == set(rec["globals"])
    if "unsafe_globals" in rec:
        rep = report.build(ckpt)
        not_torch = {g["name"] for g in rep["globals"] if g["kind"] != "torch"}
        assert not_torch == set(rec["unsafe_globals"])
        assert {g for g in ckpt.globals if classify(g) == "dangerous"} == set()
    # every storage lies inside the file, every view inside its storage
    for s in storages:
        assert s.offset >= 0 and s.offset + s.nbytes <= ckpt.file_bytes, s.key
    for t in tensors:
        lo, hi = t.ref.extent()
        assert 0 <= lo <= hi <= t.storage.numel, t.name
    json.dumps(report.build(ckpt))  # the report is JSON-ready for every real file
    assert list(in_tmp_cwd.iterdir()) == []
