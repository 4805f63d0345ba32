"""Short, safe, bounded descriptions of pickled values (never creating the objects they name)."""

from __future__ import annotations

import struct
from typing import Any

from ..model import Opaque, TensorRef

_NUMPY_SCALAR = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")
_NUMPY_RECONSTRUCT = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
_NUMPY_FORMATS = {
    "f8": "d", "f4": "f", "f2": "e", "i8": "q", "i4": "i", "i2": "h", "i1": "b",
    "u8": "Q", "u4": "I", "u2": "H", "u1": "B", "b1": "?",
}  # fmt: skip
_NUMPY_NAMES = {
    "f8": "float64", "f4": "float32", "f2": "float16", "i8": "int64", "i4": "int32",
    "i2": "int16", "i1": "int8", "u8": "uint64", "u4": "uint32", "u2": "uint16", "u1": "uint8",
    "b1": "bool",
}  # fmt: skip


def numpy_dtype_code(obj: Any) -> str | None:
    """'f8' for a pickled ``numpy.dtype('f8', False, True)`` placeholder."""
    if (
        isinstance(obj, Opaque)
        and obj.global_name in ("numpy.dtype", "numpy.core.numeric.dtype")
        and obj.args
        and isinstance(obj.args[0], str)
    ):
        return obj.args[0]
    return None


def numpy_scalar_value(obj: Opaque) -> int | float | bool | None:
    """The Python value of a pickled numpy scalar, decoded from its bytes."""
    if obj.global_name not in _NUMPY_SCALAR or len(obj.args) < 2:
        return None
    code, raw = numpy_dtype_code(obj.args[0]), obj.args[1]
    if code is None or not isinstance(raw, (bytes, bytearray)):
        return None
    fmt = _NUMPY_FORMATS.get(code.lstrip("<>=|"))
    big = False
    state = obj.args[0].state
    if isinstance(state, tuple) and len(state) > 1 and state[1] == ">":
        big = True
    if fmt is None or struct.calcsize(fmt) != len(raw):
        return None
    return struct.unpack((">" if big else "<") + fmt, raw)[0]


def describe(value: Any, budget: int = 80) -> str:
    """A one-line description of ``value``, at most about ``budget`` characters."""
    out = _describe(value, budget, 0)
    return out if len(out) <= budget else out[: budget - 3] + "..."


def _describe(value: Any, budget: int, depth: int) -> str:
    if budget <= 3 or depth > 4:
        return "..."
    if isinstance(value, TensorRef):
        return f"tensor({value.dtype}, {list(value.shape)})"
    if isinstance(value, Opaque):
        name = value.global_name
        scalar = numpy_scalar_value(value)
        if scalar is not None:
            code = numpy_dtype_code(value.args[0]) or ""
            kind = _NUMPY_NAMES.get(code.lstrip("<>=|"), type(scalar).__name__)
            return f"numpy.{kind}({scalar!r})"
        if name in _NUMPY_RECONSTRUCT:
            state = value.state
            if isinstance(state, tuple) and len(state) >= 3:
                code = numpy_dtype_code(state[2]) or "?"
                return f"numpy.ndarray(shape={list(state[1])}, dtype={code})"
            return "numpy.ndarray(...)"
        if isinstance(value.state, dict) and not value.args:
            inner = ", ".join(
                f"{k}={_describe(v, budget // 3, depth + 1)}"
                for k, v in list(value.state.items())[:8]
            )
            return f"{name}({inner})"
        if value.args:
            inner = ", ".join(_describe(a, budget // 3, depth + 1) for a in value.args[:4])
            return f"{name}({inner})"
        return f"{name}(...)"
    if isinstance(value, dict):
        items = list(value.items())[:6]
        inner = ", ".join(
            f"{_describe(k, 20, depth + 1)}: {_describe(v, budget // 3, depth + 1)}"
            for k, v in items
        )
        more = ", ..." if len(value) > len(items) else ""
        return "{" + inner + more + "}"
    if isinstance(value, (list, tuple)):
        items = list(value[:6])
        inner = ", ".join(_describe(v, budget // 3, depth + 1) for v in items)
        more = ", ..." if len(value) > len(items) else ""
        return ("[" + inner + more + "]") if isinstance(value, list) else ("(" + inner + more + ")")
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, str):
        text = value if len(value) <= budget else value[: budget - 4] + "..."
        return repr(text)
    if isinstance(value, (int, float, bool, complex)) or value is None:
        return repr(value)
    return f"<{type(value).__name__}>"
