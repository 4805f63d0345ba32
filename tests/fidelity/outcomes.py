"""Run ``ckpttool.convert`` on one zoo case or real-world file and judge it against torch.

An outcome is ``round-trip`` (torch.load of the output equals torch.load of the input, object
for object), ``refused`` (one CheckpointError line; the expected fragment is checked by the
tests) or ``wrong`` (anything else: a traceback, an output torch cannot load, a difference).
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass

from . import compare, zoo

# Cases refused on purpose, with the fragment their one-line message must hold.
EXPECTED_REFUSALS: dict[str, str] = {
    "08_torchscript-quantized-vgg.pt": "is a TorchScript archive",
}


@dataclass(frozen=True)
class Outcome:
    name: str
    kind: str  # "round-trip", "refused", "wrong"
    detail: str = ""


def convert_and_compare(src: str, dst: str, name: str, *, real: bool) -> Outcome:
    """Convert ``src`` to ``dst`` and compare both with torch; ``real``: also load them with
    their real classes (only for files the zoo made)."""
    import ckpttool
    from ckpttool.errors import CheckpointError

    try:
        ckpttool.convert(src, dst, force=True, allow_user_classes=True)
    except CheckpointError as exc:
        return Outcome(name, "refused", str(exc))
    except Exception:
        return Outcome(name, "wrong", "convert raised: " + traceback.format_exc(limit=-3))
    try:
        want = compare.canon(compare.load(src, strict=not real))
    except Exception as exc:
        return Outcome(name, "wrong", f"torch cannot load the input here: {exc!r}"[:300])
    try:
        got = compare.canon(compare.load(dst, strict=not real))
    except Exception as exc:
        return Outcome(name, "wrong", f"torch cannot load the output: {exc!r}"[:300])
    diff = compare.first_diff(want, got)
    if diff is None and real:
        try:
            diff = compare.first_diff(
                compare.canon(compare.load_real(src)), compare.canon(compare.load_real(dst))
            )
        except Exception as exc:
            return Outcome(name, "wrong", f"torch cannot load the output: {exc!r}"[:300])
    if diff is not None:
        return Outcome(name, "wrong", diff)
    return Outcome(name, "round-trip")


def zoo_outcome(name: str, folder: str) -> Outcome:
    case = zoo.CASES[name]
    src = zoo.write(case, folder)
    return convert_and_compare(src, src + ".out.pt", name, real=case.importable)


def real_world_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(
        n for n in os.listdir(folder) if not n.endswith((".tsv", ".md", ".jsonl")) and n[0] != "."
    )


def acceptable(outcome: Outcome) -> str | None:
    """Why ``outcome`` fails the fidelity contract, or ``None`` when it passes."""
    fragment = EXPECTED_REFUSALS.get(outcome.name)
    if outcome.kind == "wrong":
        return f"{outcome.name}: {outcome.detail}"
    if outcome.kind == "refused":
        if "\n" in outcome.detail or "corrupt" in outcome.detail:
            return f"{outcome.name}: refusal is not one clear line: {outcome.detail!r}"
        if fragment is not None and fragment in outcome.detail:
            return None
        return f"{outcome.name}: unexpectedly refused: {outcome.detail}"
    if fragment is not None:
        return f"{outcome.name}: expected a refusal ({fragment!r}) but it round-trips"
    return None
