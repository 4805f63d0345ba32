"""Several processes writing one output: ``torchrun -m ckpttool consolidate|to-dcp``.

Under torchrun each rank writes its share of the files (safetensors shards, DCP rank files)
and rank 0 the index; the output must be byte-identical to what one process writes. The
protocol's failure paths (a rank that fails, rank 0 that cannot start) run on threads standing
in for ranks, so that every rank fails together and nothing is written.
"""

from __future__ import annotations

import filecmp
import os
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest

from ckpttool.errors import CheckpointError
from ckpttool.ops.consolidate import consolidate
from ckpttool.ops.ranks import write_together
from ckpttool.ops.to_dcp import to_dcp
from ckpttool.writers.atomic import atomic_shards

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.checkpoint")


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch.distributed.checkpoint as dcp

    folder = tmp_path_factory.mktemp("ranks") / "src"
    g = torch.Generator().manual_seed(0)
    model = {f"l{i}.weight": torch.randn(64, 40 + i, generator=g) for i in range(9)}
    model["e"] = torch.arange(10, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: torch warns that it saves alone
        dcp.save({"model": model, "step": 4}, checkpoint_id=str(folder), no_dist=True)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(n: int, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n)]
    argv += ["--master-port", str(_free_port()), "-m", "ckpttool", *args]
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _same_folders(a: Path, b: Path) -> None:
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.mark.parametrize("world", [2, 4])
def test_torchrun_consolidate_shards_equal_one_process(
    src: Path, tmp_path: Path, world: int
) -> None:
    one = tmp_path / "one"
    result = consolidate(src, one, max_shard_size="30kB")
    assert len(result.files) - 1 >= world  # every rank has a shard to write
    _torchrun(
        world, "consolidate", "-q", str(src), str(tmp_path / "many"), "--max-shard-size", "30kB"
    )
    _same_folders(one, tmp_path / "many")


def test_torchrun_to_dcp_equals_one_process(src: Path, tmp_path: Path) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    to_dcp(src, tmp_path / "a" / "out", files=4)
    _torchrun(4, "to-dcp", "-q", str(src), str(tmp_path / "b" / "out"))
    out = tmp_path / "b" / "out"
    assert sorted(os.listdir(out)) == [".metadata", *(f"__{r}_0.distcp" for r in range(4))]
    _same_folders(tmp_path / "a" / "out", out)
    dcp_to_torch_save(str(out), str(tmp_path / "back.pt"))
    dcp_to_torch_save(str(src), str(tmp_path / "src.pt"))
    back, want = (torch.load(tmp_path / n, weights_only=True) for n in ("back.pt", "src.pt"))
    assert back["step"] == 4 and list(back["model"]) == list(want["model"])
    assert all(torch.equal(back["model"][k], v) for k, v in want["model"].items())


# -- the protocol's failure paths, with threads for ranks --------------------------------------
class ThreadRanks:
    """Ranks whose collective calls meet at a barrier (one object per thread)."""

    def __init__(self, rank: int, world: int, shared: dict[str, Any]) -> None:
        self.rank, self.world, self.shared = rank, world, shared

    def mine(self, index: int) -> bool:
        return index % self.world == self.rank

    def broadcast(self, value: Any) -> Any:
        barrier: threading.Barrier = self.shared["barrier"]
        if self.rank == 0:
            self.shared["value"] = value
        barrier.wait()
        out = self.shared["value"]
        barrier.wait()
        return out

    def gather(self, value: Any) -> list[Any]:
        barrier: threading.Barrier = self.shared["barrier"]
        self.shared.setdefault("slots", [None] * self.world)[self.rank] = value
        barrier.wait()
        out = list(self.shared["slots"])
        barrier.wait()
        return out


def _run_ranks(world: int, job: Any) -> list[BaseException | None]:
    shared: dict[str, Any] = {"barrier": threading.Barrier(world, timeout=30)}
    errors: list[BaseException | None] = [None] * world

    def run(rank: int) -> None:
        try:
            job(ThreadRanks(rank, world, shared))
        except BaseException as exc:  # recorded for the test to look at
            errors[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank is still waiting"
    return errors


def test_a_failing_rank_fails_every_rank_and_nothing_is_written(tmp_path: Path) -> None:
    dst = tmp_path / "out"

    def job(ranks: ThreadRanks) -> None:
        def mine(tmp: str) -> int:
            if ranks.rank == 2:
                raise CheckpointError(tmp, "disk full while writing; nothing was written")
            (Path(tmp) / f"part{ranks.rank}").write_text("x")
            return ranks.rank

        write_together(ranks, lambda: atomic_shards(str(dst)), mine, lambda t, r: None)

    errors = _run_ranks(3, job)
    assert all(isinstance(e, CheckpointError) for e in errors), errors
    assert "disk full" in str(errors[0]) and "(on rank 2)" in str(errors[0])
    assert not dst.exists() and os.listdir(tmp_path) == []


def test_rank_0_that_cannot_start_fails_every_rank(tmp_path: Path) -> None:
    dst = tmp_path / "missing" / "out"  # its parent does not exist

    def job(ranks: ThreadRanks) -> None:
        write_together(ranks, lambda: atomic_shards(str(dst)), lambda t: None, lambda t, r: None)

    errors = _run_ranks(2, job)
    assert all(isinstance(e, (CheckpointError, FileNotFoundError)) for e in errors), errors


def test_ranks_that_succeed_commit_once(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    finished: list[list[Any]] = []

    def job(ranks: ThreadRanks) -> None:
        def mine(tmp: str) -> int:
            (Path(tmp) / f"model-0000{ranks.rank + 1}-of-00003.safetensors").write_text("x")
            return ranks.rank * 10

        write_together(
            ranks, lambda: atomic_shards(str(dst)), mine, lambda t, r: finished.append(r)
        )

    assert _run_ranks(3, job) == [None, None, None]
    assert finished == [[0, 10, 20]]
    assert sorted(os.listdir(dst)) == [f"model-0000{r}-of-00003.safetensors" for r in (1, 2, 3)]
