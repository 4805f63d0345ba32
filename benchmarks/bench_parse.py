"""Issue 22's parse figures, side by side in one run, for the two pickles they are about.

Files (``make_parse_inputs.py``): a GPT-2 124M + AdamW training checkpoint (1.49 GB at full
size) and the 2 GB benchmark file (``make_big_checkpoint.py --size 2GB --adam --transposed``).
By default both are written with 1-element storages (``--tiny``; a few hundred KB each): the
parse cost depends on the pickle -- how many tensors, keys and tuples it holds -- not on the
tensor bytes, and the tiny files' ``data.pkl`` has the same opcodes as the full ones' (strides
are 0, one-byte integers). ``--full`` writes and measures the real-size files (3.5 GB of disk).

Rows per file, each timed ``--repeat`` times (min and median; each in a fresh process, the
in-process rows after their imports):

* ``torch.load(mmap=True, weights_only=False)``: torch's C unpickler reading ``data.pkl``
  (storages mapped, not read), torch already imported; ``weights_only=True`` (torch's
  pure-Python restricted unpickler, the default since torch 2.6) for reference;
* ckpttool's parse, ckpttool already imported: the verdict (the static walk of every pickle,
  judged) plus the read (C unpickler with recorders: the tree of the checkpoint), and each
  part alone -- what ``inspect`` does before it builds its report;
* ``python -m ckpttool inspect FILE`` wall time (a new process: interpreter, imports, parse,
  report, rendering), and ``python -c pass`` for the interpreter's own start.

Targets (issue 22): parse at or below torch's C unpickling (``weights_only=False``) of the same
pickle; ``inspect`` of the 2 GB file under 0.2 s. Timings on a busy machine are noisy: take
figures on a quiet one (``--max-load`` waits for it).

Example::

    .venv/bin/python benchmarks/bench_parse.py --repeat 9 --max-load 1.0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _harness import measured_python, python_env, wait_for_load

HERE = Path(__file__).resolve().parent

TORCH_CODE = """
import json, sys, time, torch
path, n = sys.argv[1], int(sys.argv[2])
out = {}
for label, wo in (("torch_c", False), ("torch_weights_only", True)):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        torch.load(path, mmap=True, map_location="cpu", weights_only=wo)
        times.append(time.perf_counter() - t0)
    out[label] = times
print(json.dumps(out))
"""

OURS_CODE = """
import json, sys, time
from ckpttool.readers import file_verdict, open_checkpoint
from ckpttool.unpickling import parsed
path, n = sys.argv[1], int(sys.argv[2])
out = {"parse": [], "verdict": [], "read": []}
for _ in range(n):
    parsed._PARSED.clear()  # as in a new process: nothing walked or listed yet
    parsed._DIRS.clear()
    t0 = time.perf_counter()
    open_checkpoint(path)
    t1 = time.perf_counter()
    parsed._PARSED.clear()
    parsed._DIRS.clear()
    file_verdict(path)
    t2 = time.perf_counter()
    open_checkpoint(path, _judge=False)  # the read after the verdict, as inspect does it
    t3 = time.perf_counter()
    out["parse"].append(t1 - t0)
    out["verdict"].append(t2 - t1)
    out["read"].append(t3 - t2)
print(json.dumps(out))
"""

ROWS = (
    ("torch_c", "torch.load(mmap=True, weights_only=False): C unpickler, torch imported"),
    ("torch_weights_only", "torch.load(mmap=True, weights_only=True), torch imported"),
    ("parse", "ckpttool parse (verdict + read), imported"),
    ("verdict", "  of which: the verdict (static walk, judged)"),
    ("read", "  of which: the read (C unpickler, recorders: the tree)"),
    ("inspect", "python -m ckpttool inspect FILE (wall, new process)"),
    ("pass", "python -c pass (wall, new process)"),
)


def _in_process(code: str, path: Path, n: int) -> dict[str, list[float]]:
    res = subprocess.run(
        [sys.executable, "-c", code, str(path), str(n)],
        env=python_env(),
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _walls(argv: list[str], n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(argv, env=python_env(), check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return times


def measure(path: Path, n: int, torch_rows: bool) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    if torch_rows:
        out.update(_in_process(TORCH_CODE, path, n))
    out.update(_in_process(OURS_CODE, path, n))
    python = measured_python()  # as a regular install runs: no editable-install hook
    out["inspect"] = _walls([python, "-m", "ckpttool", "inspect", str(path)], n)
    out["pass"] = _walls([python, "-c", "pass"], n)
    return out


def table(path: Path, res: dict[str, list[float]]) -> str:
    lines = [
        f"#### {path.name} ({path.stat().st_size / 1e9:.3f} GB file)",
        "",
        "| what | min ms | median ms | x torch C |",
        "|---|---:|---:|---:|",
    ]
    base = min(res["torch_c"]) if "torch_c" in res else None
    for key, label in ROWS:
        if key not in res:
            continue
        lo, med = min(res[key]) * 1e3, statistics.median(res[key]) * 1e3
        ratio = f"{min(res[key]) / base:.2f}" if base and key in ("parse", "torch_c") else ""
        lines.append(f"| {label} | {lo:.1f} | {med:.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ckpttool-bench-parse"))
    ap.add_argument("--full", action="store_true", help="real-size files (3.5 GB of disk)")
    ap.add_argument("-n", "--repeat", type=int, default=5, help="timed runs per row")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch rows")
    ap.add_argument("--max-load", type=float, default=None, help="wait for a quieter machine")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw times here")
    args = ap.parse_args(argv)
    gen = [sys.executable, str(HERE / "make_parse_inputs.py"), str(args.workdir)]
    made = subprocess.run(
        gen + ([] if args.full else ["--tiny"]),
        env=python_env(),
        check=True,
        capture_output=True,
        text=True,
    )
    paths = [Path(p) for p in made.stdout.split()]
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: modules compiled once
    subprocess.run([measured_python(), "-m", "ckpttool", "--help"], env=python_env(), check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    raw: dict[str, dict[str, list[float]]] = {}
    print(f"# ckpttool parse vs torch's unpickling ({'full' if args.full else 'tiny'} storages)")
    for path in paths:
        if args.max_load is not None:
            wait_for_load(args.max_load, 300.0)
        raw[path.name] = measure(path, args.repeat, not args.no_torch)
        print()
        print(table(path, raw[path.name]))
    if args.json is not None:
        args.json.write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
