"""SIGINT, SIGTERM and SIGHUP at many moments of a real 1 GiB write (issue 11), through the real
command line (``python -m ckpttool`` in a subprocess; nothing is mocked).

For ``convert``, ``to-safetensors`` and ``to-safetensors --max-shard-size`` (sharded), a signal
sent at start-up (0-200 ms after ckpttool's signal policy is in place: imports, argument
parsing, reading), in the middle of the copy, and during verification (the end of the copy:
the read-back, the re-read, the fsync) must end the command with exit code 130, exactly
one stderr line (``Error: [OUT: ]interrupted; nothing was written``), no traceback, no
``Aborted!``, no temp file, and no output; an existing output stays byte for byte as it was.

Moments are found by polling the process, never by hooks in the product: its signal mask in
``/proc/PID/status`` (the policy is installed), the size of its temp file, and its memory map
(``/proc/PID/maps``: numpy is being imported). Before the policy is installed the Python
interpreter itself is starting (a few tens of milliseconds) and handles signals its own way;
nothing is read or written then, and the tests start there.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpttool.writers.atomic import TMP_SUFFIX

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

REPO = Path(__file__).resolve().parent.parent
KINDS = ["convert", "to-safetensors", "sharded"]
OUT_NAMES = {"convert": "out.pt", "to-safetensors": "out.safetensors", "sharded": "out"}
SIGS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
SIG_IDS = ["SIGINT", "SIGTERM", "SIGHUP"]
TENSORS = 8
TENSOR_BYTES = 128 << 20
DATA_BYTES = TENSORS * TENSOR_BYTES  # 1 GiB of tensor data
SHARD = "300MB"


# -- the input --------------------------------------------------------------------------------
def write_safetensors(path: Path, tensors: int, nbytes: int) -> None:
    """A safetensors file of ``tensors`` float32 tensors of ``nbytes`` real (non-sparse) bytes
    each, written in 8 MiB blocks without torch."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for i in range(tensors):
        begin = i * nbytes
        header[f"layers.{i}.weight"] = {
            "dtype": "F32",
            "shape": [nbytes // 4],
            "data_offsets": [begin, begin + nbytes],
        }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    block = 8 << 20
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for i in range(tensors):
            pattern = (bytes([i + 1, 0x3F]) + bytes(range(2, 256))) * (block // 256)
            for _ in range(nbytes // block):
                f.write(pattern)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The 1 GiB input: a torch zip file (its records carry CRC-32s, as torch writes them) of
    eight 128 MiB float32 tensors of real bytes, made once for this module (a few seconds) and
    deleted afterwards."""
    import torch

    folder = tmp_path_factory.mktemp("signals")
    path = folder / "big.pt"
    n = TENSOR_BYTES // 4
    torch.save({f"layers.{i}.weight": torch.full((n,), i + 0.5) for i in range(TENSORS)}, path)
    assert path.stat().st_size > DATA_BYTES
    yield path
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def big_hash(big: Path) -> str:
    return sha256(big)


# -- helpers ----------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def command(kind: str, src: Path, out: Path) -> list[str]:
    name = "convert" if kind == "convert" else "to-safetensors"
    extra = ["--max-shard-size", SHARD] if kind == "sharded" else []
    return [name, os.fspath(src), os.fspath(out), *extra]


def as_at_a_terminal() -> None:
    """In the child before exec: the three signals at their defaults, as a terminal starts a
    command. A test runner started in the background (``cmd &``: SIGINT ignored) or under
    nohup (SIGHUP ignored) passes those on, and ckpttool rightly keeps an inherited SIG_IGN."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def start(
    args: list[str], executable: list[str] | None = None, *, ignore: int | None = None
) -> subprocess.Popen[str]:
    """Run ckpttool as from a terminal (``ignore``: with that signal ignored, as nohup does)."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}

    def setup() -> None:
        as_at_a_terminal()
        if ignore is not None:
            signal.signal(ignore, signal.SIG_IGN)

    return subprocess.Popen(
        [*(executable or [sys.executable, "-m", "ckpttool"]), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
        preexec_fn=setup,
    )


def caught(pid: int) -> int:
    """The process's mask of caught signals (``SigCgt``), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def wait_for_policy(proc: subprocess.Popen[str]) -> None:
    """Until ckpttool catches SIGTERM and SIGHUP (Python alone catches only SIGINT)."""
    want = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGHUP - 1))
    deadline = time.monotonic() + 30
    while caught(proc.pid) & want != want:
        assert proc.poll() is None, "the command ended before its signal policy was installed"
        assert time.monotonic() < deadline, "no signal policy after 30 s"
        time.sleep(0.0005)


def temp_bytes(folder: Path, out_name: str) -> int:
    """Bytes in the write's temp file beside the output (or temp folder inside it, sharded)."""
    total = 0
    places = [folder]
    if (folder / out_name).is_dir():
        places.append(folder / out_name)
    for place in places:
        try:
            names = os.listdir(place)
        except OSError:
            continue
        for name in names:
            if not name.endswith(TMP_SUFFIX):
                continue
            path = place / name
            try:
                if path.is_dir():
                    total += sum(p.stat().st_size for p in path.iterdir())
                else:
                    total += path.stat().st_size
            except OSError:  # renamed or removed meanwhile
                pass
    return total


def wait_for_bytes(proc: subprocess.Popen[str], folder: Path, out_name: str, n: int) -> bool:
    deadline = time.monotonic() + 120
    while temp_bytes(folder, out_name) < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def wait_for_mapping(proc: subprocess.Popen[str], needle: str) -> bool:
    """Until a shared object whose path holds ``needle`` is mapped (an import in progress)."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with open(f"/proc/{proc.pid}/maps") as f:
                if needle in f.read():
                    return True
        except OSError:
            return False
        time.sleep(0.001)
    return False


def snapshot(path: Path) -> Any:
    """None (absent), a file's hash, or a folder's {name: hash} (temp names included)."""
    if not path.exists():
        return None
    if path.is_dir():
        return {p.name: sha256(p) if p.is_file() else "dir" for p in sorted(path.iterdir())}
    return sha256(path)


def make_previous(kind: str, out: Path) -> Any:
    if kind == "sharded":
        out.mkdir()
        (out / "model-00001-of-00001.safetensors").write_bytes(b"previous shard\n" * 64)
        (out / "model.safetensors.index.json").write_text('{"weight_map": {}}\n')
        (out / "config.json").write_text("{}\n")
    else:
        out.write_bytes(b"previous output\n" * 64)
    return snapshot(out)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def finish(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def assert_interrupted(
    res: subprocess.CompletedProcess[str], out: Path, before: Any, *, named: bool | None = True
) -> None:
    """Exit 130, one stderr line, no traceback, nothing left, the previous output intact.

    ``named``: the line names the output (True), or may not (None: a signal that came before
    the command had parsed its arguments).
    """
    assert res.returncode == 130, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "Aborted" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    allowed = [f"Error: {out}: interrupted; nothing was written"]
    if named is None:
        allowed.append("Error: interrupted; nothing was written")
    assert len(lines) == 1 and lines[0] in allowed, res.stderr
    assert res.stdout == ""
    left = [n for n in os.listdir(out.parent) if n.endswith(TMP_SUFFIX)]
    if out.is_dir():
        left += [n for n in os.listdir(out) if n.endswith(TMP_SUFFIX)]
    assert left == [], left
    assert snapshot(out) == before


def fresh(tmp_path: Path, label: str) -> Path:
    folder = tmp_path / label
    folder.mkdir()
    return folder


# -- start-up ---------------------------------------------------------------------------------
STARTUP_MS = [0, 10, 30, 60, 120, 200]


@pytest.mark.parametrize("sig", SIGS, ids=SIG_IDS)
def test_signal_at_start_up(sig: int, big: Path, tmp_path: Path) -> None:
    """0-200 ms after the policy is in place: imports (click, the command's modules), argument
    parsing, opening the input. Before the fix: a KeyboardInterrupt traceback, Click's
    ``Aborted!`` with exit 1, or for SIGHUP/SIGTERM a silent death by the signal."""
    for i, ms in enumerate(STARTUP_MS):
        kind = KINDS[i % len(KINDS)]
        folder = fresh(tmp_path, f"{ms}ms")
        out = folder / OUT_NAMES[kind]
        before = make_previous(kind, out) if i % 2 else None
        proc = start([*command(kind, big, out), "--force"])
        wait_for_policy(proc)
        time.sleep(ms / 1000)
        proc.send_signal(sig)
        assert_interrupted(finish(proc), out, before, named=None)


def test_signal_wrapped_in_another_error_is_an_interruption(tmp_path: Path) -> None:
    """A signal that lands while a class is being made (a module imported lazily defines a
    dataclass: its fields' ``__set_name__``) reaches main() as a RuntimeError on Python 3.11.
    It is still an interruption: exit 130, one line, no traceback (found by the start-up test
    under load: a traceback and exit 1)."""
    code = textwrap.dedent(
        """
        import os, signal, sys
        from ckpttool import signals
        signals.install()
        from ckpttool.cli import app

        class Lands:
            def __set_name__(self, owner, name):
                os.kill(os.getpid(), signal.SIGTERM)

        @app.cli.command("boom")
        def boom():
            class Made:
                field = Lands()

        sys.argv = ["ckpttool", "boom"]
        app.main()
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 130, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    assert res.stderr.splitlines() == ["Error: interrupted; nothing was written"]


def test_signal_at_start_up_of_the_console_script(big: Path, tmp_path: Path) -> None:
    """The installed ``ckpttool`` script takes the signals before it imports click too."""
    script = Path(sys.executable).with_name("ckpttool")
    if not script.is_file():
        pytest.skip("no ckpttool console script beside this Python")
    for sig, name in zip(SIGS, SIG_IDS, strict=True):
        out = fresh(tmp_path, name) / "out.pt"
        proc = start(command("convert", big, out), executable=[os.fspath(script)])
        wait_for_policy(proc)
        proc.send_signal(sig)
        assert_interrupted(finish(proc), out, None, named=None)


# -- mid-copy ---------------------------------------------------------------------------------
# SIGHUP for every writer (the bug); SIGINT and SIGTERM for all three writers are also in
# test_write_faults.py (a 200 MB input).
MID_CASES = [
    ("convert", signal.SIGHUP),
    ("to-safetensors", signal.SIGHUP),
    ("sharded", signal.SIGHUP),
    ("convert", signal.SIGTERM),
    ("to-safetensors", signal.SIGINT),
    ("sharded", signal.SIGTERM),
]


@pytest.mark.parametrize(
    ("kind", "sig"), MID_CASES, ids=[f"{k}-{signal.Signals(s).name}" for k, s in MID_CASES]
)
def test_signal_mid_copy(sig: int, kind: str, big: Path, big_hash: str, tmp_path: Path) -> None:
    """A third of the way through the copy. Before the fix SIGHUP left the temp file (hundreds
    of MB) beside the output."""
    out = tmp_path / OUT_NAMES[kind]
    before = make_previous(kind, out) if sig == signal.SIGHUP else None
    proc = start([*command(kind, big, out), "--force"])
    assert wait_for_bytes(proc, tmp_path, out.name, DATA_BYTES // 3), proc.communicate()
    proc.send_signal(sig)
    assert_interrupted(finish(proc), out, before)
    assert sha256(big) == big_hash


CAST_CASES = [("convert", "float16", signal.SIGTERM), ("to-safetensors", "bfloat16", signal.SIGINT)]


@pytest.mark.parametrize(
    ("kind", "dtype", "sig"),
    CAST_CASES,
    ids=[f"{k}-{d}-{signal.Signals(s).name}" for k, d, s in CAST_CASES],
)
def test_signal_mid_cast(
    kind: str, dtype: str, sig: int, big: Path, big_hash: str, tmp_path: Path
) -> None:
    """A third of the way through a cast spread over the cores (writers/cast_range.py): its
    threads stop with the writer and nothing is left; the previous output stays."""
    out = tmp_path / OUT_NAMES[kind]
    before = make_previous(kind, out)
    proc = start([*command(kind, big, out), "--dtype", dtype, "--force"])
    assert wait_for_bytes(proc, tmp_path, out.name, DATA_BYTES // 6), proc.communicate()
    proc.send_signal(sig)
    assert_interrupted(finish(proc), out, before)
    assert sha256(big) == big_hash


def test_nohup_keeps_ignoring_sighup(big: Path, tmp_path: Path) -> None:
    """Under nohup (SIGHUP ignored) closing the terminal must not stop the write: an inherited
    SIG_IGN is kept, and the command completes."""
    out = tmp_path / "out.pt"
    proc = start(command("convert", big, out), ignore=signal.SIGHUP)
    assert wait_for_bytes(proc, tmp_path, out.name, DATA_BYTES // 3), proc.communicate()
    proc.send_signal(signal.SIGHUP)
    res = finish(proc)
    assert res.returncode == 0, res.stderr
    assert out.is_file()


# -- verification -----------------------------------------------------------------------------
# (kind, signal, moment): "end" = the copy is complete: waiting for the read-back, the
# verification and the fsync before the rename. (The safetensors re-read no longer imports
# numpy for a plain copy, so there is no lazy import to hit here; a cast's is tested below.)
VERIFY_CASES = [
    ("convert", signal.SIGTERM, "end"),
    ("convert", signal.SIGHUP, "end"),
    ("to-safetensors", signal.SIGTERM, "end"),
    ("to-safetensors", signal.SIGINT, "end"),
    ("sharded", signal.SIGINT, "end"),
    ("sharded", signal.SIGHUP, "end"),
]


@pytest.mark.parametrize(
    ("kind", "sig", "moment"),
    VERIFY_CASES,
    ids=[f"{k}-{signal.Signals(s).name}-{m}" for k, s, m in VERIFY_CASES],
)
def test_signal_during_verification(
    kind: str, sig: int, moment: str, big: Path, tmp_path: Path
) -> None:
    """Before the fix SIGTERM here ended with exit 1 and "verification failed: interrupted;
    nothing was written; nothing was written", naming the temp path."""
    out = tmp_path / OUT_NAMES[kind]
    for _attempt in range(3):  # retried only if the command finished before the signal
        remove(out)
        before = make_previous(kind, out) if sig != signal.SIGINT else None
        proc = start([*command(kind, big, out), "--force"])
        reached = wait_for_bytes(proc, tmp_path, out.name, DATA_BYTES)
        if reached:
            proc.send_signal(sig)
        res = finish(proc)
        if res.returncode != 0 or not reached:
            break
    assert reached, res.stderr
    assert_interrupted(res, out, before)


# -- a lazy import ----------------------------------------------------------------------------
def test_sigterm_during_the_lazy_numpy_import_of_a_cast(tmp_path: Path) -> None:
    """``convert --dtype float16`` imports numpy for its first cast. Before the fix a SIGTERM
    sent then was swallowed in 3 of 12 tries: the command went on and exited 0."""
    src = tmp_path / "small.safetensors"
    write_safetensors(src, 4, 16 << 20)
    for delay_ms in (0, 2, 5, 10, 20):
        folder = fresh(tmp_path, f"cast{delay_ms}")
        out = folder / "out.pt"
        proc = start(["convert", os.fspath(src), os.fspath(out), "--dtype", "float16"])
        assert wait_for_mapping(proc, "/numpy/"), proc.communicate()
        time.sleep(delay_ms / 1000)
        proc.send_signal(signal.SIGTERM)
        assert_interrupted(finish(proc), out, None)


# -- the progress bar in a narrow terminal -----------------------------------------------------
def test_progress_bar_fits_a_30_column_terminal(big: Path, tmp_path: Path) -> None:
    """stderr on a terminal 30 columns wide: every redraw is shorter than the width, so it
    never wraps (before: each redraw wrapped, leaving a column of stale bars)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 30, 0, 0))
    out = tmp_path / "out.pt"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckpttool", "convert", os.fspath(big), os.fspath(out)],
        stdout=slave,  # the result line (stdout) follows the erased bar (stderr) on the screen
        stderr=slave,
        cwd=REPO,
        env=env,
        preexec_fn=as_at_a_terminal,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(master)
    text = b"".join(chunks).decode()
    assert proc.returncode == 0, text
    frames = [f for f in re.split(r"[\r\n]", text) if f.strip()]
    bars = [f for f in frames if "%" in f]
    assert bars, text
    assert all(len(f) <= 29 for f in frames if f not in ("",) and "wrote" not in f), frames
    assert any("100%" in f for f in bars), bars
    assert frames[-1].startswith("wrote "), frames


# -- after the rename, and from the library -----------------------------------------------------
# The signal is sent from inside the process right after the output is renamed into place (the
# folder's fsync comes next): a test-only patch in the child, nothing in the product.
AFTER_RENAME = """
import os, signal, sys
from ckpttool.writers import atomic
atomic._fsync_dir = lambda path: os.kill(os.getpid(), signal.SIGTERM)
from ckpttool.cli import main
sys.argv[0] = "ckpttool"
main()
"""


@pytest.mark.parametrize("kind", KINDS)
def test_signal_after_the_rename_says_the_output_is_complete(kind: str, tmp_path: Path) -> None:
    import torch

    src = REPO / "fixtures" / "single_gpu_state_dict.pt"
    out = tmp_path / OUT_NAMES[kind]
    args = command(kind, src, out)
    if kind == "sharded":
        args[-1] = "1KB"
    res = subprocess.run(
        [sys.executable, "-c", AFTER_RENAME, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        preexec_fn=as_at_a_terminal,
    )
    assert res.returncode == 130, res.stderr
    assert res.stderr.splitlines() == [
        f"Error: {out}: interrupted after the output was written (it is complete)"
    ]
    import ckpttool

    want = torch.load(src, map_location="cpu")
    got = ckpttool.load(out)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


LIBRARY = """
import os, signal, sys, threading
import ckpttool
from ckpttool.errors import InterruptedWriteError
from ckpttool.writers import copy
real = copy.copy_range
def copy_range(*args):
    os.kill(os.getpid(), signal.SIGHUP)  # mid-write
    return real(*args)
copy.copy_range = copy_range
try:
    ckpttool.convert(sys.argv[1], sys.argv[2])
except InterruptedWriteError as exc:
    print("raised:", exc)
print("handler:", signal.getsignal(signal.SIGHUP) == signal.SIG_DFL)
"""


def test_library_write_interrupted_raises_and_restores_handlers(tmp_path: Path) -> None:
    """Called from a script (no command line policy): the write unwinds, nothing is left, the
    caller gets InterruptedWriteError, and its own signal handlers are back afterwards."""
    src = REPO / "fixtures" / "single_gpu_state_dict.pt"
    out = tmp_path / "out.pt"
    res = subprocess.run(
        [sys.executable, "-c", LIBRARY, os.fspath(src), os.fspath(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        preexec_fn=as_at_a_terminal,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        f"raised: {out}: interrupted; nothing was written",
        "handler: True",
    ]
    assert os.listdir(tmp_path) == []
