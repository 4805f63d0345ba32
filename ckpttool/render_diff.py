"""Render ``diff`` and ``check`` results as text or JSON-ready dicts. Never imports torch.

The JSON shapes (``schema`` 1) are documented in the README; tests and scripts read them rather
than the text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .ops.check import CheckResult, Problems, group_keys
from .ops.diff import DiffResult, TensorDiff
from .ops.keysets import KeySpec
from .render import escape
from .tables import tabulate

SCHEMA = 1


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))


def _scope(scope: str | None) -> str:
    if scope is None:
        return "every tensor by path"
    return "the state dict at the root" if scope == "" else f"state dict '{escape(scope)}'"


def _tensor_dict(t: TensorDiff) -> dict[str, Any]:
    out: dict[str, Any] = {
        "key": t.key,
        "key_b": t.key_b,
        "dtype": [t.dtype_a, t.dtype_b],
        "shape": [list(t.shape_a), list(t.shape_b)],
        "equal": t.equal,
        "differs": t.differs,
    }
    if t.stats is not None:
        s = t.stats
        out["values"] = {
            "max_abs": _num(s.max_abs),
            "mean_abs": _num(s.mean_abs),
            "rel_l2": _num(s.rel_l2),
            "differing": s.differing,
            "numel": s.numel,
        }
    return out


def diff_dict(r: DiffResult) -> dict[str, Any]:
    """The JSON report of ``diff``."""
    return {
        "schema": SCHEMA,
        "equal": r.equal,
        "a": {"path": r.a, "scope": r.scope_a, "left_out": r.left_out_a},
        "b": {"path": r.b, "scope": r.scope_b, "left_out": r.left_out_b},
        "alignment": None
        if r.alignment is None
        else {
            "strip_a": r.alignment.strip_a,
            "strip_b": r.alignment.strip_b,
            "description": r.alignment.description,
        },
        "only_a": list(r.only_a),
        "only_b": list(r.only_b),
        "tensors": [_tensor_dict(t) for t in r.tensors],
        "changed": [t.key for t in r.changed],
        "entries": [{"path": e.path, "a": e.a, "b": e.b} for e in r.entries],
        "options": {"values": r.values, "atol": r.atol, "rtol": r.rtol},
        "dangerous": list(r.dangerous),
        "not_compared": {"a": list(r.unheld_a), "b": list(r.unheld_b)},
        "notes": list(r.notes),
    }


def _grouped(keys: Iterable[str], indent: str = "  ") -> list[str]:
    lines = []
    for g in group_keys(keys):
        if g.pattern == "...":
            lines.append(f"{indent}... and {g.count} more")
            continue
        count = f"  ({g.count} keys)" if g.count > 1 else ""
        lines.append(f"{indent}{escape(g.pattern if g.count > 1 else g.example)}{count}")
    return lines


def _shape(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else "[" + ", ".join(map(str, shape)) + "]"


def _n(count: int, noun: str) -> str:
    plural = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
    return f"{count:,} {noun if count == 1 else plural}"


def _fmt_float(x: float) -> str:
    return f"{x:.6g}"


def diff_text(r: DiffResult, fmt: str = "simple") -> str:
    """The human report of ``diff``."""
    lines = [
        f"A: {escape(r.a)} ({_scope(r.scope_a)}, {_n(len(r.tensors) + len(r.only_a), 'tensor')})",
        f"B: {escape(r.b)} ({_scope(r.scope_b)}, {_n(len(r.tensors) + len(r.only_b), 'tensor')})",
    ]
    lines += [f"note: {escape(n)}" for n in r.notes]
    if r.alignment is not None:
        lines.append(f"keys: {escape(r.alignment.description)} (compared after aligning them)")
    for title, keys in (("only in A", r.only_a), ("only in B", r.only_b)):
        if keys:
            lines += ["", f"{title} ({len(keys)}):", *_grouped(keys)]
    layout = [t for t in r.tensors if t.dtype_a != t.dtype_b or t.shape_a != t.shape_b]
    if layout:
        rows = [
            [escape(t.key), f"{t.dtype_a} {_shape(t.shape_a)}", f"{t.dtype_b} {_shape(t.shape_b)}"]
            for t in layout
        ]
        lines += ["", f"dtype or shape differs ({len(layout)}):"]
        lines.append(tabulate(rows, headers=["key", "A", "B"], tablefmt=fmt, disable_numparse=True))
    changed = [t for t in r.changed if t not in layout or t.stats is not None]
    if changed:
        lines += ["", f"values differ ({len(changed)} of {len(r.tensors)} tensors):"]
        if r.values:
            rows = [
                [escape(t.key), t.dtype_a, _shape(t.shape_a)]
                + (
                    [
                        _fmt_float(t.stats.max_abs),
                        _fmt_float(t.stats.mean_abs),
                        _fmt_float(t.stats.rel_l2),
                        f"{t.stats.differing:,}",
                    ]
                    if t.stats
                    else ["-"] * 4
                )
                for t in changed
            ]
            headers = ["key", "dtype", "shape", "max abs", "mean abs", "rel L2", "differing"]
            lines.append(tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True))
        else:
            lines += _grouped(t.key for t in changed)
    if r.entries:
        lines += ["", f"entries differ ({len(r.entries)}):"]
        for e in r.entries[:50]:
            a = "(absent)" if e.a is None else escape(e.a)
            b = "(absent)" if e.b is None else escape(e.b)
            lines.append(f"  {escape(e.path)}: {a} -> {b}")
        if len(r.entries) > 50:
            lines.append(f"  ... and {len(r.entries) - 50} more")
    unheld = _unheld(r)
    lines += ["", *([unheld] if unheld else []), _diff_verdict(r)]
    return "\n".join(lines)


def _unheld(r: DiffResult) -> str:
    """One line for the entries a safetensors side cannot hold (not compared)."""
    parts = []
    for side, names in (("A", r.unheld_a), ("B", r.unheld_b)):
        if names:
            shown = ", ".join(escape(n) for n in names[:6])
            more = f" and {len(names) - 6} more" if len(names) > 6 else ""
            parts.append(f"{_n(len(names), 'entry')} of {side} ({shown}{more})")
    if not parts:
        return ""
    return (
        f"not compared: {' and '.join(parts)}, which the other side does not hold "
        "(safetensors holds tensors and string metadata only)"
    )


def _diff_verdict(r: DiffResult) -> str:
    same = len(r.tensors) - len(r.changed)
    how = "values" if r.values and (r.atol or r.rtol) else "bit for bit"
    if r.equal:
        return f"equal: {_n(same, 'tensor')} {how}, {_n(r.entries_compared, 'entry')}"
    parts = [f"{_n(len(r.changed), 'tensor')} differ"] if r.changed else []
    parts.append(f"{same} equal")
    if r.only_a or r.only_b:
        parts.append(f"{len(r.only_a)} only in A, {len(r.only_b)} only in B")
    if r.entries:
        parts.append(f"{_n(len(r.entries), 'entry')} differ")
    if r.alignment and not (r.changed or r.only_a or r.only_b or r.entries):
        names = r.alignment.description
        return f"differ only in key names ({names}); {_n(same, 'tensor')} {how} equal"
    return "differ: " + ", ".join(parts)


# -- check ----------------------------------------------------------------------------------------
def _spec_dict(s: KeySpec) -> dict[str, Any]:
    return {"dtype": s.dtype, "shape": None if s.shape is None else list(s.shape)}


def _problems_dict(p: Problems) -> dict[str, Any]:
    return {
        "loads": p.loads,
        "missing": list(p.missing),
        "unexpected": list(p.unexpected),
        "mismatched": [
            {
                "key": m.key,
                "reason": m.reason,
                "checkpoint": _spec_dict(m.found),
                "model": _spec_dict(m.expected),
            }
            for m in p.mismatched + p.cast
        ],
    }


def check_dict(r: CheckResult, command: str | None) -> dict[str, Any]:
    """The JSON report of ``check``; ``command`` is the fix as the command line spells it."""
    return {
        "schema": SCHEMA,
        "loads": r.loads,
        "checkpoint": r.checkpoint,
        "against": r.against,
        "state_dict": r.state_dict,
        "problems": _problems_dict(r.problems),
        "fixes": [
            {"action": f.action, "old": f.old, "new": f.new, "keys": f.keys} for f in r.fixes
        ],
        "fix_command": command,
        "after_fixes": _problems_dict(r.after_fixes),
        "dangerous": list(r.dangerous),
        "notes": list(r.notes),
        "diagnoses": [
            {"kind": d.kind, "message": d.message, "keys": list(d.keys)} for d in r.diagnoses
        ],
    }


def _problem_lines(p: Problems) -> list[str]:
    lines: list[str] = []
    for title, keys in (("missing", p.missing), ("unexpected", p.unexpected)):
        if keys:
            lines += [f"{title} keys ({len(keys)}):", *_grouped(keys)]
    if p.mismatched:
        lines.append(f"size mismatch ({len(p.mismatched)}):")
        for m in p.mismatched[:20]:
            lines.append(
                f"  {escape(m.key)}: checkpoint {_shape(m.found.shape)}, model "
                f"{_shape(m.expected.shape)}"
            )
    return lines


def check_text(r: CheckResult, command: str | None) -> str:
    """The human report of ``check``; ``command`` is the fix as the command line spells it."""
    p = r.problems
    where = "" if not r.state_dict else f", state dict '{escape(r.state_dict)}'"
    lines = [f"checkpoint: {escape(r.checkpoint)}{where}", f"model:      {escape(r.against)}"]
    lines += [f"note: {escape(n)}" for n in r.notes]
    if r.loads:
        lines.append("would load (strict=True)")
    else:
        counts = [
            f"{len(p.missing)} missing",
            f"{len(p.unexpected)} unexpected",
            f"{len(p.mismatched)} size mismatches",
        ]
        lines.append(f"would not load: {', '.join(counts)}")
        lines += ["  " + line for line in _problem_lines(p)]
    if r.diagnoses:
        lines += ["", "diagnosis:"] + [f"  - {escape(d.message)}" for d in r.diagnoses]
    if command:
        lines += ["", "fix:", f"  {command}"]
    if r.fixes:
        after = r.after_fixes
        if after.loads:
            lines.append("after the fix: would load")
        else:
            lines += ["after the fix, still:"] + ["  " + x for x in _problem_lines(after)]
    return "\n".join(lines)
