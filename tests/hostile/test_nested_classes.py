"""``ShardedTensor.ProcessGroupState``: the one class nested in a torch class that checkpoints
pickle (FSDP1 sharded state dicts). Protocols 0-3 write it as ``getattr(ShardedTensor,
'ProcessGroupState')``, protocol 4 as ``STACK_GLOBAL 'module' 'ShardedTensor.ProcessGroupState'``.
Exactly that path is a torch class (unvetted code); every other getattr, attribute path, or
use of the class that runs more than its dataclass construction stays dangerous."""

from __future__ import annotations

import io
import pickle
from typing import Any

import pytest

from ckpttool.errors import CheckpointError, DangerousCheckpointError
from ckpttool.unpickling.opscan import walk
from ckpttool.unpickling.policy import DANGEROUS, DATA, USER, check_writable, judge
from ckpttool.unpickling.unpickler import SafeUnpickler

from .pk import Build, Call, G, NewObj, binget, binput, dumps, enc

API = "torch.distributed._shard.sharded_tensor.api"
NESTED = f"{API}.ShardedTensor.ProcessGroupState"
GETATTR = G("__builtin__", "getattr")  # as protocol 2 spells it
SHARDED = G(API, "ShardedTensor")
PG_STATE = {"local_rank": 1, "global_rank": 1, "local_world_size": 2, "global_world_size": 2}


def kinds(data: bytes) -> dict[str, str]:
    return {g.name: g.kind for g in judge([walk(data)]).globals}


def verdict(data: bytes) -> str:
    return judge([walk(data)]).kind


def pg_state(cls: Any, proto: int = 2) -> bytes:
    return dumps(NewObj(cls, (), PG_STATE), proto)


def test_getattr_of_the_exact_nested_class_is_unvetted_code() -> None:
    got = kinds(pg_state(Call(GETATTR, (SHARDED, "ProcessGroupState"))))
    assert got == {"builtins.getattr": USER, f"{API}.ShardedTensor": USER, NESTED: USER}
    assert verdict(pg_state(Call(GETATTR, (SHARDED, "ProcessGroupState")))) == USER


@pytest.mark.parametrize("proto", [2, 4])
def test_pickles_of_the_real_class_are_unvetted_code(proto: int) -> None:
    api = pytest.importorskip("torch.distributed._shard.sharded_tensor.api")
    data = pickle.dumps(api.ShardedTensor.ProcessGroupState(0, 0, 2, 2), protocol=proto)
    assert verdict(data) == USER
    assert kinds(data)[NESTED] == USER


def test_the_stack_global_path_is_unvetted_code_only_exactly() -> None:
    assert kinds(pg_state(G(API, "ShardedTensor.ProcessGroupState"), 4)) == {NESTED: USER}
    for name in ("ShardedTensor.ProcessGroupState.__init__", "ShardedTensor.__setstate__"):
        assert kinds(pg_state(G(API, name), 4)) == {f"{API}.{name}": DANGEROUS}
    package = G("torch.distributed._shard.sharded_tensor", "ShardedTensor.ProcessGroupState")
    assert verdict(pg_state(package, 4)) == DANGEROUS  # the same class, but not the exact path


@pytest.mark.parametrize(
    "args",
    [
        (SHARDED, "__init__"),
        (SHARDED, "ProcessGroupStat"),
        (G(API, "Shard"), "ProcessGroupState"),
        (G("os", "ShardedTensor"), "ProcessGroupState"),
        (SHARDED, "ProcessGroupState", None),  # a default: not how pickle writes it
        (SHARDED, b"ProcessGroupState"),
        (Call(GETATTR, (G(API, "x"), "ShardedTensor")), "ProcessGroupState"),
    ],
)
def test_any_other_getattr_is_dangerous(args: tuple[Any, ...]) -> None:
    assert kinds(pg_state(Call(GETATTR, args)))["builtins.getattr"] == DANGEROUS


def test_the_nested_class_may_only_be_instantiated() -> None:
    nested = Call(GETATTR, (SHARDED, "ProcessGroupState"))
    called = dumps(Call(nested, (1, 1, 2, 2)))  # a call with arguments runs its __init__
    assert kinds(called)[NESTED] == DANGEROUS
    # BUILD on the class itself (slot state: setattr on the class) changes torch's class
    changed = dumps(Build(nested, (None, {"__eq__": G("os", "system")})))
    assert verdict(changed) == DANGEROUS and kinds(changed)[NESTED] == DANGEROUS
    # an instance that the pickle then calls
    result_called = dumps(Call(NewObj(nested, (), PG_STATE), ()))
    assert kinds(result_called)["builtins.getattr"] == DANGEROUS
    # the same getattr, memoized, used once exactly and once for something else
    twice = (
        b"\x80\x02"
        + enc(GETATTR)
        + binput(0)
        + enc((SHARDED, "ProcessGroupState"))
        + b"R0"  # REDUCE, POP
        + binget(0)
        + enc((G("os", "path"), "join"))
        + b"R."
    )
    assert kinds(twice)["builtins.getattr"] == DANGEROUS
    # a changed outer class could hand back anything: it is dangerous, so the file is
    mutated = dumps(
        (
            Build(SHARDED, (None, {"ProcessGroupState": G("os", "system")})),
            NewObj(Call(GETATTR, (SHARDED, "ProcessGroupState"))),
        )
    )
    assert verdict(mutated) == DANGEROUS


def test_the_sharded_tensor_metadata_enum_is_data() -> None:
    enum = G("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING")
    assert set(kinds(dumps(Call(enum, (0,)))).values()) == {DATA}


def _unpickle(data: bytes) -> Any:
    return SafeUnpickler(io.BytesIO(data)).load()


def test_the_reader_makes_the_nested_class_a_placeholder() -> None:
    obj = _unpickle(pg_state(Call(GETATTR, (SHARDED, "ProcessGroupState"))))
    assert obj.global_name == NESTED and obj.how == "newobj" and obj.state == PG_STATE
    assert type(obj).__ck_qualname__ == "ShardedTensor.ProcessGroupState"
    other = _unpickle(dumps(Call(GETATTR, (SHARDED, "other"))))  # a call, recorded as such
    assert other.global_name == "builtins.getattr" and other.how == "call"


def test_writers_never_write_getattr() -> None:
    apart = dumps((GETATTR, NewObj(Call(GETATTR, (SHARDED, "ProcessGroupState")))))
    assert kinds(apart)["builtins.getattr"] == DANGEROUS  # a bare getattr of its own
    # one getattr, memoized: the exact use, and a bare reference handed to whoever loads it
    data = (
        b"\x80\x02"
        + enc(GETATTR)
        + binput(0)
        + enc((SHARDED, "ProcessGroupState"))
        + b"R)\x81"  # REDUCE, EMPTY_TUPLE, NEWOBJ
        + binget(0)
        + b"\x86."  # TUPLE2, STOP
    )
    v = judge([walk(data)])
    assert v.kind == USER  # the walk does not follow values into containers: not safe anyway
    with pytest.raises(DangerousCheckpointError):
        check_writable("f.pt", v, ["builtins.getattr"], allow_user_classes=True)
    check_writable("f.pt", v, [NESTED], allow_user_classes=True)
    with pytest.raises(CheckpointError, match="user classes"):
        check_writable("f.pt", v, [NESTED], allow_user_classes=False)
