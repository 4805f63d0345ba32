"""Helpers for tests, benchmarks and fixture generation: fake GPU saves on a CPU-only machine.

``torch.save`` records, for every storage, a *location tag* ("cpu", "cuda:0", ...) computed by
the taggers in ``torch.serialization._package_registry``.  That tag is the only trace of the
device in the file: the bytes of a CUDA storage are copied to the host before they are written.
So a CPU tensor saved while a tagger answers ``"cuda:0"`` yields exactly the file a GPU save
writes, and ``torch.load`` on a CPU-only machine fails on it the same way.

:func:`saved_as` installs such a tagger through torch's public extension point
:func:`torch.serialization.register_package` for the duration of a ``with`` block::

    with saved_as("cuda:0"):
        torch.save(model.state_dict(), "ckpt.pt")

    # model parallel: pick the device per storage
    where = {p.untyped_storage().data_ptr(): f"cuda:{i}" for i, p in enumerate(params)}
    with saved_as(lambda storage: where.get(storage.data_ptr())):
        torch.save(state_dict, "mp.pt")

The legacy (pre-1.6, non-zip) format names each storage by the address of its C++ object, so two
legacy saves of the same object differ.  :func:`save_legacy` writes that format with stable,
address-like keys so that fixtures stay byte-for-byte reproducible.

This module imports torch and changes process-global torch state while a context is active; it is
meant for tests, benchmarks and fixture generation only, never for the CLI.  The registry is
shared by all threads, so do not save from other threads while :func:`saved_as` is active.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, TypeAlias

import torch
import torch.serialization

__all__ = ["Location", "save_as", "save_legacy", "saved_as"]

#: A fixed tag for every storage, or a function of the (untyped) storage returning a tag, or
#: ``None`` to leave that storage to torch's own taggers (which say "cpu" for CPU storages).
Location: TypeAlias = str | Callable[[torch.UntypedStorage], str | None]

_PackageEntry: TypeAlias = tuple[
    int,
    Callable[[Any], str | None],
    Callable[[Any, str], Any],
]


def _never_deserialize(storage: Any, location: str) -> None:
    """Deserializer half of the registry entry: never claims a storage, so loading is unchanged."""
    return None


def _as_torch_returns_it(tag: str) -> str:
    """Return ``tag`` as the same object or a fresh copy, the way torch's own taggers do.

    The pickler memoizes by object identity.  Torch's taggers return constants for index-less
    tags ("cpu", "meta", "mps", "cuda"), which get pickled once and then referenced, but build a
    new string for every storage with an index (``"cuda" + ":" + str(index)``), which is then
    written out in full each time.  Matching this keeps the pickle bytes identical to a GPU save.
    """
    if ":" not in tag:
        return sys.intern(tag)
    return (tag + "\0")[:-1]  # a new str object with the same value


def _make_tagger(location: Location) -> Callable[[Any], str | None]:
    if isinstance(location, str):
        if not location:
            raise ValueError("location must be a non-empty string such as 'cuda:0'")
        tag = location

        def fixed_tagger(storage: Any) -> str | None:
            return _as_torch_returns_it(tag)

        return fixed_tagger
    if callable(location):
        func = location

        def tagger(storage: Any) -> str | None:
            result = func(storage)
            if result is None:
                return None
            if not isinstance(result, str) or not result:
                raise TypeError(
                    f"saved_as location callable must return a non-empty str or None, "
                    f"got {result!r}"
                )
            return _as_torch_returns_it(result)

        return tagger
    raise TypeError(f"location must be a str or a callable, got {type(location).__name__}")


@contextmanager
def saved_as(location: Location) -> Iterator[None]:
    """Make ``torch.save`` tag storages with ``location`` while the block runs.

    Args:
        location: a tag such as ``"cuda:0"`` applied to every storage, or a callable that receives
            each storage being saved (a ``torch.UntypedStorage``; use ``storage.data_ptr()`` to
            recognise particular tensors) and returns its tag, or ``None`` to fall back to torch's
            normal tagging.

    Works for the zip format and for the legacy format (``_use_new_zipfile_serialization=False``),
    since both ask :func:`torch.serialization.location_tag`.  Loading is not affected.  Nested
    uses are allowed; the innermost wins.  On exit (also on exceptions) exactly the registry entry
    added here is removed, whatever else was registered meanwhile.
    """
    tagger = _make_tagger(location)
    registry: list[_PackageEntry] = torch.serialization._package_registry
    # Lower number = asked first.  The priority must be unique as well: the registry is kept
    # sorted as tuples, and a priority tie would make ``sort()`` compare two functions (TypeError).
    priority = min([10, *(entry[0] for entry in registry)]) - 1
    torch.serialization.register_package(priority, tagger, _never_deserialize)
    try:
        yield
    finally:
        for index, entry in enumerate(registry):
            if entry[1] is tagger:
                del registry[index]
                break


def save_as(
    obj: object,
    path: str | os.PathLike[str] | IO[bytes],
    location: Location,
    *,
    legacy: bool = False,
) -> None:
    """``torch.save(obj, path)`` with every storage tagged by ``location`` (see :func:`saved_as`).

    With ``legacy=True`` the pre-1.6 format is written via :func:`save_legacy`.
    """
    with saved_as(location):
        if legacy:
            save_legacy(obj, path)
        else:
            torch.save(obj, path)


# Legacy storage keys look like heap addresses in real files (``str(storage._cdata)``).  Ours are
# equally wide decimal numbers in first-use order, so string order equals first-use order.
_LEGACY_KEY_BASE = 0x5555_5555_0000
_LEGACY_KEY_STEP = 0x1000


class _LegacyKeys:
    """Renames the legacy format's storage keys to fixed address-like numbers while torch's own
    writer runs, and then puts the data blocks into the order of the new keys."""

    def __init__(self) -> None:
        self.key_map: dict[str, str] = {}
        self.blob_size: dict[str, int] = {}  # original key -> bytes of its data block
        self.written_keys: list[list[str]] = []
        self.key_list_span: list[int] = []

    def rename(self, key: str) -> str:
        if key not in self.key_map:
            self.key_map[key] = str(_LEGACY_KEY_BASE + _LEGACY_KEY_STEP * len(self.key_map))
        return self.key_map[key]

    def pickle_module(self) -> types.ModuleType:
        """A ``pickle_module`` for ``torch.save`` whose pickler and ``dump`` rename the keys."""
        rename, blob_size = self.rename, self.blob_size
        written_keys, key_list_span = self.written_keys, self.key_list_span

        class _RenamingPickler(pickle.Pickler):
            """Base for torch's ``PyTorchLegacyPickler``; wraps the ``persistent_id`` it defines."""

            def __init_subclass__(cls, **kwargs: Any) -> None:
                super().__init_subclass__(**kwargs)
                inner = cls.persistent_id

                def persistent_id(self: pickle.Pickler, o: Any) -> Any:
                    pid = inner(self, o)
                    if isinstance(pid, tuple) and pid and pid[0] == "storage":
                        _, storage_type, key, location, numel, view = pid
                        untyped = o._untyped_storage if hasattr(o, "_untyped_storage") else o
                        blob_size[key] = 8 + untyped.nbytes()
                        if view is not None:
                            view = (rename(view[0]), *view[1:])
                        pid = ("storage", storage_type, rename(key), location, numel, view)
                    return pid

                cls.persistent_id = persistent_id  # type: ignore[method-assign]

        def dump(o: Any, f: IO[bytes], protocol: int = 2, **kwargs: Any) -> None:
            # The only list torch dumps directly is the sorted storage key list.
            if isinstance(o, list) and not written_keys and all(isinstance(k, str) for k in o):
                start = f.tell()
                written_keys.append(list(o))
                pickle.dump(sorted(rename(k) for k in o), f, protocol=protocol, **kwargs)
                key_list_span.extend((start, f.tell()))
            else:
                pickle.dump(o, f, protocol=protocol, **kwargs)

        module = types.ModuleType("ckpttool_legacy_pickle")
        module.Pickler = _RenamingPickler  # type: ignore[attr-defined]
        module.dump = dump  # type: ignore[attr-defined]
        return module

    def reorder(self, data: bytes) -> bytes:
        """torch's output with the data blocks in the order of the renamed keys."""
        if not self.written_keys:
            raise RuntimeError(
                "torch.save did not write a storage key list; legacy format changed?"
            )
        blobs: dict[str, bytes] = {}
        pos = self.key_list_span[1]
        for key in self.written_keys[0]:
            blobs[self.rename(key)] = data[pos : pos + self.blob_size[key]]
            pos += self.blob_size[key]
        if pos != len(data):
            raise RuntimeError("unexpected bytes after the legacy storage data; format changed?")
        return data[: self.key_list_span[1]] + b"".join(blobs[k] for k in sorted(blobs))


def save_legacy(obj: object, path: str | os.PathLike[str] | IO[bytes]) -> None:
    """``torch.save(obj, path, _use_new_zipfile_serialization=False)``, but reproducible.

    The legacy format is five pickles (magic number, protocol version, sys info, the object with
    storages as persistent ids, the sorted list of storage keys) followed by each storage's bytes
    (an int64 element count, then the raw data) in key order.  Torch uses ``str(storage._cdata)``,
    a memory address, as key, so keys and data order change from run to run.  Here torch's own
    writer runs with a pickle module that renames the keys to fixed address-like numbers, and the
    data blocks are then put into the order of the new keys.  Everything else is torch's output.
    """
    keys = _LegacyKeys()
    buffer = io.BytesIO()
    torch.save(
        obj, buffer, pickle_module=keys.pickle_module(), _use_new_zipfile_serialization=False
    )
    out = keys.reorder(buffer.getvalue())

    if isinstance(path, (str, os.PathLike)):
        with open(path, "wb") as f:
            f.write(out)
    else:
        path.write(out)
