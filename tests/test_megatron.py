"""megatron-core ``torch_dist`` folders (and NeMo's wrapping of them): inspect, scan, consolidate.

The fixtures (``fixtures/megatron/mcore-0.16`` and ``mcore-0.15``) were saved by megatron-core
itself on 2 gloo ranks (``fixtures/make_megatron.py``). What ckpttool consolidates is compared
with megatron-core's own ``load_plain_tensors`` / ``load`` (a child process; skipped when
megatron-core is not installed), with torch's ``dcp_to_torch_save`` plus ``torch.load`` of
``common.pt`` (always), and, for the tensors 0.15 stored N-D reformulated, with the tensors
the generator split.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ckpttool.cli import cli
from ckpttool.errors import CheckpointError
from ckpttool.ops.consolidate import consolidate
from ckpttool.readers import open_checkpoint
from ckpttool.unpickling.opscan import walk
from ckpttool.unpickling.policy import judge

torch = pytest.importorskip("torch")

from tests.torch_objects import same  # noqa: E402  (after the skip: it imports torch)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"
GPT = FIXTURES / "megatron" / "mcore-0.16"  # Megatron-LM's parent folder
ITER = GPT / "iter_0000010"
OLD = FIXTURES / "megatron" / "mcore-0.15"
MCORE = "megatron.core.dist_checkpointing.strategies.torch."
REFERENCE = Path(__file__).with_name("megatron_reference.py")


def _has_megatron() -> bool:
    try:
        return importlib.util.find_spec("megatron.core") is not None
    except (ImportError, ValueError):  # no megatron package at all
        return False


needs_megatron = pytest.mark.skipif(not _has_megatron(), reason="megatron-core is not installed")


def unordered(d: dict[str, Any]) -> dict[str, Any]:
    return dict(sorted(d.items()))


def model_part(everything: dict[str, Any]) -> dict[str, Any]:
    """The model's weights: the tensors not under ``optimizer.`` (``chained_1.optimizer.``)."""
    return {
        k: v
        for k, v in everything.items()
        if isinstance(v, torch.Tensor) and not re.match(r"(chained_\d+\.)?optimizer\.", k)
    }


def reference(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """megatron-core's loaders on ``folder`` (child process: its import is slow and warns)."""
    out = tmp_path_factory.mktemp("megatron-ref") / "ref.pt"
    proc = subprocess.run(
        [sys.executable, str(REFERENCE), str(folder), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref: dict[str, Any] = torch.load(out, weights_only=False)
    return ref


@pytest.fixture(scope="module")
def megatron_ref(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return reference(ITER, tmp_path_factory)


@pytest.fixture(scope="module")
def torch_ref(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """torch's reading of the same folder: ``common.pt``'s entries, then ``dcp_to_torch_save``'s
    (each ShardedObject, which megatron-core stores as ``[data]``, as ``data``)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path_factory.mktemp("torch-ref") / "dcp.pt"
    dcp_to_torch_save(str(ITER), str(out))
    common = torch.load(ITER / "common.pt", weights_only=False)
    dcp = torch.load(out, weights_only=False)
    objects = {k: v[0] for k, v in dcp.items() if "/shard_" in k}  # stored as [data]
    return {**common, **dcp, **objects}


@needs_megatron
def test_model_equals_megatron_loader(megatron_ref: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    result = consolidate(GPT, out)
    assert result.verified and result.world_size == 2
    got = torch.load(out, weights_only=True)
    want = model_part(megatron_ref["plain"])
    assert len(want) == 8 and want["decoder.layers.mlp.linear_fc1.weight"].shape == (2, 8, 4)
    same(got, want)


@needs_megatron
def test_everything_equals_megatron_loader(megatron_ref: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "all.pt"
    consolidate(ITER, out, select="all")
    got = torch.load(out, weights_only=False)
    plain = megatron_ref["plain"]  # common state, then every tensor under its global key
    assert list(got)[: len(plain)] == list(plain)
    same({k: got[k] for k in plain}, plain)
    same(unordered(got), unordered(megatron_ref["everything"]))  # + the ShardedObjects


def test_everything_equals_torch(torch_ref: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "all.pt"
    consolidate(GPT, out, select="all")
    got = torch.load(out, weights_only=False)
    same(unordered(got), unordered(torch_ref))
    assert "rng_state/shard_0.1_1.2" in got and got["iteration"] == 10


def test_model_safetensors_equals_torch(torch_ref: dict[str, Any], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "model.safetensors"
    res = CliRunner().invoke(cli, ["consolidate", str(GPT), str(out)])
    assert res.exit_code == 0, res.output
    same(unordered(load_file(out)), unordered(model_part(torch_ref)))


def test_inspect_reports_megatron_and_the_choice(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["inspect", str(GPT)])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("megatron:"))
    assert "torch_dist 1, iteration 10, tensor parallel 2, pipeline parallel 1" in line
    assert "read iter_0000010/ (named by latest_checkpointed_iteration.txt)" in line
    assert "model state dict: 8 tensors" in res.output
    res = CliRunner().invoke(cli, ["inspect", "--json", str(ITER)])
    facts = json.loads(res.output)["distributed"]["facts"]["megatron"]
    assert facts == {
        "backend": "torch_dist 1",
        "iteration": 10,
        "tensor_parallel": 2,
        "pipeline_parallel": 1,
    }


def nemo_folder(tmp_path: Path, weights: str = "weights") -> Path:
    nemo = tmp_path / "nemo"
    shutil.copytree(ITER, nemo / weights)
    (nemo / "context").mkdir()
    (nemo / "context" / "model.yaml").write_text("_target_: nemo.collections.llm.GPTModel\n")
    return nemo


@pytest.mark.parametrize("weights", ["weights", "model_weights"])
def test_nemo_folder(torch_ref: dict[str, Any], tmp_path: Path, weights: str) -> None:
    nemo = nemo_folder(tmp_path, weights)
    ckpt = open_checkpoint(nemo)
    assert ckpt.path == str(nemo / weights)
    facts = ckpt.facts["distributed"].facts["megatron"]
    assert facts["chosen"] == weights and facts["by"] == "NeMo"
    res = CliRunner().invoke(cli, ["inspect", str(nemo)])
    assert f"read {weights}/ (NeMo's weights folder)" in res.output
    out = tmp_path / "model.pt"
    consolidate(nemo, out)
    same(unordered(torch.load(out, weights_only=True)), unordered(model_part(torch_ref)))


def test_tracker_names_release_or_a_missing_iteration(tmp_path: Path) -> None:
    parent = tmp_path / "ckpts"
    shutil.copytree(ITER, parent / "release")
    (parent / "latest_checkpointed_iteration.txt").write_text("release\n")
    assert open_checkpoint(parent).path == str(parent / "release")
    (parent / "latest_checkpointed_iteration.txt").write_text("20")
    with pytest.raises(CheckpointError, match=r"iter_0000020: is missing \(named by latest"):
        open_checkpoint(parent)
    res = CliRunner().invoke(cli, ["consolidate", str(parent), str(tmp_path / "m.pt")])
    assert res.exit_code != 0 and "iter_0000020: is missing" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "m.pt").exists()
    (parent / "latest_checkpointed_iteration.txt").write_text("ten")
    with pytest.raises(CheckpointError, match="names no iteration"):
        open_checkpoint(parent)


def test_other_backends_refused(tmp_path: Path) -> None:
    folder = tmp_path / "zarr"
    shutil.copytree(ITER, folder)
    meta = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**meta, "sharded_backend": "zarr"}))
    with pytest.raises(CheckpointError, match="'zarr' backend; ckpttool reads torch_dist only"):
        open_checkpoint(folder)


def test_scan_is_safe_and_hostile_common_pt_refused(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["scan", str(GPT)])
    assert res.exit_code == 0, res.output
    assert "common.pt" in res.output and ".metadata" in res.output
    folder = tmp_path / "iter_0000010"
    shutil.copytree(ITER, folder)
    shutil.copy(REPO / "fixtures" / "malicious.pt", folder / "common.pt")
    verdict = open_checkpoint(folder).verdict
    assert verdict is not None and verdict.dangerous  # the same verdict as any torch file
    res = CliRunner().invoke(cli, ["inspect", str(folder)])
    assert "dangerous" in res.output
    res = CliRunner().invoke(cli, ["scan", str(folder)])
    assert res.exit_code == 3 and "common.pt" in res.output
    out = tmp_path / "m.pt"
    res = CliRunner().invoke(cli, ["consolidate", str(folder), str(out)])
    assert res.exit_code == 3 and not out.exists()


@pytest.mark.parametrize(
    ("arg", "kind"),
    [(b"K\x02", "data"), (b"X\x01\x00\x00\x00x", "dangerous"), (b"cos\nsystem\n", "dangerous")],
)
def test_write_item_type_only_with_an_int(arg: bytes, kind: str) -> None:
    """torch's WriteItemType(2) is an enum lookup; called with anything else it is not data."""
    pkl = b"\x80\x02ctorch.distributed.checkpoint.planner\nWriteItemType\n" + arg + b"\x85R."
    verdict = judge([walk(pkl)])
    assert verdict.kind_of("torch.distributed.checkpoint.planner.WriteItemType") == kind


def _mcore_metadata(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewrite ``.metadata`` as megatron-core 0.8 to 0.15 pickled it: an ``MCoreMetadata``
    whose ``mcore_data`` marks one optimizer tensor N-D reformulated."""
    from dataclasses import dataclass

    from torch.distributed.checkpoint.metadata import Metadata

    name = "megatron.core.dist_checkpointing.strategies.torch"

    @dataclass
    class MCoreMetadata(Metadata):
        mcore_data: dict[str, dict[str, Any]] | None = None

    MCoreMetadata.__module__ = name
    MCoreMetadata.__qualname__ = "MCoreMetadata"
    parts = name.split(".")
    for i in range(1, len(parts)):  # pickle imports the package too (megatron may be absent)
        if ".".join(parts[:i]) not in sys.modules:
            monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType("stand-in"))
    monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(MCoreMetadata=MCoreMetadata))
    with open(folder / ".metadata", "rb") as f:
        old = pickle.load(f)
    key = "optimizer.state.exp_avg.output_layer.weight"
    fields = dict(vars(old))
    plans = fields.pop("all_local_plans")  # set after the Metadata is made, as megatron does
    new = MCoreMetadata(**fields, mcore_data={key: {"nd_reformulated_orig_global_shape": (6, 4)}})
    new.all_local_plans = plans  # type: ignore[attr-defined]
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(new, f)


def test_a_recorded_shape_that_does_not_fit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "iter_0000010"
    shutil.copytree(ITER, folder)
    _mcore_metadata(folder, monkeypatch)  # (6, 4) recorded for a tensor stored as (6, 4)
    with pytest.raises(CheckpointError, match=r"stored as \[6, 4\], which is no N-D reform"):
        open_checkpoint(folder)
    res = CliRunner().invoke(cli, ["consolidate", str(folder), str(tmp_path / "m.pt")])
    assert res.exit_code != 0 and "no N-D reformulation" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "m.pt").exists()


# -- megatron-core 0.15: its own Metadata class, optimizer state stored N-D reformulated --------
def generator() -> Any:
    spec = importlib.util.spec_from_file_location("make_megatron", FIXTURES / "make_megatron.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_v015_verdict_and_inspect() -> None:
    ckpt = open_checkpoint(OLD)
    assert ckpt.verdict is not None
    for cls in ("MCoreMetadata", "MCoreSavePlan"):  # loading imports megatron.core
        assert ckpt.verdict.kind_of(MCORE + cls) == "unvetted code"
    assert ckpt.facts["distributed"].facts["megatron"]["reformulated"] == sorted(
        generator().flat_tensors()
    )
    res = CliRunner().invoke(cli, ["inspect", str(OLD)])
    assert "3 N-D reformulated optimizer tensors reshaped" in res.output
    res = CliRunner().invoke(cli, ["scan", str(OLD)])
    assert res.exit_code == 5 and "MCoreMetadata" in res.output


def test_v015_reformulated_tensors_in_their_shape(tmp_path: Path) -> None:
    """Each flattened-range tensor equals the one the generator split: the original shape, the
    original C order (megatron-core 0.15's load_plain_tensors returns it flattened to 1-D)."""
    out = tmp_path / "all.pt"
    res = CliRunner().invoke(cli, ["consolidate", str(OLD), str(out), "--all"])
    assert res.exit_code == 0, res.output
    got = torch.load(out, weights_only=False)
    gen = generator()
    for key, (shape, _tp) in gen.flat_tensors().items():
        same(got[key], gen.values(key, shape))
    assert got["optimizer.state.exp_avg_sq.row_parallel.weight"].shape == (4, 8)  # TP on axis 1


@needs_megatron
def test_v015_equals_megatron_loader(tmp_path: Path, tmp_path_factory: Any) -> None:
    """megatron-core 0.16 still loads 0.15's folders (it keeps stand-ins for the two classes),
    but returns the reformulated tensors as stored: those are compared above instead."""
    ref = reference(OLD / "iter_0000010", tmp_path_factory)
    out = tmp_path / "all.pt"
    consolidate(OLD, out, select="all")
    got = torch.load(out, weights_only=False)
    flat = generator().flat_tensors()
    assert set(got) == set(ref["everything"])
    same(unordered({k: v for k, v in got.items() if k not in flat}),
         unordered({k: v for k, v in ref["everything"].items() if k not in flat}))  # fmt: skip
    out = tmp_path / "model.pt"
    consolidate(OLD, out)
    same(torch.load(out, weights_only=True), model_part(ref["plain"]))
