"""to-safetensors over the zoo, judged by torch: every tensor written is one torch loads from the
input (same dtype, shape and values, made contiguous, view bits resolved), every tensor torch
loads that safetensors can hold is written, or the file is refused in one clear line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ckpttool
from ckpttool.errors import CheckpointError

from . import compare, zoo

# What safetensors (0.8's format) holds: plain strided tensors of these dtypes.
STORABLE = {
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool,
    torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz, torch.float8_e8m0fnu,
}  # fmt: skip


def _plain(t: torch.Tensor) -> bool:
    """A tensor safetensors can hold: strided, dense, CPU-loadable, of a storable dtype (a
    subclass of a user's, such as ``__main__.MyTensor``, holds such a tensor's data)."""
    return (
        t.layout == torch.strided
        and not t.is_quantized
        and not t.is_meta
        and not t.is_nested
        and (type(t) in (torch.Tensor, torch.nn.Parameter) or hasattr(type(t), "__standin__"))
        and t.dtype in STORABLE
    )


# safetensors codes that only newer releases read (the release whose format first has the
# code, from safetensors' history): an older reader refuses the whole file, so the writer
# must say so.
NEWER_CODES = {"F8_E4M3FNUZ": "0.8.0", "F8_E5M2FNUZ": "0.8.0", "F8_E8M0": "0.6.0", "C64": "0.7.0"}


def _codes(path: str) -> set[str]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def _key(t: torch.Tensor) -> tuple[Any, ...]:
    t = t.detach().resolve_conj().resolve_neg().clone(memory_format=torch.contiguous_format)
    return (t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _written(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    out = dict(load_file(path))
    for alias, source in json.loads(meta.get("ckpttool.aliases", "{}")).items():
        out[alias] = out[source]
    return out


def _judge(name: str, tmp_path: Path, *, all_tensors: bool) -> None:
    src = zoo.write(zoo.CASES[name], str(tmp_path))
    out = str(tmp_path / "out.safetensors")
    try:
        result = ckpttool.to_safetensors(src, out, all_tensors=all_tensors)
    except CheckpointError as exc:
        line = str(exc)
        assert "\n" not in line and "corrupt" not in line, line
        assert not os.path.exists(out)
        return
    want = [t for t in compare.tensors_in(compare.load(src)) if _plain(t)]
    got = _written(out)
    wanted = {_key(t) for t in want}
    for tname, t in got.items():
        assert _key(t) in wanted, f"{name}: {tname!r} is not a tensor torch loads from the input"
    for code in _codes(out) & set(NEWER_CODES):
        said = [n for n in result.notes if code in n and NEWER_CODES[code] in n]
        assert said, (
            f"{name}: writes {code} without saying safetensors {NEWER_CODES[code]} reads it"
        )
    if not all_tensors:  # one state dict: the rest is left out on purpose
        return
    written = {_key(t) for t in got.values()}
    missing = [t for t in want if _key(t) not in written]
    assert not missing, f"{name}: {len(missing)} tensors torch loads were not written"


@pytest.mark.parametrize("name", sorted(zoo.CASES))
def test_zoo_case_to_safetensors_equals_torch(name: str, tmp_path: Path) -> None:
    _judge(name, tmp_path, all_tensors=True)


@pytest.mark.parametrize("name", sorted(zoo.CASES))
def test_zoo_case_state_dict_to_safetensors_is_torchs(name: str, tmp_path: Path) -> None:
    """Without ``--all``: the state dict found holds tensors torch loads (not the parts of a
    sparse, nested or subclass tensor, such as a jagged tensor's cached max/min lengths)."""
    _judge(name, tmp_path, all_tensors=False)
