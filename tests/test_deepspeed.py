"""DeepSpeed ZeRO 1/2/3 folders: read as data, inspected, consolidated without torch.

Real folders are made once per session by 2 gloo processes running DeepSpeed on its CPU
accelerator (ZeRO-1, 2 and 3, fp32 and bf16 training; a small model with a tied weight, a
frozen param, float/int/bf16 buffers, two param groups, sizes that leave padding, several
ZeRO-3 sub-groups). Rank 0 then runs DeepSpeed's own ``zero_to_fp32`` and saves
its state dict as the oracle, so this process never imports DeepSpeed. Those tests skip where
DeepSpeed is not installed; the synthetic folders below (built with ``torch.save`` by
partitioning known tensors the way ZeRO does) always run.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest

from ckpttool.errors import CheckpointError, DangerousCheckpointError
from ckpttool.ops.consolidate import consolidate
from ckpttool.readers import deepspeed as ds_reader
from ckpttool.readers import open_checkpoint

torch = pytest.importorskip("torch")

CONFIGS = [f"zero{stage}_{dtype}" for stage in (1, 2, 3) for dtype in ("fp32", "bf16")]

NET = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(37, 11)
            self.frozen = nn.Linear(11, 11)
            self.frozen.weight.requires_grad_(False)
            self.norm = nn.LayerNorm(11)
            self.head = nn.Linear(11, 37, bias=False)
            self.head.weight = self.embed.weight  # tied
            self.register_buffer("scale", torch.linspace(0.5, 1.5, 11))
            self.register_buffer("seen", torch.zeros((), dtype=torch.int64))
            self.register_buffer("mask", torch.ones(5, dtype=torch.bfloat16))

        def forward(self, x):
            self.seen += 1
            e = self.embed(x)
            return self.head(self.norm(self.frozen(e) * self.scale.to(e.dtype)))
    """
)

WORKER = NET + textwrap.dedent(
    """
    import contextlib, io, os, sys
    from datetime import timedelta
    import deepspeed
    from deepspeed.utils import zero_to_fp32 as z

    def moments_oracle(folder, stage, world):
        # DeepSpeed's own merge, fed with the optimizer's moments instead of the fp32 groups
        tag = os.path.join(folder, open(os.path.join(folder, "latest")).read().strip())
        models = z.parse_model_states(z.get_model_state_files(tag))
        files = z.get_optim_files(tag)
        sds = [torch.load(f, weights_only=False)["optimizer_state_dict"] for f in files]
        fp32 = "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"
        base = "base_optimizer_state" if stage <= 2 else "optimizer_state_dict"
        out = {}
        for key in ("exp_avg", "exp_avg_sq"):
            groups = [[st[key][: len(g)] for st, g in zip(sd[base]["state"].values(), sd[fp32])]
                      for sd in sds]
            merged = {}
            if stage <= 2:
                pads = sds[0].get("param_alignment_paddings")
                z._zero2_merge_trainable_params(merged, world, groups, models, pads)
            else:
                z._zero3_merge_trainable_params(merged, world, groups, models)
            for name, t in z.to_torch_tensor(merged).items():
                out.setdefault(name, {})[key] = t.clone()
        return out

    def main():
        out, rank = sys.argv[1], int(os.environ["RANK"])
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no C++ build
        deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=120))
        for stage in (1, 2, 3):
            for bf16 in (False, True):
                torch.manual_seed(0)
                model = Net()
                groups = [
                    {"params": [model.embed.weight, model.frozen.bias], "weight_decay": 0.0},
                    {"params": [model.norm.weight, model.norm.bias]},
                ]
                zero = {"stage": stage}
                if stage == 3:
                    zero["sub_group_size"] = 150  # several sub-groups
                cfg = {
                    "train_micro_batch_size_per_gpu": 2,
                    "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}},
                    "zero_optimization": zero,
                    "bf16": {"enabled": bf16},
                    "steps_per_print": 1000,
                }
                engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)
                g = torch.Generator().manual_seed(rank)
                for _ in range(2):
                    loss = engine(torch.randint(0, 37, (2, 5), generator=g)).float().mean()
                    engine.backward(loss)
                    engine.step()
                name = f"zero{stage}_{'bf16' if bf16 else 'fp32'}"
                folder = os.path.join(out, name)
                engine.save_checkpoint(folder, client_state={"epoch": 3, "note": "hi"})
                torch.distributed.barrier()
                if rank == 0:
                    with contextlib.redirect_stdout(io.StringIO()):
                        sd = z.get_fp32_state_dict_from_zero_checkpoint(folder)
                        moments = moments_oracle(folder, stage, 2)
                    torch.save(sd, os.path.join(out, name + ".oracle.pt"))
                    # what the zero_to_fp32.py script beside the checkpoint writes
                    with contextlib.redirect_stdout(io.StringIO()), \
                            contextlib.redirect_stderr(io.StringIO()):
                        z.convert_zero_checkpoint_to_fp32_state_dict(
                            folder, os.path.join(out, name + ".script"), max_shard_size=None
                        )
                    torch.save(moments, os.path.join(out, name + ".moments.pt"))
                torch.distributed.barrier()

    main()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_CACHE: dict[str, Path] = {}


@pytest.fixture(scope="session")
def zero_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six DeepSpeed folders and their oracles (about 15-30 s on 2 cores, mostly imports)."""
    return zero_folders(tmp_path_factory)


def zero_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's DeepSpeed folders (made once, shared by test_deepspeed and test_to_dcp)."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install deepspeed to run the oracle tests)")
    if "root" not in _CACHE:
        _CACHE["root"] = _make_zero_folders(tmp_path_factory)
    return _CACHE["root"]


def _make_zero_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zero")
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            DS_ACCELERATOR="cpu",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the DeepSpeed workers did not finish in 600 s")
    if any(p.returncode for p in procs):
        pytest.fail("a DeepSpeed worker failed:\n" + "\n".join(log[-3000:] for log in logs))
    return out


def _oracle(root: Path, name: str, what: str = "oracle") -> Any:
    return torch.load(root / f"{name}.{what}.pt", weights_only=True)


def _assert_same(ours: dict[str, Any], ref: dict[str, Any]) -> None:
    assert list(ours) == list(ref)
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert torch.equal(ours[k], v), k


def _script(root: Path, name: str) -> Any:
    """What DeepSpeed's zero_to_fp32.py script writes: every floating tensor in float32."""
    return torch.load(root / f"{name}.script" / "pytorch_model.bin", weights_only=True)


def _net() -> Any:
    """The worker's model, initialised as the worker initialised it."""
    ns: dict[str, Any] = {}
    exec(NET, ns)
    torch.manual_seed(0)
    return ns["Net"]()


def _assert_model(ours: dict[str, Any], root: Path, name: str) -> None:
    """``ours`` holds what zero_to_fp32.py writes, plus the frozen parameter that DeepSpeed's
    converters drop from a ZeRO-1 save (which lists no frozen params): ckpttool keeps it."""
    ref = _script(root, name)
    kept = ["frozen.weight"] if name.startswith("zero1") else []
    assert sorted(ours) == sorted([*ref, *kept])
    _assert_same({k: ours[k] for k in ours if k in ref}, ref)
    if kept:  # frozen: the value it was initialised with, in the dtype training used
        want = _net().frozen.weight.detach()
        want = want.bfloat16().float() if name.endswith("bf16") else want
        assert ours["frozen.weight"].dtype == torch.float32
        assert torch.equal(ours["frozen.weight"], want)


# -- real DeepSpeed folders, DeepSpeed's zero_to_fp32 as the oracle -------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_consolidated_pt_equals_zero_to_fp32(zero_root: Path, name: str, tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    result = consolidate(zero_root / name, out)
    assert result.kind == f"zero-{name[4]}" and result.world_size == 2 and result.verified
    ours = torch.load(out, weights_only=True)
    _assert_model({k: ours[k] for k in ours}, zero_root, name)
    ref = _oracle(zero_root, name)  # get_fp32_state_dict_from_zero_checkpoint: the same values
    for k, v in ref.items():
        assert torch.equal(ours[k], v.float() if v.is_floating_point() else v), k
    # zero_to_fp32 widens 16-bit float buffers; its script also bf16 frozen weights: so do we
    assert ours["mask"].dtype == ours["frozen.weight"].dtype == torch.float32
    # the tied weight is one tensor under two names, as in the oracle
    assert ours["head.weight"].untyped_storage().data_ptr() == (
        ours["embed.weight"].untyped_storage().data_ptr()
    )


@pytest.mark.parametrize("name", ["zero1_bf16", "zero2_fp32", "zero3_bf16"])
def test_consolidated_safetensors_equals_zero_to_fp32(
    zero_root: Path, name: str, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "model.safetensors"
    consolidate(zero_root / name, out)
    ours = load_file(out)
    ref = _script(zero_root, name)
    _assert_model({k: ours[k] for k in [*ref, *sorted(set(ours) - set(ref))]}, zero_root, name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_cast_equals_zero_to_fp32_cast(zero_root: Path, dtype: str, tmp_path: Path) -> None:
    """As ``convert_zero_checkpoint_to_state_dict(dtype=...)``: floating tensors cast."""
    out = tmp_path / "model.pt"
    result = consolidate(zero_root / "zero3_bf16", out, dtype=dtype)
    ref = {
        k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v
        for k, v in _oracle(zero_root, "zero3_bf16").items()
    }
    _assert_same(torch.load(out, weights_only=True), ref)
    # stored in another dtype: 5 fp32 tensors (the tied one once), and for float16 also the
    # bf16 frozen weight and the bf16 buffer
    assert result.cast == {"bfloat16": 5, "float16": 7}[dtype]


@pytest.mark.parametrize("name", ["zero1_fp32", "zero2_bf16", "zero3_fp32", "zero3_bf16"])
def test_everything_holds_the_optimizer_moments(zero_root: Path, name: str, tmp_path: Path) -> None:
    out = tmp_path / "all.pt"
    consolidate(zero_root / name, out, select="all")
    obj = torch.load(out, weights_only=True)  # DeepSpeed's records are written as plain data
    _assert_model(obj["module"], zero_root, name)
    moments = _oracle(zero_root, name, "moments")
    state = obj["optimizer"]["state"]
    assert sorted(state) == sorted(moments)
    for param, ref in moments.items():
        for key, value in ref.items():
            assert torch.equal(state[param][key], value), (param, key)
        assert state[param]["step"].item() == 2.0
    assert obj["optimizer"]["loss_scaler"] == {"cur_scale": 1.0, "dynamic": False}
    assert obj["epoch"] == 3 and obj["note"] == "hi" and obj["global_steps"] == 2
    assert obj["ds_config"]["zero_optimization"]["stage"] == int(name[4])


@pytest.mark.parametrize("name", ["zero2_bf16", "zero3_fp32"])
def test_read_names_the_layout(zero_root: Path, name: str) -> None:
    dc = ds_reader.read(str(zero_root / name))
    tag = dc.path
    assert os.path.basename(tag) == "global_step2" and dc.kind == f"zero-{name[4]}"
    assert dc.facts["zero_stage"] == int(name[4]) and dc.world_size == 2
    assert dc.facts["training_dtype"] == name[-4:] and dc.facts["ds_version"]
    assert dc.facts["aliases"] == {"module.head.weight": "module.embed.weight"}
    assert dc.facts["cast_to_float32"] == ["mask"] + (["frozen.weight"] * name.endswith("bf16"))
    assert sum(n for _, n in dc.files) == sum(
        os.path.getsize(os.path.join(tag, f)) for f in os.listdir(tag)
    )
    # the tag folder itself reads the same
    again = ds_reader.read(tag)
    assert [t.name for t in again.tensors] == [t.name for t in dc.tensors]


def test_inspect_describes_a_zero_folder(zero_root: Path, run_cli: Any) -> None:
    import json

    res = run_cli("inspect", zero_root / "zero3_bf16", "--json")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    dist = report["distributed"]
    assert dist["kind"] == "zero-3" and dist["world_size"] == 2
    assert len(dist["files"]) == 4
    assert dist["facts"]["training_dtype"] == "bf16"
    assert dist["consolidates_into"]["model"]["path"] == "module"


def test_a_zero_folder_gets_advice_true_for_a_folder(
    zero_root: Path, run_cli: Any, tmp_path: Path
) -> None:
    import json

    res = run_cli("inspect", zero_root / "zero2_bf16", "--json")
    warnings = json.loads(res.stdout)["warnings"]
    assert not [w for w in warnings if "--plain-objects" in w or "refuses this file" in w]
    (advice,) = [w for w in warnings if "folder of shards" in w]
    assert "weights_only=False" in advice and "`ckpttool consolidate FOLDER OUT`" in advice
    for args in ([], ["--all"]):  # what it advises: files torch.load(weights_only=True) opens
        out = tmp_path / f"out{len(args)}.pt"
        assert run_cli("consolidate", zero_root / "zero2_bf16", out, *args).exit_code == 0
        assert torch.load(out, weights_only=True)


def test_a_latest_that_names_a_missing_tag_says_what_to_pass(
    zero_root: Path, run_cli: Any, tmp_path: Path
) -> None:
    import shutil

    folder = tmp_path / "ds"
    shutil.copytree(zero_root / "zero2_fp32", folder)
    (folder / "latest").write_text("global_step9")  # a save that was interrupted or removed
    res = run_cli("consolidate", folder, tmp_path / "m.pt")
    assert res.exit_code == 1 and not (tmp_path / "m.pt").exists()
    assert res.stderr == (
        f"Error: {folder}: is a DeepSpeed folder, but its `latest` names 'global_step9', which "
        f"is not there (it holds global_step2): pass the tag folder {folder / 'global_step2'}, "
        "or fix `latest`\n"
    )
    assert run_cli("consolidate", folder / "global_step2", tmp_path / "m.pt").exit_code == 0
    _assert_model(torch.load(tmp_path / "m.pt", weights_only=True), zero_root, "zero2_fp32")


def test_load_of_a_zero_folder_is_what_consolidate_all_writes(zero_root: Path) -> None:
    import ckpttool

    got = ckpttool.load(zero_root / "zero3_bf16")
    _assert_model(got["module"], zero_root, "zero3_bf16")
    assert got["epoch"] == 3 and got["global_steps"] == 2
    assert sorted(got["optimizer"]["state"]) == sorted(_oracle(zero_root, "zero3_bf16", "moments"))


def test_cli_consolidates_a_zero_folder(zero_root: Path, run_cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    res = run_cli("consolidate", zero_root / "zero2_fp32", out)
    assert res.exit_code == 0, res.stderr
    assert "zero-2" in res.stdout and "verified" in res.stdout
    _assert_model(torch.load(out, weights_only=True), zero_root, "zero2_fp32")


@pytest.mark.parametrize("name", CONFIGS)
def test_the_output_loads_strictly(zero_root: Path, name: str, tmp_path: Path) -> None:
    """DeepSpeed's converters drop the frozen parameter of a ZeRO-1 save (it lists no frozen
    params; its module holds the whole tensor): a strict load of their output fails."""
    out = tmp_path / "model.pt"
    result = consolidate(zero_root / name, out)
    if name.startswith("zero1"):
        assert result.notes == [
            "kept the frozen parameter frozen.weight: a ZeRO-1 save does not list it, and "
            "DeepSpeed's zero_to_fp32 drops it"
        ]
    model = _net()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    missing = model.load_state_dict(_script(zero_root, name), strict=False).missing_keys
    assert missing == (["frozen.weight"] if name.startswith("zero1") else [])
    facts = ds_reader.read(str(zero_root / name)).facts
    assert facts["frozen_unlisted"] == (["frozen.weight"] if name.startswith("zero1") else [])


# -- synthetic folders: known tensors partitioned as ZeRO does, saved with torch.save ------------
WORLD = 3
PARAMS = {"a": (5, 3), "b": (7,), "c": (2, 2)}  # group 0: a, b; group 1: c
GROUPS = [["a", "b"], ["c"]]


def _full() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    out = {n: torch.randn(s, generator=g) for n, s in PARAMS.items()}
    out["buf"] = torch.arange(4, dtype=torch.int32)
    out["f"] = torch.randn(7, generator=g).to(torch.bfloat16)  # frozen
    return out


def _model_states(full: dict[str, Any], rank: int, stage: int) -> dict[str, Any]:
    shapes = [OrderedDict((n, torch.Size(PARAMS[n])) for n in names) for names in GROUPS]
    module: dict[str, Any] = OrderedDict(buf=full["buf"])
    for n in ("a", "b", "c", "f"):
        module[n] = full[n].bfloat16() if stage <= 2 else torch.empty(0, dtype=torch.bfloat16)
    module["tied"] = module["a"]
    if stage <= 2:
        frozen = OrderedDict(f=full["f"])
    else:  # ZeRO-3: each rank keeps its ceil(7/3) = 3 elements, the last one padded
        frozen = OrderedDict(
            f=torch.cat([full["f"], full["f"].new_zeros(2)])[rank * 3 : rank * 3 + 3]
        )
    return {
        "module": module,
        "buffer_names": ["buf"],
        "param_shapes": shapes,
        "frozen_param_shapes": OrderedDict(f=torch.Size([7])),
        "frozen_param_fragments": frozen,
        "shared_params": {"tied": "a"} if rank == 0 else {},
        "ds_version": "0.19.8",
        "ds_config": {"zero_optimization": {"stage": stage}},
        "epoch": 7,
    }


def _zero2_partitions(full: dict[str, Any]) -> list[list[Any]]:
    """Each group's params end to end, padded to a multiple of 2 * world, cut in WORLD parts,
    the padding dropped again (as DeepSpeed saves them): group 1 leaves rank 2 nothing."""
    parts: list[list[Any]] = [[] for _ in range(WORLD)]
    for names in GROUPS:
        flat = torch.cat([full[n].reshape(-1) for n in names])
        padded = -(-flat.numel() // (2 * WORLD)) * 2 * WORLD
        size = padded // WORLD
        for r in range(WORLD):
            parts[r].append(flat[r * size : (r + 1) * size])  # a view of one storage
    return parts


def _zero3_partitions(full: dict[str, Any]) -> list[list[Any]]:
    """Every param cut in ceil(numel / WORLD) pieces per rank (the last padded), each rank's
    pieces end to end, split into two sub-groups at element 4 (inside param a)."""
    parts = []
    for r in range(WORLD):
        pieces = []
        for n in ("a", "b", "c"):
            flat = full[n].reshape(-1)
            part = -(-flat.numel() // WORLD)
            padded = torch.cat([flat, flat.new_zeros(part * WORLD - flat.numel())])
            pieces.append(padded[r * part : (r + 1) * part])
        mine = torch.cat(pieces)
        parts.append([mine[:4].clone(), mine[4:].clone()])
    return parts


def _make(folder: Path, stage: int, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    full = _full()
    tag = folder / "global_step9"
    tag.mkdir(parents=True)
    (folder / "latest").write_text("global_step9")
    parts = _zero2_partitions(full) if stage <= 2 else _zero3_partitions(full)
    for r in range(WORLD):
        groups = parts[r]
        state = {
            i: {"step": torch.tensor(3.0), "exp_avg": g * 2, "exp_avg_sq": g * g}
            for i, g in enumerate(groups)
        }
        base = {"state": state, "param_groups": [{"lr": 0.1, "params": [i]} for i in state]}
        osd: dict[str, Any] = {"zero_stage": stage, "loss_scaler": {"cur_scale": 1.0}}
        if stage <= 2:
            osd.update(
                single_partition_of_fp32_groups=groups,
                partition_count=[WORLD, WORLD],
                base_optimizer_state=base,
            )
        else:
            osd.update(fp32_flat_groups=groups, partition_count=WORLD, optimizer_state_dict=base)
        torch.save(
            {"optimizer_state_dict": osd}, tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        )
        if stage == 3:
            torch.save(
                _model_states(full, r, 3), tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"
            )
    if stage <= 2:
        torch.save(_model_states(full, 0, stage), tag / "mp_rank_00_model_states.pt")
    for name in drop:
        (tag / name).unlink()
    return full


def _read_model(path: Path, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "out.pt"
    consolidate(path, out, force=True)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("stage", [2, 3])
def test_synthetic_partitions_reassemble(stage: int, tmp_path: Path) -> None:
    full = _make(tmp_path / "ck", stage)
    ours = _read_model(tmp_path / "ck", tmp_path)
    assert list(ours) == ["buf", "f", "a", "b", "c", "tied"]  # zero_to_fp32's order
    for name in ("buf", "a", "b", "c"):
        assert ours[name].dtype == full[name].dtype and torch.equal(ours[name], full[name]), name
    # the bf16 frozen param widened to float32, as zero_to_fp32.py writes it
    assert ours["f"].dtype == torch.float32 and torch.equal(ours["f"], full["f"].float())
    assert ours["tied"] is ours["a"] or torch.equal(ours["tied"], ours["a"])


@pytest.mark.parametrize("stage", [2, 3])
def test_synthetic_moments_reassemble(stage: int, tmp_path: Path) -> None:
    full = _make(tmp_path / "ck", stage)
    out = tmp_path / "all.pt"
    consolidate(tmp_path / "ck", out, select="all")
    obj = torch.load(out, weights_only=True)
    for name in ("a", "b", "c"):
        st = obj["optimizer"]["state"][name]
        assert torch.equal(st["exp_avg"], full[name] * 2), name
        assert torch.equal(st["exp_avg_sq"], full[name] * full[name]), name
        assert st["step"].item() == 3.0
    assert obj["epoch"] == 7 and obj["optimizer"]["loss_scaler"] == {"cur_scale": 1.0}


@pytest.mark.parametrize("stage", [2, 3])
def test_reading_and_consolidating_never_import_torch(stage: int, tmp_path: Path) -> None:
    _make(tmp_path / "ck", stage)
    code = textwrap.dedent(
        f"""
        import sys
        from ckpttool.ops.consolidate import consolidate
        consolidate({str(tmp_path / "ck")!r}, {str(tmp_path / "m.safetensors")!r}, select="all")
        consolidate({str(tmp_path / "ck")!r}, {str(tmp_path / "m.pt")!r}, dtype="float16")
        assert "torch" not in sys.modules and "deepspeed" not in sys.modules, "imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    full = _full()
    ours = torch.load(tmp_path / "m.pt", weights_only=True)
    assert torch.equal(ours["a"], full["a"].half()) and ours["buf"].dtype == torch.int32


def test_a_missing_rank_is_refused(tmp_path: Path) -> None:
    _make(tmp_path / "ck", 2, drop=("zero_pp_rank_1_mp_rank_00_optim_states.pt",))
    with pytest.raises(CheckpointError, match=r"expects the optimizer states of 3 ranks, finds"):
        open_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("zero_pp_rank_0_mp_rank_01_optim_states.pt", "model-parallel"),
        ("layer_01-model_00-model_states.pt", "pipeline-parallel"),
        ("layer_0_expert_3_mp_rank_00_model_states.pt", "expert"),
    ],
)
def test_model_and_pipeline_parallel_saves_are_refused(
    tmp_path: Path, extra: str, problem: str
) -> None:
    _make(tmp_path / "ck", 2)
    tag = tmp_path / "ck" / "global_step9"
    (tag / extra).write_bytes((tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").read_bytes())
    with pytest.raises(CheckpointError, match=problem):
        open_checkpoint(tmp_path / "ck")


def test_a_folder_without_optimizer_states_says_where_the_weights_are(tmp_path: Path) -> None:
    names = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(WORLD)]
    _make(tmp_path / "ck", 2, drop=tuple(names))
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: open that file"):
        open_checkpoint(tmp_path / "ck")


def test_sizes_that_do_not_add_up_are_refused(tmp_path: Path) -> None:
    _make(tmp_path / "ck", 3)
    tag = tmp_path / "ck" / "global_step9"
    for r in range(WORLD):  # rank files claim a bigger param than the ranks hold
        path = tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"
        sd = torch.load(path, weights_only=True)
        sd["param_shapes"][1]["c"] = torch.Size([3, 3])
        torch.save(sd, path)
    with pytest.raises(CheckpointError, match="the params need"):
        open_checkpoint(tmp_path / "ck")


class _Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo never run",))


def test_a_dangerous_global_in_client_state_is_refused(tmp_path: Path, run_cli: Any) -> None:
    _make(tmp_path / "ck", 2)
    path = tmp_path / "ck" / "global_step9" / "mp_rank_00_model_states.pt"
    sd = torch.load(path, weights_only=True)
    sd["hook"] = _Payload()
    torch.save(sd, path)
    with pytest.raises(DangerousCheckpointError):
        open_checkpoint(tmp_path / "ck")
    res = run_cli("consolidate", tmp_path / "ck", tmp_path / "out.pt")
    assert res.exit_code == 3 and "system" in res.stderr
    assert not (tmp_path / "out.pt").exists()


def test_latest_naming_a_missing_tag_is_no_deepspeed_folder(tmp_path: Path) -> None:
    (tmp_path / "latest").write_text("global_step1")
    assert not ds_reader.is_deepspeed_folder(str(tmp_path))
    assert not ds_reader.is_deepspeed_folder(str(tmp_path / "latest"))


MODEL_MUTATIONS = [  # (key, odd value, the error it gets; None: read, the odd part ignored)
    ("buffer_names", [["buf"]], None),
    ("shared_params", {"tied": ["a"]}, None),
    ("param_shapes", [{"a": "big"}], "the shape of 'a' is not a tuple of sizes"),
    ("param_shapes", "nope", "has no 'param_shapes'"),
    ("module", [1, 2], "has no 'module'"),
    ("frozen_param_shapes", {"f": (999,)}, "frozen 'f' is not shaped [999]"),
    ("frozen_param_fragments", {"f": "bytes"}, "'f' is not a tensor"),
]
OPTIM_MUTATIONS = [
    ("zero_stage", "2", "unknown ZeRO stage ('2')"),
    ("zero_stage", 7, "unknown ZeRO stage (7)"),
    ("partition_count", 0, "has no partition count"),
    ("single_partition_of_fp32_groups", [torch.zeros(3, dtype=torch.float16)], "is float16"),
    ("single_partition_of_fp32_groups", [torch.zeros(4, 4).t()], "not stored as contiguous"),
    ("param_alignment_paddings", [["z", 1]], "lists the wrong number of paddings"),
    ("base_optimizer_state", {"state": {"x": 1, 0: {"exp_avg": "no"}}}, "state for 1 groups"),
    ("base_optimizer_state", [{"exp_avg": torch.zeros(99)}], "state for 1 groups"),
]


@pytest.mark.parametrize(
    ("where", "key", "value", "error"),
    [("model", *m) for m in MODEL_MUTATIONS] + [("optim", *m) for m in OPTIM_MUTATIONS],
)
def test_malformed_records_give_one_clear_error(
    tmp_path: Path, where: str, key: str, value: Any, error: str | None
) -> None:
    """Each odd value is refused with a one-line CheckpointError (or ignored), never a crash."""
    _make(tmp_path / "ck", 2)
    tag = tmp_path / "ck" / "global_step9"
    model = where == "model"
    name = "mp_rank_00_model_states.pt" if model else "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    sd = torch.load(tag / name, weights_only=True)
    (sd if model else sd["optimizer_state_dict"])[key] = value
    torch.save(sd, tag / name)
    if error is None:
        assert open_checkpoint(tmp_path / "ck").format == "zero-2"
        return
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path / "ck")
    assert error in str(info.value) and "\n" not in str(info.value)
