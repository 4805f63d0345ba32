"""Benchmark ``ckpttool consolidate`` on a folder of shards against the anchors and a copy.

Rows, in one run (``--interleave`` takes turns so that disk drift biases no row):

* ``cp -r IN OUT && sync`` -- a durable copy of the folder: the baseline ("× cp");
* the anchor of the input kind (DCP: torch's ``dcp_to_torch_save``, which loads everything;
  ZeRO-2/3: DeepSpeed's ``zero_to_fp32`` to ``.bin`` and to safetensors, model weights);
* ``ckpttool consolidate --all`` to ``.pt`` (the same content as the anchor's output),
  ``ckpttool consolidate`` (model weights) to ``.pt`` and to ``.safetensors``.

Targets for ckpttool: wall ≤ 1.5× the durable copy, peak RssAnon < 150 MB.

Input kinds are registered in :data:`INPUT_KINDS` (a generator and a function that returns the
rows): DCP and DeepSpeed ZeRO-2/3 (see ``GENERATE_ZERO``). The DCP generator writes
the folder the way ``FileSystemWriter`` does -- each item a ``torch.save`` of one chunk
(dim-0 shards in ``torch.chunk`` sizes, one per rank), appended to ``__R_0.distcp``, and
``.metadata`` a pickle of torch's own ``Metadata`` classes -- one chunk in memory at a time
(running FSDP at multi-GB sizes on this machine takes far longer than the measurement).
The small test fixtures in ``tests/test_dcp.py`` are made by real FSDP2 runs.

Example::

    .venv/bin/python benchmarks/bench_consolidate.py --model-size 2GB --interleave --keep
    .venv/bin/python benchmarks/bench_consolidate.py --model-size 30MB -n 1   # smoke test
    .venv/bin/python benchmarks/bench_consolidate.py --kind zero-2 --kind zero-3 --model-size 2GB
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _harness import (
    Case,
    add_common_args,
    ckpttool_argv,
    emit,
    parse_size,
    python_code_argv,
    python_env,
    remove_outputs,
    run_with_args,
)

TARGET_RATIO = 1.5
TARGET_MB = 150.0

# -- the DCP generator (runs in a subprocess: the harness never imports torch) -----------------
GENERATE_DCP = r"""
import io, json, os, pickle, sys, uuid
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
    TensorProperties, TensorStorageMetadata,
)

folder, model_bytes, ranks, adam = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
adam = adam == "1"
os.makedirs(folder, exist_ok=True)
small = model_bytes < 10**9
d, vocab = (1024, 8192) if small else (2048, 32768)
layer = [("attn.qkv.weight", (3 * d, d)), ("attn.qkv.bias", (3 * d,)),
         ("attn.proj.weight", (d, d)), ("attn.proj.bias", (d,)),
         ("ln1.weight", (d,)), ("ln1.bias", (d,)), ("ln2.weight", (d,)), ("ln2.bias", (d,)),
         ("mlp.fc.weight", (4 * d, d)), ("mlp.fc.bias", (4 * d,)),
         ("mlp.out.weight", (d, 4 * d)), ("mlp.out.bias", (d,))]
per_layer = sum(4 * torch.Size(s).numel() for _, s in layer)
n_layers = max(1, (model_bytes - 2 * 4 * vocab * d) // per_layer)
params = [("tok.weight", (vocab, d))]
params += [(f"blocks.{i}.{n}", s) for i in range(n_layers) for n, s in layer]
params += [("ln.weight", (d,)), ("ln.bias", (d,)), ("head.weight", (vocab, d))]

files = [open(os.path.join(folder, f"__{r}_0.distcp"), "wb") for r in range(ranks)]
sdm, planner, storage = {}, {}, {}
seed = [0]

def item(rank, fqn, offsets, data):
    f = files[rank]
    start = f.tell()
    if isinstance(data, torch.Tensor):
        torch.save(data, f)
    else:
        buf = io.BytesIO(); torch.save(data, buf); f.write(buf.getbuffer())
    index = MetadataIndex(fqn, offsets) if offsets is not None else MetadataIndex(fqn)
    storage[index] = _StorageInfo(f"__{rank}_0.distcp", start, f.tell() - start)

def tensor(fqn, path, shape, sharded=True):
    n0 = shape[0] if shape else 1
    step = -(-n0 // ranks)
    chunks = []
    for r in range(ranks if sharded and shape else 1):
        lo, hi = min(r * step, n0), min((r + 1) * step, n0)
        if hi <= lo and shape:
            continue
        sizes = (hi - lo, *shape[1:]) if shape else ()
        offs = (lo,) + (0,) * (len(shape) - 1) if shape else ()
        seed[0] += 1
        t = torch.arange(torch.Size(sizes).numel(), dtype=torch.float32).reshape(sizes)
        item(r, fqn, offs, t.add_(seed[0]))
        chunks.append(ChunkStorageMetadata(torch.Size(offs), torch.Size(sizes)))
    props = TensorProperties(dtype=torch.float32)
    sdm[fqn] = TensorStorageMetadata(props, torch.Size(shape), chunks)
    planner[fqn] = path

for name, shape in params:
    tensor(f"model.{name}", ("model", name), shape)
if adam:
    for name, shape in params:
        for state in ("exp_avg", "exp_avg_sq"):
            tensor(f"optim.state.{name}.{state}", ("optim", "state", name, state), shape)
        tensor(f"optim.state.{name}.step", ("optim", "state", name, "step"), (), sharded=False)
    for key, value in (("lr", 1e-4), ("betas", (0.9, 0.95)), ("eps", 1e-8),
                       ("weight_decay", 0.1), ("params", [n for n, _ in params])):
        fqn = f"optim.param_groups.0.{key}"
        item(0, fqn, None, value)
        sdm[fqn] = BytesStorageMetadata()
        planner[fqn] = ("optim", "param_groups", 0, key)
item(0, "step", None, 1000)
sdm["step"] = BytesStorageMetadata()
planner["step"] = ("step",)
for f in files:
    f.close()
md = Metadata(state_dict_metadata=sdm, planner_data=planner, storage_data=storage,
              storage_meta=StorageMeta(checkpoint_id=folder, save_id=str(uuid.uuid4())),
              version="1.0.0")
with open(os.path.join(folder, ".metadata"), "wb") as f:
    pickle.dump(md, f)
json.dump({"layers": int(n_layers), "params": len(params)}, sys.stdout)
"""

ANCHOR_DCP = (
    "import sys\n"
    "from torch.distributed.checkpoint.format_utils import dcp_to_torch_save\n"
    "dcp_to_torch_save(sys.argv[1], sys.argv[2])\n"
)


@dataclass(frozen=True)
class Spec:
    kind: str
    model_bytes: int
    ranks: int
    adam: bool

    @property
    def name(self) -> str:
        adam = "-adam" if self.adam else ""
        return f"{self.kind}-{self.model_bytes // 10**6}MB-{self.ranks}r{adam}"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def generate_dcp(spec: Spec, folder: Path) -> None:
    argv = python_code_argv(
        GENERATE_DCP, str(folder), str(spec.model_bytes), str(spec.ranks), "1" if spec.adam else "0"
    )
    subprocess.run(argv, check=True, env=python_env(), stdout=subprocess.DEVNULL)


def dcp_cases(folder: Path, workdir: Path) -> list[Case]:
    """The anchor and ckpttool rows for a DCP folder (the copy row is added by the caller)."""
    env = python_env()
    out_pt, out_all, out_st, anchor = (
        workdir / "consolidated.pt",
        workdir / "consolidated-all.pt",
        workdir / "consolidated.safetensors",
        workdir / "dcp_to_torch_save.pt",
    )

    def ck(label: str, out: Path, *args: str) -> Case:
        return Case(
            label=label,
            argv=ckpttool_argv("consolidate", "-q", *args, str(folder), str(out)),
            outputs=[out],
            env=env,
            target_ratio=TARGET_RATIO,
            target_mb=TARGET_MB,
        )

    return [
        Case(
            label="anchor: torch dcp_to_torch_save (everything)",
            argv=python_code_argv(ANCHOR_DCP, str(folder), str(anchor)),
            outputs=[anchor],
            env=env,
        ),
        ck("ckpttool consolidate --all IN OUT.pt (everything)", out_all, "--all"),
        ck("ckpttool consolidate IN OUT.pt (model weights)", out_pt),
        ck("ckpttool consolidate IN OUT.safetensors (model weights)", out_st),
    ]


# -- DeepSpeed ZeRO-2/3 (generator and rows; the anchor is DeepSpeed's zero_to_fp32) -----------
# Writes the folder the way DeepSpeed's engine saves a bf16 run (one param group of weights, one
# of biases/norms; each group's flat fp32 vector padded to a multiple of 2 * ranks, ZeRO-2 cut in
# rank partitions, ZeRO-3 per param in ceil(numel / ranks) pieces), with DeepSpeed's own classes
# in the pickles, one rank file in memory at a time. Real DeepSpeed runs at multi-GB sizes do
# not fit this machine; the small fixtures in tests/test_deepspeed.py are made by real runs.
GENERATE_ZERO = r"""
import json, math, os, sys
from collections import OrderedDict
import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

folder = sys.argv[1]
model_bytes, ranks, stage = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tag = os.path.join(folder, "global_step1000")
os.makedirs(tag, exist_ok=True)
with open(os.path.join(folder, "latest"), "w") as f:
    f.write("global_step1000")
d, vocab = (1024, 8192) if model_bytes < 10**9 else (2048, 32768)
layer = [("attn.qkv.weight", (3 * d, d)), ("attn.qkv.bias", (3 * d,)),
         ("attn.proj.weight", (d, d)), ("attn.proj.bias", (d,)),
         ("ln1.weight", (d,)), ("ln1.bias", (d,)), ("ln2.weight", (d,)), ("ln2.bias", (d,)),
         ("mlp.fc.weight", (4 * d, d)), ("mlp.fc.bias", (4 * d,)),
         ("mlp.out.weight", (d, 4 * d)), ("mlp.out.bias", (d,))]
per_layer = sum(4 * math.prod(s) for _, s in layer)
n_layers = max(1, (model_bytes - 4 * vocab * d) // per_layer)
params = [("tok.weight", (vocab, d))]
params += [(f"blocks.{i}.{n}", s) for i in range(n_layers) for n, s in layer]
params += [("ln.weight", (d,)), ("ln.bias", (d,))]
groups = [[p for p in params if len(p[1]) > 1], [p for p in params if len(p[1]) == 1]]
shapes = [OrderedDict((n, torch.Size(s)) for n, s in g) for g in groups]
numels = [[math.prod(s) for _, s in g] for g in groups]

def values(n, seed):
    return torch.arange(n, dtype=torch.float32).mul_(1e-7).add_(seed)

common = {"ds_config": {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
                        "zero_optimization": {"stage": stage}}, "ds_version": "0.19.8"}
# no tied head: zero_to_fp32's safetensors output refuses tensors that share memory
model = {"buffer_names": ["rope.inv_freq"], "param_shapes": shapes, "shared_params": {},
         "frozen_param_shapes": OrderedDict(),
         "frozen_param_fragments": OrderedDict(), "optimizer": None, "lr_scheduler": None,
         "global_steps": 1000, "global_samples": 1000 * ranks, "dp_world_size": ranks,
         "mp_world_size": 1, **common}
buffers = OrderedDict([("rope.inv_freq", torch.linspace(0, 1, d // 2))])
for r in range(ranks):
    if stage <= 2:
        parts, state, maps = [], {}, []
        for g, n in enumerate(numels):
            total = sum(n)
            size = -(-total // (2 * ranks)) * 2 * ranks // ranks
            lo, hi = r * size, min((r + 1) * size, total)
            parts.append(values(max(hi - lo, 0), g + 1))
            state[g] = {"step": torch.tensor(1000.0), "exp_avg": torch.zeros(size),
                        "exp_avg_sq": torch.zeros(size)}
            maps.append(OrderedDict([(groups[g][0][0], fragment_address(numel=1, start=0))]))
        osd = {"loss_scaler": LossScaler(1.0), "dynamic_loss_scale": False, "overflow": False,
               "clip_grad": 1.0, "base_optimizer_state": {"state": state, "param_groups": [
                   {"lr": 1e-4, "params": [g]} for g in state]},
               "single_partition_of_fp32_groups": parts, "zero_stage": ZeroStageEnum(stage),
               "group_paddings": [0] * len(parts), "partition_count": [ranks] * len(parts),
               "ds_version": "0.19.8", "param_slice_mappings": maps}
    else:
        per = [sum(-(-k // ranks) for k in n) for n in numels]
        parts = [values(p, g + 1) for g, p in enumerate(per)]
        state = {g: {"step": torch.tensor(1000.0), "exp_avg": torch.zeros(p),
                     "exp_avg_sq": torch.zeros(p)} for g, p in enumerate(per)}
        osd = {"zero_stage": ZeroStageEnum(stage), "loss_scaler": LossScaler(1.0),
               "dynamic_loss_scale": False, "overflow": False, "partition_count": ranks,
               "optimizer_state_dict": {"state": state, "param_groups": [
                   {"lr": 1e-4, "params": [g]} for g in state]}, "fp32_flat_groups": parts}
    torch.save({"optimizer_state_dict": osd, **common},
               os.path.join(tag, f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
    del parts, state, osd
    if stage == 3:
        module = OrderedDict(buffers)
        module.update((n, torch.empty(0, dtype=torch.bfloat16)) for n, _ in params)
        torch.save({"module": module, **model},
                   os.path.join(tag, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"))
if stage <= 2:
    module = OrderedDict(buffers)
    module.update((n, torch.zeros(s, dtype=torch.bfloat16)) for n, s in params)
    torch.save({"module": module, **model}, os.path.join(tag, "mp_rank_00_model_states.pt"))
json.dump({"layers": int(n_layers), "params": len(params)}, sys.stdout)
"""

ANCHOR_ZERO = (
    "import sys\n"
    "from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict\n"
    "convert_zero_checkpoint_to_fp32_state_dict(sys.argv[1], sys.argv[2], "
    "safe_serialization=sys.argv[3] == 'st', max_shard_size=None)\n"
)


def generate_zero(spec: Spec, folder: Path) -> None:
    stage = spec.kind.split("-")[1]
    sizes = (str(spec.model_bytes), str(spec.ranks), stage)
    argv = python_code_argv(GENERATE_ZERO, str(folder), *sizes)
    env = {**python_env(), "DS_ACCELERATOR": "cpu"}
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)


def zero_cases(folder: Path, workdir: Path) -> list[Case]:
    """DeepSpeed's zero_to_fp32 (.pt / safetensors) and ckpttool rows for a ZeRO folder."""
    env = {**python_env(), "DS_ACCELERATOR": "cpu"}
    rows = []
    for fmt, suffix in (("pt", "bin"), ("st", "safetensors")):
        out = workdir / f"zero_to_fp32-{fmt}"
        rows.append(
            Case(
                label=f"anchor: DeepSpeed zero_to_fp32 (model weights, {suffix})",
                argv=python_code_argv(ANCHOR_ZERO, str(folder), str(out), fmt),
                outputs=[out],
                env=env,
            )
        )
    for label, out in (
        ("ckpttool consolidate IN OUT.pt (model weights)", workdir / "consolidated.pt"),
        ("ckpttool consolidate IN OUT.safetensors (model weights)", workdir / "c.safetensors"),
    ):
        argv = ckpttool_argv("consolidate", "-q", str(folder), str(out))
        rows.append(Case(label, argv, [out], env=env, target_ratio=TARGET_RATIO,
                         target_mb=TARGET_MB))
    return rows


# kind -> (generator, rows)
INPUT_KINDS: dict[str, tuple[Callable[[Spec, Path], None], Callable[[Path, Path], list[Case]]]] = {
    "dcp": (generate_dcp, dcp_cases),
    "zero-2": (generate_zero, zero_cases),
    "zero-3": (generate_zero, zero_cases),
}


def writer_cases(folder: Path, workdir: Path, writers: list[int], shard: str) -> list[Case]:
    """``consolidate --max-shard-size`` by 1 process and under ``torchrun`` with N ranks (each
    rank writes its share of the shards; the outputs are byte-identical)."""
    env = {**python_env(), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    rows = []
    for n in writers:
        out = workdir / f"shards-{n}"
        args = ("consolidate", "-q", str(folder), str(out), "--max-shard-size", shard)
        argv = ckpttool_argv(*args)
        if n > 1:
            launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n)]
            argv = [*launch, "--master-port", "29533", "-m", "ckpttool", *args]
        label = f"ckpttool consolidate IN OUT/ --max-shard-size {shard} ({n} writer(s))"
        rows.append(Case(label, argv, [out], env=env))
    return rows


def copy_case(folder: Path, workdir: Path) -> Case:
    out = workdir / "copy-of-input"
    return Case(
        label="cp -r IN OUT && sync (durable copy)",
        argv=["sh", "-c", 'cp -r "$1" "$2" && sync', "sh", str(folder), str(out)],
        outputs=[out],
        baseline=True,
        warmup=1,
    )


def ensure_input(spec: Spec, workdir: Path, *, force: bool) -> tuple[Path, bool]:
    """The generated folder (reused when its sidecar matches); (path, made now)."""
    folder = workdir / spec.name
    sidecar = workdir / f"{spec.name}.json"
    want = json.dumps(spec.__dict__, sort_keys=True)
    if not force and folder.is_dir() and sidecar.is_file() and sidecar.read_text() == want:
        return folder, False
    remove_outputs([folder, sidecar])
    print(f"[gen] generating {folder} ...", file=sys.stderr, flush=True)
    INPUT_KINDS[spec.kind][0](spec, folder)
    sidecar.write_text(want)
    return folder, True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Compare `ckpttool consolidate` with the anchors and a durable copy on a "
        "generated folder of shards; prints a markdown table.",
        epilog="example: bench_consolidate.py --model-size 2GB --interleave --keep",
    )
    ap.add_argument(
        "--kind", choices=sorted(INPUT_KINDS), action="append", help="input kind (repeatable)"
    )
    ap.add_argument(
        "--model-size", type=parse_size, default=parse_size("2GB"), help="fp32 model bytes"
    )
    ap.add_argument("--ranks", type=int, default=4, help="ranks (shard files), default 4")
    ap.add_argument("--no-adam", action="store_true", help="no AdamW state")
    ap.add_argument(
        "--writers",
        default="",
        help="also time sharded output by 1 and N torchrun ranks, e.g. 1,2 (model weights)",
    )
    ap.add_argument("--writer-shard-size", default="200MB", help="shard size for --writers")
    add_common_args(ap)
    args = ap.parse_args(argv)
    kinds = list(dict.fromkeys(args.kind or ["dcp"]))
    args.workdir.mkdir(parents=True, exist_ok=True)
    sections = []
    made: list[Path] = []
    failed = False
    try:
        for kind in kinds:
            spec = Spec(kind, args.model_size, args.ranks, not args.no_adam)
            folder, new = ensure_input(spec, args.workdir, force=args.force_generate)
            if new:
                made += [folder, args.workdir / f"{spec.name}.json"]
            cases = [copy_case(folder, args.workdir), *INPUT_KINDS[kind][1](folder, args.workdir)]
            if args.writers:
                writers = [int(n) for n in args.writers.split(",")]
                shard = args.writer_shard_size
                cases = [cases[0], *writer_cases(folder, args.workdir, writers, shard)]
            results = run_with_args(cases, args)
            failed |= any(r.failed for r in results)
            size = folder_bytes(folder)
            sections.append((f"{spec.name} ({size / 1e9:.2f} GB folder)", results))
    finally:
        if not args.keep:
            remove_outputs(made)
    emit("ckpttool consolidate vs anchors and a durable copy", sections, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
