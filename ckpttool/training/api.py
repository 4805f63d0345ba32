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

Importing this module does not import torch; each function imports it when called.
"""

from __future__ import annotations

import collections
import copy
import os
import pickle
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, DangerousCheckpointError
from .wrappers import FixResult, fix_state_dict, unwrap

if TYPE_CHECKING:
    import torch

__all__ = ["FixResult", "fix_state_dict", "load", "save", "unwrap"]

PathLike = str | os.PathLike[str]


# -- load ---------------------------------------------------------------------------------------
def _device(map_location: Any, path: str) -> torch.device:
    import torch

    if map_location is None:
        raise ValueError(
            "map_location=None would use the device recorded in the file; "
            "give 'cpu', 'cuda:N' or a torch.device"
        )
    if isinstance(map_location, torch.device):
        device = map_location
    elif isinstance(map_location, str):
        try:
            device = torch.device(map_location)
        except RuntimeError as exc:
            raise ValueError(f"map_location {map_location!r} is not a device: {exc}") from None
    else:
        raise TypeError(
            f"map_location must be a str such as 'cpu' or 'cuda:0', or a torch.device, "
            f"not {type(map_location).__name__}"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckpointError(path, f"map_location {device} asked for, but CUDA is absent")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CheckpointError(
                path,
                f"map_location {device} asked for, but only {torch.cuda.device_count()} "
                "CUDA device(s) exist",
            )
    return device


def _format(path: str) -> tuple[str, str]:
    """``(format, file)`` where ``file`` is the index file for a sharded folder."""
    from ..readers import open_checkpoint, sniff

    if os.path.isdir(path) or path.endswith(".json"):
        ckpt = open_checkpoint(path)  # resolves the index, checks every shard exists
        return ckpt.format, ckpt.path
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        head = b""
    kind = sniff(head, path)
    if kind in ("zip", "legacy", "safetensors"):
        return kind, path
    ckpt = open_checkpoint(path)  # raises a CheckpointError that says what the file is
    return ckpt.format, ckpt.path


def load(
    path: PathLike,
    map_location: str | torch.device = "cpu",
    *,
    weights_only: bool = True,
    mmap: bool | None = None,
) -> Any:
    """Open any checkpoint ckpttool reads, with every storage on ``map_location``.

    Never uses the device recorded in the file: a file saved from ``cuda:0`` by rank 0 loads onto
    ``"cpu"`` (the default) or onto the device given, e.g. ``f"cuda:{local_rank}"``.

    Args:
        path: a torch file (zip or legacy ``.pt``/``.pth``/``.bin``/``.ckpt``), a ``.safetensors``
            file, a sharded checkpoint's ``*.index.json``, the folder holding that index, or a
            Hugging Face model folder (its ``model.safetensors`` or ``pytorch_model.bin``).
        map_location: ``"cpu"``, ``"cuda:N"`` or a :class:`torch.device`; ``None`` is refused.
        weights_only: passed to :func:`torch.load` (torch files only). Keep ``True`` for files
            you did not write yourself: then no pickled code runs.
        mmap: map torch zip files into memory instead of reading them (:func:`torch.load`'s
            ``mmap``). Default: on for zip files loaded to the CPU, off otherwise. Mapped
            tensors read the file lazily and copy on write; do not rewrite the file in place
            (``open(path, "wb")``) while you still use them (:func:`save` replaces files
            atomically, which is safe).

    Returns:
        What :func:`torch.load` returns; for safetensors files and sharded checkpoints, a dict of
        tensor name to tensor (a sharded checkpoint's shards merged in the index's order), with
        the tied tensors that ckpttool stored once under every name again (the aliases recorded
        in ``__metadata__["ckpttool.aliases"]``: both names, one tensor).

    Raises:
        CheckpointError: the file is missing, not a checkpoint, damaged, needs
            ``weights_only=False``, or the device asked for does not exist.
    """
    path = os.fspath(path)
    device = _device(map_location, path)
    kind, real = _format(path)
    if kind == "hf-sharded":
        return _load_sharded(real, device, weights_only=weights_only, mmap=mmap)
    if kind == "safetensors":
        return _load_safetensors(real, device)
    return _load_torch(real, kind, device, weights_only=weights_only, mmap=mmap)


def _load_safetensors(path: str, device: torch.device) -> dict[str, torch.Tensor]:
    tensors, aliases = _read_safetensors(path, device)
    return _with_aliases(path, tensors, aliases)


def _read_safetensors(
    path: str, device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(the stored tensors, the aliases ckpttool recorded for tied tensors stored once)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(path, device=str(device))
        with safe_open(path, framework="pt") as f:  # reads the header only
            meta = f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(path, f"cannot load safetensors file: {_one_line(exc)}") from None
    return tensors, _aliases(path, meta)


def _aliases(path: str, meta: Mapping[str, str]) -> dict[str, str]:
    """``__metadata__["ckpttool.aliases"]``: JSON {alias: stored name}, checked."""
    import json

    from ..ops.to_safetensors import ALIASES_KEY

    raw = meta.get(ALIASES_KEY)
    if raw is None:
        return {}
    try:
        aliases = json.loads(raw)
    except ValueError:
        aliases = None
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise CheckpointError(path, f"its {ALIASES_KEY!r} metadata is not a map of tensor names")
    return aliases


def _with_aliases(path: str, tensors: dict[str, Any], aliases: Mapping[str, str]) -> dict[str, Any]:
    """Tied tensors under every name again: each alias is the very tensor it names."""
    for alias, stored in aliases.items():
        if alias in tensors:
            raise CheckpointError(path, f"alias {alias!r} is also a stored tensor")
        if stored not in tensors:
            raise CheckpointError(path, f"alias {alias!r} names {stored!r}, which is not stored")
    out = dict(tensors)
    out.update({alias: tensors[stored] for alias, stored in aliases.items()})
    return out


def _load_torch(
    path: str, kind: str, device: torch.device, *, weights_only: bool, mmap: bool | None
) -> Any:
    import torch

    zip_like = kind in ("zip", "torchscript")
    if kind == "torchscript" or (kind == "zip" and _is_torchscript(path)):
        raise CheckpointError(
            path,
            "is a TorchScript archive, not a checkpoint: use "
            f"torch.jit.load(path, map_location={str(device)!r})",
        )
    if mmap is None:
        mmap = zip_like and device.type == "cpu"
    elif mmap and not zip_like:
        raise CheckpointError(path, f"mmap=True needs a torch zip file; this one is {kind}")
    if not weights_only:  # torch would run the pickle: never one that can run code
        from ..readers import file_verdict

        dangerous = file_verdict(path).dangerous
        if dangerous:
            raise DangerousCheckpointError(path, dangerous)
    try:
        return torch.load(path, map_location=device, weights_only=weights_only, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise _weights_only_error(path, exc) from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(path, f"cannot load: {_one_line(exc)}") from None


def _weights_only_error(path: str, exc: pickle.UnpicklingError) -> CheckpointError:
    """Name the globals torch refused, from ckpttool's own reading of the pickle."""
    from ..readers import open_checkpoint

    try:
        verdict = open_checkpoint(path).verdict
    except DangerousCheckpointError as err:
        return err
    except CheckpointError:
        verdict = None
    if verdict is not None and verdict.dangerous:
        return DangerousCheckpointError(path, verdict.dangerous)
    names = [g.name for g in verdict.globals if g.kind != "torch"] if verdict else []
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        reason = f"it names {shown}"
    else:
        lines = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line]
        reason = lines[0] if lines else _one_line(exc)
    return CheckpointError(
        path,
        f"torch's weights_only loader refuses it ({reason}); "
        "ckpttool.convert(..., plain_objects=True) writes a copy it accepts, "
        "or pass weights_only=False if you trust the file",
    )


def _is_torchscript(path: str) -> bool:
    """Torch's own test (a ``constants.pkl`` record), read from the zip's central directory."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return False  # torch.load gives the error


def _load_sharded(
    index: str, device: torch.device, *, weights_only: bool, mmap: bool | None
) -> dict[str, Any]:
    import json

    with open(index, encoding="utf-8") as f:
        weight_map: dict[str, str] = json.load(f)["weight_map"]  # validated by open_checkpoint
    folder = os.path.dirname(os.path.abspath(index))
    merged: dict[str, Any] = {}
    aliases: dict[str, str] = {}  # every shard records them all (ckpttool's to_safetensors)
    for shard in dict.fromkeys(weight_map.values()):
        shard_path = os.path.join(folder, shard)
        kind, _ = _format(shard_path)
        if kind == "safetensors":
            part, found = _read_safetensors(shard_path, device)
            aliases.update(found)
        else:
            part = _load_torch(shard_path, kind, device, weights_only=weights_only, mmap=mmap)
        if not isinstance(part, Mapping):
            raise CheckpointError(shard_path, "shard is not a dict of tensors")
        merged.update(part)
    missing = [name for name in weight_map if name not in merged]
    if missing:
        raise CheckpointError(index, f"tensor {missing[0]!r} is not in its shard")
    return _with_aliases(index, {name: merged[name] for name in weight_map}, aliases)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
                    raise CheckpointError(dst, f"cannot save: {_one_line(exc)}") from None
                except RuntimeError as exc:
                    raise CheckpointError(dst, f"write failed: {_one_line(exc)}") from None
        except Exception as exc:
            error = exc
    if initialised:
        import torch.distributed as dist

        dist.barrier()
    if error is not None:
        raise error
