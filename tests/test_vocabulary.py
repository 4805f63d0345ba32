"""Issue 19 item 13: every command speaks one vocabulary.

The same option words select entries everywhere they apply (``--state-dict``, ``--only``,
``--all``, ``--filter``), every command has the same output modes (``--json``, ``-q``, ``-v``)
with the same help text, results go to stdout and everything else to stderr, and the old
``--key`` still works with a warning. Parametrized over the commands the ``cli`` group holds:
a command added later without the shared options, or without a run here, fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from ckpttool.cli import cli
from tests.conftest import FIXTURES, REPO

SD = FIXTURES / "single_gpu_state_dict.pt"  # a bare state dict of 4 tensors
TRAIN = FIXTURES / "ddp_rank0_checkpoint.pt"  # {"model": {"module.*": ...}, "optimizer": ...}

# every command, and a run of it that succeeds (exit 0) on the fixtures; "{out}" is a fresh
# folder for what it writes, "{dcp}" a DCP folder written by to-dcp from SD
RUNS: dict[str, list[str]] = {
    "inspect": [str(SD)],
    "scan": [str(SD)],
    "diff": [str(SD), str(SD)],
    "check": [str(SD), "--against", str(SD)],
    "convert": [str(SD), "{out}/a.pt"],
    "to-safetensors": [str(SD), "{out}/a.safetensors"],
    "to-dcp": [str(SD), "{out}/dcp"],
    "consolidate": ["{dcp}", "{out}/c.pt"],
}
WRITERS = ("convert", "to-safetensors", "to-dcp", "consolidate")

# the output modes: on every command, spelled and explained the same way
SHARED = {"--json": None, "--quiet": "-q", "--verbose": "-v"}
# selecting entries: the same words (and help text) on the commands they apply to
SELECTION = {
    "--state-dict": {"convert", "to-safetensors", "check"},
    "--only": {"convert", "consolidate", "to-dcp"},
    "--all": {"to-safetensors", "consolidate", "diff"},
    "--filter": {"inspect", "diff"},
    "--fmt": {"inspect", "diff"},  # the commands that print tables
}
# the old spelling --key, what it means in each command now, and a run with it
DEPRECATED: dict[str, tuple[str, list[str], str]] = {
    "convert": ("--state-dict", [str(TRAIN), "{out}/a.pt"], "model"),
    "to-safetensors": ("--state-dict", [str(TRAIN), "{out}/a.safetensors"], "model"),
    "check": ("--state-dict", [str(TRAIN), "--against", str(TRAIN)], "model"),
    "consolidate": ("--only", ["{dcp}", "{out}/c.pt"], "fc1.weight"),
    "to-dcp": ("--only", [str(TRAIN), "{out}/dcp"], "model"),
}
COMMANDS = sorted(cli.commands)


def _option(command: str, flag: str) -> click.Option | None:
    for param in cli.commands[command].params:
        if isinstance(param, click.Option) and flag in param.opts + param.secondary_opts:
            return param
    return None


def _help(command: str) -> str:
    """``ckpttool COMMAND --help`` with its whitespace collapsed (Click wraps lines)."""
    res = CliRunner().invoke(cli, [command, "--help"], prog_name="ckpttool")
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())


@pytest.fixture(scope="module")
def dcp_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("vocabulary") / "dcp"
    res = CliRunner().invoke(cli, ["to-dcp", "-q", str(SD), str(folder)])
    assert res.exit_code == 0, res.output
    return folder


def _args(command: str, out: Path, dcp: Path) -> list[str]:
    out.mkdir(exist_ok=True)
    return [a.format(out=out, dcp=dcp) for a in RUNS[command]]


# -- the guard: every command, present and future ------------------------------------------------
def test_every_command_is_covered_here() -> None:
    """A new command must get a run in RUNS (and with it every test below)."""
    assert set(COMMANDS) == set(RUNS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_the_output_modes(command: str) -> None:
    for flag, short in SHARED.items():
        option = _option(command, flag)
        assert option is not None, f"ckpttool {command} has no {flag}"
        assert option.is_flag
        if short:
            assert short in option.opts, f"ckpttool {command}: {flag} without {short}"


@pytest.mark.parametrize("flag", [*SHARED, *SELECTION])
def test_a_shared_option_reads_the_same_in_every_help(flag: str) -> None:
    commands = COMMANDS if flag in SHARED else sorted(SELECTION[flag])
    texts = {}
    for command in commands:
        option = _option(command, flag)
        assert option is not None and not option.hidden, f"ckpttool {command} lacks {flag}"
        texts[command] = option.help
        shown = _help(command)
        assert flag in shown and " ".join((option.help or "").split()) in shown, command
    assert len(set(texts.values())) == 1, texts  # one definition, one text


@pytest.mark.parametrize("flag", list(SELECTION))
def test_a_selection_word_is_not_used_for_something_else(flag: str) -> None:
    """``--all`` or ``--only`` mean one thing: no command defines its own variant."""
    help_text = {_option(c, flag).help for c in COMMANDS if _option(c, flag)}  # type: ignore[union-attr]
    assert len(help_text) == 1
    assert {c for c in COMMANDS if _option(c, flag)} == SELECTION[flag]


def test_deprecated_spellings_are_hidden() -> None:
    for command in DEPRECATED:
        option = _option(command, "--key")
        assert option is not None and option.hidden
        assert not re.search(r"--key\b", _help(command)), command


# -- the output modes at work ----------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_json_prints_one_document_on_stdout(
    command: str, run_cli: Callable[..., Any], tmp_path: Path, dcp_folder: Path
) -> None:
    res = run_cli(command, *_args(command, tmp_path / "out", dcp_folder), "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)  # the whole of stdout is one document
    assert isinstance(doc, dict) and doc
    if command in WRITERS:
        assert doc["command"] == command and doc["verified"] is True
        assert doc["outputs"] and all(os.path.exists(p) for p in doc["outputs"])
        assert doc["tensors"] == 4 and doc["bytes"] > 0
        assert doc["report"][-1].startswith("wrote ")


@pytest.mark.parametrize("command", COMMANDS)
def test_quiet_prints_nothing_and_the_exit_code_speaks(
    command: str, run_cli: Callable[..., Any], tmp_path: Path, dcp_folder: Path
) -> None:
    res = run_cli(command, *_args(command, tmp_path / "out", dcp_folder), "-q")
    assert (res.exit_code, res.stdout, res.stderr) == (0, "", "")


def test_quiet_keeps_the_exit_code_and_the_error_line(
    run_cli: Callable[..., Any], tmp_path: Path
) -> None:
    res = run_cli("diff", "-q", SD, TRAIN)
    assert (res.exit_code, res.stdout, res.stderr) == (4, "", "")  # they differ: exit 4, silent
    res = run_cli("convert", "-q", tmp_path / "nope.pt", tmp_path / "x.pt")
    assert res.exit_code == 1 and res.stdout == ""
    assert res.err_lines == [f"Error: {tmp_path / 'nope.pt'}: no such file"]


@pytest.mark.parametrize("command", WRITERS)
def test_a_writers_result_is_on_stdout(
    command: str, run_cli: Callable[..., Any], tmp_path: Path, dcp_folder: Path
) -> None:
    res = run_cli(command, *_args(command, tmp_path / "out", dcp_folder))
    assert res.exit_code == 0, res.stderr
    assert res.out_lines and res.out_lines[-1].startswith("wrote ")
    assert not [line for line in res.err_lines if line.startswith(("wrote ", "renamed "))]


def test_a_redirected_convert_keeps_its_result(tmp_path: Path) -> None:
    """``ckpttool convert a b > log``: the log holds what was written; notes stay on screen."""
    log = tmp_path / "log"
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "ckpttool", "convert", str(TRAIN), str(tmp_path / "a.pt")],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            timeout=120,
        )
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().startswith(f"wrote {tmp_path / 'a.pt'}: 16 tensors")
    assert proc.stderr.startswith("note: the output still pickles")  # a note, not a result


def test_diff_filter_compares_only_the_tensors_named(
    run_cli: Callable[..., Any], tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    sd = torch.load(SD, weights_only=True)
    changed = {**sd, "fc2.weight": sd["fc2.weight"] + 1}
    torch.save({"model": changed, "epoch": 3}, tmp_path / "b")
    assert run_cli("diff", SD, tmp_path / "b").exit_code == 4  # fc2.weight and epoch differ
    res = run_cli("diff", SD, tmp_path / "b", "--filter", "fc1.*", "--json")
    assert res.exit_code == 0, res.stdout
    doc = json.loads(res.stdout)
    assert sorted(t["key"] for t in doc["tensors"]) == ["fc1.bias", "fc1.weight"]
    res = run_cli("diff", SD, tmp_path / "b", "--filter", "*.weight")
    assert res.exit_code == 4 and "fc2.weight" in res.stdout and "fc1.bias" not in res.stdout
    res = run_cli("diff", SD, tmp_path / "b", "--filter", "nomatch")
    assert res.exit_code == 0
    assert res.err_lines == [
        "note: no tensor name matches --filter 'nomatch' (the pattern must match a whole "
        "dotted name, e.g. 'model.*')"
    ]


# -- the old spellings ---------------------------------------------------------------------------
@pytest.mark.parametrize("command", sorted(DEPRECATED))
def test_key_still_works_and_says_the_new_word(
    command: str, run_cli: Callable[..., Any], tmp_path: Path, dcp_folder: Path
) -> None:
    new, args, entry = DEPRECATED[command]

    def run(out: str, *more: str) -> Any:
        (tmp_path / out).mkdir()
        return run_cli(
            command, *[a.format(out=tmp_path / out, dcp=dcp_folder) for a in args], *more
        )

    res = run("old", "--key", entry, "-q")
    assert res.err_lines == [f"warning: --key is deprecated; use {new}"]  # even with -q
    assert (res.exit_code, res.stdout) == (0, "")
    res = run("new", new, entry, "-q")  # the new spelling does the same, silently
    assert (res.exit_code, res.stdout, res.stderr) == (0, "", "")
    if command in WRITERS:
        old, now = sorted(tmp_path.glob("old/*")), sorted(tmp_path.glob("new/*"))
        assert [p.name for p in old] == [p.name for p in now] and old
    res = run("both", new, entry, "--key", entry)
    assert res.exit_code == 2 and f"--key is the old spelling of {new}: give one" in res.stderr


# -- from real library output: transformers' save_pretrained ---------------------------------------
def test_convert_json_of_a_transformers_folder(run_cli: Callable[..., Any], tmp_path: Path) -> None:
    """The JSON a writer prints says what torch finds in the output: the output's file, its
    tensor count, its bytes, verified; a folder save_pretrained wrote (GPT-2, tied head)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=32, n_positions=8)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "model.pt"
    res = run_cli("convert", tmp_path / "hf", out, "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    got = torch.load(out, weights_only=True)
    stored = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(got) == set(stored)  # what save_pretrained stored: the tied head once
    assert all(torch.equal(got[k], v) for k, v in stored.items())
    assert doc["outputs"] == [str(out)] and doc["dst"] == str(out)
    assert doc["tensors"] == len(got)
    assert doc["bytes"] == sum(v.untyped_storage().nbytes() for v in got.values())
    assert doc["verified"] is True and doc["weights_only"] is True
    assert doc["report"][-1].startswith(f"wrote {out}: {len(got)} tensors")
