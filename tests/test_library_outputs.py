"""What a new user gets from ckpttool on folders and files that real libraries write.

Every input here is made by the library itself, in a child process (torch.distributed.checkpoint
on CPU, Lightning's Trainer and FSDP strategy, accelerate's ``save_state``, transformers'
Trainer): each answer ckpttool gives about them is checked against what that library or torch
does with them. Tests that need Lightning, accelerate or transformers skip without them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.test_dcp import dcp_folders

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.checkpoint")


def _run_script(script: str, *args: str | Path, timeout: int = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("COLUMNS", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the generating script failed:\n{(proc.stdout + proc.stderr)[-3000:]}")


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install {module} to run this test)")


# -- DCP: advice that is true for a folder -------------------------------------------------------
@pytest.fixture(scope="session")
def dcp_w2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder written by FSDP2 + dcp.save with 2 gloo ranks (shared with test_dcp)."""
    return dcp_folders(tmp_path_factory)[2]


def test_a_dcp_folder_gets_advice_true_for_a_folder(
    dcp_w2: Path, run_cli: Any, tmp_path: Path
) -> None:
    res = run_cli("inspect", dcp_w2, "--json")
    assert res.exit_code == 0, res.stderr
    warnings = json.loads(res.stdout)["warnings"]
    # not the advice for a file: DCP never uses weights_only on .metadata, and
    # convert --plain-objects is a usage error on a folder
    assert not [w for w in warnings if "--plain-objects" in w or "refuses this file" in w]
    (advice,) = [w for w in warnings if "folder of shards" in w]
    assert "pickle.load" in advice and "`ckpttool consolidate FOLDER OUT`" in advice
    assert run_cli("convert", dcp_w2, tmp_path / "x.pt", "--plain-objects").exit_code == 2
    # what it advises works: one file that torch.load(weights_only=True) opens
    out = tmp_path / "model.pt"
    assert run_cli("consolidate", dcp_w2, out).exit_code == 0
    assert torch.load(out, weights_only=True)


# -- DCP: a torch.Generator kept as a non-tensor value -------------------------------------------
DCP_GENERATOR = """
    import sys, torch, torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    folder, ref = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    rng = torch.Generator().manual_seed(123)
    rng.get_state()  # its state is a uint8 tensor, saved as a torch.save blob
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 7, "rng": rng}
    dcp.save(state, checkpoint_id=folder)
    dcp_to_torch_save(folder, ref)
"""


@pytest.fixture(scope="session")
def dcp_generator(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dcp_generator")
    _run_script(DCP_GENERATOR, out / "ckpt", out / "torch.pt")
    return out / "ckpt", out / "torch.pt"


def _load_with_generator(path: Path) -> Any:
    with torch.serialization.safe_globals([torch._C.Generator]):
        return torch.load(path, weights_only=True)


def test_consolidate_all_keeps_a_generator_as_dcp_to_torch_save_does(
    dcp_generator: tuple[Path, Path], run_cli: Any, tmp_path: Path
) -> None:
    folder, ref_path = dcp_generator
    out = tmp_path / "full.pt"
    res = run_cli("consolidate", folder, out, "--all")
    assert res.exit_code == 0, res.stderr
    ours, ref = _load_with_generator(out), _load_with_generator(ref_path)
    assert list(ours) == list(ref) == ["model", "optim", "step", "rng"]
    assert isinstance(ours["rng"], torch.Generator)
    assert torch.equal(ours["rng"].get_state(), ref["rng"].get_state())
    assert torch.equal(torch.rand(5, generator=ours["rng"]), torch.rand(5, generator=ref["rng"]))
    flat_ours, _ = torch.utils._pytree.tree_flatten({k: ours[k] for k in ("model", "optim")})
    flat_ref, _ = torch.utils._pytree.tree_flatten({k: ref[k] for k in ("model", "optim")})
    assert len(flat_ours) == len(flat_ref) > 0
    for a, b in zip(flat_ours, flat_ref, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    assert ours["step"] == 7


# -- Lightning: FSDP's meta.pt, and hyper-parameters that hold a class ---------------------------
LIGHTNING = """
    import os, sys, torch
    import lightning as L
    from lightning.fabric.utilities.load import _load_distributed_checkpoint
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import FSDPStrategy
    from pathlib import Path
    from ckpttool.testing import saved_as

    out = Path(sys.argv[1])

    class Net(L.LightningModule):
        def __init__(self, lr=0.1, opt_cls=torch.optim.Adam, width=8, keep_class=True):
            super().__init__()
            self.save_hyperparameters(ignore=None if keep_class else ["opt_cls"])
            self.opt_cls = opt_cls
            self.l1 = torch.nn.Linear(width, 4)
            self.l2 = torch.nn.Linear(4, 2)

        def training_step(self, batch, i):
            loss = self.l2(self.l1(batch[0])).pow(2).mean()
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return self.opt_cls(self.parameters(), lr=self.hparams.lr)

    def fit(model):
        torch.manual_seed(0)
        data = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(8, 8)), batch_size=4
        )
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=out,
            callbacks=[ModelCheckpoint(dirpath=out / "cb", monitor="loss", save_top_k=1)],
        )
        trainer.fit(model, data)
        return trainer

    trainer = fit(Net())
    with saved_as("cuda:0"):  # as a file trained on a GPU is tagged
        trainer.save_checkpoint(out / "gpu.ckpt")
    # Lightning's FSDP strategy needs CUDA to train; its sharded save runs on any machine
    # (dcp.save of the model and optimizer, meta.pt with the rest of the checkpoint)
    FSDPStrategy(state_dict_type="sharded").save_checkpoint(
        trainer._checkpoint_connector.dump_checkpoint(), out / "adam.ckpt"
    )
    with torch.serialization.safe_globals([torch.optim.Adam]):
        torch.save(_load_distributed_checkpoint(out / "adam.ckpt"), out / "adam.lightning.pt")
    trainer = fit(Net(keep_class=False))  # hyper-parameters without the class
    FSDPStrategy(state_dict_type="sharded").save_checkpoint(
        trainer._checkpoint_connector.dump_checkpoint(), out / "sharded.ckpt"
    )
    # what Lightning's consolidate_checkpoint writes
    torch.save(_load_distributed_checkpoint(out / "sharded.ckpt"), out / "sharded.lightning.pt")
"""


@pytest.fixture(scope="session")
def lightning_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need("lightning")
    out = tmp_path_factory.mktemp("lightning")
    _run_script(LIGHTNING, out)
    return out


def _flat(obj: Any) -> list[Any]:
    leaves, spec = torch.utils._pytree.tree_flatten(obj)
    return [spec, *leaves]


def _same(a: Any, b: Any) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa[0] == fb[0]  # the same nesting and keys
    assert len(fa) == len(fb) > 1
    for x, y in zip(fa[1:], fb[1:], strict=True):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y)
        else:
            assert x == y


def test_consolidate_all_keeps_lightning_meta_as_lightning_does(
    lightning_root: Path, run_cli: Any, tmp_path: Path
) -> None:
    folder = lightning_root / "sharded.ckpt"
    res = run_cli("inspect", folder, "--json")
    report = json.loads(res.stdout)
    entries = {e["path"]: e["value"] for e in report["entries"]}
    assert entries["global_step"] == "2" and entries["epoch"] == "1"
    assert "'lr': 0.1" in entries["hyper_parameters"]
    assert report["distributed"]["facts"]["lightning_meta"] == "meta.pt"
    assert report["distributed"]["groups"]["optimizer"]["tensors"] > 0  # optimizer_0
    out = tmp_path / "full.pt"
    res = run_cli("consolidate", folder, out, "--all")
    assert res.exit_code == 0, res.stderr
    ours = torch.load(out, weights_only=True)
    ref = torch.load(lightning_root / "sharded.lightning.pt", weights_only=True)
    assert list(ours) == list(ref)
    _same(ours, ref)  # the callback's best_model_score tensor in meta.pt included


def test_lightning_hparams_holding_a_class_need_consent(
    lightning_root: Path, run_cli: Any, tmp_path: Path
) -> None:
    folder, out = lightning_root / "adam.ckpt", tmp_path / "full.pt"
    res = run_cli("consolidate", folder, out, "--all")
    assert res.exit_code == 1 and "torch.optim.adam.Adam" in res.stderr
    assert "--allow-user-classes" in res.stderr and not out.exists()
    res = run_cli("consolidate", folder, out, "--all", "--allow-user-classes")
    assert res.exit_code == 0, res.stderr
    with torch.serialization.safe_globals([torch.optim.Adam]):
        ours = torch.load(out, weights_only=True)
        ref = torch.load(lightning_root / "adam.lightning.pt", weights_only=True)
    assert ours["hyper_parameters"]["opt_cls"] is torch.optim.Adam
    _same(ours, ref)


def test_a_lightning_file_whose_hparams_hold_a_class_is_resaved_for_cpu(
    lightning_root: Path, run_cli: Any, tmp_path: Path
) -> None:
    src, out = lightning_root / "gpu.ckpt", tmp_path / "cpu.ckpt"
    res = run_cli("convert", src, out)  # without consent: refused, with the remedy
    assert res.exit_code == 1 and not out.exists()
    assert "references to classes (torch.optim.adam.Adam)" in res.stderr
    assert res.stderr.rstrip().endswith("pass --allow-user-classes to write them")
    res = run_cli("convert", src, out, "--allow-user-classes", "--json")
    assert res.exit_code == 0, res.stderr
    with torch.serialization.safe_globals([torch.optim.Adam]):
        ours = torch.load(out, weights_only=True)  # every storage on the CPU: no map_location
        ref = torch.load(src, weights_only=True, map_location="cpu")
    assert ours["hyper_parameters"]["opt_cls"] is torch.optim.Adam
    _same(ours, ref)
    # item 13: the writer's --json says what torch finds in the output
    doc = json.loads(res.stdout)
    tensors = [t for t in _flat(ours)[1:] if isinstance(t, torch.Tensor)]
    assert doc["outputs"] == [str(out)] and doc["verified"] is True
    assert doc["tensors"] == len(tensors)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    assert doc["bytes"] == sum(storages.values())  # each storage once
    assert doc["storages"] == len(storages)
    # torch.load(weights_only=True) refuses it without safe_globals, as the JSON says
    assert doc["weights_only"] is False and "torch.optim.adam.Adam" in doc["unsafe_globals"]
    assert [m for m in doc["messages"] if "torch.optim.adam.Adam" in m]
    assert doc["report"][-1].startswith(f"wrote {out}: {len(tensors)} tensors")
    # the input needed a GPU
    with pytest.raises(RuntimeError, match="CUDA"), torch.serialization.safe_globals(
        [torch.optim.Adam]
    ):
        torch.load(src, weights_only=True)


# -- folders people actually have ----------------------------------------------------------------
HF_TRAINER = """
    import os, sys, torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    out = sys.argv[1]
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16)
    ids = torch.randint(0, 32, (8, 6))
    args = TrainingArguments(
        out, max_steps=4, save_steps=2, per_device_train_batch_size=2, report_to=[],
        use_cpu=True, logging_strategy="no", disable_tqdm=True,
    )
    data = [{"input_ids": r, "labels": r} for r in ids]
    Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=data).train()
"""

ACCELERATE = """
    import sys, torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    torch.manual_seed(0)
    config = ProjectConfiguration(project_dir=sys.argv[1], automatic_checkpoint_naming=True)
    accelerator = Accelerator(cpu=True, project_config=config)
    model = torch.nn.Linear(4, 3)
    model, opt = accelerator.prepare(model, torch.optim.Adam(model.parameters()))
    for _ in range(2):
        accelerator.save_state()  # checkpoints/checkpoint_0, checkpoints/checkpoint_1
"""


@pytest.mark.parametrize(
    ("module", "script", "holds", "last"),
    [
        ("transformers", HF_TRAINER, "2 checkpoints (checkpoint-2, checkpoint-4)", "checkpoint-4"),
        (
            "accelerate",
            ACCELERATE,
            "2 checkpoints (checkpoints/checkpoint_0, checkpoints/checkpoint_1)",
            "checkpoints/checkpoint_1",
        ),
    ],
)
def test_a_training_output_folder_names_what_to_pass(
    module: str, script: str, holds: str, last: str, run_cli: Any, tmp_path: Path
) -> None:
    _need(module)
    out = tmp_path / "out"
    _run_script(script, out)
    for command in (["inspect", out], ["convert", out, tmp_path / "x.pt"]):
        res = run_cli(*command)
        assert res.exit_code == 1 and not (tmp_path / "x.pt").exists()
        assert res.stderr == (
            f"Error: {out}: is a folder of {holds}, not one checkpoint: pass one of them, "
            f"e.g. {out / last}\n"
        )
    res = run_cli("inspect", out / last)  # what it says to pass opens
    assert res.exit_code == 0, res.stderr
    assert "model.safetensors" in res.stdout


def test_load_of_a_dcp_folder_is_dcp_to_torch_save(
    dcp_w2: Path, dcp_generator: tuple[Path, Path], tmp_path: Path
) -> None:
    import ckpttool
    from tests.test_dcp import torch_consolidated

    ours = ckpttool.load(dcp_w2)
    _same(ours, torch_consolidated(dcp_w2, tmp_path))
    folder, ref = dcp_generator
    with pytest.raises(ckpttool.CheckpointError, match=r"torch\._C\.Generator.*weights_only=False"):
        ckpttool.load(folder)  # torch's weights_only loader refuses a Generator
    got = ckpttool.load(folder, weights_only=False)
    assert torch.equal(got["rng"].get_state(), _load_with_generator(ref)["rng"].get_state())


# -- options that do nothing: warned, on a file saved from a real DistributedDataParallel --------
DDP = """
    import sys, tempfile, torch, torch.distributed as dist
    dist.init_process_group(
        "gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1
    )
    torch.manual_seed(0)
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 3))
    torch.save({"model": ddp.state_dict(), "epoch": 3}, sys.argv[1])
    dist.destroy_process_group()
"""


@pytest.fixture(scope="session")
def ddp_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "ddp.pt"
    _run_script(DDP, path)
    return path


def test_key_options_that_rename_nothing_are_warned(
    ddp_file: Path, run_cli: Any, tmp_path: Path
) -> None:
    out = tmp_path / "out.pt"
    # --state-dict names nothing: an error, as with a rename option (it used to write, exit 0)
    res = run_cli("convert", ddp_file, out, "--state-dict", "nosuch")
    assert res.exit_code == 1 and not out.exists()
    assert res.stderr == f"Error: {ddp_file}: no entry 'nosuch' (--state-dict)\n"
    # --state-dict without a rename option: written, with a warning
    res = run_cli("convert", ddp_file, out, "--state-dict", "model")
    assert res.exit_code == 0
    assert res.err_lines[0].startswith("warning: --state-dict names the state")
    # a prefix no key carries: written unchanged, with a warning instead of "renamed 0 keys"
    res = run_cli("convert", ddp_file, out, "--strip-prefix", "zzz.", "--force")
    assert res.exit_code == 0
    assert res.err_lines[0] == (
        "warning: --strip-prefix zzz. renamed no key of state dict 'model': "
        "no key starts with 'zzz.'"
    )
    assert list(torch.load(out)["model"]) == ["module.weight", "module.bias"]


def test_to_safetensors_warns_when_module_prefix_stays(
    ddp_file: Path, run_cli: Any, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "model.safetensors"
    res = run_cli("to-safetensors", ddp_file, out)
    assert res.exit_code == 0
    assert res.err_lines[0] == (
        "warning: every key starts with 'module.' (saved from a DataParallel/DDP wrapper): "
        "load_state_dict on an unwrapped model fails; --strip-module removes it"
    )
    with pytest.raises(RuntimeError, match="Missing key"):  # what it warns of
        torch.nn.Linear(4, 3).load_state_dict(load_file(out))
    res = run_cli("to-safetensors", ddp_file, out, "--strip-module", "--force")
    assert res.exit_code == 0 and "warning" not in res.stderr  # what it advises
    torch.nn.Linear(4, 3).load_state_dict(load_file(out))


# -- progress: the verifying phase is shown, not "writing 100%" ----------------------------------
class Phases:
    """A writer's progress factory that records its phases and the bytes fed in each."""

    def __init__(self) -> None:
        self.phases: list[list[Any]] = []  # [label, total, bytes fed]

    def __call__(self, total: int) -> Any:
        self.phases.append(["writing", total, 0])

        def feed(n: int) -> None:
            self.phases[-1][2] += n

        def phase(label: str, total: int | None = None) -> None:
            if total is None:  # back to the job's own count
                main = next(p for p in self.phases if p[0] == "writing")
                self.phases.append([label, main[1], 0])
            else:
                self.phases.append([label, total, 0])

        feed.phase = phase  # type: ignore[attr-defined]
        return feed


@pytest.mark.parametrize(
    "writer", ["convert", "to-safetensors", "consolidate-pt", "consolidate-st"]
)
def test_writers_report_the_verifying_phase(
    writer: str, ddp_file: Path, dcp_generator: tuple[Path, Path], tmp_path: Path
) -> None:
    import ckpttool
    from ckpttool.ops.consolidate import consolidate

    rec = Phases()
    if writer == "convert":
        ckpttool.convert(ddp_file, tmp_path / "o.pt", progress=rec, dtype="float16")
    elif writer == "to-safetensors":
        ckpttool.to_safetensors(ddp_file, tmp_path / "o.safetensors", progress=rec)
    else:
        out = tmp_path / ("o.pt" if writer.endswith("pt") else "o.safetensors")
        consolidate(dcp_generator[0], out, progress=rec, dtype="bfloat16")
    labels = [p[0] for p in rec.phases if p[2] or p[0] == "verifying"]
    assert labels == ["writing", "verifying"], rec.phases
    for label, total, fed in rec.phases:
        if fed:
            assert fed == total, (label, rec.phases)  # each phase ends at 100%, not before


def test_sharded_writes_alternate_writing_and_verifying(ddp_file: Path, tmp_path: Path) -> None:
    import ckpttool

    rec = Phases()
    result = ckpttool.to_safetensors(
        ddp_file, tmp_path / "shards", progress=rec, max_shard_size=50, strip_prefix="module."
    )
    assert len(result.files) == 3  # two shards and the index
    fed = [(p[0], p[2]) for p in rec.phases if p[2]]
    assert [label for label, _ in fed] == ["writing", "verifying", "writing", "verifying"]
    writing = [n for label, n in fed if label == "writing"]
    assert sum(writing) == rec.phases[0][1]  # the job's count resumes where it was


# -- what the command line says ------------------------------------------------------------------
def test_root_help_lists_every_exit_code_and_whole_summaries(run_cli: Any) -> None:
    import re

    from ckpttool.cli import cli

    res = run_cli("--help")
    codes = re.findall(r"^\s+(\d+)\s{2,}\S", res.stdout.split("Exit codes:")[1], flags=re.M)
    assert codes == ["0", "1", "2", "3", "4", "5", "6", "130"]
    commands = res.stdout.split("Commands:")[1].split("Exit codes:")[0]
    assert "..." not in commands
    flat = " ".join(commands.split())
    for name, cmd in cli.commands.items():  # each summary whole: its help's first sentence
        first = " ".join((cmd.help or "").split("\n\n")[0].split())
        assert f"{name} {first}" in flat, name


def test_a_file_of_a_dcp_folder_names_the_folder(
    dcp_generator: tuple[Path, Path], run_cli: Any, tmp_path: Path
) -> None:
    folder = dcp_generator[0]
    for name in (".metadata", "__0_0.distcp"):
        res = run_cli("consolidate", folder / name, tmp_path / "o.pt")
        assert res.exit_code == 1
        assert res.stderr == (
            f"Error: {folder / name}: is one file of a folder of shards: pass the folder, "
            f"{folder}\n"
        )


def test_counts_are_pluralised(
    dcp_generator: tuple[Path, Path], ddp_file: Path, run_cli: Any, tmp_path: Path
) -> None:
    res = run_cli("consolidate", dcp_generator[0], tmp_path / "m.pt")
    assert "from 1 rank, 2 tensors (verified)" in res.stdout  # one rank saved it
    res = run_cli("to-safetensors", ddp_file, tmp_path / "out", "--max-shard-size", "1GB")
    assert res.out_lines[-1] == f"wrote {tmp_path / 'out'}: 2 tensors in 1 shard (verified)"


def test_a_read_only_filesystem_is_said_as_such(ddp_file: Path, tmp_path: Path) -> None:
    """Before: "permission denied" (os.access fails on a read-only mount as on a locked folder)."""
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a read-only filesystem")
    ro = tmp_path / "ro"
    ro.mkdir()
    script = (
        f"mount -t tmpfs -o ro tmpfs {ro} && "
        f"exec {sys.executable} -m ckpttool convert {ddp_file} {ro / 'out.pt'}"
    )
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "mount" in proc.stderr and "ckpttool" not in proc.stderr:
        pytest.skip(f"cannot mount a read-only filesystem here: {proc.stderr.strip()}")
    assert proc.returncode == 1
    assert proc.stderr == (
        f"Error: {ro / 'out.pt'}: read-only filesystem: cannot write in {ro}\n"
    )
