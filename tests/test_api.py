"""``ckpttool.training.api``: load, fix_state_dict, unwrap, save."""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn

from ckpttool.errors import CheckpointError, DangerousCheckpointError
from ckpttool.readers import open_checkpoint
from ckpttool.testing import save_as, saved_as
from ckpttool.training import api

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
CUDA_ERROR = "Attempting to deserialize object on a CUDA device"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)
        self.register_buffer("scale", torch.ones(2))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def locations(path: Path) -> set[str]:
    return {s.location for s in open_checkpoint(path).storages.values()}


def temp_files(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".ckpttool-tmp")]


@pytest.fixture
def process_group() -> Iterator[None]:
    """A single-process gloo group, enough to build a DDP wrapper on the CPU."""
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def compile_model() -> Any:
    """``torch.compile`` with the eager backend: builds the wrapper without importing inductor."""

    def compile_(model: nn.Module) -> nn.Module:
        return torch.compile(model, backend="eager")  # type: ignore[return-value]

    return compile_


# -- import ---------------------------------------------------------------------------------------
def test_import_does_not_import_torch() -> None:
    code = "import sys, ckpttool.training.api; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- load -----------------------------------------------------------------------------------------
@no_cuda
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_load_cuda_tagged_file_lands_on_cpu(tmp_path: Path, legacy: bool) -> None:
    model = net()
    path = tmp_path / "ddp.pt"
    save_as(
        {"model": nn.DataParallel(model).state_dict(), "epoch": 3}, path, "cuda:0", legacy=legacy
    )
    with pytest.raises(RuntimeError, match=CUDA_ERROR):
        torch.load(path)  # what the API is for
    ckpt = api.load(path)
    assert ckpt["epoch"] == 3
    for key, value in model.state_dict().items():
        loaded = ckpt["model"]["module." + key]
        assert loaded.device == torch.device("cpu")
        assert torch.equal(loaded, value)


@no_cuda
def test_load_model_parallel_file_every_device_tag(tmp_path: Path) -> None:
    path = FIXTURES / "model_parallel_cuda0-3.pt"
    assert len(locations(path)) > 1
    ckpt = api.load(path, map_location=torch.device("cpu"))
    assert {t.device.type for t in ckpt.values()} == {"cpu"}


@pytest.mark.parametrize("mmap", [None, False, True])
def test_load_mmap_choices_give_same_tensors(tmp_path: Path, mmap: bool | None) -> None:
    path = tmp_path / "m.pt"
    model = net()
    with saved_as("cuda:1"):
        torch.save(model.state_dict(), path)
    sd = api.load(path, "cpu", mmap=mmap)
    assert sd.keys() == model.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert list(sd._metadata) == list(model.state_dict()._metadata)


def test_load_mmap_refused_for_legacy_files(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    save_as(net().state_dict(), path, "cuda:0", legacy=True)
    with pytest.raises(
        CheckpointError, match="mmap=True needs a torch zip file; this one is legacy"
    ):
        api.load(path, mmap=True)


def test_load_safetensors_file() -> None:
    path = FIXTURES / "model.safetensors"
    expected = safetensors.torch.load_file(path)
    got = api.load(path, map_location="cpu")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], v) and got[k].device.type == "cpu" for k, v in expected.items())


@pytest.mark.parametrize("which", ["folder", "index"])
def test_load_sharded_checkpoint_merges_shards(which: str) -> None:
    folder = FIXTURES / "sharded"
    path = folder if which == "folder" else folder / "model.safetensors.index.json"
    got = api.load(path)
    expected: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        expected.update(safetensors.torch.load_file(shard))
    assert sorted(got) == sorted(expected)
    assert list(got) == list(open_checkpoint(folder).root)  # the index's order
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_load_sharded_torch_bin_shards(tmp_path: Path) -> None:
    import json

    a = {"a.weight": torch.randn(2, 2)}
    b = {"b.weight": torch.randn(3)}
    save_as(a, tmp_path / "pytorch_model-1.bin", "cuda:0")
    save_as(b, tmp_path / "pytorch_model-2.bin", "cuda:1")
    index = {"weight_map": {"a.weight": "pytorch_model-1.bin", "b.weight": "pytorch_model-2.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    got = api.load(tmp_path)
    assert list(got) == ["a.weight", "b.weight"]
    assert torch.equal(got["a.weight"], a["a.weight"]) and torch.equal(
        got["b.weight"], b["b.weight"]
    )
    assert {t.device.type for t in got.values()} == {"cpu"}


def test_load_refuses_map_location_none(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"x": torch.ones(1)}, path)
    with pytest.raises(ValueError, match="device recorded in the file"):
        api.load(path, map_location=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a device"):
        api.load(path, map_location="gpu0")
    with pytest.raises(TypeError, match="map_location must be"):
        api.load(path, map_location=0)  # type: ignore[arg-type]


@no_cuda
def test_load_to_cuda_without_cuda_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"x": torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match="map_location cuda:0 asked for, but CUDA is absent"):
        api.load(path, map_location="cuda:0")


def test_load_errors_are_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        api.load(tmp_path / "missing.pt")
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(CheckpointError, match="is a text file, not a checkpoint"):
        api.load(text)
    truncated = tmp_path / "truncated.pt"
    torch.save({"x": torch.ones(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"truncated\.pt"):
        api.load(truncated)
    with pytest.raises(CheckpointError, match=r"TorchScript archive.*torch\.jit\.load"):
        api.load(FIXTURES / "torchscript_module.pt")


def test_load_weights_only_refusal_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "args.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError) as info:
        api.load(path)
    message = str(info.value)
    assert "argparse.Namespace" in message and "plain_objects=True" in message
    assert "weights_only=False" in message
    assert api.load(path, weights_only=False)["args"].lr == 0.1


def test_load_names_dangerous_globals_without_running_them(tmp_path: Path) -> None:
    path = tmp_path / "danger.pt"
    torch.save({"f": os.system}, path)  # a reference to os.system, nothing is called
    with pytest.raises(DangerousCheckpointError, match="system"):
        api.load(path)


# -- unwrap ---------------------------------------------------------------------------------------
def test_unwrap_every_wrapper_stack(compile_model: Any, process_group: None) -> None:
    model = net()
    ddp = nn.parallel.DistributedDataParallel
    for wrapped in (
        model,
        nn.DataParallel(model),
        compile_model(model),
        ddp(model),
        nn.DataParallel(compile_model(model)),
        compile_model(nn.DataParallel(model)),
        ddp(compile_model(model)),
    ):
        assert api.unwrap(wrapped) is model


# -- fix_state_dict -------------------------------------------------------------------------------
def check_fix(model: nn.Module, sd: dict[str, Any], stripped: Any, added: Any) -> api.FixResult:
    before = list(sd)
    result = api.fix_state_dict(model, sd)
    assert list(sd) == before, "the input was modified"
    assert result.state_dict is not sd
    assert (result.stripped, result.added) == (stripped, added)
    assert result.ok, result.summary()
    model.load_state_dict(result.state_dict, strict=True)
    return result


def test_fix_ddp_keys_for_a_bare_model() -> None:
    src = net(1)
    bad = nn.DataParallel(src).state_dict()
    target = net(2)
    result = check_fix(target, bad, "module.", None)
    assert list(result.state_dict) == list(src.state_dict())
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in target.state_dict().items())
    assert result.summary() == "stripped 'module.'; all keys match"


def test_fix_bare_keys_for_dataparallel() -> None:
    model = nn.DataParallel(net(2))
    result = check_fix(model, net(1).state_dict(), None, "module.")
    assert all(k.startswith("module.") for k in result.state_dict)


def test_fix_matching_keys_are_copied_unchanged() -> None:
    sd = net(1).state_dict()
    result = check_fix(net(2), sd, None, None)
    assert not result.changed and list(result.state_dict) == list(sd)
    assert result.summary() == "keys unchanged; all keys match"


def test_fix_for_compiled_models(compile_model: Any) -> None:
    bare = net(1).state_dict()
    ddp_keys = nn.DataParallel(net(1)).state_dict()
    compiled = compile_model(net(2))
    check_fix(compiled, bare, None, "_orig_mod.")
    check_fix(compiled, ddp_keys, "module.", "_orig_mod.")
    # A compiled model's file into a bare model.
    check_fix(net(3), compile_model(net(1)).state_dict(), "_orig_mod.", None)
    # Stacked: DataParallel around a compiled model.
    stacked = nn.DataParallel(compile_model(net(2)))
    assert next(iter(stacked.state_dict())).startswith("module._orig_mod.")
    check_fix(stacked, bare, None, "module._orig_mod.")
    check_fix(stacked, ddp_keys, None, "_orig_mod.")


def test_fix_for_ddp(process_group: None) -> None:
    ddp = nn.parallel.DistributedDataParallel(net(2))
    check_fix(ddp, net(1).state_dict(), None, "module.")
    check_fix(ddp, nn.DataParallel(net(1)).state_dict(), None, None)


def test_fix_reports_missing_and_unexpected_after_the_fix() -> None:
    sd = nn.DataParallel(net(1)).state_dict()
    del sd["module.fc2.bias"]
    sd["module.extra.weight"] = torch.zeros(1)
    result = api.fix_state_dict(net(2), sd)
    assert result.stripped == "module."
    assert result.missing == ["fc2.bias"]
    assert result.unexpected == ["extra.weight"]
    assert not result.ok
    assert result.summary() == "stripped 'module.'; 1 missing, 1 unexpected; e.g. fc2.bias"


def test_fix_renames_metadata_and_leaves_the_input_alone() -> None:
    sd = nn.DataParallel(net(1)).state_dict()
    meta_before = dict(sd._metadata)
    result = api.fix_state_dict(net(2), sd)
    assert dict(sd._metadata) == meta_before
    assert set(result.state_dict._metadata) == {"", "fc1", "fc2"}
    back = api.fix_state_dict(nn.DataParallel(net(2)), result.state_dict)
    assert set(back.state_dict._metadata) == {"module", "module.fc1", "module.fc2"}


def test_fix_adds_module_even_where_a_child_is_named_module() -> None:
    """``add_prefix`` skips keys already starting with the prefix; a real rename must not."""

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)
            self.head = nn.Linear(2, 1)

    sd = Outer().state_dict()
    result = check_fix(nn.DataParallel(Outer()), sd, None, "module.")
    assert list(result.state_dict) == ["module." + k for k in sd]


def test_fix_keeps_keys_when_renaming_would_match_less() -> None:
    class Inner(nn.Module):  # every key starts with "model.", a known wrapper prefix
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Linear(2, 2)

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Linear(2, 2)
            self.weight = nn.Parameter(torch.zeros(1))

    sd = Inner().state_dict()  # prefix "model." detected; Flat's keys have none in common
    result = api.fix_state_dict(Flat(), sd)
    assert not result.changed
    assert result.missing == ["weight"] and result.unexpected == []


def test_fix_refuses_a_training_checkpoint() -> None:
    ckpt = {"model": nn.DataParallel(net(1)).state_dict(), "epoch": 3}
    with pytest.raises(ValueError, match=r"training checkpoint.*ckpt\['model'\]"):
        api.fix_state_dict(net(2), ckpt)


# -- save -----------------------------------------------------------------------------------------
def test_save_module_unwraps_and_writes_cpu_tags(tmp_path: Path, compile_model: Any) -> None:
    model = net(1)
    path = tmp_path / "m.pt"
    api.save(nn.DataParallel(compile_model(model)), path)
    assert locations(path) == {"cpu"}
    sd = torch.load(path)  # plain load, weights_only by default
    assert list(sd) == list(model.state_dict())
    assert set(sd._metadata) == set(model.state_dict()._metadata)
    net(2).load_state_dict(sd, strict=True)


def test_save_dict_unwraps_modules_and_optimizers(tmp_path: Path) -> None:
    model = net(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = model.fc2(model.fc1(torch.ones(1, 4))).sum()
    loss.backward()
    opt.step()
    path = tmp_path / "ckpt.pt"
    api.save({"model": nn.DataParallel(model), "optimizer": opt, "epoch": 7, "note": "x"}, path)
    ckpt = torch.load(path)
    assert ckpt["epoch"] == 7 and ckpt["note"] == "x"
    assert list(ckpt["model"]) == list(model.state_dict())
    assert ckpt["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    assert torch.equal(
        ckpt["optimizer"]["state"][0]["momentum_buffer"],
        opt.state_dict()["state"][0]["momentum_buffer"],
    )


def test_save_keeps_tied_weights_tied_and_views_strided(tmp_path: Path) -> None:
    model = Tied()
    base = torch.arange(12.0).reshape(3, 4)
    path = tmp_path / "tied.pt"
    api.save({"model": model, "view": base.t(), "base": base}, path)
    assert len(open_checkpoint(path).storages) == 2  # embedding/head share one; base/view one
    ckpt = torch.load(path)
    sd = ckpt["model"]
    assert sd["embed.weight"].untyped_storage().data_ptr() == (
        sd["head.weight"].untyped_storage().data_ptr()
    )
    assert ckpt["view"].stride() == (1, 4)
    assert ckpt["view"].untyped_storage().data_ptr() == ckpt["base"].untyped_storage().data_ptr()
    loaded = Tied()
    loaded.load_state_dict(sd, strict=True)
    assert loaded.head.weight is loaded.embed.weight


def test_save_failure_leaves_no_temp_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    api.save({"w": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="cannot save"):
        api.save({"w": torch.zeros(2), "fn": lambda: None}, path)
    assert path.read_bytes() == before
    assert temp_files(tmp_path) == []
    with pytest.raises(CheckpointError, match="missing"):
        api.save({"w": torch.ones(1)}, tmp_path / "missing" / "ckpt.pt")


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    api.save({"step": 1}, path)
    api.save({"step": 2}, path)
    assert torch.load(path) == {"step": 2}
    assert temp_files(tmp_path) == []


def test_save_only_rank_zero_writes(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    api.save({"w": torch.ones(1)}, path, rank=1)
    assert not path.exists()
    api.save({"w": torch.ones(1)}, path, rank=0)
    assert path.exists()


def test_save_in_a_process_group_waits_on_the_barrier(
    tmp_path: Path, process_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_barrier = dist.barrier

    def barrier(*args: Any, **kwargs: Any) -> Any:
        calls.append("barrier")
        return real_barrier(*args, **kwargs)

    monkeypatch.setattr(dist, "barrier", barrier)
    path = tmp_path / "ckpt.pt"
    api.save(nn.parallel.DistributedDataParallel(net(1)), path)
    assert calls == ["barrier"]
    assert list(torch.load(path)) == list(net(1).state_dict())
    # A failure on rank 0 still reaches the barrier, so other ranks do not hang, then raises.
    with pytest.raises(CheckpointError):
        api.save({"fn": lambda: None}, path)
    assert calls == ["barrier", "barrier"]


@needs_cuda
def test_save_from_cuda_keeps_sharing(tmp_path: Path) -> None:
    model = Tied().cuda()
    base = torch.arange(12.0, device="cuda").reshape(3, 4)
    path = tmp_path / "tied.pt"
    api.save({"model": model, "view": base.t(), "base": base, "p": nn.Parameter(base[0])}, path)
    assert locations(path) == {"cpu"}
    assert len(open_checkpoint(path).storages) == 2
    ckpt = torch.load(path, weights_only=True)
    sd = ckpt["model"]
    assert sd["embed.weight"].device.type == "cpu"
    assert sd["embed.weight"].untyped_storage().data_ptr() == (
        sd["head.weight"].untyped_storage().data_ptr()
    )
    assert ckpt["view"].stride() == (1, 4) and torch.equal(ckpt["view"], base.t().cpu())
    assert isinstance(ckpt["p"], nn.Parameter) and torch.equal(ckpt["p"], base[0].cpu())
    assert model.embed.weight.device.type == "cuda"  # the model itself is not moved


@needs_cuda
def test_load_to_a_given_cuda_device(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"x": torch.ones(3)}, path)
    got = api.load(path, map_location="cuda:0")
    assert got["x"].device == torch.device("cuda:0")
    got = api.load(FIXTURES / "model.safetensors", map_location=torch.device("cuda", 0))
    assert {t.device.type for t in got.values()} == {"cuda"}


def test_mapping_keeps_containers_and_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tree walk of api.save, with every tensor "moved" (cloned) as a CUDA one would be."""
    Pair = collections.namedtuple("Pair", "a b")
    sd = net(1).state_dict()
    shared = torch.ones(2)
    tree = {"sd": sd, "t": (shared, [shared]), "p": Pair(shared, 3), "n": 1}
    assert api._to_cpu(tree, {})["sd"] is sd  # all on the CPU: nothing is copied

    monkeypatch.setattr(api, "_tensor_to_cpu", lambda t, memo, torch, nn: t.clone())
    out = api._to_cpu(tree, {})
    assert out["sd"] is not sd and isinstance(out["sd"], collections.OrderedDict)
    assert out["sd"]._metadata is sd._metadata
    assert list(out["sd"]) == list(sd)
    assert out["t"][0] is not shared and out["t"][0] is out["t"][1][0] is out["p"].a
    assert isinstance(out["p"], Pair) and out["p"].b == 3 and out["n"] == 1
