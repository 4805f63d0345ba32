"""Property test: mutated checkpoints never break the CLI contract.

Hypothesis generates byte-level and structure-aware mutations (bit flips, interesting
integers, truncation, splicing two files, edits inside ``data.pkl`` / the safetensors
header) of valid ``torch.save``/``safetensors`` files and a few corpus cases, runs the real
``python -m ckpttool inspect`` on each, and checks: exit code in {0, 1, 3}, exactly one
stderr line on a non-zero exit, no Traceback, bounded output and time, no marker file.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .bases import make_bases, marker_paths
from .mutate import INTERESTING_INTS, Mutation, mutate

try:
    from ..hostile import contract as C
except ImportError:
    from hostile import contract as C

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not C.cli_available(), reason="ckpttool CLI not there yet"),
]

N_BASES = 10  # upper bound; indices are taken modulo the real count
pos = st.integers(0, 1 << 20)
op = st.one_of(
    st.tuples(st.just("flip"), pos, st.integers(0, 7)),
    st.tuples(st.just("byte"), pos, st.integers(0, 255)),
    st.tuples(st.just("int"), pos, st.integers(0, 3), st.integers(0, len(INTERESTING_INTS) - 1)),
    st.tuples(st.just("trunc"), pos),
    st.tuples(st.just("delete"), pos, st.integers(1, 64)),
    st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("dup"), pos, st.integers(1, 256), pos),
    st.tuples(st.just("splice"), st.integers(0, N_BASES - 1), pos, pos),
)
mutations = st.builds(
    Mutation,
    base=st.integers(0, N_BASES - 1),
    inner=st.lists(op, max_size=3).map(tuple),
    outer=st.lists(op, max_size=3).map(tuple),
)


class Bases:
    """The base files; a short repr keeps hypothesis' failure report readable."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.blobs = make_bases(folder)

    def __repr__(self) -> str:
        return f"<{len(self.blobs)} base files from tests/fuzz/bases.py>"


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Bases:
    return Bases(tmp_path_factory.mktemp("fuzz-bases"))


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(m=mutations)
def test_mutated_inputs_keep_the_contract(bases: Bases, m: Mutation) -> None:
    data = mutate(m, bases.blobs)
    with tempfile.TemporaryDirectory(prefix="ckpt-fuzz-") as d:
        p = Path(d) / "model.bin"
        p.write_bytes(data)
        res = C.run_tool(C.tool_argv(p), cwd=Path(d), env=C.tool_env())
        problems = C.check_generic(res)
        refused = res.rc in (C.EXIT_ERROR, C.EXIT_DANGEROUS, C.EXIT_UNPROVEN)
        if refused and "model.bin" not in res.err:
            problems.append("stderr does not name the input")
    problems += [f"MARKER {mk}" for mk in marker_paths(bases.folder) if mk.exists()]
    assert not problems, (
        f"{m!r}\nreplay: mutate(m, make_bases(folder)) from tests/fuzz\n"
        + "; ".join(problems)
        + "\n"
        + res.describe()
    )
