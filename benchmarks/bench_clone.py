"""Issue 22 side by side: the writers on ext4 and on filesystems that share extents.

For each filesystem -- the ``--workdir`` one (ext4 on the development machine) and a loop image
formatted as XFS (``mkfs.xfs -m reflink=1``) and as btrfs, mounted for the run (needs root;
a filesystem that cannot be made or mounted is skipped with a message) -- the inputs are
copied in (``cp --reflink=never``) and these tables are measured, rows interleaved:

* the 2 GB benchmark file (DDP checkpoint with Adam state and a transposed weight):
  ``cp --reflink=never IN OUT && sync OUT`` (the durable copy: the "× cp" baseline),
  ``cp IN OUT && sync OUT`` (a clone where the filesystem can),
  ``ckpttool convert --strip-module``, ``to-dcp``, ``convert --dtype float16``,
  ``to-safetensors --dtype bfloat16``;
* a 2 GB safetensors file (as ``safetensors.torch.save_file`` writes it, keys ``module.*``):
  the durable copy and a rename, ``ckpttool to-safetensors --strip-module``;
* a DCP folder saved by one process (every tensor whole in one file, as a DCP save of a
  replicated model writes it): ``cp -r --reflink=never IN OUT && sync`` and
  ``ckpttool consolidate`` to ``.pt`` and to ``.safetensors`` (model weights);
* on the first filesystem only: ``ckpttool diff --values`` of the 2 GB file against its
  ``convert --strip-module`` output (peak private memory, the target < 100 MB).

The loop devices use direct I/O where the kernel allows it, so that an fsync on the image
reaches the disk as on a real one. Images are unmounted and deleted at the end.

Example::

    sudo .venv/bin/python benchmarks/bench_clone.py -n 3 --interleave --keep
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from _harness import (
    Case,
    CaseResult,
    Inputs,
    add_common_args,
    ckpttool_argv,
    emit,
    python_code_argv,
    python_env,
    remove_outputs,
    run_with_args,
)

SIZE = 2 * 10**9
MAKE_SAFETENSORS = """\
import sys, torch
from safetensors.torch import save_file
ck = torch.load(sys.argv[1], map_location="cpu", mmap=True, weights_only=True)
sd = {k: v for k, v in ck["model"].items() if k != "module.lm_head.weight"}  # tied: once
save_file(sd, sys.argv[2], metadata={"format": "pt"})
"""
MAKE_FP32 = """\
import sys, torch
d, vocab, layers = 1024, 50257, 24
scale = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0  # --size / 2 GB
vocab, layers = max(64, int(vocab * scale)), max(1, round(layers * scale))
def t(*shape, k=0):  # deterministic values, every one a float32 that float16 rounds
    n = torch.Size(shape).numel()
    return ((torch.arange(n, dtype=torch.float32) * 0.37 + k) % 1.7 - 0.85).reshape(shape)
sd = {"wte.weight": t(vocab, d), "wpe.weight": t(1024, d, k=1)}
for i in range(layers):
    for name, shape in (("attn.qkv.weight", (3 * d, d)), ("attn.qkv.bias", (3 * d,)),
                        ("attn.proj.weight", (d, d)), ("mlp.fc.weight", (4 * d, d)),
                        ("mlp.proj.weight", (d, 4 * d)), ("ln.weight", (d,))):
        sd[f"h.{i}.{name}"] = t(*shape, k=i)
torch.save({"model": sd, "step": 1000}, sys.argv[1])
"""
MKFS = {"xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q"]}


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


@contextlib.contextmanager
def loop_fs(kind: str, where: Path, size: int) -> Iterator[Path | None]:
    """A freshly made and mounted loop image of ``kind``; None (with a message) if impossible."""
    mnt = where / f"{kind}-mnt"
    image = where / f"{kind}.img"
    device = ""
    try:
        if os.geteuid() != 0:
            print(f"[fs] skipping {kind}: mounting a loop image needs root", file=sys.stderr)
            yield None
            return
        if shutil.which(MKFS[kind][0]) is None:
            print(f"[fs] skipping {kind}: {MKFS[kind][0]} is not installed", file=sys.stderr)
            yield None
            return
        with open(image, "wb") as f:
            f.truncate(size)
        made = _run([*MKFS[kind], str(image)])
        if made.returncode:
            print(f"[fs] skipping {kind}: {made.stderr.strip()}", file=sys.stderr)
            yield None
            return
        for args in (["--direct-io=on"], []):
            got = _run(["losetup", *args, "--find", "--show", str(image)])
            if got.returncode == 0:
                device = got.stdout.strip()
                break
        mnt.mkdir(exist_ok=True)
        mounted = _run(["mount", device, str(mnt)]) if device else None
        if mounted is None or mounted.returncode:
            why = mounted.stderr.strip() if mounted else "no loop device"
            print(f"[fs] skipping {kind}: cannot mount ({why})", file=sys.stderr)
            yield None
            return
        print(f"[fs] {kind} on {device} mounted at {mnt}", file=sys.stderr)
        yield mnt
    finally:
        if mnt.is_dir() and os.path.ismount(mnt) and _run(["umount", str(mnt)]).returncode:
            _run(["umount", "-l", str(mnt)])
        if device:
            _run(["losetup", "-d", device])
        with contextlib.suppress(OSError):
            mnt.rmdir()
        with contextlib.suppress(OSError):
            image.unlink()


def _copy_in(src: Path, folder: Path) -> Path:
    dst = folder / src.name
    if not dst.exists():
        args = ["cp", "-r", "--reflink=never", str(src), str(dst)]
        subprocess.run(args, check=True)
    return dst


def durable_copy(src: Path, out: Path, *, folder: bool = False) -> Case:
    if folder:  # fsync every file of the copy
        cmd = 'cp -r --reflink=never "$1" "$2" && find "$2" -type f -exec sync {} +'
    else:
        cmd = 'cp --reflink=never "$1" "$2" && sync "$2"'
    r = "-r " if folder else ""
    return Case(
        label=f"cp {r}--reflink=never IN OUT && sync OUT (durable copy)",
        argv=["sh", "-c", cmd, "sh", str(src), str(out)],
        outputs=[out],
        baseline=True,
        warmup=1,
    )


def clone_copy(src: Path, out: Path) -> Case:
    return Case(
        label="cp IN OUT && sync OUT (a clone where the filesystem can)",
        argv=["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", str(src), str(out)],
        outputs=[out],
    )


def ck(label: str, out: Path, *args: str, ratio: float | None = None, mb: float = 100.0) -> Case:
    return Case(
        label=label,
        argv=ckpttool_argv(*args),
        outputs=[out],
        env=python_env(),
        target_ratio=ratio,
        target_mb=mb,
    )


def pt_cases(path: Path, work: Path, clones: bool) -> list[Case]:
    out, dcp = work / "out.pt", work / "out-dcp"
    return [
        durable_copy(path, out),
        clone_copy(path, out),
        ck("ckpttool convert --strip-module -q IN OUT", out, "convert", "--strip-module", "-q",
           str(path), str(out), ratio=0.1 if clones else 1.1),
        ck("ckpttool to-dcp -q IN OUT (DCP out)", dcp, "to-dcp", "-q", str(path), str(dcp),
           ratio=1.1),
    ]  # fmt: skip


def bf16_cases(path: Path, work: Path) -> list[Case]:
    out, st = work / "out.pt", work / "out.safetensors"
    return [
        durable_copy(path, out),
        ck("ckpttool to-safetensors --dtype bfloat16 -q IN OUT", st, "to-safetensors",
           "--dtype", "bfloat16", "-q", str(path), str(st), ratio=1.2),
    ]  # fmt: skip


def f16_cases(path: Path, work: Path) -> list[Case]:
    out, half = work / "out.pt", work / "half.pt"
    return [
        durable_copy(path, out),
        ck("ckpttool convert --dtype float16 -q IN OUT", half, "convert", "--dtype", "float16",
           "-q", str(path), str(half), ratio=1.2),
    ]  # fmt: skip


def safetensors_cases(path: Path, work: Path, clones: bool) -> list[Case]:
    out = work / "renamed.safetensors"
    return [
        durable_copy(path, out),
        clone_copy(path, out),
        ck("ckpttool to-safetensors --strip-module -q IN OUT (a rename)", out, "to-safetensors",
           "--strip-module", "-q", str(path), str(out), ratio=0.1 if clones else 1.1),
    ]  # fmt: skip


def dcp_cases(folder: Path, work: Path, clones: bool) -> list[Case]:
    out_dir, pt, st = work / "dcp-copy", work / "consolidated.pt", work / "consolidated.safetensors"
    return [
        durable_copy(folder, out_dir, folder=True),
        ck("ckpttool consolidate -q IN OUT.pt (model weights)", pt, "consolidate", "-q",
           str(folder), str(pt)),
        ck("ckpttool consolidate -q IN OUT.safetensors (model weights)", st, "consolidate", "-q",
           str(folder), str(st)),
    ]  # fmt: skip


def diff_cases(path: Path, work: Path) -> list[Case]:
    """``diff --values`` against a converted copy (``ckpttool convert``: same keys and values),
    as ``bench_diff.py`` does."""
    converted = work / "converted.pt"
    if not converted.exists():
        argv = ckpttool_argv("convert", "-q", str(path), str(converted))
        subprocess.run(argv, check=True, env=python_env())
    both = ["sh", "-c", 'cat "$1" "$2" > /dev/null', "sh", str(path), str(converted)]
    return [
        Case(label="cat IN COPY > /dev/null (read both)", argv=both, baseline=True, warmup=1),
        Case(
            label="ckpttool diff --values -q IN COPY",
            argv=ckpttool_argv("diff", "--values", "-q", str(path), str(converted)),
            env=python_env(),
            target_mb=100.0,
        ),
    ]


def make_inputs(cache: Path, inputs: Inputs, size: int = SIZE) -> dict[str, Path]:
    """The inputs, generated once into ``cache``: the 2 GB benchmark file (Adam state, a
    transposed weight), the same without Adam state (2 GB of model: fp16 matrices, fp32
    vectors), a 2 GB safetensors file, a float32 GPT-like checkpoint (1.4 GB) and a DCP
    folder saved by one process (1 GB model)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_consolidate as bc

    made = {"bench": inputs.get(size, adam=True, transposed=True), "plain": inputs.get(size)}
    tag = "" if size == SIZE else f"_{size}"
    for key, name, code, arg, after in (
        ("st", f"model_2GB{tag}.safetensors", MAKE_SAFETENSORS, [str(made["plain"])], []),
        ("fp32", f"gpt_fp32_1.4GB{tag}.pt", MAKE_FP32, [], [str(size / SIZE)]),
    ):
        path = cache / name
        if not path.exists():
            print(f"[gen] {path} ...", file=sys.stderr)
            argv = python_code_argv(code, *arg, str(path), *after)
            subprocess.run(argv, check=True, env=python_env())
        made[key] = path
    made["dcp"], _ = bc.ensure_input(bc.Spec("dcp", size // 2, 1, False), cache, force=False)
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--fs", action="append", choices=["ext4", "xfs", "btrfs"], help="filesystems (default all)"
    )
    ap.add_argument("--image-size", default=16 << 30, type=int, help="bytes per loop image")
    ap.add_argument(
        "--only",
        action="append",
        metavar="TEXT",
        help="run only the tables whose title holds TEXT (repeatable), e.g. --only cast",
    )
    ap.add_argument(
        "--size", default=SIZE, type=int, help="bytes of the benchmark file (default 2 GB)"
    )
    add_common_args(ap)
    args = ap.parse_args(argv)
    wanted = args.fs or ["ext4", "xfs", "btrfs"]
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: modules compiled once
    subprocess.run(ckpttool_argv("--help"), env=python_env(), stdout=subprocess.DEVNULL)
    inputs = Inputs(args.workdir, keep=args.keep, force=args.force_generate)
    sections: list[tuple[str, list[CaseResult]]] = []
    try:
        made = make_inputs(args.workdir, inputs, args.size)
        for kind in wanted:
            with contextlib.ExitStack() as stack:
                if kind == "ext4":
                    root: Path | None = Path(tempfile.mkdtemp(dir=args.workdir, prefix="ext4-"))
                    stack.callback(shutil.rmtree, root, True)
                else:
                    root = stack.enter_context(loop_fs(kind, args.workdir, args.image_size))
                if root is None:
                    sections.append((f"{kind}: skipped (see stderr)", []))
                    continue
                sections += _measure(kind, root, made, args, first=kind == wanted[0])
    finally:
        inputs.cleanup()
    emit("issue 22: cloning writers, ext4 / XFS / btrfs", sections, args.json)
    print(side_by_side(sections, args.size))
    return 1 if any(r.failed for _, rs in sections for r in rs) else 0


# the goals, one row each: (row, start of the case's label, goal where clones / not)
GOALS = [
    ("convert --strip-module", "ckpttool convert --strip-module", "0.1x", "<= 1.1x"),
    ("safetensors rename", "ckpttool to-safetensors --strip-module", "0.1x", "<= 1.1x"),
    ("to-dcp (DCP out)", "ckpttool to-dcp", "< 1x", "1.1x"),
    ("convert --dtype float16", "ckpttool convert --dtype float16", "1.2x", "1.2x"),
    ("to-safetensors --dtype bfloat16", "ckpttool to-safetensors --dtype", "1.2x", "1.2x"),
    ("consolidate DCP -> .pt", "ckpttool consolidate -q IN OUT.pt", "< 1x", "-"),
    ("consolidate DCP -> .safetensors", "ckpttool consolidate -q IN OUT.safe", "< 1x", "-"),
]

DIFF_ROW = "diff --values, peak private memory"


def side_by_side(sections: list[tuple[str, list[CaseResult]]], size: int) -> str:
    """The issue's table: each writer's median time over the durable copy's median measured in
    the same section (interleaved with it), one column per filesystem, and the goal."""
    cells: dict[tuple[str, str], str] = {}
    kinds: list[str] = []
    for title, results in sections:
        kind = title.split(":", 1)[0]
        if kind not in kinds and results:
            kinds.append(kind)
        base = next((r for r in results if r.baseline and not r.failed), None)
        base_wall = base.wall_median if base else None
        for r in results:
            wall = r.wall_median
            if r.label.startswith("ckpttool diff --values") and r.peak_rss_anon is not None:
                cells[(DIFF_ROW, kind)] = f"{r.peak_rss_anon / 2**20:.0f} MB"
            if r.baseline or not base_wall or wall is None or r.failed:
                continue
            for row, prefix, _, _ in GOALS:
                if r.label.startswith(prefix):
                    cells[(row, kind)] = f"{wall / base_wall:.2f}x"
    head = ["x durable copy", *kinds, "goal (clones / ext4)"]
    lines = [f"### side by side: {size / 1e9:g} GB inputs, median / the durable copy's median", ""]
    lines += [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(kinds)) + "|---|",
    ]
    for row, _, clone_goal, copy_goal in [*GOALS, (DIFF_ROW, "", "< 100 MB", "< 100 MB")]:
        got = [cells.get((row, k), "-") for k in kinds]
        goal = clone_goal if clone_goal == copy_goal else f"{clone_goal} / {copy_goal}"
        lines.append("| " + " | ".join([row, *got, goal]) + " |")
    return "\n".join(lines) + "\n"


def _measure(
    kind: str, root: Path, made: dict[str, Path], args: argparse.Namespace, first: bool
) -> list[tuple[str, list[CaseResult]]]:
    clones = kind != "ext4"

    def gb(path: Path) -> str:
        return f"{path.stat().st_size / 1e9:.2f} GB"

    def on_fs(key: str) -> Path:  # inputs are copied in only for the tables that run
        return _copy_in(made[key], root)

    specs = [
        ("bench", lambda q: f"{q.name} ({gb(q)})", lambda q: pt_cases(q, root, clones)),
        ("st", lambda q: f"{q.name} ({gb(q)})", lambda q: safetensors_cases(q, root, clones)),
        ("dcp", lambda q: f"{q.name} (DCP saved by one process)",
         lambda q: dcp_cases(q, root, clones)),
        ("plain", lambda q: f"{q.name} ({gb(q)}), cast to bfloat16", lambda q: bf16_cases(q, root)),
        ("fp32", lambda q: f"{q.name} ({gb(q)}, float32), cast to float16",
         lambda q: f16_cases(q, root)),
    ]  # fmt: skip
    if first:
        specs.append(("bench", lambda q: "diff --values, 2 GB file against its converted copy",
                      lambda q: diff_cases(q, root)))  # fmt: skip
    tables = []
    for key, title, cases in specs:
        name = f"{kind}: {title(made[key])}"
        if not args.only or any(word in name for word in args.only):
            path = on_fs(key)
            tables.append((f"{kind}: {title(path)}", cases(path)))
    out: list[tuple[str, list[CaseResult]]] = []
    for title, cases in tables:
        print(f"[bench] {title}", file=sys.stderr, flush=True)
        out.append((title, run_with_args(cases, args)))
        remove_outputs([q for c in cases for q in c.outputs])
    return out


if __name__ == "__main__":
    sys.exit(main())
