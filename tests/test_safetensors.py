"""``ckpttool to-safetensors`` (issue 4): bit-identical tensors, metadata, tied weights, views,
dtypes, key options, sharding with a Hugging Face-style loader, all-or-nothing, real-world files.

Every output is read back with ``safetensors`` itself and compared, bit for bit, with what
``torch.load(input, map_location="cpu", weights_only=True)`` returns (views made contiguous).
The real-world files in ``../shared/real-world/`` are read in place and never loaded with
``weights_only=False``; those tests skip when the folder is absent.

Known bugs are ``xfail(strict=True)`` tests whose reason starts with ``BUG:``.
"""

from __future__ import annotations

import argparse
import json
import os
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ckpttool
from ckpttool.cli import cli
from ckpttool.ops.to_safetensors import ALIASES_KEY, parse_size
from ckpttool.writers.shards import INDEX_NAME

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "fixtures"
REAL_WORLD = Path(os.environ.get("CKPTTOOL_REAL_WORLD", REPO.parent / "shared" / "real-world"))
_RW_JSONL = REAL_WORLD / "expected.jsonl"
RW_RECORDS: dict[str, dict[str, Any]] = (
    {
        (rec := json.loads(line))["file"]: rec
        for line in _RW_JSONL.read_text(encoding="utf-8").splitlines()
        if line.strip()
    }
    if _RW_JSONL.is_file()
    else {}
)
RW_ABSENT = f"real-world checkpoints not present at {REAL_WORLD}"

# torch names of the safetensors dtype codes (expected.jsonl uses codes for safetensors files)
ST_CODES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
}


# -- helpers ----------------------------------------------------------------------------------
@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def err_lines(self) -> list[str]:
        return self.stderr.splitlines()

    @property
    def out_lines(self) -> list[str]:
        """The result lines: "renamed", "shared", "wrote" (warnings, notes are on stderr)."""
        return self.stdout.splitlines()


def ck(*args: str | os.PathLike[str]) -> Run:
    """``ckpttool ARGS`` in-process; a traceback (anything but SystemExit) fails the test."""
    res = CliRunner().invoke(cli, [os.fspath(a) for a in args], prog_name="ckpttool")
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        tb = "".join(traceback.format_exception(*res.exc_info))  # type: ignore[misc]
        pytest.fail(f"ckpttool {' '.join(map(str, args))} raised:\n{tb}")
    run = Run(res.exit_code, res.stdout, res.stderr)
    assert "Traceback" not in run.stdout + run.stderr
    return run


def ok(*args: str | os.PathLike[str]) -> Run:
    run = ck(*args)
    assert run.code == 0, (args, run.stderr)
    return run


def refused(args: list[Any], path: str | os.PathLike[str], problem: str, code: int = 1) -> Run:
    """Exit ``code``, exactly one stderr line ``Error: PATH: ...problem...`` (``Danger:`` for
    dangerous globals, exit 3, as the README documents)."""
    run = ck(*args)
    assert run.code == code, (run.code, run.stderr)
    assert len(run.err_lines) == 1, run.stderr
    prefix = f"{'Danger' if code == 3 else 'Error'}: {os.fspath(path)}: "
    assert run.err_lines[0].startswith(prefix), (run.err_lines[0], prefix)
    assert problem in run.err_lines[0], run.err_lines[0]
    return run


def meta_of(path: Path) -> dict[str, str]:
    with safe_open(os.fspath(path), framework="pt") as f:
        return dict(f.metadata() or {})


def aliases_of(path: Path) -> dict[str, str]:
    raw = meta_of(path).get(ALIASES_KEY)
    return json.loads(raw) if raw is not None else {}


def raw_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(header length, parsed header) as the safetensors format lays them out."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return n, json.loads(f.read(n))


def same_bits(got: torch.Tensor, want: torch.Tensor, name: str = "") -> None:
    """Same dtype, shape and bytes (NaN-safe); also ``torch.equal``."""
    want = want.contiguous()
    assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
    assert tuple(got.shape) == tuple(want.shape), (name, got.shape, want.shape)
    assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name
    if not want.is_floating_point() or not torch.isnan(want).any():
        assert torch.equal(got, want), name


def expand_aliases(out: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, Any]:
    """The full state dict a loader rebuilds: stored tensors plus each alias -> its stored copy."""
    full: dict[str, Any] = dict(out)
    for alias, kept in aliases.items():
        assert kept in out, (alias, kept)
        assert alias not in out, alias
        full[alias] = out[kept]
    return full


def check_against(out_path: Path, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The output holds exactly ``reference`` (aliases expanded), bit for bit."""
    out = load_file(os.fspath(out_path))
    full = expand_aliases(out, aliases_of(out_path))
    assert sorted(full) == sorted(reference)
    for name, want in reference.items():
        same_bits(full[name], want, name)
    return out


def load_sharded(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A Hugging Face-style sharded load: read weight_map, load_file each shard, merge."""
    index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        part = load_file(os.fspath(folder / shard))
        assert not set(part) & set(sd)
        sd.update(part)
    assert sorted(sd) == sorted(index["weight_map"])
    for name, shard in index["weight_map"].items():
        with safe_open(os.fspath(folder / shard), framework="pt") as f:
            assert name in set(f.keys())
    return sd, index


_NUMPY_RECONSTRUCT = np._core.multiarray._reconstruct
_NUMPY_SCALAR = np._core.multiarray.scalar
SAFE_EXTRA = [
    argparse.Namespace,
    np.ndarray,
    np.dtype,
    _NUMPY_RECONSTRUCT,
    (_NUMPY_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
    _NUMPY_SCALAR,
    (_NUMPY_SCALAR, "numpy.core.multiarray.scalar"),
    *{type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"},
]


def torch_reference(path: Path) -> Any:
    """``torch.load(..., map_location="cpu", weights_only=True)``; safetensors via load_file.

    argparse.Namespace and numpy arrays/scalars are allow-listed (they build no code), so the
    training checkpoints that pickle them load too.
    """
    if path.is_dir():
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(path.glob("*.safetensors")):
            sd.update(load_file(os.fspath(shard)))
        return sd
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        return load_file(os.fspath(path))
    with torch.serialization.safe_globals(SAFE_EXTRA):
        return torch.load(path, map_location="cpu", weights_only=True)


def flatten(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor under its dotted path (dict keys, list indices), as ``--all`` names them."""
    out: dict[str, torch.Tensor] = {}
    stack: list[tuple[str, Any]] = [(prefix, obj)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, torch.Tensor):
            out[path] = node
            continue
        if isinstance(node, dict):
            items = [(str(k), v) for k, v in node.items()]
        elif isinstance(node, (list, tuple)):
            items = [(str(i), v) for i, v in enumerate(node)]
        elif isinstance(node, argparse.Namespace):
            items = list(vars(node).items())
        else:
            continue
        stack.extend((f"{path}.{k}" if path else k, v) for k, v in items)
    return out


def save(tmp: Path, name: str, obj: Any) -> Path:
    path = tmp / name
    torch.save(obj, path)
    return path


# -- fixtures: every input format, bit-identical ------------------------------------------------
# (fixture, where its state dict is in the loaded object: a key or None for the root)
FIXTURE_INPUTS = [
    ("single_gpu_state_dict.pt", None),
    ("dataparallel_state_dict.pt", None),
    ("model_parallel_cuda0-3.pt", None),
    ("compiled_orig_mod.pt", None),
    ("no_crc32.pt", None),
    ("fp16_bf16.pt", None),
    ("tied_weights.pt", None),
    ("noncontiguous_view.pt", None),
    ("legacy_format.pt", None),
    ("ddp_rank0_checkpoint.pt", "model"),
    ("lightning_style.ckpt", "state_dict"),
    ("model.safetensors", None),
    ("sharded", None),
]


@pytest.mark.parametrize(("fixture", "where"), FIXTURE_INPUTS, ids=[f for f, _ in FIXTURE_INPUTS])
def test_fixture_converts_bit_identical(fixture: str, where: str | None, tmp_path: Path) -> None:
    src = FIX / fixture
    out = tmp_path / "out.safetensors"
    run = ok("to-safetensors", src, out)
    ref = torch_reference(src)
    sd = ref[where] if where else ref
    check_against(out, dict(sd))
    meta = meta_of(out)
    assert meta["format"] == "pt"
    assert all(isinstance(v, str) for v in meta.values())
    assert run.out_lines[-1].startswith(f"wrote {out}: ")
    assert run.out_lines[-1].endswith(" (verified)")


def test_fp16_bf16_exact_including_0d_and_empty(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    ok("to-safetensors", FIX / "fp16_bf16.pt", out)
    got = load_file(out)
    ref = torch.load(FIX / "fp16_bf16.pt", weights_only=True)
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in ref.items()}
    assert got["bf16_scalar"].shape == () and got["bf16_scalar"].item() == 1.5
    assert got["half_empty"].shape == (0, 4)
    _, header = raw_header(out)
    assert header["half"]["dtype"] == "F16" and header["bf16"]["dtype"] == "BF16"
    lo, hi = header["half_empty"]["data_offsets"]
    assert lo == hi


def test_output_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for out in (a, b):
        ok("to-safetensors", FIX / "tied_weights.pt", out)
    assert a.read_bytes() == b.read_bytes()


# -- metadata and what is left out ---------------------------------------------------------------
def test_metadata_scalars_as_strings_and_left_out_reported(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    run = ok(
        "to-safetensors",
        FIX / "ddp_rank0_checkpoint.pt",
        out,
        "--metadata",
        "source=unit test",
        "--metadata",
        "expr=a=b",
    )
    assert meta_of(out) == {
        "format": "pt",
        "epoch": "37",
        "best_acc": "0.913",
        "source": "unit test",
        "expr": "a=b",
    }
    assert "left out: optimizer (not a scalar)" in run.err_lines
    assert "left out: args (not a scalar)" in run.err_lines


def test_lightning_scalars_and_left_out(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    run = ok("to-safetensors", FIX / "lightning_style.ckpt", out)
    meta = meta_of(out)
    assert meta["format"] == "pt"
    assert meta["epoch"] == "3" and meta["global_step"] == "120"
    for entry in ("optimizer_states", "lr_schedulers", "hyper_parameters"):
        assert f"left out: {entry} (not a scalar)" in run.err_lines


def test_tensor_outside_the_state_dict_is_reported(tmp_path: Path) -> None:
    src = save(tmp_path, "c.pt", {"model": {"w": torch.ones(2)}, "ema": torch.zeros(3), "step": 5})
    out = tmp_path / "o.safetensors"
    run = ok("to-safetensors", src, out)
    assert sorted(load_file(out)) == ["w"]
    assert meta_of(out)["step"] == "5"
    assert "left out: ema (a tensor outside the chosen state dict; --all keeps it)" in run.err_lines


def test_none_entries_in_the_state_dict_are_reported(tmp_path: Path) -> None:
    src = save(tmp_path, "c.pt", {"w": torch.ones(2), "b": None})
    out = tmp_path / "o.safetensors"
    run = ok("to-safetensors", src, out)
    assert sorted(load_file(out)) == ["w"]
    assert "left out: b (None)" in run.err_lines


def test_bad_metadata_option_is_a_usage_error(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    run = ck("to-safetensors", FIX / "tied_weights.pt", out, "--metadata", "novalue")
    assert run.code == 2
    assert "KEY=VALUE" in run.stderr
    assert not out.exists()


def test_all_keeps_scalars_or_reports_them(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    run = ok("to-safetensors", FIX / "ddp_rank0_checkpoint.pt", out, "--all")
    meta = meta_of(out)
    assert meta.get("epoch") == "37" or "left out: epoch" in run.stderr
    assert "args" in run.stderr


def test_scalar_named_format_is_not_dropped_silently(tmp_path: Path) -> None:
    src = save(tmp_path, "c.pt", {"model": {"w": torch.ones(2)}, "format": "v2", "epoch": 3})
    out = tmp_path / "o.safetensors"
    run = ok("to-safetensors", src, out)
    meta = meta_of(out)
    assert meta["format"] == "pt" and meta["epoch"] == "3"
    assert "v2" in meta.values() or "left out: format" in run.stderr


def test_safetensors_input_metadata_is_not_dropped_silently(tmp_path: Path) -> None:
    src = tmp_path / "in.safetensors"
    save_file({"w": torch.ones(2)}, os.fspath(src), metadata={"test": "a"})
    out = tmp_path / "o.safetensors"
    run = ok("to-safetensors", src, out)
    assert meta_of(out).get("test") == "a" or "left out: test" in run.stderr


# -- tied and shared tensors ---------------------------------------------------------------------
def test_tied_weights_stored_once_with_aliases(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    run = ok("to-safetensors", FIX / "tied_weights.pt", out)
    stored = load_file(out)
    # attn.k.weight is a different view into attn.qkv.weight's storage: both written
    assert sorted(stored) == ["attn.k.weight", "attn.qkv.weight", "embed.weight"]
    assert aliases_of(out) == {"lm_head.weight": "embed.weight"}
    assert json.loads(meta_of(out)[ALIASES_KEY]) == {"lm_head.weight": "embed.weight"}
    assert "shared: lm_head.weight is stored once as embed.weight" in run.out_lines
    ref = torch.load(FIX / "tied_weights.pt", weights_only=True)
    same_bits(stored["attn.k.weight"], ref["attn.qkv.weight"][8:16])
    check_against(out, ref)


def test_keep_picks_the_stored_name(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    run = ok("to-safetensors", FIX / "tied_weights.pt", out, "--keep", "lm_head.weight")
    assert "lm_head.weight" in load_file(out)
    assert "embed.weight" not in load_file(out)
    assert aliases_of(out) == {"embed.weight": "lm_head.weight"}
    assert "shared: embed.weight is stored once as lm_head.weight" in run.out_lines
    check_against(out, torch.load(FIX / "tied_weights.pt", weights_only=True))


def test_duplicate_shared_writes_independent_equal_copies(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    run = ok("to-safetensors", FIX / "tied_weights.pt", out, "--duplicate-shared")
    got = load_file(out)
    assert sorted(got) == ["attn.k.weight", "attn.qkv.weight", "embed.weight", "lm_head.weight"]
    assert ALIASES_KEY not in meta_of(out)
    assert "shared:" not in run.stderr
    same_bits(got["embed.weight"], got["lm_head.weight"])
    _, header = raw_header(out)
    assert header["embed.weight"]["data_offsets"] != header["lm_head.weight"]["data_offsets"]
    check_against(out, torch.load(FIX / "tied_weights.pt", weights_only=True))


def test_legacy_tied_weights(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    ok("to-safetensors", FIX / "legacy_format.pt", out)
    assert aliases_of(out) == {"fc2.weight_tied": "fc2.weight"}


def test_partial_view_writes_only_its_bytes(tmp_path: Path) -> None:
    big = torch.arange(1_000_000, dtype=torch.float32)
    src = save(tmp_path, "c.pt", {"small": big[1000:1010], "strided": big[::250_000]})
    assert src.stat().st_size > 4_000_000  # torch.save wrote the whole 4 MB storage
    out = tmp_path / "o.safetensors"
    result = ckpttool.to_safetensors(src, out)
    n, header = raw_header(out)
    assert out.stat().st_size == 8 + n + 40 + 16
    assert result.bytes == 56
    assert header["small"]["data_offsets"][1] - header["small"]["data_offsets"][0] == 40
    assert header["strided"]["data_offsets"][1] - header["strided"]["data_offsets"][0] == 16
    got = load_file(out)
    same_bits(got["small"], big[1000:1010])
    same_bits(got["strided"], big[::250_000])
    assert ALIASES_KEY not in meta_of(out)  # disjoint parts of one storage are not "shared"


def test_noncontiguous_written_contiguous_same_values(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    ok("to-safetensors", FIX / "noncontiguous_view.pt", out)
    ref = torch.load(FIX / "noncontiguous_view.pt", weights_only=True)
    assert not ref["transposed"].is_contiguous()
    assert not ref["expanded"].is_contiguous()
    got = check_against(out, ref)
    n, header = raw_header(out)
    assert out.stat().st_size == 8 + n + sum(t.numel() * t.element_size() for t in got.values())
    assert header["expanded"]["shape"] == [3, 4]


# -- dtype -----------------------------------------------------------------------------------------
def test_dtype_bfloat16_casts_floats_only(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    ok("to-safetensors", FIX / "fp16_bf16.pt", out, "--dtype", "bfloat16")
    ref = torch.load(FIX / "fp16_bf16.pt", weights_only=True)
    got = load_file(out)
    assert sorted(got) == sorted(ref)
    for name, want in ref.items():
        if want.is_floating_point():
            same_bits(got[name], want.to(torch.bfloat16), name)
        else:
            same_bits(got[name], want, name)
    assert got["int64"].dtype == torch.int64 and got["bool"].dtype == torch.bool


def test_dtype_cast_of_views_and_ints(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    ok("to-safetensors", FIX / "noncontiguous_view.pt", out, "--dtype", "float16")
    ref = torch.load(FIX / "noncontiguous_view.pt", weights_only=True)
    got = load_file(out)
    for name in ("transposed", "rows", "column"):
        same_bits(got[name], ref[name].to(torch.float16), name)
    same_bits(got["expanded"], ref["expanded"])  # int32 untouched


def test_dtype_cast_keeps_tied_aliases(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    ok("to-safetensors", FIX / "tied_weights.pt", out, "--dtype", "float16")
    assert aliases_of(out) == {"lm_head.weight": "embed.weight"}
    ref = torch.load(FIX / "tied_weights.pt", weights_only=True)
    check_against(out, {k: v.to(torch.float16) for k, v in ref.items()})


# -- key options ---------------------------------------------------------------------------------
def test_strip_module(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    run = ok("to-safetensors", FIX / "ddp_rank0_checkpoint.pt", out, "--strip-module")
    ref = torch_reference(FIX / "ddp_rank0_checkpoint.pt")["model"]
    check_against(out, {k.removeprefix("module."): v for k, v in ref.items()})
    assert "renamed 4 keys" in run.out_lines


def test_add_prefix_and_add_module(tmp_path: Path) -> None:
    ref = torch.load(FIX / "single_gpu_state_dict.pt", weights_only=True)
    out = tmp_path / "a.safetensors"
    ok("to-safetensors", FIX / "single_gpu_state_dict.pt", out, "--add-prefix", "model.")
    check_against(out, {f"model.{k}": v for k, v in ref.items()})
    out2 = tmp_path / "b.safetensors"
    ok("to-safetensors", FIX / "dataparallel_state_dict.pt", out2, "--add-module")
    assert all(
        k.startswith("module.") and not k.startswith("module.module.") for k in load_file(out2)
    )


def test_replace_and_strip_prefix(tmp_path: Path) -> None:
    ref = torch.load(FIX / "compiled_orig_mod.pt", weights_only=True)
    out = tmp_path / "a.safetensors"
    ok("to-safetensors", FIX / "compiled_orig_mod.pt", out, "--replace-prefix", "_orig_mod.=net.")
    check_against(out, {"net." + k.removeprefix("_orig_mod."): v for k, v in ref.items()})
    out2 = tmp_path / "b.safetensors"
    ok("to-safetensors", FIX / "compiled_orig_mod.pt", out2, "--strip-prefix", "_orig_mod.")
    check_against(out2, {k.removeprefix("_orig_mod."): v for k, v in ref.items()})


def test_key_collision_is_refused_naming_both(tmp_path: Path) -> None:
    src = save(tmp_path, "c.pt", {"module.fc.weight": torch.ones(2), "fc.weight": torch.zeros(2)})
    out = tmp_path / "o.safetensors"
    refused(
        ["to-safetensors", src, out, "--strip-module"],
        src,
        "renaming would make 'module.fc.weight' and 'fc.weight' both 'fc.weight'",
    )
    assert not out.exists()
    assert os.listdir(tmp_path) == ["c.pt"]


def test_replace_prefix_collision_with_tied_name(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    refused(
        ["to-safetensors", FIX / "tied_weights.pt", out, "--replace-prefix", "lm_head.=embed."],
        FIX / "tied_weights.pt",
        "renaming would make 'embed.weight' and 'lm_head.weight' both 'embed.weight'",
    )
    assert not out.exists()


# -- which tensors ---------------------------------------------------------------------------------
def test_all_writes_every_tensor_under_its_path(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    ok("to-safetensors", FIX / "ddp_rank0_checkpoint.pt", out, "--all")
    ref = flatten(torch_reference(FIX / "ddp_rank0_checkpoint.pt"))
    assert "model.module.fc1.weight" in ref and "optimizer.state.0.exp_avg" in ref
    check_against(out, ref)


def test_key_chooses_the_state_dict(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    ok("to-safetensors", FIX / "ddp_rank0_checkpoint.pt", out, "--state-dict", "optimizer.state.0")
    ref = torch_reference(FIX / "ddp_rank0_checkpoint.pt")["optimizer"]["state"][0]
    check_against(out, ref)
    out2 = tmp_path / "o2.safetensors"
    refused(
        ["to-safetensors", FIX / "ddp_rank0_checkpoint.pt", out2, "--state-dict", "nope"],
        FIX / "ddp_rank0_checkpoint.pt",
        "no entry 'nope' (--state-dict)",
    )
    assert not out2.exists()


def test_torchscript_needs_all(tmp_path: Path) -> None:
    src = FIX / "torchscript_module.pt"
    out = tmp_path / "o.safetensors"
    refused(["to-safetensors", src, out], src, "is a TorchScript archive: use --all")
    assert not out.exists()
    ok("to-safetensors", src, out, "--all")
    got = load_file(out)
    assert {k: tuple(v.shape) for k, v in got.items()} == {"weight": (2, 4), "bias": (2,)}


def test_all_with_colliding_paths_is_not_silent(tmp_path: Path) -> None:
    src = save(tmp_path, "c.pt", {"a": {"b": torch.ones(2)}, "a.b": torch.zeros(3)})
    out = tmp_path / "o.safetensors"
    run = ck("to-safetensors", src, out, "--all")
    if run.code == 0:
        stored = load_file(out)
        assert len(stored) + len(aliases_of(out)) == 2 or "left out" in run.stderr
    else:
        assert run.code == 1 and "a.b" in run.stderr


@pytest.mark.parametrize(
    "obj",
    [{"epoch": 3, "name": "run"}, {}, {"model": {}}],
    ids=["scalars-only", "empty-dict", "empty-state-dict"],
)
def test_zero_tensors_is_a_clear_error(obj: Any, tmp_path: Path) -> None:
    src = save(tmp_path, "c.pt", obj)
    out = tmp_path / "o.safetensors"
    refused(["to-safetensors", src, out], src, "holds no tensors")
    refused(["to-safetensors", src, out, "--all"], src, "holds no tensors")
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]


def test_dangerous_input_refused(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    refused(
        ["to-safetensors", FIX / "malicious.pt", out],
        FIX / "malicious.pt",
        "refusing: the pickle names dangerous globals",
        code=3,
    )
    assert os.listdir(tmp_path) == []


# -- API and verification -------------------------------------------------------------------------
def test_api_result_and_verification_flag(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    result = ckpttool.to_safetensors(FIX / "tied_weights.pt", out)
    assert result.verified is True
    assert result.tensors == 3
    assert result.bytes == 512 + 768 + 256
    assert result.files == [os.fspath(out)]
    assert result.aliases == {"lm_head.weight": "embed.weight"}
    out2 = tmp_path / "o2.safetensors"
    assert ckpttool.to_safetensors(FIX / "tied_weights.pt", out2, verify=False).verified is False
    assert out.read_bytes() == out2.read_bytes()
    run = ok("to-safetensors", FIX / "tied_weights.pt", tmp_path / "o3.safetensors", "--no-verify")
    assert run.out_lines[-1].endswith("(not verified)")


def test_api_errors_are_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(
        ckpttool.CheckpointError, match="cannot cast to 'int8': the dtype must be one of"
    ):
        ckpttool.to_safetensors(FIX / "tied_weights.pt", tmp_path / "o", dtype="int8")
    assert os.listdir(tmp_path) == []


def test_existing_output_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"previous")
    refused(
        ["to-safetensors", FIX / "tied_weights.pt", out],
        out,
        "output exists; pass --force to replace it",
    )
    assert out.read_bytes() == b"previous"
    ok("to-safetensors", FIX / "tied_weights.pt", out, "--force")
    assert "embed.weight" in load_file(out)
    assert os.listdir(tmp_path) == ["o.safetensors"]


# -- sharding -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "size"),
    [("5GB", 5 * 10**9), ("500MiB", 500 << 20), ("1000", 1000), ("2.5KB", 2500), ("100B", 100)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_bad_shard_size_is_a_usage_error(tmp_path: Path) -> None:
    run = ck("to-safetensors", FIX / "tied_weights.pt", tmp_path / "o", "--max-shard-size", "big")
    assert run.code == 2 and "--max-shard-size" in run.stderr
    assert os.listdir(tmp_path) == []


def _many(tmp: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    sd = {f"layers.{i}.weight": torch.randn(10, 25) for i in range(7)}  # 1000 bytes each
    sd["head.bias"] = torch.arange(3, dtype=torch.int64)
    sd["big"] = torch.randn(1000)  # 4000 bytes: over the limit, a shard of its own
    return save(tmp, "c.pt", sd), sd


def test_sharded_output_loads_like_hugging_face(tmp_path: Path) -> None:
    src, sd = _many(tmp_path)
    out = tmp_path / "out"
    run = ok("to-safetensors", src, out, "--max-shard-size", "2.5KB")
    merged, index = load_sharded(out)
    for name, want in sd.items():
        same_bits(merged[name], want, name)
    assert sorted(merged) == sorted(sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 4
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(os.listdir(out)) == sorted([*shards, INDEX_NAME])
    assert sorted(set(index["weight_map"].values())) == shards
    for shard in shards:
        data = load_file(out / shard)
        size = sum(t.numel() * t.element_size() for t in data.values())
        assert size <= 2500 or len(data) == 1, (shard, size)
        assert meta_of(out / shard)["format"] == "pt"
    assert run.out_lines[-1] == f"wrote {out}: {len(sd)} tensors in {n} shards (verified)"


def test_sharded_from_sharded_and_legacy_inputs(tmp_path: Path) -> None:
    for src in (FIX / "sharded", FIX / "legacy_format.pt"):
        out = tmp_path / src.stem
        ok("to-safetensors", src, out, "--max-shard-size", "300B")
        merged, index = load_sharded(out)
        ref = dict(torch_reference(src))
        full = expand_aliases(merged, aliases_of(out / next(iter(index["weight_map"].values()))))
        assert sorted(full) == sorted(ref)
        for name, want in ref.items():
            same_bits(full[name], want, name)
        assert index["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in merged.values()
        )


def test_sharded_tied_groups_stay_in_one_shard(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ok(
        "to-safetensors",
        FIX / "tied_weights.pt",
        out,
        "--max-shard-size",
        "600B",
        "--duplicate-shared",
    )
    merged, index = load_sharded(out)
    wm = index["weight_map"]
    assert len(set(wm.values())) >= 2
    assert wm["embed.weight"] == wm["lm_head.weight"]
    assert wm["attn.qkv.weight"] == wm["attn.k.weight"]
    same_bits(merged["embed.weight"], merged["lm_head.weight"])
    ref = torch.load(FIX / "tied_weights.pt", weights_only=True)
    for name, want in ref.items():
        same_bits(merged[name], want, name)
    assert index["metadata"]["total_size"] == 512 * 2 + 768 + 256


def test_sharded_aliases_recorded_in_every_shard(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ok("to-safetensors", FIX / "tied_weights.pt", out, "--max-shard-size", "100B")
    _merged, index = load_sharded(out)
    assert "lm_head.weight" not in index["weight_map"]
    for shard in set(index["weight_map"].values()):
        assert aliases_of(out / shard) == {"lm_head.weight": "embed.weight"}
    assert index["metadata"]["total_size"] == 512 + 768 + 256


def test_sharded_output_folder_rules(tmp_path: Path) -> None:
    src = FIX / "single_gpu_state_dict.pt"
    missing = tmp_path / "new"
    ok("to-safetensors", src, missing, "--max-shard-size", "500B")  # created if missing
    assert (missing / INDEX_NAME).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    ok("to-safetensors", src, empty, "--max-shard-size", "500B")  # an empty folder is fine
    assert (empty / INDEX_NAME).is_file()
    full = tmp_path / "full"
    full.mkdir()
    (full / "model-00001-of-00009.safetensors").write_bytes(b"stale")
    refused(
        ["to-safetensors", src, full, "--max-shard-size", "500B"],
        full,
        "output exists; pass --force to replace it",
    )
    assert os.listdir(full) == ["model-00001-of-00009.safetensors"]
    ok("to-safetensors", src, full, "--max-shard-size", "500B", "--force")
    assert "model-00001-of-00009.safetensors" not in os.listdir(full)  # no stale shard mixed in
    load_sharded(full)
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".")]
    assert leftovers == []


def _failing_progress(after: int) -> Any:
    def factory(total: int) -> Any:
        seen = [0]

        def cb(n: int) -> None:
            seen[0] += n
            if seen[0] > after:
                raise RuntimeError("injected failure while writing")

        return cb

    return factory


def test_sharded_all_or_nothing_on_failure(tmp_path: Path) -> None:
    src, _ = _many(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="injected"):
        ckpttool.to_safetensors(src, out, max_shard_size="2.5KB", progress=_failing_progress(6000))
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]  # no folder, no temp folder
    # an existing output folder survives a failed --force
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError, match="injected"):
        ckpttool.to_safetensors(
            src, out, max_shard_size="2.5KB", force=True, progress=_failing_progress(6000)
        )
    assert sorted(os.listdir(tmp_path)) == ["c.pt", "out"]
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "old"


def test_single_file_all_or_nothing_on_failure(tmp_path: Path) -> None:
    src, _ = _many(tmp_path)
    out = tmp_path / "o.safetensors"
    with pytest.raises(RuntimeError, match="injected"):
        ckpttool.to_safetensors(src, out, progress=_failing_progress(3000))
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]


# -- real-world checkpoints ------------------------------------------------------------------------
# Files refused whatever the options, and the exact reason.
RW_REFUSED = {
    "08_torchscript-quantized-vgg.pt": "which safetensors cannot store",
    "22_zip-hf-training-args-no-tensors.bin": "holds no tensors",
}
# Files without a state dict: the default refuses with this reason, --all converts.
RW_NEEDS_ALL = {
    "21_zip-hf-rng-state-numpy2.pth": (
        "no state dict found: choose one with --state-dict PATH, or use --all"
    ),
}
# Whole pickled modules of classes that no longer exist: torch cannot load them with
# weights_only=True, so their output is checked against expected.jsonl's figures only.
RW_NO_TORCH_REFERENCE = {
    "15_legacy-whole-module-sequential.pkl",
    "18_legacy-2017-whole-policy-gym-float64.pt",
    "32_legacy-2017-py27-typed-tensors-dataparallel.pth",
}
RW_BUGS: dict[str, str] = {}


def _rw_params() -> list[Any]:
    if not RW_RECORDS:
        return [pytest.param(None, marks=pytest.mark.skip(reason=RW_ABSENT), id="absent")]
    params = []
    for name in sorted(RW_RECORDS):
        marks = [pytest.mark.xfail(strict=True, reason=RW_BUGS[name])] if name in RW_BUGS else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.mark.parametrize("rw_file", _rw_params())
def test_real_world_converts_or_is_refused_precisely(rw_file: str, tmp_path: Path) -> None:
    src = REAL_WORLD / rw_file
    rec = RW_RECORDS[rw_file]
    out = tmp_path / "o.safetensors"
    if rw_file in RW_REFUSED:
        if rec["format"] == "torchscript":  # the default points at --all, which must refuse
            refused(["to-safetensors", src, out], src, "is a TorchScript archive: use --all")
        else:
            refused(["to-safetensors", src, out], src, RW_REFUSED[rw_file])
        assert os.listdir(tmp_path) == []
        refused(["to-safetensors", src, out, "--all"], src, RW_REFUSED[rw_file])
        assert os.listdir(tmp_path) == []
        return

    if rw_file in RW_NEEDS_ALL:
        refused(["to-safetensors", src, out], src, RW_NEEDS_ALL[rw_file])
        assert os.listdir(tmp_path) == []
    else:
        run = ok("to-safetensors", src, out)
        assert run.out_lines[-1].endswith("(verified)")
        assert meta_of(out)["format"] == "pt"
        assert load_file(out)

    # --all: every tensor in the file, bit for bit, under its dotted path
    out_all = tmp_path / "all.safetensors"
    ok("to-safetensors", src, out_all, "--all")
    stored = load_file(out_all)
    aliases = aliases_of(out_all)
    full = expand_aliases(stored, aliases)
    assert len(full) == rec["num_tensors"]
    want_dtypes = Counter(ST_CODES.get(d, d) for d, n in rec["dtypes"].items() for _ in range(n))
    assert Counter(str(t.dtype).removeprefix("torch.") for t in full.values()) == want_dtypes
    if rw_file in RW_NO_TORCH_REFERENCE:
        assert sum(t.numel() * t.element_size() for t in full.values()) == rec["tensor_bytes"]
        return
    ref = flatten(torch_reference(src))
    assert sorted(full) == sorted(ref)
    for name, want in ref.items():
        same_bits(full[name], want, name)
    if rw_file not in RW_NEEDS_ALL:
        # the default output is the state dict: each tensor is one of the file's, same bits
        default = expand_aliases(load_file(out), aliases_of(out))
        assert 0 < len(default) <= len(full)
        for name, got in default.items():
            matches = [p for p in full if p == name or p.endswith("." + name)]
            assert matches, name
            same_bits(got, full[matches[0]], name)


# -- issue 9 class 7 / issue 15: every dtype safetensors stores, without torch ---------------------
def big_endian_copy(src: Path, dst: Path) -> Path:
    """``src`` (a torch zip) as a big-endian machine would have saved it: ``byteorder`` says
    ``big`` and each storage record is swapped in units of its own dtype, as torch's loader
    swaps it back (an untyped uint8 storage is not swapped)."""
    import zipfile

    storages = ckpttool.open_checkpoint(src).storages
    dtype_of = {s.record: s.dtype for s in storages.values()}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("/byteorder"):
                data = b"big"
            elif name in dtype_of:
                t = torch.empty(0, dtype=getattr(torch, dtype_of[name]))
                unit = t.element_size() // (2 if t.is_complex() else 1)
                data = np.frombuffer(data, np.uint8).reshape(-1, unit)[:, ::-1].tobytes()
            zout.writestr(name, data)
    return dst


def _dtype_zoo() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    base = torch.randn(6, 8, generator=g)
    bytes_ = torch.arange(48, dtype=torch.uint8)
    return {
        "transposed": base.t(),
        "offset_view": base.reshape(-1)[5:21].view(4, 4),
        "expanded": torch.arange(3.0).expand(4, 3),
        "empty": torch.empty(0, 3),
        "empty_view": base[:, 3:3],
        "scalar": torch.tensor(0.5),
        "half": base.half(),
        "bf16_t": base.bfloat16().t(),
        "f64": base.double()[::2],
        "c64_t": torch.randn(3, 2, dtype=torch.complex64, generator=g).t(),
        "f8_e4m3fn": base.to(torch.float8_e4m3fn),
        "f8_e5m2_t": base.to(torch.float8_e5m2).t(),
        "f8_e4m3fnuz": base.to(torch.float8_e4m3fnuz),
        "f8_e5m2fnuz": base.to(torch.float8_e5m2fnuz),
        "f8_e8m0fnu": base.abs().to(torch.float8_e8m0fnu),
        "u16": torch.arange(12, dtype=torch.int32).to(torch.uint16).view(3, 4),
        "u16_t": torch.arange(12, dtype=torch.int32).to(torch.uint16).view(3, 4).t(),
        "u32": (torch.arange(6, dtype=torch.int64) * 700_000_001).to(torch.uint32),
        "u64": torch.tensor([0, 1, 2**62], dtype=torch.int64).to(torch.uint64),
        "u8_as_u16": bytes_.view(torch.uint16)[3:9],
        "u8_as_u16_t": bytes_[:24].view(torch.uint16).view(3, 4).t(),
        "i64": torch.arange(-3, 3),
        "bool_t": (torch.arange(12) % 5 == 0).view(3, 4).t(),
    }


def _expected(src: Path) -> dict[str, torch.Tensor]:
    """What the output must hold: torch's load of the input, made contiguous."""
    want = torch.load(src, map_location="cpu", weights_only=True)
    return {k: v.contiguous() for k, v in want.items()}


@pytest.mark.parametrize("order", ["little", "big"])
def test_every_storable_dtype_and_view_converts_exactly(order: str, tmp_path: Path) -> None:
    src = save(tmp_path, "zoo.pt", _dtype_zoo())
    if order == "big":
        src = big_endian_copy(src, tmp_path / "zoo_be.pt")
    out = tmp_path / "o.safetensors"
    run = ok("to-safetensors", src, out)
    assert run.out_lines[-1].endswith("(verified)")
    check_against(out, _expected(src))


def test_cast_of_every_float_kind_equals_torch(tmp_path: Path) -> None:
    src = save(tmp_path, "zoo.pt", _dtype_zoo())
    out = tmp_path / "o.safetensors"
    ok("to-safetensors", src, out, "--dtype", "bfloat16")
    want = torch.load(src, weights_only=True)
    got = load_file(out)
    for name, w in want.items():
        expect = w.to(torch.bfloat16) if w.is_floating_point() else w
        same_bits(got[name], expect, name)


def test_no_torch_import_in_either_writer(tmp_path: Path) -> None:
    """convert (with a cast) and to-safetensors (strided, big-endian, float8, uint16, offset
    view, zero-size, cast) run without importing torch; torch loads what they wrote."""
    import subprocess
    import sys

    zoo = save(tmp_path, "zoo.pt", _dtype_zoo())
    be = big_endian_copy(zoo, tmp_path / "zoo_be.pt")
    script = (
        "import sys, ckpttool\n"
        f"d = {os.fspath(tmp_path)!r}\n"
        "ckpttool.convert(d + '/zoo.pt', d + '/conv.pt', dtype='float16')\n"
        "ckpttool.convert(d + '/zoo_be.pt', d + '/conv_be.pt', dtype='bfloat16')\n"
        "ckpttool.to_safetensors(d + '/zoo.pt', d + '/plain.safetensors')\n"
        "ckpttool.to_safetensors(d + '/zoo_be.pt', d + '/be.safetensors')\n"
        "ckpttool.to_safetensors(d + '/zoo_be.pt', d + '/cast.safetensors', dtype='float16')\n"
        "print('torch' in sys.modules)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
    check_against(tmp_path / "plain.safetensors", _expected(zoo))
    check_against(tmp_path / "be.safetensors", _expected(be))
    want = torch.load(be, weights_only=True)
    got = load_file(tmp_path / "cast.safetensors")
    for name, w in want.items():
        same_bits(got[name], w.to(torch.float16) if w.is_floating_point() else w, name)
    for conv, src, dtype in (("conv.pt", zoo, torch.float16), ("conv_be.pt", be, torch.bfloat16)):
        loaded = torch.load(tmp_path / conv, weights_only=True)
        for name, w in torch.load(src, weights_only=True).items():
            expect = w.to(dtype) if w.is_floating_point() and w.element_size() > 1 else w
            if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                continue  # whether convert casts float8 storages is convert's choice
            same_bits(loaded[name], expect, name)


def test_complex128_refused_up_front(tmp_path: Path) -> None:
    src = save(tmp_path, "c.pt", {"w": torch.ones(2), "z": torch.ones(3, dtype=torch.complex128)})
    out = tmp_path / "o.safetensors"
    refused(["to-safetensors", src, out], src, "'z' is complex128, which safetensors cannot store")
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")
def test_packed_quantized_tensors_are_read_then_refused_as_quantized(tmp_path: Path) -> None:
    x = torch.arange(7, dtype=torch.float32)
    q4 = torch.quantize_per_tensor(x, 1.0, 0, torch.quint4x2)
    q2 = torch.quantize_per_tensor(x % 4, 1.0, 0, torch.quint2x4)
    for name, q in (("q4", q4), ("q2", q2)):
        src = save(tmp_path, f"{name}.pt", {name: q})
        torch.load(src, weights_only=True)  # torch loads it
        assert ck("inspect", src).code == 0  # so do we: 7 values packed in 4 (2) bytes
        out = tmp_path / f"{name}.safetensors"
        run = refused(["to-safetensors", src, out], src, "which safetensors cannot store")
        assert f"is a quantized {q.dtype}".replace("torch.", "") in run.stderr
        assert "past the end" not in run.stderr


# -- issue 9 class 8: --dtype never casts optimizer bookkeeping; tied weights come back on load ----
def _adam_checkpoint(tmp: Path) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return save(tmp, "train.pt", {"model": model.state_dict(), "optimizer": opt.state_dict()})


def test_dtype_with_all_casts_model_weights_only(tmp_path: Path) -> None:
    src = _adam_checkpoint(tmp_path)
    out = tmp_path / "o.safetensors"
    ok("to-safetensors", src, out, "--all", "--dtype", "bfloat16")
    got = load_file(out)
    ref = torch.load(src, weights_only=True)
    same_bits(got["model.weight"], ref["model"]["weight"].to(torch.bfloat16))
    for pid, state in ref["optimizer"]["state"].items():
        for k, v in state.items():  # step and the moments stay exact (README)
            same_bits(got[f"optimizer.state.{pid}.{k}"], v, k)
    assert got["optimizer.state.0.step"].dtype == torch.float32


def test_dtype_with_optimizer_key_keeps_step_exact(tmp_path: Path) -> None:
    src = _adam_checkpoint(tmp_path)
    out = tmp_path / "o.safetensors"
    ok("to-safetensors", src, out, "--state-dict", "optimizer", "--dtype", "bfloat16")
    got = load_file(out)
    ref = torch.load(src, weights_only=True)["optimizer"]["state"]
    for pid, state in ref.items():
        same_bits(got[f"state.{pid}.step"], state["step"], "step")
        same_bits(got[f"state.{pid}.exp_avg"], state["exp_avg"].to(torch.bfloat16))


class _TinyGPT(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(11, 4)
        self.ln = torch.nn.LayerNorm(4)
        self.lm_head = torch.nn.Linear(4, 11, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2's


@pytest.mark.parametrize("layout", ["file", "index", "folder"])
def test_load_restores_tied_aliases(layout: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _TinyGPT()
    src = save(tmp_path, "gpt.pt", {"model": model.state_dict()})
    if layout == "file":
        target = tmp_path / "gpt.safetensors"
        ckpttool.to_safetensors(src, target, strip_prefix="module.")
        path = target
    else:
        target = tmp_path / "shards"
        ckpttool.to_safetensors(src, target, max_shard_size=100)
        path = target / INDEX_NAME if layout == "index" else target
    sd = ckpttool.load(path)
    assert sd["lm_head.weight"] is sd["wte.weight"]
    fresh = _TinyGPT()
    fixed = ckpttool.fix_state_dict(fresh, sd)
    assert fixed.ok and not fixed.missing and not fixed.unexpected, fixed.summary()
    fresh.load_state_dict(fixed.state_dict, strict=True)
    assert fresh.lm_head.weight is fresh.wte.weight
    assert torch.equal(fresh.wte.weight, model.wte.weight)


def test_load_refuses_broken_alias_metadata(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(2)}, os.fspath(path), metadata={ALIASES_KEY: '{"b": "zz"}'})
    with pytest.raises(ckpttool.CheckpointError, match="names 'zz', which is not stored"):
        ckpttool.load(path)
    save_file({"a": torch.ones(2)}, os.fspath(path), metadata={ALIASES_KEY: "[1]"})
    with pytest.raises(ckpttool.CheckpointError, match="not a map of tensor names"):
        ckpttool.load(path)


# -- issue 9 class 9: inspect counts storages under the dtype of the tensors viewing them ----------
@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")
def test_inspect_dtypes_show_the_tensors_dtypes(tmp_path: Path) -> None:
    zoo = {
        "f8": torch.ones(4).to(torch.float8_e4m3fn),
        "u16": torch.arange(5, dtype=torch.int32).to(torch.uint16),
        "u64": torch.arange(2, dtype=torch.int64).to(torch.uint64),
        "c32": torch.ones(3, dtype=torch.complex32),
        "raw": torch.arange(3, dtype=torch.uint8),
    }
    src = save(tmp_path, "d.pt", zoo)
    report = json.loads(ok("inspect", src, "--json").stdout)
    assert report["dtypes"] == {
        "float8_e4m3fn": {"storages": 1, "bytes": 4},
        "uint16": {"storages": 1, "bytes": 10},
        "uint64": {"storages": 1, "bytes": 16},
        "complex32": {"storages": 1, "bytes": 12},
        "uint8": {"storages": 1, "bytes": 3},
    }


def test_conjugate_and_negative_views_are_written_as_their_values(tmp_path: Path) -> None:
    """Issue 9 class 4: a conj/neg view stores the plain bytes plus a bit; safetensors has no
    bit, so the writer must resolve it (values equal torch's ``resolve_conj().resolve_neg()``)."""
    z = torch.complex(torch.arange(3.0), torch.arange(3.0) + 10)
    obj = {
        "conj": z.conj(),
        "imag_of_conj": z.clone().conj().imag,  # a float tensor with the neg bit
        "plain": z,
        "neg_float": torch._neg_view(torch.arange(4.0)),
        "neg_complex": torch._neg_view(z.clone()),
        "neg_conj": torch._neg_view(z.clone().conj()),
        "neg_int": torch._neg_view(torch.arange(4)),
        "plain_again": z.conj(),  # the same view as "conj": stored once, as an alias
    }
    src = save(tmp_path, "views.pt", obj)
    out = tmp_path / "o.safetensors"
    ok("to-safetensors", "--all", src, out)
    want = torch.load(src, weights_only=True)
    got = expand_aliases(load_file(out), aliases_of(out))
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert torch.equal(got[name], w.resolve_conj().resolve_neg()), name
