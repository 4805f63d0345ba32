"""``ckpttool inspect`` through click's CliRunner: summaries, JSON contract, options, bad input."""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

CUDA_WARNING = (
    "- storages were saved on {where}: a plain torch.load restores them onto that GPU "
    "(in every DDP rank: extra memory on {first}) and fails on a machine without one; "
    "`ckpttool convert IN OUT` re-saves them for CPU"
)


def _block(text: str, title: str) -> list[str]:
    """The lines of the table titled ``title`` in a summary (up to the next blank line)."""
    lines = text.splitlines()
    start = lines.index(title)
    out = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        out.append(line)
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- summaries ---------------------------------------------------------------------------------
def test_summary_of_ddp_checkpoint(run_cli, fixtures_dir: Path) -> None:
    path = fixtures_dir / "ddp_rank0_checkpoint.pt"
    res = run_cli("inspect", path)
    assert res.exit_code == 0, res.stderr
    assert res.stderr == ""
    out = res.stdout
    lines = out.splitlines()
    assert lines[0] == f"path:     {path}"
    assert lines[1] == "format:   torch zip (archive 'ddp_rank0_checkpoint')"
    assert lines[2] == f"size:     9.0 kB ({path.stat().st_size:,} bytes)"
    assert lines[3].startswith("tensors:  16 in 16 storages, ")
    assert _block(out, "saved devices") == [
        "device    storages    bytes",
        "--------  ----------  -------",
        "cuda:0    12          2.5 kB",
        "cpu       4           16 B",
    ]
    assert _block(out, "state dicts")[2].split() == ["model", "4", "module."]
    entries = _block(out, "entries")
    assert any(re.fullmatch(r"epoch\s+\d+", e) for e in entries), entries
    assert any(re.fullmatch(r"args\s+argparse\.Namespace\(.+\)", e) for e in entries), entries
    warnings = _block(out, "warnings")
    assert CUDA_WARNING.format(where="cuda:0", first="cuda:0") in warnings
    assert (
        "- every key of state dict 'model' starts with 'module.' (saved from a DataParallel/DDP "
        "wrapper): load_state_dict on an unwrapped model fails with missing/unexpected keys; "
        "`ckpttool convert --strip-module` removes it"
    ) in warnings
    assert any("--plain-objects" in w and "argparse.Namespace" in w for w in warnings)


def test_summary_model_parallel_devices(run_cli, fixtures_dir: Path) -> None:
    res = run_cli("inspect", fixtures_dir / "model_parallel_cuda0-3.pt")
    assert res.exit_code == 0
    rows = [r.split() for r in _block(res.stdout, "saved devices")[2:]]
    assert rows == [[f"cuda:{i}", "2", "288", "B"] for i in range(4)]
    where = "cuda:0, cuda:1, cuda:2, cuda:3"
    assert CUDA_WARNING.format(where=where, first="cuda:0") in _block(res.stdout, "warnings")


def test_summary_cpu_file_has_no_cuda_warning(run_cli, fixtures_dir: Path) -> None:
    res = run_cli("inspect", fixtures_dir / "single_gpu_state_dict.pt")
    assert res.exit_code == 0
    assert _block(res.stdout, "saved devices")[2].split() == ["cpu", "4", "848", "B"]
    assert "storages were saved on" not in res.stdout


def test_summary_legacy_and_shared(run_cli, fixtures_dir: Path) -> None:
    res = run_cli("inspect", fixtures_dir / "legacy_format.pt")
    assert res.exit_code == 0
    assert "format:   torch legacy (pre-1.6)" in res.stdout.splitlines()
    assert "  fc2.weight = fc2.weight_tied" in _block(res.stdout, "shared storages")


def test_summary_torchscript(run_cli, fixtures_dir: Path) -> None:
    res = run_cli("inspect", fixtures_dir / "torchscript_module.pt")
    assert res.exit_code == 0
    assert res.stdout.splitlines()[1].startswith("format:   TorchScript archive")
    assert any("TorchScript" in w for w in _block(res.stdout, "warnings"))


# -- JSON contract -----------------------------------------------------------------------------
def _check_contract(doc: dict[str, Any]) -> None:
    for key in ("path", "format", "file_bytes", "tensors", "devices", "state_dicts", "globals"):
        assert key in doc, key
    assert isinstance(doc["path"], str) and isinstance(doc["format"], str)
    assert isinstance(doc["file_bytes"], int)
    for t in doc["tensors"]:
        assert {"name", "dtype", "shape", "device", "nbytes", "storage"} <= set(t)
        assert isinstance(t["name"], str) and isinstance(t["dtype"], str)
        assert isinstance(t["shape"], list) and all(isinstance(s, int) for s in t["shape"])
        assert isinstance(t["nbytes"], int) and isinstance(t["device"], str)
    for loc, d in doc["devices"].items():
        assert isinstance(loc, str) and set(d) == {"storages", "bytes"}
    for sd in doc["state_dicts"]:
        assert {"path", "tensors", "prefix"} <= set(sd)
        assert isinstance(sd["tensors"], int)
        assert sd["prefix"] is None or isinstance(sd["prefix"], str)
    for g in doc["globals"]:
        assert set(g) >= {"name", "kind"}
        assert g["kind"] in ("torch", "data", "unvetted code", "dangerous")


def test_json_every_fixture(
    run_cli, fixture_name: str, fixtures_dir: Path, expected_fixtures: dict[str, Any]
) -> None:
    exp = expected_fixtures[fixture_name]
    path = fixtures_dir / fixture_name
    res = run_cli("inspect", "--json", path)
    assert res.exit_code == (3 if fixture_name == "malicious.pt" else 0), res.stderr
    doc = json.loads(res.stdout)
    _check_contract(doc)
    # a sharded folder is reported by its index file
    assert doc["path"] == str(path / exp["index"] if path.is_dir() else path)
    assert doc["format"] == exp["format"]
    if path.is_dir():
        size = sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")
    else:
        size = path.stat().st_size
    assert doc["file_bytes"] == size
    assert len(doc["tensors"]) == exp["tensors"]
    assert {k: v["storages"] for k, v in doc["devices"].items()} == exp["locations"]
    assert Counter(t["dtype"] for t in doc["tensors"]) == Counter(exp["dtypes"])
    by_name = {t["name"]: t for t in doc["tensors"]}
    for entry, e in exp["entries"].items():
        t = by_name[entry.replace("/", ".")]
        assert (t["dtype"], t["shape"], t["device"]) == (
            e["dtype"],
            e["shape"],
            e["location"] or "",
        )


def test_json_ddp_values(run_cli, fixtures_dir: Path, expected_fixtures: dict[str, Any]) -> None:
    entries = expected_fixtures["ddp_rank0_checkpoint.pt"]["entries"]
    res = run_cli("inspect", "--json", fixtures_dir / "ddp_rank0_checkpoint.pt")
    doc = json.loads(res.stdout)
    want: dict[str, dict[str, int]] = {}
    for e in entries.values():  # one storage per tensor in this fixture
        d = want.setdefault(e["location"], {"storages": 0, "bytes": 0})
        d["storages"] += 1
        d["bytes"] += e["storage_nbytes"]
    assert doc["devices"] == want
    model_numel = sum(_numel(e["shape"]) for k, e in entries.items() if k.startswith("model/"))
    assert doc["parameters"] == model_numel  # the model's, not the optimizer state's
    assert [(s["path"], s["tensors"], s["prefix"]) for s in doc["state_dicts"]] == [
        ("model", 4, "module.")
    ]
    names = [t["name"] for t in doc["tensors"]]
    assert names[:4] == [
        "model.module.fc1.weight",
        "model.module.fc1.bias",
        "model.module.fc2.weight",
        "model.module.fc2.bias",
    ]
    assert "optimizer.state.0.exp_avg" in names
    kinds = {g["name"]: g["kind"] for g in doc["globals"]}
    assert kinds["argparse.Namespace"] == "data"
    assert kinds["torch._utils._rebuild_tensor_v2"] == "torch"
    assert "dangerous" not in kinds.values()
    t = next(t for t in doc["tensors"] if t["name"] == "model.module.fc1.weight")
    assert (t["dtype"], t["shape"], t["device"], t["nbytes"]) == ("float32", [16, 8], "cuda:0", 512)


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("dataparallel_state_dict.pt", [("", 4, "module.")]),
        ("compiled_orig_mod.pt", [("", 4, "_orig_mod.")]),
        ("single_gpu_state_dict.pt", [("", 4, None)]),
        ("lightning_style.ckpt", [("state_dict", 4, "model.")]),
    ],
)
def test_json_state_dicts(run_cli, fixtures_dir: Path, name: str, want: list[Any]) -> None:
    doc = json.loads(run_cli("inspect", "--json", fixtures_dir / name).stdout)
    assert [(s["path"], s["tensors"], s["prefix"]) for s in doc["state_dicts"]] == want


def test_json_tied_tensors_name_their_storage(run_cli, fixtures_dir: Path) -> None:
    doc = json.loads(run_cli("inspect", "--json", fixtures_dir / "tied_weights.pt").stdout)
    storage = {t["name"]: t["storage"] for t in doc["tensors"]}
    assert storage["embed.weight"] == storage["lm_head.weight"]
    assert storage["attn.qkv.weight"] == storage["attn.k.weight"]
    assert storage["embed.weight"] != storage["attn.qkv.weight"]


def test_json_real_world(run_cli, rw_record: dict[str, Any], real_world: Path) -> None:
    res = run_cli("inspect", "--json", real_world / rw_record["file"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    _check_contract(doc)
    assert len(doc["tensors"]) == rw_record["num_tensors"]
    assert {k: v["storages"] for k, v in doc["devices"].items()} == rw_record["locations"]
    text = run_cli("inspect", "--tensors", real_world / rw_record["file"])
    assert text.exit_code == 0


# -- options -----------------------------------------------------------------------------------
def test_tensors_table(run_cli, fixtures_dir: Path) -> None:
    res = run_cli("inspect", "--tensors", fixtures_dir / "tied_weights.pt")
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    head = lines.index("name             dtype    shape    saved device    size    shared with")
    rows = [line.split() for line in lines[head + 2 :]]
    assert rows == [
        ["embed.weight", "float32", "[16,", "8]", "cpu", "512", "B", "lm_head.weight"],
        ["lm_head.weight", "float32", "[16,", "8]", "cpu", "512", "B", "embed.weight"],
        ["attn.qkv.weight", "float32", "[24,", "8]", "cpu", "768", "B", "attn.k.weight"],
        ["attn.k.weight", "float32", "[8,", "8]", "cpu", "256", "B", "attn.qkv.weight"],
    ]


def test_no_tensor_table_without_option(run_cli, fixtures_dir: Path) -> None:
    res = run_cli("inspect", fixtures_dir / "tied_weights.pt")
    assert "shared with" not in res.stdout


def test_filter(run_cli, fixtures_dir: Path) -> None:
    path = fixtures_dir / "ddp_rank0_checkpoint.pt"
    doc = json.loads(run_cli("inspect", "--json", "--filter", "model.*", path).stdout)
    assert [t["name"] for t in doc["tensors"]] == [
        "model.module.fc1.weight",
        "model.module.fc1.bias",
        "model.module.fc2.weight",
        "model.module.fc2.bias",
    ]
    # the summary still counts everything
    assert doc["devices"]["cuda:0"]["storages"] == 12
    text = run_cli("inspect", "--filter", "model.*", path).stdout
    table = text.split("\n\n")[-1].splitlines()
    assert table[0].split()[:3] == ["name", "dtype", "shape"]
    assert [r.split()[0] for r in table[2:]] == [t["name"] for t in doc["tensors"]]
    none = json.loads(run_cli("inspect", "--json", "--filter", "nothing*", path).stdout)
    assert none["tensors"] == []


def test_fmt_github(run_cli, fixtures_dir: Path) -> None:
    res = run_cli(
        "inspect", "--fmt", "github", "--tensors", fixtures_dir / "dataparallel_state_dict.pt"
    )
    assert res.exit_code == 0
    devices = _block(res.stdout, "saved devices")
    assert [c.strip() for c in devices[0].strip("|").split("|")] == ["device", "storages", "bytes"]
    assert re.fullmatch(r"\|-+\|-+\|-+\|", devices[1])
    assert [c.strip() for c in devices[2].strip("|").split("|")] == ["cuda:0", "4", "848 B"]
    tensor_rows = [ln for ln in res.stdout.splitlines() if ln.startswith("| module.")]
    assert len(tensor_rows) == 4


def test_fmt_invalid_is_usage_error(run_cli, fixtures_dir: Path) -> None:
    res = run_cli("inspect", "--fmt", "nope", fixtures_dir / "tied_weights.pt")
    assert res.exit_code == 2
    assert res.stdout == ""
    assert "Error: Invalid value for '--fmt': 'nope' is not one of" in res.stderr


# -- dangerous input ---------------------------------------------------------------------------
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_dangerous_fixture_exits_3(
    run_cli, fixtures_dir: Path, in_tmp_cwd: Path, as_json: bool
) -> None:
    path = fixtures_dir / "malicious.pt"
    res = run_cli("inspect", *(["--json"] if as_json else []), path)
    assert res.exit_code == 3
    assert res.err_lines == [
        f"Danger: {path}: the pickle names dangerous globals (builtins.exec); "
        "torch.load(weights_only=False) would run them"
    ]
    if as_json:
        kinds = {g["name"]: g["kind"] for g in json.loads(res.stdout)["globals"]}
        assert kinds["builtins.exec"] == "dangerous"
    else:
        assert any(
            w.startswith("- DANGER: the pickle names builtins.exec")
            for w in res.stdout.splitlines()
        )
    assert not (in_tmp_cwd / "CKPTTOOL_PWNED").exists()
    assert list(in_tmp_cwd.iterdir()) == []


def test_help_documents_dangerous_exit_code(run_cli) -> None:
    res = run_cli("inspect", "--help")
    assert "3    the pickle names dangerous globals" in res.stdout


# -- bad input ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("good") / "base.pt"
    torch.save({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(3)}, path)
    return path


def _rezip(src: Path, dst: Path, mutate: Callable[[str, bytes], bytes | None]) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = mutate(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
    return dst


def test_empty_file(expect_error, tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    expect_error(["inspect", path], path, "is empty (0 bytes)")


def test_directory(expect_error, tmp_path: Path) -> None:
    expect_error(["inspect", tmp_path], tmp_path, "is a directory, not a checkpoint file")


def test_missing_path(expect_error, tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    expect_error(["inspect", path], path, "no such file")


def test_text_file(expect_error, tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("epoch 3, loss 0.12\nthis is not a checkpoint\n")
    expect_error(["inspect", path], path, "is a text file, not a checkpoint")


def test_html_file(expect_error, tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    path.write_text("<!DOCTYPE html>\n<html><head><title>404</title></head><body></body></html>\n")
    expect_error(
        ["inspect", path],
        path,
        "is an HTML page, not a checkpoint (a download that saved an error page?)",
    )


def test_git_lfs_pointer(expect_error, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        "size 12345\n"
    )
    res = expect_error(
        ["inspect", path],
        path,
        "is a Git LFS pointer, not the checkpoint: run `git lfs pull` to fetch it",
    )
    assert "git lfs pull" in res.stderr


def test_truncated_zip(expect_error, good_zip: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    data = good_zip.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    res = expect_error(["inspect", path], path)
    assert res.err_lines[0].startswith(f"Error: {path}: is a damaged or truncated zip archive")


def test_corrupt_data_pkl(expect_error, good_zip: Path, tmp_path: Path) -> None:
    path = _rezip(
        good_zip,
        tmp_path / "corrupt.pt",
        lambda n, d: (
            b"\x80\x02}q\x00(X\x01\x00\x00\x00w" + b"\xff" * 8 if n.endswith("data.pkl") else d
        ),
    )
    res = expect_error(["inspect", path], path)
    assert res.err_lines[0].startswith(f"Error: {path}: data.pkl is corrupt")


def test_missing_storage_record(expect_error, good_zip: Path, tmp_path: Path) -> None:
    path = _rezip(
        good_zip, tmp_path / "missing.pt", lambda n, d: None if n.endswith("data/0") else d
    )
    expect_error(["inspect", path], path, "storage record base/data/0 is missing")


def test_short_storage_record(expect_error, good_zip: Path, tmp_path: Path) -> None:
    path = _rezip(
        good_zip, tmp_path / "short.pt", lambda n, d: d[:8] if n.endswith("data/0") else d
    )
    expect_error(
        ["inspect", path],
        path,
        "storage record base/data/0 holds 8 bytes but the pickle declares 12 float32 elements "
        "(48 bytes)",
    )


def test_view_past_its_storage(expect_error, tmp_path: Path) -> None:
    src = tmp_path / "v.pt"
    torch.save({"v": torch.arange(4, dtype=torch.float32)}, src)
    # data.pkl: BINPERSID, offset BININT1 0, size (BININT1 4,): move the offset to 2
    pattern = b"QK\x00K\x04\x85"

    def shift(name: str, data: bytes) -> bytes:
        if name.endswith("data.pkl"):
            assert data.count(pattern) == 1
            return data.replace(pattern, b"QK\x02K\x04\x85")
        return data

    path = _rezip(src, tmp_path / "past.pt", shift)
    expect_error(
        ["inspect", path],
        path,
        "a float32 tensor of shape [4] at offset 2 reaches past the end of storage '0' "
        "(4 elements)",
    )


def test_truncated_legacy(expect_error, fixtures_dir: Path, tmp_path: Path) -> None:
    data = (fixtures_dir / "legacy_format.pt").read_bytes()
    path = tmp_path / "legacy_cut.pt"
    path.write_bytes(data[:-10])
    res = expect_error(["inspect", path], path)
    assert "truncated" in res.err_lines[0]


def test_truncated_safetensors(expect_error, fixtures_dir: Path, tmp_path: Path) -> None:
    data = (fixtures_dir / "model.safetensors").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:-4])
    expect_error(["inspect", path], path, "is truncated: tensor data is cut short")


def test_plain_pickle(expect_error, tmp_path: Path) -> None:
    import pickle

    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    expect_error(
        ["inspect", path], path, "is a plain pickle, not a torch checkpoint (no magic number)"
    )


def test_relative_path_is_echoed_as_given(
    expect_error, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "e.pt").write_bytes(b"")
    expect_error(["inspect", "e.pt"], "e.pt", "is empty (0 bytes)")
    assert os.listdir(tmp_path) == ["e.pt"]
