"""Per-rank DTensor saves (``torch.save(model.state_dict())`` in every FSDP2 rank, as verl does)
merged without torch, compared with ``DTensor.full_tensor()`` gathered in the real job.

4 gloo processes, then ranks 0 and 1 again as a world of 2, each run FSDP2 on a small model
(uneven dim-0 shards, a parameter with fewer rows than ranks, a tied weight, plain buffers)
plus DTensors of their own: Shard(1) uneven, Replicate, 0-d, and on 4 ranks a 2-D mesh; one
AdamW step, then every rank saves ``model_/optim_/extra_world_size_W_rank_R.pt``, and rank 0
the gathered oracle. A Partial DTensor is saved in a folder of its own.

The same job runs FSDP1 too (``FullyShardedDataParallel``, nested wrapping, the same kinds of
uneven parameters, a replicated and a 0-d buffer; one AdamW step) and saves, per rank, the
``SHARDED_STATE_DICT`` model and optimizer state dicts (ShardedTensors) and the
``LOCAL_STATE_DICT`` (flat parameters); rank 0 saves the ``FULL_STATE_DICT`` of both, gathered
in the job, as their oracle. On 4 ranks an FSDP1 ``HYBRID_SHARD`` model (two replicas of two
shards) saves its sharded state dict too.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ckpttool.errors import CheckpointError
from ckpttool.ops.consolidate import consolidate
from ckpttool.ops.to_dcp import to_dcp
from ckpttool.readers import file_verdict, is_distributed_folder, open_checkpoint
from ckpttool.readers.sharded_tensor import merge_sharded

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.tensor")

WORKER = textwrap.dedent(
    """
    import datetime, os, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1, StateDictType
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    rank, ports, out = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)  # 11 rows: uneven on 2 and 4 ranks
            self.tiny = nn.Parameter(torch.randn(3, 2))  # fewer rows than 4 ranks
            self.register_buffer("scale", torch.linspace(0.5, 1.5, 6))
            self.register_buffer("seen", torch.tensor(7))
            self.fc = nn.Linear(6, 6)
            self.head = nn.Linear(6, 11, bias=False)
            self.head.weight = self.emb.weight  # tied

        def forward(self, x):
            return self.head(self.fc(self.emb(x) * self.scale) + self.tiny.sum())

    class Net1(nn.Module):  # FSDP1 has no 0-d parameters (it says so): a 0-d buffer
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)  # 11 rows: uneven on 2 and 4 ranks
            self.tiny = nn.Parameter(torch.randn(3, 2))  # fewer rows than 4 ranks
            self.register_buffer("scale", torch.linspace(0.5, 1.5, 6))
            self.register_buffer("seen", torch.tensor(7))
            self.fc = nn.Linear(6, 5)  # wrapped on its own: 5 rows
            self.out = nn.Linear(5, 3, bias=False).to(torch.bfloat16)

        def forward(self, x):
            h = self.fc(self.emb(x) * self.scale) + self.tiny.sum()
            return self.out(h.to(torch.bfloat16)).float().sum()

    def full(v):
        return v.full_tensor() if isinstance(v, DTensor) else v

    def hsdp(folder):  # FSDP1 HYBRID_SHARD: ranks 0-1 and 2-3 hold replicas of the same shards
        intra = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
        inter = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
        torch.manual_seed(2)
        model = FSDP1(
            nn.Linear(6, 5), device_id=torch.device("cpu"), process_group=(intra, inter),
            sharding_strategy=ShardingStrategy.HYBRID_SHARD,
        )
        os.makedirs(folder, exist_ok=True)
        with FSDP1.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
            torch.save(model.state_dict(), os.path.join(folder, f"model_rank_{rank}.pt"))
        with FSDP1.state_dict_type(
            model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)
        ):
            full_sd = model.state_dict()
        if rank == 0:
            torch.save(full_sd, folder + ".oracle.pt")

    def fsdp1(folder):
        torch.manual_seed(1)
        model = FSDP1(
            Net1(), device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({nn.Linear})
        )
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        model(torch.randint(0, 11, (2, 5))).backward()
        opt.step()
        for sub in ("", "-local"):
            os.makedirs(folder + sub, exist_ok=True)
        with FSDP1.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
            torch.save(model.state_dict(), os.path.join(folder, f"model_rank_{rank}.pt"))
            osd = FSDP1.optim_state_dict(model, opt)
            torch.save(osd, os.path.join(folder, f"optim_rank_{rank}.pt"))
        with FSDP1.state_dict_type(model, StateDictType.LOCAL_STATE_DICT):
            torch.save(model.state_dict(), os.path.join(folder + "-local", f"model_rank_{rank}.pt"))
        with FSDP1.state_dict_type(
            model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(rank0_only=False),
            FullOptimStateDictConfig(rank0_only=False),
        ):
            oracle = {"model": model.state_dict(), "optim": FSDP1.optim_state_dict(model, opt)}
        if rank == 0:
            torch.save(oracle, folder + ".oracle.pt")

    def save(world, port, folder):
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=240),
        )
        torch.manual_seed(0)
        mesh = init_device_mesh("cpu", (world,))
        model = Net()
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        model(torch.randint(0, 11, (2, 5))).sum().backward()
        opt.step()
        w = torch.arange(35, dtype=torch.float32).reshape(5, 7)
        extra = {
            "cols": distribute_tensor(w, mesh, [Shard(1)]),  # 7 columns: uneven
            "rep": distribute_tensor(torch.arange(4, dtype=torch.int64), mesh, [Replicate()]),
            "scalar": distribute_tensor(torch.tensor(2.5), mesh, [Replicate()]),
            "step": torch.tensor(3),
            "list": [distribute_tensor(w.T.contiguous(), mesh, [Shard(0)]), "note"],
        }
        if world == 4:
            grid = init_device_mesh("cpu", (2, 2))
            extra["grid"] = distribute_tensor(w.to(torch.bfloat16), grid, [Shard(0), Shard(1)])
        tag = f"world_size_{world}_rank_{rank}.pt"
        os.makedirs(folder, exist_ok=True)
        torch.save(model.state_dict(), os.path.join(folder, "model_" + tag))
        torch.save(opt.state_dict(), os.path.join(folder, "optim_" + tag))
        torch.save(extra, os.path.join(folder, "extra_" + tag))
        oracle = {
            "model": {k: full(v) for k, v in model.state_dict().items()},
            "optim": {
                "state": {i: {k: full(v) for k, v in s.items()}
                          for i, s in opt.state_dict()["state"].items()},
                "param_groups": opt.state_dict()["param_groups"],
            },
            "extra": {k: [full(v[0]), v[1]] if isinstance(v, list) else full(v)
                      for k, v in extra.items()},
        }
        named = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
        partial = DTensor.from_local(torch.ones(3) * (rank + 1), mesh, [Partial()])
        pdir = folder + "-partial"
        os.makedirs(pdir, exist_ok=True)
        torch.save({"p": partial}, os.path.join(pdir, f"model_{tag}"))
        if rank == 0:
            torch.save({"merged": oracle, "named_optim": named}, folder + ".oracle.pt")
        fsdp1(folder + "-fsdp1")
        if world == 4:
            hsdp(folder + "-hsdp")
        dist.barrier()
        dist.destroy_process_group()

    save(4, ports[0], os.path.join(out, "w4"))
    if rank < 2:
        save(2, ports[1], os.path.join(out, "w2"))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def saves(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("per_rank")
    script = out / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    ports = f"{_free_port()},{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), ports, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(4)
    ]
    try:
        logs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"a per-rank save failed:\n{log[-4000:]}")
    return out


def _equal(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (path, list(a), list(b))
        for k in a:
            _equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _equal(x, y, f"{path}.{i}")
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("world", [2, 4])
def test_merge_equals_full_tensor(saves: Path, world: int, tmp_path: Path) -> None:
    folder = saves / f"w{world}"
    oracle = torch.load(f"{folder}.oracle.pt", weights_only=True)["merged"]
    assert is_distributed_folder(folder)
    ckpt = open_checkpoint(folder)
    assert ckpt.format == "per-rank" and list(ckpt.root) == ["extra", "model", "optim"]
    dc = ckpt.facts["distributed"]
    assert dc.world_size == world and len(dc.files) == 3 * world
    by = dc.by_name()
    assert len(by["extra.rep"].segments) == 1  # a replicated tensor is read once
    assert by["extra.scalar"].shape == () and by["model.seen"].shape == ()
    out = tmp_path / "all.pt"
    result = consolidate(folder, out, select="all")
    assert result.kind == "per-rank" and result.verified
    _equal(torch.load(out, weights_only=True), {k: oracle[k] for k in ("extra", "model", "optim")})
    consolidate(folder, tmp_path / "model.safetensors")  # the model weights by default
    from safetensors.torch import load_file

    got = load_file(tmp_path / "model.safetensors")
    want = {k: v for k, v in oracle["model"].items() if k != "head.weight"}
    _equal(dict(sorted((k, got[k]) for k in want)), dict(sorted(want.items())))


def test_to_dcp_names_the_per_rank_optimizer(saves: Path, tmp_path: Path) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = saves / "w4"
    saved = torch.load(f"{folder}.oracle.pt", weights_only=True)
    result = to_dcp(folder, tmp_path / "dcp", key="optim")
    assert result.optimizers == [""]
    dcp_to_torch_save(str(tmp_path / "dcp"), str(tmp_path / "back.pt"))
    _equal(torch.load(tmp_path / "back.pt", weights_only=True), saved["named_optim"])


def test_partial_is_refused(saves: Path) -> None:
    with pytest.raises(CheckpointError, match=r"'p' is Partial .*not yet reduced"):
        open_checkpoint(saves / "w4-partial")


def test_a_missing_rank_is_named(saves: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(saves / "w2", tmp_path / "w2")
    (folder / "optim_world_size_2_rank_1.pt").unlink()
    with pytest.raises(
        CheckpointError, match=r"rank 1 \(optim_world_size_2_rank_1\.pt\) is missing"
    ):
        open_checkpoint(folder)


def test_ranks_that_disagree_are_refused(saves: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(saves / "w2" / "model_world_size_2_rank_0.pt", folder / "m_rank_0.pt")
    shutil.copy(saves / "w2" / "extra_world_size_2_rank_1.pt", folder / "m_rank_1.pt")
    with pytest.raises(CheckpointError, match="another structure than rank 0"):
        open_checkpoint(folder)


# -- FSDP1: ShardedTensor saves ------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 4])
def test_fsdp1_sharded_merge_equals_the_full_state_dict(
    saves: Path, world: int, tmp_path: Path
) -> None:
    folder = saves / f"w{world}-fsdp1"
    oracle = torch.load(f"{folder}.oracle.pt", weights_only=True)
    ckpt = open_checkpoint(folder)
    assert ckpt.format == "per-rank" and list(ckpt.root) == ["model", "optim"]
    assert ckpt.verdict is not None and ckpt.verdict.kind == "unvetted code"
    by = ckpt.facts["distributed"].by_name()
    assert len(by["model.emb.weight"].segments) <= world  # each shard read from one rank
    assert len(by["model.scale"].segments) == 1 and by["model.seen"].shape == ()
    out = tmp_path / "all.pt"
    result = consolidate(folder, out, select="all")
    assert result.kind == "per-rank" and result.verified
    _equal(torch.load(out, weights_only=True), oracle)
    consolidate(folder, tmp_path / "model.safetensors")
    from safetensors.torch import load_file

    got = load_file(tmp_path / "model.safetensors")
    _equal(dict(sorted(got.items())), dict(sorted(oracle["model"].items())))


def test_fsdp1_hybrid_shard_replicas_are_read_once(saves: Path, tmp_path: Path) -> None:
    folder = saves / "w4-hsdp"
    by = open_checkpoint(folder).facts["distributed"].by_name()
    files = {Path(seg.file).name for t in by.values() for seg in t.segments}
    assert files == {"model_rank_0.pt", "model_rank_1.pt"}  # ranks 2-3 hold the same shards
    consolidate(folder, tmp_path / "hsdp.pt")
    want = torch.load(f"{folder}.oracle.pt", weights_only=True)
    _equal(torch.load(tmp_path / "hsdp.pt", weights_only=True), want)


def test_fsdp1_files_are_unvetted_code_as_torch_shows(saves: Path, run_cli: Any) -> None:
    """torch's weights_only loader refuses a rank file; a full load runs ShardedTensor's
    __setstate__, which needs the process group of the world that saved it."""
    rank_file = saves / "w2-fsdp1" / "model_rank_1.pt"
    with pytest.raises(pickle.UnpicklingError, match="ShardedTensor"):
        torch.load(rank_file, weights_only=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        torch.load(rank_file, weights_only=False)  # our own file, made above
    res = run_cli("scan", saves / "w2-fsdp1")
    assert res.exit_code == 5 and res.stdout.count("unvetted code ") == 4, res.stdout
    verdict = file_verdict(str(rank_file))
    nested = "torch.distributed._shard.sharded_tensor.api.ShardedTensor.ProcessGroupState"
    assert verdict.kind_of(nested) == verdict.kind_of("builtins.getattr") == "unvetted code"


def test_fsdp1_local_state_dict_is_refused(saves: Path) -> None:
    folder = saves / "w2-fsdp1-local"
    why = r"is an FSDP flat parameter .*save with StateDictType.SHARDED_STATE_DICT"
    with pytest.raises(CheckpointError, match=f"'_flat_param' {why}"):
        open_checkpoint(folder)
    path = ("model", "fc._flat_param")  # the nested wrapped Linear's, in a set of several
    with pytest.raises(CheckpointError, match=f"'model.fc._flat_param' {why}"):
        merge_sharded("model.fc._flat_param", path, [], [str(folder / "m_rank_0.pt")], "model")


def test_fsdp1_ranks_of_another_world_are_refused(saves: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(saves / "w4-fsdp1" / "model_rank_0.pt", folder / "model_rank_0.pt")
    shutil.copy(saves / "w4-fsdp1" / "model_rank_1.pt", folder / "model_rank_1.pt")
    with pytest.raises(CheckpointError, match=r"rank 0 of 4, but this file is rank 0 of 2"):
        open_checkpoint(folder)


def test_fsdp1_shards_that_disagree_with_their_metadata_are_refused(saves: Path) -> None:
    folder = saves / "w2-fsdp1"
    files = [str(folder / f"model_rank_{r}.pt") for r in (0, 1)]

    def nodes() -> list[Any]:  # each rank's emb.weight (11 rows: 6 on rank 0, 5 on rank 1)
        return [open_checkpoint(f, _judge=False).root["emb.weight"] for f in files]

    def merge(ranks: list[Any]) -> None:
        merge_sharded("emb.weight", ("emb.weight",), ranks, files, "model")

    merge(nodes())  # as saved
    ranks = nodes()  # (ShardedTensor state: local shards, metadata, process group, ...)
    ranks[1].args[3][0][0].state[1]["metadata"].state[1]["shard_offsets"] = [5, 0]
    with pytest.raises(CheckpointError, match=r"local shard at \[5, 0\] the metadata does not"):
        merge(ranks)
    ranks = nodes()
    ranks[1].args[3][0].clear()  # rank 1 holds no shard: its rows are nowhere
    with pytest.raises(CheckpointError, match=r"no rank's file holds the shard .* at \[6, 0\]"):
        merge(ranks)
    ranks = nodes()
    ranks[0].args[3][1].state["size"] = ranks[0].args[3][1].state["size"].__class__((12, 6))
    with pytest.raises(CheckpointError, match="another global size"):
        merge(ranks)
