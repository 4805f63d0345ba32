"""Inputs the oracle-judged fuzzer found, replayed from their seed and index.

Each was safe (or made ``scan`` raise) while torch ran a payload or failed: the tar model
now walks members in torch's order (a FIFO ``pickle`` member after a payload in a duplicated
``storages``), and a cycle of tar links is unreadable instead of a RecursionError.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ckpttool.ops.scan import scan

from .bases import structured_bases
from .oracle_fuzz import generate

FOUND = [(7, 681), (7, 2922), (7, 3137), (7, 4264), (7, 5161), (7, 5269), (11, 11495), (11, 13815)]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str, bytes]]:
    return structured_bases(tmp_path_factory.mktemp("bases"))


@pytest.mark.parametrize(("seed", "index"), FOUND, ids=[f"{s}:{i}" for s, i in FOUND])
def test_found_input_is_not_safe(
    seed: int, index: int, bases: list[tuple[str, str, bytes]], tmp_path: Path
) -> None:
    x = generate(seed, index, bases, str(tmp_path / "PWNED"))
    path = tmp_path / x.name
    path.write_bytes(x.data)
    assert x.fmt == "tar"
    assert scan([path]).files[0].verdict in ("dangerous", "unreadable")
