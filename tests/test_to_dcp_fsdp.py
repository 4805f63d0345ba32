"""Resuming FSDP2 from a DCP folder written by ``ckpttool to-dcp``: real jobs on 2 and 4 gloo ranks.

Three sources: a ``.pt`` saved by an unsharded job (model, AdamW state numbered by parameter,
epoch), a sharded Hugging Face safetensors folder, and a DeepSpeed ZeRO-3 folder saved by 2
ranks (fp32 weights and Adam moments). Each is converted without torch; then, in every rank,
one FSDP2 job starts from the original (the full state dict set with ``set_state_dict``: the
optimizer named by torch's own ``get_optimizer_state_dict``, DeepSpeed's weights and moments as
its own ``zero_to_fp32`` merges them) and one ``dcp.load``-s the folder, and both train a few
steps: their losses and final weights must be equal, step for step, on 4 and on 2 ranks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ckpttool.ops.to_dcp import to_dcp

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.checkpoint")

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.ln = nn.LayerNorm(d)
            self.fc = nn.Linear(d, 2 * d)
            self.out = nn.Linear(2 * d, d)

        def forward(self, x):
            return x + self.out(torch.relu(self.fc(self.ln(x))))

    class GPT(nn.Module):
        vocab = 29

        def __init__(self, d=12):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(8, d))
            self.tiny = nn.Parameter(torch.randn(3, 5))  # fewer rows than ranks
            self.register_buffer("mask", torch.tril(torch.ones(8, 8)))
            self.register_buffer("counts", torch.arange(5))
            self.tok = nn.Embedding(self.vocab, d)
            self.blocks = nn.ModuleList(Block(d) for _ in range(2))
            self.head = nn.Linear(d, self.vocab, bias=False)
            self.head.weight = self.tok.weight  # tied

        def forward(self, idx):
            x = self.tok(idx) + self.pos[: idx.shape[1]] + self.tiny.sum() * self.mask[0, 0]
            for b in self.blocks:
                x = b(x)
            return self.head(x)

    class Net(nn.Module):  # tests/test_deepspeed.py's model, saved there by DeepSpeed ZeRO-3
        vocab = 37

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

    def make(kind):
        return GPT() if kind == "gpt" else Net()
    """
)

WORKER = MODELS + textwrap.dedent(
    """
    import datetime, json, sys
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict,
        set_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, ports, spec = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
    FULL = StateDictOptions(full_state_dict=True)

    def build(kind):
        torch.manual_seed(99)  # overwritten by the loaded state
        model = make(kind)
        if kind == "gpt":
            for b in model.blocks:
                fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if kind == "gpt":
            return model, torch.optim.AdamW(model.parameters(), lr=0.01)
        groups = [  # as tests/test_deepspeed.py gives them to DeepSpeed
            {"params": [model.embed.weight, model.frozen.bias], "weight_decay": 0.0},
            {"params": [model.norm.weight, model.norm.bias]},
        ]
        return model, torch.optim.AdamW(groups, lr=0.01)

    def train(model, opt, kind, steps=3):
        losses = []
        for step in range(steps):
            g = torch.Generator().manual_seed(1000 * step + rank)
            loss = model(torch.randint(0, model.vocab, (2, 6), generator=g)).float().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    def full(model):
        return {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                for k, v in get_model_state_dict(model).items()}

    def original(case):
        model, opt = build(case["kind"])
        ref = torch.load(case["ref"], weights_only=True)
        if case.get("moments"):  # DeepSpeed's own merge of the moments, at its step count
            moments = torch.load(case["moments"], weights_only=True)
            groups = get_state_dict(model, opt, options=FULL)[1]["param_groups"]
            step = torch.tensor(float(case["step"]))
            state = {name: {"step": step.clone(), **m} for name, m in moments.items()}
            ref["optim"] = {"state": state, "param_groups": groups}
        if ref.get("optim") is not None:
            set_state_dict(model, opt, model_state_dict=ref["model"],
                           optim_state_dict=ref["optim"], options=FULL)
        else:
            set_model_state_dict(model, ref["model"], options=FULL)
        return model, opt

    def resumed(case):
        model, opt = build(case["kind"])
        if case["optim"]:
            msd, osd = get_state_dict(model, opt)
            state = {case["under"]: msd, "optimizer": osd}
        else:
            msd, osd = get_model_state_dict(model), None
            state = {case["under"]: msd} if case["under"] else msd
        dcp.load(state, checkpoint_id=case["dcp"])
        if osd is not None:
            set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
        else:
            set_model_state_dict(model, msd)
        return model, opt

    for world, port in zip((4, 2), ports):  # all four ranks, then ranks 0 and 1 again
        if rank >= world:
            break
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=240),
        )
        mesh = init_device_mesh("cpu", (world,))
        results = {}
        for case in json.load(open(spec)):
            a_model, a_opt = original(case)
            b_model, b_opt = resumed(case)
            ref = torch.load(case["ref"], weights_only=True)["model"]
            loaded = {k: torch.equal(v, ref[k].to(v.dtype)) for k, v in full(b_model).items()}
            a = train(a_model, a_opt, case["kind"])
            b = train(b_model, b_opt, case["kind"])
            after = full(a_model), full(b_model)
            same = all(torch.equal(after[0][k], after[1][k]) for k in after[0])
            results[case["name"]] = {"a": a, "b": b, "loaded": loaded, "same_after": same}
        if rank == 0:
            json.dump(results, open(spec + f".w{world}.json", "w"))
        dist.barrier()
        dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(spec: Path) -> dict[int, Any]:
    """Run the jobs on 4 ranks, then on 2; {world size: results}."""
    script = spec.parent / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    ports = f"{_free_port()},{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), ports, str(spec)],
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
            raise RuntimeError(f"an FSDP2 rank failed:\n{log[-4000:]}")
    return {w: json.loads(Path(f"{spec}.w{w}.json").read_text()) for w in (2, 4)}


def _models() -> dict[str, Any]:
    ns: dict[str, Any] = {}
    exec(MODELS, ns)  # the same classes the workers use
    return ns


def _pt_source(tmp: Path, ns: dict[str, Any]) -> dict[str, Any]:
    """An unsharded job's checkpoint: model, AdamW state by parameter number, epoch."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    torch.manual_seed(0)
    model = ns["make"]("gpt")
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        model(torch.randint(0, 29, (2, 6), generator=g)).float().mean().backward()
        opt.step()
        opt.zero_grad()
    pt = tmp / "gpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 2}, pt)
    named = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    torch.save({"model": model.state_dict(), "optim": named}, tmp / "gpt.ref.pt")
    return {"src": pt, "ref": tmp / "gpt.ref.pt", "kind": "gpt", "optim": True, "under": "model"}


def _hf_source(tmp: Path, ns: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face folder: config.json and two safetensors shards with their index."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    sd = {k: v.clone() for k, v in ns["make"]("gpt").state_dict().items()}
    folder = tmp / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt"}')
    names = list(sd)
    shards = {
        "model-00001-of-00002.safetensors": names[:5],
        "model-00002-of-00002.safetensors": names[5:],
    }
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(folder / fname), metadata={"format": "pt"})
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.save({"model": sd}, tmp / "hf.ref.pt")
    return {
        "src": folder,
        "ref": tmp / "hf.ref.pt",
        "kind": "gpt",
        "optim": False,
        "under": "model",
    }


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("to_dcp_fsdp")
    ns = _models()
    sources = {"pt": _pt_source(tmp, ns), "hf": _hf_source(tmp, ns)}
    try:
        from tests.test_deepspeed import zero_folders

        zero = zero_folders(tmp_path_factory) / "zero3_fp32"  # saved by 2 ranks, at step 2
        torch.save({"model": torch.load(f"{zero}.oracle.pt", weights_only=True)}, tmp / "z.ref.pt")
        sources["zero3"] = {
            "src": zero, "ref": tmp / "z.ref.pt", "kind": "net", "optim": True, "under": "module",
            "moments": f"{zero}.moments.pt", "step": 2,
        }  # fmt: skip
    except pytest.skip.Exception:
        pass  # DeepSpeed not installed: the other sources still run
    spec = []
    for name, case in sources.items():
        out = tmp / f"{name}.dcp"
        if case["optim"]:
            to_dcp(case["src"], out)
        else:
            to_dcp(case["src"], out, under="model")
        spec.append({**case, "name": name, "src": str(case["src"]), "ref": str(case["ref"]),
                     "dcp": str(out)})  # fmt: skip
    path = tmp / "spec.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture(scope="module")
def runs(cases: Path) -> dict[int, Any]:
    return _run(cases)


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_resumes_exactly(runs: dict[int, Any], world: int) -> None:
    results = runs[world]
    expected = {"pt", "hf"} | ({"zero3"} if importlib.util.find_spec("deepspeed") else set())
    assert set(results) == expected
    for name, r in results.items():
        assert all(r["loaded"].values()), (name, [k for k, ok in r["loaded"].items() if not ok])
        assert len(r["a"]) == 3 and r["a"] == r["b"], (name, r["a"], r["b"])
        assert r["same_after"], name
