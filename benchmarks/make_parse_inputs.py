"""Write the two checkpoints whose *pickles* issue 22's parse figures are about (torch imported).

* ``gpt2_adamw[_tiny].pt``: what a GPT-2 124M training script saves with ``torch.save``:
  ``{"model": GPT2LMHeadModel.state_dict(), "optimizer": AdamW.state_dict(), "epoch": 3,
  "global_step": 12000}`` -- 148 parameters (``transformer.wte`` ... ``ln_f``) plus the tied
  ``lm_head.weight`` (current transformers keep no ``attn.bias`` buffers in the state dict);
  AdamW state ``{step, exp_avg, exp_avg_sq}`` per parameter; one param group with torch 2's
  AdamW defaults. float32 throughout (1.49 GB at full size). Built from shapes, no download.
* ``ddp_rank0_2GB_adam_transposed[_tiny].pt``: the 2 GB benchmark file of
  ``make_big_checkpoint.py`` (``--size 2GB --adam --transposed``): same names, shapes, dtypes,
  tied embedding, optimizer state and ``cuda:0`` tags.

``--tiny`` (the default of ``bench_parse.py``): every tensor is one element expanded to its
shape (stride 0), so each storage is 1 element and the files are a few hundred KB. Parsing cost
depends on the pickle (how many tensors, keys, tuples), not on tensor bytes: the tiny file's
``data.pkl`` has the same opcodes as the full one except that strides are ``0`` (a one-byte
integer instead of a two- or four-byte one), which changes no step of any reader. Without
``--tiny`` the 2 GB file comes from ``make_big_checkpoint.py`` itself and the GPT-2 file holds
real-size zero tensors.

Usage: ``python make_parse_inputs.py FOLDER [--tiny]``; prints the two paths.
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import make_big_checkpoint as mbc


def gpt2_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """GPT2LMHeadModel (124M) parameters in ``named_parameters`` order."""
    d, vocab, ctx, n_layer = 768, 50257, 1024, 12
    out: list[tuple[str, tuple[int, ...]]] = [
        ("transformer.wte.weight", (vocab, d)),
        ("transformer.wpe.weight", (ctx, d)),
    ]
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        out += [
            (p + "ln_1.weight", (d,)),
            (p + "ln_1.bias", (d,)),
            (p + "attn.c_attn.weight", (d, 3 * d)),
            (p + "attn.c_attn.bias", (3 * d,)),
            (p + "attn.c_proj.weight", (d, d)),
            (p + "attn.c_proj.bias", (d,)),
            (p + "ln_2.weight", (d,)),
            (p + "ln_2.bias", (d,)),
            (p + "mlp.c_fc.weight", (d, 4 * d)),
            (p + "mlp.c_fc.bias", (4 * d,)),
            (p + "mlp.c_proj.weight", (4 * d, d)),
            (p + "mlp.c_proj.bias", (d,)),
        ]
    out += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    assert len(out) == 148
    return out


def _maker(tiny: bool) -> Any:
    import torch

    def make(shape: tuple[int, ...], dtype: Any = torch.float32) -> Any:
        if tiny:
            return torch.zeros(1, dtype=dtype).reshape(()).expand(shape)
        return torch.zeros(shape, dtype=dtype)

    return make


def adamw_state(params: list[Any], make: Any, step: float, **group: Any) -> dict[str, Any]:
    import torch

    state = {
        i: {
            "step": torch.tensor(step),
            "exp_avg": make(tuple(p.shape), p.dtype),
            "exp_avg_sq": make(tuple(p.shape), p.dtype),
        }
        for i, p in enumerate(params)
    }
    group = {
        "lr": 6e-4,
        "betas": (0.9, 0.95),
        "eps": 1e-8,
        "weight_decay": 0.1,
        **group,
        "amsgrad": False,
        "foreach": None,
        "maximize": False,
        "capturable": False,
        "differentiable": False,
        "fused": None,
        "params": list(range(len(params))),
    }
    return {"state": state, "param_groups": [group]}


def gpt2_adamw(path: Path, tiny: bool) -> None:
    import torch

    make = _maker(tiny)
    params = [(name, make(shape)) for name, shape in gpt2_shapes()]
    sd: OrderedDict[str, Any] = OrderedDict()
    for name, t in params:
        sd[name] = t
    sd["lm_head.weight"] = params[0][1]  # tied with wte
    obj = {
        "model": sd,
        "optimizer": adamw_state([t for _, t in params], make, 12000.0),
        "epoch": 3,
        "global_step": 12000,
    }
    torch.save(obj, path)


def big_2gb_tiny(path: Path) -> None:
    """make_big_checkpoint's ``--size 2GB --adam --transposed`` object, tiny storages."""
    import torch

    spec = mbc.Spec(size_bytes=2 * 10**9, adam=True, transposed=True)
    shapes = mbc.param_shapes(mbc.plan_model(spec.size_bytes // 3))
    make = _maker(True)
    dt = {"float16": torch.float16, "float32": torch.float32}
    transposed = next((n for n, s, _ in shapes if len(s) == 2 and "layers." in n), None)
    params: OrderedDict[str, Any] = OrderedDict()
    for name, shape, dtype in shapes:
        t = make(shape[::-1], dt[dtype]).t() if name == transposed else make(shape, dt[dtype])
        params[name] = t
    sd: OrderedDict[str, Any] = OrderedDict(("module." + n, t) for n, t in params.items())
    sd["module.lm_head.weight"] = params["embed.weight"]
    opt = adamw_state(list(params.values()), make, 1000.0, lr=3e-4, betas=(0.9, 0.999))
    obj = {"model": sd, "optimizer": opt, "epoch": 7, "global_step": 123456}
    mbc.save_tagged(obj, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--tiny", action="store_true", help="1-element storages, same pickle")
    args = ap.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    suffix = "_tiny" if args.tiny else ""
    gpt = args.folder / f"gpt2_adamw{suffix}.pt"
    if not gpt.exists():
        gpt2_adamw(gpt, args.tiny)
    spec = mbc.Spec(size_bytes=2 * 10**9, adam=True, transposed=True)
    if args.tiny:
        big = args.folder / mbc.checkpoint_name(spec).replace(".pt", "_tiny.pt")
        if not big.exists():
            big_2gb_tiny(big)
    else:
        big = mbc.ensure_checkpoint(args.folder, spec, quiet=True)
    print(gpt)
    print(big)
    return 0


if __name__ == "__main__":
    sys.exit(main())
