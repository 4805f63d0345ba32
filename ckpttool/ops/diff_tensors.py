"""Comparing two tensors piece by piece: bit equality and value statistics (``diff``).

Each side yields its elements in C order as 1-D numpy pieces (``sides.Operand``); the pieces
are cut to equal lengths and compared as raw bits, and with ``values`` their differences are
accumulated in float64 buffers reused from piece to piece.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import sides
from .mapped import release as _release
from .sides import Files, Operand

Progress = Callable[[int], None]


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
