"""``ckpttool convert``: CPU re-save, key surgery, safety and faults.

Inputs are files written here with ``torch.save`` (GPU tags via ``saved_as``), the committed
fixtures and the real-world files. Only files created by these tests are ever loaded with
``weights_only=False``.
"""

from __future__ import annotations

import argparse
import collections
import copy
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

import ckpttool
from ckpttool.readers import open_checkpoint
from ckpttool.testing import saved_as

TMP_SUFFIX = ".ckpttool-tmp"
NUMPY_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"


# -- helpers -----------------------------------------------------------------------------------
def flat(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a loaded checkpoint by dotted path (dicts, lists, tuples)."""
    out: dict[str, torch.Tensor] = {}
    stack = [(prefix, obj)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, torch.Tensor):
            out[path] = node
        elif isinstance(node, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            stack.extend((f"{path}.{i}" if path else str(i), v) for i, v in enumerate(node))
    return out


def storage_u8(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor's whole storage, as a uint8 tensor (no Python-level copy)."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())


def assert_same_tensor(a: torch.Tensor, b: torch.Tensor, name: str = "") -> None:
    assert b.device.type == "cpu", name
    assert a.dtype == b.dtype, name
    assert a.shape == b.shape, name
    assert a.stride() == b.stride(), name
    assert a.storage_offset() == b.storage_offset(), name
    assert type(a) is type(b), name
    assert a.requires_grad == b.requires_grad, name
    assert torch.equal(storage_u8(a), storage_u8(b)), name
    if not (a.is_floating_point() and a.isnan().any()):
        assert torch.equal(a, b), name


def assert_same_tensors(a: Any, b: Any) -> None:
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert_same_tensor(fa[name], fb[name], name)


def storage_groups(obj: Any) -> list[list[str]]:
    """Tensor names grouped by shared storage (the partition that tying defines)."""
    groups: dict[Any, list[str]] = collections.defaultdict(list)
    for name, t in sorted(flat(obj).items()):
        storage = t.untyped_storage()
        groups[storage.data_ptr() if storage.nbytes() else name].append(name)
    return sorted(groups.values())


def locations(path: Path) -> set[str]:
    return {s.location for s in open_checkpoint(path).storages.values()}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_bytes(storage: Any) -> bytes:
    with open(storage.file, "rb") as f:
        f.seek(storage.offset)
        return f.read(storage.nbytes)


def assert_same_as_input_by_bytes(src: Path, dst: Path) -> None:
    """Compare through the reader: same names, views and storage bytes (inputs torch refuses)."""
    a, b = open_checkpoint(src), open_checkpoint(dst)
    ta, tb = a.tensors(), b.tensors()
    assert [t.name for t in ta] == [t.name for t in tb]
    part_a: dict[str, list[str]] = collections.defaultdict(list)
    part_b: dict[str, list[str]] = collections.defaultdict(list)
    for x, y in zip(ta, tb, strict=True):
        assert (x.dtype, x.shape, x.stride, x.storage_offset) == (
            y.dtype,
            y.shape,
            y.stride,
            y.storage_offset,
        ), x.name
        assert y.storage.location == "cpu"
        assert not x.storage.compressed
        assert raw_bytes(x.storage) == raw_bytes(y.storage), x.name
        part_a[x.storage.key].append(x.name)
        part_b[y.storage.key].append(y.name)
    assert sorted(part_a.values()) == sorted(part_b.values())


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(TMP_SUFFIX))


def wrote_line(dst: Path, tensors: int, storages: int, verified: bool = True) -> str:
    check = "verified: structure and storage bytes re-read" if verified else "not verified"
    t, s = "tensor" + "s" * (tensors != 1), "storage" + "s" * (storages != 1)
    return f"wrote {dst}: {tensors} {t} in {storages} {s}, all on cpu ({check})"


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 4))


def _train_checkpoint(with_objects: bool = True) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.DataParallel(_mlp())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(5, 8)).sum().backward()
    opt.step()
    ckpt: dict[str, Any] = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 37,
    }
    if with_objects:
        ckpt["args"] = argparse.Namespace(lr=1e-3, arch="mlp", layers=[8, 16, 4])
        ckpt["best_acc"] = np.float64(0.913)
    return ckpt


@pytest.fixture
def ddp_file(tmp_path: Path) -> Path:
    """A DDP rank-0 training checkpoint written here, storages tagged cuda:0."""
    path = tmp_path / "in" / "ddp.pt"
    path.parent.mkdir()
    with saved_as("cuda:0"):
        torch.save(_train_checkpoint(), path)
    return path


@pytest.fixture
def sd_file(tmp_path: Path) -> Path:
    """A bare DataParallel state dict (weights-only loadable), tagged cuda:0."""
    path = tmp_path / "in" / "sd.pt"
    path.parent.mkdir()
    with saved_as("cuda:0"):
        torch.save(_train_checkpoint()["model"], path)
    return path


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


# -- every fixture -----------------------------------------------------------------------------
def test_convert_fixture(
    run_cli,
    expect_error,
    fixture_name: str,
    fixtures_dir: Path,
    expected_fixtures: dict[str, Any],
    out_dir: Path,
    in_tmp_cwd: Path,
) -> None:
    exp = expected_fixtures[fixture_name]
    src = fixtures_dir / fixture_name
    dst = out_dir / "out.pt"
    before = {p: sha(p) for p in ([src] if src.is_file() else sorted(src.iterdir()))}

    if fixture_name == "malicious.pt":
        expect_error(
            ["convert", src, dst],
            src,
            "refusing: the pickle names dangerous globals (builtins.exec); it may run code",
            code=3,
        )
        assert list(out_dir.iterdir()) == []
        assert not (in_tmp_cwd / "CKPTTOOL_PWNED").exists()
        return
    if exp["format"] == "torchscript":
        expect_error(
            ["convert", src, dst],
            src,
            "is a TorchScript archive (code and weights): convert does not rewrite it; "
            "use `ckpttool to-safetensors --all` to extract its tensors",
        )
        assert list(out_dir.iterdir()) == []
        return

    res = run_cli("convert", src, dst)
    assert res.exit_code == 0, res.stderr
    # the result on stdout (`convert a b > log` keeps it), notes on stderr
    assert res.out_lines == [wrote_line(dst, exp["tensors"], exp["storages"])]
    assert locations(dst) == ({"cpu"} if exp["storages"] else set())
    assert open_checkpoint(dst).format == "zip"
    assert leftovers(out_dir) == []
    assert {p: sha(p) for p in before} == before  # the input is never modified

    if exp["format"] == "safetensors":
        want = safetensors.torch.load_file(src)
    elif exp["format"] == "hf-sharded":
        want = {}
        for shard in exp["shards"]:
            want.update(safetensors.torch.load_file(src / shard))
    elif exp.get("weights_only_loadable"):
        want = torch.load(src, map_location="cpu", weights_only=True)
    else:
        assert res.err_lines[0].startswith("note: the output still pickles ")
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            torch.load(dst)
        assert_same_as_input_by_bytes(src, dst)
        return
    got = torch.load(dst)  # plain load, weights_only default, no map_location
    assert_same_tensors(want, got)
    assert storage_groups(want) == storage_groups(got)
    if isinstance(want, dict) and exp["format"] in ("zip", "legacy"):
        assert list(got) == list(want)


# -- every real-world file ---------------------------------------------------------------------
def test_convert_real_world(
    run_cli, expect_error, rw_record: dict[str, Any], real_world: Path, out_dir: Path
) -> None:
    rec = rw_record
    src = real_world / rec["file"]
    dst = out_dir / "out.pt"
    if rec["format"] == "torchscript":
        res = expect_error(["convert", src, dst], src)
        assert res.err_lines[0].startswith(f"Error: {src}: is a TorchScript archive")
        assert list(out_dir.iterdir()) == []
        return
    res = run_cli("convert", src, dst, "--allow-user-classes")  # whole pickled models
    assert res.exit_code == 0, res.stderr
    n_storages = rec["num_storages"] if rec["num_storages"] is not None else rec["num_tensors"]
    assert res.out_lines[-1] == wrote_line(dst, rec["num_tensors"], n_storages)
    assert locations(dst) <= {"cpu"}
    assert_same_as_input_by_bytes(src, dst)
    unsafe = rec.get("unsafe_globals", [])
    if rec["format"] == "safetensors":
        assert_same_tensors(safetensors.torch.load_file(src), torch.load(dst))
    elif not unsafe:
        want = torch.load(src, map_location="cpu", weights_only=True)
        got = torch.load(dst)
        assert_same_tensors(want, got)
        if isinstance(want, dict):
            assert list(got) == list(want)
    else:
        note = res.err_lines[0]
        assert note.startswith("note: the output still pickles ")
        assert note.endswith(
            ": torch.load(weights_only=True) refuses it; --plain-objects replaces them"
        )
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            torch.load(dst)
        plain = out_dir / "plain.pt"
        res = run_cli("convert", "--plain-objects", src, plain)
        assert res.exit_code == 0, res.stderr
        replaced = [ln for ln in res.out_lines if ln.startswith("replaced ")]
        assert replaced
        names = {re.match(r"replaced (\S+) -> ", ln).group(1) for ln in replaced}  # type: ignore[union-attr]
        assert names <= set(unsafe), names - set(unsafe)
        loaded = torch.load(plain)  # default weights_only loader accepts it now
        # numpy arrays become tensors; no tensor of the input is lost
        assert len(flat(loaded)) >= rec["num_tensors"]
        assert locations(plain) <= {"cpu"}


# -- the seed problem: real DDP files into unwrapped models ------------------------------------
class LeNet(nn.Module):
    """The EMNIST LeNet of 04 (keys and shapes read with `ckpttool inspect --tensors`)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 340)
        self.fc2 = nn.Linear(340, 150)
        self.fc3 = nn.Linear(150, 47)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class ShortcutA(nn.Module):
    """akamaster's option-A shortcut: subsample and zero-pad channels; no parameters."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """akamaster/pytorch_resnet_cifar10's resnet20 (3 BasicBlocks per stage, 16/32/64)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        self.layer1 = self._stage(16, 1)
        self.layer2 = self._stage(32, 2)
        self.layer3 = self._stage(64, 2)
        self.linear = nn.Linear(64, num_classes)

    def _stage(self, planes: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in (stride, 1, 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.flatten(1))


@pytest.mark.parametrize(
    ("name", "key", "make", "shape"),
    [
        ("03_legacy-cuda0-dataparallel-resnet20.th", "state_dict", ResNet20, (2, 3, 32, 32)),
        ("04_zip-cuda0-dataparallel-lenet-ckpt.pth", "net", LeNet, (2, 1, 28, 28)),
    ],
    ids=["03-resnet20", "04-lenet"],
)
def test_real_ddp_file_loads_into_unwrapped_model(
    run_cli,
    real_world: Path,
    out_dir: Path,
    name: str,
    key: str,
    make: type[nn.Module],
    shape: tuple[int, ...],
) -> None:
    src = real_world / name
    assert locations(src) == {"cuda:0"}
    with pytest.raises(RuntimeError, match="Attempting to deserialize object on a CUDA device"):
        torch.load(src, weights_only=True)
    dst = out_dir / "fixed.pt"
    res = run_cli("convert", "--strip-module", src, dst)
    assert res.exit_code == 0, res.stderr
    assert res.out_lines[0].startswith("renamed ") and f"state dict '{key}'" in res.out_lines[0]
    assert locations(dst) == {"cpu"}
    ckpt = torch.load(dst)  # plain torch.load on this CPU-only machine
    sd = ckpt[key]
    assert not any(k.startswith("module.") for k in sd)
    model = make()
    model.load_state_dict(sd, strict=True)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(*shape))
    assert torch.isfinite(out).all()
    # the weights are the file's, bit for bit; the other entries (acc, epoch, ...) carried over
    original = torch.load(src, map_location="cpu", weights_only=True)
    for k, v in original[key].items():
        assert_same_tensor(v, sd[k.removeprefix("module.")], k)
    assert list(ckpt) == list(original)
    for k in set(original) - {key}:
        assert ckpt[k] == original[k], k


def test_real_lightning_replace_prefix(run_cli, real_world: Path, out_dir: Path) -> None:
    src = real_world / "38_lightning2-ckpt-model-prefix-cuda0.ckpt"
    dst = out_dir / "plain.pt"
    res = run_cli("convert", "--state-dict", "state_dict", "--replace-prefix", "model.=", src, dst)
    assert res.exit_code == 0, res.stderr
    want = torch.load(src, map_location="cpu", weights_only=True)
    got = torch.load(dst)
    assert all(k.startswith("model.") for k in want["state_dict"])
    assert list(got["state_dict"]) == [k.removeprefix("model.") for k in want["state_dict"]]
    assert res.out_lines[0] == f"renamed {len(want['state_dict'])} keys in state dict 'state_dict'"
    for k, v in want["state_dict"].items():
        assert_same_tensor(v, got["state_dict"][k.removeprefix("model.")], k)
    assert list(got) == list(want)
    assert_same_tensors(want["optimizer_states"], got["optimizer_states"])
    assert got["epoch"] == want["epoch"] and got["global_step"] == want["global_step"]
    assert got["hyper_parameters"] == want["hyper_parameters"]
    assert locations(dst) == {"cpu"}


# -- key surgery -------------------------------------------------------------------------------
def test_strip_module_training_checkpoint(run_cli, ddp_file: Path, out_dir: Path) -> None:
    dst = out_dir / "cpu.pt"
    res = run_cli("convert", "--strip-module", ddp_file, dst)
    assert res.exit_code == 0, res.stderr
    want = torch.load(ddp_file, map_location="cpu", weights_only=False)  # our own file
    n = len(want["model"])
    assert res.out_lines[0] == f"renamed {n} keys in state dict 'model'"
    assert res.err_lines[0] == (
        "note: the output still pickles argparse.Namespace, "
        f"{NUMPY_CORE}.multiarray.scalar, numpy.dtype: torch.load(weights_only=True) refuses it; "
        "--plain-objects replaces them"
    )
    total = len(flat(want))
    assert res.out_lines[1] == wrote_line(dst, total, total)
    got = torch.load(dst, weights_only=False)  # our own file: objects carried byte-for-byte
    assert list(got) == list(want)
    assert list(got["model"]) == [k.removeprefix("module.") for k in want["model"]]
    for k, v in want["model"].items():
        assert_same_tensor(v, got["model"][k.removeprefix("module.")], k)
    # optimizer state is keyed by parameter index: carried over unchanged
    assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
    assert_same_tensors(want["optimizer"]["state"], got["optimizer"]["state"])
    assert got["epoch"] == 37
    assert got["args"] == want["args"] and isinstance(got["args"], argparse.Namespace)
    assert got["best_acc"] == want["best_acc"] and type(got["best_acc"]) is np.float64
    assert locations(dst) == {"cpu"}


def test_metadata_survives_and_is_renamed(sd_file: Path, out_dir: Path) -> None:
    dst = out_dir / "s.pt"
    result = ckpttool.convert(sd_file, dst, strip_prefix="module.")
    want = torch.load(sd_file, map_location="cpu", weights_only=True)
    assert result.verified and result.renamed == [("", len(want))]
    ref = copy.deepcopy(want)
    consume_prefix_in_state_dict_if_present(ref, "module.")
    got = torch.load(dst)
    assert list(got) == list(ref)
    assert dict(got._metadata) == dict(ref._metadata)
    assert list(got._metadata) == ["", "0", "1", "2", "3"]
    fresh = _mlp()
    fresh.load_state_dict(got, strict=True)


def test_round_trip_strip_then_add(sd_file: Path, out_dir: Path) -> None:
    plain, stripped, back = out_dir / "plain.pt", out_dir / "stripped.pt", out_dir / "back.pt"
    ckpttool.convert(sd_file, plain)
    ckpttool.convert(sd_file, stripped, strip_prefix="module.")
    ckpttool.convert(stripped, back, add_prefix="module.")
    a, b = torch.load(plain), torch.load(back)
    assert list(a) == list(b)
    assert_same_tensors(a, b)
    # strip folds the wrapper's root entry into the model's, as torch does; the rest returns
    assert {k: v for k, v in a._metadata.items() if k} == dict(b._metadata)


def test_round_trip_bytes_identical_without_metadata(tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "od.pt"
    torch.manual_seed(1)
    sd = collections.OrderedDict((f"module.{k}", v.clone()) for k, v in _mlp().state_dict().items())
    with saved_as("cuda:0"):
        torch.save({"model": sd, "epoch": 1}, src)
    plain, stripped, back = out_dir / "plain.pt", out_dir / "stripped.pt", out_dir / "back.pt"
    ckpttool.convert(src, plain)
    ckpttool.convert(src, stripped, strip_prefix="module.")
    ckpttool.convert(stripped, back, add_prefix="module.")
    assert plain.read_bytes() == back.read_bytes()
    assert plain.read_bytes() != stripped.read_bytes()


def test_add_module_is_idempotent(run_cli, fixtures_dir: Path, out_dir: Path) -> None:
    src = fixtures_dir / "dataparallel_state_dict.pt"
    dst = out_dir / "a.pt"
    res = run_cli("convert", "--add-module", src, dst)
    assert res.exit_code == 0
    assert res.err_lines[0] == (
        "warning: --add-module renamed no key: every key already starts with 'module.'"
    )  # exit 0 all the same: adding is idempotent by design
    assert list(torch.load(dst)) == list(torch.load(src, map_location="cpu", weights_only=True))


def test_add_module_to_single_gpu_file(run_cli, fixtures_dir: Path, out_dir: Path) -> None:
    src = fixtures_dir / "single_gpu_state_dict.pt"
    dst = out_dir / "dp.pt"
    res = run_cli("convert", "--add-module", src, dst)
    assert res.exit_code == 0
    want = torch.load(src, weights_only=True)
    got = torch.load(dst)
    assert list(got) == ["module." + k for k in want]
    dp = nn.DataParallel(
        nn.Sequential(collections.OrderedDict(fc1=nn.Linear(8, 16), fc2=nn.Linear(16, 4)))
    )
    assert [k for k in dp.state_dict()] == list(got)
    dp.load_state_dict(got, strict=True)


@pytest.mark.parametrize(
    ("args", "prefix"),
    [
        (["--strip-prefix", "_orig_mod."], "_orig_mod."),
        (["--replace-prefix", "_orig_mod.="], "_orig_mod."),
    ],
)
def test_strip_compile_prefix(
    run_cli, fixtures_dir: Path, out_dir: Path, args: list[str], prefix: str
) -> None:
    src = fixtures_dir / "compiled_orig_mod.pt"
    dst = out_dir / "c.pt"
    assert run_cli("convert", *args, src, dst).exit_code == 0
    want = torch.load(src, weights_only=True)
    assert list(torch.load(dst)) == [k.removeprefix(prefix) for k in want]


def test_collision_refused_naming_both_keys(expect_error, tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "coll.pt"
    torch.save({"module.fc.weight": torch.ones(2), "fc.weight": torch.zeros(2)}, src)
    dst = out_dir / "x.pt"
    expect_error(
        ["convert", "--strip-module", src, dst],
        src,
        "renaming would make 'module.fc.weight' and 'fc.weight' both 'fc.weight'",
    )
    assert list(out_dir.iterdir()) == []


def test_collision_in_nested_state_dict(expect_error, tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "coll.pt"
    torch.save({"model": {"module.w": torch.ones(2), "w": torch.zeros(2)}, "epoch": 1}, src)
    expect_error(
        ["convert", "--strip-module", src, out_dir / "x.pt"],
        src,
        "renaming would make 'module.w' and 'w' both 'w' in 'model'",
    )


def test_key_and_only_errors(expect_error, fixtures_dir: Path, out_dir: Path) -> None:
    src = fixtures_dir / "ddp_rank0_checkpoint.pt"
    dst = out_dir / "x.pt"
    expect_error(
        ["convert", "--only", "nope", src, dst],
        src,
        "no entry 'nope' to select (top-level keys: 'model', 'optimizer', 'epoch', 'args', "
        "'best_acc')",
    )
    expect_error(
        ["convert", "--state-dict", "nope", "--strip-module", src, dst],
        src,
        "no entry 'nope' (--state-dict)",
    )
    assert list(out_dir.iterdir()) == []


def test_replace_prefix_needs_equals(run_cli, fixtures_dir: Path, out_dir: Path) -> None:
    res = run_cli(
        "convert", "--replace-prefix", "bad", fixtures_dir / "tied_weights.pt", out_dir / "x"
    )
    assert res.exit_code == 2
    assert "Error: Invalid value for --replace-prefix: 'bad' is not OLD=NEW" in res.stderr
    assert list(out_dir.iterdir()) == []


def test_key_options_on_files_without_state_dicts(
    expect_error, real_world: Path, out_dir: Path
) -> None:
    src = real_world / "15_legacy-whole-module-sequential.pkl"
    expect_error(
        ["convert", "--strip-module", src, out_dir / "x.pt"],
        src,
        "holds a whole pickled module, not a state dict: key options do not apply",
    )
    src = real_world / "22_zip-hf-training-args-no-tensors.bin"
    expect_error(
        ["convert", "--strip-module", src, out_dir / "x.pt"],
        src,
        "no state dict found to rename; choose one with --state-dict",
    )


# -- structure ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tied_weights.pt", "legacy_format.pt"])
def test_tied_weights_stay_tied(run_cli, fixtures_dir: Path, out_dir: Path, name: str) -> None:
    src = fixtures_dir / name
    dst = out_dir / "t.pt"
    assert run_cli("convert", src, dst).exit_code == 0
    want = torch.load(src, map_location="cpu", weights_only=True)
    got = torch.load(dst)
    groups = storage_groups(got)
    assert groups == storage_groups(want)
    assert any(len(g) > 1 for g in groups)
    if name == "tied_weights.pt":
        ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
        assert ptr(got["embed.weight"]) == ptr(got["lm_head.weight"])
        assert ptr(got["attn.k.weight"]) == ptr(got["attn.qkv.weight"])
        assert got["attn.k.weight"].storage_offset() == 64
        got["embed.weight"][0, 0] = 123.0
        assert got["lm_head.weight"][0, 0] == 123.0


def test_noncontiguous_keep_strides(run_cli, fixtures_dir: Path, out_dir: Path) -> None:
    src = fixtures_dir / "noncontiguous_view.pt"
    dst = out_dir / "n.pt"
    assert run_cli("convert", src, dst).exit_code == 0
    got = torch.load(dst)
    assert got["transposed"].stride() == (1, 4) and not got["transposed"].is_contiguous()
    assert (got["column"].stride(), got["column"].storage_offset()) == ((4,), 1)
    assert got["expanded"].stride() == (0, 1)
    assert got["rows"].untyped_storage().data_ptr() == got["column"].untyped_storage().data_ptr()
    assert_same_tensors(torch.load(src, weights_only=True), got)


def test_only_model(run_cli, ddp_file: Path, out_dir: Path) -> None:
    dst = out_dir / "m.pt"
    res = run_cli("convert", "--only", "model", "--strip-module", ddp_file, dst)
    assert res.exit_code == 0, res.stderr
    assert not any(ln.startswith("note:") for ln in res.err_lines)
    got = torch.load(dst)  # only tensors left: the default loader accepts it
    want = torch.load(ddp_file, map_location="cpu", weights_only=False)["model"]
    assert isinstance(got, collections.OrderedDict)
    assert list(got) == [k.removeprefix("module.") for k in want]
    _mlp().load_state_dict(got, strict=True)


def test_only_nested_path(run_cli, ddp_file: Path, out_dir: Path) -> None:
    dst = out_dir / "o.pt"
    assert run_cli("convert", "--only", "optimizer.param_groups", ddp_file, dst).exit_code == 0
    want = torch.load(ddp_file, map_location="cpu", weights_only=False)
    assert torch.load(dst) == want["optimizer"]["param_groups"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_dtype_casts_floats_only(run_cli, tmp_path: Path, out_dir: Path, dtype: str) -> None:
    src = tmp_path / "mixed.pt"
    torch.manual_seed(0)
    base = torch.randn(4, 6, dtype=torch.float64)
    obj = {
        "f32": torch.randn(3, 5),
        "f64_t": base.t(),  # non-contiguous view
        "f64_row": base[1],  # view at an offset of the same storage
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 2).bfloat16(),
        "i64": torch.arange(5),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(4, dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "c64": torch.randn(3, dtype=torch.complex64),
        "step": 7,
    }
    with saved_as("cuda:1"):
        torch.save(obj, src)
    dst = out_dir / f"{dtype}.pt"
    res = run_cli("convert", "--dtype", dtype, src, dst)
    assert res.exit_code == 0, res.stderr
    want = torch.load(src, map_location="cpu", weights_only=True)
    got = torch.load(dst)
    target = getattr(torch, dtype)
    for k, v in want.items():
        if not isinstance(v, torch.Tensor):
            assert got[k] == v
            continue
        if v.is_floating_point():
            assert got[k].dtype == target, k
            cast = v.to(target)
            assert torch.equal(got[k], cast), k
            assert got[k].stride() == v.stride() and got[k].storage_offset() == v.storage_offset()
        else:
            assert_same_tensor(v, got[k], k)
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert ptr(got["f64_t"]) == ptr(got["f64_row"])
    assert locations(dst) == {"cpu"}


def test_dtype_keeps_tied_weights_tied(run_cli, fixtures_dir: Path, out_dir: Path) -> None:
    dst = out_dir / "h.pt"
    assert (
        run_cli("convert", "--dtype", "float16", fixtures_dir / "tied_weights.pt", dst).exit_code
        == 0
    )
    got = torch.load(dst)
    want = torch.load(fixtures_dir / "tied_weights.pt", weights_only=True)
    assert storage_groups(got) == storage_groups(want)
    for k, v in want.items():
        assert torch.equal(got[k], v.half()), k


# -- objects torch's weights_only loader refuses -------------------------------------------------
def _objects_checkpoint(path: Path) -> dict[str, Any]:
    obj = {
        "model": collections.OrderedDict(w=torch.arange(4.0).reshape(2, 2)),
        "args": argparse.Namespace(lr=0.1, name="run-7", layers=[1, 2], device=torch.device("cpu")),
        "best": np.float64(0.5),
        "count": np.int64(3),
        "arr": np.arange(6, dtype=np.float32).reshape(2, 3),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
    }
    with saved_as("cuda:0"):
        torch.save(obj, path)
    return obj


def test_plain_objects(run_cli, tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "objs.pt"
    obj = _objects_checkpoint(src)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(src, map_location="cpu")
    dst = out_dir / "plain.pt"
    res = run_cli("convert", "--plain-objects", src, dst)
    assert res.exit_code == 0, res.stderr
    replaced = [ln for ln in res.out_lines if ln.startswith("replaced ")]
    assert sorted(replaced) == sorted(
        [
            "replaced argparse.Namespace -> dict",
            f"replaced {NUMPY_CORE}.multiarray.scalar -> float",
            f"replaced {NUMPY_CORE}.multiarray.scalar -> int",
            f"replaced {NUMPY_CORE}.multiarray._reconstruct -> tensor",
            f"replaced {NUMPY_CORE}.multiarray._reconstruct -> tensor",
        ]
    )
    assert not any(ln.startswith("note:") for ln in res.err_lines)
    got = torch.load(dst)  # default weights_only=True
    assert got["args"] == vars(obj["args"])
    assert got["best"] == 0.5 and type(got["best"]) is float
    assert got["count"] == 3 and type(got["count"]) is int
    assert torch.equal(got["arr"], torch.from_numpy(obj["arr"]))
    assert torch.equal(got["fortran"], torch.from_numpy(np.ascontiguousarray(obj["fortran"])))
    assert got["fortran"].dtype == torch.int16
    assert_same_tensor(obj["model"]["w"], got["model"]["w"])
    assert locations(dst) == {"cpu"}


def test_without_plain_objects_notes_and_keeps_objects(
    run_cli, tmp_path: Path, out_dir: Path
) -> None:
    src = tmp_path / "objs.pt"
    obj = _objects_checkpoint(src)
    dst = out_dir / "kept.pt"
    res = run_cli("convert", src, dst)
    assert res.exit_code == 0
    note = res.err_lines[0]
    assert note.startswith("note: the output still pickles argparse.Namespace, ")
    assert note.endswith(
        "and more: torch.load(weights_only=True) refuses it; --plain-objects replaces them"
    )
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(dst)
    got = torch.load(dst, weights_only=False)  # a file this test created
    assert got["args"] == obj["args"]
    assert got["best"] == obj["best"] and type(got["best"]) is np.float64
    assert type(got["count"]) is np.int64
    np.testing.assert_array_equal(got["arr"], obj["arr"])
    np.testing.assert_array_equal(got["fortran"], obj["fortran"])
    assert got["fortran"].flags.f_contiguous
    assert locations(dst) == {"cpu"}


def test_per_channel_quantized(run_cli, tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "q.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates the quantized creation functions
        q = torch.quantize_per_channel(
            torch.randn(2, 3), torch.tensor([0.1, 0.2]), torch.tensor([0, 1]), 0, torch.qint8
        )
        torch.save({"qc": q}, src)
    dst = out_dir / "q.pt"
    res = run_cli("convert", src, dst)
    assert res.exit_code == 0, res.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own loader warns about TypedStorage here
        got = torch.load(dst)["qc"]
    assert torch.equal(got.int_repr(), q.int_repr())
    assert torch.equal(got.q_per_channel_scales(), q.q_per_channel_scales())


def test_per_tensor_quantized(run_cli, tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "q.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(torch.randn(5), 0.1, 3, torch.quint8)
        torch.save({"q": q}, src)
        dst = out_dir / "q.pt"
        assert run_cli("convert", src, dst).exit_code == 0
        got = torch.load(dst)["q"]
    assert torch.equal(got.int_repr(), q.int_repr())
    assert (got.q_scale(), got.q_zero_point()) == (q.q_scale(), q.q_zero_point())


def test_parameters_and_odd_values_round_trip(tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "odd.pt"
    obj = {
        "p": nn.Parameter(torch.ones(2)),
        "frozen": nn.Parameter(torch.ones(2), requires_grad=False),
        "grad": torch.ones(2, requires_grad=True),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5),
        "sparse": torch.eye(3).to_sparse(),
        "nested": (torch.ones(1), [torch.zeros(2), {"x": torch.full((2,), 7)}]),
        "misc": [None, {1, 2}, b"raw", 1 + 2j, torch.Size([2, 3]), torch.float16],
    }
    with saved_as("cuda:2"):
        torch.save(obj, src)
    dst = out_dir / "odd.pt"
    ckpttool.convert(src, dst)
    got = torch.load(dst)
    want = torch.load(src, map_location="cpu", weights_only=True)
    assert type(got["p"]) is nn.Parameter and got["p"].requires_grad
    assert type(got["frozen"]) is nn.Parameter and not got["frozen"].requires_grad
    assert got["grad"].requires_grad
    assert torch.equal(got["sparse"].to_dense(), torch.eye(3))
    assert got["misc"] == want["misc"]
    dense = {k: v for k, v in want.items() if k != "sparse"}
    assert_same_tensors(dense, {k: v for k, v in got.items() if k != "sparse"})


# -- refusals ----------------------------------------------------------------------------------
def test_dangerous_refused_nothing_written(
    expect_error, fixtures_dir: Path, out_dir: Path, in_tmp_cwd: Path
) -> None:
    src = fixtures_dir / "malicious.pt"
    existing = out_dir / "keep.pt"
    existing.write_bytes(b"precious")
    expect_error(
        ["convert", "--force", src, existing],
        src,
        "refusing: the pickle names dangerous globals (builtins.exec); it may run code",
        code=3,
    )
    assert existing.read_bytes() == b"precious"
    assert sorted(p.name for p in out_dir.iterdir()) == ["keep.pt"]
    assert not (in_tmp_cwd / "CKPTTOOL_PWNED").exists()


def test_existing_output_refused_then_forced(
    run_cli, expect_error, sd_file: Path, out_dir: Path
) -> None:
    dst = out_dir / "x.pt"
    dst.write_bytes(b"old contents\x00\x01")
    expect_error(["convert", sd_file, dst], dst, "output exists; pass --force to replace it")
    assert dst.read_bytes() == b"old contents\x00\x01"
    res = run_cli("convert", "--force", sd_file, dst)
    assert res.exit_code == 0
    assert_same_tensors(torch.load(sd_file, map_location="cpu", weights_only=True), torch.load(dst))
    assert leftovers(out_dir) == []


def test_output_is_input_refused(expect_error, sd_file: Path) -> None:
    before = sd_file.read_bytes()
    problem = "output is the input file; pass --in-place to replace it"
    expect_error(["convert", sd_file, sd_file], sd_file, problem)
    link = sd_file.parent / "link.pt"
    link.symlink_to(sd_file.name)
    expect_error(["convert", sd_file, link], link, problem)
    expect_error(["convert", link, sd_file], sd_file, problem)
    hard = sd_file.parent / "hard.pt"
    os.link(sd_file, hard)
    expect_error(["convert", sd_file, hard], hard, problem)
    assert sd_file.read_bytes() == before
    assert link.is_symlink()


def test_in_place(run_cli, sd_file: Path) -> None:
    before = sd_file.read_bytes()
    inode = sd_file.stat().st_ino
    with open(sd_file, "rb") as old:
        res = run_cli("convert", "--in-place", "--strip-module", sd_file, sd_file)
        assert res.exit_code == 0, res.stderr
        # atomic: a new file was renamed into place; the old one stayed whole until then
        assert old.read() == before
    assert sd_file.stat().st_ino != inode
    assert locations(sd_file) == {"cpu"}
    got = torch.load(sd_file)
    assert not any(k.startswith("module.") for k in got)
    _mlp().load_state_dict(got, strict=True)
    assert leftovers(sd_file.parent) == []


def test_output_is_directory(expect_error, sd_file: Path, out_dir: Path) -> None:
    (out_dir / "sub").mkdir()
    for extra in ([], ["--force"]):
        expect_error(
            ["convert", *extra, sd_file, out_dir / "sub"],
            out_dir / "sub",
            "output is a directory; give a file name",
        )
    assert [p.name for p in out_dir.iterdir()] == ["sub"]


def test_output_folder_missing(expect_error, sd_file: Path, tmp_path: Path) -> None:
    dst = tmp_path / "no" / "such" / "x.pt"
    expect_error(["convert", sd_file, dst], dst, f"output folder {dst.parent} does not exist")


@pytest.mark.parametrize(
    "target", ["model-00001-of-00002.safetensors", "model.safetensors.index.json"]
)
def test_output_is_a_shard_of_the_input_refused(
    run_cli, fixtures_dir: Path, tmp_path: Path, target: str
) -> None:
    folder = tmp_path / "sharded"
    shutil.copytree(fixtures_dir / "sharded", folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    dst = folder / target
    res = run_cli("convert", "--force", folder, dst)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert res.exit_code == 1
    assert res.err_lines == [
        f"Error: {dst}: output is the input file; pass --in-place to replace it"
    ]


def test_missing_input(expect_error, tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "nope.pt"
    expect_error(["convert", src, out_dir / "x.pt"], src, "no such file")
    assert list(out_dir.iterdir()) == []


def test_corrupt_input_nothing_written(expect_error, sd_file: Path, out_dir: Path) -> None:
    bad = sd_file.parent / "bad.pt"
    data = sd_file.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    res = expect_error(["convert", bad, out_dir / "x.pt"], bad)
    assert "zip" in res.stderr
    assert list(out_dir.iterdir()) == []


# -- output and verification options -------------------------------------------------------------
def test_quiet(run_cli, ddp_file: Path, out_dir: Path) -> None:
    dst = out_dir / "q.pt"
    res = run_cli("convert", "-q", "--strip-module", ddp_file, dst)
    assert res.exit_code == 0
    assert (res.stdout, res.stderr) == ("", "")
    assert locations(dst) == {"cpu"}
    # -q silences reports, not errors
    res = run_cli("convert", "-q", ddp_file, dst)
    assert res.exit_code == 1
    assert res.err_lines == [f"Error: {dst}: output exists; pass --force to replace it"]


def test_no_verify(run_cli, sd_file: Path, out_dir: Path) -> None:
    dst = out_dir / "nv.pt"
    res = run_cli("convert", "--no-verify", "--strip-module", sd_file, dst)
    assert res.exit_code == 0
    want = torch.load(sd_file, map_location="cpu", weights_only=True)
    assert res.out_lines[-1] == wrote_line(dst, len(want), len(want), verified=False)
    got = torch.load(dst)
    for k, v in want.items():
        assert_same_tensor(v, got[k.removeprefix("module.")], k)
    verified = out_dir / "v.pt"
    ckpttool.convert(sd_file, verified, strip_prefix="module.")
    assert verified.read_bytes() == dst.read_bytes()


def test_python_api(sd_file: Path, out_dir: Path) -> None:
    dst = out_dir / "api.pt"
    result = ckpttool.convert(str(sd_file), dst, strip_prefix="module.")
    n = len(torch.load(sd_file, map_location="cpu", weights_only=True))
    assert (result.tensors, result.storages, result.verified) == (n, n, True)
    assert result.renamed == [("", n)]
    with pytest.raises(ckpttool.CheckpointError, match="output exists; pass force=True"):
        ckpttool.convert(sd_file, dst)


# -- faults: disk full, read-only folder ---------------------------------------------------------
_LIMITED = """
import resource, runpy, signal, sys
limit = int(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = ["ckpttool", *sys.argv[2:]]
runpy.run_module("ckpttool", run_name="__main__")
"""


def _big_input(path: Path) -> Path:
    torch.manual_seed(0)
    with saved_as("cuda:0"):
        torch.save({f"module.l{i}.weight": torch.randn(128, 256) for i in range(4)}, path)
    return path


@pytest.mark.parametrize("limit", [700, 200_000], ids=["in-header", "in-storage-copy"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_disk_full(tmp_path: Path, out_dir: Path, limit: int, existing: bool) -> None:
    src = _big_input(tmp_path / "big.pt")
    assert src.stat().st_size > 2 * limit
    dst = out_dir / "x.pt"
    if existing:
        dst.write_bytes(b"keep me")
    cmd = [sys.executable, "-c", _LIMITED, str(limit), "convert", "--force", str(src), str(dst)]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 1, res.stderr
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"Error: {dst}: ")
    assert "nothing was written" in lines[0]
    assert re.search(r"too large|disk full|write failed|quota", lines[0]), lines[0]
    assert sorted(p.name for p in out_dir.iterdir()) == (["x.pt"] if existing else [])
    if existing:
        assert dst.read_bytes() == b"keep me"


def _ro_mount(folder: Path) -> str:
    """Shell commands that bind-mount ``folder`` read-only (in a private mount namespace)."""
    f = f'"{folder}"'
    return f"mount --bind {f} {f} && mount -o remount,bind,ro {f} {f}"


_UNSHARE = ["unshare", "-m", "--propagation", "private", "sh", "-c"]


def _ro_folder_supported(folder: Path) -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    script = f'{_ro_mount(folder)} && ! touch "{folder}/probe"'
    try:
        res = subprocess.run([*_UNSHARE, script], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0 and not (folder / "probe").exists()


def test_read_only_output_folder(tmp_path: Path, out_dir: Path) -> None:
    """As root chmod does not stop writes: bind-mount the folder read-only in a namespace."""
    if not _ro_folder_supported(out_dir):
        pytest.skip("cannot make a read-only bind mount here (needs unshare -m and mount)")
    src = _big_input(tmp_path / "big.pt")
    dst = out_dir / "x.pt"
    dst.write_bytes(b"keep me")
    cmd = [*_UNSHARE, f'{_ro_mount(out_dir)} && exec "$@"', "sh"]
    for force in ([], ["--force"]):
        res = subprocess.run(
            [*cmd, sys.executable, "-m", "ckpttool", "convert", *force, str(src), str(dst)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 1, res.stderr
        lines = res.stderr.splitlines()
        assert len(lines) == 1, res.stderr
        assert lines[0].startswith(f"Error: {dst}: ")
        if force:
            assert re.search(r"read-only|permission denied|cannot write", lines[0]), lines[0]
        assert dst.read_bytes() == b"keep me"
        assert [p.name for p in out_dir.iterdir()] == ["x.pt"]


def test_sharded_and_safetensors_json_report(run_cli, fixtures_dir: Path, out_dir: Path) -> None:
    for name in ("model.safetensors", "sharded"):
        dst = out_dir / f"{name}.pt"
        assert run_cli("convert", fixtures_dir / name, dst).exit_code == 0
        doc = json.loads(run_cli("inspect", "--json", dst).stdout)
        assert doc["format"] == "zip"
        assert set(doc["devices"]) == {"cpu"}
        assert doc["globals"] and all(g["kind"] == "torch" for g in doc["globals"])


def test_dtype_of_an_optimizer_entry_keeps_step_counters_exact(tmp_path: Path) -> None:
    """``--only optimizer --dtype``: no model state dict is chosen, so the moments are cast but
    Adam's 0-dim float32 ``step`` counters stay exact (bfloat16 cannot hold 1001)."""
    model = _mlp()
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 8)).sum().backward()
    opt.step()
    state = opt.state_dict()
    for s in state["state"].values():
        s["step"].fill_(1001.0)
    src = tmp_path / "opt.pt"
    torch.save({"model": model.state_dict(), "optimizer": state}, src)
    dst = tmp_path / "opt_bf16.pt"
    ckpttool.convert(src, dst, only="optimizer", dtype="bfloat16")
    got = torch.load(dst, weights_only=True)
    for s in got["state"].values():
        assert s["step"].dtype == torch.float32 and s["step"].item() == 1001.0
        assert s["exp_avg"].dtype == torch.bfloat16


def test_the_writers_re_read_of_their_own_pickle_skips_the_bomb_pre_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The input's data.pkl was walked by the verdict, the output's was written by ckpttool:
    neither is walked again by the reader's pre-pass (pickletools, ~0.1 s for thousands of
    tensors); a pickle changed on disk would be (tests/test_dcp.py holds the digest)."""
    import ckpttool
    from ckpttool.unpickling import parsed, scan

    walked: list[int] = []
    monkeypatch.setattr(scan, "_scan", lambda f, end: walked.append(end) or (None, None))
    torch.save({"module.w": torch.ones(3), "module.b": torch.zeros(2)}, tmp_path / "in.pt")
    parsed._PARSED.clear()
    ckpttool.convert(tmp_path / "in.pt", tmp_path / "out.pt", strip_prefix="module.")
    assert walked == []
    assert list(torch.load(tmp_path / "out.pt", weights_only=True)) == ["w", "b"]
