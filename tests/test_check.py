"""``check``: the verdict agrees with torch's own strict ``load_state_dict``, and the fix works."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from ckpttool.cli import cli
from ckpttool.ops.check import check, find_fixes, group_keys
from ckpttool.testing import saved_as


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.mlp = nn.Linear(8, 16)


class TinyLM(nn.Module):
    """wte / layers / lm_head, lm_head tied to wte as in GPT-2."""

    def __init__(self, vocab: int = 50, tied: bool = True) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, 8)
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight


def tiny_lm() -> TinyLM:
    """The factory ``check --model tests.test_check:tiny_lm`` builds."""
    return TinyLM()


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _sd(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _torch_loads(path: Path, model: nn.Module, key: str | None = None) -> bool:
    """The ground truth: does torch's strict load_state_dict accept it?"""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(obj[key] if key else obj, strict=True)
    except RuntimeError:
        return False
    return True


def _apply(command: str) -> None:
    """Run the `ckpttool convert ...` command(s) that check printed."""
    for part in command.split(" && "):
        argv = shlex.split(part)
        assert argv[:2] == ["ckpttool", "convert"]
        r = _run(*argv[1:], "-q")
        assert r.exit_code == 0, r.output


@pytest.fixture
def ref(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "ref.safetensors"
    save_file({k: v for k, v in _sd(TinyLM(tied=False)).items()}, path)
    return path


def test_identical_keys_load(tmp_path: Path, ref: Path) -> None:
    torch.save(_sd(TinyLM(tied=False)), tmp_path / "same.pt")
    r = _run("check", str(tmp_path / "same.pt"), "--against", str(ref))
    assert r.exit_code == 0, r.output
    assert "would load (strict=True)" in r.output
    assert _torch_loads(tmp_path / "same.pt", TinyLM(tied=False))
    import ckpttool  # a Hugging Face style sharded folder as the reference

    ckpttool.to_safetensors(ref, tmp_path / "hf", max_shard_size=2000)
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    assert (
        _run("check", str(tmp_path / "same.pt"), "--against", str(tmp_path / "hf")).exit_code == 0
    )


def test_ddp_checkpoint_against_its_bare_model(tmp_path: Path, ref: Path) -> None:
    sd = _sd(TinyLM(tied=False))
    path = tmp_path / "ddp_best.pth"
    with saved_as("cuda:0"):
        torch.save({"module." + k: v for k, v in sd.items()}, path)
    assert not _torch_loads(path, TinyLM(tied=False))
    r = _run("check", str(path), "--against", str(ref))
    assert r.exit_code == 4
    n = len(sd)
    assert f"would not load: {n} missing, {n} unexpected, 0 size mismatches" in r.output
    assert "    layers.*.attn.weight  (3 keys)" in r.output  # grouped, not a wall of keys
    assert f"strip the prefix 'module.' from {n} keys" in r.output
    command = f"ckpttool convert {path} {tmp_path / 'ddp_best_fixed.pt'} --strip-module"
    assert f"  {command}\n" in r.output
    assert "after the fix: would load" in r.output
    _apply(command)
    assert _torch_loads(tmp_path / "ddp_best_fixed.pt", TinyLM(tied=False))
    assert _run("check", str(tmp_path / "ddp_best_fixed.pt"), "--against", str(ref)).exit_code == 0


def test_bare_checkpoint_into_a_ddp_model(tmp_path: Path) -> None:
    sd = _sd(TinyLM(tied=False))
    torch.save(sd, tmp_path / "bare.pt")
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "ddp_ref.pt")
    r = _run("check", str(tmp_path / "bare.pt"), "--against", str(tmp_path / "ddp_ref.pt"))
    assert r.exit_code == 4 and "--add-module" in r.output


def test_lightning_checkpoint_against_its_inner_model(tmp_path: Path) -> None:
    sd = _sd(TinyLM())
    path = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3}, path)
    r = _run("check", str(path), "--model", "tests.test_check:tiny_lm", "--json")
    assert r.exit_code == 4, r.output
    out = json.loads(r.output)
    assert out["state_dict"] == "state_dict" and out["loads"] is False
    assert out["fixes"] == [{"action": "strip", "old": "model.", "new": "", "keys": len(sd)}]
    assert out["after_fixes"]["loads"] is True
    fixed = tmp_path / "epoch=3_fixed.pt"
    assert out["fix_command"] == shlex.join(
        [
            "ckpttool",
            "convert",
            str(path),
            str(fixed),
            "--only",
            "state_dict",
            "--strip-prefix",
            "model.",
        ]
    )
    _apply(out["fix_command"])
    assert _torch_loads(fixed, TinyLM())


def test_compiled_model(tmp_path: Path, ref: Path) -> None:
    compiled = torch.compile(TinyLM(tied=False), backend="eager")  # no inductor import
    torch.save(compiled.state_dict(), tmp_path / "compiled.pt")
    res = check(tmp_path / "compiled.pt", ref)
    assert not res.loads and res.after_fixes.loads
    assert [(f.action, f.old) for f in res.fixes] == [("strip", "_orig_mod.")]
    assert not _torch_loads(tmp_path / "compiled.pt", TinyLM(tied=False))


def test_resized_vocabulary(tmp_path: Path, ref: Path) -> None:
    torch.save(_sd(TinyLM(vocab=64, tied=False)), tmp_path / "padded.pt")
    assert not _torch_loads(tmp_path / "padded.pt", TinyLM(tied=False))
    res = check(tmp_path / "padded.pt", ref)
    assert not res.loads and not res.fixes
    assert {m.key: m.reason for m in res.problems.mismatched} == {
        "wte.weight": "vocabulary",
        "lm_head.weight": "vocabulary",
    }
    r = _run("check", str(tmp_path / "padded.pt"), "--against", str(ref))
    assert r.exit_code == 4
    assert (
        "wte.weight: the vocabulary was resized (64 rows in the checkpoint, 50 in the model)"
        in (r.output)
    )


def test_transposed_import(tmp_path: Path, ref: Path) -> None:
    sd = _sd(TinyLM(tied=False))
    sd["layers.1.mlp.weight"] = sd["layers.1.mlp.weight"].t().contiguous()  # Conv1D layout
    torch.save(sd, tmp_path / "conv1d.pt")
    assert not _torch_loads(tmp_path / "conv1d.pt", TinyLM(tied=False))
    res = check(tmp_path / "conv1d.pt", ref)
    (m,) = res.problems.mismatched
    assert (m.key, m.reason, m.found.shape, m.expected.shape) == (
        "layers.1.mlp.weight",
        "transposed",
        (8, 16),
        (16, 8),
    )
    assert any(d.kind == "transposed" for d in res.diagnoses)


def test_renamed_block(tmp_path: Path, ref: Path) -> None:
    sd = _sd(TinyLM(tied=False))
    torch.save({k.replace("layers.", "blocks."): v for k, v in sd.items()}, tmp_path / "ren.pt")
    r = _run("check", str(tmp_path / "ren.pt"), "--against", str(ref), "--json")
    assert r.exit_code == 4
    out = json.loads(r.output)
    assert out["fixes"] == [{"action": "replace", "old": "blocks.", "new": "layers.", "keys": 12}]
    assert out["fix_command"].endswith("--replace-prefix blocks.=layers.")
    _apply(out["fix_command"])
    assert _torch_loads(tmp_path / "ren_fixed.pt", TinyLM(tied=False))


def test_tied_weights_missing(tmp_path: Path) -> None:
    sd = _sd(TinyLM())
    del sd["lm_head.weight"]  # stored once, as safetensors exports do
    save_file(sd, tmp_path / "model.safetensors")
    assert not _torch_loads_st(tmp_path / "model.safetensors", TinyLM())
    r = _run("check", str(tmp_path / "model.safetensors"), "--model", "tests.test_check:tiny_lm")
    assert r.exit_code == 4
    assert "lm_head.weight is missing but wte.weight has the same shape" in r.output
    # and the reverse: a checkpoint with both names against a reference that stores one
    torch.save(TinyLM().state_dict(), tmp_path / "both.pt")  # lm_head and wte share storage
    res = check(tmp_path / "both.pt", tmp_path / "model.safetensors")
    assert res.problems.unexpected == ("lm_head.weight",)
    assert [d.kind for d in res.diagnoses] == ["tied"]


def _torch_loads_st(path: Path, model: nn.Module) -> bool:
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(path), strict=True)
    except RuntimeError:
        return False
    return True


def test_dtype_difference_loads_with_a_note(tmp_path: Path, ref: Path) -> None:
    sd = {k: v.half() for k, v in _sd(TinyLM(tied=False)).items()}
    torch.save(sd, tmp_path / "half.pt")
    assert _torch_loads(tmp_path / "half.pt", TinyLM(tied=False))
    r = _run("check", str(tmp_path / "half.pt"), "--against", str(ref))
    assert r.exit_code == 0, r.output
    assert f"dtypes differ ({len(sd)} float16 -> float32)" in r.output


def test_model_factory_on_meta_device(tmp_path: Path) -> None:
    torch.save(_sd(TinyLM()), tmp_path / "full.pt")
    res = check(tmp_path / "full.pt", model="tests.test_check:tiny_lm")
    assert res.loads and res.against == "tests.test_check:tiny_lm"
    assert _torch_loads(tmp_path / "full.pt", TinyLM())
    r = _run("check", str(tmp_path / "full.pt"), "--model", "tests.test_check:no_such")
    assert r.exit_code == 1 and "building the model" in r.output


def test_usage() -> None:
    r = _run("check", "x.pt")
    assert r.exit_code == 2 and "--against" in r.output


def test_find_fixes_and_grouping() -> None:
    keys = [f"layers.{i}.{n}.weight" for i in range(12) for n in ("q", "k", "v")] + ["wte.weight"]
    assert [(g.pattern, g.count) for g in group_keys(keys)] == [
        ("layers.*.q.weight", 12),
        ("layers.*.k.weight", 12),
        ("layers.*.v.weight", 12),
        ("wte.weight", 1),
    ]
    many = [f"m{j}.layers.{i}.x{j}" for j in range(20) for i in range(3)]
    groups = group_keys(many)
    assert len(groups) == 8 and sum(g.count for g in groups) == 60
    assert (groups[-1].pattern, groups[-1].count) == ("...", 39)
    fixes = find_fixes(["module.blocks.0.w", "module.head.b"], ["layers.0.w", "head.b"])
    assert [(f.old, f.new) for f in fixes] == [("module.", ""), ("blocks.", "layers.")]


def test_real_world_lightning_checkpoint(tmp_path: Path) -> None:
    from tests.conftest import REAL_WORLD

    src = REAL_WORLD / "38_lightning2-ckpt-model-prefix-cuda0.ckpt"
    if not src.is_file():
        pytest.skip("real-world checkpoints not present")
    sd = torch.load(src, map_location="cpu", weights_only=True)["state_dict"]
    inner = {k.removeprefix("model."): v for k, v in sd.items()}
    save_file({k: v.contiguous() for k, v in inner.items()}, tmp_path / "inner.safetensors")
    res = check(src, tmp_path / "inner.safetensors")
    assert not res.loads and res.after_fixes.loads and res.select == "state_dict"
    assert [(f.action, f.old) for f in res.fixes] == [("strip", "model.")]


def test_key_selects_the_state_dict(tmp_path: Path, ref: Path) -> None:
    sd = _sd(TinyLM(tied=False))
    torch.save({"ema": sd, "model": {"module." + k: v for k, v in sd.items()}}, tmp_path / "t.pt")
    assert not check(tmp_path / "t.pt", ref).loads  # "model" is the default
    res = check(tmp_path / "t.pt", ref, key="ema")
    assert res.loads and res.select == "ema"
    r = _run("check", str(tmp_path / "t.pt"), "--against", str(ref), "--state-dict", "nope")
    assert r.exit_code == 1 and "holds no state dict at 'nope'" in r.output


def test_model_factory_from_a_python_file(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(
        "import torch\n\ndef build():\n    return torch.nn.Linear(4, 3)\n", encoding="utf-8"
    )
    torch.save(
        {"module.weight": torch.zeros(3, 4), "module.bias": torch.zeros(3)}, tmp_path / "w.pt"
    )
    r = _run("check", str(tmp_path / "w.pt"), "--model", f"{tmp_path / 'net.py'}:build", "--json")
    assert r.exit_code == 4
    out = json.loads(r.output)
    assert out["fixes"] == [{"action": "strip", "old": "module.", "new": "", "keys": 2}]
    assert out["after_fixes"]["loads"] is True
