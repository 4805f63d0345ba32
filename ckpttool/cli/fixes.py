"""The library's fixes spelled as commands: inspect's warnings (``analysis.fixes.Fix``),
check's key renames (``ops.check.KeyFix``), and why to-safetensors left an entry out."""

from __future__ import annotations

import os
import shlex
from typing import Any

from ..analysis.fixes import CONSOLIDATE, PLAIN_OBJECTS, RESAVE_CPU, REWRITE_ZIP, STRIP_PREFIX

# a warning's fix: the command, and what it does (joined after the warning's text)
_WARNING_FIXES = {
    RESAVE_CPU: ("`ckpttool convert IN OUT`", "re-saves them for CPU"),
    STRIP_PREFIX: ("", "removes it"),  # the command names the prefix (warning_text)
    PLAIN_OBJECTS: ("`ckpttool convert --plain-objects`", "writes plain equivalents it accepts"),
    REWRITE_ZIP: ("`ckpttool convert`", "rewrites it in the zip format"),
    CONSOLIDATE: (
        "`ckpttool consolidate FOLDER OUT`",
        "writes its model weights as one file that torch.load(weights_only=True) opens "
        "(--all: everything)",
    ),
}


def prefix_args(action: str, prefix: str) -> list[str]:
    """convert's options that strip or add ``prefix`` (``--strip-module`` for 'module.')."""
    if action == "strip":
        return ["--strip-module"] if prefix == "module." else ["--strip-prefix", prefix]
    return ["--add-module"] if prefix == "module." else ["--add-prefix", prefix]


def idle_text(action: str, arg: str, sd_path: str | None = None) -> str:
    """A key option that renamed no key, and why (a writer's ``idle`` entry), as a warning."""
    if action == "replace":
        flag, why = ["--replace-prefix", arg], f"no key starts with {arg.split('=', 1)[0]!r}"
    elif action == "add":
        flag, why = prefix_args("add", arg), f"every key already starts with {arg!r}"
    else:
        flag, why = prefix_args("strip", arg), f"no key starts with {arg!r}"
    where = f" of state dict {sd_path!r}" if sd_path else ""
    return f"warning: {' '.join(flag)} renamed no key{where}: {why}"


def kept_prefix_text(prefix: str) -> str:
    """to-safetensors kept a wrapper prefix on every key: what fails, and the fix."""
    why = "DataParallel/DDP" if prefix.startswith("module.") else "torch.compile"
    strip = prefix_args("strip", "module." if why == "DataParallel/DDP" else "_orig_mod.")
    return (
        f"warning: every key starts with {prefix!r} (saved from a {why} wrapper): "
        f"load_state_dict on an unwrapped model fails; {' '.join(strip)} removes it"
    )


def warning_text(warning: str) -> str:
    """A report warning as inspect prints it: its text, then the command that fixes it."""
    fix = getattr(warning, "fix", None)
    if fix is None:
        return str(warning)
    command, does = _WARNING_FIXES[fix.action]
    if fix.action == STRIP_PREFIX:
        command = "`" + " ".join(["ckpttool", "convert", *prefix_args("strip", fix.arg)]) + "`"
    return f"{warning}; {command} {does}"


def warning_texts(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` with its warnings as the strings inspect prints (text and JSON)."""
    return {**report, "warnings": [warning_text(w) for w in report["warnings"]]}


# how the command line adds to a reason to-safetensors gives for leaving an entry out
_LEFT_OUT_REMEDIES = {"outside_state_dict": "; --all keeps it"}


def left_out_text(item: Any) -> str:
    """An entry a writer left out, and why (to-safetensors gives a reason code, consolidate
    a line)."""
    reason = getattr(item, "reason", None)
    if reason is None:
        return str(item)
    return f"{item.name} ({item.description}{_LEFT_OUT_REMEDIES.get(reason, '')})"


def fix_command(result: Any, ckpt: str) -> str | None:
    """The ``ckpttool convert`` command(s) that apply a check's key fixes."""
    if not result.fixes:
        return None
    stem = os.path.splitext(ckpt.rstrip("/"))[0]
    if "://" in ckpt:  # a URL: the fixed file is written here, named after it
        stem = stem.rsplit("/", 1)[-1] or "checkpoint"
    rank = {"strip": 0, "replace": 1, "add": 2}
    fixes = list(result.fixes)
    # convert applies strips, then replacements, then additions: one command when that order
    # is the fixes' own, else one command per fix
    in_order = [rank[f.action] for f in fixes] == sorted(rank[f.action] for f in fixes)
    steps = [fixes] if in_order else [[f] for f in fixes]
    commands, src = [], ckpt
    for i, step in enumerate(steps):
        out = f"{stem}_fixed.pt" if i == len(steps) - 1 else f"{stem}_step{i + 1}.pt"
        args = ["ckpttool", "convert", src, out]
        if result.select and i == 0:
            args += ["--only", result.select]
        for f in step:
            if f.action == "strip":
                args += prefix_args("strip", f.old)
            elif f.action == "add":
                args += prefix_args("add", f.new)
            else:
                args += ["--replace-prefix", f"{f.old}={f.new}"]
        commands.append(" ".join(shlex.quote(x) for x in args))
        src = out
    return " && ".join(commands)
