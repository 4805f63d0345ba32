"""ckpttool's verdict against torch's behaviour, on every file we have (issue 18).

For each fixture, fidelity-zoo output, hostile-corpus case (rounds 1 to 3), DCP folder and
real-world checkpoint, ``scan`` gives ckpttool's verdict and the torch oracle (a child process
that runs ``torch.load(weights_only=False)`` / ``dcp_to_torch_save`` / ``np.load`` with a
recording unpickler, a call tracer and an audit hook) gives what torch did:

* ``safe`` must mean torch resolved and called only allowlisted globals, made no suspicious
  audit event and wrote no marker;
* ``dangerous`` must mean torch did one of those things, unless torch failed before reaching
  the globals ckpttool names (accepted, reported as a note at the end of the run).

The whole set is built, scanned and loaded once per session (torch imported once per warm
child, one fork per input, records cached by content in pytest's cache folder).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from . import fileset, judge
from .conftest import REPORT
from .torch_oracle import Observation, Oracle

pytest.importorskip("torch")

UNITS = fileset.ids()
TIMEOUT = 20.0  # seconds per input; the resource bombs hit torch's own limits well before

Results = dict[fileset.Unit, "list[tuple[judge.Unit, Observation]] | str"]


class Comparison:
    """Builds, scans and loads one source's units at a time, on first use (so ``-k`` selecting
    one source pays for that source only), through one pool of warm children."""

    def __init__(self, root: Path, cache: Path | None) -> None:
        self.root = root
        self.results: Results = {}
        self.done: set[str] = set()
        self.oracle = Oracle(workers=2, cache_dir=cache, cache_root=root)

    def get(self, unit: fileset.Unit) -> list[tuple[judge.Unit, Observation]] | str:
        source = unit[0]
        if source not in self.done:
            self._run(source)
            self.done.add(source)
        return self.results.get(unit, "not built")

    def _run(self, source: str) -> None:
        built = fileset.build_all(self.root / source, source)
        pending: list[tuple[fileset.Unit, judge.Unit]] = []
        sys_paths: list[tuple[str, ...]] = []
        for unit, b in built.items():
            if isinstance(b, str):
                self.results[unit] = b
                continue
            try:
                scanned = judge.ckpttool_units(b.path, b.kind)
            except Exception as exc:  # scan must not raise: that is a failure of its own
                self.results[unit] = f"scan raised {type(exc).__name__}: {exc}"
                continue
            self.results[unit] = []
            pending += [(unit, u) for u in scanned]
            sys_paths += [b.sys_path] * len(scanned)
        obs = self.oracle.observe_many(
            [u.path for _, u in pending],
            timeout=TIMEOUT,
            kinds=[u.kind for _, u in pending],
            sys_paths=sys_paths,
        )
        for (unit, u), ob in zip(pending, obs, strict=True):
            entry = self.results[unit]
            assert isinstance(entry, list)
            entry.append((u, ob))


@pytest.fixture(scope="session")
def comparison(tmp_path_factory: pytest.TempPathFactory, pytestconfig: Any) -> Iterator[Comparison]:
    # files built in a folder that stays put (their bytes embed their markers' paths), so
    # that the oracle's records, cached by content, serve the next session too
    cached = pytestconfig.cache is not None and not os.environ.get("CKPTTOOL_ORACLE_NO_CACHE")
    if cached:
        root = pytestconfig.cache.mkdir("torch-oracle-files")
        cache = pytestconfig.cache.mkdir("torch-oracle")
    else:
        root, cache = tmp_path_factory.mktemp("oracle-files"), None
    c = Comparison(root, cache)
    yield c
    c.oracle.close()


def _record(source: str, uid: str, u: judge.Unit, ob: Observation, div: str | None) -> None:
    REPORT["units"].append(
        {
            "unit": f"{source}/{uid}",
            "path": u.path,
            "verdict": u.verdict,
            "deciding": u.deciding,
            "torch": ob.describe(),
            "unvetted": ob.unvetted(),
            "divergence": div,
        }
    )


@pytest.mark.parametrize(("source", "uid"), UNITS, ids=[f"{s}/{i}" for s, i in UNITS])
def test_verdict_agrees_with_torch(comparison: Comparison, source: str, uid: str) -> None:
    res = comparison.get((source, uid))
    if isinstance(res, str):
        pytest.fail(f"{source}/{uid}: {res}")
    problems = []
    for u, ob in res:
        div, note = judge.check(u, ob)
        _record(source, uid, u, ob, div)
        if note:
            REPORT["notes"].append(f"{source}/{uid} ({Path(u.path).name}): {note}")
        if div:
            REPORT["divergences"].append(f"{source}/{uid}: {div}")
            problems.append(f"{u.path}: {div}")
    assert not problems, "\n".join(problems)


def test_real_world_files_are_there() -> None:
    """Visible skip when the real-world folder is absent (its units are then not generated)."""
    if not fileset.REAL_WORLD_RECORDS:
        pytest.skip(fileset.REAL_WORLD_REASON)
    assert any(s == "real-world" for s, _ in UNITS)
