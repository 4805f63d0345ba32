"""Bounded run of the structure-aware fuzzer judged by the torch oracle (issue 18).

300 inputs of a fixed seed: real checkpoints (fixtures, ``torch.save`` outputs, a pre-1.0 tar,
plain pickles, a numpy object array) mutated at the structure level (zip directory and end
records, local headers, entries; tar members, links and headers; pickle opcodes, persistent
ids, memo indices, frames, BUILD/APPEND sequences with allowlisted and marker-payload globals).
The test fails on every input ckpttool calls ``safe`` while torch, loading it in the oracle's
child, resolved or called something outside the allowlist, made a suspicious audit event or
wrote a marker; and on any marker written while only ckpttool had read the input. The long run
is ``tests/fuzz/run_oracle_fuzz.py``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from .bases import structured_bases
from .oracle_fuzz import FORMATS, generate, run
from .snippets import Snippets

pytest.importorskip("torch")

SEED = 18
N = 300


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str, bytes]]:
    return structured_bases(tmp_path_factory.mktemp("fuzz-bases"))


def test_generation_is_reproducible(bases: list[tuple[str, str, bytes]]) -> None:
    for i in range(30):
        a, b = generate(SEED, i, bases, "/m/PWNED"), generate(SEED, i, bases, "/m/PWNED")
        assert (a.data, a.mutations) == (b.data, b.mutations)


def test_every_mutation_kind_applies(bases: list[tuple[str, str, bytes]]) -> None:
    """Each kind of each format changes some base (a kind that never applies tests nothing)."""
    never = []
    for fmt, (kinds, mutator, _name) in FORMATS.items():
        own = [d for _, f, d in bases if f == fmt]
        for kind in kinds:
            changed = 0
            for k in range(40):
                rng = random.Random(f"{fmt}:{kind}:{k}")
                data = own[k % len(own)]
                res = mutator(data, rng, Snippets(rng, "/m/PWNED"), kind)
                changed += res is not None and res[0] != data
            if not changed:
                never.append(f"{fmt}.{kind}")
    assert not never, never


@pytest.mark.slow
def test_fuzzed_inputs_are_safe_only_when_torch_agrees(tmp_path: Path, pytestconfig: Any) -> None:
    # a work folder that stays put gives the same inputs (their payloads embed its path) to
    # every session, so the oracle's records, cached by content, serve the next one too
    work, cache = tmp_path, None
    if pytestconfig.cache is not None and not os.environ.get("CKPTTOOL_ORACLE_NO_CACHE"):
        work = pytestconfig.cache.mkdir("oracle-fuzz-work")
        cache = pytestconfig.cache.mkdir("torch-oracle-fuzz")
    s = run(SEED, N, work, batch=N, workers=2, cache_dir=cache)
    assert s.inputs == N
    assert s.observed >= N // 10, s.lines()  # enough inputs reach torch to mean something
    problems = [
        f"#{o.input.index} {o.input.base} {o.input.mutations}: "
        + (o.divergence or "a marker appeared after ckpttool alone read the input")
        for o in s.divergences + s.ran_in_scan
    ]
    assert not problems, "\n".join(s.lines(examples=0)[:2] + problems)
