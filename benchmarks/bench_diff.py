"""Benchmark ``ckpttool diff`` (bytes only, and ``--values``) of a big checkpoint against its
converted copy, next to reading both files and the torch recipe.

The input is the generated DDP checkpoint (``make_big_checkpoint.py``); the copy is what
``ckpttool convert IN COPY`` writes (same keys and bytes, every storage re-tagged ``cpu``),
made once before the timed runs. So every row reads both files completely and ``diff`` finds
them equal (exit 0). Rows, each a fresh process:

* ``cat IN COPY > /dev/null`` -- the baseline ("× read"): reading both files once,
* ``ckpttool diff IN COPY`` -- keys, dtypes, shapes, every tensor bit for bit, entries,
* ``ckpttool diff --values IN COPY`` -- also max/mean abs diff, rel. L2, count (float64),
* torch: ``torch.load(mmap=True)`` both, ``torch.equal`` per tensor (the cheapest fair recipe;
  without ``mmap`` it would hold both files in private memory).

Target for ckpttool: peak RssAnon < 100 MB (memory near one piece, never a file).

Example::

    .venv/bin/python benchmarks/bench_diff.py --size 4GB --keep
    .venv/bin/python benchmarks/bench_diff.py --size 100MB -n 1     # smoke test
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from _harness import (
    Case,
    Inputs,
    add_common_args,
    ckpttool_argv,
    emit,
    parse_size,
    python_code_argv,
    python_env,
    remove_outputs,
    run_with_args,
)

TARGET_MB = 100.0

TORCH_RECIPE = """\
import sys, torch
a = torch.load(sys.argv[1], mmap=True, map_location="cpu", weights_only=True)
b = torch.load(sys.argv[2], mmap=True, map_location="cpu", weights_only=True)
def walk(x, y, path=""):
    if isinstance(x, torch.Tensor):
        return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(walk(x[k], y[k], f"{path}.{k}") for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(walk(u, v) for u, v in zip(x, y))
    return x == y
sys.exit(0 if walk(a, b) else 4)
"""


def build_cases(path: Path, copy: Path, *, torch_row: bool) -> list[Case]:
    env = python_env()
    cases = [
        Case(
            label="cat IN COPY > /dev/null (read both)",
            argv=["sh", "-c", 'cat "$1" "$2" > /dev/null', "sh", str(path), str(copy)],
            baseline=True,
            warmup=1,
        ),
        Case(
            label="ckpttool diff -q IN COPY",
            argv=ckpttool_argv("diff", "-q", str(path), str(copy)),
            env=env,
            target_mb=TARGET_MB,
        ),
        Case(
            label="ckpttool diff --values -q IN COPY",
            argv=ckpttool_argv("diff", "--values", "-q", str(path), str(copy)),
            env=env,
            target_mb=TARGET_MB,
        ),
    ]
    if torch_row:
        cases.append(
            Case(
                label="torch.load(mmap=True) both + torch.equal per tensor",
                argv=python_code_argv(TORCH_RECIPE, str(path), str(copy)),
                env=env,
            )
        )
    return cases


def make_copy(path: Path, copy: Path) -> None:
    """The converted copy (``ckpttool convert``), written once outside the timed runs."""
    print(f"[gen] converting {path.name} -> {copy.name} ...", file=sys.stderr, flush=True)
    argv = ckpttool_argv("convert", "-q", "--force", str(path), str(copy))
    subprocess.run(argv, check=True, env=python_env())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="`ckpttool diff` (bytes, and --values) of a generated checkpoint against "
        "its `ckpttool convert` copy, vs reading both files and a torch.load(mmap=True) "
        "recipe; prints a markdown table.",
        epilog="example: bench_diff.py --size 4GB --keep",
    )
    ap.add_argument(
        "--size", type=parse_size, default=parse_size("4GB"), help="checkpoint size (default 4GB)"
    )
    ap.add_argument("--adam", action="store_true", help="include Adam state (optimizer)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch recipe row")
    add_common_args(ap)
    args = ap.parse_args(argv)

    inputs = Inputs(args.workdir, keep=args.keep, force=args.force_generate)
    copy = args.workdir / "bench_diff.copy.pt"
    try:
        path = inputs.get(args.size, adam=args.adam)
        make_copy(path, copy)
        cases = build_cases(path, copy, torch_row=not args.no_torch)
        results = run_with_args(cases, args)
        title = f"{path.name} ({path.stat().st_size / 1e9:.2f} GB) vs its converted copy"
    finally:
        remove_outputs([copy])
        inputs.cleanup()
    emit(
        "ckpttool diff vs reading both files and torch.load(mmap=True)",
        [(title, results)],
        args.json,
    )
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
