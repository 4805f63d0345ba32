"""Benchmark ``ckpttool inspect`` against ``torch.load`` on a big DDP checkpoint.

Rows (each a fresh process, measured whole; see ``_harness.py`` for how):

* ``cp IN OUT`` -- baseline for the "× cp" column (its first run warms the page cache),
* ``ckpttool inspect PATH`` and ``ckpttool inspect --json PATH`` (stdout to /dev/null),
* ``torch.load(PATH, map_location="cpu", weights_only=True)``,
* ``torch.load(PATH, mmap=True, map_location="cpu", weights_only=True)``,
* reference rows: ``python -c pass`` and ``python -c "import torch"`` (interpreter / torch
  import floor: a CLI that imports torch cannot meet the 0.3 s target on this machine).

``--sizes 1GB,4GB`` prints one table per size, to show that inspect does not depend on the
file size.  Targets: inspect < 0.3 s wall and < 100 MB peak RssAnon.

Example::

    .venv/bin/python benchmarks/bench_inspect.py --sizes 1GB,4GB --keep
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _harness import (
    Case,
    CaseResult,
    Inputs,
    add_common_args,
    ckpttool_argv,
    emit,
    parse_size,
    python_code_argv,
    python_env,
    run_with_args,
)

TARGET_WALL_S = 0.3
TARGET_MB = 100.0

TORCH_LOAD = (
    "import sys, torch\nck = torch.load(sys.argv[1], map_location='cpu', weights_only=True)\n"
)
TORCH_LOAD_MMAP = (
    "import sys, torch\n"
    "ck = torch.load(sys.argv[1], mmap=True, map_location='cpu', weights_only=True)\n"
)


def build_cases(path: Path, workdir: Path, *, reference: bool, torch_rows: bool) -> list[Case]:
    env = python_env()
    cp_out = workdir / f"{path.stem}.cp-out"
    cases = [
        Case(
            label="cp IN OUT",
            argv=["cp", str(path), str(cp_out)],
            outputs=[cp_out],
            baseline=True,
            warmup=1,
        ),
        Case(
            label="ckpttool inspect IN",
            argv=ckpttool_argv("inspect", str(path)),
            env=env,
            target_wall_s=TARGET_WALL_S,
            target_mb=TARGET_MB,
        ),
        Case(
            label="ckpttool inspect --json IN",
            argv=ckpttool_argv("inspect", "--json", str(path)),
            env=env,
            target_wall_s=TARGET_WALL_S,
            target_mb=TARGET_MB,
        ),
    ]
    if torch_rows:
        cases += [
            Case(
                label='torch.load(IN, map_location="cpu", weights_only=True)',
                argv=python_code_argv(TORCH_LOAD, str(path)),
                env=env,
            ),
            Case(
                label='torch.load(IN, mmap=True, map_location="cpu", weights_only=True)',
                argv=python_code_argv(TORCH_LOAD_MMAP, str(path)),
                env=env,
            ),
        ]
    if reference:
        cases += [
            Case(
                label="python -c pass",
                argv=python_code_argv("pass"),
                env=env,
                note="reference: interpreter start-up",
            ),
            Case(
                label='python -c "import torch"',
                argv=python_code_argv("import torch"),
                env=env,
                note="reference: what importing torch alone costs",
            ),
        ]
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Compare `ckpttool inspect` with torch.load (plain and mmap) on generated "
        "DDP checkpoints; prints markdown tables.",
        epilog="example: bench_inspect.py --sizes 1GB,4GB --keep",
    )
    ap.add_argument(
        "--sizes",
        default="4GB",
        help="comma-separated checkpoint sizes, e.g. 1GB,4GB (default 4GB)",
    )
    ap.add_argument("--adam", action="store_true", help="checkpoints with Adam state")
    ap.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the `python -c pass` / `import torch` reference rows",
    )
    ap.add_argument("--no-torch", action="store_true", help="skip the torch.load rows")
    add_common_args(ap)
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]

    inputs = Inputs(args.workdir, keep=args.keep, force=args.force_generate)
    sections: list[tuple[str, list[CaseResult]]] = []
    try:
        for i, size in enumerate(sizes):
            path = inputs.get(size, adam=args.adam)
            cases = build_cases(
                path,
                args.workdir,
                reference=not args.no_reference and i == len(sizes) - 1,
                torch_rows=not args.no_torch,
            )
            results = run_with_args(cases, args)
            sections.append((f"{path.name} ({path.stat().st_size / 1e9:.2f} GB)", results))
    finally:
        inputs.cleanup()
    emit("ckpttool inspect vs torch.load", sections, args.json)
    return 1 if any(r.failed for _, res in sections for r in res) else 0


if __name__ == "__main__":
    sys.exit(main())
