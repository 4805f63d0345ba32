"""``diff``: compare two checkpoints of any formats, key by key, tensor by tensor, streamed.

Both inputs are opened as metadata (no tensor bytes), their model state dicts chosen (or every
tensor by path), keys aligned when they differ only by a wrapper prefix, and each pair of
tensors read piece by piece from the two files (memory near one piece, never a whole file).
Non-tensor entries (epoch, args, optimizer settings) are compared by their descriptions.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .diff_tensors import TensorDiff, ValueStats, compare_tensors
from .sides import Files, Side, open_side

__all__ = ["DiffResult", "EntryDiff", "KeyAlignment", "TensorDiff", "ValueStats", "diff"]

Progress = Callable[[int], None]
# progress(total_bytes) may return a callback that receives byte counts (as the writers take it)
ProgressFactory = Callable[[int], Progress | None]


# -- key alignment --------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyAlignment:
    """Keys of A and B match once ``strip_a`` is removed from A's and ``strip_b`` from B's."""

    strip_a: str
    strip_b: str
    matched: int

    @property
    def description(self) -> str:
        if self.strip_a and not self.strip_b:
            return f"B = A with {self.strip_a} stripped"
        if self.strip_b and not self.strip_a:
            return f"B = A with {self.strip_b} added"
        return f"B = A with {self.strip_a} replaced by {self.strip_b}"


def dotted_prefixes(keys: Iterable[str]) -> list[str]:
    """Every dotted prefix (``a.``, ``a.b.``) that all keys share, each key keeping a rest."""
    keys = list(keys)
    if not keys:
        return []
    parts = keys[0].split(".")[:-1]
    out: list[str] = []
    for n in range(1, len(parts) + 1):
        p = ".".join(parts[:n]) + "."
        if all(k.startswith(p) and len(k) > len(p) for k in keys):
            out.append(p)
        else:
            break
    return out


def align_keys(keys_a: Iterable[str], keys_b: Iterable[str]) -> KeyAlignment | None:
    """The prefix change that makes the most keys of A and B match, if it beats none at all."""
    a, b = list(keys_a), list(keys_b)
    raw = len(set(a) & set(b))
    best: KeyAlignment | None = None
    for pa in ["", *dotted_prefixes(a)]:
        stripped_a = {k[len(pa) :] for k in a}
        for pb in ["", *dotted_prefixes(b)]:
            if not pa and not pb:
                continue
            n = len(stripped_a & {k[len(pb) :] for k in b})
            if n > raw and (
                best is None
                or n > best.matched
                or (n == best.matched and len(pa) + len(pb) < len(best.strip_a) + len(best.strip_b))
            ):
                best = KeyAlignment(pa, pb, n)
    return best


@dataclass(frozen=True)
class EntryDiff:
    """A non-tensor entry whose description differs (None: absent on that side)."""

    path: str
    a: str | None
    b: str | None


@dataclass(frozen=True)
class DiffResult:
    """What differs between A and B. ``equal`` is what the command's exit code says."""

    a: str
    b: str
    scope_a: str | None  # state dict compared in A ("" the root); None: every tensor by path
    scope_b: str | None
    alignment: KeyAlignment | None
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]
    tensors: tuple[TensorDiff, ...]  # every key in both
    entries: tuple[EntryDiff, ...]  # differing non-tensor entries only
    entries_compared: int
    values: bool
    atol: float
    rtol: float
    left_out_a: int = 0  # tensors outside the compared state dict
    left_out_b: int = 0
    dangerous: tuple[str, ...] = ()  # dangerous globals either pickle names (never run)
    # With a safetensors side: entries of A (of B) that the other side does not hold
    # (optimizer state, objects, scalars it does not carry): not compared, not a difference.
    unheld_a: tuple[str, ...] = ()
    unheld_b: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # about the inputs (a folder holding two weight sets)

    @property
    def changed(self) -> tuple[TensorDiff, ...]:
        return tuple(t for t in self.tensors if t.differs)

    @property
    def equal(self) -> bool:
        return not (self.only_a or self.only_b or self.entries or self.alignment or self.changed)


def _open_sides(a: Any, b: Any, all_tensors: bool) -> tuple[Side, Side]:
    """Both inputs, scoped alike: by model state dict when both hold one, else by path."""
    side_a = open_side(a, all_tensors=all_tensors)
    side_b = open_side(b, all_tensors=all_tensors)
    if (side_a.scope is None) != (side_b.scope is None) and not all_tensors:
        # one side has no state dict: compare every tensor of both by path
        side_a = open_side(a, all_tensors=True) if side_a.scope is not None else side_a
        side_b = open_side(b, all_tensors=True) if side_b.scope is not None else side_b
    return side_a, side_b


def _match(
    keys_a: list[str], keys_b: list[str]
) -> tuple[KeyAlignment | None, dict[str, str], tuple[str, ...], tuple[str, ...]]:
    """(the prefix alignment, A's key -> B's key for the pairs, keys only in A, only in B)."""
    alignment = align_keys(keys_a, keys_b) if set(keys_a) != set(keys_b) else None
    pa, pb = (alignment.strip_a, alignment.strip_b) if alignment else ("", "")
    b_by_name = {k[len(pb) :]: k for k in keys_b}
    matched = {k: b_by_name[k[len(pa) :]] for k in keys_a if k[len(pa) :] in b_by_name}
    only_a = tuple(k for k in keys_a if k not in matched)
    taken = set(matched.values())
    only_b = tuple(k for k in keys_b if k not in taken)
    return alignment, matched, only_a, only_b


def _entries(
    a: Side, b: Side, pattern: str | None
) -> tuple[tuple[EntryDiff, ...], int, tuple[str, ...], tuple[str, ...]]:
    """(the differing entries, how many were compared, A's not compared, B's not compared);
    with ``pattern`` only the entries whose path matches it.

    Between two pickled checkpoints: every non-tensor entry. When a side is safetensors
    (tensors and string metadata only), what it can hold: the other side's top-level scalars
    as ``to-safetensors`` stores them, against its metadata, where both hold the key; the
    rest is listed as not compared (it could not be there), not counted as a difference.
    """
    unheld_a: tuple[str, ...] = ()
    unheld_b: tuple[str, ...] = ()
    if not (a.tensors_only or b.tensors_only):
        ea, eb = a.entries, b.entries
    else:
        ea = a.entries if a.tensors_only else a.scalars
        eb = b.entries if b.tensors_only else b.scalars
        unheld_a = tuple(k for k in ea if k not in eb) + (() if a.tensors_only else a.unheld)
        unheld_b = tuple(k for k in eb if k not in ea) + (() if b.tensors_only else b.unheld)
        ea, eb = {k: v for k, v in ea.items() if k in eb}, {k: v for k, v in eb.items() if k in ea}
    paths = [p for p in dict.fromkeys([*ea, *eb]) if _matches(pattern, p)]
    entries = tuple(EntryDiff(p, ea.get(p), eb.get(p)) for p in paths if ea.get(p) != eb.get(p))
    unheld_a = tuple(p for p in unheld_a if _matches(pattern, p))
    unheld_b = tuple(p for p in unheld_b if _matches(pattern, p))
    return entries, len(paths), unheld_a, unheld_b


def _only_matching(
    pattern: str | None,
    pairs: list[tuple[str, str]],
    only_a: tuple[str, ...],
    only_b: tuple[str, ...],
) -> tuple[list[tuple[str, str]], tuple[str, ...], tuple[str, ...]]:
    """The pairs and the keys of one side whose name matches ``pattern`` (all without one)."""
    return (
        [p for p in pairs if _matches(pattern, *p)],
        tuple(k for k in only_a if _matches(pattern, k)),
        tuple(k for k in only_b if _matches(pattern, k)),
    )


def _matches(pattern: str | None, *names: str) -> bool:
    """Whether one of ``names`` matches the glob ``pattern`` (every name without one)."""
    return pattern is None or any(fnmatch.fnmatchcase(n, pattern) for n in names)


def _config_tied(
    a: Side, b: Side, matched: dict[str, str], only_a: tuple[str, ...], only_b: tuple[str, ...]
) -> tuple[list[tuple[str, str]], tuple[str, ...], tuple[str, ...], list[str]]:
    """The pairs to compare, the keys left only in A and only in B, and a note per tied name
    a Hugging Face folder stores once because its ``config.json`` ties them
    (``tie_word_embeddings``): a key only the other side holds, whose tensor there is the
    same as that of a matched key, is compared with the folder's tensor for that key
    (``lm_head.weight`` with ``transformer.wte.weight``)."""
    pairs = list(matched.items())
    by_b = {kb: ka for ka, kb in matched.items()}
    notes: list[str] = []
    done_a, done_b = set(), set()
    for k in only_a if b.ties_config else ():
        p = next((p for p in a.tied.get(k, ()) if p in matched), None)
        if p is not None:
            pairs.append((k, matched[p]))
            done_a.add(k)
            notes.append(f"B stores {k} once as {matched[p]} (its config.json ties them)")
    for k in only_b if a.ties_config else ():
        p = next((p for p in b.tied.get(k, ()) if p in by_b), None)
        if p is not None:
            pairs.append((by_b[p], k))
            done_b.add(k)
            notes.append(f"A stores {k} once as {by_b[p]} (its config.json ties them)")
    only_a = tuple(k for k in only_a if k not in done_a)
    only_b = tuple(k for k in only_b if k not in done_b)
    return pairs, only_a, only_b, notes


def _compare_matched(
    side_a: Side,
    side_b: Side,
    matched: list[tuple[str, str]],
    values: bool,
    atol: float,
    rtol: float,
    progress: ProgressFactory | None,
) -> tuple[TensorDiff, ...]:
    """Every matched pair compared, streamed from the inputs' files."""
    total = sum(side_a.tensors[ka].nbytes + side_b.tensors[kb].nbytes for ka, kb in matched)
    tick = progress(total) if progress is not None else None
    files = Files()
    try:
        return tuple(
            compare_tensors(
                side_a.tensors[ka],
                side_b.tensors[kb],
                files,
                values=values,
                atol=atol,
                rtol=rtol,
                progress=tick,
            )
            for ka, kb in matched
        )
    finally:
        files.close()


def diff(
    a: str | os.PathLike[str] | Any,
    b: str | os.PathLike[str] | Any,
    *,
    values: bool = False,
    atol: float = 0.0,
    rtol: float = 0.0,
    all_tensors: bool = False,
    tensor_filter: str | None = None,
    progress: ProgressFactory | None = None,
) -> DiffResult:
    """Compare checkpoints A and B (any formats ckpttool reads, mixed).

    The model state dicts are compared when both hold one (else every tensor by its dotted
    path); keys that differ only by a wrapper prefix are aligned (``result.alignment``).
    A safetensors side holds its tied tensors under every name (``ckpttool.aliases``, and
    :func:`_config_tied`); against it only what safetensors can hold is compared
    (:func:`_entries`): ``to-safetensors``' output compares equal to its input.
    Tensors in both are compared bit for bit, streamed piece by piece; with ``values`` also max
    and mean absolute difference, relative L2 and the number of elements outside
    ``atol + rtol * |b|`` (float64 arithmetic).

    Args:
        a, b: paths (or opened checkpoints, see :func:`open_side`).
        values: compute value statistics for every pair (reads every element).
        atol, rtol: tolerances for counting differing elements (with ``values``).
        all_tensors: compare every tensor by path, not the model state dicts; tensor_filter:
            a glob (``"encoder.*"``): only tensors and entries whose name on a side matches.
        progress: called with the bytes to read; may return a callback fed bytes read.

    Returns a :class:`DiffResult` (``equal`` is False when anything differs), e.g.
    ``diff("best.pth", "best.safetensors", values=True).changed``.
    """
    side_a, side_b = _open_sides(a, b, all_tensors)
    alignment, matched, only_a, only_b = _match(list(side_a.tensors), list(side_b.tensors))
    to_compare, only_a, only_b, tied = _config_tied(side_a, side_b, matched, only_a, only_b)
    to_compare, only_a, only_b = _only_matching(tensor_filter, to_compare, only_a, only_b)
    pairs = _compare_matched(side_a, side_b, to_compare, values, atol, rtol, progress)
    entries, compared, unheld_a, unheld_b = _entries(side_a, side_b, tensor_filter)
    return DiffResult(
        a=side_a.path,
        b=side_b.path,
        scope_a=side_a.scope,
        scope_b=side_b.scope,
        alignment=alignment,
        only_a=only_a,
        only_b=only_b,
        tensors=pairs,
        entries=entries,
        entries_compared=compared,
        values=values,
        atol=atol,
        rtol=rtol,
        left_out_a=side_a.left_out,
        left_out_b=side_b.left_out,
        dangerous=tuple(dict.fromkeys(side_a.dangerous + side_b.dangerous)),
        unheld_a=unheld_a,
        unheld_b=unheld_b,
        notes=tuple(dict.fromkeys([*side_a.notes, *side_b.notes, *tied])),
    )
