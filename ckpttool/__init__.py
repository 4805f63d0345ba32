"""ckpttool: inspect, fix and convert PyTorch checkpoints without running their code.

The library API (importing it never imports torch)::

    from ckpttool import open_checkpoint, convert, to_safetensors
    ckpt = open_checkpoint("best.pth")          # metadata only: no tensor bytes, no code run
    convert("best.pth", "best_cpu.pt", strip_prefix="module.")
    to_safetensors("best.pth", "model.safetensors", strip_prefix="module.")

Training scripts: ``ckpttool.load``, ``ckpttool.fix_state_dict``, ``ckpttool.save``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "open_checkpoint": "ckpttool.readers",
    "Checkpoint": "ckpttool.model",
    "TensorInfo": "ckpttool.model",
    "StorageInfo": "ckpttool.model",
    "CheckpointError": "ckpttool.errors",
    "CheckpointWarning": "ckpttool.errors",
    "convert": "ckpttool.ops.convert",
    "ConvertResult": "ckpttool.ops.convert",
    "to_safetensors": "ckpttool.ops.to_safetensors",
    "consolidate": "ckpttool.ops.consolidate",
    "scan": "ckpttool.ops.scan",
    "diff": "ckpttool.ops.diff",
    "DiffResult": "ckpttool.ops.diff",
    "check": "ckpttool.ops.check",
    "CheckResult": "ckpttool.ops.check",
    "strip_prefix": "ckpttool.ops.keys",
    "add_prefix": "ckpttool.ops.keys",
    "replace_prefix": "ckpttool.ops.keys",
    "find_state_dicts": "ckpttool.analysis.state_dicts",
    "load": "ckpttool.training.api",
    "fix_state_dict": "ckpttool.training.wrappers",
    "FixResult": "ckpttool.training.wrappers",
    "save": "ckpttool.training.api",
    "unwrap": "ckpttool.training.wrappers",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import the public names lazily, so ``import ckpttool`` and ``--help`` stay fast."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ckpttool' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
