"""convert's weights_only claims over the zoo, judged by torch.

With ``plain_objects`` the output opens with ``torch.load(weights_only=True)`` in a fresh
interpreter (one that imports torch and nothing else, as a user's script does) and holds every
tensor torch loads from the input, or convert refuses in one line naming what it could not make
plain (``EXPECTED_PLAIN_REFUSALS``). Without it, ``ConvertResult.weights_only`` is what that
fresh ``torch.load(weights_only=True)`` does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpttool
from ckpttool.errors import CheckpointError

from . import compare, zoo

# Cases --plain-objects refuses, with the global its one-line message must name.
EXPECTED_PLAIN_REFUSALS = {
    "dtensor": "torch.distributed.tensor._dtensor_spec.TensorMeta",
    "inst-obj-legacy": "tests.fidelity.zoo.Reduced",  # a call: no attributes to keep
    "nested-jagged": "torch._dynamo.decorators._DimRange",
    "nested-jagged-state-dict": "torch._dynamo.decorators._DimRange",
    "objects": "tests.fidelity.zoo.Reduced",
    "objects-p4": "tests.fidelity.zoo.Reduced",
}

_LOAD_ALL = """
import json, sys, warnings
import torch
warnings.simplefilter("ignore")
out = {}
for path in json.load(sys.stdin):
    try:
        torch.load(path, weights_only=True)
        out[path] = "ok"
    except Exception as exc:
        out[path] = (str(exc).strip().splitlines() or [repr(exc)])[-1][:300]
print(json.dumps(out))
"""


@dataclass
class Converted:
    src: str
    dst: str
    result: Any  # ConvertResult, or None when refused
    error: str = ""
    weights_only_load: str = ""  # "ok" or the fresh torch.load(weights_only=True)'s error


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Converted]:
    folder = str(tmp_path_factory.mktemp("plain"))
    out: dict[tuple[str, bool], Converted] = {}
    for name, case in zoo.CASES.items():
        src = zoo.write(case, folder)
        for plain in (True, False):
            dst = f"{src}.{'plain' if plain else 'kept'}.pt"
            try:
                result = ckpttool.convert(src, dst, plain_objects=plain, allow_user_classes=True)
                out[(name, plain)] = Converted(src, dst, result)
            except CheckpointError as exc:
                out[(name, plain)] = Converted(src, dst, None, str(exc))
    written = [c.dst for c in out.values() if c.result is not None]
    run = subprocess.run(
        [sys.executable, "-c", _LOAD_ALL],
        input=json.dumps(written),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    loads = json.loads(run.stdout)
    for c in out.values():
        c.weights_only_load = loads.get(c.dst, "")
    return out


def _tensor_keys(obj: Any) -> list[Any]:
    """Each strided tensor as (dtype, shape, stride, offset, view bits, storage bytes)."""
    keys = []
    for t in compare.tensors_in(obj):
        if t.layout != torch.strided or t.is_nested or type(t).__name__ == "DTensor":
            continue
        st = None if t.is_meta else compare._digest(t.untyped_storage())
        view = (t.stride(), t.storage_offset(), t.is_conj(), t.is_neg())
        keys.append((str(t.dtype), tuple(t.shape), view, st))
    return keys


@pytest.mark.parametrize("name", sorted(zoo.CASES))
def test_plain_objects_output_opens_with_weights_only(
    name: str, converted: dict[tuple[str, bool], Converted]
) -> None:
    c = converted[(name, True)]
    fragment = EXPECTED_PLAIN_REFUSALS.get(name)
    if c.result is None:
        assert fragment is not None, f"{name}: unexpectedly refused: {c.error}"
        assert fragment in c.error and "\n" not in c.error, c.error
        assert not os.path.exists(c.dst)
        return
    assert fragment is None, f"{name}: expected a refusal naming {fragment}"
    assert c.weights_only_load == "ok", f"{name}: {c.weights_only_load}"
    assert c.result.weights_only and not c.result.unsafe_globals
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.load(c.dst, weights_only=True)
    strict = not zoo.CASES[name].importable
    have = _tensor_keys(got)
    missing = [k for k in _tensor_keys(compare.load(c.src, strict=strict)) if k not in have]
    assert not missing, f"{name}: tensors torch loads from the input are not in the output"


@pytest.mark.parametrize("name", sorted(zoo.CASES))
def test_weights_only_claim_is_torchs(
    name: str, converted: dict[tuple[str, bool], Converted]
) -> None:
    c = converted[(name, False)]
    if c.result is None:
        pytest.skip(f"refused (test_roundtrip judges that): {c.error}")
    loads = c.weights_only_load == "ok"
    claim = c.result.weights_only
    assert claim == loads, f"{name}: claims {claim}, torch: {c.weights_only_load}"
    assert bool(c.result.unsafe_globals) == (not loads)


def test_main_subclass_becomes_a_plain_tensor_with_its_attributes(
    converted: dict[tuple[str, bool], Converted],
) -> None:
    c = converted[("main-subclass", True)]
    assert "__main__.MyTensor -> tensor" in c.result.replaced
    got = torch.load(c.dst, weights_only=True)
    assert type(got["t"]) is torch.Tensor and got["t"].note == "x"
    assert torch.equal(got["t"], zoo.ints(3))


def test_frozenset_becomes_a_set_and_a_tuple_where_it_must_hash(tmp_path: Path) -> None:
    src, dst = tmp_path / "f.pt", tmp_path / "o.pt"
    torch.save({"v": frozenset({"a", "b"}), "k": {frozenset({1}): "one"}, "t": zoo.ints(2)}, src)
    result = ckpttool.convert(src, dst, plain_objects=True)
    assert sorted(result.replaced) == ["builtins.frozenset -> set", "builtins.frozenset -> tuple"]
    got = torch.load(dst, weights_only=True)
    assert got["v"] == {"a", "b"} and got["k"] == {(1,): "one"}
