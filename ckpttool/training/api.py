"""A small API for training scripts: load safely, fix key prefixes, save safely.

The seed problem: a DDP job saves from rank 0 with ``torch.save(ddp.state_dict(), path)``. Every
storage in that file is tagged ``cuda:0`` and every key starts with ``module.``. A later plain
``torch.load(path)`` in each rank then puts a copy on GPU 0 (or fails without a GPU), and
``load_state_dict(strict=True)`` into an unwrapped model fails on the prefix. These helpers avoid
both, on the reading side and on the writing side::

    from ckpttool import api

    # reading: never lands on the device recorded in the file; prefixes fixed to fit the model
    ckpt = api.load("ddp_best.pth", map_location=f"cuda:{local_rank}")   # or "cpu"
    fixed = api.fix_state_dict(model, ckpt["model"])  # model: bare, DDP, DataParallel, compiled
    model.load_state_dict(fixed.state_dict, strict=True)

    # writing: bare keys, cpu-tagged storages, atomic, rank 0 only, every rank waits
    api.save({"model": ddp_model, "optimizer": optimizer, "epoch": epoch}, "ckpt.pt")

Importing this module does not import torch; each function imports it when called. The load
side lives in :mod:`.loading`; the save side is here.
"""

from __future__ import annotations

import collections
import copy
import os
import pickle
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from .loading import PathLike, load, one_line
from .wrappers import FixResult, fix_state_dict, unwrap

if TYPE_CHECKING:
    import torch

__all__ = ["FixResult", "fix_state_dict", "load", "save", "unwrap"]


# -- save ---------------------------------------------------------------------------------------
def _to_cpu(obj: Any, memo: dict[Any, Any]) -> Any:
    """``obj`` with every tensor on the CPU; tensors sharing a storage still share one."""
    import torch
    from torch import nn

    if isinstance(obj, torch.Tensor):
        if id(obj) in memo:
            return memo[id(obj)]
        memo[id(obj)] = out = _tensor_to_cpu(obj, memo, torch, nn)
        return out
    if isinstance(obj, Mapping):
        items = [(k, _to_cpu(v, memo)) for k, v in obj.items()]
        if all(new is old for (_, new), old in zip(items, obj.values(), strict=True)):
            return obj
        if type(obj) is dict:
            return dict(items)
        if type(obj) is collections.OrderedDict:
            new: Any = collections.OrderedDict(items)
        else:
            try:
                new = copy.copy(obj)
                for k, v in items:
                    new[k] = v
            except Exception:
                new = dict(items)
        metadata = getattr(obj, "_metadata", None)
        if metadata is not None:
            new._metadata = metadata  # state dicts carry version info for load_state_dict
        return new
    if isinstance(obj, list):
        items_l = [_to_cpu(v, memo) for v in obj]
        if all(a is b for a, b in zip(items_l, obj, strict=True)):
            return obj
        return items_l
    if isinstance(obj, tuple):
        items_t = [_to_cpu(v, memo) for v in obj]
        if all(a is b for a, b in zip(items_t, obj, strict=True)):
            return obj
        if hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*items_t)
        return tuple(items_t)
    return obj


def _tensor_to_cpu(t: torch.Tensor, memo: dict[Any, Any], torch: Any, nn: Any) -> torch.Tensor:
    if t.device.type in ("cpu", "meta"):
        return t
    is_param = isinstance(t, nn.Parameter)
    plain = type(t) in (torch.Tensor, nn.Parameter) and t.layout == torch.strided
    if not plain or t.is_quantized:
        return t.detach().cpu()  # sparse, quantized, subclasses: no storage to share
    storage = t.untyped_storage()
    if storage.nbytes() == 0:
        cpu_storage = torch.UntypedStorage(0)
    else:
        key = ("storage", str(t.device), storage.data_ptr(), storage.nbytes())
        cpu_storage = memo.get(key)
        if cpu_storage is None:
            memo[key] = cpu_storage = storage.cpu()
    out = torch.empty(0, dtype=t.dtype).set_(cpu_storage, t.storage_offset(), t.size(), t.stride())
    if is_param:
        return nn.Parameter(out, requires_grad=t.requires_grad)
    return out


def _as_saveable(obj: Any) -> Any:
    import torch
    from torch import nn

    if isinstance(obj, nn.Module):
        return unwrap(obj).state_dict()
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = {}
        for k, v in obj.items():
            if isinstance(v, nn.Module):
                out[k] = unwrap(v).state_dict()
            elif isinstance(v, torch.optim.Optimizer):
                out[k] = v.state_dict()
            else:
                out[k] = v
        return out
    return obj


def _rank(rank: int | None) -> tuple[int, bool]:
    """(this process's rank, whether a process group is initialised)."""
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if rank is not None:
        return rank, initialised
    return (dist.get_rank() if initialised else 0), initialised


def save(obj_or_model: Any, path: PathLike, *, rank: int | None = None) -> None:
    """Write a checkpoint that any later plain ``torch.load(path)`` opens safely.

    - An ``nn.Module`` is saved as the state dict of the bare module inside any DataParallel,
      DDP or ``torch.compile`` wrappers (keys without ``module.``/``_orig_mod.``).
    - In a dict, module values are replaced the same way, optimizer values by their
      ``state_dict()``; other entries are kept as they are.
    - Every tensor is moved to the CPU, so every storage is tagged ``cpu``. Tensors that share
      a storage (tied weights, views) still share one in the file.
    - The file is written to a temp file beside ``path`` and renamed into place: a failed or
      interrupted save leaves the previous file untouched and no partial file.
    - Only rank 0 writes (``torch.distributed.get_rank()`` when a process group is initialised,
      else 0, unless ``rank`` is given). When a process group is initialised, every rank
      then waits on ``torch.distributed.barrier()``, so no rank reads the file before it exists.
      If rank 0's write fails it raises after the barrier; the other ranks return normally.

    Raises:
        CheckpointError: the object cannot be pickled or the file cannot be written.
    """
    import torch

    from ..writers.atomic import atomic_file

    dst = os.fspath(path)
    me, initialised = _rank(rank)
    error: Exception | None = None
    if me == 0:
        try:
            data = _to_cpu(_as_saveable(obj_or_model), {})
            with atomic_file(dst) as tmp:
                try:
                    torch.save(data, tmp)
                except (pickle.PicklingError, TypeError, AttributeError) as exc:
                    raise CheckpointError(dst, f"cannot save: {one_line(exc)}") from None
                except RuntimeError as exc:
                    raise CheckpointError(dst, f"write failed: {one_line(exc)}") from None
        except Exception as exc:
            error = exc
    if initialised:
        import torch.distributed as dist

        dist.barrier()
    if error is not None:
        raise error
