"""Run many ``python -m ckpttool ...`` commands (and library scans) fast.

One server process imports the package once, then forks per command and runs
``ckpttool/__main__.py`` (``runpy``, as ``-m`` does) under ``contract``'s limits (address
space, no core, stdin closed, own session, killed after ``contract.TIMEOUT_S``). What differs
from a fresh interpreter is only the start-up, which a test
(``test_corpus3.test_cli_server_matches_a_real_process``) compares on a few cases.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import contract as C

_SERVER = r"""
import importlib, json, os, pkgutil, resource, runpy, signal, sys, time, traceback
import ckpttool
import ckpttool.cli
# every module a command may import lazily, once (not __main__, which runs the CLI, nor the
# modules that import torch: the commands under test never do)
for _m in pkgutil.walk_packages(ckpttool.__path__, "ckpttool."):
    if _m.name in ("ckpttool.__main__", "ckpttool.testing") or ".training" in _m.name:
        continue
    try:
        importlib.import_module(_m.name)
    except Exception:
        pass
jobs = json.load(open(sys.argv[1]))
tmp, AS, TIMEOUT, MAXOUT = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])

def child(job, out, err):
    os.setsid()
    resource.setrlimit(resource.RLIMIT_AS, (AS, AS))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.chdir(job["cwd"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
    os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    sys.argv = ["ckpttool", *job["args"]]
    code = 0
    try:
        runpy.run_module("ckpttool", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(code)

results = []
for i, job in enumerate(jobs):
    out, err = os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        child(job, out, err)
    rc = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() - t0 > TIMEOUT:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    secs = time.monotonic() - t0
    def read(p):
        try:
            with open(p, "rb") as f:
                return f.read(MAXOUT).decode("utf-8", "backslashreplace")
        except OSError:
            return ""
    results.append({"rc": rc, "stdout": read(out), "stderr": read(err), "seconds": secs})
json.dump(results, open(os.path.join(tmp, "results.json"), "w"))
"""


def run_many(commands: Sequence[tuple[Sequence[str], Path]]) -> list[C.Result]:
    """Run each ``(args, cwd)`` as ``python -m ckpttool *args``; results in the same order."""
    if not commands:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [{"args": list(a), "cwd": str(cwd)} for a, cwd in commands]
        (Path(tmp) / "jobs.json").write_text(json.dumps(jobs))
        argv = [
            sys.executable, "-c", _SERVER, str(Path(tmp) / "jobs.json"), tmp,
            str(C.RLIMIT_AS_BYTES), str(C.TIMEOUT_S), str(C.MAX_STDOUT),
        ]  # fmt: skip
        budget = 60 + len(jobs) * (C.TIMEOUT_S + 1)
        proc = subprocess.run(argv, env=C.tool_env(), capture_output=True, timeout=budget)
        out = Path(tmp) / "results.json"
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"cli server failed: {proc.stderr.decode()[-2000:]}")
        raw = json.loads(out.read_text())
    return [
        C.Result(
            [sys.executable, "-m", "ckpttool", *a],
            r["rc"],
            r["stdout"].encode(),
            r["stderr"].encode(),
            r["seconds"],
        )
        for (a, _), r in zip(commands, raw, strict=True)
    ]


_VERDICTS = r"""
import json, os, resource, signal, sys, time, traceback
from ckpttool.ops.scan import scan
paths = json.load(open(sys.argv[1]))
out_path, AS, TIMEOUT = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
results = []
for p in paths:
    r, w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        resource.setrlimit(resource.RLIMIT_AS, (AS, AS))
        try:
            res = {"files": [[f.path, f.verdict] for f in scan([p]).files], "error": None}
        except BaseException:
            res = {"files": [], "error": traceback.format_exc()[-1500:]}
        os.write(w, json.dumps(res).encode())
        os._exit(0)
    os.close(w)
    chunks, killed = [], False
    import select
    while True:
        left = t0 + TIMEOUT - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            os.kill(pid, signal.SIGKILL)
            killed = True
            break
        b = os.read(r, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    os.waitpid(pid, 0)
    try:
        res = json.loads(b"".join(chunks))
    except ValueError:
        why = "killed after %ss" % TIMEOUT if killed else "scan process died"
        res = {"files": [], "error": why}
    res["seconds"] = time.monotonic() - t0
    results.append(res)
json.dump(results, open(out_path, "w"))
"""


def scan_verdicts(paths: Sequence[Path]) -> list[dict]:  # type: ignore[type-arg]
    """``ckpttool.ops.scan.scan([path]).files`` for each path, each in its own forked process
    under ``contract``'s limits: ``{"files": [[path, verdict], ...], "error", "seconds"}``."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "paths.json").write_text(json.dumps([str(p) for p in paths]))
        out = Path(tmp) / "out.json"
        argv = [
            sys.executable, "-c", _VERDICTS, str(Path(tmp) / "paths.json"), str(out),
            str(C.RLIMIT_AS_BYTES), str(C.TIMEOUT_S),
        ]  # fmt: skip
        budget = 60 + len(paths) * (C.TIMEOUT_S + 1)
        proc = subprocess.run(argv, env=C.tool_env(), capture_output=True, timeout=budget)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"scan server failed: {proc.stderr.decode()[-2000:]}")
        return json.loads(out.read_text())  # type: ignore[no-any-return]
