"""What each writer says it did, as a :class:`~.results.Report`: the result lines (what was
written, renamed, cast) for stdout, the warnings and notes for stderr."""

from __future__ import annotations

from typing import Any

from ..render import escape
from .fixes import idle_text, kept_prefix_text, left_out_text
from .results import Report


def keys(n: int) -> str:
    return "key" if n == 1 else "keys"


def count(n: int, noun: str) -> str:
    """``1 shard``, ``2 shards``."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _renamed_and_idle(report: Report, result: Any) -> None:
    """How many keys a folder's or a safetensors writer renamed, and the options that did
    nothing."""
    if result.renamed:
        report.result(f"renamed {result.renamed} {keys(result.renamed)}")
    for action, arg in result.idle:
        report.message(idle_text(action, arg))


def _left_out_and_notes(report: Report, result: Any) -> None:
    for item in result.left_out:
        report.message(f"left out: {escape(left_out_text(item))}")
    for note in result.notes:
        report.message(f"note: {escape(note)}")


def _shards(result: Any, sharded: bool) -> str:
    return f" in {count(len(result.files) - 1, 'shard')}" if sharded else ""


def convert_report(result: Any, output_path: str) -> Report:
    """convert: renames, replacements, notes, what it wrote."""
    report = Report()
    idle_in = {sd_path for sd_path, _, _ in result.idle}
    for sd_path, n in result.renamed:
        where = f"'{escape(sd_path)}'" if sd_path else "(root)"
        if n or sd_path not in idle_in:  # else the warning below says why
            report.result(f"renamed {n} {keys(n)} in state dict {where}")
    for sd_path, action, arg in result.idle:
        report.message(idle_text(action, arg, sd_path))
    if result.key_unused:
        report.message(
            "warning: --state-dict names the state dict to rename, and no rename option was "
            "given: it changed nothing (--only writes just one entry)"
        )
    for r in result.replaced:
        report.result(f"replaced {r}")
    left = result.unsafe_globals
    if left:
        report.message(
            "note: the output still pickles "
            + ", ".join(left[:4])
            + (" and more" if len(left) > 4 else "")
            + ": torch.load(weights_only=True) refuses it; --plain-objects replaces them"
        )
    for note in result.notes:
        report.message(f"note: {note}")
    check = f"verified: {result.verification}" if result.verified else "not verified"
    report.result(
        f"wrote {escape(output_path)}: {count(result.tensors, 'tensor')} in "
        f"{count(result.storages, 'storage')}, all on cpu ({check})"
    )
    return report


def to_safetensors_report(result: Any, output_path: str, sharded: bool) -> Report:
    """to-safetensors: renames, tied tensors, what it left out and wrote."""
    report = Report()
    _renamed_and_idle(report, result)
    if result.kept_prefix:
        report.message(kept_prefix_text(result.kept_prefix))
    for alias, kept in result.aliases.items():
        report.result(f"shared: {escape(alias)} is stored once as {escape(kept)}")
    _left_out_and_notes(report, result)
    check = "verified" if result.verified else "not verified"
    files = _shards(result, sharded)
    report.result(
        f"wrote {escape(output_path)}: {count(result.tensors, 'tensor')}{files} ({check})"
    )
    return report


def consolidate_report(result: Any, output_path: str, dtype: str | None, sharded: bool) -> Report:
    """consolidate (and convert/to-safetensors given a folder of shards)."""
    report = Report()
    _renamed_and_idle(report, result)
    if result.cast:
        report.result(f"cast {result.cast} tensors to {dtype}")
    _left_out_and_notes(report, result)
    check = "verified" if result.verified else "not verified"
    files = _shards(result, sharded)
    report.result(
        f"wrote {escape(output_path)}: {escape(result.selected)} of a {result.kind} checkpoint "
        f"from {count(result.world_size, 'rank')}, {count(result.tensors, 'tensor')}{files} "
        f"({check})"
    )
    return report


def to_dcp_report(result: Any, output_path: str, dtype: str | None) -> Report:
    """to-dcp: renames, optimizers named, replacements, casts, what it left out and wrote."""
    report = Report()
    if result.renamed:
        report.result(f"renamed {result.renamed} keys")
    for path in result.optimizers:
        where = f"'{escape(path)}'" if path else "(root)"
        report.result(f"named the parameters of optimizer {where} by their model keys")
    for r in result.replaced:
        report.result(f"replaced {escape(r)} by a plain value")
    if result.cast:
        report.result(f"cast {result.cast} tensors to {dtype}")
    for item in result.left_out:
        report.message(f"left out: {escape(left_out_text(item))}")
    check = "verified" if result.verified else "not verified"
    shared = f" ({result.items} stored)" if result.items != result.tensors else ""
    report.result(
        f"wrote {escape(output_path)}: {escape(result.selected)}, {result.tensors} tensors"
        f"{shared} and {result.values} values ({check})"
    )
    return report
