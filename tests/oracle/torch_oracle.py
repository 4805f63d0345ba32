"""torch as the oracle: load an input the way torch's own loaders do, in a child process, and
report what torch resolved, called and did.

``observe(path)`` loads one input; ``observe_many(paths)`` loads many through warm children
(torch imported once per child, one ``fork()`` per input), so hundreds of inputs cost seconds.
The loading itself happens in ``oracle_child.py`` (read its docstring for the recorders); this
module starts the children, caches their records by content, and judges a record against
ckpttool's allowlist:

* :func:`allowlist` - every name ckpttool may call safe (``lists.TORCH_ALLOWED``,
  ``TORCH_ON_IMPORT``, ``DATA_ALLOWED``, ``PLAIN_TYPES``, ``TORCH_CONSTANTS`` and, once the lead
  adds it, ``VETTED``);
* :meth:`Observation.unvetted` - what torch did that the allowlist does not cover: a global
  that resolved to an object that is not allowlisted, a Python function called directly by the
  unpickler that is not allowlisted code (nor a method of an allowlisted class), a TorchScript
  dispatch, a module imported that no allowlisted global explains, a suspicious audit event, a
  marker file. Empty means: torch ran only allowlisted code on this input.

The test process never loads anything itself: it only reads the children's JSON records.
"""

from __future__ import annotations

import _compat_pickle
import atexit
import contextlib
import functools
import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHILD = HERE / "oracle_child.py"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MEM_EXTRA = 4 << 30  # bytes a load may map on top of the warm interpreter


def allowlist() -> frozenset[str]:
    """The names ckpttool's policy lets pass as safe (read from ``ckpttool.unpickling.lists``)."""
    from ckpttool.unpickling import lists

    names = set(lists.TORCH_ALLOWED) | set(lists.TORCH_ON_IMPORT) | set(lists.DATA_ALLOWED)
    names |= set(lists.PLAIN_TYPES) | set(getattr(lists, "TORCH_CONSTANTS", ()))
    names |= set(getattr(lists, "VETTED", None) or ())
    return frozenset(names)


@functools.lru_cache(maxsize=1)
def _allowed() -> frozenset[str]:
    return allowlist()


@functools.lru_cache(maxsize=1)
def _allowed_packages() -> frozenset[str]:
    return frozenset(n.split(".")[0] for n in _allowed())


def canonical(name: str) -> str:
    """A global as the loader resolves it: Python 2 names mapped, torch's ``torch.tensor``."""
    mod, _, attr = name.rpartition(".")
    if (mod, attr) in _compat_pickle.NAME_MAPPING:
        mod, attr = _compat_pickle.NAME_MAPPING[(mod, attr)]
    mod = _compat_pickle.IMPORT_MAPPING.get(mod, mod)
    mod = {"torch.tensor": "torch._tensor"}.get(mod, mod)
    return f"{mod}.{attr}"


@dataclass
class Observation:
    """What torch's loader did with one input (see the module docstring)."""

    path: str
    kind: str
    resolved_globals: list[str]  # "module.name" as the pickle spelled it, in order
    calls: list[str]  # "module.qualname" of Python functions the unpickler called directly
    audit_events: list[str]  # suspicious audit events ("event: details")
    marker_hit: bool  # a watched folder got a new or changed entry
    loaded_ok: bool
    error: str | None
    global_owners: dict[str, str | None] = field(default_factory=dict)  # -> allowlisted name
    call_owners: dict[str, str | None] = field(default_factory=dict)
    imports: list[str] = field(default_factory=list)  # modules first imported by the load
    dispatched: list[str] = field(default_factory=list)  # e.g. "torch.jit.load"
    new_files: list[str] = field(default_factory=list)
    timed_out: bool = False
    seconds: float = 0.0
    traceback: str = ""

    @classmethod
    def from_record(cls, path: str, rec: dict[str, Any]) -> Observation:
        owners: dict[str, str | None] = {}
        for name, owner in rec.get("globals", []):
            if owners.get(name) is None:
                owners[name] = owner
        call_owners: dict[str, str | None] = {}
        for name, owner in rec.get("calls", []):
            if call_owners.get(name) is None:
                call_owners[name] = owner
        new_files = list(rec.get("new_files", []))
        return cls(
            path=path,
            kind=rec.get("kind", "?"),
            resolved_globals=[g for g, _ in rec.get("globals", [])],
            calls=[c for c, _ in rec.get("calls", [])],
            audit_events=list(rec.get("events", [])),
            marker_hit=bool(new_files),
            loaded_ok=bool(rec.get("loaded_ok")),
            error=rec.get("error"),
            global_owners=owners,
            call_owners=call_owners,
            imports=list(rec.get("imports", [])),
            dispatched=list(rec.get("dispatched", [])),
            new_files=new_files,
            timed_out=bool(rec.get("timed_out")),
            seconds=float(rec.get("wall", 0.0)),
            traceback=rec.get("traceback", ""),
        )

    # -- judging against the allowlist -----------------------------------------------------
    def unvetted_globals(self) -> list[str]:
        """Globals torch resolved (or tried to) to something that is not allowlisted (a name
        on the allowlist that does not exist here, ``pathlib._local`` before Python 3.13, is
        not: torch failed to import it and ran nothing)."""
        allowed = _allowed()
        return [
            g
            for g, owner in self.global_owners.items()
            if owner is None and g not in allowed and canonical(g) not in allowed
        ]

    def unvetted_calls(self) -> list[str]:
        return [c for c, owner in self.call_owners.items() if owner is None]

    def unexplained_imports(self) -> list[str]:
        """Modules imported that neither a global the pickle names nor the allowlist's own
        packages explain (torch and numpy import their internals lazily)."""
        mods = {g.rsplit(".", 1)[0] for g in self.resolved_globals}
        tops = _allowed_packages()
        return [
            m
            for m in self.imports
            if m.split(".")[0] not in tops
            and not any(x == m or x.startswith(m + ".") for x in mods)
        ]

    def unvetted(self) -> list[str]:
        """What torch did beyond the allowlist (the rules' evidence); empty: only allowlisted
        globals were resolved, nothing was dispatched to TorchScript, no module outside the
        allowlist's packages was imported, no suspicious audit event, no marker.

        Calls are not evidence of their own: every Python function the unpickler can reach
        comes from a global (judged above), a method of an allowlisted class, or C code of an
        allowlisted callable calling its own helpers (``numpy.dtype`` calls
        ``numpy._core._internal.npy_ctypes_check``); they are shown by :meth:`describe`."""
        out = [f"global {g}" for g in self.unvetted_globals()]
        out += [f"dispatch {d}" for d in self.dispatched]
        out += [f"import {m}" for m in self.unexplained_imports()]
        out += [f"audit {e}" for e in self.audit_events]
        out += [f"marker {p}" for p in self.new_files]
        return out

    @property
    def reached_no_global(self) -> bool:
        """torch failed before resolving any global (it could not read the file that far)."""
        return not self.resolved_globals and not self.dispatched and not self.loaded_ok

    def describe(self) -> str:
        head = "loaded" if self.loaded_ok else f"failed ({self.error})"
        bad = self.unvetted()
        out = f"torch {self.kind}: {head}; " + (
            "beyond the allowlist: " + "; ".join(bad[:8]) if bad else "only allowlisted code"
        )
        calls = self.unvetted_calls()
        return out + (f" (calls outside the allowlist: {', '.join(calls[:6])})" if calls else "")


# -- the warm children ------------------------------------------------------------------------
class _Child:
    def __init__(self, setup: dict[str, Any]) -> None:
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(":")
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
            bufsize=1,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(setup) + "\n")
        self.proc.stdin.flush()
        hello = self.proc.stdout.readline()
        if not hello:
            raise RuntimeError("the torch oracle's child did not start")
        self.torch_version = json.loads(hello)["torch"]

    def ask(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the torch oracle's child died")
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()


_ROOT = "\u2983ROOT\u2984"


def _torch_version() -> str:
    try:
        from importlib.metadata import version

        return version("torch")
    except Exception:
        return "?"


def _digest(path: Path, root: bytes | None = None) -> str:
    """The content of a file or folder, ``root`` (a folder's path) replaced by a placeholder."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode() + b"\0")
        try:
            data = p.read_bytes() if p.is_file() else b"not a file: " + str(p).encode()
        except OSError as exc:
            data = f"unreadable: {exc}".encode()
        if root:
            data = data.replace(root, _ROOT.encode())
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


class Oracle:
    """Warm children that load inputs with torch; use as a context manager or ``close()``."""

    def __init__(
        self,
        workers: int = 1,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_root: str | os.PathLike[str] | None = None,
    ) -> None:
        """``cache_dir``: keep records there, keyed by the input's bytes (and the oracle's own
        source, the allowlist, torch's version); ``cache_root``: the folder generated inputs are
        built in, replaced by a placeholder in keys and records so that a payload embedding its
        marker's path hits the cache from one session's temporary folder to the next."""
        self.allowed = sorted(allowlist())
        self.setup = {"allowlist": self.allowed, "sys_path": [str(REPO)]}
        self.workers = max(1, workers)
        self._children: list[_Child] = []
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.cache_root = str(Path(cache_root).resolve()) if cache_root else None
        salt = hashlib.sha256(CHILD.read_bytes() + "\n".join(self.allowed).encode())
        salt.update(f"{sys.executable} {_torch_version()}".encode())
        self._salt = salt.hexdigest()[:16]

    def _child(self, i: int) -> _Child:
        while len(self._children) <= i:
            self._children.append(_Child(self.setup))
        return self._children[i]

    def close(self) -> None:
        for c in self._children:
            c.close()
        self._children.clear()

    def __enter__(self) -> Oracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def observe_many(
        self,
        paths: Iterable[str | os.PathLike[str]],
        kind: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        watch: Sequence[str | os.PathLike[str]] | None = None,
        mem_extra: int = DEFAULT_MEM_EXTRA,
        kinds: Sequence[str | None] | None = None,
        sys_paths: Sequence[Sequence[str]] | None = None,
    ) -> list[Observation]:
        """One observation per path, in order. ``watch``: folders to list for markers besides
        each input's own folder and a fresh working directory; ``kinds``: a loader per path
        (overrides ``kind``); ``sys_paths``: folders of modules the victim has installed, per
        path (prepended to ``sys.path`` for that load)."""
        reqs = []
        for i, p in enumerate(paths):
            p = Path(p)
            dirs = {str(p.parent.resolve()), *(str(Path(w).resolve()) for w in watch or ())}
            if p.is_dir():
                dirs.add(str(p.resolve()))
            reqs.append(
                {
                    "id": i,
                    "path": str(p),
                    "kind": kinds[i] if kinds and kinds[i] else kind,
                    "timeout": timeout,
                    "watch": sorted(dirs),
                    "mem_extra": mem_extra,
                    "sys_path": [str(x) for x in (sys_paths[i] if sys_paths else ())],
                }
            )
        records = self._cached(reqs)
        return [Observation.from_record(r["path"], records[r["id"]]) for r in reqs]

    def _key(self, req: dict[str, Any]) -> str | None:
        if self.cache_dir is None:
            return None
        root = self.cache_root.encode() if self.cache_root else None
        path = self._placeholder(req["path"])
        digest = [_digest(Path(p), root) for p in [req["path"], *req["sys_path"]]]
        key = f"{self._salt}:{req['kind']}:{float(req['timeout'])}:{path}:{digest}"
        key += self._placeholder(str(req["sys_path"]))
        return hashlib.sha256(key.encode()).hexdigest()

    def _placeholder(self, text: str, back: bool = False) -> str:
        if not self.cache_root:
            return text
        a, b = self.cache_root, _ROOT
        return text.replace(b, a) if back else text.replace(a, b)

    def _cached(self, reqs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        todo: list[dict[str, Any]] = []
        keys: dict[int, str | None] = {}
        for r in reqs:
            keys[r["id"]] = k = self._key(r)
            hit = self.cache_dir / f"{k}.json" if k and self.cache_dir else None
            if hit is not None and hit.is_file():
                out[r["id"]] = json.loads(self._placeholder(hit.read_text(), back=True))
            else:
                todo.append(r)
        for rid, rec in self._run(todo).items():
            out[rid] = rec
            k = keys[rid]
            if k and self.cache_dir and not rec.get("timed_out"):
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                tmp = self.cache_dir / f"{k}.{os.getpid()}.tmp"
                tmp.write_text(self._placeholder(json.dumps(rec)))
                tmp.replace(self.cache_dir / f"{k}.json")
        return out

    def _run(self, reqs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
        if not reqs:
            return {}
        n = min(self.workers, len(reqs))
        if n == 1:
            child = self._child(0)
            return {r["id"]: child.ask(r) for r in reqs}
        work: queue.Queue[dict[str, Any]] = queue.Queue()
        for r in reqs:
            work.put(r)
        out: dict[int, dict[str, Any]] = {}
        errors: list[BaseException] = []
        children = [self._child(i) for i in range(n)]

        def serve(child: _Child) -> None:
            try:
                while True:
                    try:
                        r = work.get_nowait()
                    except queue.Empty:
                        return
                    out[r["id"]] = child.ask(r)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=serve, args=(c,)) for c in children]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out

    def observe(
        self,
        path: str | os.PathLike[str],
        kind: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Observation:
        return self.observe_many([path], kind=kind, timeout=timeout)[0]


_DEFAULT: Oracle | None = None


def _default() -> Oracle:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Oracle()
        atexit.register(_DEFAULT.close)
    return _DEFAULT


def observe(
    path: str | os.PathLike[str], kind: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> Observation:
    """Load one input with torch in a child process; see :class:`Observation`.

    ``kind``: ``torch`` (``torch.load(weights_only=False, map_location='cpu')``), ``dcp``
    (``dcp_to_torch_save`` of a folder), ``numpy`` (``np.load(allow_pickle=True)``) or ``pickle``
    (``pickle.load``); by default from the input (a folder is DCP, ``.npy``/``.npz`` numpy).
    """
    return _default().observe(path, kind=kind, timeout=timeout)


def observe_many(
    paths: Iterable[str | os.PathLike[str]],
    kind: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[Observation]:
    """:func:`observe` for many inputs through one warm child (one fork per input)."""
    return _default().observe_many(paths, kind=kind, timeout=timeout)
