"""The load side of the training API: open any checkpoint format onto one chosen device.

Torch files are loaded with ``weights_only`` by default and never land on the device recorded in
the file; safetensors files and sharded checkpoints come back as a dict of tensors. What torch
refuses is explained from ckpttool's own reading of the pickle. :mod:`.api` re-exports
:func:`load`. Importing this module does not import torch.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, CheckpointWarning, DangerousCheckpointError
from ..readers.safetensors import recorded_aliases

if TYPE_CHECKING:
    import torch

PathLike = str | os.PathLike[str]


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
    from ..readers.hf_folder import note

    if os.path.isdir(path) or path.endswith(".json"):
        ckpt = open_checkpoint(path)  # resolves the index, checks every shard exists
        two_sets = note(ckpt.facts.get("folder"))
        if two_sets:
            warnings.warn(two_sets, CheckpointWarning, stacklevel=3)
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
            file, a sharded checkpoint's ``*.index.json``, the folder holding that index, a
            Hugging Face model folder (the weights transformers loads from it: its
            ``model.safetensors`` first; a :class:`~ckpttool.errors.CheckpointWarning` when
            the folder holds a second weight set, which is ignored), or a DCP or DeepSpeed
            folder (what ``ckpttool consolidate FOLDER OUT --all`` writes).
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
    if kind == "dcp" or kind.startswith("zero-"):
        return _load_distributed(real, device, weights_only=weights_only, mmap=mmap)
    if kind == "safetensors":
        return _load_safetensors(real, device)
    return _load_torch(real, kind, device, weights_only=weights_only, mmap=mmap)


def _load_distributed(
    folder: str, device: torch.device, *, weights_only: bool, mmap: bool | None
) -> Any:
    """A DCP or DeepSpeed folder: what ``consolidate(folder, out, select="all")`` writes, loaded.

    The folder is consolidated once into a temporary file (in ``TMPDIR``), which is loaded
    (mapped, by default, on the CPU) and removed; the tensors stay valid.
    """
    import tempfile

    from ..ops.consolidate import consolidate

    user_classes = ("allow_user_classes", "allow_class_references")
    with tempfile.TemporaryDirectory(prefix="ckpttool-load-") as tmp:
        out = os.path.join(tmp, "consolidated.pt")
        try:
            consolidate(folder, out, select="all", allow_user_classes=not weights_only)
            return _load_torch(out, "zip", device, weights_only=weights_only, mmap=mmap)
        except CheckpointError as exc:
            if isinstance(exc, DangerousCheckpointError):
                raise
            message, trust = exc.message, "pass weights_only=False if you trust the files"
            if "weights_only loader refuses" in message:  # a Generator that DCP kept
                message = f"{message.split(';')[0]}; {trust}"
            elif exc.remedy in user_classes:
                message = f"{message}: torch's weights_only loader refuses them; {trust}"
            raise CheckpointError(folder, message) from None


def _load_safetensors(path: str, device: torch.device) -> dict[str, torch.Tensor]:
    tensors, meta = _read_safetensors(path, device)
    return _with_aliases(tensors, recorded_aliases(path, meta, tensors))


def _read_safetensors(
    path: str, device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(the stored tensors, the file's ``__metadata__``)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(path, device=str(device))
        with safe_open(path, framework="pt") as f:  # reads the header only
            meta = f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(path, f"cannot load safetensors file: {one_line(exc)}") from None
    return tensors, meta


def _with_aliases(tensors: dict[str, Any], aliases: Mapping[str, str]) -> dict[str, Any]:
    """Tied tensors under every name again: each alias is the very tensor it names (the
    aliases ckpttool recorded in ``__metadata__["ckpttool.aliases"]``, checked)."""
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
        raise CheckpointError(path, f"cannot load: {one_line(exc)}") from None


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
        reason = lines[0] if lines else one_line(exc)
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
            part, meta = _read_safetensors(shard_path, device)
            aliases.update(recorded_aliases(shard_path, meta, weight_map))
        else:
            part = _load_torch(shard_path, kind, device, weights_only=weights_only, mmap=mmap)
        if not isinstance(part, Mapping):
            raise CheckpointError(shard_path, "shard is not a dict of tensors")
        merged.update(part)
    missing = [name for name in weight_map if name not in merged]
    if missing:
        raise CheckpointError(index, f"tensor {missing[0]!r} is not in its shard")
    return _with_aliases({name: merged[name] for name in weight_map}, aliases)


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
