"""The CLI contract on the hostile corpus: ``python -m ckpttool inspect <file>``.

Each case runs the real command line in a subprocess (1 GiB address space, 20 s hard
timeout, cwd = the test's tmp dir, a canary module importable via PYTHONPATH) and checks:

* exit code: ok -> 0, error -> 1, dangerous -> 3 (``also_ok`` widens it for a few cases);
* on a non-zero exit stderr is exactly one line, starting with ``ERROR_PREFIX``
  (``DANGEROUS_PREFIX`` for exit 3) and naming the input file; never a Traceback;
* the payload marker never appears and nothing is written anywhere under the tmp dir
  (input folder, cwd, canary site);
* stdout < 1 MB and the run takes < 10 s.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from . import contract as C
from .corpus import CASES, DANGEROUS, ERROR, EXIT_CODES, OK, Case, install_canary, marker_path

pytestmark = pytest.mark.skipif(
    not C.cli_available(), reason="ckpttool CLI (ckpttool/__main__.py) not there yet"
)

RC_TO_EXPECT = {v: k for k, v in EXIT_CODES.items()}


def _run(case: Case, tmp_path: Path, *extra: str) -> tuple[C.Result, Path, list[str]]:
    case_dir = tmp_path / "case_dir"
    case_dir.mkdir()
    site = tmp_path / "canary_site"
    marker = marker_path(case_dir)
    install_canary(site, marker)
    path = case.build(case_dir)
    before = C.listing(tmp_path)
    res = C.run_tool(
        C.tool_argv(path, *extra), cwd=tmp_path, env=C.tool_env(site), drop_dac=case.drop_dac
    )
    after = C.listing(tmp_path)
    problems = C.check_generic(res, marker=marker)
    if after != before:
        added = sorted(set(after) - set(before))
        changed = sorted(k for k in before if k in after and after[k] != before[k])
        removed = sorted(set(before) - set(after))
        problems.append(f"filesystem changed: added={added} changed={changed} removed={removed}")
    return res, path, problems


def _ids(cases):
    return [c.id for c in cases]


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_contract(case: Case, tmp_path: Path) -> None:
    res, path, problems = _run(case, tmp_path)

    allowed = {EXIT_CODES[e] for e in case.allowed}
    if res.rc not in allowed:
        got = RC_TO_EXPECT.get(res.rc, res.rc)
        problems.append(f"exit {res.rc} ({got}), want {sorted(allowed)} ({'/'.join(case.allowed)})")

    if res.rc in (C.EXIT_ERROR, C.EXIT_DANGEROUS, C.EXIT_UNPROVEN):
        line = res.err.rstrip("\n")
        prefix = C.DANGEROUS_PREFIX if res.rc == C.EXIT_DANGEROUS else C.ERROR_PREFIX
        if not line.startswith(prefix):
            problems.append(f"stderr does not start with {prefix!r}")
        if case.check_name and path.name not in line:
            problems.append(f"stderr does not name the input {path.name!r}")
    for s in case.stderr_contains:
        if s.lower() not in res.err.lower():
            problems.append(f"stderr lacks {s!r}")
    for s in case.forbid_in_output:
        if s.encode() in res.stdout or s.encode() in res.stderr:
            problems.append(f"raw {s!r} in the output (must be escaped)")

    assert not problems, f"[{case.id}] " + "; ".join(problems) + "\n" + res.describe()


JSON_CASES = [c for c in CASES if c.expect in (OK, DANGEROUS)]


@pytest.mark.parametrize("case", JSON_CASES, ids=_ids(JSON_CASES))
def test_contract_json(case: Case, tmp_path: Path) -> None:
    res, _path, problems = _run(case, tmp_path, "--json")
    allowed = {EXIT_CODES[e] for e in case.allowed}
    if res.rc not in allowed:
        problems.append(f"exit {res.rc}, want {sorted(allowed)}")
    if res.rc in (C.EXIT_OK, C.EXIT_DANGEROUS):
        try:
            json.loads(res.stdout)
        except ValueError as e:
            problems.append(f"stdout is not JSON: {e}")
    for s in case.forbid_in_output:
        if s.encode() in res.stdout:
            problems.append(f"raw {s!r} in the JSON output")
    assert not problems, f"[{case.id}] " + "; ".join(problems) + "\n" + res.describe()


def test_corpus_covers_all_outcomes() -> None:
    kinds = {c.expect for c in CASES}
    assert kinds == {OK, ERROR, DANGEROUS}


def test_unreadable_really_is(tmp_path: Path) -> None:
    """The unreadable_file case is only meaningful if the tool really cannot read it."""
    p = tmp_path / "secret"
    p.write_bytes(b"x")
    p.chmod(0)
    res = C.run_tool(
        [sys.executable, "-c", f"open({str(p)!r}).read()"],
        cwd=tmp_path,
        env=C.tool_env(),
        drop_dac=True,
    )
    assert res.rc == 1 and b"PermissionError" in res.stderr, res.describe()
