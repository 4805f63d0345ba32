"""Running the restricted unpickler and turning every way it can fail into a CheckpointError."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import IO, Any

from ..errors import CheckpointError
from ..model import StorageInfo, TensorRef
from ..unpickler import SafeUnpickler, StorageType, UnpickleRefused


def unpickle(
    path: str,
    file: IO[bytes],
    what: str,
    resolve: Callable[[StorageType, str, str, int], StorageInfo] | None = None,
) -> tuple[Any, SafeUnpickler]:
    """Load one pickle from ``file``; ``what`` names it in errors (``data.pkl``)."""
    unpickler = SafeUnpickler(file, resolve)
    try:
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
    except (pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise CheckpointError(path, f"{what} is corrupt ({_reason(exc)})") from None
    except Exception as exc:  # the C unpickler raises assorted errors on junk
        raise CheckpointError(path, f"{what} is corrupt ({_reason(exc)})") from None
    return obj, unpickler


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
