"""Casts of tensors bigger than a chunk (issue 22): read, cast on a thread pool into a ring of
reused buffers one chunk ahead of the writer. Every writer's output is compared with torch's
``.to(dtype)`` bit for bit (NaN-ness only for NaNs, see tests/test_numeric.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpttool

N = 11_000_003  # 44 MB of float32: several 8 and 16 MB chunks and a short tail


@pytest.fixture(autouse=True, params=["sequential", "overlapped"])
def pipeline(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both pipelines, whatever this machine's cores: chunks made as they are written, and
    made a chunk ahead in a thread with the cast cut across three threads."""
    from ckpttool.writers import cast_kernels

    if request.param == "overlapped":
        monkeypatch.setattr(cast_kernels, "overlap", lambda: True)
        monkeypatch.setattr(cast_kernels, "threads", lambda: 3)


def _values(n: int, seed: int) -> torch.Tensor:
    """Deterministic float32 values of every kind: normals, ties, subnormals, zeros, inf, NaN."""
    i = torch.arange(n, dtype=torch.int64)
    bits = (i * 2654435761 + seed) % (1 << 32)
    x = bits.to(torch.int32).view(torch.float32).clone()
    x[::97] = 0.0
    x[5::1009] = float("inf")
    return x


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    gnan, wnan = torch.isnan(got.float()), torch.isnan(want.float())
    assert torch.equal(gnan, wnan)
    g = got.view(torch.int16 if got.element_size() == 2 else torch.int32)
    w = want.view(torch.int16 if want.element_size() == 2 else torch.int32)
    assert torch.equal(g[~wnan], w[~wnan])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_convert_casts_big_storages_like_torch(tmp_path: Path, dtype: str) -> None:
    sd = {"w": _values(N, 1), "t": _values(3001 * 1999, 2).reshape(3001, 1999).t()}
    torch.save(sd, tmp_path / "in.pt")
    ckpttool.convert(tmp_path / "in.pt", tmp_path / "out.pt", dtype=dtype)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for name, t in sd.items():
        _same(got[name].contiguous(), t.to(getattr(torch, dtype)).contiguous())


def test_to_safetensors_casts_big_and_transposed_tensors_like_torch(tmp_path: Path) -> None:
    half = _values(N, 3).to(torch.float16)
    sd = {"half": half, "f32": _values(N, 4), "t": _values(2003 * 3001, 5).reshape(2003, 3001).t()}
    torch.save(sd, tmp_path / "in.pt")
    out = tmp_path / "out.safetensors"
    ckpttool.to_safetensors(tmp_path / "in.pt", out, dtype="bfloat16")
    got = load_file(os.fspath(out))
    for name, t in sd.items():
        _same(got[name], t.to(torch.bfloat16).contiguous())


def test_safetensors_input_cast_and_byte_identity_of_the_rest(tmp_path: Path) -> None:
    sd = {"a": _values(N, 6), "ints": torch.arange(3_000_000, dtype=torch.int64)}
    save_file(sd, os.fspath(tmp_path / "in.safetensors"))
    out = tmp_path / "out.safetensors"
    ckpttool.to_safetensors(tmp_path / "in.safetensors", out, dtype="float16")
    got = load_file(os.fspath(out))
    _same(got["a"], sd["a"].to(torch.float16))
    assert torch.equal(got["ints"], sd["ints"])
