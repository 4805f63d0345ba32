"""The logical view of a sharded (distributed) checkpoint folder, whatever wrote it.

A reader for a folder of shards (DCP from FSDP/FSDP2, DeepSpeed ZeRO 1/2/3) returns a
:class:`DistributedCheckpoint`: every logical tensor of the consolidated state dict (its fully
qualified name, global shape and dtype) as a list of :class:`Segment` byte ranges of the source
files that, placed at their ``dest`` offsets, make the tensor's dense C-order little-endian bytes.
Nothing here reads tensor bytes; :func:`copy_logical` streams them when a writer asks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import dtypes
from ..errors import CheckpointError
from ..model import Checkpoint, StorageInfo, TensorRef
from ..source import preadv

Progress = Callable[[int], None]

GROUPS = ("model", "optimizer", "other")


@dataclass(frozen=True)
class Segment:
    """One contiguous byte range of a source file, placed at ``dest`` in the logical tensor."""

    file: str  # path of the file holding the bytes
    offset: int  # absolute byte offset in that file
    nbytes: int
    dest: int  # byte offset inside the logical tensor's dense C-order, little-endian bytes
    crc: int | None = None  # CRC-32 of exactly these bytes when the source records one


@dataclass(frozen=True)
class LogicalTensor:
    """One tensor of the consolidated state dict, assembled from byte ranges of the shards."""

    name: str  # fully qualified name as the consolidated state dict keys it
    dtype: str  # ckpttool dtype name (ckpttool/dtypes.py)
    shape: tuple[int, ...]
    segments: tuple[Segment, ...]  # sorted by dest; together they cover [0, nbytes) exactly once
    group: str  # "model", "optimizer", "other"
    path: tuple[Any, ...] = ()  # the key path in the consolidated object; () means (name,)
    # the dtype a consolidated file holds when none is asked for (None: ``dtype``); DeepSpeed's
    # zero_to_fp32 widens floating-point buffers saved in 16 bits to float32
    out_dtype: str | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return dtypes.get(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass
class DistributedCheckpoint:
    """What a distributed-checkpoint reader found in a folder, without reading tensor bytes."""

    path: str  # the folder
    kind: str  # "dcp", "zero-1", "zero-2", "zero-3", "per-rank"
    world_size: int
    files: list[tuple[str, int]]  # every file read, with its size
    tensors: list[LogicalTensor]
    entries: dict[str, Any]  # non-tensor values by fully qualified name (epoch, step, config...)
    facts: dict[str, Any] = field(default_factory=dict)  # details worth reporting

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def group_bytes(self, group: str) -> int:
        return sum(t.nbytes for t in self.tensors if t.group == group)

    def by_name(self) -> dict[str, LogicalTensor]:
        return {t.name: t for t in self.tensors}


def check_segments(folder: str, tensor: LogicalTensor) -> None:
    """Refuse a tensor whose segments do not tile its bytes exactly once, in order."""
    pos = 0
    for seg in tensor.segments:
        if seg.dest != pos or seg.nbytes <= 0:
            raise CheckpointError(
                folder, f"the chunks of {tensor.name!r} do not cover it exactly (at byte {pos})"
            )
        pos += seg.nbytes
    if pos != tensor.nbytes:
        raise CheckpointError(
            folder,
            f"the chunks of {tensor.name!r} hold {pos} bytes, its shape needs {tensor.nbytes}",
        )


def merge_segments(segments: list[Segment]) -> tuple[Segment, ...]:
    """Sort by ``dest`` and join neighbours that are also adjacent in the same file."""
    out: list[Segment] = []
    for seg in sorted(segments, key=lambda s: s.dest):
        if out:
            last = out[-1]
            if (
                last.file == seg.file
                and last.offset + last.nbytes == seg.offset
                and last.dest + last.nbytes == seg.dest
            ):
                out[-1] = Segment(last.file, last.offset, last.nbytes + seg.nbytes, last.dest, None)
                continue
        out.append(seg)
    return tuple(out)


def copy_logical(
    tensor: LogicalTensor,
    dst_fd: int,
    sources: Any,
    progress: Progress | None = None,
) -> None:
    """Append the tensor's bytes at ``dst_fd``'s position, segment by segment (kernel copies).

    Args:
        tensor: the logical tensor.
        dst_fd: an output file descriptor positioned where the tensor's bytes go.
        sources: a ``writers.copy.Sources`` that opens the input files by path.
        progress: called with each number of bytes copied.
    """
    from ..writers.copy import copy_range

    for seg in tensor.segments:
        try:
            copy_range(sources.fd(seg.file), seg.offset, seg.nbytes, dst_fd, progress)
        except EOFError:
            raise CheckpointError(seg.file, f"is truncated: {tensor.name!r} is cut short") from None


def iter_logical_chunks(
    tensor: LogicalTensor, sources: Any, chunk: int = 8 << 20
) -> Iterator[memoryview]:
    """The tensor's bytes in order, in pieces of at most ``chunk`` bytes (one reused buffer)."""
    buf = bytearray(max(1, min(chunk, tensor.nbytes)))
    view = memoryview(buf)
    for seg in tensor.segments:
        fd = sources.fd(seg.file)  # a file descriptor, or a URL's source
        off, left = seg.offset, seg.nbytes
        while left:
            want = min(left, len(buf))
            got = preadv(fd, view[:want], off)
            if got != want:
                raise CheckpointError(seg.file, f"is truncated: {tensor.name!r} is cut short")
            yield view[:want]
            off += want
            left -= want


def crc_logical(tensor: LogicalTensor, sources: Any) -> int:
    """CRC-32 of the tensor's logical bytes, read from its segments."""
    from ..writers.crc import crc32  # ISA-L when installed: imported only when used

    crc = 0
    for piece in iter_logical_chunks(tensor, sources):
        crc = crc32(piece, crc)
    return crc


# -- presenting a distributed checkpoint as a Checkpoint ----------------------------------------
@dataclass(frozen=True)
class LogicalStorage(StorageInfo):
    """The storage of one logical tensor: its bytes are ``segments`` of several files.

    ``file`` is the checkpoint folder, so a writer that does not know about segments fails
    loudly instead of copying the wrong bytes.
    """

    segments: tuple[Segment, ...] = ()
    tensor: LogicalTensor | None = None


def as_logical(value: Any, name: str, folder: str) -> Any:
    """``value`` (an unpickled non-tensor item) with each tensor it holds over a logical storage.

    DCP keeps values that are not tensors (a ``torch.Generator``, whose state is a uint8
    tensor; Lightning's ``meta.pt``) as torch.save blobs: their tensors' storages are records
    of those blobs, which writers copy like any other segment. Views keep their offset, shape
    and stride; tensors that share a storage keep sharing it.
    """
    from ..tree import KEEP, transform

    logical: dict[int, LogicalStorage] = {}

    def replace(node: Any) -> Any:
        if not isinstance(node, TensorRef) or node.storage is None:
            return KEEP
        st = node.storage
        if isinstance(st, LogicalStorage):
            return KEEP
        if st.compressed or st.big_endian or st.dtype not in dtypes.DTYPES:
            raise CheckpointError(st.file, f"a tensor of {name!r} is not stored as plain bytes")
        out = logical.get(id(st))
        if out is None:
            segments = (Segment(st.file, st.offset, st.nbytes, 0, st.crc),) if st.nbytes else ()
            key = f"{name}#{st.key}"
            tensor = LogicalTensor(key, st.dtype, (st.numel,), segments, "other")
            check_segments(folder, tensor)
            out = logical[id(st)] = LogicalStorage(
                key, st.dtype, st.numel, "cpu", folder, 0, segments=segments, tensor=tensor
            )
        ref = TensorRef(
            out,
            node.storage_offset,
            node.shape,
            node.stride,
            dtype=node.dtype,
            requires_grad=node.requires_grad,
            kind=node.kind,
        )
        for slot in ("attributes", "metadata", "parameter", "quantizer", "subclass"):
            setattr(ref, slot, getattr(node, slot))
        return ref

    return transform(value, replace)


def set_path(root: dict[Any, Any], path: tuple[Any, ...], value: Any) -> None:
    """Place ``value`` at ``path`` the way DCP's ``set_element`` does (int keys make lists)."""
    node: Any = root
    for i in range(1, len(path)):
        prev, key = path[i - 1], path[i]
        default: Any = {} if not isinstance(key, int) else []
        if isinstance(node, dict):
            if prev not in node or node[prev] is None:
                node[prev] = default
            node = node[prev]
        else:
            while len(node) <= prev:
                node.append(None)
            if node[prev] is None:
                node[prev] = default
            node = node[prev]
    last = path[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append(None)
    node[last] = value


def tensor_ref(tensor: LogicalTensor, folder: str) -> TensorRef:
    """A contiguous TensorRef over the tensor's :class:`LogicalStorage`."""
    storage = LogicalStorage(
        key=tensor.name,
        dtype=tensor.dtype,
        numel=tensor.numel,
        location="cpu",
        file=folder,
        offset=0,
        segments=tensor.segments,
        tensor=tensor,
    )
    stride = [1] * len(tensor.shape)
    for d in range(len(tensor.shape) - 2, -1, -1):
        stride[d] = stride[d + 1] * tensor.shape[d + 1]
    return TensorRef(storage, 0, tensor.shape, tuple(stride), dtype=tensor.dtype)


def nested_root(dc: DistributedCheckpoint, order: list[str] | None = None) -> dict[Any, Any]:
    """The consolidated object (as torch's ``dcp_to_torch_save`` nests it), tensors as refs."""
    values: dict[str, Any] = {t.name: tensor_ref(t, dc.path) for t in dc.tensors}
    # DeepSpeed's tied params: another name for the same tensor (one storage when written)
    for alias, source in dc.facts.get("aliases", {}).items():
        values[alias] = values[source]
    values.update(dc.entries)
    paths: dict[str, tuple[Any, ...]] = {t.name: t.path or (t.name,) for t in dc.tensors}
    paths.update(dc.facts.get("paths", {}))
    root: dict[Any, Any] = {}
    for name in order or list(values):
        set_path(root, paths.get(name, (name,)), values[name])
    return root


def as_checkpoint(dc: DistributedCheckpoint, globals_seen: list[str]) -> Checkpoint:
    """A :class:`Checkpoint` of format ``dc.kind`` whose tensors are logical tensors.

    ``inspect``, ``report`` and the tree walkers see the consolidated structure; the
    :class:`DistributedCheckpoint` itself is in ``facts["distributed"]`` for writers.
    """
    root = nested_root(dc, dc.facts.get("order"))
    storages: dict[str, StorageInfo] = {}
    from ..tree import iter_tensors

    for _name, ref in iter_tensors(root):
        if ref.storage is not None:
            storages[ref.storage.key] = ref.storage
    facts = {
        "distributed": dc,
        "kind": dc.kind,
        "world_size": dc.world_size,
        "files": len(dc.files),
    }
    return Checkpoint(
        path=dc.path,
        format=dc.kind,
        file_bytes=dc.total_bytes,
        root=root,
        storages=storages,
        globals=list(globals_seen),
        facts=facts,
    )


def model_state_dict(root: Any) -> tuple[dict[Any, Any], str] | None:
    """The model weights of a consolidated object, and where they are ("" for the root).

    ``model``/``module``/... as elsewhere in ckpttool; else the tensors at the top level (a
    flat model state dict saved beside ``optimizer``, ``train_state``..., as torchtitan does);
    else the largest state dict found.
    """
    from ..analysis.state_dicts import MODEL_KEYS, default_state_dict

    found = default_state_dict(root)
    if (
        found is not None
        and isinstance(found.node, dict)
        and (found.path == "" or found.path in MODEL_KEYS)
    ):
        return found.node, found.path
    top = {  # a flat optimizer's tensors are not the model's (Megatron's optimizer.state...)
        k: v
        for k, v in (root.items() if isinstance(root, dict) else ())
        if isinstance(v, TensorRef) and _group(v) != "optimizer"
    }
    if top:
        return top, ""
    if found is not None and isinstance(found.node, dict):
        return found.node, found.path
    return None


def _group(ref: TensorRef) -> str:
    tensor = getattr(ref.storage, "tensor", None)
    return tensor.group if isinstance(tensor, LogicalTensor) else "model"


KIND_NAMES = {
    "dcp": "torch.distributed.checkpoint (DCP)",
    "zero-1": "DeepSpeed ZeRO-1",
    "zero-2": "DeepSpeed ZeRO-2",
    "zero-3": "DeepSpeed ZeRO-3",
    "per-rank": "per-rank saves (torch.save in every rank: DTensors, ShardedTensors)",
}


def describe_distributed(ckpt: Checkpoint) -> dict[str, Any] | None:
    """The JSON-ready ``distributed`` section of an inspect report (None for single files)."""
    dc = ckpt.facts.get("distributed")
    if not isinstance(dc, DistributedCheckpoint):
        return None
    groups: dict[str, dict[str, Any]] = {}
    for t in dc.tensors:
        g = groups.setdefault(t.group, {"tensors": 0, "bytes": 0, "dtypes": {}})
        g["tensors"] += 1
        g["bytes"] += t.nbytes
        g["dtypes"][t.dtype] = g["dtypes"].get(t.dtype, 0) + t.nbytes
    model = model_state_dict(ckpt.root)
    into: dict[str, Any] = {
        "everything": {"tensors": len(dc.tensors), "bytes": sum(t.nbytes for t in dc.tensors)}
    }
    if model is not None:
        node, path = model
        refs = [v for v in node.values() if isinstance(v, TensorRef)]
        unique = {id(r): r for r in refs}  # a tied alias is the same tensor: its bytes once
        into["model"] = {
            "path": path,
            "tensors": len(refs),
            "bytes": sum(r.nbytes for r in unique.values()),
        }
    facts = {k: v for k, v in dc.facts.items() if k not in ("order", "paths")}
    return {
        "kind": dc.kind,
        "kind_name": KIND_NAMES.get(dc.kind, dc.kind),
        "world_size": dc.world_size,
        "files": [{"path": p, "bytes": n} for p, n in dc.files],
        "logical_tensors": len(dc.tensors),
        "model_tensors": groups.get("model", {}).get("tensors", 0),
        "model_bytes": groups.get("model", {}).get("bytes", 0),
        "optimizer_tensors": groups.get("optimizer", {}).get("tensors", 0),
        "optimizer_bytes": groups.get("optimizer", {}).get("bytes", 0),
        "groups": groups,
        "consolidates_into": into,
        "facts": facts,
    }
