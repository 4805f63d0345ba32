"""Faults while writing (issue 5, item 3), through the real command line in a subprocess.

For ``convert``, ``to-safetensors`` and ``to-safetensors --max-shard-size`` (sharded): disk full
(a small tmpfs when this machine lets the test mount one, and ``RLIMIT_FSIZE``), SIGINT and
SIGTERM mid-write, SIGKILL mid-write, output equal to the input or a link to it, converting a
file this process has memory-mapped, a read-only output folder, an output that is a directory,
an existing output without ``--force``, and ``inspect ... | head -1``.

After each: the input is byte-identical, any previous output is byte-identical, and no temp file
(``.NAME.*.ckpttool-tmp``) is left beside the output, except after SIGKILL: nothing can clean up
after a SIGKILL, so the documented temp file (or temp folder, sharded) may remain; it is never
renamed into place and the previous output stays intact.

Known bugs are ``xfail(strict=True)`` tests whose reason starts with ``BUG:``.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpttool.testing import saved_as
from ckpttool.writers.atomic import TMP_SUFFIX

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "fixtures"
KINDS = ["convert", "to-safetensors", "sharded"]
OUT_NAMES = {"convert": "out.pt", "to-safetensors": "out.safetensors", "sharded": "out"}
PROGRESS_BAR_MIN = 256 << 20  # the CLI shows a progress bar (on stderr) above this many bytes


# -- helpers ----------------------------------------------------------------------------------
def ckpttool(
    *args: str | os.PathLike[str], preexec_fn: Any = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real command line: ``python -m ckpttool ARGS``."""
    return subprocess.run(
        [sys.executable, "-m", "ckpttool", *map(os.fspath, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
        cwd=REPO,
    )


def command(kind: str, src: Path, out: Path, shard: str = "50MB") -> list[str]:
    if kind == "convert":
        return ["convert", os.fspath(src), os.fspath(out)]
    if kind == "to-safetensors":
        return ["to-safetensors", os.fspath(src), os.fspath(out)]
    return ["to-safetensors", os.fspath(src), os.fspath(out), "--max-shard-size", shard]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(path: Path) -> Any:
    """A comparable picture of a file (its hash) or a folder (name -> hash of each file)."""
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_dir():  # a temp folder left inside by SIGKILL is checked separately
        return {
            p.relative_to(path).as_posix(): sha256(p)
            for p in sorted(path.rglob("*"))
            if not any(part.endswith(TMP_SUFFIX) for part in p.relative_to(path).parts)
        }
    return sha256(path)


def make_previous(kind: str, out: Path) -> Any:
    """An existing output for a run with --force to (not) replace."""
    if kind == "sharded":
        out.mkdir()
        (out / "model-00001-of-00001.safetensors").write_bytes(b"previous shard\n" * 64)
        (out / "config.json").write_text("{}\n")
    else:
        out.write_bytes(b"previous output\n" * 64)
    return snapshot(out)


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(TMP_SUFFIX))


def error_line(proc: subprocess.CompletedProcess[str], out: Path, problem: str) -> None:
    """Exactly one stderr line: ``Error: OUT: problem``; no traceback."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines == [f"Error: {out}: {problem}"], proc.stderr


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _tmp_size(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.iterdir())
        return path.stat().st_size
    except OSError:  # renamed or removed meanwhile
        return 0


def signal_mid_write(
    args: list[str], folder: Path, out_name: str, sig: int, min_bytes: int = 4 << 20
) -> tuple[bool, subprocess.CompletedProcess[str]]:
    """Start the command, wait until its temp file beside the output (or, for shards, its temp
    folder inside the output folder) holds ``min_bytes``, then send ``sig``. Returns (whether
    the signal was sent, the result)."""
    pattern = re.compile(rf"^\.({re.escape(out_name)}|shards)\..+{re.escape(TMP_SUFFIX)}$")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckpttool", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    sent = False
    deadline = time.monotonic() + 60
    try:
        while not sent and proc.poll() is None and time.monotonic() < deadline:
            inside = folder / out_name
            places = [folder, inside] if inside.is_dir() and not inside.is_symlink() else [folder]
            candidates = [p / n for p in places for n in os.listdir(p)]
            for path in candidates:
                if pattern.match(path.name) and _tmp_size(path) >= min_bytes:
                    proc.send_signal(sig)
                    sent = True
                    break
            else:
                time.sleep(0.001)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return sent, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


# -- inputs -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def big_input(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A ~200 MB checkpoint (under the progress-bar threshold) and its hash."""
    path = tmp_path_factory.mktemp("big") / "big.pt"
    sd = {f"layers.{i}.weight": torch.full((2 << 20,), float(i)) for i in range(25)}
    torch.save(sd, path)
    size = path.stat().st_size
    assert 150 << 20 < size < PROGRESS_BAR_MIN
    return path, sha256(path)


@pytest.fixture(scope="session")
def mid_input(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A ~24 MB checkpoint of six 4 MB tensors, saved from 'cuda:0', and its hash."""
    path = tmp_path_factory.mktemp("mid") / "mid.pt"
    sd = {f"w{i}": torch.full((1 << 20,), float(i)) for i in range(6)}
    with saved_as("cuda:0"):
        torch.save(sd, path)
    return path, sha256(path)


@pytest.fixture
def small_copy(tmp_path: Path) -> Path:
    """A writable copy of a small CUDA-tagged fixture in its own folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    dst = folder / "ckpt.pt"
    shutil.copyfile(FIX / "single_gpu_state_dict.pt", dst)
    return dst


# -- disk full ------------------------------------------------------------------------------
@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str = "8m") -> Iterator[Path]:
    where.mkdir()
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", os.fspath(where)],
            capture_output=True,
            text=True,
        )
    except OSError as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}); the RLIMIT_FSIZE case covers it")
    if proc.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({proc.stderr.strip()}); the RLIMIT_FSIZE case covers it"
        )
    try:
        yield where
    finally:
        if subprocess.run(["umount", os.fspath(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", os.fspath(where)], capture_output=True)


def _limit_file_size(limit: int) -> Any:
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
def test_disk_full(how: str, kind: str, mid_input: tuple[Path, str], tmp_path: Path) -> None:
    src, src_hash = mid_input
    with contextlib.ExitStack() as stack:
        if how == "tmpfs":
            folder = stack.enter_context(tiny_tmpfs(tmp_path / "small", "8m"))
            # sharded: 4 MB shards, so the disk fills after one shard was written and verified
            preexec, shard = None, "3MB"
            problem = "disk full while writing; nothing was written"
        else:
            folder = tmp_path / "out"
            folder.mkdir()
            preexec, shard = _limit_file_size(4 << 20), "10MB"  # every shard is over the limit
            problem = "file too large for this filesystem or limit; nothing was written"
        # a fresh output: nothing appears
        out = folder / OUT_NAMES[kind]
        proc = ckpttool(*command(kind, src, out, shard), preexec_fn=preexec)
        assert proc.returncode == 1, proc.stderr
        error_line(proc, out, problem)
        assert os.listdir(folder) == []
        # an existing output survives a failed --force
        prev = folder / ("prev" + Path(OUT_NAMES[kind]).suffix)
        before = make_previous(kind, prev)
        # (10 MB shards here: the first shard already overflows, no torch import to verify one)
        proc = ckpttool(*command(kind, src, prev, "10MB"), "--force", preexec_fn=preexec)
        assert proc.returncode == 1, proc.stderr
        error_line(proc, prev, problem)
        assert snapshot(prev) == before
        assert temps(folder) == []
        assert sorted(os.listdir(folder)) == [prev.name]
    assert sha256(src) == src_hash


# -- signals ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_mid_write(
    sig: int, kind: str, big_input: tuple[Path, str], tmp_path: Path
) -> None:
    src, src_hash = big_input
    out = tmp_path / OUT_NAMES[kind]
    for _attempt in range(3):  # retried only if the write finished before the signal landed
        remove(out)
        before = make_previous(kind, out)
        sent, proc = signal_mid_write(
            [*command(kind, src, out), "--force"], tmp_path, out.name, sig
        )
        assert sent, f"no temp file grew beside the output: {proc.stderr}"
        if proc.returncode != 0:
            break
    assert proc.returncode == 130, proc.stderr
    error_line(proc, out, "interrupted; nothing was written")
    assert snapshot(out) == before
    assert temps(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == [out.name]
    assert sha256(src) == src_hash


@pytest.mark.parametrize("kind", KINDS)
def test_sigkill_mid_write_keeps_the_previous_output(
    kind: str, big_input: tuple[Path, str], tmp_path: Path
) -> None:
    src, src_hash = big_input
    out = tmp_path / OUT_NAMES[kind]
    for _attempt in range(3):
        for name in temps(tmp_path):
            remove(tmp_path / name)
        remove(out)
        before = make_previous(kind, out)
        sent, proc = signal_mid_write(
            [*command(kind, src, out), "--force"], tmp_path, out.name, signal.SIGKILL
        )
        assert sent, f"no temp file grew beside the output: {proc.stderr}"
        if proc.returncode != 0:
            break
    assert proc.returncode == -signal.SIGKILL
    assert snapshot(out) == before  # never renamed into place
    # The one documented leftover: a temp file .NAME.*.ckpttool-tmp beside the output, or for
    # shards a temp folder .shards.*.ckpttool-tmp inside the output folder.
    if kind == "sharded":
        pattern = re.compile(rf"^\.shards\.[A-Za-z0-9_]+{re.escape(TMP_SUFFIX)}$")
        left = temps(out)
        assert all((out / name).is_dir() for name in left)
        assert temps(tmp_path) == []
    else:
        pattern = re.compile(rf"^\.{re.escape(out.name)}\.[A-Za-z0-9_]+{re.escape(TMP_SUFFIX)}$")
        left = temps(tmp_path)
        assert sorted(os.listdir(tmp_path)) == sorted([out.name, *left])
    assert len(left) <= 1
    assert all(pattern.match(name) for name in left), left
    assert sha256(src) == src_hash
    if kind == "convert":  # a leftover temp file does not get in the way of the next run
        proc2 = ckpttool(*command(kind, src, out), "--force", "-q")
        assert proc2.returncode == 0, proc2.stderr
        assert torch.load(out, weights_only=True, mmap=True)["layers.3.weight"][0].item() == 3.0
        assert temps(tmp_path) == left


# -- output equal to the input ------------------------------------------------------------------
def test_output_is_the_input_or_a_link_to_it(small_copy: Path) -> None:
    folder = small_copy.parent
    link = folder / "link.pt"
    link.symlink_to(small_copy.name)
    before = sha256(small_copy)
    problem = "output is the input file; pass --in-place to replace it"
    for out in (small_copy, link):
        for extra in ([], ["--force"]):
            proc = ckpttool("convert", small_copy, out, *extra)
            assert proc.returncode == 1, proc.stderr
            error_line(proc, out, problem)
    proc = ckpttool("convert", link, small_copy)
    error_line(proc, small_copy, problem)
    proc = ckpttool("to-safetensors", small_copy, link, "--force")
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"Error: {link}: output is the input file")
    assert sha256(small_copy) == before
    assert link.is_symlink()
    assert temps(folder) == []
    assert sorted(os.listdir(folder)) == ["ckpt.pt", "link.pt"]


def test_sharded_output_is_the_input_folder(tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    shutil.copytree(FIX / "sharded", folder)
    before = snapshot(folder)
    for extra in ([], ["--force"]):
        proc = ckpttool("to-safetensors", folder, folder, "--max-shard-size", "1KB", *extra)
        assert proc.returncode == 1
        assert proc.stderr.startswith(f"Error: {folder}: output is the input file")
    assert snapshot(folder) == before
    assert sorted(os.listdir(tmp_path)) == ["sharded"]


def test_to_safetensors_same_file_message_names_a_real_option(tmp_path: Path) -> None:
    src = tmp_path / "m.safetensors"
    shutil.copyfile(FIX / "model.safetensors", src)
    proc = ckpttool("to-safetensors", src, src)
    assert proc.returncode == 1
    if "--in-place" in proc.stderr:
        assert ckpttool("to-safetensors", src, src, "--in-place").returncode != 2


def test_convert_in_place_works_and_loads(small_copy: Path) -> None:
    ref = torch.load(small_copy, map_location="cpu", weights_only=True)
    proc = ckpttool("convert", small_copy, small_copy, "--in-place")
    assert proc.returncode == 0, proc.stderr
    got = torch.load(small_copy, weights_only=True)  # no map_location needed any more
    assert sorted(got) == sorted(ref)
    for name, want in ref.items():
        assert torch.equal(got[name], want) and got[name].dtype == want.dtype
    assert temps(small_copy.parent) == []
    # through a symlink: the result loads at the link's path
    link = small_copy.parent / "link.pt"
    link.symlink_to(small_copy.name)
    proc = ckpttool("convert", link, link, "--in-place", "--strip-prefix", "fc1.")
    assert proc.returncode == 0, proc.stderr
    assert "weight" in torch.load(link, weights_only=True)
    assert temps(small_copy.parent) == []


def test_in_place_on_a_memory_mapped_input(mid_input: tuple[Path, str], tmp_path: Path) -> None:
    src = tmp_path / "mapped.pt"
    shutil.copyfile(mid_input[0], src)
    ref = torch.load(src, map_location="cpu", weights_only=True)
    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        before = hashlib.sha256(mapped).hexdigest()
        proc = ckpttool("convert", src, src, "--in-place")
        assert proc.returncode == 0, proc.stderr
        # the old pages stay readable (no SIGBUS) and unchanged: a new file was renamed in
        assert hashlib.sha256(mapped).hexdigest() == before
        assert mapped[-22:-18] == b"PK\x05\x06"  # end of the old zip directory, still there
    assert sha256(src) != before
    got = torch.load(src, weights_only=True)  # CPU-tagged now: loads without map_location
    assert sorted(got) == sorted(ref)
    for name, want in ref.items():
        assert torch.equal(got[name], want)
    assert temps(tmp_path) == []


# -- read-only folder, directory output, existing output ----------------------------------------
@contextlib.contextmanager
def read_only_folder(folder: Path, populate: Any) -> Iterator[Any]:
    """Make ``folder`` unwritable even for root (chattr +i, else a read-only tmpfs mounted over
    it; chmod 555 when not root), after ``populate()`` filled it; yields what populate returned.
    Skips when none of these works here."""
    if os.geteuid() != 0:
        made = populate()
        folder.chmod(0o555)
        try:
            yield made
        finally:
            folder.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    probe = folder / ".probe"
    probe.touch()
    immutable = (
        bool(chattr) and subprocess.run([chattr, "+i", probe], capture_output=True).returncode == 0
    )
    if immutable:
        subprocess.run([chattr, "-i", probe], capture_output=True, check=True)
    probe.unlink()
    if immutable:
        made = populate()
        subprocess.run([chattr, "+i", folder], capture_output=True, check=True)
        try:
            yield made
        finally:
            subprocess.run([chattr, "-i", folder], capture_output=True, check=True)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", folder], capture_output=True).returncode:
        pytest.skip(
            "running as root where neither chattr +i nor a tmpfs mount works: "
            "cannot make a folder read-only for root"
        )
    try:
        made = populate()
        subprocess.run(["mount", "-o", "remount,ro", folder], capture_output=True, check=True)
        yield made
    finally:
        subprocess.run(["umount", "-l", folder], capture_output=True)


@pytest.mark.parametrize("kind", KINDS)
def test_read_only_output_folder(kind: str, mid_input: tuple[Path, str], tmp_path: Path) -> None:
    src, src_hash = mid_input
    folder = tmp_path / "ro"
    folder.mkdir()
    prev = folder / ("prev" + Path(OUT_NAMES[kind]).suffix)
    with read_only_folder(folder, lambda: make_previous(kind, prev)) as before:
        new = folder / OUT_NAMES[kind]
        proc = ckpttool(*command(kind, src, new, "3MB"))
        assert proc.returncode == 1, proc.stderr
        error_line(proc, new, f"permission denied: cannot write in {folder}")
        proc = ckpttool(*command(kind, src, prev, "3MB"), "--force")
        assert proc.returncode == 1, proc.stderr
        error_line(proc, prev, f"permission denied: cannot write in {folder}")
        assert snapshot(prev) == before
        assert sorted(os.listdir(folder)) == [prev.name]
    assert sha256(src) == src_hash


@pytest.mark.parametrize("kind", ["convert", "to-safetensors"])
def test_output_is_a_directory(kind: str, small_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / OUT_NAMES[kind]
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    src_hash = sha256(small_copy)
    for extra in ([], ["--force"]):
        proc = ckpttool(*command(kind, small_copy, out), *extra)
        assert proc.returncode == 1, proc.stderr
        error_line(proc, out, "output is a directory; give a file name")
    assert os.listdir(out) == ["keep.txt"]
    assert temps(tmp_path) == []
    assert sha256(small_copy) == src_hash


@pytest.mark.parametrize("kind", KINDS)
def test_existing_output_without_force(kind: str, small_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / OUT_NAMES[kind]
    before = make_previous(kind, out)
    src_hash = sha256(small_copy)
    proc = ckpttool(*command(kind, small_copy, out, "500B"))
    assert proc.returncode == 1, proc.stderr
    error_line(proc, out, "output exists; pass --force to replace it")
    assert snapshot(out) == before
    assert temps(tmp_path) == []
    assert sha256(small_copy) == src_hash


def test_sharded_force_into_the_inputs_folder_keeps_the_input(small_copy: Path) -> None:
    folder = small_copy.parent
    (folder / "config.json").write_text("{}\n")
    src_hash = sha256(small_copy)
    proc = ckpttool(
        "to-safetensors", small_copy, folder, "--max-shard-size", "500B", "--force", "--no-verify"
    )
    assert "Traceback" not in proc.stderr
    assert small_copy.is_file() and sha256(small_copy) == src_hash


# -- broken pipe --------------------------------------------------------------------------------
def test_inspect_into_head_has_no_broken_pipe_traceback(tmp_path: Path) -> None:
    src = tmp_path / "many.pt"
    torch.save({f"layer{i}.weight": torch.zeros(2) for i in range(3000)}, src)
    cmd = f"'{sys.executable}' -m ckpttool inspect --tensors '{src}' | head -1"
    proc = subprocess.run(
        ["bash", "-c", f'set +o pipefail; {cmd}; echo "status=${{PIPESTATUS[0]}}" >&2'],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    lines = proc.stdout.splitlines()
    assert lines == [f"path:     {src}"], proc.stdout[:500]
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr
    status = re.search(r"status=(\d+)", proc.stderr)
    assert status is not None and status.group(1) in ("0", "1"), proc.stderr
    # the same through shell=True, as a user types it
    proc = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.stdout.splitlines() == [f"path:     {src}"]
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
