"""Object-for-object comparison of what torch loads (shared by the consolidation tests)."""

from __future__ import annotations

from typing import Any

import torch


def same(a: Any, b: Any, path: str = "") -> None:
    """Object-for-object equality as torch loads them (tensors: dtype, shape, stride, values;
    dicts: keys in order)."""
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{path}.{i}")
    else:
        assert a == b, path
