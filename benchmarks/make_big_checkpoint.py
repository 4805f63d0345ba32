"""Generate a big DDP rank-0 training checkpoint, tagged ``cuda:0`` as a GPU save writes it.

The file is what ``torch.save`` writes on rank 0 of a DDP job::

    {
        "model": OrderedDict("module.embed.weight": ..., "module.layers.0.attn.qkv.weight": ...,
                             ..., "module.lm_head.weight": <same tensor as module.embed.weight>),
        "optimizer": {"state": {0: {"step", "exp_avg", "exp_avg_sq"}, ...},   # with --adam
                      "param_groups": [{"lr": ..., "betas": (0.9, 0.999), ..., "params": [...]}]},
        "epoch": 7,
        "global_step": 123456,
    }

(``--layout flat`` saves only the model state dict.)  Weight matrices are fp16, biases /
layer norms / position embeddings fp32; Adam moments have their parameter's dtype, ``step`` is
a 0-d fp32 tensor per parameter, as ``torch.optim.Adam`` keeps them.  Every storage is tagged
``cuda:0`` via :func:`ckpttool.testing.saved_as`.

``--size`` is the size of the whole file (with ``--adam`` the model is about a third of it).
Tensor ``k`` (in save order) holds ``f((i + s_k) mod 4093)`` at flat index ``i``, with
``f(j) = (j - 2046) / 4093`` cast to the tensor's dtype and ``s_k = 7919 k mod 4093``: cheap to
write, deterministic, and no all-zero pages.

Memory: tensors are views (``torch.frombuffer``) into a ``MAP_SHARED`` mapping of an unlinked
scratch file next to the output, so the data lives in page cache (reclaimable, file-backed),
not in the generator's anonymous memory; peak RssAnon is a few hundred MB (mostly torch)
whatever ``--size`` is.  The scratch file needs as much free disk as the checkpoint while it
is written and disappears when the generator exits.

Caching: ``NAME.params.json`` is written next to the checkpoint; a later run with the same
parameters reuses the file if it still has the recorded size (``--force`` regenerates).

This module imports only the stdlib at top level (torch is imported when generating), so the
benchmark drivers can import it for :func:`checkpoint_path` / :func:`is_cached` and run the
generation itself in a subprocess, keeping their own memory (and thus the ``ru_maxrss``
floor of the processes they measure, see ``_harness.py``) small.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _harness import format_size, parse_size, python_env, repo_root

GENERATOR_VERSION = 1
PERIOD = 4093  # prime period of the fill pattern
SEED_STEP = 7919
ALIGN = 64
DEFAULT_SIZE = "4GB"


@dataclass(frozen=True)
class Plan:
    d_model: int
    n_layers: int
    vocab: int
    ctx: int


@dataclass(frozen=True)
class Spec:
    size_bytes: int
    adam: bool = False
    layout: str = "nested"  # "nested" ({"model": ..., "optimizer": ..., "epoch": ...}) or "flat"
    # one 2-D weight saved as a transposed (non-contiguous) view, as an import from a TF/JAX
    # layout gives: writers that need dense bytes must gather it
    transposed: bool = False

    def params(self) -> dict[str, Any]:
        return {"generator_version": GENERATOR_VERSION, **asdict(self)}


# --------------------------------------------------------------------------------------
# naming and caching (stdlib only)


def checkpoint_name(spec: Spec) -> str:
    name = f"ddp_rank0_{format_size(spec.size_bytes)}"
    if spec.adam:
        name += "_adam"
    if spec.layout != "nested":
        name += f"_{spec.layout}"
    if spec.transposed:
        name += "_transposed"
    return name + ".pt"


def checkpoint_path(folder: Path, spec: Spec) -> Path:
    return Path(folder) / checkpoint_name(spec)


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".params.json")


def is_cached(path: Path, spec: Spec) -> bool:
    """True if ``path`` was generated with ``spec`` and still has the recorded size."""
    side = sidecar_path(path)
    try:
        info = json.loads(side.read_text())
        return info.get("params") == spec.params() and path.stat().st_size == info.get("file_bytes")
    except (OSError, ValueError):
        return False


def ensure_checkpoint(
    folder: Path, spec: Spec, *, force: bool = False, quiet: bool = False
) -> Path:
    """Return the path of a checkpoint for ``spec`` in ``folder``, generating it in a
    subprocess (so the caller never imports torch) unless a cached one matches."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(folder, spec)
    if not force and is_cached(path, spec):
        if not quiet:
            print(f"[gen] reusing {path} ({path.stat().st_size / 1e9:.2f} GB)", file=sys.stderr)
        return path
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        str(folder),
        "--size",
        str(spec.size_bytes),
        "--layout",
        spec.layout,
        "--force",
    ]
    if spec.adam:
        argv.append("--adam")
    if spec.transposed:
        argv.append("--transposed")
    if quiet:
        argv.append("--quiet")
    subprocess.run(argv, check=True, env=python_env(), stdout=subprocess.DEVNULL)
    if not is_cached(path, spec):
        raise RuntimeError(f"generator did not produce {path}")
    return path


# --------------------------------------------------------------------------------------
# model shape


def plan_model(model_bytes: int) -> Plan:
    """Pick transformer dimensions whose parameters take about ``model_bytes``."""
    if model_bytes >= 2 * 10**9:
        d, ctx = 2048, 2048
    elif model_bytes >= 250 * 10**6:
        d, ctx = 1024, 2048
    elif model_bytes >= 30 * 10**6:
        d, ctx = 512, 1024
    else:
        d, ctx = 128, 256
    per_layer = 24 * d * d + 52 * d  # fp16 matrices (12 d^2 elements) + fp32 vectors (13 d)
    fixed = ctx * d * 4 + 2 * d * 4  # fp32 position embedding + final layer norm
    min_vocab = 1000 if d <= 128 else 8000
    n_layers = max(1, (model_bytes - fixed - min_vocab * d * 2) // per_layer)
    vocab = (model_bytes - fixed - n_layers * per_layer) // (2 * d)
    vocab = max(min_vocab, vocab // 8 * 8)  # the fp16 embedding absorbs the remainder
    return Plan(d_model=d, n_layers=int(n_layers), vocab=int(vocab), ctx=ctx)


def param_shapes(plan: Plan) -> list[tuple[str, tuple[int, ...], str]]:
    """(name without ``module.``, shape, dtype name) of the unique parameters, in order."""
    d, f = plan.d_model, 4 * plan.d_model
    out: list[tuple[str, tuple[int, ...], str]] = [
        ("embed.weight", (plan.vocab, d), "float16"),
        ("pos_embed.weight", (plan.ctx, d), "float32"),
    ]
    for i in range(plan.n_layers):
        p = f"layers.{i}."
        out += [
            (p + "ln1.weight", (d,), "float32"),
            (p + "ln1.bias", (d,), "float32"),
            (p + "attn.qkv.weight", (3 * d, d), "float16"),
            (p + "attn.qkv.bias", (3 * d,), "float32"),
            (p + "attn.out.weight", (d, d), "float16"),
            (p + "attn.out.bias", (d,), "float32"),
            (p + "ln2.weight", (d,), "float32"),
            (p + "ln2.bias", (d,), "float32"),
            (p + "mlp.fc1.weight", (f, d), "float16"),
            (p + "mlp.fc1.bias", (f,), "float32"),
            (p + "mlp.fc2.weight", (d, f), "float16"),
            (p + "mlp.fc2.bias", (d,), "float32"),
        ]
    out += [("ln_f.weight", (d,), "float32"), ("ln_f.bias", (d,), "float32")]
    return out


# --------------------------------------------------------------------------------------
# tensor storage (torch imported lazily)


class Arena:
    """Hands out tensors that are views into one shared mapping of an unlinked scratch file.

    Every :meth:`tensor` call makes its own storage (``torch.frombuffer``), so ``torch.save``
    writes each as a separate record, like real parameters.
    """

    def __init__(self, folder: Path, nbytes: int) -> None:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".arena-", suffix=".tmp")
        try:
            os.ftruncate(fd, max(nbytes, 1))
            self._mm: mmap.mmap | None = mmap.mmap(fd, max(nbytes, 1))
        finally:
            os.close(fd)
            os.unlink(name)
        self.size = max(nbytes, 1)
        self.used = 0

    @staticmethod
    def bytes_needed(sizes: list[int]) -> int:
        return sum(-(-s // ALIGN) * ALIGN for s in sizes)

    def tensor(self, shape: tuple[int, ...], dtype: Any) -> Any:
        import torch

        numel = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        offset = -(-self.used // ALIGN) * ALIGN
        if offset + numel * itemsize > self.size:
            raise MemoryError("arena too small")
        t = torch.frombuffer(self._mm, dtype=dtype, count=numel, offset=offset)  # type: ignore[arg-type]
        self.used = offset + numel * itemsize
        return t.view(shape)


_PATTERNS: dict[Any, Any] = {}
_BLOCK = PERIOD * 2048  # elements per copy_ (multiple of PERIOD keeps the pattern continuous)


def fill(t: Any, seed: int) -> None:
    """Fill ``t`` with the documented deterministic pattern for tensor number ``seed``."""
    import torch

    pat = _PATTERNS.get(t.dtype)
    if pat is None:
        j = torch.arange(_BLOCK + PERIOD, dtype=torch.float64) % PERIOD
        pat = ((j - PERIOD // 2) / PERIOD).to(t.dtype)
        _PATTERNS[t.dtype] = pat
    flat = t.view(-1)
    s = (seed * SEED_STEP) % PERIOD
    n = flat.numel()
    for start in range(0, n, _BLOCK):
        m = min(_BLOCK, n - start)
        flat[start : start + m].copy_(pat[s : s + m])


def expected_value(seed: int, index: int) -> float:
    """Value (before the cast to the tensor's dtype) at flat ``index`` of tensor ``seed``."""
    j = (index + (seed * SEED_STEP) % PERIOD) % PERIOD
    return (j - PERIOD // 2) / PERIOD


def save_tagged(obj: object, path: Path, location: str = "cuda:0") -> None:
    """``torch.save(obj, path)`` with every storage tagged ``location``; written to a temporary
    folder and renamed, so an interrupted save never leaves a plausible file."""
    import torch

    if str(repo_root()) not in sys.path:
        sys.path.insert(0, str(repo_root()))
    from ckpttool.testing import saved_as

    # Save under the final file name (torch names the archive's top folder after it) in a
    # hidden temporary folder next to ``path``, then move it into place.
    tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=".partial-"))
    tmp = tmpdir / path.name
    try:
        with saved_as(location):
            torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
        tmpdir.rmdir()


def generate(path: Path, spec: Spec, *, quiet: bool = False) -> dict[str, Any]:
    """Write the checkpoint for ``spec`` to ``path`` (and its sidecar); return the sidecar."""
    import torch

    t0 = time.perf_counter()
    if spec.adam and spec.layout == "flat":
        raise ValueError("--adam needs --layout nested (the optimizer state is a separate entry)")
    model_bytes = spec.size_bytes // 3 if spec.adam else spec.size_bytes
    plan = plan_model(model_bytes)
    shapes = param_shapes(plan)
    dtypes = {"float16": torch.float16, "float32": torch.float32}
    sizes = [math.prod(s) * dtypes[dt].itemsize for _, s, dt in shapes]
    n_copies = 3 if spec.adam else 1  # param, exp_avg, exp_avg_sq
    arena_bytes = Arena.bytes_needed(sizes) * n_copies + (len(shapes) * ALIGN if spec.adam else 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    arena = Arena(path.parent, arena_bytes)

    seed = 0
    params: OrderedDict[str, Any] = OrderedDict()
    transposed = next(
        (n for n, s, _ in shapes if spec.transposed and len(s) == 2 and "layers." in n), None
    )
    for name, shape, dt in shapes:
        if name == transposed:  # stored as (out, in).t(): stride (1, out)
            t = arena.tensor(shape[::-1], dtypes[dt])
            fill(t, seed)
            t = t.t()
        else:
            t = arena.tensor(shape, dtypes[dt])
            fill(t, seed)
        seed += 1
        params[name] = t

    sd: OrderedDict[str, Any] = OrderedDict()
    for name, t in params.items():
        sd["module." + name] = t
    sd["module.lm_head.weight"] = params["embed.weight"]  # tied: the very same tensor

    obj: Any
    if spec.layout == "flat":
        obj = sd
    else:
        obj = {"model": sd}
        if spec.adam:
            state: dict[int, dict[str, Any]] = {}
            for index, (_, t) in enumerate(params.items()):
                step = arena.tensor((), torch.float32)
                step.fill_(1000.0)
                exp_avg = arena.tensor(tuple(t.shape), t.dtype)
                fill(exp_avg, seed)
                exp_avg_sq = arena.tensor(tuple(t.shape), t.dtype)
                fill(exp_avg_sq, seed + 1)
                seed += 2
                state[index] = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
            obj["optimizer"] = {
                "state": state,
                "param_groups": [
                    {
                        "lr": 3e-4,
                        "betas": (0.9, 0.999),
                        "eps": 1e-8,
                        "weight_decay": 0.1,
                        "amsgrad": False,
                        "maximize": False,
                        "foreach": None,
                        "capturable": False,
                        "differentiable": False,
                        "fused": None,
                        "params": list(range(len(params))),
                    }
                ],
            }
        obj["epoch"] = 7
        obj["global_step"] = 123456
    fill_s = time.perf_counter() - t0
    save_tagged(obj, path)
    info = {
        "params": spec.params(),
        "file_bytes": path.stat().st_size,
        "plan": asdict(plan),
        "n_state_dict_entries": len(sd),
        "transposed": transposed,
        "n_storages": seed + (len(params) if spec.adam else 0),
        "fill_s": round(fill_s, 2),
        "total_s": round(time.perf_counter() - t0, 2),
    }
    side = sidecar_path(path)
    tmp = side.with_name(side.name + ".partial")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, side)
    if not quiet:
        print(
            f"[gen] wrote {path}: {info['file_bytes'] / 1e9:.3f} GB, plan {asdict(plan)}, "
            f"{info['n_storages']} storages, {info['total_s']} s",
            file=sys.stderr,
        )
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=(
            "Generate a DDP rank-0 training checkpoint (module. keys, fp16/fp32, tied "
            "embedding, optional Adam state, every storage tagged cuda:0) of about --size "
            "bytes into FOLDER; prints its path. Reuses a matching cached file."
        )
    )
    ap.add_argument("folder", type=Path, help="output folder (created if missing)")
    ap.add_argument(
        "--size",
        type=parse_size,
        default=parse_size(DEFAULT_SIZE),
        help=f"whole-file size: 4GB = 4*10**9, 4GiB = 4*2**30 (default {DEFAULT_SIZE})",
    )
    ap.add_argument("--adam", action="store_true", help="add Adam state under 'optimizer'")
    ap.add_argument(
        "--layout",
        choices=["nested", "flat"],
        default="nested",
        help="nested: {'model', 'optimizer', 'epoch', ...} (default); flat: the state dict only",
    )
    ap.add_argument(
        "--transposed",
        action="store_true",
        help="save one layer weight as a transposed (non-contiguous) view",
    )
    ap.add_argument("--force", action="store_true", help="regenerate even if cached")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = ap.parse_args(argv)

    spec = Spec(
        size_bytes=args.size, adam=args.adam, layout=args.layout, transposed=args.transposed
    )
    if spec.adam and spec.layout == "flat":
        ap.error("--adam needs --layout nested")
    path = checkpoint_path(args.folder, spec)
    if not args.force and is_cached(path, spec):
        if not args.quiet:
            print(f"[gen] reusing {path}", file=sys.stderr)
    else:
        generate(path, spec, quiet=args.quiet)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
