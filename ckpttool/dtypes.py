"""Our own table of dtypes and storage types, so that reading metadata never imports torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    name: str  # torch's name without the "torch." prefix, e.g. "float16"
    itemsize: int
    safetensors: str | None  # safetensors' code (e.g. "F16"), None if it has none
    is_floating: bool = False
    is_quantized: bool = False
    # the first safetensors release that reads ``safetensors`` ("" : every release ckpttool
    # supports, >= 0.4.3); an older reader refuses the whole file
    safetensors_since: str = ""


_TABLE = [
    DType("float64", 8, "F64", True),
    DType("float32", 4, "F32", True),
    DType("float16", 2, "F16", True),
    DType("bfloat16", 2, "BF16", True),
    DType("float8_e4m3fn", 1, "F8_E4M3", True),
    DType("float8_e5m2", 1, "F8_E5M2", True),
    DType("float8_e4m3fnuz", 1, "F8_E4M3FNUZ", True, safetensors_since="0.8.0"),
    DType("float8_e5m2fnuz", 1, "F8_E5M2FNUZ", True, safetensors_since="0.8.0"),
    DType("float8_e8m0fnu", 1, "F8_E8M0", True, safetensors_since="0.6.0"),
    DType("float4_e2m1fn_x2", 1, None, True),
    DType("complex128", 16, None),  # safetensors 0.8 has no complex128 (C128 is not a code)
    DType("complex64", 8, "C64", safetensors_since="0.7.0"),
    DType("complex32", 4, None),
    DType("int64", 8, "I64"),
    DType("int32", 4, "I32"),
    DType("int16", 2, "I16"),
    DType("int8", 1, "I8"),
    DType("uint64", 8, "U64"),
    DType("uint32", 4, "U32"),
    DType("uint16", 2, "U16"),
    DType("uint8", 1, "U8"),
    DType("bool", 1, "BOOL"),
    DType("qint8", 1, None, is_quantized=True),
    DType("quint8", 1, None, is_quantized=True),
    DType("qint32", 4, None, is_quantized=True),
    DType("quint4x2", 1, None, is_quantized=True),
    DType("quint2x4", 1, None, is_quantized=True),
    DType("bits8", 1, None),
    DType("bits16", 2, None),
    DType("bits1x8", 1, None),
    DType("bits2x4", 1, None),
    DType("bits4x2", 1, None),
]

DTYPES: dict[str, DType] = {d.name: d for d in _TABLE}
SAFETENSORS_DTYPES: dict[str, DType] = {d.safetensors: d for d in _TABLE if d.safetensors}

# Legacy typed storage classes (torch.FloatStorage, torch.cuda.HalfStorage, ...) -> dtype name.
STORAGE_TYPES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
    # UntypedStorage holds bytes; the tensor that views it carries the real dtype (v3 rebuild).
    "UntypedStorage": "uint8",
}

# Typed tensor classes of 2017-era pickles (torch.FloatTensor, torch.cuda.HalfTensor) -> dtype.
TENSOR_TYPES: dict[str, str] = {
    name.replace("Storage", "Tensor"): dtype
    for name, dtype in STORAGE_TYPES.items()
    if not name.startswith(("Q", "Untyped", "Complex"))
}

STORAGE_CLASS_FOR_DTYPE: dict[str, str] = {
    dtype: name for name, dtype in STORAGE_TYPES.items() if name != "UntypedStorage"
}


def get(name: str) -> DType:
    """Look a dtype up by torch's name ("float16" or "torch.float16")."""
    return DTYPES[name.removeprefix("torch.")]
