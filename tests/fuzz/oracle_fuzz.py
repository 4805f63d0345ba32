"""The structure-aware fuzzer judged by the torch oracle (issue 18).

Input ``i`` of seed ``s`` is reproducible: ``random.Random(f"{s}:{i}")`` picks a base
(:func:`.bases.structured_bases`) and one to three structure-level mutations of its format
(:mod:`.zip_mut`, :mod:`.stream_mut`, :mod:`.pickle_mut`; snippets from :mod:`.snippets`). Each
input is written to a folder of its own (its payloads' marker lives there), ``ckpttool scan``
gives the verdict in a worker process (with a time and memory limit), and every input ckpttool
calls ``safe`` is loaded by the torch oracle. A divergence: ckpttool says ``safe`` and torch
resolved a global outside the allowlist, called code outside it, made a suspicious audit event
or wrote a marker. A marker that appears before torch ran means ckpttool itself ran a payload.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import multiprocessing
import random
import re
import resource
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .mutate import apply_ops, random_ops
from .snippets import Snippets
from .stream_mut import (
    LEGACY_KINDS,
    STREAM_KINDS,
    TAR_KINDS,
    mutate_legacy,
    mutate_stream,
    mutate_tar,
)
from .zip_mut import ZIP_KINDS, mutate_zip

Mutator = Callable[[bytes, random.Random, Snippets, str], "tuple[bytes, str] | None"]
FORMATS: dict[str, tuple[tuple[str, ...], Mutator, str]] = {
    "zip": (ZIP_KINDS, mutate_zip, "model.pt"),
    "legacy": (LEGACY_KINDS, mutate_legacy, "model.pt"),
    "tar": (TAR_KINDS, mutate_tar, "model.pt"),
    "pickle": (STREAM_KINDS, mutate_stream, "model.pkl"),
    "npy": (STREAM_KINDS, mutate_stream, "model.npy"),
}
FORMAT_WEIGHTS = {"zip": 0.45, "legacy": 0.15, "tar": 0.2, "pickle": 0.1, "npy": 0.1}
MARKER = "PWNED"


@dataclass
class FuzzInput:
    index: int
    base: str
    fmt: str
    data: bytes
    name: str
    mutations: list[str]  # "zip.inner.insert", "tar.link", ...
    snippets: list[str]  # what the snippets drew: "payload-call", "build-hijack", ...


def generate(seed: int, i: int, bases: list[tuple[str, str, bytes]], marker: str) -> FuzzInput:
    """Input ``i`` of ``seed`` (``marker``: the path its payloads write)."""
    rng = random.Random(f"{seed}:{i}")
    fmts = sorted({f for _, f, _ in bases}, key=list(FORMAT_WEIGHTS).index)
    fmt = rng.choices(fmts, [FORMAT_WEIGHTS[f] for f in fmts])[0]
    name, fmt, data = rng.choice([b for b in bases if b[1] == fmt])
    kinds, mutator, fname = FORMATS[fmt]
    snip = Snippets(rng, marker)
    labels: list[str] = []
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        for _try in range(4):
            kind = "inner" if "inner" in kinds and rng.random() < 0.4 else rng.choice(kinds)
            try:
                res = mutator(data, rng, snip, kind)
            except Exception as exc:  # a mutator bug must not stop the run: label it
                labels.append(f"{fmt}.{kind}!{type(exc).__name__}")
                res = None
            if res is not None:
                data, label = res
                labels.append(f"{fmt}.{label}")
                break
    if rng.random() < 0.05:  # now and then a few raw byte edits on top
        data = apply_ops(data, random_ops(rng, 1, rng.randrange(1, 3)), [])
        labels.append("bytes")
    return FuzzInput(i, name, fmt, data, fname, labels or [f"{fmt}.none"], list(snip.kinds))


# -- ckpttool's verdict, in worker processes -----------------------------------------------------
_TIMEOUT = [10.0]


def _scan_init(timeout: float, rlimit_gb: float) -> None:
    if rlimit_gb:
        lim = int(rlimit_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    _TIMEOUT[0] = timeout

    def _alarm(signum: int, frame: Any) -> None:
        raise TimeoutError("scan took too long")

    signal.signal(signal.SIGALRM, _alarm)


def scan_one(path: str) -> tuple[str, list[str], str | None]:
    """(verdict, deciding globals, error) of ``ckpttool scan`` on one file."""
    from ckpttool.ops.scan import scan

    signal.setitimer(signal.ITIMER_REAL, _TIMEOUT[0])
    try:
        f = scan([path]).files[0]
        return f.verdict, [g.name for g in f.deciding], f.error
    except TimeoutError:
        return "scan-timeout", [], "scan took too long"
    except MemoryError:
        return "scan-memory", [], "scan ran out of memory"
    except Exception as exc:  # scan must not raise; recorded as its own outcome
        return "scan-raised", [], f"{type(exc).__name__}: {exc}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def scan_pool(jobs: int = 1, timeout: float = 10.0, rlimit_gb: float = 2.0) -> cf.Executor:
    return cf.ProcessPoolExecutor(
        jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_scan_init,
        initargs=(timeout, rlimit_gb),
    )


# -- one batch ------------------------------------------------------------------------------------
@dataclass
class Outcome:
    input: FuzzInput
    path: Path
    verdict: str
    deciding: list[str] = field(default_factory=list)
    scan_error: str | None = None
    observed: bool = False
    divergence: str | None = None  # ckpttool safe, torch ran something outside the allowlist
    note: str | None = None  # dangerous, yet torch ran only allowlisted code (observe_all)
    torch: str = ""
    ran_in_scan: bool = False  # a marker appeared while only ckpttool had read the input


def run_batch(
    inputs: list[FuzzInput],
    work: Path,
    pool: cf.Executor,
    oracle: Any,
    *,
    observe_all: bool = False,
    timeout: float = 20.0,
) -> list[Outcome]:
    """Write, scan and (where ckpttool says safe) load every input; folders removed after."""
    from tests.oracle import judge

    paths = []
    for x in inputs:
        d = work / str(x.index)
        if d.exists():  # left by an interrupted run: its marker must not count here
            shutil.rmtree(d)
        d.mkdir(parents=True)
        (d / x.name).write_bytes(x.data)
        paths.append(d / x.name)
    verdicts = list(pool.map(scan_one, [str(p) for p in paths], chunksize=8))
    outs = []
    for x, p, (verdict, deciding, err) in zip(inputs, paths, verdicts, strict=True):
        ran = any(e.name != x.name for e in p.parent.iterdir())
        outs.append(Outcome(x, p, verdict, deciding, err, ran_in_scan=ran))
    todo = [o for o in outs if observe_all or o.verdict == judge.SAFE]
    kinds = [
        "numpy" if o.input.fmt == "npy" else "pickle" if o.input.fmt == "pickle" else None
        for o in todo
    ]
    obs = oracle.observe_many([o.path for o in todo], timeout=timeout, kinds=kinds) if todo else []
    for o, ob in zip(todo, obs, strict=True):
        o.observed = True
        o.torch = ob.describe()
        unit = judge.Unit(str(o.path), None, o.verdict, o.deciding, [str(o.path)])
        div, note = judge.check(unit, ob)
        if o.verdict == judge.SAFE:
            o.divergence = div
        elif div or note:
            o.note = div or note
    for p in paths:
        shutil.rmtree(p.parent, ignore_errors=True)
    return outs


def family(label: str) -> str:
    """A mutation label without the member or pickle it hit: ``tar.inner.insert``."""
    return re.sub(r"\[[^\]]*\]", "", label)


@dataclass
class Summary:
    inputs: int = 0
    seconds: float = 0.0
    verdicts: collections.Counter[str] = field(default_factory=collections.Counter)
    observed: int = 0
    by_mutation: collections.Counter[str] = field(default_factory=collections.Counter)
    divergent_by_mutation: collections.Counter[str] = field(default_factory=collections.Counter)
    by_snippet: collections.Counter[str] = field(default_factory=collections.Counter)
    divergent_by_snippet: collections.Counter[str] = field(default_factory=collections.Counter)
    divergences: list[Outcome] = field(default_factory=list)
    ran_in_scan: list[Outcome] = field(default_factory=list)
    notes: list[Outcome] = field(default_factory=list)

    def add(self, outs: list[Outcome]) -> None:
        for o in outs:
            self.inputs += 1
            self.verdicts[o.verdict] += 1
            self.observed += o.observed
            for m in {family(x) for x in o.input.mutations}:
                self.by_mutation[m] += 1
                if o.divergence:
                    self.divergent_by_mutation[m] += 1
            for k in set(o.input.snippets):
                self.by_snippet[k] += 1
                if o.divergence:
                    self.divergent_by_snippet[k] += 1
            if o.divergence:
                self.divergences.append(o)
            if o.ran_in_scan:
                self.ran_in_scan.append(o)
            if o.note:
                self.notes.append(o)

    def lines(self, examples: int = 12) -> list[str]:
        out = [
            f"inputs run: {self.inputs} in {self.seconds:.0f} s; verdicts {dict(self.verdicts)}; "
            f"loaded by torch: {self.observed}",
            f"divergences (safe, yet torch ran unvetted code): {len(self.divergences)}; "
            f"payloads run by ckpttool itself: {len(self.ran_in_scan)}",
            "by mutation (inputs / divergent):",
        ]
        for m, n in sorted(self.by_mutation.items(), key=lambda kv: (-kv[1], kv[0])):
            out.append(f"  {m:32s} {n:6d} / {self.divergent_by_mutation.get(m, 0)}")
        out.append("by inserted snippet (inputs / divergent):")
        for m, n in sorted(self.by_snippet.items(), key=lambda kv: (-kv[1], kv[0])):
            out.append(f"  {m:32s} {n:6d} / {self.divergent_by_snippet.get(m, 0)}")
        seen: set[str] = set()
        for o in self.divergences + self.ran_in_scan:
            sig = f"{'+'.join(sorted(set(o.input.mutations)))}|{o.divergence or ''}"[:160]
            key = sig.split("|")[0] + "|" + (o.divergence or "ran in scan").split(";")[0][:60]
            if key in seen or len(seen) >= examples:
                continue
            seen.add(key)
            what = o.divergence or "a marker appeared after ckpttool alone read the input"
            out.append(f"  #{o.input.index} {o.input.base} {o.input.mutations}: {what[:300]}")
        return out


def run(
    seed: int,
    n: int,
    work: Path,
    *,
    start: int = 0,
    batch: int = 100,
    workers: int = 2,
    observe_all: bool = False,
    deadline: float | None = None,
    on_batch: Callable[[Summary, list[Outcome]], None] | None = None,
    cache_dir: Path | None = None,
) -> Summary:
    """Run inputs ``start .. start+n-1`` (or until ``deadline``, a ``time.monotonic()``)."""
    from tests.oracle.torch_oracle import Oracle

    from .bases import structured_bases

    bases = structured_bases(work / "bases")
    summary = Summary()
    t0 = time.monotonic()
    with scan_pool(workers) as pool, Oracle(workers, cache_dir, cache_root=work) as oracle:
        for lo in range(start, start + n, batch):
            if deadline is not None and time.monotonic() > deadline:
                break
            idx = range(lo, min(lo + batch, start + n))
            inputs = [generate(seed, i, bases, str(work / str(i) / MARKER)) for i in idx]
            outs = run_batch(inputs, work, pool, oracle, observe_all=observe_all)
            summary.add(outs)
            summary.seconds = time.monotonic() - t0
            if on_batch is not None:
                on_batch(summary, outs)
    return summary
