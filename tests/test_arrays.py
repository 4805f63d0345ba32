"""``analysis.arrays.tensor_array`` reads every dtype and view as torch.load does, in either
byte order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ckpttool
from ckpttool.analysis.arrays import tensor_array
from tests.test_safetensors import _dtype_zoo, big_endian_copy, save


@pytest.mark.parametrize("order", ["little", "big"])
def test_tensor_array_equals_torch_for_every_dtype_and_view(order: str, tmp_path: Path) -> None:
    src = save(tmp_path, "zoo.pt", _dtype_zoo())
    if order == "big":
        # untyped uint8 storages viewed as uint16 / float8 are not swapped by torch's loader
        src = big_endian_copy(src, tmp_path / "zoo_be.pt")
    want = torch.load(src, map_location="cpu", weights_only=True)
    tensors = ckpttool.open_checkpoint(src).tensors()
    assert sorted(t.name for t in tensors) == sorted(want)
    for t in tensors:
        arr = tensor_array(t.ref)
        native = np.array(arr, dtype=arr.dtype.newbyteorder("="), order="C")
        expected = want[t.name].contiguous()
        assert native.shape == tuple(expected.shape), t.name
        assert native.tobytes() == expected.reshape(-1).view(torch.uint8).numpy().tobytes(), t.name
