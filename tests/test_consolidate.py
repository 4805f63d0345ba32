"""``consolidate``: DCP folders made by real FSDP2 runs, compared with ``dcp_to_torch_save``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import ckpttool
from ckpttool.cli import cli
from ckpttool.errors import CheckpointError
from ckpttool.ops.consolidate import consolidate
from tests.test_dcp import dcp_folders, torch_consolidated
from tests.torch_objects import same

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    return dcp_folders(tmp_path_factory)


@pytest.fixture(scope="module")
def oracle(folders: dict[int, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("oracle-c")
    return {w: torch_consolidated(f, tmp) for w, f in folders.items()}


@pytest.mark.parametrize("world", [2, 4])
def test_model_pt_equals_torch(folders: Any, oracle: Any, world: int, tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    result = consolidate(folders[world], out)
    assert result.verified and result.world_size == world and result.format == "pt"
    same(torch.load(out, weights_only=True), oracle[world]["model"])


@pytest.mark.parametrize("world", [2, 4])
def test_all_pt_equals_torch(folders: Any, oracle: Any, world: int, tmp_path: Path) -> None:
    out = tmp_path / "all.pt"
    consolidate(folders[world], out, select="all")
    same(torch.load(out, weights_only=True), oracle[world])


def test_entry_pt_equals_torch(folders: Any, oracle: Any, tmp_path: Path) -> None:
    out = tmp_path / "optim.pt"
    consolidate(folders[4], out, select="optim")
    same(torch.load(out, weights_only=True), oracle[4]["optim"])


@pytest.mark.parametrize("world", [2, 4])
def test_safetensors_equals_torch(folders: Any, oracle: Any, world: int, tmp_path: Path) -> None:
    from safetensors import safe_open

    out = tmp_path / "model.safetensors"
    consolidate(folders[world], out)
    want = oracle[world]["model"]
    with safe_open(str(out), framework="pt") as f:
        assert list(f.keys()) == sorted(want)
        assert f.metadata() == {"format": "pt", "step": "2"}
        for k, v in want.items():
            same(f.get_tensor(k), v, k)


def test_shards_dtype_and_prefix(folders: Any, oracle: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "shards"
    result = consolidate(
        folders[4], out, max_shard_size=20_000, dtype="bfloat16", add_prefix="net."
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    got: dict[str, Any] = {}
    for name in shards:
        got.update(load_file(str(out / name)))
    want = oracle[4]["model"]
    assert sorted(got) == sorted(f"net.{k}" for k in want) and result.renamed == len(want)
    for k, v in want.items():
        expect = v.to(torch.bfloat16) if v.is_floating_point() else v
        same(got[f"net.{k}"], expect, k)  # floats cast, the int64 buffer kept
    assert result.cast == sum(1 for v in want.values() if v.is_floating_point())


def test_cast_keeps_optimizer_state(folders: Any, oracle: Any, tmp_path: Path) -> None:
    out = tmp_path / "all16.pt"
    consolidate(folders[2], out, select="all", dtype="float16")
    got = torch.load(out, weights_only=True)
    for k, v in oracle[2]["model"].items():
        same(got["model"][k], v.half() if v.is_floating_point() else v, k)
    same(got["optim"], oracle[2]["optim"])  # Adam state and step counters stay exact


def test_progress_counts_every_byte(folders: Any, tmp_path: Path) -> None:
    seen: list[int] = []
    total: list[int] = []

    def factory(n: int) -> Any:
        total.append(n)
        return seen.append

    result = consolidate(folders[2], tmp_path / "p.pt", select="all", progress=factory)
    assert total == [result.bytes] and sum(seen) == result.bytes


def test_corrupt_shard_fails_verification_and_writes_nothing(folders: Any, tmp_path: Path) -> None:
    import shutil

    from ckpttool.readers import dcp as dcp_reader

    bad = tmp_path / "bad"
    shutil.copytree(folders[2], bad)
    seg = dcp_reader.read(str(bad)).by_name()["model.tok.weight"].segments[0]
    with open(seg.file, "r+b") as f:  # flip a byte of a tensor: its zip CRC no longer matches
        f.seek(seg.offset + 5)
        byte = f.read(1)
        f.seek(seg.offset + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    out = tmp_path / "out.pt"
    with pytest.raises(CheckpointError, match=r"verification failed.*tok\.weight"):
        consolidate(bad, out)
    assert not out.exists() and not list(tmp_path.glob(".out.pt*"))


def test_refuses_a_single_file(tmp_path: Path) -> None:
    src = tmp_path / "one.pt"
    torch.save({"w": torch.zeros(2)}, src)
    with pytest.raises(CheckpointError, match="not a distributed checkpoint"):
        consolidate(src, tmp_path / "o.pt")


def test_cli(folders: Any, oracle: Any, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    res = CliRunner().invoke(cli, ["consolidate", str(folders[4]), str(out)])
    assert res.exit_code == 0, res.output
    n = len(oracle[4]["model"])
    assert f"model weights (model) of a dcp checkpoint from 4 ranks, {n} tensors (verified)" in (
        res.output
    )
    res = CliRunner().invoke(cli, ["consolidate", str(folders[4]), str(out)])
    assert res.exit_code == 1 and "--force" in res.output
    res = CliRunner().invoke(cli, ["consolidate", str(folders[4]), str(out) + "2", "--only", "no"])
    assert res.exit_code == 1 and "has no entry 'no'" in res.output
    res = CliRunner().invoke(
        cli, ["consolidate", str(folders[4]), str(out), "--all", "--only", "x"]
    )
    assert res.exit_code == 2
    res = CliRunner().invoke(cli, ["consolidate", str(folders[2]), str(out), "--all", "--force"])
    assert res.exit_code == 0
    same(torch.load(out, weights_only=True), oracle[2])


def test_convert_and_to_safetensors_accept_folders(
    folders: Any, oracle: Any, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "c.pt"
    res = CliRunner().invoke(cli, ["convert", str(folders[2]), str(out), "--only", "optim"])
    assert res.exit_code == 0, res.output
    same(torch.load(out, weights_only=True), oracle[2]["optim"])
    st = tmp_path / "c.safetensors"
    res = CliRunner().invoke(cli, ["to-safetensors", str(folders[2]), str(st), "--strip-module"])
    assert res.exit_code == 0, res.output
    got = load_file(str(st))
    assert sorted(got) == sorted(oracle[2]["model"])
    res = CliRunner().invoke(cli, ["convert", str(folders[2]), str(out), "--plain-objects"])
    assert res.exit_code == 2 and "folder of shards" in res.output


def test_model_output_loads_into_the_model(folders: Any, tmp_path: Path) -> None:
    """The default output is what ``model.load_state_dict`` (strict) accepts."""
    from tests.test_dcp import WORKER

    classes = WORKER[WORKER.index("class Block") : WORKER.index("def save")]
    namespace: dict[str, Any] = {"torch": torch}
    exec(classes, namespace)  # the fixture's own model classes
    model = namespace["GPT"]()
    out = tmp_path / "m.pt"
    consolidate(folders[4], out)
    missing, unexpected = model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert not missing and not unexpected
    assert model.head.weight is model.tok.weight  # still tied after loading


def test_top_level_weights_as_torchtitan_saves_them(tmp_path: Path) -> None:
    """Model weights flattened to the top level beside optimizer and train state."""
    import warnings

    import torch.distributed.checkpoint as dcp

    lin = torch.nn.Linear(4, 3)
    saved = {
        **lin.state_dict(),
        "optimizer": {"state": {"weight": {"exp_avg": torch.ones(3, 4)}}},
        "train_state": {"step": 5},
    }
    folder = tmp_path / "titan"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: torch warns that it saves alone
        dcp.save(saved, checkpoint_id=str(folder), no_dist=True)
    out = tmp_path / "w.pt"
    result = consolidate(folder, out)
    assert result.selected == "model weights"
    same(torch.load(out, weights_only=True), dict(lin.state_dict()))  # DCP keeps no OrderedDict
    consolidate(folder, out, select="all", add_prefix="m.", force=True)
    got = torch.load(out, weights_only=True)
    assert list(got) == ["m.weight", "m.bias", "optimizer", "train_state"]
    same(got["optimizer"], saved["optimizer"])


def test_library_convert_of_a_folder_points_to_consolidate(folders: Any, tmp_path: Path) -> None:
    """The CLI's convert and to-safetensors hand a folder to consolidate; the library functions
    say which function does it (in its argument words), and write nothing."""
    for fn, out in ((ckpttool.convert, "o.pt"), (ckpttool.to_safetensors, "o.safetensors")):
        with pytest.raises(ckpttool.CheckpointError, match=r"ckpttool\.consolidate\(folder"):
            fn(folders[2], tmp_path / out)
    assert list(tmp_path.iterdir()) == []
