"""Packaging: entry points, help and version, and that inspect never imports torch."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ckpttool
from ckpttool.cli import cli

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"

# Runs ckpttool's __main__ with the given argv, then reports what got imported.
_PROBE = """
import json, runpy, sys
argv = json.loads(sys.argv[1])
sys.argv = ["ckpttool", *argv]
code = 0
if argv != ["<import>"]:
    try:
        runpy.run_module("ckpttool", run_name="__main__")
    except SystemExit as exc:
        code = exc.code
else:
    import ckpttool
sys.stdout.flush()
print("\\nPROBE " + json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def _probe(*argv: str) -> tuple[int, bool, str, str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(list(argv))],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    out, _, tail = res.stdout.rpartition("\nPROBE ")
    facts = json.loads(tail)
    return facts["code"], facts["torch"], out, res.stderr


def test_import_does_not_import_torch() -> None:
    code, torch_imported, _, err = _probe("<import>")
    assert code == 0, err
    assert not torch_imported


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["inspect", "--help"],
        ["inspect", str(FIXTURES / "ddp_rank0_checkpoint.pt")],
        ["inspect", "--json", "--tensors", str(FIXTURES / "legacy_format.pt")],
        ["inspect", str(FIXTURES / "model.safetensors")],
    ],
    ids=["help", "version", "inspect-help", "inspect-zip", "inspect-legacy-json", "inspect-st"],
)
def test_cli_does_not_import_torch(argv: list[str]) -> None:
    code, torch_imported, out, err = _probe(*argv)
    assert code in (0, None), err
    assert out.strip(), "the command printed nothing"
    assert not torch_imported, f"ckpttool {' '.join(argv)} imported torch"


def test_version_matches_package() -> None:
    code, _, out, _ = _probe("--version")
    assert code in (0, None)
    assert out.strip() == f"ckpttool, version {ckpttool.__version__}"
    assert importlib.metadata.version("ckpttool") == ckpttool.__version__


def test_python_dash_m_help() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "ckpttool", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Usage: python -m ckpttool [OPTIONS] COMMAND [ARGS]...")
    for name in cli.commands:
        assert name in res.stdout
    assert res.stderr == ""


def test_console_script_points_at_main() -> None:
    scripts = {
        ep.name: ep.value
        for ep in importlib.metadata.distribution("ckpttool").entry_points
        if ep.group == "console_scripts"
    }
    assert scripts.get("ckpttool") == "ckpttool.cli:main"


def test_exit_codes_documented_in_help(run_cli) -> None:
    res = run_cli("--help")
    assert res.exit_code == 0
    for line in ("0    success", "2    usage error", "3    the pickle names dangerous globals"):
        assert line in res.stdout


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help(run_cli, name: str) -> None:
    command = cli.commands[name]
    assert (command.help or "").strip(), f"{name} has no help text"
    assert command.get_short_help_str().strip()
    res = run_cli(name, "--help")
    assert res.exit_code == 0
    assert res.stdout.startswith(f"Usage: ckpttool {name} [OPTIONS] ")
    assert "Example:" in res.stdout
    for param in command.params:
        if param.param_type_name == "option" and not getattr(param, "hidden", False):
            assert (param.help or "").strip(), f"{name} {param.opts} has no help text"


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_is_in_readme(name: str) -> None:
    readme = REPO / "README.md"
    if not readme.is_file():
        pytest.skip("README.md not written yet")
    assert f"ckpttool {name}" in readme.read_text(encoding="utf-8"), (
        f"README.md never mentions `ckpttool {name}`"
    )


def test_command_table_names_each_command_and_its_module() -> None:
    """``app.COMMAND_MODULES`` says which module defines each command: a command missing
    from it would be found only once another command's lookup had imported every module."""
    from ckpttool.cli.app import COMMAND_MODULES

    assert set(COMMAND_MODULES) == set(cli.commands)
    for name, module in COMMAND_MODULES.items():
        assert cli.commands[name].callback.__module__ == f"ckpttool.cli.{module}", name


def test_a_command_imports_only_its_own_module(tmp_path: Path) -> None:
    """``ckpttool scan FILE`` imports the module of scan, not those of the other commands
    (nor what they import); ``--help`` and a misspelt command import them all."""
    f = tmp_path / "a.json"
    f.write_text("{}")

    def loaded(*args: str) -> set[str]:
        prefix = "ckpttool.cli."
        return {m[len(prefix) :] for m in _modules_after(*args) if m.startswith(prefix)}

    commands = {"compare", "dcp", "inspect", "write"}
    assert commands & loaded("scan", str(f)) == {"inspect"}
    assert commands & loaded("convert", "--help") == {"write"}
    assert commands <= loaded("--help")
    assert commands <= loaded("convrt")


def _modules_after(*args: str, ok: bool = False) -> set[str]:
    """The modules a new process has imported once ``ckpttool ARGS`` has run (``ok``: and it
    must have exited 0)."""
    probe = (
        "import sys\n"
        "from ckpttool.cli import main\n"
        "must_pass, sys.argv = sys.argv[1] == '1', ['ckpttool', *sys.argv[2:]]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    assert not (must_pass and e.code), e.code\n"
        "print(sorted(sys.modules))"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe, "1" if ok else "0", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return set(ast.literal_eval(res.stdout.strip().splitlines()[-1]))


def test_short_commands_import_only_what_they_use(fixtures_dir: Path, tmp_path: Path) -> None:
    """What a short command does not need is not imported (each costs milliseconds of every
    run): a file's convert imports no folder reader, no hashlib (OpenSSL), no table renderer,
    no tempfile or json and no other command; inspect no writer."""
    def loaded(*args: str) -> set[str]:
        return _modules_after(*args, ok=True)

    src = str(fixtures_dir / "dataparallel_state_dict.pt")
    convert = loaded("convert", "--strip-module", "-q", src, str(tmp_path / "out.pt"))
    assert "ckpttool.writers.pt" in convert  # the probe ran the writer
    unused = {"ckpttool.readers.deepspeed", "ckpttool.readers.per_rank", "hashlib", "tabulate"}
    unused |= {"tempfile", "json"}  # the temporary output is named by writers/atomic.py
    assert convert & (unused | {"ckpttool.cli.inspect", "ckpttool.cli.compare"}) == set()
    inspect = loaded("inspect", "-q", src)
    assert inspect & {"ckpttool.writers.pt", "ckpttool.cli.write", "hashlib"} == set()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_the_command_line_keeps_openblas_to_one_thread(fixtures_dir: Path) -> None:
    """numpy's OpenBLAS would start a thread per core on import (tens of ms of CPU of every
    cast); the command line asks it for one, unless the user set OPENBLAS_NUM_THREADS."""
    pytest.importorskip("numpy")
    probe = (
        "import os, sys\n"
        "from ckpttool.cli import main\n"
        "sys.argv = ['ckpttool', 'scan', '-q', sys.argv[1]]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "import numpy\n"
        "print(os.environ.get('OPENBLAS_NUM_THREADS'), len(os.listdir('/proc/self/task')) - before)"
    )
    src = str(fixtures_dir / "dataparallel_state_dict.pt")

    def run(**env: str) -> list[str]:
        environ = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
        res = subprocess.run(
            [sys.executable, "-c", probe, src],
            capture_output=True,
            text=True,
            timeout=60,
            env={**environ, **env},
        )
        assert res.returncode == 0, res.stderr
        return res.stdout.split()

    assert run() == ["1", "0"]  # no thread started by importing numpy
    assert run(OPENBLAS_NUM_THREADS="2")[0] == "2"  # the user's choice stands


def test_the_program_collects_garbage_less_often_the_library_as_before() -> None:
    """The ckpttool program (console script, ``python -m``) raises the collector's first
    threshold (a short command is not scanned tens of times for cycles it does not form) and
    freezes what is left once the command is done; a program importing the library keeps its
    own collector."""
    probe = (
        "import gc, sys\n"
        "sys.argv[0] = sys.argv[1]\n"
        "if sys.argv[2] == 'off':\n"
        "    gc.set_threshold(0)\n"
        "import ckpttool.cli\n"
        "print(gc.get_threshold()[0])"
    )

    def first_threshold(argv0: str, gc_state: str = "on") -> int:
        res = subprocess.run(
            [sys.executable, "-c", probe, argv0, gc_state], capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        return int(res.stdout)

    from ckpttool.program import GC_FIRST_GENERATION

    assert first_threshold("/usr/bin/ckpttool") == GC_FIRST_GENERATION
    import gc

    assert first_threshold("train.py") == gc.get_threshold()[0]  # the interpreter's default
    assert first_threshold("/usr/bin/ckpttool", "off") == 0  # turned off: left off
    res = subprocess.run(
        [sys.executable, "-c", "import gc, runpy, sys; sys.argv = ['x', '--version']\n"
         "try:\n    runpy.run_module('ckpttool', run_name='__main__')\n"
         "except SystemExit:\n    print(gc.get_threshold()[0], gc.get_freeze_count() > 0)"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # python -m ckpttool; its objects, once the command is done, are left to the process's end
    assert res.stdout.split()[-2:] == [str(GC_FIRST_GENERATION), "True"]
    res = subprocess.run(
        [sys.executable, "-c", "import gc, sys; sys.argv = ['x', '--version']\n"
         "from ckpttool.cli import main\n"
         "try:\n    main()\n"
         "except SystemExit:\n    print(gc.get_freeze_count())"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.stdout.split()[-1] == "0"  # main() called by another program: nothing frozen
