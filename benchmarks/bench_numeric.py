"""Throughput of ckpttool's torch-free kernels (``ckpttool/writers/numeric.py``), issue 15.

Rows: each cast and a strided gather, done three ways on the same data in one process:

* **numpy** -- what the writers use (:func:`numeric.cast_bits`, :func:`numeric.iter_tensor_bytes`),
* **pure Python** -- the best stdlib-only equivalent (``struct``'s ``e`` format for float16,
  integer arithmetic over ``array('I')`` for bfloat16, an index loop for the gather), timed on
  a slice and reported per byte,
* **torch** -- ``tensor.to(dtype)`` / ``.contiguous()``, for reference (skipped without torch;
  imported only after the other rows).

A second table times :func:`numeric.cast_bits` float32 -> bfloat16 with other kernel block
sizes (``numeric._BLOCK``), to show why the block is what it is.

Input: ``--mb`` MB of normally distributed float32 (default 64; the lead's full runs use 512).
Figures are MB/s of input; best of ``--repeat`` runs.

Example::

    .venv/bin/python benchmarks/bench_numeric.py --mb 64
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from ckpttool.writers import numeric

MB = 1_000_000


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def py_f32_to_f16(data: bytes) -> bytes:
    n = len(data) // 4
    return struct.pack(f"<{n}e", *struct.unpack(f"<{n}f", data))


def py_f32_to_bf16(data: bytes) -> bytes:
    words = array("I", data)
    return array("H", [((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF for u in words]).tobytes()


def py_bf16_to_f32(data: bytes) -> bytes:
    return array("I", [h << 16 for h in array("H", data)]).tobytes()


def py_transpose(data: bytes, rows: int, cols: int) -> bytes:
    src = array("f", data)
    return array("f", [src[r * cols + c] for c in range(cols) for r in range(rows)]).tobytes()


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _table(rows: list[tuple[str, float, float | None, float | None]]) -> str:
    out = [
        "| kernel | numpy MB/s | pure Python MB/s | torch MB/s | numpy / Python |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, npy, py, tch in rows:
        ratio = f"{npy / py:,.0f}×" if py else "-"
        out.append(f"| {name} | {npy:,.0f} | {_fmt(py, 1)} | {_fmt(tch)} | {ratio} |")
    return "\n".join(out)


def _gather_case(tmp: Path, f32: np.ndarray, rows: int, cols: int) -> Path:
    """A torch zip holding one transposed float32 view, written by torch in a subprocess."""
    import subprocess

    raw = tmp / "raw.bin"
    f32[: rows * cols].tofile(raw)
    path = tmp / "t.pt"
    code = (
        "import numpy as np, torch, sys\n"
        f"a = np.fromfile({str(raw)!r}, dtype=np.float32).reshape({rows}, {cols})\n"
        f"torch.save({{'t': torch.from_numpy(a).t()}}, {str(path)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    raw.unlink()
    return path


def _torch_rates(f32: np.ndarray, rows: int, cols: int, repeat: int) -> dict[str, float]:
    """torch's MB/s for the same operations (imported only now, after the other rows)."""
    import torch

    t32 = torch.from_numpy(f32)
    tbf = t32.to(torch.bfloat16)
    t16 = t32.to(torch.float16)
    tt = torch.from_numpy(f32[: rows * cols].reshape(rows, cols)).t()
    fns: dict[str, tuple[Callable[[], object], int]] = {
        "float32 → float16": (lambda: t32.to(torch.float16), f32.nbytes),
        "float32 → bfloat16": (lambda: t32.to(torch.bfloat16), f32.nbytes),
        "bfloat16 → float32": (lambda: tbf.float(), f32.nbytes // 2),
        "float16 → bfloat16": (lambda: t16.to(torch.bfloat16), f32.nbytes // 2),
        "gather transposed": (lambda: tt.contiguous(), rows * cols * 4),
        "gather transposed + bfloat16": (
            lambda: tt.to(torch.bfloat16).contiguous(),
            rows * cols * 4,
        ),
    }
    return {name: size / best(fn, repeat) / MB for name, (fn, size) in fns.items()}


def _alternatives(u32: np.ndarray, f16: np.ndarray, repeat: int) -> str:
    """MB/s of ckpttool's kernels beside numpy's own float16 cast, ``ml_dtypes``' bfloat16
    casts (when installed) and a plain copy, and whether they give the same bits (NaN apart:
    ckpttool keeps a NaN's sign and top payload bits, the others may not)."""
    f32 = u32.view(np.float32)
    rows: list[tuple[str, Callable[[], np.ndarray], np.ndarray | None]] = [
        ("copy (memcpy), float32", lambda: f32.copy(), None),
        ("ckpttool float32 → float16", lambda: numeric.cast_bits(u32, "float32", "float16"), None),
        ("numpy astype float32 → float16", lambda: f32.astype(np.float16).view(np.uint16),
         numeric.cast_bits(u32, "float32", "float16")),
        ("ckpttool float32 → bfloat16", lambda: numeric.cast_bits(u32, "float32", "bfloat16"),
         None),
        ("ckpttool float16 → bfloat16", lambda: numeric.cast_bits(f16, "float16", "bfloat16"),
         None),
    ]  # fmt: skip
    try:
        import ml_dtypes

        bf = ml_dtypes.bfloat16
        rows += [
            ("ml_dtypes float32 → bfloat16", lambda: f32.astype(bf).view(np.uint16),
             numeric.cast_bits(u32, "float32", "bfloat16")),
            ("ml_dtypes float16 → bfloat16",
             lambda: f16.view(np.float16).astype(bf).view(np.uint16),
             numeric.cast_bits(f16, "float16", "bfloat16")),
        ]  # fmt: skip
    except ImportError:
        missing = True
    else:
        missing = False
    out = ["| cast | MB/s of input | same bits as ckpttool (NaN apart) |", "| --- | ---: | --- |"]
    for name, fn, want in rows:
        size = f16.nbytes if "float16 → bfloat16" in name else f32.nbytes
        with np.errstate(all="ignore"):
            secs = best(fn, repeat)
            same = "-"
            if want is not None:
                got = fn()
                nan = np.isnan(want.view(np.float16)) if "→ float16" in name else None
                if nan is None:
                    nan = np.isnan((want.astype(np.uint32) << 16).view(np.float32))
                same = "yes" if bool(np.all((got == want) | nan)) else "NO"
        out.append(f"| {name} | {size / secs / MB:,.0f} | {same} |")
    if missing:
        out.append("| ml_dtypes: not installed (pip install ml_dtypes) | - | - |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=64, help="float32 input size in MB")
    ap.add_argument("--py-mb", type=float, default=2, help="slice timed in pure Python")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch column")
    args = ap.parse_args()

    n = int(args.mb * MB) // 4
    f32 = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    u32 = f32.view(np.uint32)
    py_n = min(n, int(args.py_mb * MB) // 4)
    py_data = f32[:py_n].tobytes()
    bf16 = numeric.cast_bits(u32, "float32", "bfloat16")
    f16 = numeric.cast_bits(u32, "float32", "float16")
    f64 = f32.astype(np.float64).view(np.uint64)
    f8 = f16.view(np.uint8)[1::2].copy()  # float8_e5m2 is float16's top byte

    def rate(size: int, secs: float) -> float:
        return size / secs / MB

    def cast(bits: np.ndarray, src: str, dst: str) -> Callable[[], object]:
        return lambda: numeric.cast_bits(bits, src, dst)

    half = py_data[: len(py_data) // 2]
    cases: list[tuple[str, Callable[[], object], int, Callable[[], object] | None, int]] = [
        ("float32 → float16", cast(u32, "float32", "float16"), f32.nbytes,
         lambda: py_f32_to_f16(py_data), len(py_data)),
        ("float32 → bfloat16", cast(u32, "float32", "bfloat16"), f32.nbytes,
         lambda: py_f32_to_bf16(py_data), len(py_data)),
        ("bfloat16 → float32", cast(bf16, "bfloat16", "float32"), bf16.nbytes,
         lambda: py_bf16_to_f32(half), len(half)),
        ("float16 → bfloat16", cast(f16, "float16", "bfloat16"), f16.nbytes, None, 0),
        ("float64 → bfloat16", cast(f64, "float64", "bfloat16"), f64.nbytes, None, 0),
        ("float8_e5m2 → bfloat16", cast(f8, "float8_e5m2", "bfloat16"), f8.nbytes, None, 0),
    ]  # fmt: skip
    measured: list[tuple[str, float, float | None]] = []
    for name, fn, size, py_fn, py_size in cases:
        py = rate(py_size, best(py_fn, 1)) if py_fn else None
        measured.append((name, rate(size, best(fn, args.repeat)), py))

    cols = 1024
    rows = n // cols
    with tempfile.TemporaryDirectory(prefix="ckpttool-bench-numeric-") as tmp:
        from ckpttool import open_checkpoint

        path = _gather_case(Path(tmp), f32, rows, cols)
        ref = open_checkpoint(path).tensors()[0].ref
        fd = os.open(path, os.O_RDONLY)
        try:

            def gather(dtype: str | None) -> Callable[[], object]:
                return lambda: sum(len(p) for p in numeric.iter_tensor_bytes(ref, dtype, fd=fd))

            py_rows = max(1, py_n // cols)
            py_t = best(lambda: py_transpose(py_data[: py_rows * cols * 4], py_rows, cols), 1)
            size = rows * cols * 4
            measured.append(
                ("gather transposed", rate(size, best(gather(None), args.repeat)),
                 rate(py_rows * cols * 4, py_t))
            )  # fmt: skip
            measured.append(
                ("gather transposed + bfloat16",
                 rate(size, best(gather("bfloat16"), args.repeat)), None)
            )  # fmt: skip
        finally:
            os.close(fd)

    torch_rates = {} if args.no_torch else _torch_rates(f32, rows, cols, args.repeat)
    print(f"input: {f32.nbytes / MB:,.0f} MB float32 (pure Python on {py_n * 4 / MB:,.1f} MB)\n")
    print(_table([(name, npy, py, torch_rates.get(name)) for name, npy, py in measured]))

    print("\nC casts that could replace the kernels (issue 22), same input\n")
    print(_alternatives(u32, f16, args.repeat))

    print("\nfloat32 → bfloat16 by kernel block (elements)\n")
    print("| block | MB/s |\n| ---: | ---: |")
    saved = numeric._BLOCK
    try:
        for block in (1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, n):
            numeric._BLOCK = block
            secs = best(cast(u32, "float32", "bfloat16"), args.repeat)
            print(f"| {block:,} | {rate(f32.nbytes, secs):,.0f} |")
    finally:
        numeric._BLOCK = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
