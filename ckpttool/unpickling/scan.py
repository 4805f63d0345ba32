"""Running the restricted unpickler and turning every way it can fail into a CheckpointError."""

from __future__ import annotations

import contextlib
import io
import re
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any, cast

from ..errors import CheckpointError
from ..model import Opaque, StorageInfo, TensorRef
from .parsed import was_parsed
from .unpickler import SafeUnpickler, StorageType, UnpickleRefused

MAX_DEPTH = 1000  # real checkpoints nest a few dozen levels; deeper is an attack on walkers


@contextlib.contextmanager
def _quiet_unraisable() -> Iterator[None]:
    """CPython's unpickler can report a SystemError through sys.unraisablehook when a huge
    allocation fails midway; it is already turned into one clear error here, so hush it."""
    old = sys.unraisablehook
    sys.unraisablehook = lambda _unraisable: None
    try:
        yield
    finally:
        sys.unraisablehook = old


class _SizeBomb(ValueError):
    pass


_BOMB = 1 << 20


class _BoundedReader:
    """A read-only view of a file that refuses reads past ``end`` instead of allocating them,
    so that scanning a pickle's opcodes never allocates what a hostile opcode declares."""

    def __init__(self, f: IO[bytes], end: int) -> None:
        self.f = f
        self.end = end

    def read(self, n: int = -1) -> bytes:
        left = self.end - self.f.tell()
        if n < 0 or n > left:
            if n > _BOMB:  # what CPython would allocate before finding the data short
                raise _SizeBomb(f"declares {n:,} bytes but only {max(left, 0):,} remain")
            raise EOFError("truncated")
        return self.f.read(n)

    def readline(self) -> bytes:
        return self.f.readline(max(self.end - self.f.tell(), 0))


_MEMO_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})


def _scan(f: IO[bytes], end: int) -> tuple[str | None, int | None]:
    """Walk one pickle's opcodes with bounded reads (about 15 ms for a 200 KB pickle).

    Returns (a size bomb found, the offset where the opcodes stop parsing). CPython's
    unpickler allocates what BYTEARRAY8 or a memo index declares before it notices that the
    data is short (and can leak it), so such pickles never reach it; a pickle that stops
    parsing is only unpickled up to that point.
    """
    import pickletools  # only for a pickle the verdict's walk did not parse (3 ms to import)

    start = f.tell()
    good = start
    try:
        reader = cast(IO[bytes], _BoundedReader(f, end))  # genops needs read()/tell() only
        for op, arg, _pos in pickletools.genops(reader):
            if op.name in _MEMO_OPS and isinstance(arg, int) and arg > end - start:
                return f"uses memo index {arg:,}, more than it has bytes", None
            good = f.tell()
    except _SizeBomb as exc:
        return str(exc), None
    except Exception:
        return None, good
    return None, None


def unpickle(
    path: str,
    file: IO[bytes],
    what: str,
    resolve: Callable[[StorageType, str, str, int], StorageInfo] | None = None,
    seen: dict[str, str] | None = None,
    end: int | None = None,
    *,
    scan: bool = True,
) -> tuple[Any, SafeUnpickler]:
    """Load one pickle from ``file``; ``what`` names it in errors (``data.pkl``).

    ``seen`` collects every global named, also when loading fails, so that a hostile file is
    reported as dangerous even when it is broken too.
    """
    if scan and isinstance(file, io.BytesIO) and file.tell() == 0:
        scan = not was_parsed(file.getbuffer())  # the verdict's walk parsed it already
    if scan and (isinstance(file, io.BytesIO) or end is not None):
        start = file.tell()
        limit = len(file.getbuffer()) if isinstance(file, io.BytesIO) else end
        assert limit is not None
        bomb, stop = _scan(file, limit)
        file.seek(start)
        if bomb:
            raise CheckpointError(path, f"{what} {bomb} (a corrupt or hostile pickle)")
        if stop is not None:
            # Unpickle only what parses, to learn the globals it names; then report it.
            head = io.BytesIO(file.read(stop - start))
            try:
                unpickle(path, head, what, resolve, seen, scan=False)
            except CheckpointError as exc:
                raise CheckpointError(
                    path, exc.message.replace(" is truncated", " is corrupt")
                ) from None
            raise CheckpointError(path, f"{what} is corrupt")
    unpickler = SafeUnpickler(file, resolve, seen)
    try:
        with _quiet_unraisable():
            obj = unpickler.load()
    except CheckpointError:
        raise
    except UnpickleRefused as exc:
        raise CheckpointError(path, f"{what}: {exc}") from None
    except MemoryError:
        raise CheckpointError(
            path, f"{what} declares an object too large to load (a corrupt or hostile pickle)"
        ) from None
    except RecursionError:
        raise CheckpointError(path, f"{what} is nested too deeply") from None
    except EOFError:
        raise CheckpointError(path, f"{what} is truncated") from None
    except Exception as exc:  # the C unpickler raises assorted errors on junk
        raise CheckpointError(path, f"{what} is corrupt ({_reason(exc)})") from None
    _check_depth(path, what, obj)
    return obj, unpickler


def _check_depth(path: str, what: str, root: Any) -> None:
    """Refuse trees nested deeper than MAX_DEPTH, so every later walk stays cheap."""
    if not isinstance(root, _CONTAINERS):
        return
    stack: list[tuple[Any, int]] = [(root, 0)]
    seen: set[int] = set()
    while stack:
        node, depth = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, Opaque):
            kids: Any = [*node.values(), *node.list_items, node.state, node.args]
        else:
            kids = node.values() if isinstance(node, dict) else node
        if depth >= MAX_DEPTH and len(kids):  # a child, container or not, lies deeper
            raise CheckpointError(path, f"{what} is nested more than {MAX_DEPTH} levels deep")
        # only containers go on the stack (a checkpoint's leaves, its tensors, are most nodes)
        stack.extend((k, depth + 1) for k in kids if isinstance(k, _CONTAINERS))


_CONTAINERS = (dict, list, tuple, set, frozenset)


def check_views(path: str, tensors: list[TensorRef]) -> None:
    """Refuse any tensor whose view reaches past the end of its storage."""
    sizes: dict[str, int] = {}  # itemsize by dtype, looked up once per dtype
    for ref in tensors:
        storage = ref.storage
        if storage is None:
            raise CheckpointError(path, "a tensor has no storage (corrupt pickle)")
        lo, hi = ref.extent()
        if hi <= lo:
            continue
        if ref.dtype not in sizes:
            sizes[ref.dtype] = ref.itemsize
        if storage.dtype not in sizes:
            sizes[storage.dtype] = storage.itemsize
        if hi * sizes[ref.dtype] > storage.numel * sizes[storage.dtype]:  # storage.nbytes
            raise CheckpointError(
                path,
                f"a {ref.dtype} tensor of shape {list(ref.shape)} at offset {ref.storage_offset} "
                f"reaches past the end of storage {storage.key!r} ({storage.numel} elements)",
            )


# ckpttool's own stand-ins: an error about them says nothing about the file (and must not leak)
_INTERNAL = re.compile(
    r"Opaque|_Named|TensorRef|StorageType|StorageInfo|StorageView|StorageValue|DTypeRef|"
    r"SafeUnpickler|ckpttool|__ck_|ck_"
)


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if _INTERNAL.search(text):
        return "an opcode applied to a value it does not fit"
    return text[:120]
