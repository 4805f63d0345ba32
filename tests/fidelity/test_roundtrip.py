"""convert's output, loaded by torch, equals the input loaded by torch: every zoo case and every
real-world file, or a refusal in one clear line (``outcomes.EXPECTED_REFUSALS``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ..conftest import REAL_WORLD, REAL_WORLD_REASON
from . import compare, zoo
from .outcomes import (
    EXPECTED_REFUSALS,
    Outcome,
    acceptable,
    convert_and_compare,
    real_world_files,
    zoo_outcome,
)

RW_FILES = real_world_files(str(REAL_WORLD))


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


@pytest.mark.parametrize("name", sorted(zoo.CASES))
def test_zoo_case_round_trips(name: str, zoo_dir: Path) -> None:
    outcome = zoo_outcome(name, str(zoo_dir))
    assert acceptable(outcome) is None


@pytest.mark.skipif(not RW_FILES, reason=REAL_WORLD_REASON)
@pytest.mark.parametrize("name", RW_FILES or ["absent"])
def test_real_world_file_round_trips(name: str, tmp_path: Path) -> None:
    src = os.path.join(REAL_WORLD, name)
    outcome = convert_and_compare(src, str(tmp_path / "out.pt"), name, real=False)
    assert acceptable(outcome) is None


def test_expected_refusals_name_existing_cases() -> None:
    known = set(zoo.CASES) | set(RW_FILES)
    known.add("08_torchscript-quantized-vgg.pt")
    assert set(EXPECTED_REFUSALS) <= known


# -- the harness itself must be able to fail --------------------------------------------------
def test_harness_tells_newobj_from_a_call(tmp_path: Path) -> None:
    """The recording unpickler sees NEWOBJ (``cls.__new__``) and REDUCE (``cls(...)``) apart."""
    import pickle

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    import torch

    torch.save({"x": zoo.Config()}, a)  # NEWOBJ + BUILD
    data = a.read_bytes()
    torch.save({"x": zoo.Reduced(1, "b")}, b)  # REDUCE
    assert compare.same(str(a), str(a)) is None
    assert compare.same(str(a), str(b)) is not None
    assert pickle.NEWOBJ in data or b"\x81" in data


def test_harness_sees_conj_bits_offsets_and_sharing(tmp_path: Path) -> None:
    import torch

    z = zoo.ints(4).view(torch.complex64)
    base = zoo.ints(6)
    pairs = [
        ({"z": z.conj()}, {"z": z.conj().resolve_conj().conj()}),  # same values, bits differ?
        ({"t": base[1:]}, {"t": base[1:].clone()}),  # offset and storage size differ
        ({"a": base, "b": base}, {"a": base, "b": base.clone()}),  # sharing differs
        ({"p": torch.nn.Parameter(base)}, {"p": base}),
        ({"f": float("nan")}, {"f": float("nan")}),  # equal: NaN-aware
    ]
    results = []
    for i, (x, y) in enumerate(pairs):
        pa, pb = tmp_path / f"{i}a.pt", tmp_path / f"{i}b.pt"
        torch.save(x, pa)
        torch.save(y, pb)
        results.append(compare.same(str(pa), str(pb)) is None)
    assert results == [False, False, False, False, True]


def test_outcome_judging() -> None:
    assert acceptable(Outcome("views", "round-trip")) is None
    assert acceptable(Outcome("views", "wrong", "x")) is not None
    assert acceptable(Outcome("views", "refused", "f: is corrupt")) is not None
    name = "08_torchscript-quantized-vgg.pt"
    assert acceptable(Outcome(name, "refused", "f: is a TorchScript archive (code)")) is None
    assert acceptable(Outcome(name, "round-trip")) is not None
