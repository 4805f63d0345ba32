"""``scan``: which files can run code when loaded, from their pickles and headers alone.

Every pickle a loader would run is walked statically (``unpickling/discover.py``) and judged
by the default-deny policy (``unpickling/policy.py``); tensor bytes are never read, so a
folder of 100 GB scans in seconds. safetensors files are safe once their header is valid.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError, shown
from ..source import is_url, read_head
from ..unpickling.policy import DANGEROUS, UNREADABLE, USER, GlobalVerdict

SAFE = "safe"
ERROR = UNREADABLE  # the verdict of a file that cannot be read (kept for old callers)
VERDICTS = (SAFE, USER, UNREADABLE, DANGEROUS)  # from best to worst


@dataclass(frozen=True)
class FileScan:
    """The verdict of one file: ``safe`` (a proof: every pickle read as its loader reads it,
    every call allowlisted), ``unvetted code`` (loading imports and runs classes or TorchScript
    nobody vetted), ``unreadable`` (cannot be read, or not provably as the loader reads it) or
    ``dangerous`` (known to run code)."""

    path: str
    verdict: str
    format: str  # as sniffed from the first bytes: zip, legacy, pickle, safetensors, ...
    deciding: tuple[GlobalVerdict, ...] = ()  # the globals that decide the verdict
    globals: tuple[GlobalVerdict, ...] = ()  # every global of every pickle
    notes: tuple[str, ...] = ()
    error: str | None = None  # why it is unreadable, or the first reason of its verdict
    reasons: tuple[str, ...] = ()  # what else decides the verdict besides globals

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "verdict": self.verdict,
            "format": self.format,
            "globals": [
                {"name": g.name, "kind": g.kind, "uses": list(g.uses), "reason": g.reason}
                for g in self.globals
            ],
            "deciding": [g.name for g in self.deciding],
            "reasons": list(self.reasons),
            "notes": list(self.notes),
            "error": self.error,
        }


@dataclass
class ScanResult:
    """Every file scanned, in the order found."""

    files: list[FileScan] = field(default_factory=list)

    def count(self, verdict: str) -> int:
        return sum(1 for f in self.files if f.verdict == verdict)

    @property
    def dangerous(self) -> list[str]:
        return [f.path for f in self.files if f.verdict == DANGEROUS]

    @property
    def errors(self) -> list[str]:
        return [f.path for f in self.files if f.verdict == UNREADABLE]

    @property
    def worst(self) -> str:
        """The worst verdict of any file (``safe`` when every file is)."""
        return max((f.verdict for f in self.files), key=VERDICTS.index, default=SAFE)

    def to_json(self) -> dict[str, Any]:
        kinds = VERDICTS
        return {
            "schema": 1,
            "files": [f.to_json() for f in self.files],
            "summary": {"files": len(self.files), **{k: self.count(k) for k in kinds}},
        }


def scan(paths: Iterable[str | os.PathLike[str]]) -> ScanResult:
    """Scan files and folders (recursively: Hugging Face snapshots, sharded indexes, DCP and
    DeepSpeed folders) without loading them.

    Args:
        paths: files (always scanned, whatever their name) and folders (their checkpoint-like
            files: ``*.pt``, ``*.bin``, ``*.ckpt``, ``*.safetensors``, ``.metadata``,
            ``*.distcp``, ...).

    Returns:
        A :class:`ScanResult`; a path that cannot be read is a file with verdict ``error``.

    Example:
        >>> r = scan(["fixtures"])  # doctest: +SKIP
        >>> r.dangerous  # doctest: +SKIP
        ['fixtures/malicious.pt']
    """
    result = ScanResult()
    for p in (os.fspath(x) for x in paths):
        try:
            found = _folder_files(p)
        except CheckpointError as exc:
            result.files.append(FileScan(p, ERROR, "folder", error=exc.message))
            continue
        if found is not None:
            if not found:
                result.files.append(FileScan(p, UNREADABLE, "folder", error="no checkpoint files"))
            result.files.extend(scan_one(f) for f in found)
        else:
            result.files.append(scan_one(p))
    return result


def _folder_files(path: str) -> list[str] | None:
    """The checkpoint-like files under a folder (a local one, a Hub repo, a bucket prefix, an
    HTTP folder with an index page); None when ``path`` is a file."""
    from ..unpickling.discover import SUFFIXES, checkpoint_files

    if not is_url(path):
        return checkpoint_files(path) if os.path.isdir(path) else None
    from ..readers import remote_files
    from ..remote import tree

    remote_files.enable()
    if not tree.isdir(path):
        return None
    root = path.rstrip("/")
    out = []
    for url in tree.walk(root):  # listed, or derived from a save's own files (remote/tree.py)
        parts = url[len(root) :].strip("/").split("/")
        if any(part in (".git", "__pycache__") for part in parts[:-1]):
            continue
        if parts[-1] == ".metadata" or parts[-1].lower().endswith(SUFFIXES):
            out.append(url)
    return out


def scan_one(path: str) -> FileScan:
    """The verdict of one file (see :func:`scan`)."""
    from ..readers import _check_file, dcp_items_of, sniff
    from ..unpickling.discover import scan_file

    try:
        size = _check_file(path)
        head = read_head(path)
        kind = sniff(head, path) if size else "empty"
        verdict = scan_file(path, dcp_items=dcp_items_of)
        if kind == "safetensors":
            from ..readers import safetensors

            safetensors.read(path, size)  # the header is valid: safe by construction
    except CheckpointError as exc:
        return FileScan(shown(path), UNREADABLE, "?", error=exc.message)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        return FileScan(shown(path), UNREADABLE, "?", error=reason)
    worst = verdict.kind
    label = worst if worst in (DANGEROUS, USER, UNREADABLE) else SAFE
    deciding = tuple(g for g in verdict.globals if g.kind == worst) if label != SAFE else ()
    others = [r for k, r in verdict.problems if k != label]
    reasons = tuple(verdict.reasons(label) + others) if label != SAFE else ()
    error = reasons[0] if label == UNREADABLE and reasons else None
    return FileScan(
        shown(path), label, kind, deciding, verdict.globals, verdict.notes, error, reasons
    )
