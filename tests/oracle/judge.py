"""ckpttool's verdict beside torch's observation: the rules the oracle tests and the fuzzer apply.

* ``safe`` => torch resolved only allowlisted globals, called only allowlisted code, made no
  suspicious audit event and wrote no marker (:meth:`Observation.unvetted` is empty);
* ``dangerous`` => torch did at least one of those things. When torch failed before it reached
  the globals ckpttool names (it could not read the file that far), the verdict is accepted and
  reported as a note: ckpttool judged a pickle torch never got to.

Verdict words: today ``safe``, ``user code``, ``dangerous``, ``error``; after the lead's rewrite
``safe``, ``unvetted code``, ``dangerous``, ``unreadable``. Only ``safe`` and ``dangerous`` carry
a rule; the others are reported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .torch_oracle import Observation, canonical

SAFE, DANGEROUS = "safe", "dangerous"
_WORST = {"safe": 0, "error": 1, "unreadable": 1, "user code": 2, "unvetted code": 2}


@dataclass
class Unit:
    """One thing torch loads: a file, or a DCP folder (all its files judged together)."""

    path: str
    kind: str | None  # the oracle's loader (None: from the input)
    verdict: str
    deciding: list[str] = field(default_factory=list)
    scanned: list[str] = field(default_factory=list)
    scan_error: str | None = None
    ambiguous: bool = False  # ckpttool found readers that would read the file differently
    mutates: bool = False  # a deciding global is a class the pickle changes


def _worst(verdicts: list[str]) -> str:
    return max(verdicts, key=lambda v: 3 if v == DANGEROUS else _WORST.get(v, 1), default="error")


def ckpttool_units(path: str | os.PathLike[str], kind: str | None = None) -> list[Unit]:
    """ckpttool's verdicts for ``path``, grouped by what torch would load (``kind``: the
    loader the victim uses, when it is not the usual one for the input: ``jit``, ``dcp``)."""
    from ckpttool.ops.scan import scan

    p = Path(path)
    if kind == "dcp" and p.is_file():  # DCP loads the folder of its .metadata
        p = p.parent
    files = scan([p]).files
    if p.is_dir() and (p / ".metadata").is_file():
        deciding = [g.name for f in files for g in f.deciding]
        verdict = _worst([f.verdict for f in files])
        return [Unit(str(p), "dcp", verdict, deciding, [f.path for f in files])]
    out = []
    for f in files:
        if not os.path.isfile(f.path):  # fifos, dangling links, missing files: nothing to load
            continue
        k = kind if kind == "jit" and os.path.samefile(f.path, p) else None
        unit = Unit(f.path, k, f.verdict, [g.name for g in f.deciding], [f.path], f.error)
        unit.ambiguous = any("ambiguous" in r for r in f.reasons)
        unit.mutates = any("mutated" in g.uses for g in f.deciding)
        out.append(unit)
    return out


def check(unit: Unit, obs: Observation) -> tuple[str | None, str | None]:
    """(divergence, note): a divergence breaks a rule; a note is an accepted oddity."""
    bad = obs.unvetted()
    if unit.verdict == SAFE and bad:
        return f"ckpttool: safe; torch: {'; '.join(bad[:6])} [{_status(obs)}]", None
    if unit.verdict == DANGEROUS and not bad:
        reached = {canonical(g) for g in obs.resolved_globals}
        unreached = [g for g in unit.deciding if canonical(g) not in reached]
        if not obs.loaded_ok and unreached:
            where = "before any global" if obs.reached_no_global else "before"
            note = f"dangerous {unreached}: torch stopped {where} ({obs.error})"
            return None, note
        if unit.ambiguous:  # the dangerous pickle is what another reading of the zip runs
            return None, f"dangerous {unit.deciding} in a reading of an ambiguous archive"
        if unit.mutates and not obs.loaded_ok:  # a C type refused the change; a class would not
            return None, f"dangerous: changes {unit.deciding} ({obs.error})"
        return (
            f"ckpttool: dangerous {unit.deciding}; torch ran only allowlisted code "
            f"(globals {sorted(set(obs.resolved_globals))}) [{_status(obs)}]",
            None,
        )
    if unit.verdict not in (SAFE, DANGEROUS) and not bad and obs.loaded_ok:
        return None, f"{unit.verdict}, yet torch loaded it running only allowlisted code"
    return None, None


def _status(obs: Observation) -> str:
    return "torch loaded it" if obs.loaded_ok else f"torch failed: {obs.error}"
