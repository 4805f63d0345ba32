"""torch may compute where each storage record lies instead of reading the zip
(``torch.utils.serialization.config.load.calculate_storage_offsets``, with ``mmap=True``), when
the file says ``.format_version`` >= 1: it then assumes miniz's layout (a data descriptor after
each record, the next one at the next multiple of ``.storage_alignment``). ckpttool's writers
lay records out otherwise (no descriptors, some records at their input's phase in a page), so
their files must not claim the version, or torch reads the wrong bytes without an error.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpttool

config = pytest.importorskip("torch.utils.serialization").config
if not hasattr(getattr(config, "load", None), "calculate_storage_offsets"):
    pytest.skip("this torch always reads record offsets from the zip", allow_module_level=True)


def _flat(d: Any, pre: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{pre}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{pre}{k}"] = v
    return out


def _computed_equals_read(path: Path) -> None:
    """torch's computed offsets read the same tensors as the zip's offsets."""
    want = _flat(torch.load(path, weights_only=True, mmap=True))
    old = config.load.calculate_storage_offsets
    config.load.calculate_storage_offsets = True
    try:
        got = _flat(torch.load(path, weights_only=True, mmap=True))
    finally:
        config.load.calculate_storage_offsets = old
    assert list(got) == list(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name


def _has_format_version(path: Path) -> bool:
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/.format_version") for n in zf.namelist())


def _state(n: int) -> dict[str, torch.Tensor]:
    """Tensors of many sizes and name lengths (records at many offsets)."""
    return {
        f"module.layer{i}.{'w' * (i % 7)}": torch.arange(97 + 389 * i, dtype=torch.float32) % 13
        for i in range(n)
    }


@pytest.mark.parametrize("how", ["strip-module", "cast"])
def test_computed_record_offsets_read_what_the_zip_says(tmp_path: Path, how: str) -> None:
    """Records kept at their input's page phase (big ones, strip-module) or cast (all of
    them at torch's alignment): torch reads the same tensors either way, and a record at a
    phase never meets a file that claims torch's layout."""
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    big = {f"w{i}": torch.arange(300_000 + 1000 * i, dtype=torch.float32) for i in range(4)}
    torch.save({**big, **_state(60)}, src)
    if how == "cast":
        ckpttool.convert(src, out, dtype="float16")
    else:
        ckpttool.convert(src, out, strip_prefix="module.")
    assert not _has_format_version(out)
    _computed_equals_read(out)
