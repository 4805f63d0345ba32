"""``to-dcp``: the folder ckpttool writes is what ``dcp.save`` writes, read back by torch.

torch is the oracle three ways: the ``.metadata`` equals (dataclass for dataclass) the one
``dcp.save`` writes for the same state dict; ``dcp_to_torch_save`` of the folder equals
``torch.load`` of the input; and an optimizer that numbers its parameters is named as torch's
own ``get_optimizer_state_dict`` names it on the live model. (FSDP2 jobs resuming from these
folders: ``test_to_dcp_fsdp.py``.)
"""

from __future__ import annotations

import argparse
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ckpttool.cli import cli
from ckpttool.errors import CheckpointError
from ckpttool.ops.to_dcp import to_dcp

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.checkpoint")
nn = torch.nn


class Net(nn.Module):
    """Buffers between parameters (BatchNorm's are shaped like its parameters), a tied weight,
    a frozen layer, a 0-d and an int buffer."""

    def __init__(self, frozen_bias: bool = False) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(6, 4))
        self.register_buffer("mask", torch.ones(6, 6))  # float, between parameters
        self.register_buffer("count", torch.tensor(3))
        self.emb = nn.Embedding(10, 4)
        self.frozen = nn.Linear(4, 5, bias=frozen_bias)
        self.frozen.requires_grad_(False)
        self.ln = nn.LayerNorm(5)
        self.fc = nn.Linear(5, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: Any) -> Any:
        x = self.fc(self.ln(self.frozen(self.emb(idx) + self.pos[: idx.shape[1]])))
        return self.head(self.bn(x.transpose(1, 2)).transpose(1, 2))


def _trained(groups: str = "one", steps: int = 1, frozen_bias: bool = False) -> tuple[Any, Any]:
    torch.manual_seed(0)
    model = Net(frozen_bias)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if groups == "two":  # decay / no-decay, each in the model's order
        params: Any = [
            {"params": [p for n, p in trainable if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for n, p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]
    else:
        params = [p for _, p in trainable]
    opt = torch.optim.AdamW(params, lr=0.01)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        model(torch.randint(0, 10, (2, 5), generator=g)).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _named_by_torch(model: Any, opt: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    out: dict[str, Any] = get_optimizer_state_dict(
        model, opt, options=StateDictOptions(full_state_dict=True)
    )
    return out


def _back(folder: Path) -> Any:
    """``dcp_to_torch_save`` of the folder, loaded back."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = folder.parent / f"{folder.name}.back.pt"
    dcp_to_torch_save(str(folder), str(out))
    return torch.load(out, weights_only=True)


def _equal(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (path, list(a), list(b))
        for k in a:
            _equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _equal(x, y, f"{path}.{i}")
    else:
        assert a == b and type(a) is type(b), (path, a, b)


def _dcp_save(state: Any, folder: Path) -> Any:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: torch warns that it saves alone
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    with open(folder / ".metadata", "rb") as f:
        return pickle.load(f)  # our own fixture, written by torch a moment ago


# -- .pt in: the folder, the metadata and the optimizer, as torch has them -----------------------
@pytest.mark.parametrize("groups", ["one", "two"])
def test_pt_round_trips_with_the_optimizer_named_as_torch_names_it(
    tmp_path: Path, groups: str
) -> None:
    model, opt = _trained(groups)
    src = tmp_path / "ckpt.pt"
    ns = argparse.Namespace(lr=0.01, arch="net")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 4,
                "args": ns, "best": float("nan")}, src)  # fmt: skip
    result = to_dcp(src, tmp_path / "out")
    assert result.verified and result.optimizers == ["optimizer"]
    assert result.replaced == ["args: argparse.Namespace"]
    assert result.items == result.tensors - 1  # the tied weight is stored once, named twice
    expected = {
        "model": model.state_dict(),
        "optimizer": _named_by_torch(model, opt),
        "epoch": 4,
        "args": {"lr": 0.01, "arch": "net"},
    }
    back = _back(tmp_path / "out")
    best = back.pop("best")
    assert isinstance(best, float) and best != best  # NaN, read back and verified
    _equal(back, expected)


def test_metadata_equals_what_dcp_save_writes(tmp_path: Path) -> None:
    model, opt = _trained("two")
    state = {"model": model.state_dict(), "optimizer": _named_by_torch(model, opt), "step": 7}
    src = tmp_path / "ckpt.pt"
    torch.save(state, src)
    to_dcp(src, tmp_path / "ours")
    with open(tmp_path / "ours" / ".metadata", "rb") as f:
        ours = pickle.load(f)  # written by ckpttool a moment ago
    theirs = _dcp_save(torch.load(src, weights_only=True), tmp_path / "torch")
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    assert ours.planner_data == theirs.planner_data
    assert set(ours.storage_data) == set(theirs.storage_data)
    assert ours.version == theirs.version
    assert sorted(os.listdir(tmp_path / "ours")) == [".metadata", "__0_0.distcp"]


def test_a_model_state_dict_alone_loads_with_dcp_load(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    model, _ = _trained()
    src = tmp_path / "w.pt"
    torch.save(model.state_dict(), src)
    to_dcp(src, tmp_path / "out")
    fresh = Net()
    state = fresh.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(tmp_path / "out"), no_dist=True)
    fresh.load_state_dict(state)
    _equal(fresh.state_dict(), model.state_dict())


def test_model_only_under_key_and_cast(tmp_path: Path) -> None:
    model, opt = _trained()
    src = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, src)
    r = to_dcp(src, tmp_path / "a", model_only=True, under="model", dtype="bfloat16")
    assert r.selected == "model weights (model)" and r.optimizers == []
    want = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    _equal(_back(tmp_path / "a"), {"model": want})
    # the int buffers kept, the tied weight once
    assert r.cast == len(model.state_dict()) - 3
    r = to_dcp(src, tmp_path / "b", key="optimizer", strip_prefix="", add_prefix="net.")
    named = _named_by_torch(model, opt)
    named["state"] = {f"net.{k}": v for k, v in named["state"].items()}
    for g in named["param_groups"]:
        g["params"] = [f"net.{p}" for p in g["params"]]
    _equal(_back(tmp_path / "b"), named)


# -- other inputs ---------------------------------------------------------------------------------
def test_safetensors_and_hf_folders(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = {"a.weight": torch.randn(3, 4), "a.bias": torch.arange(4, dtype=torch.bfloat16)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    to_dcp(tmp_path / "m.safetensors", tmp_path / "st")
    _equal(_back(tmp_path / "st"), sd)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    save_file(sd, str(hf / "model.safetensors"))
    to_dcp(hf, tmp_path / "hf_dcp", under="model")
    _equal(_back(tmp_path / "hf_dcp"), {"model": sd})


def test_dcp_folder_to_dcp(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    from tests.test_dcp import dcp_folders, torch_consolidated

    src = dcp_folders(tmp_path_factory)[4]
    whole = torch_consolidated(src, tmp_path)
    to_dcp(src, tmp_path / "all")
    _equal(_back(tmp_path / "all"), whole)
    to_dcp(src, tmp_path / "model", model_only=True, dtype="bfloat16")
    want = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in whole["model"].items()
    }
    _equal(_back(tmp_path / "model"), want)


# -- naming a numbered optimizer, or refusing ----------------------------------------------------
def test_a_frozen_layer_shaped_like_trainable_ones_needs_naming(tmp_path: Path) -> None:
    """frozen.bias, ln.weight and ln.bias are all (5,): which two does the optimizer hold?"""
    model, opt = _trained(frozen_bias=True)
    src = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, src)
    res = _cli("to-dcp", src, tmp_path / "out")
    assert res.exit_code == 1 and not (tmp_path / "out").exists()
    assert "in more than one way: cannot name them; name the model's keys" in res.output
    assert "--not-param PATTERN" in res.output
    res = _cli("to-dcp", src, tmp_path / "out", "--not-param", "frozen.*")
    assert res.exit_code == 0, res.output
    _equal(_back(tmp_path / "out")["optimizer"], _named_by_torch(model, opt))


def test_an_optimizer_that_fits_two_ways_is_refused(tmp_path: Path) -> None:
    """Two same-shaped layers, the optimizer holds one and has no state yet: which one?"""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
    src = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, src)
    with pytest.raises(CheckpointError, match=r"more than one way.*no state to show their shape"):
        to_dcp(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    to_dcp(src, tmp_path / "out", model_only=True)  # the weights still convert


def test_an_optimizer_in_another_order_is_refused(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    opt = torch.optim.Adam([*model[1].parameters(), *model[0].parameters()])
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    src = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, src)
    with pytest.raises(CheckpointError, match="cannot be matched to the model's 4"):
        to_dcp(src, tmp_path / "out")


def test_thousands_of_parameters_are_named(tmp_path: Path) -> None:
    """No recursion: a model with 3,000 parameters and float buffers between some of them."""
    model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(1500)))
    for i in range(0, 1500, 100):
        model[i].register_buffer("scale", torch.ones(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    src = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, src)
    to_dcp(src, tmp_path / "out", key="optimizer")
    _equal(_back(tmp_path / "out"), _named_by_torch(model, opt))


def test_an_optimizer_without_a_model_is_refused(tmp_path: Path) -> None:
    _, opt = _trained()
    src = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), src)
    with pytest.raises(CheckpointError, match="no model state dict to name them by"):
        to_dcp(src, tmp_path / "out")


def test_named_optimizer_state_is_written_as_it_is(tmp_path: Path) -> None:
    model, opt = _trained()
    named = _named_by_torch(model, opt)
    src = tmp_path / "ckpt.pt"
    torch.save({"optim": named}, src)
    assert to_dcp(src, tmp_path / "out").optimizers == []
    _equal(_back(tmp_path / "out"), {"optim": named})


# -- the command line -----------------------------------------------------------------------------
def _cli(*args: Any) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_refusals_and_force(tmp_path: Path) -> None:
    model, _ = _trained()
    src = tmp_path / "w.pt"
    torch.save(model.state_dict(), src)
    out = tmp_path / "out"
    res = _cli("to-dcp", src, out)
    assert res.exit_code == 0 and "wrote" in res.output and "(verified)" in res.output
    res = _cli("to-dcp", src, out)
    assert res.exit_code == 1 and "output exists; pass --force" in res.output
    res = _cli("to-dcp", src, out, "--force", "--dtype", "float16")
    assert res.exit_code == 0 and "cast 12 tensors to float16" in res.output
    assert _back(out)["fc.weight"].dtype == torch.float16
    (out / "notes.txt").write_text("mine")
    res = _cli("to-dcp", src, out, "--force")
    assert res.exit_code == 1 and "holds other files than a DCP checkpoint" in res.output
    assert (out / "notes.txt").read_text() == "mine"
    res = _cli("to-dcp", src, tmp_path / "x", "--model-only", "--only", "model")
    assert res.exit_code == 2
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".ckpttool-tmp")]


def test_cli_refuses_a_dangerous_input(tmp_path: Path) -> None:
    from tests.conftest import FIXTURES

    res = _cli("to-dcp", FIXTURES / "malicious.pt", tmp_path / "out")
    assert res.exit_code == 3 and not (tmp_path / "out").exists()


def test_a_failed_verification_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckpttool.writers import dcp as dcp_writer

    model, _ = _trained()
    src = tmp_path / "w.pt"
    torch.save(model.state_dict(), src)

    def broken(folder: str, *args: Any) -> None:
        raise CheckpointError(folder, "verification failed: test")

    monkeypatch.setattr(dcp_writer, "verify_folder", broken)
    with pytest.raises(CheckpointError, match="verification failed"):
        to_dcp(src, tmp_path / "out")
    assert os.listdir(tmp_path) == ["w.pt"]
