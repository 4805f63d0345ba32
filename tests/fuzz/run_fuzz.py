#!/usr/bin/env python
"""Standalone long fuzz run (not collected by pytest: the name has no ``test_`` prefix).

    .venv/bin/python tests/fuzz/run_fuzz.py -n 20000 --seed 1 --out /tmp/fuzz-failures

Generates ``-n`` mutated inputs (see ``mutate.py``) from valid bases, reproducibly from
``--seed``. In-process mode (the default when ``open_checkpoint`` is importable from
``ckpttool`` or ``ckpttool.readers``) opens each input with ``open_checkpoint(path)``, then
builds the inspect report (``ckpttool.analysis.report.build``) when that exists; the only allowed
exception is ``CheckpointError``, anything else (or > ``--timeout`` s, or the marker file
appearing) is a failure. ``--mode subprocess`` runs the real CLI and checks the contract
instead (slower). Each failure is saved as ``<out>/<n>-<kind>.bin`` with a ``.txt``
holding the details and the mutation that produced it; the summary counts outcomes.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import multiprocessing
import os
import random
import resource
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[1])]  # tests/ and the repo root

from fuzz.bases import make_bases, marker_paths  # noqa: E402
from fuzz.mutate import Mutation, mutate, random_mutation  # noqa: E402
from hostile import contract as C  # noqa: E402

_STATE: dict = {}


def _find_api():
    import importlib

    opener = None
    for mod in ("ckpttool", "ckpttool.readers"):
        try:
            opener = getattr(importlib.import_module(mod), "open_checkpoint", None)
        except ImportError:
            continue
        if opener:
            break
    try:
        from ckpttool.errors import CheckpointError
    except ImportError:
        CheckpointError = getattr(importlib.import_module("ckpttool"), "CheckpointError", None)
    try:
        from ckpttool.analysis.report import build as build_report
    except ImportError:
        build_report = None
    return opener, CheckpointError, build_report


def _timeout(signum, frame):
    raise TimeoutError("input took too long")


def _init_worker(bases: list[bytes], seed: int, timeout: float, rlimit_gb: float) -> None:
    # a fresh (spawned) interpreter: only ckpttool is imported here, never torch
    if rlimit_gb:
        lim = int(rlimit_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    _STATE.update(
        bases=bases,
        seed=seed,
        timeout=timeout,
        api=_find_api(),
        work=Path(tempfile.mkdtemp(prefix="ckpt-fuzz-w")),
    )
    signal.signal(signal.SIGALRM, _timeout)


def case_mutation(seed: int, i: int, n_bases: int) -> Mutation:
    return random_mutation(random.Random(f"{seed}:{i}"), n_bases)


def _run_inproc(i: int) -> tuple[int, str, str]:
    bases = _STATE["bases"]
    opener, cerr, build_report = _STATE["api"]
    data = mutate(case_mutation(_STATE["seed"], i, len(bases)), bases)
    p = _STATE["work"] / f"in-{i}.bin"
    p.write_bytes(data)
    signal.setitimer(signal.ITIMER_REAL, _STATE["timeout"])
    try:
        ckpt = opener(str(p))
        if build_report is not None:
            rep = build_report(ckpt)
            danger = [g for g in rep.get("globals", []) if g.get("kind") == "dangerous"]
            return i, "dangerous" if danger else "ok", ""
        return i, "ok", ""
    except Exception as e:
        if cerr is not None and isinstance(e, cerr):
            return i, "error", ""
        return i, "FAIL-" + type(e).__name__, traceback.format_exc(limit=12)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        p.unlink(missing_ok=True)


def _run_subprocess(args, i: int, bases: list[bytes], work: Path) -> tuple[int, str, str]:
    data = mutate(case_mutation(args.seed, i, len(bases)), bases)
    d = work / f"w{i}"
    d.mkdir()
    p = d / "model.bin"
    p.write_bytes(data)
    res = C.run_tool(C.tool_argv(p), cwd=d, env=C.tool_env())
    p.unlink()
    d.rmdir()
    problems = C.check_generic(res)
    if problems:
        return i, "FAIL-contract", "; ".join(problems) + "\n" + res.describe()
    return i, {0: "ok", 1: "error", 3: "dangerous"}[res.rc], ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=5000, help="number of inputs (default 5000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first input index (to resume)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 4)
    ap.add_argument("--mode", choices=("auto", "inproc", "subprocess"), default="auto")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per input")
    ap.add_argument("--rlimit-gb", type=float, default=2.0, help="in-process RLIMIT_AS")
    ap.add_argument(
        "--out", type=Path, default=Path(tempfile.gettempdir()) / "ckpttool-fuzz-failures"
    )
    ap.add_argument("--replay", type=int, help="only write input number N to --out and exit")
    args = ap.parse_args(argv)

    base_dir = Path(tempfile.mkdtemp(prefix="ckpt-fuzz-bases-"))
    bases = make_bases(base_dir)
    markers = marker_paths(base_dir)
    n_bases = len(bases)
    if args.replay is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        m = case_mutation(args.seed, args.replay, n_bases)
        (args.out / f"{args.replay}.bin").write_bytes(mutate(m, bases))
        print(m)
        return 0

    mode = args.mode
    if mode == "auto":
        mode = "inproc" if _find_api()[0] is not None else "subprocess"
    if mode == "subprocess" and not C.cli_available():
        print("no ckpttool CLI and no open_checkpoint: nothing to fuzz", file=sys.stderr)
        return 2
    print(f"mode={mode} inputs={args.n} seed={args.seed} bases={n_bases} jobs={args.jobs}")

    counts: collections.Counter[str] = collections.Counter()
    failures: list[tuple[int, str, str]] = []
    t0 = time.monotonic()
    idx = range(args.start, args.start + args.n)
    if mode == "inproc":
        pool = cf.ProcessPoolExecutor(
            args.jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(bases, args.seed, args.timeout, args.rlimit_gb),
        )
        results = pool.map(_run_inproc, idx, chunksize=32)
    else:
        work = Path(tempfile.mkdtemp(prefix="ckpt-fuzz-sub-"))
        pool = cf.ThreadPoolExecutor(args.jobs)
        results = pool.map(lambda i: _run_subprocess(args, i, bases, work), idx)
    done = 0
    try:
        for i, status, detail in results:
            done += 1
            counts[status] += 1
            if status.startswith("FAIL"):
                failures.append((i, status, detail))
            if done % 1000 == 0:
                print(f"  {done} inputs, {time.monotonic() - t0:.0f}s, {dict(counts)}", flush=True)
    except cf.process.BrokenProcessPool:
        counts["FAIL-worker-crashed"] += 1
        failures.append((args.start + done, "FAIL-worker-crashed", "a worker process died"))
    finally:
        pool.shutdown(cancel_futures=True)

    for mk in markers:
        if mk.exists():
            failures.append((-1, "FAIL-MARKER", f"marker file created: {mk}"))

    if failures:
        args.out.mkdir(parents=True, exist_ok=True)
        for i, status, detail in failures[:200]:
            if i >= 0:
                m = case_mutation(args.seed, i, n_bases)
                (args.out / f"{i}-{status}.bin").write_bytes(mutate(m, bases))
                detail = f"seed={args.seed} index={i}\n{m!r}\n\n{detail}"
            (args.out / f"{max(i, 0)}-{status}.txt").write_text(detail)

    took = time.monotonic() - t0
    print(f"ran {done} inputs in {took:.1f}s ({done / max(took, 1e-9):.0f}/s): {dict(counts)}")
    kinds = collections.Counter(s for _, s, _ in failures)
    if failures:
        print(f"{len(failures)} FAILURES {dict(kinds)}; reproducers in {args.out}/")
        for i, status, detail in failures[:10]:
            last = detail.strip().splitlines()[-1] if detail.strip() else ""
            print(f"  #{i} {status}: {last[:160]}")
    else:
        print("no failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
