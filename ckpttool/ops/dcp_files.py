"""Writing a DCP folder's files: the tensors spread over rank files, by one process or many.

One process writes every ``__R_0.distcp`` (``files`` of them; the values always in the first)
then ``.metadata``; under ``torchrun`` each rank writes its own file and rank 0, once every rank
has told it where its items lie, writes ``.metadata``, re-reads the folder and moves it into
place (:func:`.ranks.write_together`). The same plan gives the same bytes either way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

from ..readers.distributed import LogicalStorage
from ..writers import copy as bytecopy
from ..writers import dcp as dcp_writer
from ..writers.atomic import atomic_folder
from ..writers.clone import clone_block
from ..writers.dcp_metadata import Stored
from ..writers.safetensors import Item, write_tensor
from .logical_write import write_logical
from .ranks import Ranks, write_together

Progress = Callable[[int], None]
Placed = tuple[int, Stored, int, int | None, bool]  # item index, where, data start, CRC, read


def rank_file(rank: int) -> str:
    return f"__{rank}_0.distcp"


def spread(tensors: list[dcp_writer.TensorItem], n: int) -> list[list[int]]:
    """Tensor indices per file: biggest first into the emptiest file (as torch's
    ``_split_by_size_and_type`` buckets them), each file in plan order."""
    bins: list[list[int]] = [[] for _ in range(n)]
    sizes = [0] * n
    for i in sorted(range(len(tensors)), key=lambda i: -tensors[i].nbytes):
        k = min(range(n), key=lambda b: sizes[b])
        bins[k].append(i)
        sizes[k] += tensors[i].nbytes
    return [sorted(b) for b in bins]


def _data_writer(
    sources: bytecopy.Sources, background: bytecopy.Background, cb: Progress | None, folder: str
) -> dcp_writer.WriteData:
    blocks: dict[str, int] = {}  # input file -> its clone block into the folder (0: none)

    def block_of(file: str) -> int:
        if file not in blocks:
            fd = sources.fd(file)
            blocks[file] = clone_block(fd, folder) if isinstance(fd, int) else 0
        return blocks[file]

    def write(item: dcp_writer.TensorItem, fd: int) -> None:
        storage = item.ref.storage
        if isinstance(storage, LogicalStorage):
            assert storage.tensor is not None
            item.crc, item.job = write_logical(
                storage.tensor, item.dtype, fd, item.start, sources, background, cb
            )
            return
        it = Item(item.fqns[0], item.ref, item.dtype)
        # a page-aligned item keeps its input's phase (dcp.PAGE_ALIGN_FROM): cloned where it can
        block = block_of(storage.file) if item.phase is not None and storage and storage.file else 0
        write_tensor(it, sources, fd, cb, background, True, block)
        item.crc, item.job = it.crc, it.job

    return write


def _write_file(
    folder: str,
    rank: int,
    values: list[dcp_writer.ValueItem],
    tensors: list[dcp_writer.TensorItem],
    mine: list[int],
    cb: Progress | None,
) -> list[Placed]:
    """Write one rank file; where each of its tensors went."""
    with contextlib.closing(bytecopy.Sources()) as sources:
        background = bytecopy.Background()
        try:
            write = _data_writer(sources, background, cb, folder)
            path, own = os.path.join(folder, rank_file(rank)), [tensors[i] for i in mine]
            dcp_writer.write_rank_file(path, rank_file(rank), values, own, write)
        finally:
            background.close()
    placed = []
    for i in mine:
        t = tensors[i]
        assert t.stored is not None
        placed.append((i, t.stored, t.start, t.crc, t.read_back))
    return placed


def _finish(
    folder: str,
    dst: str,
    values: list[dcp_writer.ValueItem],
    tensors: list[dcp_writer.TensorItem],
    order: list[str],
    verify: bool,
) -> None:
    entries = dcp_writer.entries_of(values, tensors, order)
    dcp_writer.write_metadata(folder, entries, os.path.basename(os.path.abspath(dst)))
    if verify:
        dcp_writer.verify_folder(folder, values, tensors, order)


def write_folder(
    dst: str,
    values: list[dcp_writer.ValueItem],
    tensors: list[dcp_writer.TensorItem],
    order: list[str],
    how: tuple[bool, int, Ranks | None],
    cb: Progress | None,
) -> list[str]:
    """Write the folder atomically; ``how``: (verify, files, ranks). Returns the rank files."""
    verify, files, ranks = how
    n = ranks.world if ranks is not None and ranks.world > 1 else max(1, files)
    bins = spread(tensors, n)
    if ranks is None or ranks.world <= 1:
        with atomic_folder(dst) as tmp:
            for r in range(n):
                _write_file(tmp, r, values if r == 0 else [], tensors, bins[r], cb)
            _finish(tmp, dst, values, tensors, order, verify)
        return [rank_file(r) for r in range(n)]
    me = ranks.rank

    def mine(tmp: str) -> list[Placed]:  # the values go to rank 0's file, which knows them
        return _write_file(tmp, me, values if me == 0 else [], tensors, bins[me], cb)

    def finish(tmp: str, results: list[Any]) -> None:
        for placed in results:
            for i, stored, start, crc, read_back in placed:
                t = tensors[i]
                t.stored, t.start, t.crc, t.read_back = stored, start, crc, read_back
        _finish(tmp, dst, values, tensors, order, verify)

    write_together(ranks, lambda: atomic_folder(dst), mine, finish)
    return [rank_file(r) for r in range(n)]
