"""``diff``: compare two checkpoints of any formats, key by key, tensor by tensor, streamed.

Both inputs are opened as metadata (no tensor bytes), their model state dicts chosen (or every
tensor by path), keys aligned when they differ only by a wrapper prefix, and each pair of
tensors read piece by piece from the two files (memory near one piece, never a whole file).
Non-tensor entries (epoch, args, optimizer settings) are compared by their descriptions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from . import sides
from .mapped import release as _release
from .sides import Files, Operand, Side, open_side

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


# -- comparing tensors ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ValueStats:
    """How far B's values are from A's (computed in float64; NaN matches NaN)."""

    max_abs: float  # max |a - b|
    mean_abs: float  # mean |a - b|
    rel_l2: float  # ||a - b|| / ||a|| (0 when equal, inf when A is all zeros and B is not)
    differing: int  # elements with |a - b| > atol + rtol * |b|
    numel: int


@dataclass(frozen=True)
class TensorDiff:
    """One key present in both inputs."""

    key: str  # A's key
    key_b: str  # B's key (differs from ``key`` when the keys were aligned)
    dtype_a: str
    dtype_b: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    equal: bool | None  # elements bit for bit the same; None when the shapes differ
    stats: ValueStats | None = None  # with values; None when not computed or not comparable

    @property
    def differs(self) -> bool:
        if self.dtype_a != self.dtype_b or self.shape_a != self.shape_b:
            return True
        if self.stats is not None:
            return self.stats.differing > 0
        return not self.equal


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

    @property
    def changed(self) -> tuple[TensorDiff, ...]:
        return tuple(t for t in self.tensors if t.differs)

    @property
    def equal(self) -> bool:
        return not (self.only_a or self.only_b or self.entries or self.alignment or self.changed)


def _pairs(ia: Iterator[Any], ib: Iterator[Any]) -> Iterator[tuple[Any, Any]]:
    """Pieces of two element streams cut to equal lengths, whatever sizes each side yields."""
    a = b = None
    while True:
        if a is None or not len(a):
            a = next(ia, None)
        if b is None or not len(b):
            b = next(ib, None)
        if a is None or b is None:
            return
        n = min(len(a), len(b))
        yield a[:n], b[:n]
        a, b = a[n:], b[n:]


class _Accumulator:
    """Value statistics over the pieces of one pair of tensors, in reused float64 buffers."""

    def __init__(self, atol: float, rtol: float, dtype_a: str, dtype_b: str) -> None:
        import numpy as np

        self.atol, self.rtol = atol, rtol
        self.dtype_a, self.dtype_b = dtype_a, dtype_b
        self.max_abs = 0.0
        self.sum_abs = self.sum_sq = self.ref_sq = 0.0
        self.differing = self.numel = 0
        n = sides.CHUNK_ELEMENTS
        self.fa, self.fb, self.d = np.empty(n), np.empty(n), np.empty(n)
        self.mask = np.empty(n, dtype=bool)

    def add(self, pa: Any, pb: Any, same_bits: bool) -> None:
        import numpy as np

        from ..analysis.arrays import as_float64

        k = len(pa)
        self.numel += k
        fa = as_float64(pa, self.dtype_a, self.fa[:k] if k <= len(self.fa) else None)
        if same_bits:  # nothing differs here: only ||a|| grows
            self._ref(fa)
            return
        fb = as_float64(pb, self.dtype_b, self.fb[:k] if k <= len(self.fb) else None)
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: handled below
            if np.iscomplexobj(fa) or np.iscomplexobj(fb) or k > len(self.d):
                d = np.abs(fa - fb)
            else:
                d = np.subtract(fa, fb, out=self.d[:k])
                np.abs(d, out=d)
        finite = np.isfinite(d).all()
        if not finite:
            d = self._non_finite(fa, fb, d)
        self.max_abs = max(self.max_abs, float(d.max()))
        self.sum_abs += float(d.sum())
        self.sum_sq += float(np.dot(d, d)) if finite else float(np.sum(d * d))
        self._ref(fa)
        if self.atol == 0 and self.rtol == 0:
            self.differing += int(np.count_nonzero(d))
        else:
            with np.errstate(invalid="ignore"):
                thr = np.abs(fb) * self.rtol + self.atol
                self.differing += int(np.count_nonzero((d > thr) | np.isinf(d)))

    def _ref(self, fa: Any) -> None:
        import numpy as np

        if np.iscomplexobj(fa):
            fa = np.abs(fa)
        r = float(np.dot(fa, fa))
        if not np.isfinite(r):
            ok = fa[np.isfinite(fa)]
            r = float(np.dot(ok, ok))
        self.ref_sq += r

    @staticmethod
    def _non_finite(fa: Any, fb: Any, d: Any) -> Any:
        """|a - b| where NaN matches NaN and inf matches inf; other NaNs count as inf."""
        import numpy as np

        with np.errstate(invalid="ignore"):
            same = (fa == fb) | (np.isnan(fa) & np.isnan(fb))
        d = np.where(same, 0.0, d)
        d[np.isnan(d)] = np.inf
        return d

    def stats(self) -> ValueStats:
        if self.sum_sq == 0:
            rel = 0.0
        else:
            rel = math.sqrt(self.sum_sq) / math.sqrt(self.ref_sq) if self.ref_sq else math.inf
        mean = self.sum_abs / self.numel if self.numel else 0.0
        return ValueStats(self.max_abs, mean, rel, self.differing, self.numel)


def compare_tensors(
    a: Operand,
    b: Operand,
    files: Files,
    *,
    values: bool = False,
    atol: float = 0.0,
    rtol: float = 0.0,
    progress: Progress | None = None,
) -> TensorDiff:
    """Compare two tensors piece by piece: bit equality, and with ``values`` the statistics."""
    import numpy as np

    from ..analysis.arrays import PACKED, bits_view

    same_kind = a.dtype == b.dtype
    if a.shape != b.shape:
        return TensorDiff(a.name, b.name, a.dtype, b.dtype, a.shape, b.shape, None)
    want_values = values and a.dtype not in PACKED and b.dtype not in PACKED
    acc = _Accumulator(atol, rtol, a.dtype, b.dtype) if want_values else None
    equal = same_kind
    for pa, pb in _pairs(a.chunks(files), b.chunks(files)):
        same = same_kind and np.array_equal(bits_view(pa), bits_view(pb))
        equal = equal and same
        if acc is not None:
            acc.add(pa, pb, same)
        elif not equal:
            break
        _release(pa)
        _release(pb)
        if progress:
            progress(pa.nbytes + pb.nbytes)
    stats = acc.stats() if acc is not None else None
    return TensorDiff(a.name, b.name, a.dtype, b.dtype, a.shape, b.shape, equal, stats)


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


def _compare_matched(
    side_a: Side,
    side_b: Side,
    matched: dict[str, str],
    values: bool,
    atol: float,
    rtol: float,
    progress: ProgressFactory | None,
) -> tuple[TensorDiff, ...]:
    """Every matched pair compared, streamed from the inputs' files."""
    total = sum(side_a.tensors[ka].nbytes + side_b.tensors[kb].nbytes for ka, kb in matched.items())
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
            for ka, kb in matched.items()
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
    progress: ProgressFactory | None = None,
) -> DiffResult:
    """Compare checkpoints A and B (any formats ckpttool reads, mixed).

    The model state dicts are compared when both hold one (else every tensor by its dotted
    path); keys that differ only by a wrapper prefix are aligned (``result.alignment``).
    Tensors in both are compared bit for bit, streamed piece by piece; with ``values`` also max
    and mean absolute difference, relative L2 and the number of elements outside
    ``atol + rtol * |b|`` (float64 arithmetic).

    Args:
        a, b: paths (or opened checkpoints, see :func:`open_side`).
        values: compute value statistics for every pair (reads every element).
        atol, rtol: tolerances for counting differing elements (with ``values``).
        all_tensors: compare every tensor by path, not the model state dicts.
        progress: called once with the bytes to read; may return a callback that receives
            the number of bytes read after each piece.

    Returns:
        A :class:`DiffResult`; ``result.equal`` is False when anything differs.

    Example:
        >>> r = diff("best.pth", "best.safetensors", values=True)
        >>> r.equal, [t.key for t in r.changed]
    """
    side_a, side_b = _open_sides(a, b, all_tensors)
    alignment, matched, only_a, only_b = _match(list(side_a.tensors), list(side_b.tensors))
    pairs = _compare_matched(side_a, side_b, matched, values, atol, rtol, progress)
    entries = tuple(
        EntryDiff(p, side_a.entries.get(p), side_b.entries.get(p))
        for p in dict.fromkeys([*side_a.entries, *side_b.entries])
        if side_a.entries.get(p) != side_b.entries.get(p)
    )
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
        entries_compared=len(set(side_a.entries) | set(side_b.entries)),
        values=values,
        atol=atol,
        rtol=rtol,
        left_out_a=side_a.left_out,
        left_out_b=side_b.left_out,
        dangerous=tuple(dict.fromkeys(side_a.dangerous + side_b.dangerous)),
    )
