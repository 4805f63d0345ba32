"""Running the restricted unpickler and turning every way it can fail into a CheckpointError."""

from __future__ import annotations

import contextlib
import io
import pickletools
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any

from ..errors import CheckpointError
from ..model import Opaque, StorageInfo, TensorRef
from ..unpickler import SafeUnpickler, StorageType, UnpickleRefused

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


def _check_declared_sizes(data: bytes) -> str | None:
    """A bytearray8/bytes8 opcode that claims more bytes than the pickle has (an allocation
    bomb: CPython allocates before reading). Only scanned when such an opcode may be present."""
    if b"\x96" not in data and b"\x8e" not in data:
        return None
    try:
        for _op, _arg, _pos in pickletools.genops(io.BytesIO(data)):
            pass
    except ValueError as exc:
        text = str(exc)
        if "bytearray8" in text or "bytes8" in text:
            return text.split(",")[0]
    except Exception:
        return None  # other junk is left to the unpickler, which reports it
    return None


def unpickle(
    path: str,
    file: IO[bytes],
    what: str,
    resolve: Callable[[StorageType, str, str, int], StorageInfo] | None = None,
    seen: dict[str, str] | None = None,
) -> tuple[Any, SafeUnpickler]:
    """Load one pickle from ``file``; ``what`` names it in errors (``data.pkl``).

    ``seen`` collects every global named, also when loading fails, so that a hostile file is
    reported as dangerous even when it is broken too.
    """
    if isinstance(file, io.BytesIO):
        bomb = _check_declared_sizes(file.getbuffer().tobytes())
        if bomb:
            raise CheckpointError(path, f"{what} declares an impossible size ({bomb})")
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
    stack: list[tuple[Any, int]] = [(root, 0)]
    seen: set[int] = set()
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise CheckpointError(path, f"{what} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, (dict, list, tuple, set, frozenset)):
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, Opaque):
                kids: list[Any] = [*node.values(), *node.list_items, node.state, node.args]
            elif isinstance(node, dict):
                kids = list(node.values())
            else:
                kids = list(node)
            stack.extend((k, depth + 1) for k in kids)


def check_views(path: str, tensors: list[TensorRef]) -> None:
    """Refuse any tensor whose view reaches past the end of its storage."""
    for ref in tensors:
        storage = ref.storage
        if storage is None:
            raise CheckpointError(path, "a tensor has no storage (corrupt pickle)")
        lo, hi = ref.extent()
        if hi > lo and hi * ref.itemsize > storage.nbytes:
            raise CheckpointError(
                path,
                f"a {ref.dtype} tensor of shape {list(ref.shape)} at offset {ref.storage_offset} "
                f"reaches past the end of storage {storage.key!r} ({storage.numel} elements)",
            )


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:120]
