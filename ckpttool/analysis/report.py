"""Turn a :class:`Checkpoint` into the JSON-ready summary that ``inspect`` shows.

The top-level shape is the stable contract documented in the README (``schema`` 1).
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from typing import Any

from ..errors import shown
from ..model import Checkpoint, Opaque, StorageInfo, TensorInfo, TensorRef
from ..readers.hf_folder import note as folder_note
from ..tree import alias_names, aliases, children
from ..unpickling.lists import NESTED_CLASSES
from ..unpickling.policy import classify
from .describe import describe
from .fixes import CONSOLIDATE, PLAIN_OBJECTS, RESAVE_CPU, REWRITE_ZIP, STRIP_PREFIX, Finding, Fix
from .meta_tensors import meta_tensors
from .state_dicts import find_state_dicts

SCHEMA = 1


def _shared_groups(tensors: list[TensorInfo]) -> dict[int, list[str]]:
    """Tensor index -> names of the other tensors whose bytes overlap it in the same storage."""
    by_storage: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        if t.storage is not None and t.numel:
            by_storage[(t.storage.file, t.storage.key)].append(i)
    shared: dict[int, list[str]] = {}
    for idxs in by_storage.values():
        if len(idxs) < 2:
            continue
        for i in idxs:
            lo, hi = tensors[i].ref.extent()
            lo, hi = lo * tensors[i].ref.itemsize, hi * tensors[i].ref.itemsize
            others = []
            for j in idxs:
                if j == i:
                    continue
                lo2, hi2 = tensors[j].ref.extent()
                lo2, hi2 = lo2 * tensors[j].ref.itemsize, hi2 * tensors[j].ref.itemsize
                if lo < hi2 and lo2 < hi:
                    others.append(tensors[j].name)
            if others:
                shared[i] = others
    return shared


def _tensor_rows(
    tensors: list[TensorInfo],
    shared: dict[int, list[str]],
    pairs: list[tuple[str, str]],
    tensor_filter: str | None,
    meta: list[tuple[int, dict[str, Any]]],
) -> list[dict[str, Any]]:
    """One row per tensor in document order, meta tensors (``meta``: rows by the number of
    stored tensors before them) among them. ``nbytes`` is torch's ``Tensor.nbytes``: elements
    times element size (quint4x2/quint2x4 count one byte per element, though their storage
    packs 2 or 4 in a byte; the dtypes and devices tables count storage bytes)."""
    also, _more = alias_names([t.name for t in tensors], pairs) if pairs else ({}, False)
    rows = []
    pending = iter(meta)
    nxt = next(pending, None)
    for i, t in enumerate([*tensors, None]):
        while nxt is not None and (t is None or nxt[0] <= i):
            rows.append(nxt[1])
            nxt = next(pending, None)
        if t is None:
            break
        rows.append(
            {
                "name": t.name,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "stride": list(t.stride),
                "storage_offset": t.storage_offset,
                "device": t.device,
                "nbytes": t.numel * t.ref.itemsize,
                "storage": t.storage.key if t.storage else None,
                "kind": t.kind,
                "shared_with": shared.get(i, []),
                "aliases": also.get(t.name, []),  # the same tensor reached by other paths
            }
        )
    if tensor_filter:
        rows = [r for r in rows if fnmatch.fnmatchcase(r["name"], tensor_filter)]
    return rows


_MAX_ALIASES = 1000  # a shared-reference bomb has millions: the report lists the first ones


def _entries(root: Any, alias_of: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Non-tensor values near the top (``epoch = 37``), and containers summarised."""
    if isinstance(root, Opaque) or not isinstance(root, dict):
        return []
    alias_of = alias_of or {}
    out = []
    for path, value in children(root, ""):
        if isinstance(value, TensorRef):
            continue
        n = _count_tensors(value)
        if n:
            text = f"{type(value).__name__ if not isinstance(value, Opaque) else value.global_name}"
            text += f" holding {n} tensor{'s' if n != 1 else ''}"
            if path in alias_of:
                text += f" (the same object as {alias_of[path]!r})"
            out.append({"path": path, "value": text, "holds_tensors": True})
        else:
            out.append({"path": path, "value": describe(value, 100), "holds_tensors": False})
    return out


def _count_tensors(node: Any, limit: int = 10**7) -> int:
    from ..tree import iter_tensors

    n = 0
    for _ in iter_tensors(node):
        n += 1
        if n >= limit:
            break
    return n


def _dtypes(tensors: list[TensorInfo], storages: list[StorageInfo]) -> dict[str, dict[str, int]]:
    """Storages and bytes per dtype; an untyped (uint8) storage counts as the dtype of the
    first tensor viewing it."""
    viewed_as: dict[tuple[str, str], str] = {}
    for t in tensors:
        if t.storage is not None:
            viewed_as.setdefault((t.storage.file, t.storage.key), t.dtype)
    out: dict[str, dict[str, int]] = {}
    for s in storages:
        d = out.setdefault(viewed_as.get((s.file, s.key), s.dtype), {"storages": 0, "bytes": 0})
        d["storages"] += 1
        d["bytes"] += s.nbytes
    return out


def _devices(storages: list[StorageInfo]) -> dict[str, dict[str, int]]:
    """Storages and bytes per device they were saved from."""
    out: dict[str, dict[str, int]] = {}
    for s in storages:
        if not s.location:
            continue
        d = out.setdefault(s.location, {"storages": 0, "bytes": 0})
        d["storages"] += 1
        d["bytes"] += s.nbytes
    return out


def _parameters(tensors: list[TensorInfo], sds: list[Any]) -> int:
    """Elements in the state dicts, or in every tensor if there is none; a tensor is counted
    once however many names reach it, and so are names for one view of one storage (tied
    weights such as GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``), as
    ``sum(p.numel() for p in model.parameters())`` counts a tied parameter once."""
    prefixes = [f"{sd.path}." if sd.path else "" for sd in sds]
    counted: set[Any] = set()
    params = 0
    for t in tensors:
        if sds and not any(t.name.startswith(p) for p in prefixes):
            continue
        s = t.storage
        view = (s.file, s.key, t.storage_offset, t.shape, t.stride, t.dtype) if s else id(t.ref)
        if view not in counted and id(t.ref) not in counted:
            counted.update((view, id(t.ref)))
            params += t.numel
    return params


def build(ckpt: Checkpoint, *, tensor_filter: str | None = None) -> dict[str, Any]:
    """The inspect report of ``ckpt`` (JSON-ready; its ``warnings`` are :class:`Finding`)."""
    tensors = ckpt.tensors()
    meta = meta_tensors(ckpt.root)
    shared = _shared_groups(tensors)
    storages = list(ckpt.storages.values())
    sds = find_state_dicts(ckpt.root)
    pairs = aliases(ckpt.root)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "path": shown(ckpt.path),  # a URL without its credentials
        "format": ckpt.format,
        "file_bytes": ckpt.file_bytes,
        "tensor_count": len(tensors),
        "storage_count": len(storages),
        "parameters": _parameters(tensors, sds),
        "tensor_bytes": sum(s.nbytes for s in storages),
        "dtypes": _dtypes(tensors, storages),
        "devices": _devices(storages),
        "state_dicts": [
            {"path": s.path, "tensors": s.tensors, "prefix": s.prefix, "source": s.source}
            for s in sds
        ],
        "entries": _entries(ckpt.root, dict(pairs[:_MAX_ALIASES])),
        # containers reached again by another path: {'model': sd, 'ema': sd}
        "aliases": [{"path": a, "same_as": b} for a, b in pairs[:_MAX_ALIASES]],
        "globals": _global_rows(ckpt),
        "verdict": _verdict(ckpt),
        "shared": _shared_summary(tensors, shared),
        "facts": _jsonable(
            {k: v for k, v in ckpt.facts.items() if k not in ("distributed", "folder")}
        ),
        # opened from a folder: {path, weights (the file read), chosen_by, ignored}
        "folder": _jsonable(ckpt.facts.get("folder")),
        "tensors": _tensor_rows(tensors, shared, pairs, tensor_filter, meta),
    }
    if "distributed" in ckpt.facts:  # a folder of shards (DCP, DeepSpeed): its layout
        from ..readers.distributed import describe_distributed  # (3 ms to import)

        distributed = describe_distributed(ckpt)
        if distributed is not None:
            report["distributed"] = _jsonable(distributed)
    if meta:
        report["meta_tensors"] = [
            {k: row[k] for k in ("name", "dtype", "shape", "kind")} for _, row in meta
        ]
    report["warnings"] = warnings(report)
    return report


def _meta_warning(meta: list[dict[str, Any]]) -> str:
    names = ", ".join(m["name"] for m in meta[:3]) + (" and more" if len(meta) > 3 else "")
    many = "s" if len(meta) != 1 else ""
    return f"{len(meta)} tensor{many} saved from the meta device ({names}): dtype and shape only"


def _shared_summary(tensors: list[TensorInfo], shared: dict[int, list[str]]) -> list[list[str]]:
    groups: list[list[str]] = []
    seen: set[str] = set()
    for i, others in shared.items():
        name = tensors[i].name
        if name in seen:
            continue
        group = [name, *others]
        seen.update(group)
        groups.append(group)
    return groups


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return describe(value)


def warnings(report: dict[str, Any]) -> list[Finding]:
    """Plain-language problems with this file, each with its fix (``Finding.fix``) if any."""
    out = _device_warnings(report) + _prefix_warnings(report) + _global_warnings(report)
    two_sets = folder_note(report.get("folder"))
    if two_sets:
        out.insert(0, Finding(two_sets))
    if report["format"] == "legacy":
        out.append(
            Finding(
                "legacy (pre-1.6) format: torch.load(mmap=True) cannot map it", Fix(REWRITE_ZIP)
            )
        )
    if report["format"] == "torchscript":
        out.append(
            Finding(
                "a TorchScript archive (torch.jit.save): it holds code as well as weights; "
                "torch.jit.load runs that code, so load it only if you trust its source"
            )
        )
    meta = report.get("meta_tensors", [])
    if meta:
        out.append(Finding(_meta_warning(meta)))
    if report["tensor_count"] == 0 and not meta:
        out.append(Finding("the file holds no tensors"))
    return out


def _device_warnings(report: dict[str, Any]) -> list[Finding]:
    gpu = sorted(loc for loc in report["devices"] if loc != "cpu")
    if not gpu:
        return []
    text = (
        f"storages were saved on {', '.join(gpu)}: a plain torch.load restores them onto that "
        f"GPU (in every DDP rank: extra memory on {gpu[0]}) and fails on a machine without one"
    )
    return [Finding(text, Fix(RESAVE_CPU))]


_WRAPPERS = (  # a key prefix, the prefix to strip, and where it comes from
    ("module.", "module.", "saved from a DataParallel/DDP wrapper"),
    ("_orig_mod.", "_orig_mod.", "saved from a torch.compile wrapper"),
)


def _prefix_warnings(report: dict[str, Any]) -> list[Finding]:
    out = []
    for sd in report["state_dicts"]:
        prefix = sd["prefix"]
        if not prefix:
            continue
        where = f"state dict '{sd['path']}'" if sd["path"] else "the state dict"
        strip, why = next(
            ((s, w) for p, s, w in _WRAPPERS if prefix.startswith(p)),
            (prefix, "saved from a wrapper module"),
        )
        text = (
            f"every key of {where} starts with '{prefix}' ({why}): load_state_dict on an "
            "unwrapped model fails with missing/unexpected keys"
        )
        out.append(Finding(text, Fix(STRIP_PREFIX, strip)))
    return out


def _module(name: str) -> str:
    """The module a global's name imports (a nested class's is its outer class's)."""
    return name.rsplit(".", 2)[0] if name in NESTED_CLASSES else name.rpartition(".")[0]


def _global_warnings(report: dict[str, Any]) -> list[Finding]:
    dangerous = [g["name"] for g in report["globals"] if g["kind"] == "dangerous"]
    opaque = [g["name"] for g in report["globals"] if g["kind"] in ("data", "unvetted code")]
    user = [g["name"] for g in report["globals"] if g["kind"] == "unvetted code"]
    out = []
    if dangerous:
        out.append(
            Finding(
                "DANGER: the pickle names " + ", ".join(dangerous[:5]) + ": torch.load with "
                "weights_only=False would run code. Do not load this file; ckpttool never runs it"
            )
        )
    if user and not dangerous and report["format"] != "torchscript":
        out.append(
            Finding(
                "unvetted code: loading "
                + ("these files" if "distributed" in report else "this file")
                + " imports "
                + ", ".join(sorted({_module(n) for n in user} - {"builtins"})[:4])
                + " and runs their classes' code; load it only if you trust them"
            )
        )
    if opaque and "distributed" in report:
        out.append(_folder_warning(report["distributed"]["kind"], opaque))
    elif opaque and report["format"] != "torchscript":
        shown = ", ".join(opaque[:4]) + (f" and {len(opaque) - 4} more" if len(opaque) > 4 else "")
        text = f"torch.load(weights_only=True) refuses this file: it pickles {shown}"
        out.append(Finding(text, Fix(PLAIN_OBJECTS)))
    return out


def _verdict(ckpt: Checkpoint) -> dict[str, Any]:
    """The file's safety verdict, as ``scan`` gives it: ``safe``, ``unvetted code``,
    ``unreadable`` or ``dangerous``, and what besides its globals decides it."""
    v = ckpt.verdict
    if v is None:
        return {"kind": "unknown", "reasons": []}
    kind = "safe" if v.safe else v.kind
    return {"kind": kind, "reasons": [] if v.safe else v.reasons(kind)}


def _folder_warning(kind: str, opaque: list[str]) -> Finding:
    """A folder of shards is never opened by torch.load: what its own loader does with the
    classes its pickles name, and the command that makes one file of it (weights_only advice
    and ``convert --plain-objects`` do not apply to a folder)."""
    if kind == "dcp":  # FileSystemReader and DefaultLoadPlanner, torch 2.1 to 2.13
        how = (
            "torch.distributed.checkpoint reads its .metadata with pickle.load and its "
            "non-tensor values with torch.load(weights_only=False)"
        )
    elif kind == "per-rank":  # ShardedTensor.__setstate__ needs the saving world's group
        how = "each rank loads its file with torch.load(weights_only=False) in the saving world"
    else:  # DeepSpeed's load_checkpoint and zero_to_fp32
        how = "DeepSpeed loads its files with torch.load(weights_only=False)"
    shown = ", ".join(opaque[:4]) + (f" and {len(opaque) - 4} more" if len(opaque) > 4 else "")
    text = f"a folder of shards: torch.load cannot open it; {how} (they pickle {shown})"
    return Finding(text, Fix(CONSOLIDATE))


def _global_rows(ckpt: Checkpoint) -> list[dict[str, Any]]:
    """``{name, kind, uses, reason}`` per global, from the verdict computed when it was read."""
    if ckpt.verdict is None:
        return [{"name": g, "kind": classify(g)} for g in ckpt.globals]
    return [
        {"name": g.name, "kind": g.kind, "uses": list(g.uses), "reason": g.reason}
        for g in ckpt.verdict.globals
    ]


def broken(path: str, err: Any) -> dict[str, Any]:
    """The JSON report of a file that names dangerous globals but cannot be read."""
    return {
        "schema": SCHEMA,
        "path": path,
        "format": None,
        "error": err.detail,
        "globals": [{"name": g, "kind": "dangerous"} for g in err.names],
        "tensors": [],
        "warnings": [Finding(str(err.message))],
    }
