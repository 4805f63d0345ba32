"""The hot casts, block by block into reused buffers, on every core.

Casts between float32, float16 and bfloat16 run compiled where the optional extension
``_fastcast`` was built (``setup.py``; one pass over memory, the GIL released): see
:func:`compiled`. Else, and for the other pairs, numpy does the work:
float32 -> float16 and float32 -> bfloat16 round with integer kernels that give the bits torch's
``.to(dtype)`` gives (round to nearest even, overflow to infinity, subnormals kept; NaN fixed by
:func:`fix_nan`); 2-byte sources go through a table of every pattern. Each kernel
runs over blocks small enough for the CPU's cache, writing into buffers allocated once per
thread (numpy's temporaries cost as much as the arithmetic), and a big array is cut in parts
cast on a pool of threads (numpy releases the GIL inside each operation).

:func:`ahead` runs a producer of chunks (read, gather, cast) one step ahead of the consumer
that writes and checksums them, so that both use a core.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import numpy as np

BLOCK = 1 << 15  # elements per kernel step: a block and its temporaries stay in the L2 cache
PART = 1 << 20  # the fewest elements worth a thread of their own
T = TypeVar("T")

_local = threading.local()
_pool: Any = None
_pool_lock = threading.Lock()

try:  # the compiled casts, where setup.py could build them (bits are little-endian here)
    from . import _fastcast  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - a build without a C compiler
    _fastcast = None
if sys.byteorder != "little":  # pragma: no cover - the C loops read native integers
    _fastcast = None
_KIND = {"float32": 0, "float16": 1, "bfloat16": 2}  # _fastcast's codes
_use_compiled = _fastcast is not None


def compiled(src: str, dst: str) -> bool:
    """Whether a ``src`` -> ``dst`` cast runs in the compiled extension (float32, float16 and
    bfloat16 among themselves, when it was built and not turned off by :func:`use_compiled`)."""
    return _use_compiled and src != dst and src in _KIND and dst in _KIND


def use_compiled(on: bool) -> bool:
    """Turn the compiled casts on or off (tests compare both); returns the previous setting.
    Turning them on without the extension built leaves them off."""
    global _use_compiled
    before, _use_compiled = _use_compiled, on and _fastcast is not None
    return before


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads() -> int:
    """How many threads a cast uses: one, plus the cores beyond two (at most 4 in all).

    The writer's own thread copies every byte into the page cache too: on two cores, a second
    cast thread and the writer compete for the same memory bandwidth and the kernel's copy
    got slower than the cast got faster (measured: 2 GB cast to bfloat16 took 8-11 s with,
    6 s without).
    """
    return max(1, min(4, cores() - 1))


def overlap() -> bool:
    """Whether to read and cast one chunk ahead of the writer in a thread (three cores or
    more: see :func:`threads`)."""
    return cores() >= 3


def _scratch(name: str, dtype: Any, size: int = BLOCK) -> np.ndarray:
    """A buffer of at least ``size`` elements (:data:`BLOCK` or more) owned by this thread,
    cut to ``size`` (allocated once, grown when a caller passes bigger blocks)."""
    import numpy as np

    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(name)
    if buf is None or buf.size < size:
        buf = bufs[name] = np.empty(max(size, BLOCK), dtype=dtype)
    return buf[:size]


def fix_nan(
    out: np.ndarray, src: np.ndarray, sw: int, se: int, sm: int, dw: int, de: int, dm: int
) -> None:
    """Give every NaN of ``src`` (IEEE layout: width, exponent, mantissa bits) the NaN that
    keeps its sign and top payload bits, quiet, in ``out``'s layout. In place."""
    import numpy as np

    st = src.dtype.type
    if sw in (32, 64):  # numpy's isnan is vectorised for these
        mask = np.isnan(src.view(np.float32 if sw == 32 else np.float64))
    else:
        mask = (src & st((1 << (sw - 1)) - 1)) > st(((1 << se) - 1) << sm)
    if not mask.any():
        return
    dt = out.dtype.type
    s = src[mask].astype(np.uint64)
    sign = (s >> np.uint64(sw - 1)) << np.uint64(dw - 1)
    mant = s & np.uint64((1 << sm) - 1)
    mant = mant << np.uint64(dm - sm) if dm >= sm else mant >> np.uint64(sm - dm)
    quiet = np.uint64(1 << (dm - 1))
    exp = np.uint64(((1 << de) - 1) << dm)
    out[mask] = (sign | exp | quiet | mant).astype(dt)


def _constant(name: str, value: int, dtype: Any, size: int) -> np.ndarray:
    """``size`` copies of ``value``, owned by this thread: numpy's minimum and maximum against
    an array run several times faster than against a scalar."""
    import numpy as np

    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(name)
    if buf is None or buf.size < size:
        buf = bufs[name] = np.full(max(size, BLOCK), value, dtype=dtype)
    return buf[:size]


def _f32_to_f16(u: np.ndarray, out: np.ndarray) -> bool:
    """float32 bits -> float16 bits, nearest even. True if NaN was seen.

    Two candidates, the smaller wins, with no branch and no masked copy (a block of real
    weights nearly always holds some float16 subnormals): ``t``, the normal-range rounding
    (F. Giesen's method) of the magnitude raised to float16's smallest normal, capped at
    infinity; and ``g``, the magnitude plus 0.5 in float32 arithmetic, whose low bits are the
    float16 subnormal rounded to nearest even (equal to ``t`` at 2**-14, larger above it).
    """
    import numpy as np

    U, S = np.uint32, np.int32
    k = u.size
    f, t, g = _scratch("a", U, k), _scratch("b", U, k), _scratch("c", U, k)
    fi, ti, gi = f.view(S), t.view(S), g.view(S)
    np.bitwise_and(u, U(0x7FFFFFFF), out=f)
    np.add(f.view(np.float32), np.float32(0.5), out=g.view(np.float32))  # before f is raised
    nan = bool(f.max() > U(0x7F800000))
    np.maximum(fi, _constant("min_normal", 113 << 23, S, k), out=fi)  # 2**-14
    np.right_shift(f, U(13), out=t)
    np.bitwise_and(t, U(1), out=t)
    np.add(t, f, out=t)
    np.add(t, U(0xC8000FFF), out=t)  # ((15 - 127) << 23) + 0xFFF, modulo 2**32
    np.right_shift(t, U(13), out=t)
    np.minimum(ti, _constant("f16_inf", 0x7C00, S, k), out=ti)  # 65520 and above: infinity
    np.subtract(g, U(0x3F000000), out=g)  # 0.5's bits: what is left is float16's
    np.minimum(ti, gi, out=ti)
    np.right_shift(u, U(16), out=g)
    np.bitwise_and(g, U(0x8000), out=g)
    np.bitwise_or(t, g, out=t)
    np.copyto(out, t, casting="unsafe")
    return nan


def _f32_to_bf16(u: np.ndarray, out: np.ndarray) -> bool:
    """float32 bits -> bfloat16 bits, nearest even. True if NaN was seen."""
    import numpy as np

    U = np.uint32
    t = _scratch("b", U, u.size)
    np.right_shift(u, U(16), out=t)
    np.bitwise_and(t, U(1), out=t)
    np.add(t, U(0x7FFF), out=t)
    np.add(t, u, out=t)  # wraps only for NaN, fixed by the caller
    np.right_shift(t, U(16), out=t)
    np.copyto(out, t, casting="unsafe")
    return bool(np.isnan(u.view(np.float32).max()))  # a max propagates NaN: one pass


def _widen_bf16(b: np.ndarray, out: np.ndarray) -> bool:
    """bfloat16 bits -> float32 bits (exact, NaN kept as it is, as torch does)."""
    import numpy as np

    np.copyto(out, b, casting="unsafe")
    np.left_shift(out, np.uint32(16), out=out)
    return False


KERNELS: dict[tuple[str, str], Callable[[Any, Any], bool]] = {
    ("float32", "float16"): _f32_to_f16,
    ("float32", "bfloat16"): _f32_to_bf16,
    ("bfloat16", "float32"): _widen_bf16,
}
_NAN_LAYOUT = {"float16": (16, 5, 10), "bfloat16": (16, 8, 7)}


def cast_blocks(
    bits: np.ndarray,
    out: np.ndarray,
    src: str,
    dst: str,
    generic: Callable[..., Any],
    *,
    block: int = BLOCK,
    table: np.ndarray | None = None,
) -> None:
    """Cast ``bits`` into ``out``: compiled in one call where :func:`compiled` says so; else
    ``block`` elements at a time (this thread's buffers) with a kernel of this module, else by
    looking each pattern up in ``table`` straight into ``out`` (no array per block), else with
    ``generic(block, src, dst)``. The two arrays must not overlap."""
    import numpy as np

    if compiled(src, dst):
        _fastcast.cast(_KIND[src], _KIND[dst], bits, out)
        return
    kernel = KERNELS.get((src, dst))
    for i in range(0, bits.size, block):
        b, o = bits[i : i + block], out[i : i + block]
        if kernel is not None:
            if kernel(b, o) and dst in _NAN_LAYOUT:
                fix_nan(o, b, 32, 8, 23, *_NAN_LAYOUT[dst])
        elif table is not None:  # mode="raise" would buffer ``out``; no pattern is out of range
            np.take(table, b, out=o, mode="clip")
        else:
            o[...] = generic(b, src, dst)


def cast_into(
    bits: np.ndarray,
    out: np.ndarray,
    src: str,
    dst: str,
    generic: Callable[..., Any],
    table: np.ndarray | None = None,
) -> None:
    """Cast a 1-D contiguous array of ``src`` bits into ``out`` (``dst`` bits), in parts on a
    pool of threads when it is big (:func:`cast_blocks` says how)."""
    n = threads()
    if n == 1 or bits.size < 2 * PART:
        cast_blocks(bits, out, src, dst, generic, table=table)
        return
    step = -(-bits.size // n)
    step += -step % BLOCK
    pool = _executor()
    parts = [(bits[i : i + step], out[i : i + step]) for i in range(0, bits.size, step)]
    jobs = [pool.submit(_part_with_errstate, b, o, src, dst, generic, table) for b, o in parts]
    for job in jobs:
        job.result()


def _part_with_errstate(*args: Any) -> None:
    import numpy as np

    with np.errstate(all="ignore"):  # numpy's error state is per thread
        cast_blocks(*args[:5], table=args[5])


def _executor() -> Any:
    global _pool
    with _pool_lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor

            _pool = ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="ckpttool-cast")
        return _pool


# -- reused output buffers -------------------------------------------------------------------------
class Ring:
    """``count`` byte buffers handed out in turn, grown as needed and kept while the ring
    lives (one ring per output file): fresh 16 MB arrays, allocated and freed per chunk or per
    tensor, cost their page faults in the kernel (zeroing huge pages: measured at several
    times the cast itself). A buffer is reused ``count`` requests later: its holder must be
    done with it by then (:func:`ahead` with ``depth`` d keeps at most d + 2 items alive)."""

    def __init__(self, count: int = 3) -> None:
        self.bufs: list[Any] = [None] * count
        self.turn = 0
        self.source: Any = None

    def reading(self, nbytes: int) -> np.ndarray:
        """A uint8 array of ``nbytes`` to read input into: one buffer, apart from the ring's
        (its chunk is consumed before the next is read)."""
        import numpy as np

        if self.source is None or self.source.size < nbytes:
            self.source = np.empty(max(nbytes, 1), dtype=np.uint8)
        return self.source[:nbytes]

    def get(self, nbytes: int) -> np.ndarray:
        """A uint8 array of ``nbytes`` (a view of the next buffer)."""
        import numpy as np

        k = self.turn
        self.turn = (k + 1) % len(self.bufs)
        buf = self.bufs[k]
        if buf is None or buf.size < nbytes:
            buf = self.bufs[k] = np.empty(max(nbytes, 1), dtype=np.uint8)
        return buf[:nbytes]


# -- one step ahead ------------------------------------------------------------------------------
_DONE = object()


def ahead(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Yield ``items`` as they are, produced by a background thread up to ``depth`` ahead
    (or as they come where :func:`overlap` says a thread would not pay).

    An exception in the producer is raised here, at the item where it happened; leaving the
    loop early (an error, an interruption) stops the producer at its next item.
    """
    if not overlap():
        yield from items
        return
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if not _put(q, (item, None), stop):
                    return
        except BaseException as exc:  # handed to the consumer
            _put(q, (_DONE, exc), stop)
            return
        _put(q, (_DONE, None), stop)

    worker = threading.Thread(target=produce, name="ckpttool-ahead", daemon=True)
    worker.start()
    try:
        while True:
            item, exc = q.get()
            if exc is not None:
                raise exc
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        worker.join()


def _put(q: queue.Queue[Any], entry: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(entry, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False
