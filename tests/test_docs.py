"""The README stays true: its command reference matches --help, its commands name real files."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))

import update_readme  # noqa: E402

from ckpttool.cli import cli  # noqa: E402


def test_command_reference_matches_help() -> None:
    text = (ROOT / "README.md").read_text()
    assert update_readme.render(text) == text, "README is stale: run python docs/update_readme.py"


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_is_documented(command: str) -> None:
    text = (ROOT / "README.md").read_text()
    assert f"ckpttool {command}" in text
    assert f"<!-- help:{command} -->\n```\nUsage: ckpttool {command}" in text


def test_newcomer_commands_use_shipped_fixture_and_ci_runs_readme_test_command() -> None:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```\n(python3 -m venv .*?)\n```", text)
    assert len(blocks) == 2, blocks
    try_it, tests = blocks
    for path in re.findall(r"fixtures/\S+\.pt", try_it):
        assert (ROOT / path).is_file(), path
    test_command = tests.split("&& ")[-1]
    assert test_command in (ROOT / ".ci" / "run").read_text()
