"""Benchmark ``ckpttool convert --strip-module`` against the naive torch recipe and ``cp``.

Rows (each a fresh process writing a new file into ``--workdir``, i.e. to the same filesystem
as the input; the output is deleted and ``sync`` called before every run, outside the timing):

* ``cp IN OUT`` -- the baseline ("× cp"); its first, discarded run warms the page cache,
* ``ckpttool convert --strip-module -q IN OUT`` and the same with ``--no-verify``,
* naive: ``torch.load(IN, map_location="cpu", weights_only=True)``, strip ``module.`` from the
  state-dict keys (``ck["model"]``, ``ck["state_dict"]`` or the top level), ``torch.save``.

Targets for ckpttool: wall ≤ 1.3× cp, peak RssAnon < 100 MB.

Example::

    .venv/bin/python benchmarks/bench_convert.py --size 4GB --adam --keep
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _harness import (
    Case,
    Inputs,
    add_common_args,
    ckpttool_argv,
    cp_cases,
    emit,
    output_exists_check,
    parse_size,
    python_code_argv,
    python_env,
    run_with_args,
)

TARGET_RATIO = 1.3
TARGET_MB = 100.0

NAIVE = """\
import sys, torch
ck = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
def strip(sd):
    p = "module."
    return type(sd)((k[len(p):] if k.startswith(p) else k, v) for k, v in sd.items())
if isinstance(ck, dict) and isinstance(ck.get("model"), dict):
    ck["model"] = strip(ck["model"])
elif isinstance(ck, dict) and isinstance(ck.get("state_dict"), dict):
    ck["state_dict"] = strip(ck["state_dict"])
else:
    ck = strip(ck)
torch.save(ck, sys.argv[2])
"""


def build_cases(path: Path, workdir: Path, *, naive: bool, extra: list[str]) -> list[Case]:
    env = python_env()
    out = workdir / f"{path.stem}.converted.pt"
    half = path.stat().st_size // 2

    def case(label: str, argv: list[str], **kw: object) -> Case:
        return Case(
            label=label,
            argv=argv,
            outputs=[out],
            env=env,
            check=output_exists_check(out, half),
            **kw,
        )  # type: ignore[arg-type]

    cases = [
        *cp_cases(path, out),
        case(
            "ckpttool convert --strip-module -q IN OUT",
            ckpttool_argv("convert", "--strip-module", "-q", *extra, str(path), str(out)),
            target_ratio=TARGET_RATIO,
            target_mb=TARGET_MB,
        ),
        case(
            "ckpttool convert --strip-module -q --no-verify IN OUT",
            ckpttool_argv(
                "convert", "--strip-module", "-q", "--no-verify", *extra, str(path), str(out)
            ),
            target_ratio=TARGET_RATIO,
            target_mb=TARGET_MB,
        ),
    ]
    if naive:
        cases.append(
            case(
                "naive: torch.load + strip module. + torch.save",
                python_code_argv(NAIVE, str(path), str(out)),
            )
        )
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Compare `ckpttool convert --strip-module` with the naive torch.load/"
        "torch.save recipe and cp on a generated DDP checkpoint; prints a markdown table.",
        epilog="example: bench_convert.py --size 4GB --adam --keep",
    )
    ap.add_argument(
        "--size", type=parse_size, default=parse_size("4GB"), help="checkpoint size (default 4GB)"
    )
    ap.add_argument("--adam", action="store_true", help="include Adam state (optimizer)")
    ap.add_argument(
        "--transposed", action="store_true", help="one layer weight saved as a transposed view"
    )
    ap.add_argument("--no-naive", action="store_true", help="skip the naive torch recipe")
    ap.add_argument(
        "--ckpttool-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument passed to `ckpttool convert` (repeatable)",
    )
    add_common_args(ap)
    args = ap.parse_args(argv)

    inputs = Inputs(args.workdir, keep=args.keep, force=args.force_generate)
    try:
        path = inputs.get(args.size, adam=args.adam, transposed=args.transposed)
        cases = build_cases(path, args.workdir, naive=not args.no_naive, extra=args.ckpttool_arg)
        results = run_with_args(cases, args)
        title = f"{path.name} ({path.stat().st_size / 1e9:.2f} GB)"
    finally:
        inputs.cleanup()
    emit(
        "ckpttool convert --strip-module vs naive torch.load/torch.save",
        [(title, results)],
        args.json,
    )
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
