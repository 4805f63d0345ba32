"""What a new user gets from ckpttool on folders and files that real libraries write.

Every input here is made by the library itself, in a child process (torch.distributed.checkpoint
on CPU, Lightning's Trainer and FSDP strategy, accelerate's ``save_state``, transformers'
Trainer): each answer ckpttool gives about them is checked against what that library or torch
does with them. Tests that need Lightning, accelerate or transformers skip without them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.test_dcp import dcp_folders

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.checkpoint")


def _run_script(script: str, *args: str | Path, timeout: int = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("COLUMNS", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the generating script failed:\n{(proc.stdout + proc.stderr)[-3000:]}")


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install {module} to run this test)")


# -- DCP: advice that is true for a folder -------------------------------------------------------
@pytest.fixture(scope="session")
def dcp_w2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder written by FSDP2 + dcp.save with 2 gloo ranks (shared with test_dcp)."""
    return dcp_folders(tmp_path_factory)[2]


def test_a_dcp_folder_gets_advice_true_for_a_folder(
    dcp_w2: Path, run_cli: Any, tmp_path: Path
) -> None:
    res = run_cli("inspect", dcp_w2, "--json")
    assert res.exit_code == 0, res.stderr
    warnings = json.loads(res.stdout)["warnings"]
    # not the advice for a file: DCP never uses weights_only on .metadata, and
    # convert --plain-objects is a usage error on a folder
    assert not [w for w in warnings if "--plain-objects" in w or "refuses this file" in w]
    (advice,) = [w for w in warnings if "folder of shards" in w]
    assert "pickle.load" in advice and "`ckpttool consolidate FOLDER OUT`" in advice
    assert run_cli("convert", dcp_w2, tmp_path / "x.pt", "--plain-objects").exit_code == 2
    # what it advises works: one file that torch.load(weights_only=True) opens
    out = tmp_path / "model.pt"
    assert run_cli("consolidate", dcp_w2, out).exit_code == 0
    assert torch.load(out, weights_only=True)


# -- DCP: a torch.Generator kept as a non-tensor value -------------------------------------------
DCP_GENERATOR = """
    import sys, torch, torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    folder, ref = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    rng = torch.Generator().manual_seed(123)
    rng.get_state()  # its state is a uint8 tensor, saved as a torch.save blob
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 7, "rng": rng}
    dcp.save(state, checkpoint_id=folder)
    dcp_to_torch_save(folder, ref)
"""


@pytest.fixture(scope="session")
def dcp_generator(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dcp_generator")
    _run_script(DCP_GENERATOR, out / "ckpt", out / "torch.pt")
    return out / "ckpt", out / "torch.pt"


def _load_with_generator(path: Path) -> Any:
    with torch.serialization.safe_globals([torch._C.Generator]):
        return torch.load(path, weights_only=True)


def test_consolidate_all_keeps_a_generator_as_dcp_to_torch_save_does(
    dcp_generator: tuple[Path, Path], run_cli: Any, tmp_path: Path
) -> None:
    folder, ref_path = dcp_generator
    out = tmp_path / "full.pt"
    res = run_cli("consolidate", folder, out, "--all")
    assert res.exit_code == 0, res.stderr
    ours, ref = _load_with_generator(out), _load_with_generator(ref_path)
    assert list(ours) == list(ref) == ["model", "optim", "step", "rng"]
    assert isinstance(ours["rng"], torch.Generator)
    assert torch.equal(ours["rng"].get_state(), ref["rng"].get_state())
    assert torch.equal(torch.rand(5, generator=ours["rng"]), torch.rand(5, generator=ref["rng"]))
    flat_ours, _ = torch.utils._pytree.tree_flatten({k: ours[k] for k in ("model", "optim")})
    flat_ref, _ = torch.utils._pytree.tree_flatten({k: ref[k] for k in ("model", "optim")})
    assert len(flat_ours) == len(flat_ref) > 0
    for a, b in zip(flat_ours, flat_ref, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    assert ours["step"] == 7
