"""megatron-core 0.8 to 0.15's "N-D reformulated" tensors (a distributed optimizer's flattened
ranges) back in their parameter's shape, by remapping byte segments (no bytes read).

megatron-core stored a ``[X1, ..., Xn]`` tensor whose local chunks are ``[x1, ..., xn]`` and
whose data parallel ranks each own a flat range of a chunk as a ``[X1/x1, ..., Xn/xn,
x1*...*xn]`` tensor: one row per chunk, the chunk's elements in C order along the last axis
(``strategies/torch.py``, ``nd_flattened_tensor_reformulated_global_shape``), and recorded the
original shape in ``Metadata.mcore_data[key]["nd_reformulated_orig_global_shape"]``. Its own
``load_plain_tensors`` (0.15) returns such a tensor as the original one flattened to 1-D; here
it gets the original shape itself (the same elements, in the same C order).
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import replace

from ..errors import CheckpointError
from .distributed import LogicalTensor, Segment, check_segments, merge_segments


def unreformulate(folder: str, tensor: LogicalTensor, shape: tuple[int, ...]) -> LogicalTensor:
    """``tensor`` (stored reformulated) as the ``shape`` tensor it was made from."""
    chunks = tensor.shape[:-1]
    n = len(shape)
    local = tuple(s // a if a else 0 for s, a in zip(shape, chunks, strict=False))
    if (
        n == 0
        or len(tensor.shape) != n + 1
        or any(a * x != s for a, x, s in zip(chunks, local, shape, strict=True))
        or math.prod(local) != tensor.shape[-1]
    ):
        raise CheckpointError(
            folder,
            f"{tensor.name!r} is stored as {list(tensor.shape)}, which is no N-D reformulation "
            f"of its recorded shape {list(shape)}",
        )
    size = tensor.itemsize
    row = local[-1] * size  # one row of one chunk: contiguous in both layouts
    starts = [s.dest for s in tensor.segments]
    out: list[Segment] = []
    for outer in itertools.product(*(range(s) for s in shape[:-1])):
        for a_last in range(chunks[-1]):
            index = (*outer, a_last * local[-1])
            chunk = tuple(j // x for j, x in zip(index, local, strict=True))
            within = tuple(j % x for j, x in zip(index, local, strict=True))
            src = (_ravel(chunk, chunks) * tensor.shape[-1] + _ravel(within, local)) * size
            out += _pieces(tensor.segments, starts, src, row, _ravel(index, shape) * size)
    result = replace(tensor, shape=tuple(shape), segments=merge_segments(out))
    check_segments(folder, result)
    return result


def _ravel(index: tuple[int, ...], shape: tuple[int, ...]) -> int:
    flat = 0
    for i, s in zip(index, shape, strict=True):
        flat = flat * s + i
    return flat


def _pieces(
    segments: tuple[Segment, ...], starts: list[int], src: int, nbytes: int, dest: int
) -> list[Segment]:
    """The file ranges holding bytes ``[src, src + nbytes)`` of the stored tensor, placed at
    ``dest``."""
    out: list[Segment] = []
    i = bisect.bisect_right(starts, src) - 1
    while nbytes > 0:
        seg = segments[i]
        skip = src - seg.dest
        take = min(seg.nbytes - skip, nbytes)
        whole = skip == 0 and take == seg.nbytes
        out.append(Segment(seg.file, seg.offset + skip, take, dest, seg.crc if whole else None))
        src, dest, nbytes, i = src + take, dest + take, nbytes - take, i + 1
    return out
