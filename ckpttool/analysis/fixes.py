"""What fixes a problem the report finds, as data: the command line spells it as a command.

A :class:`Finding` is one of the report's warnings: its text says what is wrong in domain
words, its :class:`Fix` (if any) names the conversion that repairs it. ``Finding`` is a ``str``
(the text) so that the report stays JSON-ready and reads as plain strings to Python callers.

``check``'s key renames keep their own record (``ops.check.KeyFix``: old and new prefix and
how many keys it renames, the shape of check's JSON ``fixes``); a warning's fix is one action
of ``convert`` with at most one argument, so the two are not the same record.
"""

from __future__ import annotations

from dataclasses import dataclass

# the actions a Fix can name (each one is an option of ``convert``)
RESAVE_CPU = "resave_cpu"  # re-save every storage tagged cpu
STRIP_PREFIX = "strip_prefix"  # remove the key prefix ``arg``
PLAIN_OBJECTS = "plain_objects"  # replace objects weights_only loading refuses by plain ones
REWRITE_ZIP = "rewrite_zip"  # rewrite a legacy file in the zip format
CONSOLIDATE = "consolidate"  # merge a folder of shards into one file
ACTIONS = (RESAVE_CPU, STRIP_PREFIX, PLAIN_OBJECTS, REWRITE_ZIP, CONSOLIDATE)


@dataclass(frozen=True)
class Fix:
    """A conversion that repairs a problem: ``action`` (one of :data:`ACTIONS`) and its
    argument (the prefix for :data:`STRIP_PREFIX`, else "")."""

    action: str
    arg: str = ""


class Finding(str):
    """A warning of the report: the text (without the command that fixes it) and its fix.

    Example:
        >>> w = Finding("legacy format", Fix(REWRITE_ZIP))
        >>> w == "legacy format", w.fix.action
        (True, 'rewrite_zip')
    """

    fix: Fix | None

    def __new__(cls, text: str, fix: Fix | None = None) -> Finding:
        self = super().__new__(cls, text)
        self.fix = fix
        return self
