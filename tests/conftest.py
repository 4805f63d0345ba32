"""Shared fixtures for the inspect/convert tests: paths, expected figures, a CliRunner helper.

The real-world files in ``../shared/real-world/`` belong to other people: tests read them in
place (never copy them into the repository, never ``torch.load(weights_only=False)`` them) and
skip when the folder is absent.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
EXPECTED_FIXTURES: dict[str, dict[str, Any]] = json.loads(
    (FIXTURES / "EXPECTED.json").read_text(encoding="utf-8")
)["files"]
REAL_WORLD = Path(os.environ.get("CKPTTOOL_REAL_WORLD", REPO.parent / "shared" / "real-world"))
_EXPECTED_JSONL = REAL_WORLD / "expected.jsonl"
REAL_WORLD_RECORDS: list[dict[str, Any]] = (
    [
        json.loads(line)
        for line in _EXPECTED_JSONL.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    if _EXPECTED_JSONL.is_file()
    else []
)
REAL_WORLD_REASON = f"real-world checkpoints not present at {REAL_WORLD}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``fixture_name``: every committed fixture; ``rw_record``: each real-world file's record."""
    if "fixture_name" in metafunc.fixturenames:
        metafunc.parametrize("fixture_name", sorted(EXPECTED_FIXTURES))
    if "rw_record" in metafunc.fixturenames:
        if REAL_WORLD_RECORDS:
            ids = [r["file"] for r in REAL_WORLD_RECORDS]
            metafunc.parametrize("rw_record", REAL_WORLD_RECORDS, ids=ids)
        else:
            skip = pytest.mark.skip(reason=REAL_WORLD_REASON)
            metafunc.parametrize("rw_record", [pytest.param(None, marks=skip, id="absent")])


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def expected_fixtures() -> dict[str, dict[str, Any]]:
    return EXPECTED_FIXTURES


@pytest.fixture(scope="session")
def real_world() -> Path:
    """The folder of real-world checkpoints; skips the test when it is absent."""
    if not REAL_WORLD_RECORDS:
        pytest.skip(REAL_WORLD_REASON)
    return REAL_WORLD


@pytest.fixture(scope="session")
def real_world_expected(real_world: Path) -> dict[str, dict[str, Any]]:
    return {r["file"]: r for r in REAL_WORLD_RECORDS}


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None
    tb: str

    @property
    def err_lines(self) -> list[str]:
        return self.stderr.splitlines()

    @property
    def out_lines(self) -> list[str]:
        """The result lines (a writer's "renamed ...", "wrote ..." go to stdout)."""
        return self.stdout.splitlines()


@pytest.fixture
def run_cli() -> Callable[..., CliResult]:
    """Run ``ckpttool ARGS`` in-process with click's CliRunner; stdout and stderr apart.

    Fails the test when the command raised anything but ``SystemExit`` (a traceback).
    """
    from ckpttool.cli import cli

    def run(*args: str | os.PathLike[str], input: str | None = None) -> CliResult:
        runner = CliRunner()
        res = runner.invoke(cli, [os.fspath(a) for a in args], input=input, prog_name="ckpttool")
        exc = res.exception
        tb = ""
        if exc is not None and not isinstance(exc, SystemExit):
            tb = "".join(traceback.format_exception(*res.exc_info))  # type: ignore[misc]
        out = CliResult(res.exit_code, res.stdout, res.stderr, exc, tb)
        assert not tb, f"ckpttool {' '.join(map(str, args))} raised:\n{tb}"
        assert "Traceback" not in out.stdout + out.stderr
        return out

    return run


@pytest.fixture
def expect_error(run_cli: Callable[..., CliResult]) -> Callable[..., CliResult]:
    """Run the CLI; require exit ``code`` and one stderr line ``Error: <path>: <problem>``."""

    def check(
        args: list[Any], path: str | os.PathLike[str], problem: str | None = None, code: int = 1
    ) -> CliResult:
        res = run_cli(*args)
        assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
        assert len(res.err_lines) == 1, res.stderr
        line = res.err_lines[0]
        # exit 3 (dangerous globals) is flagged "Danger: ", every other failure "Error: "
        kind = "Danger" if code == 3 else "Error"
        prefix = f"{kind}: {os.fspath(path)}: "
        assert line.startswith(prefix), (line, prefix)
        if problem is not None:
            assert line == prefix + problem, line
        return res

    return check


@pytest.fixture
def in_tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run the test with the current directory set to an empty ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
