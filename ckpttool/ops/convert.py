"""``convert``: re-save a checkpoint as a CPU-tagged torch zip file, with key surgery.

The fast path never materialises a tensor: the pickle is rewritten (locations set to ``cpu``,
keys renamed) and each storage record is copied byte for byte from the input with
``copy_file_range``. Only dtype casts, big-endian inputs and compressed records pass through
memory, one chunk at a time. The output is written atomically and verified by reading it back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import dtypes
from ..analysis.state_dicts import find_state_dicts
from ..errors import CheckpointError, DangerousCheckpointError
from ..model import Checkpoint, Opaque, TensorRef
from ..readers import open_checkpoint
from ..tree import KEEP, get_path, iter_tensors, transform, walk
from ..unpickling.policy import classify
from ..writers.atomic import atomic_file, check_target
from ..writers.pt import verify_pt, write_pt
from ..writers.pt_pickle import OutStorage
from .keys import CAST_DTYPES, KeyCollisionError, KeyOps
from .plain import MemoryStorage, NotPlain, needs_plain, plain_equivalent

Progress = Callable[[int], None]


@dataclass
class ConvertResult:
    src: str
    dst: str
    tensors: int
    storages: int
    bytes: int
    renamed: list[tuple[str, int]] = field(default_factory=list)  # (state dict path, keys)
    replaced: list[str] = field(default_factory=list)  # plain-object replacements
    cast: int = 0  # storages cast to another dtype
    notes: list[str] = field(default_factory=list)
    verified: bool = False


# -- planning -----------------------------------------------------------------------------
def input_files(ckpt: Checkpoint) -> list[str]:
    """Every file the checkpoint is made of (an index and its shards), to protect them."""
    return [ckpt.path, *dict.fromkeys(s.file for s in ckpt.storages.values() if s.file)]


def _select(ckpt: Checkpoint, only: str | None) -> Any:
    if only is None:
        return ckpt.root
    try:
        return get_path(ckpt.root, only)
    except KeyError:
        top = ", ".join(repr(k) for k in list(ckpt.root)[:8]) if isinstance(ckpt.root, dict) else ""
        raise CheckpointError(
            ckpt.path, f"no entry {only!r} to select" + (f" (top-level keys: {top})" if top else "")
        ) from None


def _rename(path: str, root: Any, ops: KeyOps, key: str | None, result: ConvertResult) -> Any:
    if not ops:
        return root
    if key is not None:
        try:
            target = get_path(root, key)
        except KeyError:
            raise CheckpointError(path, f"no entry {key!r} (--key)") from None
        if not isinstance(target, dict) or isinstance(target, Opaque):
            raise CheckpointError(path, f"{key!r} is not a state dict (--key)")
        targets = [(key, target)]
    else:
        found = find_state_dicts(root)
        sds = [s for s in found if s.source == "dict"]
        if not sds:
            if found:
                raise CheckpointError(
                    path,
                    "holds a whole pickled module, not a state dict: key options do not apply",
                )
            raise CheckpointError(path, "no state dict found to rename; choose one with --key")
        targets = [(s.path, s.node) for s in sds]
    replacements: dict[int, Any] = {}
    for sd_path, sd in targets:
        try:
            new = ops.apply(sd)
        except KeyCollisionError as exc:
            where = f" in {sd_path!r}" if sd_path else ""
            raise CheckpointError(
                path,
                f"renaming would make {exc.first!r} and {exc.second!r} both {exc.new!r}{where}",
            ) from None
        changed = sum(1 for a, b in zip(sd, new, strict=True) if a != b)
        result.renamed.append((sd_path, changed))
        replacements[id(sd)] = new
    return transform(root, lambda n: replacements.get(id(n), KEEP))


def _make_plain(path: str, root: Any, result: ConvertResult, made: dict[str, MemoryStorage]) -> Any:
    failures: list[str] = []

    def replace(node: Any) -> Any:
        if needs_plain(node):
            try:
                value = plain_equivalent(node, made)
            except NotPlain as exc:
                failures.append(str(exc))
                return KEEP
            kind = type(value).__name__ if not isinstance(value, TensorRef) else "tensor"
            result.replaced.append(f"{node.global_name} -> {kind}")
            # Children of a replaced value may hold placeholders too.
            return transform(value, replace) if isinstance(value, (dict, list)) else value
        return KEEP

    new_root = transform(root, replace)
    if failures:
        raise CheckpointError(path, f"--plain-objects: {failures[0]}")
    return new_root


def _remaining_globals(root: Any) -> list[str]:
    names: dict[str, None] = {}
    for _, node in walk(root):
        if isinstance(node, Opaque) and classify(node.global_name) != "torch":
            names[node.global_name] = None
        elif isinstance(node, type) and issubclass(node, Opaque):
            names[node.__ck_global__] = None
    return list(names)


def castable_refs(root: Any) -> set[int]:
    """The tensors ``--dtype`` casts: those of the state dicts found (model weights), so that
    optimizer state such as Adam's float32 ``step`` counters stays exact; every tensor when
    there is no state dict."""
    sds = [s for s in find_state_dicts(root) if s.source in ("dict", "module")]
    if not sds:
        return {id(ref) for _, ref in iter_tensors(root)}
    out: set[int] = set()
    for sd in sds:
        out.update(id(ref) for _, ref in iter_tensors(sd.node))
    return out


def plan_storages(
    root: Any, cast: str | None
) -> tuple[list[OutStorage], dict[int, OutStorage], dict[int, str], list[tuple[str, TensorRef]]]:
    """Number the output storages in order of first use, as torch.save does."""
    castable = castable_refs(root) if cast else set()
    outs: list[OutStorage] = []
    by_source: dict[tuple[str, str], OutStorage] = {}
    storage_of: dict[int, OutStorage] = {}
    dtype_of: dict[int, str] = {}
    named = list(iter_tensors(root))
    for name, ref in named:
        src = ref.storage
        assert src is not None
        ident = (src.file, src.key)
        out = by_source.get(ident)
        if out is None:
            dtype = src.dtype
            if (
                cast
                and id(ref) in castable
                and dtypes.get(dtype).is_floating
                and dtype != cast
                and ref.kind != "quantized"
            ):
                dtype = cast
            out = OutStorage(str(len(outs)), dtype, src.numel, source=src)
            by_source[ident] = out
            outs.append(out)
        out.tensors.append(name)
        storage_of[id(ref)] = out
        if out.dtype != out.source.dtype and ref.dtype == out.source.dtype:  # type: ignore[union-attr]
            dtype_of[id(ref)] = out.dtype
    return outs, storage_of, dtype_of, named


# -- the command -----------------------------------------------------------------------------
def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    strip_prefix: str | tuple[str, ...] = (),
    add_prefix: str | tuple[str, ...] = (),
    replace_prefix: tuple[str, str] | tuple[tuple[str, str], ...] = (),
    key: str | None = None,
    only: str | None = None,
    dtype: str | None = None,
    plain_objects: bool = False,
    verify: bool = True,
    force: bool = False,
    in_place: bool = False,
    progress: Callable[[int, int], Progress | None] | None = None,
) -> ConvertResult:
    """Re-save ``src`` as a torch zip file at ``dst`` with every storage tagged ``cpu``.

    ``strip_prefix="module."`` / ``add_prefix="module."`` rename the keys of every state dict
    found (or of ``key``); ``only`` writes just one entry (e.g. ``"model"``); ``dtype`` casts
    floating-point storages; ``plain_objects`` replaces objects torch's ``weights_only``
    loader refuses by plain equivalents. ``progress(total_bytes)`` may return a callback that
    receives byte counts. Raises :class:`CheckpointError` on bad input or a failed write;
    nothing is left behind then.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    ops = KeyOps(
        strip=(strip_prefix,) if isinstance(strip_prefix, str) else tuple(strip_prefix),
        add=(add_prefix,) if isinstance(add_prefix, str) else tuple(add_prefix),
        replace=(replace_prefix,)  # type: ignore[arg-type]
        if replace_prefix and isinstance(replace_prefix[0], str)
        else tuple(replace_prefix),  # type: ignore[arg-type]
    )
    if dtype is not None and dtype not in CAST_DTYPES:
        raise CheckpointError(None, f"--dtype must be one of {', '.join(CAST_DTYPES)}")
    ckpt = open_checkpoint(src)
    check_target(input_files(ckpt), dst, force=force, in_place=in_place)
    dangerous = [g for g in ckpt.globals if classify(g) == "dangerous"]
    if dangerous:
        raise DangerousCheckpointError(src, dangerous)
    if ckpt.format == "torchscript":
        raise CheckpointError(
            src,
            "is a TorchScript archive (code and weights): convert does not rewrite it; "
            "use `ckpttool to-safetensors --all` to extract its tensors",
        )
    result = ConvertResult(src, dst, 0, 0, 0)
    root = _select(ckpt, only)
    root = _rename(src, root, ops, key, result)
    memory: dict[str, MemoryStorage] = {}
    if plain_objects:
        root = _make_plain(src, root, result, memory)
    left = _remaining_globals(root)
    if left:
        result.notes.append(
            "the output still pickles "
            + ", ".join(left[:4])
            + (" and more" if len(left) > 4 else "")
            + ": torch.load(weights_only=True) refuses it; --plain-objects replaces them"
        )
    outs, storage_of, dtype_of, named = plan_storages(root, dtype)
    result.tensors = len(named)
    result.storages = len(outs)
    result.bytes = sum(o.nbytes for o in outs)
    result.cast = sum(1 for o in outs if o.source and o.dtype != o.source.dtype)
    cb = progress(result.bytes) if progress else None
    with atomic_file(dst) as tmp:
        write_pt(tmp, root, outs, storage_of, dtype_of, memory, cb, check_copies=verify)
        if verify:
            verify_pt(tmp, named, storage_of, dtype_of, outs)
            result.verified = True
    return result
