"""Load files the way torch and numpy really do, and report whether a payload ran.

``confirm_many(jobs)`` starts ONE child process that imports torch and numpy once, then
forks a fresh grandchild per file (so a payload or a half-done load in one cannot affect
the next), loads the file there with its loader under an alarm, and reports whether the
case's marker file appeared and whether the load itself succeeded.

Loaders (``c3base``): ``torch``: ``torch.load(path, weights_only=False)``; ``jit``:
``torch.jit.load``; ``dcp``: ``dcp_to_torch_save(folder, out)`` (a file inside a DCP folder
stands for its folder); ``numpy``: ``np.load(path, allow_pickle=True)`` and, for ``.npz``,
every member read; ``folder``: each file of the folder by its suffix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .c3base import DCP, FOLDER, NUMPY, SITE, TORCH, Case3
from .corpus import marker_path

PER_FILE_TIMEOUT_S = 30


@dataclass(frozen=True)
class Job:
    id: str
    path: str
    loader: str
    marker: str
    sys_path: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outcome:
    marker: bool  # the payload ran
    loaded: bool  # the loader returned without raising
    error: str = ""


_CHILD = r"""
import json, os, select, signal, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np
import torch
for _m in ("sympy", "fsspec", "torch.distributed.checkpoint.format_utils"):
    try:
        __import__(_m)
    except Exception:
        pass
torch.set_num_threads(1)

def load_numpy(p):
    r = np.load(p, allow_pickle=True)
    if hasattr(r, "files"):
        with r:
            for k in r.files:
                r[k]

def load(job):
    p, kind = job["path"], job["loader"]
    if kind == "torch":
        torch.load(p, weights_only=False, map_location="cpu")
    elif kind == "jit":
        torch.jit.load(p, map_location="cpu")
    elif kind == "dcp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        folder = p if os.path.isdir(p) else os.path.dirname(p)
        dcp_to_torch_save(folder, os.path.join(os.path.dirname(folder), "_dcp_as_torch.pt"))
    elif kind == "numpy":
        load_numpy(p)
    elif kind == "folder":
        for name in sorted(os.listdir(p)):
            q = os.path.join(p, name)
            load_numpy(q) if name.endswith((".npy", ".npz")) else torch.load(q, weights_only=False)
    else:
        raise ValueError(kind)

def run(job, w):
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.chdir(os.path.dirname(job["marker"]))
    sys.path[:0] = job["sys_path"]
    signal.alarm(TIMEOUT)
    t0 = time.monotonic()
    try:
        load(job)
        res = {"loaded": True, "error": ""}
    except BaseException as e:
        res = {"loaded": False, "error": (type(e).__name__ + ": " + str(e))[:300]}
    res["seconds"] = round(time.monotonic() - t0, 3)
    os.write(w, json.dumps(res).encode())
    os._exit(0)

jobs = json.load(open(sys.argv[1]))
TIMEOUT = int(sys.argv[3])
out = {}
for job in jobs:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        run(job, w)
    os.close(w)
    chunks, deadline = [], time.monotonic() + TIMEOUT + 5
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            os.kill(pid, signal.SIGKILL)
            break
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    try:
        res = json.loads(b"".join(chunks))
    except ValueError:
        res = {"loaded": False, "error": "the loading process died (status %d)" % status}
    res["marker"] = os.path.lexists(job["marker"])
    out[job["id"]] = res
json.dump(out, open(sys.argv[2], "w"))
"""


def job_for(case: Case3, case_dir: Path, path: Path) -> Job:
    site = (str(Path(case_dir) / SITE),) if case.site else ()
    return Job(case.id, str(path), case.loader, str(marker_path(case_dir)), site)


def confirm_many(
    jobs: list[Job], *, per_file_timeout: int = PER_FILE_TIMEOUT_S
) -> dict[str, Outcome]:
    """Load every job's file in its own forked process; ``Outcome`` per job id."""
    if not jobs:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        jin, jout = Path(tmp) / "jobs.json", Path(tmp) / "out.json"
        jin.write_text(json.dumps([asdict(j) for j in jobs]))
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        budget = 60 + len(jobs) * 2 * per_file_timeout
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(jin), str(jout), str(per_file_timeout)],
            env=env,
            capture_output=True,
            timeout=budget,
        )
        if proc.returncode != 0 or not jout.exists():
            raise RuntimeError(f"confirm child failed: {proc.stderr.decode()[-2000:]}")
        raw = json.loads(jout.read_text())
    return {k: Outcome(v["marker"], v["loaded"], v["error"]) for k, v in raw.items()}


def guess_loader(path: Path) -> str:
    if path.is_dir():
        return DCP if (path / ".metadata").exists() else FOLDER
    if path.suffix in (".npy", ".npz"):
        return NUMPY
    return TORCH


def confirm(
    path: str | os.PathLike[str],
    *,
    loader: str | None = None,
    marker: str | os.PathLike[str] | None = None,
    sys_path: tuple[str, ...] = (),
) -> bool:
    """Whether loading ``path`` as torch/numpy really would creates ``marker`` (by default the
    marker file of ``path``'s folder). ``loader``: torch, jit, dcp, numpy or folder (default:
    guessed from the path; TorchScript archives also run under ``torch``)."""
    p = Path(path)
    m = Path(marker) if marker is not None else marker_path(p.parent)
    job = Job("one", str(p), loader or guess_loader(p), str(m), sys_path)
    return confirm_many([job])["one"].marker
