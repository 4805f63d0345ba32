"""Odd usage, small terminals and the README's promises (issue 11).

Options validated against the file (``--keep``), contradictory options refused as usage errors
(exit 2), an empty ``--filter`` reported, short ``--fmt`` errors, output names that cannot
surprise (``--max-shard-size`` with a file name), Hugging Face model folders as input (CLI and
API), ``inspect | head -1``, the progress bar at any width with a steady ETA, and the README
(help blocks at 80 columns, the DDP recipe). torch is the ground truth where tensors are read.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ckpttool
from ckpttool import progress
from ckpttool.progress import Bar, render

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "fixtures"
README = REPO / "README.md"


def usage_error(res: Any, *needles: str) -> str:
    """Exit 2, nothing on stdout, one ``Error:`` line holding every needle; returns it."""
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    assert res.stdout == ""
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, res.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# -- --fmt, --json, --filter -------------------------------------------------------------------
def test_bad_fmt_is_a_short_usage_error(run_cli) -> None:
    res = run_cli("inspect", "--fmt", "nope", FIX / "tied_weights.pt")
    line = usage_error(res, "Invalid value for '--fmt': 'nope' is not one of the table formats")
    assert "e.g. simple, github, grid" in line and "see --help" in line
    assert "youtrack" not in res.stderr and "latex_longtable" not in res.stderr
    assert max(len(ln) for ln in res.stderr.splitlines()) < 120


def test_bad_fmt_suggests_the_close_name(run_cli) -> None:
    res = run_cli("inspect", "--fmt", "gihub", FIX / "tied_weights.pt")
    usage_error(res, "did you mean 'github'?")


def test_every_tabulate_format_is_accepted(run_cli) -> None:
    from tabulate import tabulate_formats

    for fmt in ("github", "tsv", tabulate_formats[-1]):
        assert run_cli("inspect", "--fmt", fmt, FIX / "tied_weights.pt").exit_code == 0


def test_json_with_fmt_is_refused(run_cli) -> None:
    res = run_cli("inspect", "--json", "--fmt", "github", FIX / "tied_weights.pt")
    usage_error(res, "--fmt", "--json")
    assert run_cli("inspect", "--json", FIX / "tied_weights.pt").exit_code == 0


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_filter_that_matches_nothing_says_so(run_cli, as_json: bool) -> None:
    path = FIX / "ddp_rank0_checkpoint.pt"
    res = run_cli("inspect", *(["--json"] if as_json else []), "--filter", "fc1.*", path)
    assert res.exit_code == 0
    assert res.err_lines == [
        "note: no tensor name matches --filter 'fc1.*' (16 tensors; the pattern must match "
        "a whole dotted name, e.g. 'model.*')"
    ]
    if as_json:
        assert json.loads(res.stdout)["tensors"] == []
    matched = run_cli("inspect", "--filter", "model.module.fc1.*", path)
    assert matched.exit_code == 0 and matched.stderr == ""


# -- options checked against the file ----------------------------------------------------------
def test_keep_naming_no_tensor_is_a_usage_error(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "t.safetensors"
    res = run_cli("to-safetensors", FIX / "tied_weights.pt", out, "--keep", "lm_head.weigth")
    usage_error(
        res, "Invalid value for '--keep'", "no tensor named 'lm_head.weigth'", "lm_head.weight"
    )
    assert not out.exists() and os.listdir(tmp_path) == []


def test_keep_naming_a_tensor_chooses_the_stored_name(run_cli, tmp_path: Path) -> None:
    src = FIX / "tied_weights.pt"
    ref = torch.load(src)
    tied = [k for k in ref if k.endswith("weight") and k != "lm_head.weight"]
    for keep in ("lm_head.weight", *tied[:1]):
        out = tmp_path / f"{keep}.safetensors"
        assert run_cli("to-safetensors", src, out, "--keep", keep).exit_code == 0
        with safe_open(out, framework="pt") as f:
            stored = set(f.keys())
            meta = f.metadata()
        assert keep in stored
        aliases = json.loads(meta.get("ckpttool.aliases", "{}"))
        assert keep not in aliases
        for alias, kept in aliases.items():
            assert torch.equal(ref[alias], ref[kept])
        loaded = ckpttool.load(out)
        assert set(loaded) == set(ref) and all(torch.equal(loaded[k], ref[k]) for k in ref)


CONTRADICTIONS = [
    (["convert", "--strip-module", "--add-module"], ["--strip-module", "--add-module"]),
    (["convert", "--strip-prefix", "net.", "--add-prefix", "net."], ["--strip-prefix net."]),
    (["to-safetensors", "--strip-module", "--add-prefix", "module."], ["--strip-module"]),
    (["to-safetensors", "--all", "--state-dict", "model"], ["--all", "--state-dict"]),
    (["to-safetensors", "--duplicate-shared", "--keep", "x"], ["--keep", "--duplicate-shared"]),
    (["to-safetensors", "--metadata", "format=np"], ["--metadata", "'format'"]),
]


@pytest.mark.parametrize(("args", "needles"), CONTRADICTIONS, ids=[a[1] for a, _ in CONTRADICTIONS])
def test_contradictory_options_are_usage_errors(
    run_cli, tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    out = tmp_path / ("out.pt" if args[0] == "convert" else "out.safetensors")
    res = run_cli(args[0], FIX / "tied_weights.pt", out, *args[1:])
    usage_error(res, *needles)
    assert os.listdir(tmp_path) == []


# -- output names -------------------------------------------------------------------------------
def test_sharding_into_a_safetensors_file_name_is_refused(run_cli, tmp_path: Path) -> None:
    """Before: a folder called model.safetensors, in which transformers finds no weights."""
    out = tmp_path / "OUT" / "model.safetensors"
    (tmp_path / "OUT").mkdir()
    res = run_cli(
        "to-safetensors", FIX / "tied_weights.pt", out, "--max-shard-size", "1KB", "--force"
    )
    usage_error(res, repr(os.fspath(out)), "writes a folder", repr(os.path.join(out.parent, "")))
    assert os.listdir(tmp_path / "OUT") == []
    res = run_cli("to-safetensors", FIX / "tied_weights.pt", out.parent, "--max-shard-size", "1KB")
    assert res.exit_code == 0, res.stderr
    assert "model.safetensors.index.json" in os.listdir(out.parent)


# -- Hugging Face model folders -----------------------------------------------------------------
def hf_folder(root: Path, kind: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """A model folder as transformers writes it: config.json and one weights file."""
    folder = root / kind
    folder.mkdir()
    sd = {"embed.weight": torch.arange(12.0).reshape(4, 3), "head.bias": torch.ones(4)}
    (folder / "config.json").write_text('{"model_type": "toy"}\n')
    if kind == "safetensors":
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        torch.save(sd, folder / "pytorch_model.bin")
    return folder, sd


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_hf_model_folder_is_an_input(run_cli, tmp_path: Path, kind: str) -> None:
    """Before: "is a directory" from the CLI and from ckpttool.load."""
    folder, sd = hf_folder(tmp_path, kind)
    weights = "model.safetensors" if kind == "safetensors" else "pytorch_model.bin"
    assert ckpttool.open_checkpoint(folder).path == os.fspath(folder / weights)
    loaded = ckpttool.load(folder)
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    res = run_cli("inspect", "--json", folder)
    assert res.exit_code == 0 and json.loads(res.stdout)["tensor_count"] == 2
    out = tmp_path / f"{kind}.pt"
    assert run_cli("convert", folder, out, "--add-module").exit_code == 0
    got = torch.load(out)
    assert {k: v.tolist() for k, v in got.items()} == {
        f"module.{k}": v.tolist() for k, v in sd.items()
    }
    st = tmp_path / f"{kind}.safetensors"
    assert run_cli("to-safetensors", folder, st).exit_code == 0
    back = ckpttool.load(st)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_hf_folder_with_both_weights_reads_safetensors_as_transformers(tmp_path: Path) -> None:
    folder, sd = hf_folder(tmp_path, "safetensors")
    torch.save({"other": torch.zeros(1)}, folder / "pytorch_model.bin")
    assert ckpttool.open_checkpoint(folder).path == os.fspath(folder / "model.safetensors")
    with pytest.warns(ckpttool.CheckpointWarning, match="pytorch_model.bin is ignored"):
        assert set(ckpttool.load(folder)) == set(sd)


def test_folder_without_weights_is_still_refused(expect_error, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}\n")
    expect_error(["inspect", tmp_path], tmp_path, "is a directory, not a checkpoint file")


# -- a closed pipe ------------------------------------------------------------------------------
def many_tensors(path: Path, n: int) -> None:
    """A safetensors file of ``n`` one-element tensors (its table is far over a pipe's 64 kB)."""
    header: dict[str, Any] = {f"layer{i}.weight": None for i in range(n)}
    for i, name in enumerate(header):
        header[name] = {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(4 * n))


def test_inspect_into_head_exits_0(tmp_path: Path) -> None:
    """Before: exit 1 when ``head`` closed the pipe."""
    src = tmp_path / "many.safetensors"
    many_tensors(src, 5000)
    cmd = f"'{sys.executable}' -m ckpttool inspect --tensors '{src}' | head -1"
    proc = subprocess.run(
        ["bash", "-c", f'set +o pipefail; {cmd}; echo "status=${{PIPESTATUS[0]}}" >&2'],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.stdout.splitlines() == [f"path:     {src}"]
    assert proc.stderr.splitlines() == ["status=0"], proc.stderr


# -- the progress bar ---------------------------------------------------------------------------
@pytest.mark.parametrize("width", [*range(1, 70), 80, 120, 200, 1000])
def test_progress_line_never_wraps(width: int) -> None:
    """Before: under ~64 columns each redraw wrapped, leaving a column of stale bars."""
    cases = [(0, 1, None, None), (5 << 30, 10 << 30, 2.5e8, 3725.0), (12, 10, 1e12, 0.0)]
    for done, total, rate, eta in cases:
        line = render(width, "writing", done, total, rate, eta)
        assert len(line) <= max(width - 1, 0), (width, line)
        if width >= 5:
            assert re.search(r"\d+%", line), line
        if width >= 40:
            assert "[" in line and "]" in line


class FakeTerminal(io.StringIO):
    def __init__(self, columns: int) -> None:
        super().__init__()
        self.columns = columns

    def isatty(self) -> bool:
        return True


def drive(bar: Bar, clock: list[float], steps: list[tuple[float, int]]) -> list[float | None]:
    """Feed ``(seconds, units)`` steps on a fake clock; the ETA seen after each."""
    etas = []
    for dt, n in steps:
        clock[0] += dt
        bar.update(n)
        etas.append(bar.eta(clock[0]))
    return etas


def test_progress_eta_is_steady_through_a_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    """100 MB/s with one 1.5 s stall (a lazy import before the first cast): the ETA moves by
    less than a third, where the rate of the last chunk alone would triple it."""
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(progress, "terminal_width", lambda stream, default=80: stream.columns)
    term = FakeTerminal(50)
    mb = 1 << 20
    bar = Bar(4000 * mb, "writing", term)
    steady = [(0.08, 8 * mb)] * 100
    etas = drive(bar, clock, [*steady, (1.5, 8 * mb), *steady])
    known = [e for e in etas[40:] if e is not None]
    assert known
    for before, after in itertools.pairwise(known):
        assert abs(after - before) < max(before / 3, 1.0), (before, after)
    frames = [f for f in re.split(r"\r", term.getvalue()) if f]
    assert frames and all(len(f) <= 49 for f in frames)
    bar.close()
    assert term.getvalue().endswith("\r" + " " * 49 + "\r")


def test_progress_past_the_total_stays_at_100_percent(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(progress, "terminal_width", lambda stream, default=80: stream.columns)
    term = FakeTerminal(60)
    bar = Bar(100, "writing", term)
    drive(bar, clock, [(0.2, 80), (0.2, 80)])
    assert "100%" in term.getvalue() and "160%" not in term.getvalue()


def test_progress_shows_the_verifying_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the bar sat at "writing 100% ETA 0:00" while the output was read back."""
    from ckpttool.cli.options import _progress_factory

    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(progress, "terminal_width", lambda stream, default=80: stream.columns)
    term = FakeTerminal(70)
    monkeypatch.setattr(sys, "stderr", term)
    make = _progress_factory(quiet=False)
    update = make(400 << 20)  # the command line's callback for a 400 MB job
    clock[0] += 0.2
    update(400 << 20)
    assert term.getvalue().split("\r")[-2].startswith("writing 100%")
    progress.phase(update, "verifying", 200 << 20)  # what the writers call
    clock[0] += 0.2
    assert term.getvalue().split("\r")[-2].startswith("verifying   0%")
    update(100 << 20)
    assert term.getvalue().split("\r")[-2].startswith("verifying  50%")
    progress.phase(update, "writing")  # the next shard: the job's count where it was
    assert term.getvalue().split("\r")[-2].startswith("writing 100%")
    for bar in make.bars:  # type: ignore[attr-defined]
        bar.close()


def test_no_progress_bar_off_a_terminal() -> None:
    stream = io.StringIO()
    bar = Bar(1 << 30, "writing", stream)
    bar.update(1 << 29)
    bar.close()
    assert stream.getvalue() == ""


# -- README -------------------------------------------------------------------------------------
def test_readme_help_blocks_fit_80_columns() -> None:
    """Before: rendered at 100 columns, so a terminal wrapped them."""
    text = README.read_text()
    blocks = re.findall(r"<!-- help:[\w-]+ -->\n```\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    long = [ln for block in blocks for ln in block.splitlines() if len(ln) > 80]
    assert long == []


def test_readme_ddp_recipe_makes_the_naive_load_work(run_cli, tmp_path: Path) -> None:
    """The README's "one command" for resuming DDP must make a default torch.load (weights_only
    =True) work on its own fixture; --strip-module alone does not (argparse.Namespace, numpy)."""
    text = README.read_text()
    section = text[text.index("## Resuming DDP training safely") :]
    command = re.search(r"```\n(ckpttool convert [^\n]*)\n```", section)
    assert command is not None
    args = command.group(1).split()[2:]
    assert args[:2] == ["ddp_best.pth", "best.pt"]
    src = FIX / "ddp_rank0_checkpoint.pt"
    alone = tmp_path / "strip_only.pt"
    assert run_cli("convert", src, alone, "--strip-module").exit_code == 0
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(alone)
    fixed = tmp_path / "best.pt"
    assert run_cli("convert", src, fixed, *args[2:]).exit_code == 0
    ckpt = torch.load(fixed)
    assert list(ckpt["model"]) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())


def test_exit_codes_name_every_signal(run_cli) -> None:
    res = run_cli("--help")
    assert "130  interrupted (SIGINT, SIGTERM or SIGHUP); nothing was written" in res.stdout
