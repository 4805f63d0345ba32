"""``diff`` and the tensor arrays it reads, on real torch saves made here (torch is the oracle)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ckpttool.analysis.arrays import as_float32, as_float64, iter_chunks, tensor_array
from ckpttool.cli import cli
from ckpttool.ops import sides as sides_mod
from ckpttool.ops.diff import diff
from ckpttool.readers import open_checkpoint
from ckpttool.readers.distributed import DistributedCheckpoint, LogicalTensor, Segment
from ckpttool.testing import saved_as
from tests.hostile.corpus import CASES, OK


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _model_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# -- arrays ---------------------------------------------------------------------------------------
DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
    torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
]  # fmt: skip


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_tensor_array_matches_torch(tmp_path: Path, legacy: bool) -> None:
    torch.manual_seed(1)
    base = torch.randn(7, 9) * 4
    sd: dict[str, torch.Tensor] = {}
    for dt in DTYPES:
        t = base.to(dt) if not dt.is_complex else torch.randn(7, 9, dtype=dt)
        name = str(dt).removeprefix("torch.")
        sd[name] = t
        sd[name + ".T"] = t.t()  # a transposed view of the same storage
        sd[name + ".slice"] = t[2:5, 1::2]  # storage offset and strides
    sd["empty"] = torch.zeros(0, 3)
    sd["scalar"] = torch.tensor(3.25)
    path = tmp_path / "a.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    # torch cannot load its own legacy save of the float8 kinds: compare with what was saved
    loaded = sd if legacy else torch.load(path, weights_only=True)
    ckpt = open_checkpoint(path)
    assert len(ckpt.tensors()) == len(sd)
    for info in ckpt.tensors():
        want = loaded[info.name]
        got = as_float64(tensor_array(info.ref), info.dtype)
        expect = want.to(torch.complex128 if want.is_complex() else torch.float64).numpy()
        assert got.shape == tuple(want.shape), info.name
        np.testing.assert_array_equal(got, expect, err_msg=info.name)
        if not want.is_complex():
            f32 = as_float32(tensor_array(info.ref), info.dtype)
            np.testing.assert_array_equal(f32, want.float().numpy(), err_msg=info.name)


VALUED = [c for c in CASES if c.expect == OK and c.values]


@pytest.mark.parametrize("case", VALUED, ids=[c.id for c in VALUED])
def test_tensor_array_hand_built_files(case: Any, tmp_path: Path) -> None:
    """Big-endian storages, views and shared storages of hand-built files read right."""
    ckpt = open_checkpoint(case.build(tmp_path))
    by_name = {t.name: t for t in ckpt.tensors()}
    for key, want in case.values.items():
        t = by_name[key]
        assert as_float64(tensor_array(t.ref), t.dtype).tolist() == want, key


def test_iter_chunks_cuts_strided_views_in_c_order() -> None:
    a = np.arange(5 * 7 * 3, dtype=np.float32).reshape(5, 7, 3).transpose(2, 0, 1)
    pieces = list(iter_chunks(a, 4))
    assert all(len(p) <= 4 for p in pieces)
    np.testing.assert_array_equal(np.concatenate(pieces), a.reshape(-1))


# -- diff -----------------------------------------------------------------------------------------
def test_identical_files_are_equal(tmp_path: Path) -> None:
    sd = _model_sd()
    torch.save({"model": sd, "epoch": 3}, tmp_path / "a.pt")
    shutil.copy(tmp_path / "a.pt", tmp_path / "b.pt")
    r = _run("diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--values")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1] == "equal: 4 tensors bit for bit, 1 entry"
    res = diff(tmp_path / "a.pt", tmp_path / "b.pt", values=True)
    assert res.equal and res.scope_a == "model" and len(res.tensors) == 4
    assert all(t.stats is not None and t.stats.max_abs == 0 for t in res.tensors)


def test_one_element_differs(tmp_path: Path) -> None:
    sd = _model_sd()
    torch.save(sd, tmp_path / "a.pt")
    sd2 = {k: v.clone() for k, v in sd.items()}
    sd2["2.weight"][1, 3] += 0.375
    torch.save(sd2, tmp_path / "b.pt")
    r = _run("diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--values", "--json")
    assert r.exit_code == 4, r.output
    out = json.loads(r.output)
    assert out["equal"] is False and out["changed"] == ["2.weight"]
    (row,) = [t for t in out["tensors"] if t["key"] == "2.weight"]
    want = (sd["2.weight"].double() - sd2["2.weight"].double()).abs().max().item()
    assert row["values"]["differing"] == 1
    assert row["values"]["max_abs"] == want
    assert all(t["equal"] for t in out["tensors"] if t["key"] != "2.weight")
    r = _run("diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"))  # bytes only
    assert r.exit_code == 4 and "2.weight" in r.output


def test_mixed_formats_of_the_same_weights_are_equal(tmp_path: Path) -> None:
    import ckpttool

    sd = _model_sd()
    with saved_as("cuda:1"):
        torch.save(sd, tmp_path / "a.pt")
    save_file(sd, tmp_path / "a.safetensors")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    ckpttool.to_safetensors(tmp_path / "a.pt", tmp_path / "sharded", max_shard_size=100)
    for other in ("a.safetensors", "legacy.pt", "sharded"):
        r = _run("diff", str(tmp_path / "a.pt"), str(tmp_path / other), "--values")
        assert r.exit_code == 0, (other, r.output)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_values_match_torch(tmp_path: Path, dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    a = torch.randn(64, 33).to(dtype)
    b = (a.float() + torch.randn(64, 33) * 1e-2).to(dtype)
    b[0, 0] = a[0, 0]
    torch.save({"w": a}, tmp_path / "a.pt")
    save_file({"w": b}, tmp_path / "b.safetensors")
    atol, rtol = 1e-2, 1e-3
    res = diff(tmp_path / "a.pt", tmp_path / "b.safetensors", values=True, atol=atol, rtol=rtol)
    (t,) = res.tensors
    assert t.stats is not None
    da, db = a.double(), b.double()
    d = (da - db).abs()
    assert t.stats.max_abs == d.max().item()
    assert t.stats.mean_abs == pytest.approx(d.mean().item(), rel=1e-12)
    assert t.stats.rel_l2 == pytest.approx((d.norm() / da.norm()).item(), rel=1e-12)
    assert t.stats.differing == int((~torch.isclose(da, db, rtol=rtol, atol=atol)).sum())
    assert 0 < t.stats.differing < a.numel()


def test_small_pieces_and_strided_views(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces line up whatever the layouts: a transposed view against a contiguous copy."""
    monkeypatch.setattr(sides_mod, "CHUNK_ELEMENTS", 7)
    base = torch.randn(13, 11)
    torch.save({"w": base.t()}, tmp_path / "a.pt")
    other = base.t().contiguous()
    other[10, 12] = 100.0
    save_file({"w": other}, tmp_path / "b.safetensors")
    res = diff(tmp_path / "a.pt", tmp_path / "b.safetensors", values=True)
    (t,) = res.tensors
    assert t.stats is not None and t.stats.differing == 1 and t.stats.numel == 143
    assert t.stats.max_abs == abs(100.0 - base.t()[10, 12].double().item())


def test_ddp_against_bare_aligns_the_prefix(tmp_path: Path) -> None:
    sd = _model_sd()
    with saved_as("cuda:0"):
        torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "ddp.pt")
    torch.save(sd, tmp_path / "bare.pt")
    r = _run("diff", str(tmp_path / "ddp.pt"), str(tmp_path / "bare.pt"))
    assert r.exit_code == 4
    assert "keys: B = A with module. stripped" in r.output
    assert r.output.splitlines()[-1] == (
        "differ only in key names (B = A with module. stripped); 4 tensors bit for bit equal"
    )
    res = diff(tmp_path / "bare.pt", tmp_path / "ddp.pt")
    assert res.alignment is not None and res.alignment.description == "B = A with module. added"
    assert not res.changed and not res.only_a and not res.only_b


def test_lightning_against_its_inner_model(tmp_path: Path) -> None:
    sd = _model_sd()
    ckpt = {"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 4}
    torch.save(ckpt, tmp_path / "run.ckpt")
    save_file(sd, tmp_path / "inner.safetensors")
    res = diff(tmp_path / "run.ckpt", tmp_path / "inner.safetensors")
    assert res.scope_a == "state_dict" and res.scope_b == ""
    assert res.alignment is not None and res.alignment.description == "B = A with model. stripped"
    # safetensors cannot hold what save_file was not given: listed, not a difference (issue 19)
    assert res.entries == () and res.unheld_a == ("epoch",) and res.unheld_b == ()


def test_dtype_shape_entries_and_missing_keys(tmp_path: Path) -> None:
    sd = _model_sd()
    torch.save({"model": sd, "epoch": 3, "args": {"lr": 0.1}}, tmp_path / "a.pt")
    sd2 = dict(sd)
    sd2["0.weight"] = sd["0.weight"].half()
    sd2["2.weight"] = sd["2.weight"].reshape(5, 3)
    del sd2["2.bias"]
    sd2["extra"] = torch.zeros(2)
    torch.save({"model": sd2, "epoch": 5, "args": {"lr": 0.1}}, tmp_path / "b.pt")
    r = _run("diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--json", "--values")
    assert r.exit_code == 4
    out = json.loads(r.output)
    assert out["only_a"] == ["2.bias"] and out["only_b"] == ["extra"]
    rows = {t["key"]: t for t in out["tensors"]}
    assert rows["0.weight"]["dtype"] == ["float32", "float16"]
    half_err = (sd["0.weight"].double() - sd["0.weight"].half().double()).abs().max().item()
    assert rows["0.weight"]["values"]["max_abs"] == half_err
    assert rows["2.weight"]["shape"] == [[3, 5], [5, 3]] and rows["2.weight"]["equal"] is None
    assert out["entries"] == [{"path": "epoch", "a": "3", "b": "5"}]


def test_nan_and_inf(tmp_path: Path) -> None:
    a = torch.tensor([1.0, float("nan"), float("inf"), 2.0, float("nan")])
    b = torch.tensor([1.0, float("nan"), float("inf"), float("nan"), 3.0])
    torch.save({"w": a}, tmp_path / "a.pt")
    torch.save({"w": b}, tmp_path / "b.pt")
    (t,) = diff(tmp_path / "a.pt", tmp_path / "b.pt", values=True).tensors
    assert t.stats is not None and t.stats.differing == 2 and t.stats.max_abs == float("inf")
    torch.save({"w": a.clone()}, tmp_path / "c.pt")
    assert diff(tmp_path / "a.pt", tmp_path / "c.pt", values=True).equal


def test_big_endian_file_equals_its_little_endian_resave(tmp_path: Path) -> None:
    (case,) = [c for c in CASES if c.id == "ok_big_endian_byteorder"]
    src = case.build(tmp_path)
    torch.save(torch.load(src, weights_only=True), tmp_path / "le.pt")
    res = diff(src, tmp_path / "le.pt", values=True)
    assert res.equal and res.tensors


def test_distributed_logical_tensors_plug_in(tmp_path: Path) -> None:
    """A distributed checkpoint's logical view (segments of shard files) compares like a file."""
    sd = _model_sd()
    torch.save(sd, tmp_path / "a.pt")
    blob, tensors = bytearray(), []
    for name, t in sd.items():
        raw = t.contiguous().numpy().tobytes()
        half = (len(raw) // 8) * 4
        shard = str(tmp_path / "r0.bin")
        segs = (
            Segment(shard, len(blob), half, 0),
            Segment(shard, len(blob) + half, len(raw) - half, half),
        )
        blob += raw
        tensors.append(LogicalTensor(name, "float32", tuple(t.shape), segs, "model"))
    (tmp_path / "r0.bin").write_bytes(bytes(blob))
    dc = DistributedCheckpoint(str(tmp_path), "dcp", 1, [], tensors, {})
    assert diff(tmp_path / "a.pt", dc, values=True).equal


def test_usage_errors(tmp_path: Path) -> None:
    torch.save(_model_sd(), tmp_path / "a.pt")
    r = _run("diff", str(tmp_path / "a.pt"), str(tmp_path / "a.pt"), "--atol", "1e-3")
    assert r.exit_code == 2 and "--values" in r.output
    r = _run("diff", str(tmp_path / "a.pt"), str(tmp_path / "missing.pt"))
    assert r.exit_code == 1 and "missing.pt: no such file" in r.output
    assert os.path.exists(tmp_path / "a.pt")


def _get(obj: Any, name: str) -> Any:
    """Follow our dotted tensor name through what torch loaded (dict keys may hold dots)."""
    parts = name.split(".")
    while parts:
        if isinstance(obj, dict):
            for n in range(len(parts), 0, -1):
                key = ".".join(parts[:n])
                if key in obj or (key.isdigit() and int(key) in obj):
                    obj = obj[key] if key in obj else obj[int(key)]
                    parts = parts[n:]
                    break
            else:
                raise KeyError(name)
        elif isinstance(obj, (list, tuple)) and parts[0].isdigit():
            obj = obj[int(parts.pop(0))]
        else:
            raise KeyError(name)
    return obj


def test_real_world_tensors_read_as_torch_reads_them(rw_record: dict[str, Any]) -> None:
    from tests.conftest import REAL_WORLD

    path = REAL_WORLD / rw_record["file"]
    ckpt = open_checkpoint(path)
    if ckpt.format == "torchscript":
        pytest.skip("TorchScript archive: torch.load does not read it")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's weights_only loader refuses it: nothing to compare with
        loaded = None
    if loaded is not None:
        compared = 0
        for t in ckpt.tensors():
            try:
                want = _get(loaded, t.name)
            except (KeyError, IndexError, TypeError):
                continue
            if not isinstance(want, torch.Tensor) or want.is_quantized:
                continue
            got = as_float64(tensor_array(t.ref), t.dtype)
            cast = torch.complex128 if want.is_complex() else torch.float64
            np.testing.assert_array_equal(got, want.detach().to(cast).numpy(), err_msg=t.name)
            compared += 1
        assert compared or not ckpt.tensors()
    if ckpt.tensors():
        assert diff(path, path, values=True).equal


def test_dcp_folder_against_torch_save(tmp_path: Path) -> None:
    """A torch.distributed.checkpoint folder (read as one logical checkpoint) against the
    torch.save of the same state: equal; one element changed: found."""
    import warnings

    import torch.distributed.checkpoint as dcp

    sd = _model_sd()
    state = {"model": sd, "step": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP warns and saves locally
        dcp.save(state, checkpoint_id=str(tmp_path / "dcp"))
    torch.save(state, tmp_path / "a.pt")
    res = diff(tmp_path / "a.pt", tmp_path / "dcp", values=True)
    assert res.equal and res.scope_b == "model" and len(res.tensors) == 4
    sd["0.bias"][2] -= 1.5
    torch.save(state, tmp_path / "b.pt")
    res = diff(tmp_path / "dcp", tmp_path / "b.pt", values=True)
    assert [(t.key, t.stats and t.stats.differing) for t in res.changed] == [("0.bias", 1)]


def test_dangerous_input_exits_3_and_runs_nothing(tmp_path: Path) -> None:
    from tests.hostile.corpus import marker_path

    (case,) = [c for c in CASES if c.id == "payload_os_system"]
    src = case.build(tmp_path)
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    for args in ((src, src), (tmp_path / "plain.pt", src)):
        r = CliRunner().invoke(cli, ["diff", *map(str, args)])
        assert r.exit_code == 3 and "os.system" in r.output
    r = CliRunner().invoke(cli, ["check", str(src), "--against", str(tmp_path / "plain.pt")])
    assert r.exit_code == 3 and "os.system" in r.output
    assert not marker_path(tmp_path).exists()


def test_all_tensors_compares_the_optimizer_too(tmp_path: Path) -> None:
    sd = _model_sd()
    state = {"model": sd, "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}}}
    torch.save(state, tmp_path / "a.pt")
    state["optimizer"]["state"][0]["exp_avg"] = torch.ones(3)
    torch.save(state, tmp_path / "b.pt")
    assert diff(tmp_path / "a.pt", tmp_path / "b.pt").equal  # the model state dicts
    res = diff(tmp_path / "a.pt", tmp_path / "b.pt", all_tensors=True)
    assert [t.key for t in res.changed] == ["optimizer.state.0.exp_avg"]
    assert _run("diff", "--all", str(tmp_path / "a.pt"), str(tmp_path / "b.pt")).exit_code == 4


def test_deflated_records_are_inflated_one_at_a_time(tmp_path: Path) -> None:
    import zipfile

    sd = _model_sd()
    sd["view"] = sd["0.weight"][1:, 2:]  # a view into a deflated storage
    torch.save(sd, tmp_path / "a.pt")
    with zipfile.ZipFile(tmp_path / "a.pt") as src, zipfile.ZipFile(tmp_path / "z.pt", "w") as dst:
        for info in src.infolist():
            packed = zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED
            dst.writestr(info.filename, src.read(info), compress_type=packed)
    ckpt = open_checkpoint(tmp_path / "z.pt")
    assert all(s.compressed for s in ckpt.storages.values())
    (view,) = [t for t in ckpt.tensors() if t.name == "view"]
    np.testing.assert_array_equal(tensor_array(view.ref), sd["view"].numpy())
    assert diff(tmp_path / "a.pt", tmp_path / "z.pt", values=True).equal
