"""The tree pickle at C speed: CPython's C pickler writing, byte for byte, what the Python
``TreePickler`` (``pt_pickle``) writes at protocol 2; None where it might not.

The two picklers write the same opcodes for the same objects, except where this module
steers around them:

- the C pickler writes a global only after importing its module (``obj.__module__``) and
  finding the very object there. Each global of the tree is therefore written under a key of
  ``pickle_globals``, unique to the run and resolved there while it lasts, and spelt as its
  real name afterwards, each key checked to be where and in the order it was lent (a key holds
  64 random bits: no data can guess it). A ``GlobalRef`` is lent as it is; for the globals the
  reader made (Opaque classes, dtypes, recorders), the ``__module__`` the C pickler reads is
  moved to ``pickle_globals`` for the run and put back after (one run at a time);
- an exact dict of 1000n or 1000n + 1 items, and an exact list of 1000n + 1 items, end in
  a batch that the two write differently; empty bytes are ``bytes()`` for the C pickler and
  ``codecs.encode('', 'latin1')`` for ours: such trees go to the Python pickler;
- an object whose own arguments hold it is memoised before its items and state are written:
  the Python pickler then writes them twice, the C pickler once. The C pickler's run counts the
  objects whose items it did not ask for; one such object, and its bytes are dropped.

Anything else (protocol 4, an unknown type, a tree nested deeper than the recursion limit,
every error) goes to the Python pickler, which then writes the tree, or raises, as before.
"""

from __future__ import annotations

import io
import os
import pickle
import threading
from collections import OrderedDict
from typing import Any

from ..model import Opaque
from ..unpickling.unpickler import DTypeRef, StorageType, _Named
from . import pickle_globals
from .pickle_globals import GlobalRef
from .pt_reduce import REAL_GLOBALS, OutStorage, Pickled, Reductions, __newobj__, spelling

_BATCH = 1000  # items per APPENDS / SETITEMS (both picklers)
# never a storage (a tuple: `in` compares types by identity first)
_PLAIN = (str, int, float, tuple, GlobalRef, OrderedDict, bool, type(None), bytes)
_REAL = {id(g): g for g in REAL_GLOBALS}  # OrderedDict & co.: the C pickler finds them itself
_MODULE = pickle_globals.__name__.encode("ascii")
_MOVING = threading.Lock()


def _nonce() -> str:
    """This run's prefix of keys: 64 random bits (``os.urandom``; ``secrets`` would import
    hashlib and OpenSSL, ~4 ms)."""
    return "g" + os.urandom(8).hex() + "_"


class _Unsupported(Exception):
    """The C pickler would not write this tree as the Python one does."""


class CTreePickler(Reductions, pickle.Pickler):
    """The C pickler with ``TreePickler``'s reductions, at protocol 2."""

    def __init__(
        self, file: io.BytesIO, storage_of: dict[int, OutStorage], dtype_of: dict[int, str]
    ) -> None:
        super().__init__(file, protocol=2, fix_imports=False)
        self._init_reductions(storage_of, dtype_of)
        self.nonce = _nonce()
        self.lent: list[str] = []  # keys lent to pickle_globals, in the order written
        self.spelt: list[bytes] = []  # the GLOBAL argument each key stands for
        self.moved: dict[type, str] = {}  # class -> its own __module__ (put back after)
        self.unasked = 0  # objects whose items the C pickler did not ask for (see _Items)

    def persistent_id(self, obj: Any) -> Any:
        t = type(obj)
        if t in _PLAIN:
            return None
        if t is dict:  # the C pickler ends an exact dict of 1000n (+1) items differently
            if len(obj) >= _BATCH and len(obj) % _BATCH < 2:
                raise _Unsupported
            return None
        if t is list:  # and an exact list of 1000n + 1
            if len(obj) > _BATCH and len(obj) % _BATCH == 1:
                raise _Unsupported
            return None
        return self._storage_pid(obj)

    def reducer_override(self, obj: Any) -> Any:
        t = type(obj)
        if t is GlobalRef:
            return self._lend(obj, obj.module, obj.name)
        if isinstance(obj, type) and issubclass(obj, Opaque):  # a class the pickle named
            return self._lend_moved(obj, obj)
        if t is DTypeRef or t is StorageType or t is _Named:  # a global held as a value
            return self._lend_moved(obj, t)
        reduced = self._reduce_tensor(obj)
        if reduced is not None:
            return reduced
        if t is OrderedDict or t is complex:
            return NotImplemented  # reduced by the same __reduce_ex__ / copyreg in both
        if _REAL.get(id(obj)) is obj:  # written by the C pickler under its own name
            module, attr = spelling(obj)
            self.written_globals[f"{module}.{attr}"] = None
            return NotImplemented
        if isinstance(obj, Opaque) and not obj.kwargs:
            return self._reduce_object(obj)
        raise _Unsupported

    def _reduce_object(self, obj: Opaque) -> Any:
        """``TreePickler._reduce_opaque``'s tuple, its dict items counted: the C pickler asks
        for them unless the object is already memoised once its arguments are written (they
        hold the object itself), where the Python pickler writes items and state twice."""
        listitems = iter(obj.list_items) if obj.list_items else None
        dictitems = _Items(self, iter(dict.items(obj)) if len(obj) else iter(()))
        self.unasked += 1
        cls = type(obj)
        if obj.how == "newobj":
            return (__newobj__, (cls, *obj.args), obj.state, listitems, dictitems)
        return (cls, obj.args, obj.state, listitems, dictitems)

    def _lend_moved(self, obj: Any, owner: type) -> str:
        """The key of a global the reader made (an Opaque class, a dtype, a recorder): lent
        itself, with the ``__module__`` the C pickler reads (the class's, or its type's)
        moved to ``pickle_globals`` for the run, where it finds the object by its key."""
        module, attr = spelling(obj)
        key = self._lend(obj, module, attr)
        if owner not in self.moved:
            self.moved[owner] = owner.__dict__["__module__"]
            owner.__module__ = pickle_globals.__name__
        return key

    def _lend(self, obj: Any, module: str, attr: str) -> str:
        """The key ``obj`` is written under (the C pickler writes GLOBAL module key)."""
        if "\n" in module + attr or not module or not attr or "." in attr:
            raise _Unsupported  # an error, or protocol 4: the Python pickler's to say
        try:
            spelt = module.encode("utf-8") + b"\n" + attr.encode("utf-8") + b"\n"
        except UnicodeError:
            raise _Unsupported from None
        key = f"{self.nonce}{len(self.lent)}"
        pickle_globals.lend(key, obj)
        self.lent.append(key)
        self.spelt.append(spelt)
        self.written_globals[f"{module}.{attr}"] = None
        return key


class _Items:
    """An object's dict items for the C pickler, which counts the objects it asked for them."""

    __slots__ = ("asked", "items", "pickler")

    def __init__(self, pickler: CTreePickler, items: Any) -> None:
        self.pickler, self.items, self.asked = pickler, items, False

    def __iter__(self) -> _Items:
        return self

    def __next__(self) -> Any:
        if not self.asked:
            self.asked = True
            self.pickler.unasked -= 1
        return next(self.items)


def pickle_fast(
    root: Any, storage_of: dict[int, OutStorage], dtype_of: dict[int, str]
) -> Pickled | None:
    """``root``'s protocol-2 pickle as ``TreePickler`` writes it, by the C pickler; None where
    the Python pickler must write it (or raise)."""
    buf = io.BytesIO()
    pickler = CTreePickler(buf, storage_of, dtype_of)
    with _MOVING:  # one run at a time moves classes' __module__ (and puts it back)
        try:
            pickler.dump(root)
        except Exception:  # _Unsupported, or an error: the Python pickler writes or raises
            return None
        finally:
            pickle_globals.take_back(pickler.lent)
            for cls, module in pickler.moved.items():
                cls.__module__ = module
    data = _spell(buf.getvalue(), pickler) if pickler.unasked == 0 else None
    if data is None:
        return None
    return Pickled(data, 2, list(pickler.written_globals))


def _spell(data: bytes, pickler: CTreePickler) -> bytes | None:
    """``data`` with each lent key replaced by the name it stands for; None unless each key
    is found exactly once, in order, as a GLOBAL opcode's argument."""
    marker = b"c" + _MODULE + b"\n" + pickler.nonce.encode("ascii")
    parts = data.split(marker)
    if len(parts) != len(pickler.spelt) + 1:
        return None
    out = [parts[0]]
    for i, part in enumerate(parts[1:]):
        index, newline, rest = part.partition(b"\n")
        if not newline or index != str(i).encode("ascii"):
            return None
        out.append(b"c" + pickler.spelt[i] + rest)
    return b"".join(out)
