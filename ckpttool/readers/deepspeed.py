"""DeepSpeed ZeRO 1/2/3 checkpoint folders, read as the fp32 model ``zero_to_fp32`` rebuilds.

A DeepSpeed save is a folder with ``latest`` (the tag's name) and a tag folder holding the model
states (``mp_rank_00_model_states.pt`` for ZeRO-1/2; ``zero_pp_rank_R_mp_rank_00_model_states.pt``
per rank for ZeRO-3) and one ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`` per rank with
that rank's slice of the fp32 master weights. Every file is a torch zip whose pickle names
DeepSpeed classes (``ZeroStageEnum``, ``LossScaler``, ``fragment_address``): they are read as data,
never imported. The result is a :class:`~ckpttool.readers.distributed.DistributedCheckpoint`
whose model tensors are exactly what DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``
returns (buffers, frozen params, the trainable params from the partitions, tied aliases), each as
byte ranges of the flat fp32 storages, plus the optimizer's moments assembled the same way.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ..errors import CheckpointError, DangerousCheckpointError
from ..model import Checkpoint, Opaque, TensorRef
from ..source import basename, getsize, isfile, join, listdir
from . import zero_layout as zl
from .distributed import DistributedCheckpoint, LogicalTensor, check_segments, merge_segments
from .zero_files import LATEST, ZERO3_MODEL_STATES, is_deepspeed_folder, is_zip, tag_folder
from .zero_layout import FlatGroups, Place

__all__ = ["LATEST", "is_deepspeed_folder", "read", "tag_folder"]

MODEL_KEY = "module"  # the consolidated object keeps the fp32 state dict here, the rest beside
OPTIMIZER_KEY = "optimizer"
_OPTIM = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
# pipeline-parallel layer files and MoE expert files: zero_to_fp32 cannot rebuild those either
_LAYER = re.compile(r"layer_\d+-model_\d+-model_states\.pt|(layer_\d+_)?expert_\d+_mp_rank_\d+_.*")
# Keys of the model states file that describe the layout; every other key is an entry.
_LAYOUT_KEYS = frozenset(("module", "buffer_names", "param_shapes", "frozen_param_shapes",
                          "frozen_param_fragments", "shared_params", "optimizer"))
_FLOATS = frozenset({"float16", "bfloat16", "float32", "float64"})


def _by_rank(folder: str, names: list[str], pattern: re.Pattern[str]) -> dict[int, str]:
    out: dict[int, str] = {}
    for name in names:
        m = pattern.fullmatch(name)
        if not m:
            continue
        if int(m.group(2)) != 0:
            raise CheckpointError(join(folder, name), "belongs to a model-parallel "
                                  "(tensor-parallel) save, which ckpttool does not consolidate")
        rank = int(m.group(1))
        if rank in out:
            raise CheckpointError(folder, f"holds two optimizer state files for rank {rank}")
        out[rank] = join(folder, name)
    return out


# -- reading one file ----------------------------------------------------------------------------
def _load(path: str, seen: dict[str, str]) -> dict[str, Any]:
    from . import torch_zip

    if not is_zip(path):
        raise CheckpointError(path, "is not a torch zip checkpoint (DeepSpeed saves torch zips)")
    local: dict[str, str] = {}
    try:
        ckpt: Checkpoint = torch_zip.read(path, getsize(path), local)
    finally:
        for name, kind in local.items():
            seen.setdefault(name, kind)
    dangerous = [g for g, k in local.items() if k == "dangerous"]
    if dangerous:
        raise DangerousCheckpointError(path, dangerous)
    if not isinstance(ckpt.root, dict):
        raise CheckpointError(path, "does not hold a dict (not a DeepSpeed states file)")
    return ckpt.root


def _need(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind):
        raise CheckpointError(path, f"has no {key!r} (not a DeepSpeed ZeRO states file?)")
    return value


def _model(name: str, dtype: str, shape: tuple[int, ...], segments: Any) -> LogicalTensor:
    """A tensor of the fp32 state dict, kept under ``module`` as DeepSpeed's own files do."""
    return LogicalTensor(
        f"{MODEL_KEY}.{name}",
        dtype,
        shape,
        merge_segments(list(segments)),
        "model",
        (MODEL_KEY, name),
    )


def _whole(name: str, ref: Any, path: str) -> LogicalTensor:
    """A model tensor stored whole (a buffer, a ZeRO-1/2 frozen parameter)."""
    ref = zl.flat_tensor(ref, repr(name), path, None)
    segments = [zl.piece(ref, 0, ref.numel, 0)] if ref.numel else []
    return _model(name, ref.dtype, ref.shape, segments)


# -- the folder ----------------------------------------------------------------------------------
class _Folder:
    """The files of one tag folder, loaded (pickles only) and checked against each other."""

    def __init__(self, path: str, seen: dict[str, str]) -> None:
        folder = tag_folder(path)
        if folder is None:
            raise CheckpointError(path, "is not a DeepSpeed checkpoint folder")
        self.folder = folder
        self.seen = seen
        self.files: list[tuple[str, int]] = []
        names = sorted(listdir(folder))
        optim = _by_rank(folder, names, _OPTIM)
        odd = [n for n in names if _LAYER.fullmatch(n)]
        if odd:
            raise CheckpointError(folder, f"holds pipeline-parallel or expert (MoE) files "
                                  f"({odd[0]}), which ckpttool does not consolidate")
        if not optim:
            raise CheckpointError(folder, "holds no *_optim_states.pt files: not a ZeRO save "
                                  "(without ZeRO the weights lie whole in "
                                  "mp_rank_00_model_states.pt: open that file)")
        first = self.load(optim[min(optim)])
        self.osd0 = _need(first, "optimizer_state_dict", dict, optim[min(optim)])
        self.stage = zl.zero_stage(self.osd0, optim[min(optim)])
        self.world = zl.world_size(self.osd0, optim[min(optim)])
        if "ds_zero_partition_groups" in self.osd0:
            raise CheckpointError(folder, "partitions experts in their own groups (AutoEP), "
                                  "which ckpttool does not consolidate")
        if sorted(optim) != list(range(self.world)):
            raise CheckpointError(folder, f"expects the optimizer states of {self.world} ranks, "
                                  f"finds ranks {sorted(optim)} (an interrupted save, or one "
                                  "overwritten by another run?)")
        self.optim = [first] + [self.load(optim[r]) for r in range(1, self.world)]
        self.optim_paths = [optim[r] for r in range(self.world)]
        if self.stage <= 2:
            self.model_paths = [join(folder, "mp_rank_00_model_states.pt")]
        else:
            by_rank = _by_rank(folder, names, ZERO3_MODEL_STATES)
            self.model_paths = [by_rank[r] for r in sorted(by_rank)] if 0 in by_rank else []
        if not self.model_paths or not isfile(self.model_paths[0]):
            raise CheckpointError(folder, f"has no model states file for ZeRO-{self.stage}")
        self.model0 = self.load(self.model_paths[0])
        self._models: list[dict[str, Any]] | None = None

    def load(self, path: str) -> dict[str, Any]:
        root = _load(path, self.seen)
        self.files.append((path, getsize(path)))
        return root

    def models(self) -> list[dict[str, Any]]:
        """Every rank's model states (ZeRO-3 keeps each rank's frozen fragments there)."""
        if self._models is None:
            if len(self.model_paths) != self.world:
                raise CheckpointError(
                    self.folder,
                    f"has {len(self.model_paths)} model states files for {self.world} ranks",
                )
            self._models = [self.model0] + [self.load(p) for p in self.model_paths[1:]]
        return self._models

    def flat(self, rank: int) -> list[TensorRef]:
        path = self.optim_paths[rank]
        osd = _need(self.optim[rank], "optimizer_state_dict", dict, path)
        key = "single_partition_of_fp32_groups" if self.stage <= 2 else "fp32_flat_groups"
        groups = _need(osd, key, list, path)
        return [zl.flat_tensor(g, f"{key}[{i}]", path) for i, g in enumerate(groups)]


def _frozen(ds: _Folder, path: str) -> list[LogicalTensor]:
    shapes = ds.model0.get("frozen_param_shapes") or {}
    if not isinstance(shapes, dict):
        raise CheckpointError(path, "frozen_param_shapes is not a map")
    out = []
    for name, shape in shapes.items():
        dims, numel = zl.shape_of(shape, name, path)
        if ds.stage <= 2:
            frags = _need(ds.model0, "frozen_param_fragments", dict, path)
            out.append(_whole(str(name), frags.get(name), path))
            if out[-1].shape != dims:
                raise CheckpointError(path, f"frozen {name!r} is not shaped {list(dims)}")
            continue
        refs = []
        for rank, model in enumerate(ds.models()):
            frags = _need(model, "frozen_param_fragments", dict, ds.model_paths[rank])
            refs.append(
                [zl.flat_tensor(frags.get(name), f"frozen {name!r}", ds.model_paths[rank], None)]
            )
        segments = FlatGroups(refs).across(0, 0, numel)
        if sum(s.nbytes for s in segments) != numel * refs[0][0].itemsize:
            raise CheckpointError(path, f"the ranks hold less of frozen {name!r} than it needs")
        out.append(_model(str(name), refs[0][0].dtype, dims, segments))
    return out


def _moment_tensors(
    ds: _Folder, layout: dict[str, Place], sizes: list[list[int]]
) -> list[LogicalTensor]:
    """The optimizer's per-param state (``optimizer.state.NAME.exp_avg`` ...), assembled."""
    per_rank = [zl.group_states(o["optimizer_state_dict"], ds.stage) for o in ds.optim]
    found = zl.moments(per_rank, ds.optim_paths, ds.stage, ds.world, layout, sizes)
    order = {name: i for i, name in enumerate(layout)}
    found.sort(key=lambda m: order[m[0]])  # param by param, as torch's optimizer lists them
    return [
        LogicalTensor(
            f"{OPTIMIZER_KEY}.state.{name}.{key}",
            dtype,
            shape,
            segs,
            "optimizer",
            (OPTIMIZER_KEY, "state", name, key),
        )
        for name, key, dtype, shape, segs in found
    ]


def _training_dtype(ds: _Folder) -> str:
    config = ds.model0.get("ds_config")
    if isinstance(config, dict):
        for key, name in (("bf16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16")):
            section = config.get(key)
            if isinstance(section, dict) and section.get("enabled") is True:
                return name
    return "fp32"


def _plain(value: Any) -> Any:
    """DeepSpeed's small records as the plain data they hold (``LossScaler`` -> its dict)."""
    if isinstance(value, Opaque) and value.global_name.startswith("deepspeed."):
        if isinstance(value.state, dict):
            return {str(k): _plain(v) for k, v in value.state.items()}
        if len(value.args) == 1 and isinstance(value.args[0], (int, str)):  # an enum member
            return value.args[0]
    return value


def _entries(ds: _Folder) -> tuple[dict[str, Any], dict[str, tuple[Any, ...]]]:
    """Non-tensor values by name (client state, ds_config, loss scaler...), with their paths."""
    entries = {str(k): v for k, v in ds.model0.items() if k not in _LAYOUT_KEYS}
    paths: dict[str, tuple[Any, ...]] = {}
    extra = {
        k: ds.osd0[k]
        for k in ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad")
        if k in ds.osd0
    }
    base = ds.osd0.get("base_optimizer_state" if ds.stage <= 2 else "optimizer_state_dict")
    if isinstance(base, dict) and isinstance(base.get("param_groups"), list):
        extra["param_groups"] = zl.named_groups(base["param_groups"], ds.model0.get("param_shapes"))
    for key, value in extra.items():
        entries[f"{OPTIMIZER_KEY}.{key}"] = _plain(value)
        paths[f"{OPTIMIZER_KEY}.{key}"] = (OPTIMIZER_KEY, key)
    return entries, paths


def _unlisted_frozen(
    ds: _Folder, module: dict[str, Any], layout: dict[str, Place], known: dict[str, Any]
) -> list[LogicalTensor]:
    """Frozen params that only ``module`` holds: ZeRO-1 saves no ``frozen_param_shapes``, so
    DeepSpeed's own converters drop them, while its ``module`` keeps the whole tensor."""
    if ds.stage > 2:  # ZeRO-3's module holds empty placeholders; its frozen params are listed
        return []
    listed = set(known) | set(layout) | {str(n) for n in ds.model0.get("frozen_param_shapes") or {}}
    shared = ds.model0.get("shared_params") or {}
    aliases = set(shared) if isinstance(shared, dict) else set()
    return [
        _whole(str(name), ref, ds.model_paths[0])
        for name, ref in module.items()
        if str(name) not in listed and name not in aliases
    ]


def _model_tensors(
    ds: _Folder, flats: list[list[TensorRef]], layout: dict[str, Place]
) -> tuple[dict[str, LogicalTensor], dict[str, str], list[str], list[str]]:
    """Buffers, frozen params, trainable params (zero_to_fp32's order); aliases; casts; the
    frozen params only ``module`` holds."""
    mpath = ds.model_paths[0]
    module = _need(ds.model0, "module", dict, mpath)
    buffer_names = {n for n in _need(ds.model0, "buffer_names", list, mpath) if isinstance(n, str)}
    tensors: dict[str, LogicalTensor] = {}
    cast: list[str] = []
    for name, ref in module.items():
        if name in buffer_names:
            t = _whole(str(name), ref, mpath)
            if t.dtype in _FLOATS and t.dtype != "float32":  # zero_to_fp32 widens them
                t = dataclasses.replace(t, out_dtype="float32")
                cast.append(str(name))
            tensors[str(name)] = t
    unlisted = _unlisted_frozen(ds, module, layout, tensors)
    for t in _frozen(ds, mpath) + unlisted:
        if t.dtype in _FLOATS and t.dtype != "float32":  # as zero_to_fp32.py writes them
            t = dataclasses.replace(t, out_dtype="float32")
            cast.append(t.path[1])
        tensors[t.path[1]] = t
    flat = FlatGroups(flats)
    for name, place in layout.items():
        segments = zl.assemble(ds.stage, flat, ds.world, place)
        tensors[name] = _model(name, "float32", place[0], segments)
    shared = ds.model0.get("shared_params") or {}
    aliases = {}
    for alias, source in shared.items() if isinstance(shared, dict) else ():
        if isinstance(alias, str) and isinstance(source, str) and source in tensors:
            if alias in tensors:  # a name that holds its own tensor keeps it
                continue
            aliases[f"{MODEL_KEY}.{alias}"] = f"{MODEL_KEY}.{source}"
    return tensors, aliases, cast, [t.path[1] for t in unlisted]


def read(path: str, seen: dict[str, str] | None = None) -> DistributedCheckpoint:
    """Read a DeepSpeed ZeRO folder's structure: the pickles only, no tensor bytes.

    Args:
        path: the checkpoint folder (holding ``latest``) or one tag folder.
        seen: collects every global any pickle names (for the dangerous-pickle report).

    Returns:
        A :class:`DistributedCheckpoint` of kind ``"zero-1"``, ``"zero-2"`` or ``"zero-3"``:
        under ``module`` the fp32 state dict DeepSpeed's ``zero_to_fp32`` builds (a tied alias
        is ``facts["aliases"]``, not a second tensor), under ``optimizer`` the optimizer's
        per-param state assembled the same way, beside them the client state and config.

    Example:
        >>> read("checkpoints/").kind  # doctest: +SKIP
        'zero-2'
    """
    ds = _Folder(path, {} if seen is None else seen)
    mpath = ds.model_paths[0]
    shapes = _need(ds.model0, "param_shapes", list, mpath)
    flats = [ds.flat(r) for r in range(ds.world)]
    sizes = [[ref.numel for ref in groups] for groups in flats]
    if any(len(s) != len(sizes[0]) for s in sizes) or (
        ds.stage == 3 and any(s != sizes[0] for s in sizes)
    ):
        raise CheckpointError(ds.folder, "the ranks' fp32 groups do not match each other")
    paddings = ds.osd0.get("param_alignment_paddings")
    layout = zl.param_layout(ds.stage, shapes, sizes, paddings, ds.world, mpath)
    model, aliases, cast, unlisted = _model_tensors(ds, flats, layout)
    tensors = list(model.values()) + _moment_tensors(ds, layout, sizes)
    for t in tensors:
        check_segments(ds.folder, t)
    entries, paths = _entries(ds)
    paths.update({alias: (MODEL_KEY, alias.split(".", 1)[1]) for alias in aliases})
    facts: dict[str, Any] = {
        "zero_stage": ds.stage,
        "world_size": ds.world,
        "training_dtype": _training_dtype(ds),
        "ds_version": ds.model0.get("ds_version"),
        "tag": basename(ds.folder),
        "aliases": aliases,
        "frozen": [str(n) for n in (ds.model0.get("frozen_param_shapes") or {})],
        # frozen params DeepSpeed's converters drop (ZeRO-1 does not list them), kept here
        "frozen_unlisted": unlisted,
        "buffers": [t.path[1] for t in model.values() if t.path[1] in ds.model0["buffer_names"]],
        "cast_to_float32": cast,
        "paths": paths,
    }
    return DistributedCheckpoint(
        path=ds.folder,
        kind=f"zero-{ds.stage}",
        world_size=ds.world,
        files=sorted(ds.files),
        tensors=tensors,
        entries=entries,
        facts=facts,
    )
