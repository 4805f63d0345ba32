"""Regenerate the command reference in README.md from the commands' --help (run after editing
help texts; tests/test_docs.py fails when the README is stale)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from click.testing import CliRunner

from ckpttool.cli import cli

README = Path(__file__).resolve().parent.parent / "README.md"
COMMANDS = ["", *sorted(cli.commands)]  # every command: a new one cannot go undocumented


def help_text(command: str) -> str:
    args = [command, "--help"] if command else ["--help"]
    result = CliRunner().invoke(cli, args, terminal_width=80, prog_name="ckpttool")
    assert result.exit_code == 0, result.output
    return result.output.rstrip() + "\n"


def render(text: str) -> str:
    for command in COMMANDS:
        tag = command or "ckpttool"
        block = f"<!-- help:{tag} -->\n```\n{help_text(command)}```\n<!-- /help:{tag} -->"
        text = re.sub(
            rf"<!-- help:{re.escape(tag)} -->.*?<!-- /help:{re.escape(tag)} -->",
            lambda _m, block=block: block,
            text,
            flags=re.S,
        )
    return text


if __name__ == "__main__":
    new = render(README.read_text())
    if "--check" in sys.argv:
        sys.exit(0 if new == README.read_text() else 1)
    README.write_text(new)
