"""Benchmark ``ckpttool to-dcp`` against torch's ``torch_save_to_dcp`` and a durable copy.

Rows (each a fresh process writing a new folder into ``--workdir``; output deleted and
``sync`` called before every run, outside the timing):

* ``cp IN OUT && sync OUT`` -- a durable copy of the input file: the baseline ("× cp");
* ``torch_save_to_dcp(IN, OUT)`` -- torch's own converter (``torch.load`` of the whole file,
  then ``dcp.save`` with ``no_dist=True``);
* ``ckpttool to-dcp -q IN OUT`` and ``--no-verify``.

The input is ``make_big_checkpoint.py``'s DDP checkpoint (``--layout flat``: the model state
dict alone; ``--adam``: model, AdamW state numbered by parameter, epoch), re-tagged for CPU
once with ``ckpttool convert`` (``torch.load`` of its ``cuda:0`` storages fails on a machine
without a GPU); that copy is cached beside it. Targets for ckpttool: wall ≤ 1.1× the durable
copy, peak RssAnon < 100 MB.

Example::

    .venv/bin/python benchmarks/bench_dcp_out.py --size 1GB --keep
    .venv/bin/python benchmarks/bench_dcp_out.py --size 30MB -n 1   # smoke test
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

TARGET_RATIO = 1.1
DURABLE = 'cp --reflink=never "$1" "$2" && sync "$2"'  # a real copy, never a clone
TARGET_MB = 100.0

ANCHOR = (
    "import sys, warnings\n"
    "warnings.simplefilter('ignore')\n"
    "from torch.distributed.checkpoint.format_utils import torch_save_to_dcp\n"
    "torch_save_to_dcp(sys.argv[1], sys.argv[2])\n"
)


def cpu_copy(path: Path, created: list[Path]) -> Path:
    """The input re-tagged for CPU (``ckpttool convert``), cached beside it."""
    out = path.with_name(f"{path.stem}-cpu.pt")
    if not out.is_file() or out.stat().st_mtime < path.stat().st_mtime:
        print(f"[gen] {out} ...", file=sys.stderr, flush=True)
        argv = ckpttool_argv("convert", "-q", "--force", str(path), str(out))
        subprocess.run(argv, check=True, env=python_env())
        created.append(out)
    return out


def build_cases(path: Path, workdir: Path) -> list[Case]:
    env = python_env()
    copy, out = workdir / "copy-of-input.pt", workdir / "out-dcp"

    def ck(label: str, *args: str) -> Case:
        argv = ckpttool_argv("to-dcp", "-q", *args, str(path), str(out))
        return Case(label, argv, [out], env=env, target_ratio=TARGET_RATIO, target_mb=TARGET_MB)

    return [
        Case(
            label="cp --reflink=never IN OUT && sync OUT (durable copy)",
            argv=["sh", "-c", DURABLE, "sh", str(path), str(copy)],
            outputs=[copy],
            baseline=True,
            warmup=1,
        ),
        Case(
            label="anchor: torch torch_save_to_dcp(IN, OUT)",
            argv=python_code_argv(ANCHOR, str(path), str(out)),
            outputs=[out],
            env=env,
        ),
        ck("ckpttool to-dcp -q IN OUT"),
        ck("ckpttool to-dcp -q --no-verify IN OUT", "--no-verify"),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Compare `ckpttool to-dcp` with torch_save_to_dcp and a durable copy on a "
        "generated checkpoint; prints a markdown table.",
        epilog="example: bench_dcp_out.py --size 1GB --keep",
    )
    ap.add_argument(
        "--size", type=parse_size, default=parse_size("1GB"), help="checkpoint size (default 1GB)"
    )
    ap.add_argument("--adam", action="store_true", help="model + AdamW state (nested layout)")
    add_common_args(ap)
    args = ap.parse_args(argv)
    inputs = Inputs(args.workdir, keep=args.keep, force=args.force_generate)
    made: list[Path] = []
    try:
        raw = inputs.get(args.size, adam=args.adam, layout="nested" if args.adam else "flat")
        path = cpu_copy(raw, made)
        results = run_with_args(build_cases(path, args.workdir), args)
        title = f"{path.name} ({path.stat().st_size / 1e9:.2f} GB)"
    finally:
        if not args.keep:
            remove_outputs(made)
        inputs.cleanup()
    emit("ckpttool to-dcp vs torch_save_to_dcp and a durable copy", [(title, results)], args.json)
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
