"""Several processes writing one output together, coordinated through ``torch.distributed``.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment) each process opens the same
input, plans the same output, writes the files that fall to it and tells the others how it
went; rank 0 writes the index and moves everything into place. Only small Python objects cross
the process group (a temp folder's name, each rank's outcome, item offsets); tensor bytes go
from the input files to the output files on the shared filesystem, never over the network.
torch is imported only here, only when more than one process runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from ..errors import CheckpointError

T = TypeVar("T")


class Ranks:
    """This process's rank in a group of ``world`` processes (a gloo process group)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank = rank
        self.world = world

    @classmethod
    def from_environment(cls) -> Ranks | None:
        """The group ``torchrun`` started this process in, or None (one process)."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
        except ValueError:
            return None
        if world <= 1 or not os.environ.get("MASTER_ADDR"):
            return None
        import datetime

        import torch.distributed as dist

        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=int(os.environ.get("CKPTTOOL_TIMEOUT", "1800")))
            dist.init_process_group("gloo", timeout=timeout)
        return cls(rank, world)

    def mine(self, index: int) -> bool:
        """Whether item ``index`` of a planned list falls to this rank (round robin)."""
        return index % self.world == self.rank

    def broadcast(self, value: T | None) -> T:
        """Rank 0's ``value``, on every rank."""
        import torch.distributed as dist

        box: list[Any] = [value]
        dist.broadcast_object_list(box, src=0)
        out: T = box[0]
        return out

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def outcome(work: Callable[[], T]) -> tuple[T | None, tuple[str | None, str] | None]:
    """Run ``work``; (its result, None) or (None, (path, message)) of the error it raised, so
    that a failing rank still reaches the next collective call."""
    try:
        return work(), None
    except CheckpointError as exc:
        return None, (exc.path, exc.message)
    except OSError as exc:
        return None, (getattr(exc, "filename", None), f"write failed: {exc.strerror or exc}")


def raise_first(errors: list[tuple[str | None, str] | None], rank: int) -> None:
    """Raise the first rank's error (naming the rank when it is another one)."""
    for r, err in enumerate(errors):
        if err is not None:
            path, message = err
            where = f" (on rank {r})" if r != rank else ""
            raise CheckpointError(path, message + where)


def rank0_writes(work: Callable[[], T], ranks: Ranks) -> T | None:
    """One output file: rank 0 writes it, the others wait for its outcome (and share it)."""
    if ranks.rank != 0:
        raise_first([ranks.broadcast(None)], 0)
        return None
    err: tuple[str | None, str] | None = (None, "rank 0 failed; nothing was written")
    try:
        result = work()
        err = None
        return result
    except CheckpointError as exc:
        err = (exc.path, exc.message)
        raise
    finally:
        ranks.broadcast(err)


def write_together(
    ranks: Ranks,
    output: Callable[[], AbstractContextManager[str]],
    mine: Callable[[str], Any],
    finish: Callable[[str, list[Any]], None],
) -> None:
    """Write one output folder with every rank.

    Rank 0 opens ``output()`` (an atomic temp folder) and tells the others its name; every
    rank runs ``mine(tmp)`` (writing its files there) and every rank's result is gathered; if
    all succeeded rank 0 runs ``finish(tmp, results)`` (the index) and the output is moved into
    place. Every collective call is made whatever fails, so no rank waits for ever; a failure on
    any rank fails every rank with the same message, and nothing is written.
    """
    if ranks.rank != 0:
        tmp: str | None = ranks.broadcast(None)  # None: rank 0 could not start
        folder = tmp
        result, err = outcome(lambda: mine(folder)) if folder is not None else (None, None)
        gathered = ranks.gather((result, err))
        final: tuple[str | None, str] | None = ranks.broadcast(None)
        raise_first([e for _, e in gathered], ranks.rank)
        raise_first([final], 0)
        return
    committed: tuple[str | None, str] | None = (None, "rank 0 failed; nothing was written")
    started = done = False
    try:
        with output() as tmp:
            ranks.broadcast(tmp)
            started = True
            mine_out = outcome(lambda: mine(tmp))
            gathered = ranks.gather(mine_out)
            done = True
            raise_first([e for _, e in gathered], ranks.rank)
            finish(tmp, [r for r, _ in gathered])
        committed = None
    except CheckpointError as exc:
        committed = (exc.path, exc.message)
        raise
    finally:
        if not started:
            ranks.broadcast(None)
        if not done:
            ranks.gather((None, None))
        ranks.broadcast(committed)


def write_shards_together(
    dst: str,
    shards: list[list[Any]],
    total: int,
    write_one: Callable[[str, list[Any]], None],
    ranks: Ranks,
) -> list[str]:
    """:func:`~ckpttool.writers.shards.write_shards` by every rank: shard ``i`` is written by
    rank ``i % world``, the index by rank 0 (:func:`write_together`). The files are the ones
    one process writes, byte for byte."""
    import json

    from ..writers.atomic import atomic_shards
    from ..writers.shards import INDEX_NAME, shard_name

    n = len(shards)

    def mine(tmpdir: str) -> None:
        for i, shard in enumerate(shards, 1):
            if ranks.mine(i - 1):
                path = os.path.join(tmpdir, shard_name(i, n))
                open(path, "wb").close()
                write_one(path, shard)

    def finish(tmpdir: str, _results: list[Any]) -> None:
        weight_map = {
            it.name: shard_name(i, n) for i, shard in enumerate(shards, 1) for it in shard
        }
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(tmpdir, INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")

    write_together(ranks, lambda: atomic_shards(dst), mine, finish)
    names = [shard_name(i, n) for i in range(1, n + 1)] + [INDEX_NAME]
    return [os.path.join(dst, name) for name in names]
