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
