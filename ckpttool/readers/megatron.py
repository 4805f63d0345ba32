"""Megatron-core distributed checkpoints (``torch_dist``) and the NeMo folders that wrap them.

megatron-core's ``dist_checkpointing.save`` writes one folder (Megatron-LM's ``iter_0000010/``,
NeMo 2's ``weights/``, NeMo 1's ``model_weights/``) holding:

* ``metadata.json``: ``{"sharded_backend": "torch_dist", "sharded_backend_version": 1,
  "common_backend": "torch", ...}``;
* ``common.pt``: ``torch.save`` of the state that is not sharded (args, iteration, the
  optimizer's param groups...), read here like any torch file, under the same verdict;
* a DCP folder (``.metadata`` + ``__R_T.distcp``): every ShardedTensor under its global key
  (layers stacked on a leading axis: ``decoder.layers.mlp.linear_fc1.weight`` is
  ``[num_layers, ffn, hidden]``), every ShardedObject under its unique key
  (``rng_state/shard_0.1_1.2``; stored as the one-element list ``[data]``, loaded as
  ``data``, as megatron-core's loader hands it out).

The consolidated object is what megatron-core's ``load_plain_tensors(folder)`` returns: the
entries of ``common.pt`` at the top, then every tensor under its global key, the layer axis
kept (plus the ShardedObjects, which ``load_plain_tensors`` leaves out). Optimizer tensors are
the keys under ``optimizer.`` (``chained_<i>.optimizer.`` for a ChainedOptimizer's); the model's
weights are the others.

Beside iteration folders, ``latest_checkpointed_iteration.txt`` names the one Megatron-LM
loads (``iter_{N:07d}``, or ``release``); a NeMo folder holds ``weights/`` (or
``model_weights/``) beside ``context/``. Both are accepted and the choice is reported.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from typing import Any

from ..errors import CheckpointError
from ..model import Opaque
from .distributed import DistributedCheckpoint, as_logical

METADATA_JSON = "metadata.json"
COMMON = "common.pt"
TRACKER = "latest_checkpointed_iteration.txt"
NEMO_WEIGHTS = ("weights", "model_weights")  # NeMo 2, NeMo 1 (.nemo, distributed)
_MAX_JSON = 1 << 16
_CHAINED = re.compile(r"chained_\d+\.optimizer\.")
# args fields reported by inspect (Megatron-LM's names) -> fact name
_PARALLEL = {
    "tensor_model_parallel_size": "tensor_parallel",
    "pipeline_model_parallel_size": "pipeline_parallel",
    "context_parallel_size": "context_parallel",
    "expert_model_parallel_size": "expert_parallel",
}


def backend(folder: str) -> dict[str, Any] | None:
    """``metadata.json`` of a megatron-core checkpoint folder, or None if ``folder`` is not one."""
    path = os.path.join(folder, METADATA_JSON)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(folder, ".metadata")):
        return None
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(_MAX_JSON).decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "sharded_backend" not in data:
        return None
    return data


def resolve(path: str) -> tuple[str, dict[str, str]] | None:
    """The megatron-core checkpoint folder ``path`` opens as, and how it was chosen
    (``{"chosen": "iter_0000010", "by": TRACKER}``; ``{}`` for the folder itself); None when
    ``path`` is not a Megatron or NeMo folder."""
    if backend(path) is not None:
        return path, {}
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        name = _tracked(tracker)
        sub = os.path.join(path, name)
        if backend(sub) is None:
            what = "missing" if not os.path.isdir(sub) else "not a megatron-core torch_dist folder"
            raise CheckpointError(sub, f"is {what} (named by {TRACKER})")
        return sub, {"chosen": name, "by": TRACKER}
    if os.path.isdir(os.path.join(path, "context")) or any(
        os.path.isdir(os.path.join(path, n)) for n in NEMO_WEIGHTS
    ):
        for name in NEMO_WEIGHTS:
            sub = os.path.join(path, name)
            if backend(sub) is not None:
                return sub, {"chosen": name, "by": "NeMo"}
    return None


def _tracked(tracker: str) -> str:
    """The folder ``latest_checkpointed_iteration.txt`` names (Megatron-LM's
    ``read_metadata``: an iteration number, or ``release``)."""
    try:
        with open(tracker, "rb") as f:
            text = f.read(64).decode("utf-8", "replace").strip()
    except OSError as exc:
        raise CheckpointError(tracker, f"read failed: {exc.strerror or exc}") from None
    if text == "release":
        return "release"
    if not text.isdigit():
        raise CheckpointError(tracker, f"names no iteration ({text[:20]!r})")
    return f"iter_{int(text):07d}"


def read(
    folder: str, seen: dict[str, str] | None = None, chosen: dict[str, str] | None = None
) -> DistributedCheckpoint:
    """A megatron-core ``torch_dist`` folder as one checkpoint: ``common.pt``'s entries, then
    the DCP keys (see the module docstring). ``chosen``: how a parent folder chose it."""
    from . import dcp

    seen = {} if seen is None else seen
    info = backend(folder) or {}
    _check_backend(folder, info)
    dc = dcp.read(folder, seen)
    for key, value in dc.entries.items():  # a ShardedObject: stored as [its data]
        if isinstance(value, list) and len(value) == 1:
            dc.entries[key] = value[0]  # megatron-core's loader hands out the data
    reshaped = _reformulated(folder, dc)
    dc.tensors = [  # a ChainedOptimizer (MoE: several) prefixes its keys with chained_<i>.
        replace(t, group="optimizer") if _CHAINED.match(t.name) else t for t in dc.tensors
    ]
    common = _common(folder, dc, seen)
    clash = [k for k in common if k in dc.facts["order"]]
    if clash:
        raise CheckpointError(
            os.path.join(folder, COMMON), f"holds {clash[0]!r}, which the shards hold too"
        )
    dc.entries.update(common)
    dc.facts["order"] = list(common) + dc.facts["order"]
    dc.facts["megatron"] = _facts(info, common, chosen or {}, reshaped)
    return dc


def _check_backend(folder: str, info: dict[str, Any]) -> None:
    path = os.path.join(folder, METADATA_JSON)
    sharded, common = info.get("sharded_backend"), info.get("common_backend", "torch")
    if sharded != "torch_dist":
        raise CheckpointError(
            path, f"names megatron-core's {sharded!r} backend; ckpttool reads torch_dist only"
        )
    if common != "torch":
        raise CheckpointError(path, f"names a {common!r} common backend; ckpttool reads torch")


def _common(folder: str, dc: DistributedCheckpoint, seen: dict[str, str]) -> dict[str, Any]:
    """The entries of ``common.pt`` (a torch zip), their tensors over logical storages."""
    from . import torch_zip

    path = os.path.join(folder, COMMON)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        raise CheckpointError(
            path, "is missing (megatron-core writes it beside .metadata)"
        ) from None
    if head != b"PK\x03\x04":
        raise CheckpointError(path, "is not a torch zip (megatron-core's common state)")
    root = torch_zip.read(path, size, seen).root
    if not isinstance(root, dict) or not all(isinstance(k, str) for k in root):
        raise CheckpointError(path, "does not hold a dict of named entries")
    dc.files = sorted([*dc.files, (path, size)])
    return {k: as_logical(v, k, folder) for k, v in root.items()}


def _reformulated(folder: str, dc: DistributedCheckpoint) -> list[str]:
    """The tensors megatron-core 0.8 to 0.15 stored "N-D reformulated" (a distributed
    optimizer's flattened ranges; ``mcore_data`` records their shape), put back in that shape
    (``megatron_flat.py``); their names."""
    from . import dcp
    from .megatron_flat import unreformulate

    meta = os.path.join(folder, dcp.METADATA)
    mcore = dc.facts.pop("mcore_data", None)  # (dcp.read found it in the Metadata)
    if not isinstance(mcore, dict):
        return []
    shapes: dict[str, tuple[int, ...]] = {}
    for key, data in mcore.items():
        shape = data.get("nd_reformulated_orig_global_shape") if isinstance(data, dict) else None
        if shape is not None:
            shapes[key] = dcp._ints(shape, f"the recorded shape of {key!r}", meta)
    dc.tensors = [
        unreformulate(folder, t, shapes[t.name]) if t.name in shapes else t for t in dc.tensors
    ]
    return sorted(shapes)


def _facts(
    info: dict[str, Any], common: dict[str, Any], chosen: dict[str, str], reshaped: list[str]
) -> dict[str, Any]:
    """What inspect reports: backend, iteration, parallel sizes (from ``args``), the choice."""
    version = info.get("sharded_backend_version", "")
    facts: dict[str, Any] = {"backend": f"{info.get('sharded_backend')} {version}".strip()}
    facts.update(chosen)
    for key, name in (("iteration", "iteration"), ("global_step", "step")):  # Megatron, NeMo
        value = common.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            facts[name] = value
    args = common.get("args")
    state = args.state if isinstance(args, Opaque) else None
    if isinstance(state, dict):
        for field, name in _PARALLEL.items():
            value = state.get(field)
            if isinstance(value, int) and not isinstance(value, bool):
                facts[name] = value
    if reshaped:
        facts["reformulated"] = reshaped
    return facts
