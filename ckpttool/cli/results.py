"""How every command hands back its result: the result on stdout (text, or one JSON document
with ``--json``), everything else (warnings, notes, progress) on stderr, nothing but errors
with ``-q``. The writers build a :class:`Report` of their lines; :func:`emit` prints it."""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from .options import echo_remote_usage, remote_usage


@dataclasses.dataclass
class Report:
    """A command's lines in the order it says them: results (stdout) and messages (stderr:
    warnings, notes, what was left out)."""

    lines: list[tuple[bool, str]] = dataclasses.field(default_factory=list)

    def result(self, line: str) -> None:
        """A line of the result: what was written, renamed, cast (stdout)."""
        self.lines.append((False, line))

    def message(self, line: str) -> None:
        """A warning or note about the result (stderr)."""
        self.lines.append((True, line))

    @property
    def results(self) -> list[str]:
        return [line for err, line in self.lines if not err]

    @property
    def messages(self) -> list[str]:
        return [line for err, line in self.lines if err]


def plain(value: Any) -> Any:
    """A library result (dataclasses, tuples, lists, dicts) as JSON-ready values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def emit(
    command: str,
    result: Any,
    report: Report,
    *,
    quiet: bool,
    as_json: bool,
    remote: bool = False,
) -> None:
    """Print a writer's ``report``: its results on stdout and its messages on stderr, in the
    order said; with ``as_json`` the result as one JSON document on stdout instead of the
    result lines (``outputs``: the files written, then ``result``'s fields, ``report``: the
    result lines, ``messages``: the stderr lines, ``remote``: what URLs cost); with ``quiet``
    nothing on stderr. ``remote``: name what reading URLs cost on stderr."""
    from ..render import escape, to_json

    for err, line in report.lines:
        if err and not quiet:
            click.echo(escape(line), err=True)
        elif not err and not quiet and not as_json:
            click.echo(escape(line))
    if not quiet:
        echo_remote_usage(always=remote)
    if as_json:
        files = getattr(result, "files", None) or [getattr(result, "dst", None)]
        doc = {"command": command, "outputs": plain(files), **plain(result)}
        doc.update(report=report.results, messages=report.messages)
        usage = remote_usage()
        if usage is not None:
            doc["remote"] = usage
        click.echo(to_json(doc))
