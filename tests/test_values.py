"""Values come out right through both writers for every hand-built "ok" file that records them
(big-endian storages, views, strides, shared storages), not just the bytes torch.save writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ckpttool
from tests.hostile.corpus import CASES, OK

VALUED = [c for c in CASES if c.expect == OK and c.values]


def _lookup(obj: Any, key: str) -> Any:
    return obj[key]


@pytest.mark.parametrize("case", VALUED, ids=[c.id for c in VALUED])
def test_convert_keeps_values(case: Any, tmp_path: Path) -> None:
    src = case.build(tmp_path)
    out = tmp_path / "out.pt"
    ckpttool.convert(src, out)
    loaded = torch.load(out, weights_only=True)
    for key, want in case.values.items():
        got = _lookup(loaded, key)
        assert got.tolist() == want, key


@pytest.mark.parametrize("case", VALUED, ids=[c.id for c in VALUED])
def test_to_safetensors_keeps_values(case: Any, tmp_path: Path) -> None:
    src = case.build(tmp_path)
    out = tmp_path / "out.safetensors"
    result = ckpttool.to_safetensors(src, out, all_tensors=True, duplicate_shared=True)
    assert result.verified
    loaded = load_file(out)
    for key, want in case.values.items():
        assert loaded[key].tolist() == want, key
