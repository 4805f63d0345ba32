"""Benchmark ``ckpttool to-safetensors`` against safetensors' ``convert.py`` recipe and ``cp``.

Rows (each a fresh process writing a new file into ``--workdir``; output deleted and ``sync``
called before every run, outside the timing):

* ``cp IN OUT`` -- the baseline ("× cp"); its first, discarded run warms the page cache,
* ``ckpttool to-safetensors -q IN OUT``, and variants with ``--strip-module`` (the recipe's
  renaming) and ``--no-verify``,
* the recipe of safetensors' ``convert.py``: ``torch.load(IN, map_location="cpu",
  weights_only=True)``, take the state dict (``ck["model"]``/``ck["state_dict"]``/top level),
  strip ``module.``, drop all but one name of each shared storage the way
  ``_remove_duplicate_names`` does (keep the sorted-first name of those covering the whole
  storage; the dropped names go into the metadata as ``{dropped: kept}``), make tensors
  contiguous, ``save_file(sd, OUT, metadata={"format": "pt", ...})``.
  ``--recipe-verify`` adds a row that also does convert.py's reload-and-compare step.

Targets for ckpttool: wall ≤ 1.1× cp, peak RssAnon < 100 MB.  The input has no optimizer
state by default (safetensors holds one flat dict of tensors; ``--adam`` is allowed but then
the recipe converts only the model while ckpttool may write more -- compare "output MB").

Example::

    .venv/bin/python benchmarks/bench_safetensors.py --size 4GB --keep
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

TARGET_RATIO = 1.1
TARGET_MB = 100.0

RECIPE = """\
import sys
from collections import defaultdict
import torch
from safetensors.torch import save_file, load_file

def storage_key(t):
    return (t.device, t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())

def is_complete(t):
    s = t.untyped_storage()
    return t.data_ptr() == s.data_ptr() and t.nelement() * t.element_size() == s.nbytes()

def remove_duplicate_names(sd):
    groups = defaultdict(set)
    for k, v in sd.items():
        if v.device.type != "meta" and v.untyped_storage().nbytes() != 0:
            groups[storage_key(v)].add(k)
    to_remove = defaultdict(list)
    for shared in groups.values():
        if len(shared) < 2:
            continue
        complete = sorted(n for n in shared if is_complete(sd[n]))
        if not complete:
            raise RuntimeError(f"no name covers the whole storage among {sorted(shared)}")
        keep = complete[0]
        for name in sorted(shared):
            if name != keep:
                to_remove[keep].append(name)
    return to_remove

ck = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
if isinstance(ck, dict) and isinstance(ck.get("model"), dict):
    ck = ck["model"]
elif isinstance(ck, dict) and isinstance(ck.get("state_dict"), dict):
    ck = ck["state_dict"]
sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in ck.items()}
metadata = {"format": "pt"}
for kept, removed in remove_duplicate_names(sd).items():
    for name in removed:
        metadata.setdefault(name, kept)
        del sd[name]
sd = {k: v.contiguous() for k, v in sd.items()}
save_file(sd, sys.argv[2], metadata=metadata)
if len(sys.argv) > 3 and sys.argv[3] == "verify":
    reloaded = load_file(sys.argv[2])
    for k, v in sd.items():
        if not torch.equal(v, reloaded[k]):
            raise RuntimeError(f"The output tensors do not match for key {k}")
"""


def build_cases(
    path: Path, workdir: Path, *, recipe: bool, recipe_verify: bool, extra: list[str]
) -> list[Case]:
    env = python_env()
    out = workdir / f"{path.stem}.safetensors"
    half = path.stat().st_size // 2 if "adam" not in path.stem else 1

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
            "ckpttool to-safetensors -q IN OUT",
            ckpttool_argv("to-safetensors", "-q", *extra, str(path), str(out)),
            target_ratio=TARGET_RATIO,
            target_mb=TARGET_MB,
        ),
        case(
            "ckpttool to-safetensors -q --strip-module IN OUT",
            ckpttool_argv("to-safetensors", "-q", "--strip-module", *extra, str(path), str(out)),
            target_ratio=TARGET_RATIO,
            target_mb=TARGET_MB,
            note="same renaming as the recipe",
        ),
        case(
            "ckpttool to-safetensors -q --no-verify IN OUT",
            ckpttool_argv("to-safetensors", "-q", "--no-verify", *extra, str(path), str(out)),
            target_ratio=TARGET_RATIO,
            target_mb=TARGET_MB,
        ),
    ]
    if recipe:
        cases.append(
            case(
                "convert.py recipe: torch.load + strip + dedupe + save_file",
                python_code_argv(RECIPE, str(path), str(out)),
            )
        )
    if recipe_verify:
        cases.append(
            case(
                "convert.py recipe + reload/compare",
                python_code_argv(RECIPE, str(path), str(out), "verify"),
            )
        )
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Compare `ckpttool to-safetensors` with the safetensors convert.py recipe "
        "and cp on a generated DDP checkpoint; prints a markdown table.",
        epilog="example: bench_safetensors.py --size 4GB --keep",
    )
    ap.add_argument(
        "--size", type=parse_size, default=parse_size("4GB"), help="checkpoint size (default 4GB)"
    )
    ap.add_argument("--adam", action="store_true", help="include Adam state (optimizer)")
    ap.add_argument(
        "--transposed", action="store_true", help="one layer weight saved as a transposed view"
    )
    ap.add_argument("--no-recipe", action="store_true", help="skip the convert.py recipe")
    ap.add_argument(
        "--recipe-verify",
        action="store_true",
        help="add a recipe row that also reloads and compares, as convert.py does",
    )
    ap.add_argument(
        "--ckpttool-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument passed to `ckpttool to-safetensors` (repeatable)",
    )
    add_common_args(ap)
    args = ap.parse_args(argv)

    inputs = Inputs(args.workdir, keep=args.keep, force=args.force_generate)
    try:
        path = inputs.get(args.size, adam=args.adam, transposed=args.transposed)
        cases = build_cases(
            path,
            args.workdir,
            recipe=not args.no_recipe,
            recipe_verify=args.recipe_verify,
            extra=args.ckpttool_arg,
        )
        results = run_with_args(cases, args)
        title = f"{path.name} ({path.stat().st_size / 1e9:.2f} GB)"
    finally:
        inputs.cleanup()
    emit("ckpttool to-safetensors vs safetensors convert.py recipe", [(title, results)], args.json)
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
