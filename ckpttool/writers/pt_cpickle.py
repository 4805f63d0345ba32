"""The tree pickle at C speed: CPython's C pickler writing, byte for byte, what the Python
``TreePickler`` (``pt_pickle``) writes at protocol 2; None where it might not.

The two picklers write the same opcodes for the same objects, with three exceptions this
module steers around:

- the C pickler writes a global only after importing its module and finding the very object
  there. Each global of the tree (a ``GlobalRef``, or an Opaque class through a stand-in) is
  therefore written under a key of ``pickle_globals``, unique to this run and resolved there
  while it lasts; the keys are spelt as the real names afterwards, each checked to be where
  and in the order it was lent (a key has 64 random bits: no data can guess it);
- an exact dict of 1000n or 1000n + 1 items, and an exact list of 1000n + 1 items, end in
  a batch that the two write differently: such trees go to the Python pickler;
- empty bytes are ``bytes()`` for the C pickler and ``codecs.encode('', 'latin1')`` for ours.

Anything else the C pickler would meet outside the plain containers (an object built with
``__new__``, a recorder, a dtype or class as a value, ...) also goes to the Python pickler, as
do a tree nested deeper than the interpreter's recursion limit and every error: the Python
pickler then writes the tree, or raises, as before.
"""

from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict
from typing import Any

from ..model import Opaque
from . import pickle_globals
from .pickle_globals import GlobalRef
from .pt_reduce import REAL_GLOBALS, OutStorage, Pickled, Reductions, spelling

_BATCH = 1000  # items per APPENDS / SETITEMS (both picklers)
# never a storage (a tuple: `in` compares types by identity first)
_PLAIN = (str, int, float, tuple, GlobalRef, OrderedDict, bool, type(None), bytes)
_REAL = {id(g): g for g in REAL_GLOBALS}  # OrderedDict & co.: the C pickler finds them itself
_MODULE = pickle_globals.__name__.encode("ascii")


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
        self._stand_ins: dict[int, GlobalRef] = {}  # id(Opaque class) -> its stand-in

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
            return self._lend(obj)
        reduced = self._reduce_tensor(obj)
        if reduced is not None:
            return reduced
        if t is OrderedDict or t is complex:
            return NotImplemented  # reduced by the same __reduce_ex__ / copyreg in both
        if _REAL.get(id(obj)) is obj:  # written by the C pickler under its own name
            module, attr = spelling(obj)
            self.written_globals[f"{module}.{attr}"] = None
            return NotImplemented
        if isinstance(obj, Opaque) and obj.how == "call" and not obj.kwargs:
            listitems = iter(obj.list_items) if obj.list_items else None
            dictitems = iter(dict.items(obj)) if len(obj) else None
            return (self._stand_in(t), obj.args, obj.state, listitems, dictitems)
        raise _Unsupported

    def _stand_in(self, cls: type) -> GlobalRef:
        """The GlobalRef written for an Opaque class (one per class, as the class is memoised
        once by the Python pickler)."""
        if cls.__name__ in ("__newobj__", "__newobj_ex__"):  # the Python pickler's NEWOBJ path
            raise _Unsupported
        ref = self._stand_ins.get(id(cls))
        if ref is None:
            module, attr = spelling(cls)
            ref = self._stand_ins[id(cls)] = GlobalRef(f"{module}.{attr}")
            ref.module, ref.name = module, attr  # as spelt (a qualname may hold dots)
        return ref

    def _lend(self, ref: GlobalRef) -> str:
        """The key ``ref`` is written under (the C pickler writes GLOBAL module key)."""
        module, attr = ref.module, ref.name
        if "\n" in module + attr or not module or not attr or "." in attr:
            raise _Unsupported  # an error, or protocol 4: the Python pickler's to say
        try:
            spelt = module.encode("utf-8") + b"\n" + attr.encode("utf-8") + b"\n"
        except UnicodeError:
            raise _Unsupported from None
        key = f"{self.nonce}{len(self.lent)}"
        pickle_globals.lend(key, ref)
        self.lent.append(key)
        self.spelt.append(spelt)
        self.written_globals[f"{module}.{attr}"] = None
        return key


def pickle_fast(
    root: Any, storage_of: dict[int, OutStorage], dtype_of: dict[int, str]
) -> Pickled | None:
    """``root``'s protocol-2 pickle as ``TreePickler`` writes it, by the C pickler; None where
    the Python pickler must write it (or raise)."""
    buf = io.BytesIO()
    pickler = CTreePickler(buf, storage_of, dtype_of)
    try:
        pickler.dump(root)
    except Exception:  # _Unsupported, or an error: the Python pickler writes or raises
        return None
    finally:
        pickle_globals.take_back(pickler.lent)
    data = _spell(buf.getvalue(), pickler)
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
