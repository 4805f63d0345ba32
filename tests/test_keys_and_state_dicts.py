"""Pure key surgery (strip/add/replace prefix), prefix detection and finding state dicts."""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from ckpttool.analysis.state_dicts import detect_prefix, find_state_dicts
from ckpttool.ops.keys import KeyCollisionError, add_prefix, replace_prefix, strip_prefix
from ckpttool.readers import open_checkpoint


def _with_metadata(keys: list[str], meta: dict[str, Any]) -> OrderedDict[str, Any]:
    sd: OrderedDict[str, Any] = OrderedDict((k, i) for i, k in enumerate(keys))
    sd._metadata = OrderedDict(meta)  # type: ignore[attr-defined]
    return sd


def _ddp_state_dict() -> OrderedDict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Sequential(nn.Linear(3, 1)))
    return nn.DataParallel(model).state_dict()


# -- strip / add / replace ---------------------------------------------------------------------
def test_strip_returns_new_dict_and_leaves_input_alone() -> None:
    sd = {"module.a.weight": 1, "module.a.bias": 2, "head.weight": 3}
    before = copy.deepcopy(sd)
    out = strip_prefix(sd, "module.")
    assert out is not sd
    assert sd == before and list(sd) == list(before)
    assert list(out.items()) == [("a.weight", 1), ("a.bias", 2), ("head.weight", 3)]


def test_strip_only_at_the_start() -> None:
    out = strip_prefix({"module.x": 1, "encoder.module.y": 2, "modulex": 3}, "module.")
    assert list(out) == ["x", "encoder.module.y", "modulex"]


def test_add_is_idempotent() -> None:
    sd = {"a": 1, "module.b": 2}
    once = add_prefix(sd, "module.")
    assert list(once) == ["module.a", "module.b"]
    twice = add_prefix(once, "module.")
    assert list(twice) == ["module.a", "module.b"]
    assert not any(k.startswith("module.module.") for k in twice)
    assert sd == {"a": 1, "module.b": 2}


def test_replace_prefix() -> None:
    sd = {"model.enc.w": 1, "model.dec.w": 2, "loss.w": 3}
    assert list(replace_prefix(sd, "model.", "")) == ["enc.w", "dec.w", "loss.w"]
    assert list(replace_prefix(sd, "model.", "net.")) == ["net.enc.w", "net.dec.w", "loss.w"]
    assert list(sd) == ["model.enc.w", "model.dec.w", "loss.w"]


@pytest.mark.parametrize(
    ("fn", "sd", "args", "first", "second", "new"),
    [
        (strip_prefix, {"module.a": 1, "a": 2}, ("module.",), "module.a", "a", "a"),
        (add_prefix, {"a": 1, "module.a": 2}, ("module.",), "a", "module.a", "module.a"),
        (replace_prefix, {"_orig_mod.w": 1, "w": 2}, ("_orig_mod.", ""), "_orig_mod.w", "w", "w"),
    ],
    ids=["strip", "add", "replace"],
)
def test_collision_refused_naming_both_keys(
    fn: Any, sd: dict[str, int], args: tuple[str, ...], first: str, second: str, new: str
) -> None:
    before = dict(sd)
    with pytest.raises(KeyCollisionError) as info:
        fn(sd, *args)
    assert (info.value.first, info.value.second, info.value.new) == (first, second, new)
    assert str(info.value) == f"renaming would make {first!r} and {second!r} both {new!r}"
    assert sd == before


def test_strip_metadata_like_torch() -> None:
    sd = _ddp_state_dict()
    ours = strip_prefix(sd, "module.")
    theirs = copy.deepcopy(sd)
    consume_prefix_in_state_dict_if_present(theirs, "module.")
    assert list(ours) == list(theirs)
    assert list(ours._metadata.items()) == list(theirs._metadata.items())
    # the input (and its _metadata) is untouched
    assert list(sd._metadata) == ["", "module", "module.0", "module.1", "module.2", "module.2.0"]
    assert all(k.startswith("module.") for k in sd)


@pytest.mark.parametrize("prefix", ["module.", "model.", "_orig_mod."])
def test_strip_metadata_like_torch_synthetic(prefix: str) -> None:
    root = prefix[:-1]
    sd = _with_metadata(
        [f"{prefix}fc.weight", f"{prefix}fc.bias", "other.weight"],
        {"": {"version": 1}, root: {"version": 2}, f"{prefix}fc": {"v": 3}, "other": {"v": 4}},
    )
    ours = strip_prefix(sd, prefix)
    theirs = copy.deepcopy(sd)
    consume_prefix_in_state_dict_if_present(theirs, prefix)
    # torch moves each renamed key to the end; ckpttool keeps the order: compare as mappings
    assert dict(ours) == dict(theirs)
    assert dict(ours._metadata) == dict(theirs._metadata)
    assert list(ours) == ["fc.weight", "fc.bias", "other.weight"]


def test_add_renames_metadata_and_round_trips_keys() -> None:
    sd = strip_prefix(_ddp_state_dict(), "module.")
    back = add_prefix(sd, "module.")
    assert list(back) == list(_ddp_state_dict())
    assert list(back._metadata) == ["module", "module.0", "module.1", "module.2", "module.2.0"]
    assert list(sd._metadata) == ["", "0", "1", "2", "2.0"]


def test_renamed_state_dict_loads_strictly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    wrapped = nn.DataParallel(model).state_dict()
    fresh = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    fresh.load_state_dict(strip_prefix(wrapped, "module."), strict=True)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    dp = nn.DataParallel(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))
    dp.load_state_dict(add_prefix(model.state_dict(), "module."), strict=True)


_keys = st.lists(
    st.text(alphabet="ab.", min_size=1, max_size=6).filter(lambda k: not k.startswith("m.")),
    unique=True,
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(_keys)
def test_add_then_strip_round_trip(keys: list[str]) -> None:
    sd = {k: i for i, k in enumerate(keys)}
    added = add_prefix(sd, "m.")
    assert list(added) == ["m." + k for k in keys]
    assert add_prefix(added, "m.") == added
    back = strip_prefix(added, "m.")
    assert list(back.items()) == list(sd.items())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="am.", min_size=1, max_size=6), unique=True, max_size=8))
def test_strip_touches_only_prefixed_keys(keys: list[str]) -> None:
    sd = {k: i for i, k in enumerate(keys)}
    try:
        out = strip_prefix(sd, "m.")
    except KeyCollisionError as exc:
        assert exc.first in sd and exc.second in sd
        assert exc.new == exc.second.removeprefix("m.") == exc.first.removeprefix("m.")
        return
    assert list(out.values()) == list(sd.values())
    for old, new in zip(sd, out, strict=True):
        assert new == old.removeprefix("m.")


# -- detect_prefix -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("keys", "want"),
    [
        (["module.a.weight", "module.b.bias"], "module."),
        (["_orig_mod.a", "_orig_mod.b"], "_orig_mod."),
        (["model.a", "model.b", "_metadata"], "model."),
        (["_forward_module.x", "_forward_module.y"], "_forward_module."),
        (["module._orig_mod.a", "module._orig_mod.b"], "module._orig_mod."),
        (["module.a", "b"], None),
        (["a.weight", "a.bias"], None),
        (["module."], None),
        ([], None),
        (["modulex.a", "modulex.b"], None),
    ],
)
def test_detect_prefix(keys: list[str], want: str | None) -> None:
    assert detect_prefix(keys) == want


# -- find_state_dicts --------------------------------------------------------------------------
def _trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(4, 2)).sum().backward()
    opt.step()
    return model, opt


def _found(tmp_path: Path, obj: Any) -> list[tuple[str, int, str | None]]:
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    root = open_checkpoint(path).root
    return [(s.path, s.tensors, s.prefix) for s in find_state_dicts(root)]


@pytest.mark.parametrize("key", ["model", "state_dict", "net", "model_state_dict"])
def test_find_state_dict_in_training_checkpoint(tmp_path: Path, key: str) -> None:
    model, opt = _trained()
    dp = nn.DataParallel(model)
    obj = {key: dp.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "best": 0.5}
    assert _found(tmp_path, obj) == [(key, 4, "module.")]


@pytest.mark.parametrize("opt_key", ["optimizer", "optim", "opt", "optimizer_state_dict"])
def test_optimizer_state_is_not_a_state_dict(tmp_path: Path, opt_key: str) -> None:
    model, opt = _trained()
    # Adam's per-parameter state {exp_avg, exp_avg_sq, step} is a str -> tensor dict too
    assert set(opt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    obj = {"model": model.state_dict(), opt_key: opt.state_dict()}
    assert _found(tmp_path, obj) == [("model", 4, None)]


def test_lightning_optimizer_states_list(tmp_path: Path) -> None:
    model, opt = _trained()
    obj = {"state_dict": {"model." + k: v for k, v in model.state_dict().items()}}
    obj["optimizer_states"] = [opt.state_dict()]
    assert _found(tmp_path, obj) == [("state_dict", 4, "model.")]


def test_optimizer_state_keyed_by_name_is_not_a_state_dict(tmp_path: Path) -> None:
    model, opt = _trained()
    names = [n for n, _ in model.named_parameters()]
    state = opt.state_dict()
    by_name = {names[i]: s for i, s in state["state"].items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    obj = {"model": model.state_dict(), "optimizer": {"state": by_name, "param_groups": groups}}
    assert _found(tmp_path, obj) == [("model", 4, None)]


def test_bare_and_nested_state_dicts(tmp_path: Path) -> None:
    model, _ = _trained()
    assert _found(tmp_path, model.state_dict()) == [("", 4, None)]
    gan = {"generator": model.state_dict(), "discriminator": nn.Linear(1, 1).state_dict()}
    assert _found(tmp_path, {"models": gan}) == [
        ("models.generator", 4, None),
        ("models.discriminator", 2, None),
    ]


def test_whole_pickled_module_is_reported_as_module(real_world: Path) -> None:
    root = open_checkpoint(real_world / "15_legacy-whole-module-sequential.pkl").root
    found = find_state_dicts(root)
    assert [(s.path, s.tensors, s.source) for s in found] == [("", 4, "module")]


def test_state_dict_under_a_key_with_dots_is_found_and_renamed(tmp_path: Path) -> None:
    """A state dict stored under a key that contains dots ({"run.v2": sd}) is reached by the
    node find_state_dicts returns, not by re-parsing its dotted path (which used to crash)."""
    import ckpttool

    src = tmp_path / "dot.pt"
    torch.save({"run.v2": {"w": torch.ones(2)}, "epoch": 1}, src)
    (sd,) = find_state_dicts(ckpttool.open_checkpoint(src).root)
    assert sd.path == "run.v2" and list(sd.node) == ["w"]
    out = tmp_path / "out.pt"
    result = ckpttool.convert(src, out, add_prefix="module.")
    assert result.renamed == [("run.v2", 1)]
    assert list(torch.load(out, weights_only=True)["run.v2"]) == ["module.w"]
    st = tmp_path / "out.safetensors"
    assert ckpttool.to_safetensors(src, st, key="run.v2").tensors == 1
