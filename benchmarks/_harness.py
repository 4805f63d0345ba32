"""Measure wall time and peak memory of a command run in a subprocess (stdlib only).

Memory is measured two ways:

* **peak RssAnon** (the figure we report and set targets on): a sampler thread reads
  ``/proc/PID/status`` every ~2 ms and keeps the maximum of ``RssAnon`` summed over the
  process tree (the command plus every descendant found; descendants are discovered by
  scanning ``/proc/*/stat`` for parent pids every ~50 ms, because this kernel has no
  ``/proc/PID/task/TID/children``).  ``RssAnon`` is private anonymous memory (heap, numpy/
  torch buffers, ...), i.e. memory that cannot be given back without swap.  It does *not*
  count file-backed pages, so a tool that ``mmap``s a 4 GB input and streams it out is not
  charged for page cache that the kernel can drop at any time.  Being sampled, it can miss a
  spike shorter than the sampling period.
* **VmHWM**: the kernel's high-water mark of the resident set.  It never misses a spike, but
  it also counts mapped file pages (``RssFile``) and shared memory, so
  ``torch.load(mmap=True)`` on a 4 GB file shows ~4 GB here even though none of it is private
  memory.  The figure comes from ``ru_maxrss`` of ``os.wait4`` (the process's ``VmHWM``,
  maxed -- not summed -- with its reaped descendants).  Caveat: Linux also folds the
  pre-``exec`` image into ``ru_maxrss``, and with ``vfork`` that is the *harness's* own
  high-water mark, so ``ru_maxrss`` can never be below the harness's peak RSS (~30 MB; this is
  why the bench scripts never import torch themselves and run generation in a subprocess).
  When ``ru_maxrss`` does not exceed the harness's own peak we report instead the largest
  ``VmHWM`` read from ``/proc/PID/status`` while the command ran (it can miss only growth in
  the last ~2 ms).  Both raw values are kept in ``--json`` output.

Wall time is measured from just before ``Popen`` to the moment a blocking ``os.wait4`` in a
helper thread returns, so it includes interpreter start-up for Python commands (identical
for every Python row).

Run ``python benchmarks/_harness.py --help`` for the ad-hoc CLI; the ``bench_*.py`` scripts
import :func:`run_cases` and :func:`markdown_table`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

MB = 1_000_000  # tables use decimal megabytes: 1 MB = 10**6 bytes
POLL_S = 0.002
TREE_SCAN_S = 0.05

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?i?[bB]?)\s*$")
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """Parse ``4GB`` (10**9), ``4GiB`` (2**30), ``500MB``, ``123`` (bytes) into bytes."""
    m = _SIZE_RE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 4GB, 1.5GiB, 500MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    """Short label for a byte count: 4000000000 -> '4GB', 4831838208 -> '4.5GiB'."""
    for unit, mult in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= mult and n % (mult // 4) == 0:
            return f"{n / mult:g}{unit}"
    for unit, mult in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= mult:
            return f"{n / mult:.4g}{unit}"
    return f"{n}B"


# --------------------------------------------------------------------------------------
# /proc helpers


def _status_fields(pid: int) -> dict[str, int]:
    """Return RssAnon/VmHWM (bytes) of ``pid`` from /proc; {} if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            data = fh.read()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in data.splitlines():
        if line.startswith((b"RssAnon:", b"VmHWM:")):
            key, _, rest = line.partition(b":")
            out[key.decode()] = int(rest.split()[0]) * 1024  # values are in kB
    return out


def _descendants(root: int) -> set[int]:
    """All live descendants of ``root`` (scans /proc/*/stat for parent pids)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return set()
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # "pid (comm) state ppid ..." -- comm may contain spaces/parens, split at the last ')'
        fields = stat.rpartition(b")")[2].split()
        if len(fields) >= 2:
            children.setdefault(int(fields[1]), []).append(int(name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


# --------------------------------------------------------------------------------------
# one run


@dataclass
class RunStats:
    wall_s: float
    peak_rss_anon: int  # bytes, max over samples of RssAnon summed over the process tree
    vmhwm: int  # bytes, see module docstring (max over the tree, not sum)
    returncode: int
    samples: int
    max_tree_size: int
    stderr_tail: str = ""
    stdout: str | None = None
    output_bytes: int | None = None
    ru_maxrss: int = 0  # bytes, raw wait4 figure (includes the harness's own floor)
    cpu_s: float = 0.0  # user + system CPU seconds of the command and its reaped descendants
    cpu_sys_s: float = 0.0  # the system part (page faults, copies in the kernel, ...)
    loadavg: float = 0.0  # 1-minute load average just before the run (others on the machine?)
    polled_vmhwm: int = 0  # bytes, largest VmHWM read from /proc while running
    harness_maxrss: int = 0  # bytes, the harness's own ru_maxrss when the command started


def run_once(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    capture_stdout: bool = False,
    poll_s: float = POLL_S,
    tree: bool = True,
    tail_chars: int = 2000,
) -> RunStats:
    """Run ``argv`` once and measure it.  stdout goes to /dev/null unless captured."""
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out if capture_stdout else subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=cwd,
        )
        reaped: dict[str, object] = {}
        done = threading.Event()

        def reaper() -> None:
            _, status, rusage = os.wait4(proc.pid, 0)
            reaped["t1"] = time.perf_counter()
            reaped["status"] = status
            reaped["rusage"] = rusage
            done.set()

        thread = threading.Thread(target=reaper, daemon=True)
        thread.start()

        peak = 0
        hwm_seen = 0
        samples = 0
        max_tree = 1
        tree_pids: set[int] = set()
        next_scan = 0.0
        while not done.is_set():
            now = time.perf_counter()
            if tree and now >= next_scan:
                tree_pids = _descendants(proc.pid)
                max_tree = max(max_tree, 1 + len(tree_pids))
                next_scan = now + TREE_SCAN_S
            total = 0
            main = _status_fields(proc.pid)
            if main:
                total += main.get("RssAnon", 0)
                hwm_seen = max(hwm_seen, main.get("VmHWM", 0))
            for pid in tree_pids:
                fields = _status_fields(pid)
                total += fields.get("RssAnon", 0)
                hwm_seen = max(hwm_seen, fields.get("VmHWM", 0))
            if main or tree_pids:
                peak = max(peak, total)
                samples += 1
            done.wait(poll_s)
        thread.join()
        status = int(reaped["status"])  # type: ignore[call-overload]
        proc.returncode = os.waitstatus_to_exitcode(status)
        rusage = reaped["rusage"]
        ru_maxrss = int(rusage.ru_maxrss) * 1024  # type: ignore[attr-defined]
        # ru_maxrss is exact unless the harness's own peak (the floor) dominates it; then use
        # what /proc showed, unless the command ended before the first sample.
        vmhwm = ru_maxrss if ru_maxrss > floor or hwm_seen == 0 else hwm_seen
        wall = float(reaped["t1"]) - t0  # type: ignore[arg-type]

        err.seek(0)
        tail = err.read().decode("utf-8", "replace")[-tail_chars:]
        stdout_text = None
        if capture_stdout:
            out.seek(0)
            stdout_text = out.read().decode("utf-8", "replace")
    return RunStats(
        wall_s=wall,
        peak_rss_anon=peak,
        vmhwm=vmhwm,
        returncode=proc.returncode,
        samples=samples,
        max_tree_size=max_tree,
        stderr_tail=tail,
        stdout=stdout_text,
        ru_maxrss=ru_maxrss,
        cpu_s=float(rusage.ru_utime + rusage.ru_stime),  # type: ignore[attr-defined]
        cpu_sys_s=float(rusage.ru_stime),  # type: ignore[attr-defined]
        loadavg=load,
        polled_vmhwm=hwm_seen,
        harness_maxrss=floor,
    )


# --------------------------------------------------------------------------------------
# cases and tables


@dataclass
class Case:
    """One row of a benchmark table."""

    label: str
    argv: list[str]
    outputs: list[Path] = field(default_factory=list)  # removed before each run and at the end
    baseline: bool = False  # the row that "× cp" is relative to
    target_ratio: float | None = None  # wall ≤ ratio × baseline
    target_wall_s: float | None = None  # wall < seconds
    target_mb: float | None = None  # peak RssAnon < MB
    env: dict[str, str] | None = None
    capture_stdout: bool = False
    note: str = ""
    check: Callable[[RunStats], str | None] | None = None  # returns an error message or None
    warmup: int = 0  # extra discarded runs for this case (added to run_cases(warmup=...))


@dataclass
class CaseResult:
    label: str
    command: str
    runs: list[RunStats]
    failed: bool
    error: str = ""
    note: str = ""
    target_ratio: float | None = None
    target_wall_s: float | None = None
    target_mb: float | None = None
    baseline: bool = False

    @property
    def wall_median(self) -> float | None:
        ok = [r.wall_s for r in self.runs if r.returncode == 0]
        return statistics.median(ok) if ok else None

    @property
    def wall_range(self) -> tuple[float, float] | None:
        ok = [r.wall_s for r in self.runs if r.returncode == 0]
        return (min(ok), max(ok)) if ok else None

    @property
    def cpu_median(self) -> float | None:
        ok = [r.cpu_s for r in self.runs if r.returncode == 0]
        return statistics.median(ok) if ok else None

    @property
    def peak_rss_anon(self) -> int | None:
        return max((r.peak_rss_anon for r in self.runs), default=None)

    @property
    def vmhwm(self) -> int | None:
        return max((r.vmhwm for r in self.runs), default=None)

    @property
    def output_bytes(self) -> int | None:
        sizes = [r.output_bytes for r in self.runs if r.output_bytes is not None]
        return sizes[-1] if sizes else None


def _size(path: Path) -> int:
    """A file's size, or the sum of a folder's files (an output folder: DCP, shards)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def remove_outputs(paths: Sequence[Path]) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            import shutil

            shutil.rmtree(p)


def evict_inputs(argv: Sequence[str], outputs: Sequence[Path], under: Path) -> None:
    """Drop from the page cache every file ``argv`` names below ``under`` (a folder: its
    files), outputs excepted: the command then reads its input from the disk, as it does for
    a checkpoint nobody touched since it was written, while the interpreter and the tool
    stay cached. ``POSIX_FADV_DONTNEED`` drops clean pages only: call after ``sync``."""
    root = under.resolve()
    skip = {p.resolve() for p in outputs}
    for arg in argv:
        path = Path(arg)
        if not path.is_absolute() or not path.exists():
            continue
        path = path.resolve()
        if path in skip or root not in path.parents:
            continue
        for f in [path] if path.is_file() else [q for q in path.rglob("*") if q.is_file()]:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def wait_for_load(max_load: float, max_wait_s: float, *, verbose: bool = True) -> float:
    """Sleep until the 1-minute load average is ≤ ``max_load`` or ``max_wait_s`` passed."""
    t0 = time.perf_counter()
    told = False
    while os.getloadavg()[0] > max_load and time.perf_counter() - t0 < max_wait_s:
        if verbose and not told:
            print(
                f"[bench]   waiting for load {os.getloadavg()[0]:.2f} to drop to {max_load}",
                file=sys.stderr,
                flush=True,
            )
            told = True
        time.sleep(1.0)
    return os.getloadavg()[0]


def warm_page_cache(path: Path, chunk: int = 16 << 20) -> float:
    """Read ``path`` once so that it sits in the page cache; returns seconds taken."""
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while fh.read(chunk):
            pass
    return time.perf_counter() - t0


def run_cases(
    cases: Sequence[Case],
    *,
    repeat: int = 3,
    warmup: int = 0,
    sync: bool = True,
    keep_outputs: bool = False,
    verbose: bool = True,
    tree: bool = True,
    max_load: float | None = None,
    max_wait_s: float = 120.0,
    interleave: bool = False,
    cold: Path | None = None,
) -> list[CaseResult]:
    """Run each case ``repeat`` times (plus ``warmup`` discarded runs).

    Before every run the case's outputs are deleted and (unless ``sync=False``) ``sync`` is
    called, outside the timed region, so that each run starts with no dirty pages from the
    previous one.  With ``max_load``, each run first waits (at most ``max_wait_s``) until the
    1-minute load average is at most ``max_load`` -- a crude guard on a shared machine.
    With ``interleave``, the cases take turns (cp, A, B, cp, A, B, ...) so that a disk whose
    speed drifts over minutes (a shared virtual machine) biases no row against another.
    With ``cold`` (a folder), each run's inputs below it leave the page cache first
    (:func:`evict_inputs`): every row reads them from the disk.
    A failing command (non-zero exit or a failed ``check``) marks the row
    FAILED, its stderr tail is kept, and the remaining cases still run.
    """
    runs: list[list[RunStats]] = [[] for _ in cases]
    errors = ["" for _ in cases]
    commands = [" ".join(shlex.quote(a) for a in case.argv) for case in cases]
    total = [warmup + case.warmup + repeat for case in cases]
    if interleave:
        schedule = [(k, i) for i in range(max(total, default=0)) for k in range(len(cases))]
    else:
        schedule = [(k, i) for k in range(len(cases)) for i in range(total[k])]
    announced: set[int] = set()
    for k, i in schedule:
        case = cases[k]
        if i >= total[k] or errors[k]:
            continue
        if verbose and k not in announced:
            print(f"[bench] {case.label}: {commands[k]}", file=sys.stderr, flush=True)
            announced.add(k)
        n_warm = warmup + case.warmup
        remove_outputs(case.outputs)
        if sync or cold is not None:
            os.sync()
        if cold is not None:
            evict_inputs(case.argv, case.outputs, cold)
        if max_load is not None:
            wait_for_load(max_load, max_wait_s, verbose=verbose)
        stats = run_once(case.argv, env=case.env, capture_stdout=case.capture_stdout, tree=tree)
        if stats.returncode == 0 and case.outputs:
            try:
                stats.output_bytes = sum(_size(p) for p in case.outputs)
            except OSError:
                stats.output_bytes = None
        if stats.returncode != 0:
            errors[k] = f"exit code {stats.returncode}; stderr tail:\n{stats.stderr_tail.rstrip()}"
        elif case.check is not None:
            msg = case.check(stats)
            if msg:
                errors[k] = f"check failed: {msg}"
                stats.returncode = -1000
        if verbose:
            tag = "warmup" if i < n_warm else f"run {i - n_warm + 1}/{repeat}"
            state = "ok" if stats.returncode == 0 else "FAILED"
            print(
                f"[bench]   {case.label[:40]} {tag}: {state} wall {stats.wall_s:.3f}s "
                f"RssAnon {stats.peak_rss_anon / MB:.1f}MB VmHWM {stats.vmhwm / MB:.1f}MB "
                f"CPU {stats.cpu_s:.2f}s (sys {stats.cpu_sys_s:.2f}s) "
                f"(load {stats.loadavg:.2f})",
                file=sys.stderr,
                flush=True,
            )
        if i >= n_warm:
            runs[k].append(stats)
        if errors[k] and verbose:
            print(f"[bench]   {errors[k]}", file=sys.stderr, flush=True)
        if not keep_outputs:
            remove_outputs(case.outputs)
    return [
        CaseResult(
            label=case.label,
            command=commands[k],
            runs=runs[k],
            failed=bool(errors[k]),
            error=errors[k],
            note=case.note,
            target_ratio=case.target_ratio,
            target_wall_s=case.target_wall_s,
            target_mb=case.target_mb,
            baseline=case.baseline,
        )
        for k, case in enumerate(cases)
    ]


def _target_text(r: CaseResult, ratio: float | None) -> str:
    """E.g. "≤ 1.3× cp **missed**, < 100 MB met" (each part judged on its own)."""
    wall = r.wall_median
    peak = r.peak_rss_anon
    parts: list[tuple[str, bool]] = []
    if r.target_ratio is not None:
        parts.append((f"≤ {r.target_ratio:g}× cp", ratio is not None and ratio <= r.target_ratio))
    if r.target_wall_s is not None:
        parts.append((f"< {r.target_wall_s:g} s", wall is not None and wall < r.target_wall_s))
    if r.target_mb is not None:
        parts.append((f"< {r.target_mb:g} MB", peak is not None and peak / MB < r.target_mb))
    if not parts:
        return ""
    if r.failed:
        return ", ".join(text for text, _ in parts) + ": FAILED"
    return ", ".join(f"{text} met" if ok else f"{text} **missed**" for text, ok in parts)


def markdown_table(results: Sequence[CaseResult], *, show_output: bool | None = None) -> str:
    """Markdown table: command, wall s (median, min–max), × cp, peak RssAnon MB (max),
    VmHWM MB (max), CPU s (median user+sys), [output MB], [target].

    ``show_output`` adds the output file size column (default: if any row wrote one)."""
    if show_output is None:
        show_output = any(r.output_bytes is not None for r in results)
    base = next((r for r in results if r.baseline and not r.failed), None)
    base_wall = base.wall_median if base else None
    has_targets = any(
        x is not None for r in results for x in (r.target_ratio, r.target_wall_s, r.target_mb)
    )
    head = ["command", "wall s", "× cp", "peak RssAnon MB", "VmHWM MB", "CPU s"]
    if show_output:
        head.append("output MB")
    if has_targets:
        head.append("target")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * 5) + "|"]
    if show_output:
        lines[1] += "---:|"
    if has_targets:
        lines[1] += "---|"
    for r in results:
        wall = r.wall_median
        ratio = wall / base_wall if (wall is not None and base_wall) else None
        rng = r.wall_range
        if r.failed and wall is None:
            wall_txt = "FAILED"
        else:
            wall_txt = f"{wall:.3f}" if wall is not None else "-"
            if rng and len(r.runs) > 1:
                wall_txt += f" ({rng[0]:.2f}–{rng[1]:.2f})"
            if r.failed:
                wall_txt += " FAILED"
        row = [
            f"`{r.label}`",
            wall_txt,
            f"{ratio:.2f}" if ratio is not None else "-",
            f"{r.peak_rss_anon / MB:.1f}" if r.peak_rss_anon is not None else "-",
            f"{r.vmhwm / MB:.1f}" if r.vmhwm is not None else "-",
            f"{r.cpu_median:.2f}" if r.cpu_median is not None else "-",
        ]
        if show_output:
            ob = r.output_bytes
            row.append(f"{ob / MB:.1f}" if ob is not None else "-")
        if has_targets:
            row.append(_target_text(r, ratio))
        lines.append("| " + " | ".join(row) + " |")
    failures = [r for r in results if r.failed]
    notes = [r for r in results if r.note]
    if notes or failures:
        lines.append("")
    for r in notes:
        lines.append(f"- `{r.label}`: {r.note}")
    for r in failures:
        tail = r.error.strip().replace("\n", "\n    ")
        lines.append(f"- **FAILED** `{r.label}`: {tail}")
    return "\n".join(lines)


def results_json(results: Sequence[CaseResult], **extra: object) -> str:
    payload = {
        "extra": extra,
        "results": [
            {
                **{k: v for k, v in asdict(r).items() if k != "runs"},
                "wall_median_s": r.wall_median,
                "peak_rss_anon_bytes": r.peak_rss_anon,
                "vmhwm_bytes": r.vmhwm,
                "output_bytes": r.output_bytes,
                "runs": [{k: v for k, v in asdict(run).items() if k != "stdout"} for run in r.runs],
            }
            for r in results
        ],
    }
    return json.dumps(payload, indent=2)


def machine_description() -> str:
    """One line: CPU model, cores, RAM, kernel, python -- for the README/--json."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 2**20:.0f} GiB RAM"
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem}, Linux {os.uname().release}, "
        f"Python {sys.version.split()[0]}"
    )


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def python_env() -> dict[str, str]:
    """Environment for child Pythons: repo root on PYTHONPATH so ``-m ckpttool`` works
    without an install."""
    env = dict(os.environ)
    root = str(repo_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# --------------------------------------------------------------------------------------
# shared by the bench_*.py drivers

DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "ckpttool-bench"


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help=f"where checkpoints and outputs go (default {DEFAULT_WORKDIR}); outputs are "
        "written to the same filesystem as the input",
    )
    ap.add_argument("-n", "--repeat", type=int, default=3, help="timed runs per row (default 3)")
    ap.add_argument("--warmup", type=int, default=0, help="extra discarded runs per row")
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the input checkpoint(s) generated by this run (later runs reuse them); "
        "inputs that were already cached are never deleted, outputs always are",
    )
    ap.add_argument("--force-generate", action="store_true", help="regenerate cached inputs")
    ap.add_argument("--no-sync", action="store_true", help="do not call sync before each run")
    ap.add_argument(
        "--max-load",
        type=float,
        metavar="L",
        help="before each run wait (up to 120 s) for the 1-min load average to be <= L "
        "(for shared machines; the load of each run is recorded anyway)",
    )
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="run the rows in turns (cp, A, B, cp, A, B, ...) instead of one row after another",
    )
    ap.add_argument(
        "--cold",
        action="store_true",
        help="before each run, drop the inputs (files below --workdir that a row names) from "
        "the page cache: every row reads them from the disk (the interpreter stays cached)",
    )
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")


def run_with_args(cases: Sequence[Case], args: argparse.Namespace) -> list[CaseResult]:
    """``run_cases`` with the options ``add_common_args`` defined."""
    return run_cases(
        cases,
        repeat=args.repeat,
        warmup=args.warmup,
        sync=not args.no_sync,
        max_load=args.max_load,
        interleave=args.interleave,
        keep_outputs=False,
        cold=args.workdir if args.cold else None,
    )


def cp_cases(path: Path, out: Path) -> list[Case]:
    """The baselines: ``cp`` (the ratio column's reference) and ``cp`` followed by an fsync of
    the copy, which is what a writer that makes its output durable (ckpttool) should match."""
    return [
        Case(
            label="cp IN OUT",
            argv=["cp", str(path), str(out)],
            outputs=[out],
            baseline=True,
            warmup=1,
        ),
        Case(
            label="cp IN OUT && sync OUT (durable copy)",
            argv=["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", str(path), str(out)],
            outputs=[out],
            note="cp, then fsync of the copy: ckpttool fsyncs its output before renaming it",
        ),
    ]


def measured_python() -> str:
    """The interpreter the measured commands run in: this one's packages, without its
    editable install.

    ``pip install -e .`` adds an import hook that every interpreter of the virtual environment
    loads at start-up (setuptools' editable finder: ~9 ms, with pathlib, re, urllib.parse),
    which a user's regular install does not have. The commands run in a bare virtual
    environment (made once, under the temp folder) whose ``.pth`` file lists this one's
    site-packages as plain paths, so dependencies are the same and ``ckpttool`` is found on
    ``PYTHONPATH`` (:func:`python_env`), as an installed package is on ``sys.path``. Both the
    ckpttool rows and the baselines run in it.
    """
    global _MEASURED
    if _MEASURED is None:
        import site
        import sysconfig

        tag = "".join(map(str, sys.version_info[:2]))
        base = Path(tempfile.gettempdir()) / f"ckpttool-bench-python-{tag}"
        python = base / "bin" / "python"
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(base)], check=True)
        purelib = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        paths = [p for p in site.getsitepackages() if os.path.isdir(p)]
        paths.append(sysconfig.get_path("purelib"))
        Path(purelib, "ckpttool-bench-deps.pth").write_text("\n".join(dict.fromkeys(paths)) + "\n")
        _MEASURED = str(python)
    return _MEASURED


_MEASURED: str | None = None


def ckpttool_argv(*args: str) -> list[str]:
    """``python -m ckpttool ARGS`` (the whole CLI process is measured) in
    :func:`measured_python`."""
    return [measured_python(), "-m", "ckpttool", *args]


def python_code_argv(code: str, *args: str) -> list[str]:
    return [measured_python(), "-c", code, *args]


def package_versions() -> str:
    from importlib import metadata

    parts = []
    for name in ("torch", "safetensors", "ckpttool"):
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts)


def header(title: str) -> str:
    return (
        f"## {title}\n\n"
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}\n"
        f"- machine: {machine_description()}\n"
        f"- packages: {package_versions()}\n"
        f"- command: `{' '.join(shlex.quote(a) for a in sys.argv)}`\n"
        f"- 1-min load average at the end: {os.getloadavg()[0]:.2f} "
        "(per-run values in the stderr log / --json)\n"
    )


def output_exists_check(path: Path, min_bytes: int = 1) -> Callable[[RunStats], str | None]:
    """A :attr:`Case.check` that fails the row when the command did not write ``path``."""

    def check(stats: RunStats) -> str | None:
        try:
            size = path.stat().st_size
        except OSError:
            return f"exit code 0 but {path} was not written"
        if size < min_bytes:
            return f"{path} has only {size} bytes (expected at least {min_bytes})"
        return None

    return check


class Inputs:
    """Generated input checkpoints: reused from cache when possible; the ones generated by
    this run are deleted by :meth:`cleanup` unless ``keep``."""

    def __init__(self, workdir: Path, *, keep: bool, force: bool) -> None:
        self.workdir = Path(workdir)
        self.keep = keep
        self.force = force
        self.created: list[Path] = []

    def get(
        self,
        size_bytes: int,
        *,
        adam: bool = False,
        layout: str = "nested",
        transposed: bool = False,
    ) -> Path:
        import make_big_checkpoint as mbc

        spec = mbc.Spec(size_bytes=size_bytes, adam=adam, layout=layout, transposed=transposed)
        path = mbc.checkpoint_path(self.workdir, spec)
        cached = not self.force and mbc.is_cached(path, spec)
        if not cached:
            print(f"[gen] generating {path} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        mbc.ensure_checkpoint(self.workdir, spec, force=self.force)
        if not cached:
            print(f"[gen] done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            self.created.append(path)
        return path

    def cleanup(self) -> None:
        if self.keep:
            return
        import make_big_checkpoint as mbc

        for path in self.created:
            remove_outputs([path, mbc.sidecar_path(path)])
        with contextlib.suppress(OSError):
            self.workdir.rmdir()  # only if empty


def emit(
    title: str,
    sections: Sequence[tuple[str, Sequence[CaseResult]]],
    json_path: Path | None,
    **extra: object,
) -> None:
    """Print the header and one markdown table per section; optionally write JSON."""
    print(header(title))
    for subtitle, results in sections:
        if subtitle:
            print(f"### {subtitle}\n")
        print(markdown_table(results))
        print()
    if json_path is not None:
        payload = {
            "title": title,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_description(),
            "packages": package_versions(),
            "argv": sys.argv,
            **extra,
            "sections": {sub: json.loads(results_json(res)) for sub, res in sections},
        }
        Path(json_path).write_text(json.dumps(payload, indent=2) + "\n")


# --------------------------------------------------------------------------------------
# ad-hoc CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=(
            "Run shell-split commands N times each; print median wall time, max peak RssAnon "
            "(sampled every ~2 ms over the process tree) and VmHWM (wait4 ru_maxrss) as markdown."
        ),
        epilog=(
            "example: python benchmarks/_harness.py --cp-baseline ckpt.pt /tmp/out.pt "
            "--cmd 'python -m ckpttool inspect ckpt.pt'"
        ),
    )
    ap.add_argument("--cmd", action="append", default=[], help="command to run (repeatable)")
    ap.add_argument(
        "--cp-baseline",
        nargs=2,
        metavar=("IN", "OUT"),
        help="add a `cp IN OUT` baseline row (also warms the page cache with IN)",
    )
    ap.add_argument("--remove", action="append", default=[], help="path removed before each run")
    ap.add_argument("-n", "--repeat", type=int, default=3, help="timed runs per command")
    ap.add_argument("--warmup", type=int, default=0, help="discarded runs per command")
    ap.add_argument("--no-sync", action="store_true", help="do not sync before each run")
    ap.add_argument("--no-tree", action="store_true", help="main process only")
    ap.add_argument("--json", metavar="PATH", help="also write results as JSON")
    args = ap.parse_args(argv)

    cases: list[Case] = []
    removes = [Path(p) for p in args.remove]
    if args.cp_baseline:
        src, dst = args.cp_baseline
        warm_page_cache(Path(src))
        cases.append(
            Case(
                label=f"cp {src} {dst}",
                argv=["cp", src, dst],
                outputs=[Path(dst)],
                baseline=True,
                warmup=1,
            )
        )
    for cmd in args.cmd:
        cases.append(Case(label=cmd, argv=shlex.split(cmd), outputs=removes))
    if not cases:
        ap.error("nothing to run: give --cmd and/or --cp-baseline")
    results = run_cases(
        cases,
        repeat=args.repeat,
        warmup=args.warmup,
        sync=not args.no_sync,
        tree=not args.no_tree,
    )
    print(markdown_table(results))
    if args.json:
        Path(args.json).write_text(results_json(results, machine=machine_description()))
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
