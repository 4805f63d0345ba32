"""The committed fixtures, their generator and ``ckpttool.testing.saved_as``.

``malicious.pt`` is never loaded here, by torch or by pickle; its opcodes are only listed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import os
import pickletools
import subprocess
import sys
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import safetensors
import torch
import torch.serialization

from ckpttool.testing import save_as, save_legacy, saved_as

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
GENERATOR = FIXTURES / "make_fixtures.py"
EXPECTED: dict[str, Any] = json.loads((FIXTURES / "EXPECTED.json").read_text(encoding="utf-8"))
FILES: dict[str, dict[str, Any]] = EXPECTED["files"]
CUDA_ERROR = "Attempting to deserialize object on a CUDA device"

CUDA_TAGGED = sorted(
    name for name, f in FILES.items() if any(tag.startswith("cuda") for tag in f["locations"])
)
TORCH_PICKLES = sorted(
    name
    for name, f in FILES.items()
    if f["format"] in ("zip", "legacy") and not f.get("unsafe_globals")
)
needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


def tree(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every fixture file under ``folder`` (not the generators, nor
    ``megatron/``, which megatron-core saves through ``make_megatron.py``)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and p.suffix != ".py"
        and "__pycache__" not in p.parts
        and p.relative_to(folder).parts[0] != "megatron"  # make_megatron.py's
    }


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ckpttool_fixture_generator", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, bytes]]:
    """Two generator runs at once: a script run elsewhere with a fixed hash seed, and main().

    The script run uses torch's portable kernels (``ATEN_CPU_CAPABILITY=default``), this process
    the fastest the CPU has (AVX2, AVX-512): equal bytes mean no fixture depends on the CPU.
    """
    script_out = tmp_path_factory.mktemp("fixtures_script")
    inproc_out = tmp_path_factory.mktemp("fixtures_inprocess")
    proc = subprocess.Popen(
        [sys.executable, str(GENERATOR), str(script_out)],
        cwd=tmp_path_factory.mktemp("cwd"),
        env={**os.environ, "PYTHONHASHSEED": "1", "ATEN_CPU_CAPABILITY": "default"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert load_generator().main([str(inproc_out)]) == 0
    finally:
        output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    return [tree(script_out), tree(inproc_out)]


def test_generator_is_deterministic(generated: list[dict[str, bytes]]) -> None:
    first, second = generated
    assert sorted(first) == sorted(second)
    differing = [name for name in first if first[name] != second[name]]
    assert not differing


def test_committed_fixtures_are_current(generated: list[dict[str, bytes]]) -> None:
    versions = {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }
    recorded = {k: EXPECTED["generator"].get(k) for k in versions}
    if recorded != versions:
        pytest.skip(f"fixtures were generated with {recorded}, this is {versions}")
    committed = tree(FIXTURES)
    assert sorted(committed) == sorted(generated[0]), "rerun fixtures/make_fixtures.py"
    stale = [name for name in committed if committed[name] != generated[0][name]]
    assert not stale, f"stale fixtures {stale}: rerun fixtures/make_fixtures.py"


def test_fixtures_are_small() -> None:
    assert sum(len(b) for b in tree(FIXTURES).values()) < 1_000_000


@needs_cpu_only
@pytest.mark.parametrize("name", CUDA_TAGGED)
def test_cuda_tagged_fixture_fails_in_plain_torch_load(name: str) -> None:
    assert name != "malicious.pt"
    with pytest.raises(RuntimeError, match=CUDA_ERROR):
        torch.load(FIXTURES / name)


@functools.cache
def _shared_generator() -> ModuleType:
    return load_generator()


def iter_tensors(obj: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The generator's own traversal (keys joined by '/'), so this test and EXPECTED.json agree."""
    return _shared_generator().iter_tensors(obj)


@pytest.mark.parametrize("name", TORCH_PICKLES)
def test_fixture_loads_on_cpu_and_matches_expected(name: str) -> None:
    facts = FILES[name]
    # weights_only=False only for our own payload-free files (TORCH_PICKLES excludes payloads).
    loaded = torch.load(
        FIXTURES / name, map_location="cpu", weights_only=facts["weights_only_loadable"]
    )
    tensors = dict(iter_tensors(loaded))
    assert sorted(tensors) == sorted(facts["entries"])
    storages: dict[int, int] = {}
    for path, tensor in tensors.items():
        entry = facts["entries"][path]
        assert tensor.device.type == "cpu"
        assert str(tensor.dtype).removeprefix("torch.") == entry["dtype"]
        assert list(tensor.shape) == entry["shape"]
        assert list(tensor.stride()) == entry["stride"]
        assert tensor.storage_offset() == entry["storage_offset"]
        storage = tensor.untyped_storage()
        storages[storage._cdata] = storage.nbytes()
    assert len(tensors) == facts["tensors"]
    assert len(storages) == facts["storages"]
    assert sum(storages.values()) == facts["storage_bytes"]
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())
    assert dict(dtypes) == facts["dtypes"]
    if isinstance(loaded, dict):
        assert [str(k) for k in loaded] == facts["top_level_keys"]


def test_tied_fixture_shares_storage_after_loading() -> None:
    sd = torch.load(FIXTURES / "tied_weights.pt", map_location="cpu")
    assert sd["embed.weight"].data_ptr() == sd["lm_head.weight"].data_ptr()
    qkv, k = sd["attn.qkv.weight"], sd["attn.k.weight"]
    assert qkv.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    assert k.storage_offset() == 64
    assert torch.equal(k, qkv[8:16])


def test_legacy_fixture_is_legacy_and_tagged() -> None:
    data = (FIXTURES / "legacy_format.pt").read_bytes()
    assert not zipfile.is_zipfile(io.BytesIO(data))
    assert data.count(b"cuda:0") == FILES["legacy_format.pt"]["locations"]["cuda:0"]


def test_no_crc32_fixture_has_zero_crcs_that_python_zipfile_rejects() -> None:
    with zipfile.ZipFile(FIXTURES / "no_crc32.pt") as archive:
        assert {info.CRC for info in archive.infolist()} == {0}
        with pytest.raises(zipfile.BadZipFile, match="CRC"):
            archive.read("no_crc32/data.pkl")


def test_malicious_fixture_carries_exec_payload_without_loading_it() -> None:
    with zipfile.ZipFile(FIXTURES / "malicious.pt") as archive:
        assert "malicious/data/0" in archive.namelist()
        pickled = archive.read("malicious/data.pkl")
    globals_ = [arg for op, arg, _ in pickletools.genops(pickled) if op.name == "GLOBAL"]
    assert "__builtin__ exec" in globals_
    assert b"CKPTTOOL_PWNED" in pickled


# ------------------------------------------------------------------------------------------
# saved_as / save_as / save_legacy


def registry() -> list[Any]:
    return list(torch.serialization._package_registry)


def saved_bytes(obj: object, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def test_saved_as_restores_registry_on_exit() -> None:
    before = registry()
    with saved_as("cuda:0"):
        assert len(registry()) == len(before) + 1
        with saved_as(lambda storage: "cuda:1"):
            assert len(registry()) == len(before) + 2
        assert len(registry()) == len(before) + 1
    assert registry() == before


def test_saved_as_restores_registry_on_exception() -> None:
    before = registry()
    with pytest.raises(KeyError), saved_as("cuda:0"):
        raise KeyError("boom")
    assert registry() == before


def test_saved_as_removes_only_its_own_entry() -> None:
    before = registry()
    outer = saved_as("cuda:0")
    outer.__enter__()
    with saved_as("cuda:1"):
        pass
    assert len(registry()) == len(before) + 1
    outer.__exit__(None, None, None)
    assert registry() == before


def test_saved_as_tags_zip_and_legacy_saves() -> None:
    t = torch.arange(4.0)
    plain = saved_bytes(t)
    with saved_as("cuda:2"):
        tagged = saved_bytes(t)
        legacy = saved_bytes(t, _use_new_zipfile_serialization=False)
    assert b"cuda:2" not in plain
    assert b"cuda:2" in tagged and b"cuda:2" in legacy
    for data in (tagged, legacy):
        if not torch.cuda.is_available():
            with pytest.raises(RuntimeError, match=CUDA_ERROR):
                torch.load(io.BytesIO(data))
        assert torch.equal(torch.load(io.BytesIO(data), map_location="cpu"), t)


def test_saved_as_callable_picks_per_storage_and_none_keeps_cpu() -> None:
    a, b = torch.zeros(2), torch.ones(2)
    where = {a.untyped_storage().data_ptr(): "cuda:3"}
    with saved_as(lambda storage: where.get(storage.data_ptr())):
        data = saved_bytes({"a": a, "b": b})
    locations = [
        arg
        for _, arg, _ in pickletools.genops(
            zipfile.ZipFile(io.BytesIO(data)).read("archive/data.pkl")
        )
        if arg in ("cpu", "cuda:3")
    ]
    assert locations == ["cuda:3", "cpu"]


def test_saved_as_rejects_bad_locations() -> None:
    with pytest.raises(ValueError), saved_as(""):
        pass
    with pytest.raises(TypeError), saved_as(3):  # type: ignore[arg-type]
        pass
    with saved_as(lambda storage: 7), pytest.raises(TypeError):  # type: ignore[arg-type,return-value]
        saved_bytes(torch.zeros(1))


def test_save_legacy_is_reproducible_and_loadable() -> None:
    sd = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    sd["w_view"] = sd["w"][1]
    outputs = set()
    for _ in range(3):
        copy = {k: v.clone() for k, v in sd.items()}  # new storages at new addresses
        copy["w_view"] = copy["w"][1]
        buffer = io.BytesIO()
        save_legacy(copy, buffer)
        outputs.add(buffer.getvalue())
    assert len(outputs) == 1
    loaded = torch.load(io.BytesIO(outputs.pop()))
    for key, value in sd.items():
        assert torch.equal(loaded[key], value)
    assert loaded["w_view"].untyped_storage().data_ptr() == loaded["w"].data_ptr()


def test_save_as_writes_files(tmp_path: Path) -> None:
    t = torch.arange(3)
    save_as(t, tmp_path / "zip.pt", "cuda:0")
    save_as(t, tmp_path / "legacy.pt", "cuda:0", legacy=True)
    assert zipfile.is_zipfile(tmp_path / "zip.pt")
    assert not zipfile.is_zipfile(tmp_path / "legacy.pt")
    for name in ("zip.pt", "legacy.pt"):
        assert torch.equal(torch.load(tmp_path / name, map_location="cpu"), t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("legacy", [False, True])
def test_saved_as_bytes_equal_a_real_gpu_save(legacy: bool) -> None:
    torch.manual_seed(0)
    cpu_sd = dict(torch.nn.Linear(8, 4).state_dict())
    cpu_sd["tied"] = cpu_sd["weight"]
    gpu_sd = {k: v.cuda() for k, v in cpu_sd.items()}
    gpu_sd["tied"] = gpu_sd["weight"]
    if legacy:
        real, fake = io.BytesIO(), io.BytesIO()
        save_legacy(gpu_sd, real)
        save_as(cpu_sd, fake, "cuda:0", legacy=True)
        assert real.getvalue() == fake.getvalue()
    else:
        with saved_as("cuda:0"):
            fake_bytes = saved_bytes(cpu_sd)
        assert saved_bytes(gpu_sd) == fake_bytes
