"""End to end with real ``torch.distributed`` (gloo, CPU): resuming DDP training safely.

The flow of issue 6: a 2-process DDP job trains a few steps and rank 0 saves the way users do
(``module.`` keys, storages tagged ``cuda:0`` as a GPU run writes them, faked here with
``ckpttool.testing.saved_as``). That file fails here with a plain ``torch.load`` and with
``load_state_dict(strict=True)``. After ``ckpttool convert --strip-module`` (the real CLI, in a
subprocess) a fresh 2-process group loads it with a plain ``torch.load`` in every rank, loads it
into the unwrapped model with ``strict=True``, wraps it in DDP and trains on. The same job, run
without interruption, is the reference: the resumed losses and parameters must equal it.

The Python API does the same without the CLI: ``api.load`` + ``api.fix_state_dict`` on the
unconverted file, and ``api.save`` from every rank (rank 0 writes) followed by a plain load.

Workers run in fresh processes (``forkserver``, else ``spawn``) and report through files in
``tmp_path``; every group uses a ``file://`` store there, so no network port is needed.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

STEPS_BEFORE = 4  # steps before the checkpoint
STEPS_AFTER = 4  # steps after it, in the uninterrupted reference and in each resumed run
LR = 0.1
GROUP_TIMEOUT_S = 120.0
CUDA_ERROR = "Attempting to deserialize object on a CUDA device"


# -- what every worker shares -------------------------------------------------------------------
def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shard of the global batch of ``step``: the same whatever the run."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8 * world, 8, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return x[rank::world], y[rank::world]


def make_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=0.9)  # momentum: state that must resume too


def train(
    ddp: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int, world: int
) -> list[float]:
    losses = []
    for step in steps:
        x, y = batch(step, rank, world)
        opt.zero_grad()
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def init_group(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    if sys.platform == "linux" and os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # no hostname lookups, no network
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world
    )


def leave_group() -> None:
    """Free every DDP wrapper (they sit in reference cycles), then destroy the group.

    A DDP reducer freed after ``destroy_process_group()`` can hang the process, so the workers
    keep their wrappers in functions that have returned, and cycles are collected here first.
    """
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def tensor_devices(obj: Any) -> set[str]:
    if isinstance(obj, torch.Tensor):
        return {str(obj.device)}
    if isinstance(obj, dict):
        return set().union(*(tensor_devices(v) for v in obj.values()))
    if isinstance(obj, (list, tuple)):
        return set().union(*(tensor_devices(v) for v in obj))
    return set()


# -- workers (run in fresh processes) -----------------------------------------------------------
def train_worker(rank: int, world: int, store: str, out: str) -> None:
    """Train, save the bad way (and with api.save), then go on: the uninterrupted reference."""
    init_group(rank, world, store)
    train_and_save(rank, world, out)
    leave_group()


def train_and_save(rank: int, world: int, out: str) -> None:
    from ckpttool.testing import saved_as
    from ckpttool.training import api

    model = make_model(seed=0)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer(ddp.parameters())
    losses = train(ddp, opt, range(STEPS_BEFORE), rank, world)
    if rank == 0:
        # What users write: keys as DDP leaves them, storages tagged as a GPU run tags them.
        with saved_as("cuda:0"):
            torch.save(
                {"model": ddp.state_dict(), "optimizer": opt.state_dict(), "step": STEPS_BEFORE},
                os.path.join(out, "ddp_bad.pt"),
            )
        torch.save(clone_state(model), os.path.join(out, "saved_params.pt"))
    # The safe way, called on every rank: rank 0 writes, all wait on the barrier.
    api.save(
        {"model": ddp, "optimizer": opt, "step": STEPS_BEFORE}, os.path.join(out, "api_saved.pt")
    )
    # Every rank sees the file once api.save returns.
    assert os.path.exists(os.path.join(out, "api_saved.pt"))
    losses += train(ddp, opt, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER), rank, world)
    torch.save(
        {"losses": losses, "final": clone_state(model)},
        os.path.join(out, f"train_rank{rank}.pt"),
    )


def resume_worker(rank: int, world: int, store: str, out: str, plan: list[tuple[str, str]]) -> None:
    """A fresh job resumes from each ``(mode, path)`` in turn, from scratch each time."""
    init_group(rank, world, store)
    for mode, path in plan:
        resume_once(rank, world, out, mode, path)
    leave_group()


def resume_once(rank: int, world: int, out: str, mode: str, path: str) -> None:
    from ckpttool.training import api

    model = make_model(seed=100 + rank)  # differs per rank and from the saved weights
    fix_summary = ""
    if mode == "plain":
        # After `ckpttool convert --strip-module`: exactly the naive code, no map_location.
        ckpt = torch.load(path)
        devices = tensor_devices(ckpt)
        model.load_state_dict(ckpt["model"], strict=True)
        loaded = clone_state(model)
        ddp = nn.parallel.DistributedDataParallel(model)
    elif mode == "api-load":
        # The unconverted file, through the API: CPU storages, prefix fixed for the bare model.
        ckpt = api.load(path, map_location="cpu")
        devices = tensor_devices(ckpt)
        fixed = api.fix_state_dict(model, ckpt["model"])
        assert fixed.ok and fixed.stripped == "module." and fixed.added is None, fixed
        fix_summary = fixed.summary()
        model.load_state_dict(fixed.state_dict, strict=True)
        loaded = clone_state(model)
        ddp = nn.parallel.DistributedDataParallel(model)
    elif mode == "api-saved":
        # A file written by api.save: a plain torch.load works; loaded into the DDP wrapper,
        # whose keys carry module., which fix_state_dict adds.
        ckpt = torch.load(path)
        devices = tensor_devices(ckpt)
        ddp = nn.parallel.DistributedDataParallel(model)
        fixed = api.fix_state_dict(ddp, ckpt["model"])
        assert fixed.ok and fixed.added == "module." and fixed.stripped is None, fixed
        fix_summary = fixed.summary()
        ddp.load_state_dict(fixed.state_dict, strict=True)
        loaded = clone_state(model)
    else:
        raise ValueError(mode)
    opt = make_optimizer(ddp.parameters())
    opt.load_state_dict(ckpt["optimizer"])
    start = ckpt["step"]
    losses = train(ddp, opt, range(start, start + STEPS_AFTER), rank, world)
    torch.save(
        {
            "devices": sorted(devices),
            "loaded": loaded,
            "losses": losses,
            "final": clone_state(model),
            "fix": fix_summary,
        },
        os.path.join(out, f"resume_{mode}_rank{rank}.pt"),
    )


# -- running a group ----------------------------------------------------------------------------
def start_method() -> str:
    """``forkserver`` where it exists, else ``spawn``: fresh processes either way.

    A forkserver child is forked from a server process that has only imported the modules
    below, once, not from pytest, so it holds no threads or state of the test process. It saves
    every child the import of torch and of ``torch._dynamo`` (which the DDP constructor pulls
    in, with sympy: seconds of CPU per process), i.e. most of this file's run time.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        multiprocessing.set_forkserver_preload(PRELOAD)
        return "forkserver"
    return "spawn"


PRELOAD = ["torch", "torch.distributed", "torch.nn.parallel", "torch._dynamo"]


def run_group(fn: Callable[..., None], world: int, *args: Any) -> None:
    """Start ``world`` fresh processes running ``fn(rank, world, *args)``; raise if any fails."""
    ctx = mp.start_processes(
        fn, args=(world, *args), nprocs=world, join=False, start_method=start_method()
    )
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"process group running {fn.__name__} hung")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()


class Job:
    """The paths and results of one training job of ``world`` ranks."""

    def __init__(self, folder: Path, world: int) -> None:
        self.folder, self.world = folder, world
        self.groups = 0

    def store(self) -> str:
        self.groups += 1
        return str(self.folder / f"store{self.groups}")  # a fresh store for every group

    @property
    def bad(self) -> Path:
        return self.folder / "ddp_bad.pt"

    def result(self, name: str, rank: int) -> dict[str, Any]:
        data: dict[str, Any] = torch.load(self.folder / f"{name}_rank{rank}.pt")
        return data

    def resume(self, plan: list[tuple[str, Path]]) -> dict[str, list[dict[str, Any]]]:
        """Run one fresh group that resumes from each ``(mode, path)``; results by mode."""
        todo = [(mode, str(path)) for mode, path in plan]
        run_group(resume_worker, self.world, self.store(), str(self.folder), todo)
        return self.results([mode for mode, _ in plan])

    def results(self, modes: list[str]) -> dict[str, list[dict[str, Any]]]:
        return {m: [self.result(f"resume_{m}", r) for r in range(self.world)] for m in modes}


def trained_job(folder: Path, world: int) -> Job:
    job = Job(folder, world)
    run_group(train_worker, world, job.store(), str(folder))
    return job


def convert_with_cli(src: Path, dst: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckpttool", "convert", str(src), str(dst), "--strip-module"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    """The 2-rank training job: files saved at STEPS_BEFORE, the uninterrupted reference."""
    return trained_job(tmp_path_factory.mktemp("ddp2"), world=2)


@pytest.fixture(scope="module")
def cli_convert(job: Job) -> subprocess.CompletedProcess[str]:
    return convert_with_cli(job.bad, job.folder / "converted.pt")


@pytest.fixture(scope="module")
def resumed(job: Job, cli_convert: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """One fresh 2-rank group resumes three ways, one after the other."""
    if cli_convert.returncode != 0:
        pytest.fail(f"ckpttool convert failed: {cli_convert.stderr}")
    return job.resume(
        [
            ("plain", job.folder / "converted.pt"),
            ("api-load", job.bad),
            ("api-saved", job.folder / "api_saved.pt"),
        ]
    )


def assert_resumed_like_uninterrupted(job: Job, results: list[dict[str, Any]]) -> None:
    saved: dict[str, torch.Tensor] = torch.load(job.folder / "saved_params.pt")
    reference = [job.result("train", r) for r in range(job.world)]
    for rank, res in enumerate(results):
        assert res["devices"] == ["cpu"], f"rank {rank} loaded tensors onto {res['devices']}"
        # Every rank loaded exactly the weights saved before training resumed.
        assert res["loaded"].keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(res["loaded"][key], value), (rank, key)
        # The loss continues where it stopped: it is the loss the uninterrupted run had then,
        # not the loss of a fresh start.
        expected = reference[rank]["losses"][STEPS_BEFORE:]
        assert res["losses"] == pytest.approx(expected, rel=1e-6, abs=1e-9), rank
        x, y = batch(STEPS_BEFORE, rank, job.world)
        with torch.no_grad():
            fresh = nn.functional.mse_loss(make_model(seed=0)(x), y).item()
        assert abs(res["losses"][0] - fresh) > 1e-3, "resumed like a fresh start"
    # All ranks stay identical, and equal to the uninterrupted run.
    for key, value in reference[0]["final"].items():
        for rank, res in enumerate(results):
            assert torch.equal(res["final"][key], results[0]["final"][key]), (rank, key)
            torch.testing.assert_close(res["final"][key], value, rtol=1e-6, atol=1e-7)


# -- tests --------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine can load cuda:0 storages")
def test_unconverted_file_fails_with_plain_torch_load(job: Job) -> None:
    with pytest.raises(RuntimeError, match=CUDA_ERROR):
        torch.load(job.bad)


def test_unconverted_keys_fail_strict_load(job: Job) -> None:
    ckpt = torch.load(job.bad, map_location="cpu")
    assert all(k.startswith("module.") for k in ckpt["model"])
    with pytest.raises(RuntimeError) as info:
        make_model(seed=0).load_state_dict(ckpt["model"], strict=True)
    assert 'Missing key(s) in state_dict: "0.weight"' in str(info.value)
    assert 'Unexpected key(s) in state_dict: "module.0.weight"' in str(info.value)


def test_uninterrupted_reference_ranks_agree(job: Job) -> None:
    ref = [job.result("train", r) for r in range(job.world)]
    assert len(ref[0]["losses"]) == STEPS_BEFORE + STEPS_AFTER
    assert ref[0]["losses"] != ref[1]["losses"]  # ranks see different shards...
    for key, value in ref[0]["final"].items():  # ...yet DDP keeps their weights equal
        assert torch.equal(ref[1]["final"][key], value)


def test_cli_convert_then_plain_torch_load_resumes(
    job: Job, cli_convert: subprocess.CompletedProcess[str], resumed: dict[str, Any]
) -> None:
    assert cli_convert.returncode == 0, cli_convert.stderr
    assert "renamed 4 keys in state dict 'model'" in cli_convert.stdout
    assert "all on cpu (verified: structure and storage bytes re-read)" in cli_convert.stdout
    assert not [p for p in os.listdir(job.folder) if p.endswith(".ckpttool-tmp")]
    assert_resumed_like_uninterrupted(job, resumed["plain"])


def test_api_load_and_fix_resume_from_unconverted_file(job: Job, resumed: dict[str, Any]) -> None:
    assert resumed["api-load"][0]["fix"] == "stripped 'module.'; all keys match"
    assert_resumed_like_uninterrupted(job, resumed["api-load"])


def test_api_save_writes_a_file_plain_torch_load_resumes_from(
    job: Job, resumed: dict[str, Any]
) -> None:
    from ckpttool.readers import open_checkpoint

    ckpt = open_checkpoint(job.folder / "api_saved.pt")
    assert {s.location for s in ckpt.storages.values()} == {"cpu"}
    assert not any(k.startswith("module.") for k in ckpt.root["model"])
    assert resumed["api-saved"][0]["fix"] == "added 'module.'; all keys match"
    assert_resumed_like_uninterrupted(job, resumed["api-saved"])


def test_four_ranks_cli_flow(tmp_path: Path) -> None:
    """The CLI flow with 4 ranks: train and save, convert, resume in a fresh 4-rank group."""
    job4 = trained_job(tmp_path, world=4)
    converted = tmp_path / "converted.pt"
    proc = convert_with_cli(job4.bad, converted)
    assert proc.returncode == 0, proc.stderr
    assert_resumed_like_uninterrupted(job4, job4.resume([("plain", converted)])["plain"])
