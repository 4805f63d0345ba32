"""Issue 22's casts, in process: where a cast's time goes once the interpreter has started.

Three tables:

* ns per element of each cast the writers' ``--dtype`` makes, one thread, weight-like values:
  the compiled casts (``writers/_fastcast.c``, where it was built) and numpy's kernels/tables;
* the numpy float32 -> float16 kernel on 64M elements, one thread against two, with the 32k-element
  steps a single thread is fastest with (``cast_kernels.BLOCK``) and the 128k-element steps
  ``cast_range`` uses (``cast_range.STEP``): numpy releases the GIL inside each call, so two
  threads only run at once when each call is long;
* the library's ``convert(dtype="float16")`` (a float32 checkpoint) and ``to_safetensors(
  dtype="bfloat16")`` with the cast spread over the cores (``writers/cast_range.py``), with the
  compiled casts and with numpy's, interleaved with a
  durable copy (``cp --reflink=never`` + ``sync``) of the same input; min and median of
  ``--repeat`` rounds. ``bench_clone.py`` measures the commands as a user runs them (a new
  process each time: add Python's start and the imports, about 0.15-0.2 s).

Inputs: ``--f16 FILE`` (default: the 1.4 GB float32 checkpoint ``bench_clone.py --keep``
caches) and ``--bf16 FILE`` (default: its 2 GB fp16/fp32 checkpoint).

Example::

    .venv/bin/python benchmarks/bench_cast_threads.py --repeat 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CACHE = Path("/tmp/ckpttool-bench")


def per_element_table(n: int = 1 << 25) -> str:
    import numpy as np

    from ckpttool.writers import cast_kernels as ck
    from ckpttool.writers import numeric

    x = np.random.default_rng(1).standard_normal(n, dtype=np.float32) * np.float32(0.02)
    x[::997] = 0  # zeros and float16 subnormals among them, as in real weights
    srcs = {"float32": x.view(np.uint32), "float16": x.astype(np.float16).view(np.uint16)}
    rows = ["| cast | compiled ns/element | numpy ns/element |", "|---|---:|---:|"]
    for src, dst in (("float32", "float16"), ("float32", "bfloat16"), ("float16", "bfloat16")):
        bits, cells = srcs[src], []
        out = np.empty(n, np.uint16)
        for on in (True, False):
            if on and ck._fastcast is None:
                cells.append("not built")
                continue
            before = ck.use_compiled(on)
            table = None if on else numeric.table_for(src, dst)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                with np.errstate(all="ignore"):
                    for i in range(0, n, 1 << 17):  # cast_range's pieces are 1M elements
                        ck.cast_blocks(bits[i : i + (1 << 17)], out[i : i + (1 << 17)], src,
                                       dst, numeric._cast_block, table=table)  # fmt: skip
                best = min(best, time.perf_counter() - t0)
            ck.use_compiled(before)
            cells.append(f"{best / n * 1e9:.2f}")
        rows.append(f"| {src} -> {dst} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def kernel_table(n: int = 1 << 26) -> str:
    import numpy as np

    from ckpttool.writers import cast_kernels as ck

    x = np.random.default_rng(0).standard_normal(n, dtype=np.float32) * np.float32(0.02)
    u, out = x.view(np.uint32), np.empty(n, np.uint16)

    def part(lo: int, hi: int, step: int) -> None:
        with np.errstate(all="ignore"):
            for i in range(lo, hi, step):
                ck._f32_to_f16(u[i : i + step], out[i : i + step])

    rows = ["| step (elements) | 1 thread s | 2 threads s |", "|---:|---:|---:|"]
    for step in (1 << 15, 1 << 17):
        best = {}
        for threads in (1, 2, 1, 2, 1, 2):
            parts = [threading.Thread(target=part, args=(k * n // threads,
                     (k + 1) * n // threads, step)) for k in range(threads)]  # fmt: skip
            t0 = time.perf_counter()
            for p in parts:
                p.start()
            for p in parts:
                p.join()
            took = time.perf_counter() - t0
            best[threads] = min(best.get(threads, took), took)
        rows.append(f"| {step:,} | {best[1]:.3f} | {best[2]:.3f} |")
    return "\n".join(rows)


def writer_table(path: Path, kind: str, repeat: int, work: Path) -> str:
    import ckpttool
    from ckpttool.writers import cast_kernels

    modes = {"compiled casts": True, "numpy casts": False}
    times: dict[str, list[float]] = {m: [] for m in [*modes, "durable copy"]}
    out = work / ("out.pt" if kind == "float16" else "out.safetensors")
    for _ in range(repeat):
        for mode, on in modes.items():
            if on and cast_kernels._fastcast is None:
                continue
            before = cast_kernels.use_compiled(on)
            subprocess.run(["sync"], check=True)
            t0 = time.perf_counter()
            if kind == "float16":
                ckpttool.convert(path, out, dtype="float16")
            else:
                ckpttool.to_safetensors(path, out, dtype="bfloat16")
            times[mode].append(time.perf_counter() - t0)
            cast_kernels.use_compiled(before)
            out.unlink()
        copy = work / "copy"
        subprocess.run(["sync"], check=True)
        t0 = time.perf_counter()
        subprocess.run(["sh", "-c", 'cp --reflink=never "$1" "$2" && sync "$2"', "sh",
                        str(path), str(copy)], check=True)  # fmt: skip
        times["durable copy"].append(time.perf_counter() - t0)
        copy.unlink()
    base = statistics.median(times["durable copy"])
    rows = [f"#### {path.name} ({path.stat().st_size / 1e9:.2f} GB) to {kind}", "",
            "| what | min s | median s | x copy (medians) |", "|---|---:|---:|---:|"]  # fmt: skip
    for mode, ts in times.items():
        if not ts:
            continue
        med = statistics.median(ts)
        rows.append(f"| {mode} | {min(ts):.2f} | {med:.2f} | {med / base:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--f16", type=Path, default=CACHE / "gpt_fp32_1.4GB.pt")
    ap.add_argument("--bf16", type=Path, default=CACHE / "ddp_rank0_2GB.pt")
    ap.add_argument("-n", "--repeat", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None, help="outputs (default: beside inputs)")
    args = ap.parse_args(argv)
    print("# casts in process\n\n## each cast, one thread, 32M elements\n")
    print(per_element_table())
    print("\n## the numpy float32 -> float16 kernel, 64M elements\n")
    print(kernel_table())
    for path, kind in ((args.f16, "float16"), (args.bf16, "bfloat16")):
        if not path.is_file():
            print(f"\n(skipped {path}: make it with bench_clone.py --keep)")
            continue
        folder = args.workdir or path.parent
        with tempfile.TemporaryDirectory(dir=folder) as work:
            print("\n" + writer_table(path, kind, args.repeat, Path(work)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
