"""Run the real ``ckpttool`` command line on one input and check the CLI contract.

Shared by ``test_hostile.py`` and the fuzzers. Align the constants at the top with the
CLI's documented behaviour; everything else reads them.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# --- the contract ----------------------------------------------------------------------------
EXIT_OK, EXIT_ERROR, EXIT_DANGEROUS = 0, 1, 3
EXIT_UNPROVEN = 6  # "cannot prove what torch would load": an ambiguous or torch-unreadable file
ERROR_PREFIX = "Error: "  # the single stderr line for exit 1 starts with this
DANGEROUS_PREFIX = "Danger: "  # ... and for exit 3 (what ckpttool inspect prints)
RLIMIT_AS_BYTES = 1 << 30  # address-space cap for the tool (1 GiB)
TIMEOUT_S = 20  # hard kill
MAX_SECONDS = 10.0  # contract: every run finishes within this
MAX_STDOUT = 1_000_000  # bytes
MAX_STDERR = 64_000  # bytes

# Linux capabilities dropped from the bounding set for the "unreadable file" case: root
# reads a chmod-000 file through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, so without them
# the tool (still uid 0, so it can run the interpreter under /root) gets EACCES.
_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2
_LIBC = ctypes.CDLL(None, use_errno=True)

CLI_MAIN = REPO / "ckpttool" / "__main__.py"


def cli_available() -> bool:
    return CLI_MAIN.exists()


def tool_argv(path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ckpttool", "inspect", *extra, str(path)]


@dataclass
class Result:
    argv: list[str]
    rc: int | None  # None: killed after TIMEOUT_S
    stdout: bytes
    stderr: bytes
    seconds: float

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "backslashreplace")

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "backslashreplace")

    def describe(self) -> str:
        return (
            f"argv={self.argv!r}\nrc={self.rc} seconds={self.seconds:.2f}\n"
            f"stderr={self.stderr[:2000]!r}\nstdout[:600]={self.stdout[:600]!r}"
        )


def _limits() -> None:  # runs in the child between fork and exec
    resource.setrlimit(resource.RLIMIT_AS, (RLIMIT_AS_BYTES, RLIMIT_AS_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _limits_no_dac() -> None:
    _limits()
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if _LIBC.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def tool_env(canary_site: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    paths = [str(canary_site)] if canary_site else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(REPO)])
    env["PYTHONIOENCODING"] = "utf-8"
    env["COLUMNS"] = "120"
    env.pop("CKPTTOOL_DEBUG", None)
    return env


def run_tool(argv: list[str], *, cwd: Path, env: dict[str, str], drop_dac: bool = False) -> Result:
    """Run ``argv`` under the limits; ``drop_dac``: without root's permission override."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_limits_no_dac if drop_dac else _limits,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = None
    return Result(argv, rc, out, err, time.monotonic() - t0)


def listing(root: Path) -> dict[str, tuple]:
    """Recursive lstat listing (relative path -> (mode, size, mtime_ns)), links not followed."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def check_generic(res: Result, *, marker: Path | None = None) -> list[str]:
    """Checks that hold for every input (the fuzzers use only these)."""
    problems = []
    if res.rc is None:
        problems.append(f"killed after {TIMEOUT_S}s timeout")
    elif res.rc not in (EXIT_OK, EXIT_ERROR, EXIT_DANGEROUS, EXIT_UNPROVEN):
        problems.append(f"exit code {res.rc} not in (0, 1, 3, 6)")
    if res.seconds > MAX_SECONDS:
        problems.append(f"took {res.seconds:.1f}s > {MAX_SECONDS}s")
    if b"Traceback" in res.stderr or b"Traceback" in res.stdout:
        problems.append("a Traceback was printed")
    if len(res.stdout) >= MAX_STDOUT:
        problems.append(f"stdout too large: {len(res.stdout)} bytes")
    if len(res.stderr) >= MAX_STDERR:
        problems.append(f"stderr too large: {len(res.stderr)} bytes")
    if res.rc not in (None, EXIT_OK):
        lines = res.err.rstrip("\n").split("\n")
        if len(lines) != 1 or not lines[0].strip():
            problems.append(f"stderr is {len(lines)} lines, want exactly one")
    if marker is not None and os.path.lexists(marker):
        problems.append(f"MARKER FILE CREATED: {marker}")
    return problems
