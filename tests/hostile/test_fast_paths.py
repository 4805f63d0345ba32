"""The parse fast paths against the reference, on every hostile and benign file we have.

* The verdict's walk runs the common opcodes inline (``opscan._run``); the reference walk
  (``opscan._run_reference``) sends every opcode through its handler. Both must give the same
  verdict and the same walks (globals and their uses, calls, mutations, BUILDs, findings,
  errors, where each pickle stops) on the hostile corpora (rounds 1-3), the committed
  fixtures, the fuzzer's structured bases and the inputs it found (its regression set).
* Reading a pickle the verdict's walk parsed whole skips the bounded ``pickletools`` pre-pass
  (``unpickling/parsed.py``): the tree read that way, or the error, must be the one read
  with the pre-pass.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpttool.analysis import report
from ckpttool.errors import CheckpointError
from ckpttool.readers import open_checkpoint
from ckpttool.readers.dcp import item_ranges
from ckpttool.unpickling import opscan, scan
from ckpttool.unpickling.discover import checkpoint_files, scan_file
from ckpttool.unpickling.opvalues import PickleWalk, Value

from ..oracle.fileset import Built, build_all

SOURCES = ("fixtures", "corpus", "corpus2", "corpus3")
_MAX_RECORDS = 500
_MAX_TREE_OPS = 100_000


def _value(v: Value | None, depth: int = 0) -> Any:
    """A comparable picture of a symbolic value (bounded: memo makes graphs, even cycles)."""
    if v is None:
        return None
    if depth > 3:
        return v.kind
    parts: list[Any] = [v.kind, v.text, v.num, v.gref.full if v.gref else None]
    if v.items is not None:
        parts.append([_value(i, depth + 1) for i in v.items])
    if v.entries is not None:
        parts.append([(_value(k, depth + 1), _value(x, depth + 1)) for k, x in v.entries[:50]])
    if v.origin is not None:
        parts.append((v.origin.op, v.origin.pos, _value(v.origin.callee, depth + 1)))
    if v.attrs is not None:
        parts.append(sorted((k, _value(x, depth + 1)) for k, x in v.attrs.items()))
    return parts


def _walk(w: PickleWalk) -> Any:
    n = _MAX_RECORDS  # a 200k-deep bomb has 200k mutations: their count and the first ones
    return (
        (w.start, w.end, w.error, w.crashed, w.straddle, w.frame_end, w.protocol, w.ops),
        [(g.full, g.opcode, g.pos, sorted(g.uses)) for g in w.globals],
        [(c.op, c.pos, _value(c.callee), _value(c.args)) for c in w.calls[:n]],
        [(op, _value(t)) for op, t in w.mutated[:n]],
        [(_value(t), _value(s)) for t, s in w.built[:n]],
        (len(w.calls), len(w.mutated), len(w.built)),
        list(w.findings),
        _value(w.value),
    )


def _scan(path: Path, run: Callable[..., None], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The verdict of ``path`` and a picture of every walk behind it, walked with ``run``."""
    walks: list[PickleWalk] = []
    real = opscan.walk

    def recording(*args: Any, **kwargs: Any) -> PickleWalk:
        w = real(*args, **kwargs)
        walks.append(w)
        return w

    with monkeypatch.context() as m:
        m.setattr(opscan, "walk", recording)
        m.setattr(opscan, "_run", run)
        try:
            verdict: Any = scan_file(str(path), dcp_items=item_ranges)
        except OSError as exc:
            verdict = f"OSError {exc.errno}"
    return verdict, [_walk(w) for w in walks]  # after judging: the policy adds uses


def _tree(path: Path) -> Any:
    try:
        ckpt = open_checkpoint(path, _allow_index=False)
    except CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}"
    return json.loads(json.dumps(report.build(ckpt), default=repr))


def _files(built: Built | str) -> Iterator[Path]:
    if isinstance(built, str):  # the builder failed (its own tests report it)
        return
    p = built.path
    if p.is_dir():
        yield from (Path(f) for f in checkpoint_files(str(p)))
    elif p.is_file():
        yield p


def _tree_without_skip(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, bool]:
    """The tree read with the pre-pass run on every pickle, and whether the pre-pass parsed
    them all: ``pickletools`` is stricter than CPython (``INT 0x1``, ``STACK_GLOBAL`` of
    protocol-0 strings), so where it stops early the skip rightly reads what torch reads."""
    stopped: list[bool] = []
    real = scan._scan

    def recording(f: Any, end: int) -> tuple[str | None, int | None]:
        bomb, stop = real(f, end)
        stopped.append(bomb is not None or stop is not None)
        return bomb, stop

    with monkeypatch.context() as m:
        m.setattr(scan, "was_parsed", lambda data: False)
        m.setattr(scan, "_scan", recording)
        tree = _tree(path)
    return tree, not any(stopped)


def _check(paths: list[Path], monkeypatch: pytest.MonkeyPatch) -> tuple[int, list[str]]:
    bad: list[str] = []
    for path in paths:
        fast = _scan(path, opscan._run, monkeypatch)
        reference = _scan(path, opscan._run_reference, monkeypatch)
        if fast != reference:
            bad.append(f"{path}: walk differs from the reference walk")
        if sum(w[0][-1] for w in fast[1]) > _MAX_TREE_OPS:
            continue  # a 200k-deep bomb: refused as too deep either way, and slow to read twice
        tree = _tree(path)
        plain, comparable = _tree_without_skip(path, monkeypatch)
        if comparable and plain != tree:
            bad.append(f"{path}: the tree differs when the pre-pass is not skipped")
    return len(paths), bad


@pytest.mark.parametrize("source", SOURCES)
def test_fast_walk_and_tree_match_the_reference(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    units = build_all(tmp_path, source)
    paths = [f for b in units.values() for f in _files(b)]
    assert paths, f"no {source} files were built"
    checked, bad = _check(paths, monkeypatch)
    assert checked >= len(units) // 2  # most cases are one file each
    assert not bad, "\n".join(bad)


def test_fast_walk_matches_on_the_fuzzers_bases_and_finds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ..fuzz.bases import structured_bases
    from ..fuzz.oracle_fuzz import generate
    from ..fuzz.test_fuzz_regressions import FOUND

    bases = structured_bases(tmp_path / "bases")
    paths = []
    for name, _fmt, data in bases:
        paths.append(tmp_path / f"base-{name}")
        paths[-1].write_bytes(data)
    for seed, index in FOUND:
        x = generate(seed, index, bases, str(tmp_path / "PWNED"))
        paths.append(tmp_path / f"found-{seed}-{index}-{x.name}")
        paths[-1].write_bytes(x.data)
    checked, bad = _check(paths, monkeypatch)
    assert checked == len(bases) + len(FOUND)
    assert not bad, "\n".join(bad)


def test_the_differential_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fast path that forgets what a call was given is caught."""
    path = Path(__file__).resolve().parents[2] / "fixtures" / "malicious.pt"

    def forgetful(m: Any) -> None:
        opscan._run_reference(m)
        m.res.calls.clear()

    assert _scan(path, forgetful, monkeypatch) != _scan(path, opscan._run, monkeypatch)
