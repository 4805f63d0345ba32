"""Issue 18's benign set: plain data ``torch.save`` writes, each of which must scan ``safe``
(the first four were flagged dangerous when the issue was filed)."""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import decimal
import fractions
import pathlib
import re
import types
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import tarckpt as T
from .c3_code import dcp_folder
from .c3base import DCP, SAFE, add


def _saved(make: Callable[[Any], Any], **save_kw: Any) -> Callable[[Path], Path]:
    """Build: ``torch.save({'w': <2x3 tensor>, 'x': make(torch)}, d/model.pt)``."""

    def build(d: Path) -> Path:
        import torch

        p = Path(d) / "model.pt"
        obj = {"w": torch.arange(6.0).reshape(2, 3), "x": make(torch)}
        torch.save(obj, p, **save_kw)
        return p

    return build


def _np() -> Any:
    import numpy as np

    return np


def _fsdp(torch: Any) -> Any:
    from torch.distributed.fsdp import ShardingStrategy

    return ShardingStrategy.FULL_SHARD


def _self_ref(torch: Any) -> Any:
    ckpt: dict[str, Any] = {"model": {"b": torch.zeros(3)}, "meta": {}}
    ckpt["meta"]["root"] = ckpt
    return ckpt


def _training(torch: Any) -> Any:
    w = torch.nn.Parameter(torch.arange(4.0).reshape(2, 2))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    return {
        "model": {"fc.weight": w.detach()},
        "optimizer": opt.state_dict(),
        "epoch": 3,
        "args": argparse.Namespace(lr=0.1, epochs=3),
    }


def _dtypes(torch: Any) -> Any:
    base = torch.arange(6)
    return {
        str(t): base.to(t)
        for t in (torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.uint8)
    }


def _views(torch: Any) -> Any:
    base = torch.arange(12.0).reshape(3, 4)
    return {"p": torch.nn.Parameter(base.clone()), "t": base.t(), "row": base[1], "same": base}


def _generator(torch: Any) -> Any:
    g = torch.Generator()
    g.manual_seed(0)
    return g


BENIGN: dict[str, Callable[[Any], Any]] = {
    "b_numpy_default_rng": lambda torch: _np().random.default_rng(0),
    "b_numpy_random_state": lambda torch: _np().random.RandomState(0),
    "b_re_ignorecase": lambda torch: re.IGNORECASE,
    "b_fsdp_sharding_strategy_full_shard": _fsdp,
    "b_argparse_namespace": lambda torch: argparse.Namespace(lr=0.1, epochs=3, name="run"),
    "b_simple_namespace": lambda torch: types.SimpleNamespace(depth=3, width=[1, 2]),
    "b_ordered_dict": lambda torch: collections.OrderedDict(a=torch.ones(2), b=1),
    "b_defaultdict_list": lambda torch: collections.defaultdict(list, {"a": [1]}),
    "b_deque": lambda torch: collections.deque([1, 2, 3], maxlen=5),
    "b_counter": lambda torch: collections.Counter("abracadabra"),
    "b_set_and_frozenset": lambda torch: [{1, 2, 3}, frozenset({"a", "b"})],
    "b_complex": lambda torch: [1 + 2j, complex(-0.5, 3)],
    "b_bytes_and_bytearray": lambda torch: [b"\x00\xffabc", bytearray(b"xyz")],
    "b_range_and_slice": lambda torch: [range(0, 10, 2), slice(1, None, 3)],
    "b_datetime_date_timedelta_timezone": lambda torch: [
        dt.datetime(2024, 1, 2, 3, 4, 5),
        dt.date(2024, 1, 2),
        dt.timedelta(days=1, seconds=5),
        dt.timezone.utc,
        dt.datetime(2024, 1, 2, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    ],
    "b_decimal": lambda torch: decimal.Decimal("3.14159"),
    "b_fraction": lambda torch: fractions.Fraction(3, 7),
    "b_uuid": lambda torch: uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "b_pure_posix_path_and_posix_path": lambda torch: [
        pathlib.PurePosixPath("/data/run1"),
        pathlib.PosixPath("/data/run1/ckpt"),
    ],
    "b_numpy_arrays": lambda torch: [
        _np().arange(6, dtype=_np().float32).reshape(2, 3),
        _np().arange(4, dtype=_np().int64),
        _np().array([True, False]),
    ],
    "b_numpy_scalars_and_dtypes": lambda torch: [
        _np().float32(1.5),
        _np().int64(3),
        _np().bool_(True),
        _np().dtype("float16"),
        _np().dtype("<U5"),
    ],
    "b_torch_generator_state": lambda torch: _generator(torch).get_state(),
    "b_torch_generator_object": _generator,
    "b_self_referencing_checkpoint": _self_ref,
    "b_state_dict_of_every_dtype": _dtypes,
    "b_training_checkpoint_sgd": _training,
    "b_nested_plain_containers": lambda torch: {
        "a": [1, 2.5, None, True, "s"],
        "b": (1, (2, (3,))),
        "c": {"d": {"e": []}},
        "big": [2**70, -(2**65), float("inf")],
    },
    "b_torch_dtype_device_size": lambda torch: [
        torch.float16,
        torch.device("cpu"),
        torch.Size([2, 3]),
    ],
    "b_parameters_and_views": _views,
    "b_empty_dict": lambda torch: {},
}
for _id, _make in BENIGN.items():
    add(_id, 0, SAFE, build=_saved(_make), loads=True)

add(
    "b_legacy_format_state_dict",
    0,
    SAFE,
    build=_saved(lambda torch: {"b": torch.ones(3)}, _use_new_zipfile_serialization=False),
    loads=True,
)
add(
    "b_protocol_4_pickle",
    0,
    SAFE,
    build=_saved(lambda torch: [1, "x"], pickle_protocol=4),
    loads=True,
)
add(
    "b_pre_1_0_tar_checkpoint",
    0,
    SAFE,
    lambda d: T.checkpoint(T.benign_parts()),
    name="model.tar",
    loads=True,
)
add(
    "b_dcp_folder_with_plain_extra_items",
    0,
    SAFE,
    build=dcp_folder({"step": 3, "lr": 0.1, "tags": ["a", "b"]}),
    loader=DCP,
    loads=True,
)
