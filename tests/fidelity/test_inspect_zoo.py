"""inspect's per-tensor table over the zoo, judged by torch: every strided tensor torch loads
(meta tensors included) has a row with its dtype, shape and torch's ``Tensor.nbytes``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpttool
from ckpttool.analysis.report import build

from . import compare, zoo


def _torch_row(t: torch.Tensor) -> tuple[Any, ...]:
    return (str(t.dtype).removeprefix("torch."), tuple(t.shape), t.is_meta, t.nbytes)


def _strided(t: torch.Tensor) -> bool:
    """One strided tensor (not sparse, nested or a DTensor, whose parts are rows)."""
    return t.layout == torch.strided and not t.is_nested and type(t).__name__ != "DTensor"


@pytest.mark.parametrize("name", sorted(zoo.CASES))
def test_zoo_case_tensor_table_is_torchs(name: str, tmp_path: Path) -> None:
    src = zoo.write(zoo.CASES[name], str(tmp_path))
    report = build(ckpttool.open_checkpoint(src))
    rows = Counter(
        (r["dtype"], tuple(r["shape"]), r["device"] == "meta", r["nbytes"])
        for r in report["tensors"]
    )
    want = Counter(_torch_row(t) for t in compare.tensors_in(compare.load(src)) if _strided(t))
    missing = want - rows
    assert not missing, f"{name}: torch loads tensors the table lacks or sizes otherwise: {missing}"
