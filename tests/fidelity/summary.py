"""Print the fidelity summary line: ``python -m tests.fidelity.summary [-v]``.

Runs every zoo case and every real-world file through ``ckpttool.convert`` and compares with
torch (see ``outcomes.py``); prints one line per case with ``-v``, then
``zoo: N round-trip, M refused, K wrong`` and the same for the real-world files.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter

from .outcomes import Outcome, convert_and_compare, real_world_files, zoo_outcome
from .zoo import CASES

REAL_WORLD = os.environ.get(
    "CKPTTOOL_REAL_WORLD",
    os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "real-world"),
)


def line(label: str, outcomes: list[Outcome]) -> str:
    c = Counter(o.kind for o in outcomes)
    return f"{label}: {c['round-trip']} round-trip, {c['refused']} refused, {c['wrong']} wrong"


def main(argv: list[str]) -> int:
    verbose = "-v" in argv
    with tempfile.TemporaryDirectory() as d:
        zoo_out = [zoo_outcome(name, d) for name in CASES]
        rw_out = [
            convert_and_compare(
                os.path.join(REAL_WORLD, n), os.path.join(d, n + ".out.pt"), n, real=False
            )
            for n in real_world_files(REAL_WORLD)
        ]
    if verbose:
        for o in zoo_out + rw_out:
            print(f"{o.kind:10} {o.name} {o.detail.splitlines()[0] if o.detail else ''}")
    print(line("zoo", zoo_out))
    print(line("real-world", rw_out))
    return 1 if any(o.kind == "wrong" for o in zoo_out + rw_out) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
