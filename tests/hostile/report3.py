"""Where ckpttool stands on issue 18's corpus, as a table (not a test).

    PYTHONPATH=. python -m tests.hostile.report3 [--all]

One line per case that does not meet its expectation (``--all``: every case): id, class,
expected verdict, the verdict ``scan`` gives, and the exit codes of ``scan``, ``convert`` and
``to-safetensors`` (``-`` where the writers are not run: safe cases).
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

from . import clirun
from .corpus3 import CASES3
from .test_corpus3 import folder_verdict


def main(argv: list[str]) -> int:
    show_all = "--all" in argv
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for c in CASES3:
            d = Path(tmp) / c.id
            d.mkdir()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                paths.append(c.build(d))
        verdicts = clirun.scan_verdicts(paths)
        commands: list[tuple[list[str], Path]] = []
        for c, p in zip(CASES3, paths, strict=True):
            commands.append((["scan", str(p)], Path(tmp)))
            if c.hostile:
                out = Path(tmp) / "_out" / c.id
                out.mkdir(parents=True)
                commands += [(["convert", str(p), str(out / "o.pt")], out)]
                commands += [(["to-safetensors", str(p), str(out / "o.st")], out)]
        runs = iter(clirun.run_many(commands))
        bad = 0
        for c, v in zip(CASES3, verdicts, strict=True):
            got = folder_verdict(v["files"]) if v["error"] is None else "raised"
            codes = [next(runs).rc]
            codes += [next(runs).rc, next(runs).rc] if c.hostile else ["-", "-"]
            ok = got in c.accepted and (codes[0] == 0) == (c.expect == "safe")
            ok = ok and all(x not in (0, None) for x in codes[1:] if x != "-")
            bad += not ok
            if show_all or not ok:
                print(f"{c.id:62} {c.cls:>2} {c.expect:>13} {got!s:>13}  {codes}")
        print(f"{bad} of {len(CASES3)} cases fall short")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
