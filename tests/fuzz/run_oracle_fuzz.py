#!/usr/bin/env python
"""Long run of the structure-aware fuzzer judged by the torch oracle (not collected by pytest).

    .venv/bin/python tests/fuzz/run_oracle_fuzz.py -n 20000 --seed 1 --out /tmp/oracle-fuzz
    .venv/bin/python tests/fuzz/run_oracle_fuzz.py -n 1000000 --minutes 10 --out /tmp/oracle-fuzz

Inputs ``--start .. --start+n-1`` of ``--seed`` (see ``tests/fuzz/oracle_fuzz.py``), in batches:
each is scanned by ckpttool in worker processes, and loaded by torch in the oracle's child
when ckpttool says ``safe``. Every divergence (ckpttool ``safe``, torch ran something outside
the allowlist) and every payload run by ckpttool itself is saved as ``<out>/<index>.bin`` with
a ``.txt`` of details; the summary counts inputs, verdicts and divergences by mutation kind.
``--observe-all`` also loads the inputs ckpttool does not call safe, and reports the dangerous
ones torch loads running only allowlisted code (false positives; not saved as failures).
Exit status: 1 when a divergence was found, 0 otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.fuzz.oracle_fuzz import Outcome, Summary, run  # noqa: E402


def _save(out: Path, o: Outcome, seed: int, why: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    x = o.input
    (out / f"{x.index}.bin").write_bytes(x.data)
    (out / f"{x.index}.txt").write_text(
        f"seed={seed} index={x.index} base={x.base} format={x.fmt} file name={x.name}\n"
        f"mutations: {x.mutations}\nsnippets: {x.snippets}\n"
        f"ckpttool: {o.verdict} {o.deciding} {o.scan_error or ''}\n"
        f"{why}\n{o.torch}\n",
        encoding="utf-8",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=2000, help="number of inputs (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first input index (to resume)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "oracle-fuzz")
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2, help="scan workers and torch children")
    ap.add_argument("--minutes", type=float, help="stop starting batches after this long")
    ap.add_argument("--observe-all", action="store_true", help="load every input with torch")
    args = ap.parse_args(argv)
    # stop cleanly (scan workers and torch children closed) on Ctrl-C, even when started in
    # the background (which ignores SIGINT), and on SIGTERM
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))

    work = Path(tempfile.mkdtemp(prefix="oracle-fuzz-work-"))
    t0 = time.monotonic()
    deadline = t0 + 60 * args.minutes if args.minutes else None
    saved = 0

    def on_batch(s: Summary, outs: list[Outcome]) -> None:
        nonlocal saved
        for o in outs:
            if o.divergence or o.ran_in_scan:
                why = o.divergence or "a marker appeared after ckpttool alone read the input"
                _save(args.out, o, args.seed, why)
                saved += 1
        print(
            f"  {s.inputs} inputs, {time.monotonic() - t0:.0f} s, {dict(s.verdicts)}, "
            f"{len(s.divergences)} divergences",
            flush=True,
        )

    print(f"seed={args.seed} inputs={args.n} start={args.start} out={args.out}", flush=True)
    try:
        summary = run(
            args.seed,
            args.n,
            work,
            start=args.start,
            batch=args.batch,
            workers=args.workers,
            observe_all=args.observe_all,
            deadline=deadline,
            on_batch=on_batch,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(summary.lines(examples=25)))
    if args.observe_all and summary.notes:
        print(f"dangerous or not safe, yet torch ran only allowlisted code: {len(summary.notes)}")
        for o in summary.notes[:15]:
            print(f"  #{o.input.index} {o.input.mutations} {o.verdict}: {(o.note or '')[:200]}")
    if saved:
        print(f"{saved} inputs saved in {args.out}/")
    return 1 if summary.divergences or summary.ran_in_scan else 0


if __name__ == "__main__":
    sys.exit(main())
