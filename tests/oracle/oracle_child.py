"""The oracle's child process: loads checkpoints the way torch does and records what happened.

Run as a script by :mod:`tests.oracle.torch_oracle` (never imported by the test process). It
imports torch once, installs three recorders, warms torch's lazy imports up, then serves
requests: one JSON line on stdin per input, one JSON line back per input. Each input is loaded
in a fresh ``fork()`` of this warm process, so a payload that runs cannot touch the next input,
and a hang or a crash costs one input.

The recorders:

* ``pickle.Unpickler`` / ``pickle.load`` / ``pickle.loads`` become :class:`RecordingUnpickler`,
  a subclass of the C ``_pickle.Unpickler``. torch's loaders subclass ``pickle_module.Unpickler``
  (``pickle`` by default), DCP's ``.metadata`` and numpy's object arrays call ``pickle.load``, so
  every pickle they read goes through it. Its per-instance ``find_class`` is the outermost one,
  so a global is recorded as the pickle spells it, before torch's ``load_module_mapping`` and
  before Python 2 name mapping, together with the allowlisted name of the object it resolved
  to, if any (``owner``).
* ``sys.setprofile``: every Python function the unpickler calls directly (its frame's caller is
  the frame that called ``Unpickler.load``), as ``module.qualname``, with its ``owner``: the
  allowlisted name whose code it is, or whose class (or instance) it was called on.
* ``sys.addaudithook``: imports of modules not yet imported, ``exec``/``compile`` outside the
  import machinery, processes, sockets, ``ctypes``, file-system changes and ``open`` of files
  other than the input, the interpreter's own files and the loader's output. Process creation,
  network access, deletions and writes outside the scratch folders are recorded and then
  refused (``PermissionError``): the oracle watches payloads, it does not let them loose.

Markers: a payload that writes a file is seen by listing the watched folders (the input's
folder, a fresh working directory) before and after the load; a new or changed entry is a hit.
"""

from __future__ import annotations

import _pickle
import contextlib
import io
import json
import os
import pickle
import resource
import select
import shutil
import signal
import sys
import tempfile
import time
import traceback
from typing import Any

HERE = os.path.abspath(__file__)
_TORCH_SERIALIZATION = os.path.join("torch", "serialization.py")
# the unpickler reads its file through these methods; file objects of these stdlib modules
# (tar and zip members) are Python code
_READS = frozenset(["read", "readline", "readinto", "peek", "read1", "readinto1"])
_FILE_MODULES = frozenset(["tarfile.py", "zipfile.py", "_pyio.py", "gzip.py", "bz2.py"])
_MAX_LIST = 400  # entries kept per record list
_BLOCK_PREFIXES = (
    "os.system",
    "os.exec",
    "os.spawn",
    "os.posix_spawn",
    "os.fork",
    "os.forkpty",
    "os.kill",
    "os.killpg",
    "subprocess.Popen",
    "pty.spawn",
    "socket.",
    "webbrowser.open",
    "urllib.Request",
    "http.client.connect",
    "ftplib.",
    "smtplib.",
    "os.remove",
    "os.unlink",
    "os.rmdir",
    "os.rename",
    "os.truncate",
    "os.chmod",
    "os.chown",
    "os.symlink",
    "os.link",
    "shutil.rmtree",
    "shutil.move",
    "ctypes.dlopen",
    "ctypes.call_function",
    "sys.addaudithook",
    "sys.settrace",
    "sys.setprofile",
)
# Audit events that every load raises and that say nothing about the pickle.
_NOISE = frozenset(
    [
        "sys._getframe",
        "sys._getframemodulename",
        "pickle.find_class",
        "object.__getattr__",
        "builtins.id",
        "os.getenv",
        "time.sleep",
        "gc.collect",
        "sys.excepthook",
        "sys.unraisablehook",
    ]
)


class _State:
    def __init__(self) -> None:
        self.on = False
        self.in_hook = False
        self.globals: list[list[Any]] = []  # [spelled, owner]
        self.calls: list[list[Any]] = []  # [module.qualname, owner]
        self.events: list[str] = []
        self.imports: list[str] = []
        self.dispatched: list[str] = []
        self.load_frames: list[Any] = []
        self.read_ok: tuple[str, ...] = ()  # path prefixes the loader may read
        self.write_ok: tuple[str, ...] = ()  # ... and write (the scratch and watched folders)
        self.allowed_objects: dict[int, str] = {}  # id(obj) -> allowlisted name
        self.allowed_codes: dict[int, str] = {}  # id(code) -> allowlisted name
        self.keep: list[Any] = []  # keeps allowlisted objects alive (their ids stay valid)
        self.scratch: list[str] = []  # folders torch's own loader made (mkdtemp)
        self.files: set[int] = set()  # ids of the file objects the unpicklers read


State = _State()


def _add(lst: list[Any], item: Any) -> None:
    if len(lst) < _MAX_LIST:
        lst.append(item)


def _short(x: Any, n: int = 160) -> str:
    try:
        s = repr(x)
    except Exception:  # a payload's object may not repr
        s = f"<{type(x).__name__}>"
    return s if len(s) <= n else s[: n - 3] + "..."


# --- the recording unpickler -----------------------------------------------------------------
def _owner_of_object(obj: Any, name: Any) -> str | None:
    owner = State.allowed_objects.get(id(obj))
    if owner is not None:
        return owner
    st = getattr(sys.modules.get("torch.serialization"), "StorageType", None)
    if st is not None and isinstance(obj, st):  # torch maps any "...Storage" name by itself
        return f"torch.{name}"
    return None


class RecordingUnpickler(_pickle.Unpickler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if args:  # the unpickler calls its file's read/readline/readinto/peek
            State.files.add(id(args[0]))
            State.keep.append(args[0])
        inner = self.find_class  # the most derived class's (torch's UnpicklerWrapper)

        def find_class(module: Any, name: Any) -> Any:
            spelled = f"{module}.{name}" if isinstance(module, str) else f"{module!r}.{name!r}"
            rec = [spelled, None]
            if State.on:
                _add(State.globals, rec)
            obj = inner(module, name)
            rec[1] = _owner_of_object(obj, name)
            return obj

        self.find_class = find_class  # type: ignore[method-assign]

    def load(self) -> Any:
        State.load_frames.append(sys._getframe())
        try:
            return super().load()
        finally:
            State.load_frames.pop()


def _pickle_load(file: Any, **kw: Any) -> Any:
    return RecordingUnpickler(file, **kw).load()


def _pickle_loads(data: Any, /, **kw: Any) -> Any:
    return RecordingUnpickler(io.BytesIO(data), **kw).load()


# --- the call tracer ---------------------------------------------------------------------------
def _call_owner(frame: Any) -> str | None:
    code = frame.f_code
    name = State.allowed_codes.get(id(code))
    if name is not None:
        return name
    if code.co_filename.endswith(_TORCH_SERIALIZATION) and code.co_name in (
        "persistent_load",
        "find_class",
    ):
        return f"torch.serialization.{code.co_name}"
    if code.co_argcount or code.co_posonlyargcount:
        first = frame.f_locals.get(code.co_varnames[0])
        if code.co_name in _READS and (
            id(first) in State.files or os.path.basename(code.co_filename) in _FILE_MODULES
        ):
            return "reading the input"
        # a metaclass's method (EnumType.__call__) on an allowed class
        owner = State.allowed_objects.get(id(first))
        if owner is not None and isinstance(first, type) and _method_of(code, type(first)):
            return owner
    return None


def _method_of(code: Any, klass: type) -> bool:
    for k in klass.__mro__:
        for v in vars(k).values():
            if getattr(getattr(v, "__func__", v), "__code__", None) is code:
                return True
    return False


def _profile(frame: Any, event: str, arg: Any) -> None:
    if event != "call" or not State.load_frames or frame.f_back is not State.load_frames[-1]:
        return
    code = frame.f_code
    if code.co_filename == HERE:
        return
    mod = frame.f_globals.get("__name__", "?")
    qual = getattr(code, "co_qualname", code.co_name)
    _add(State.calls, [f"{mod}.{qual}", _call_owner(frame)])


# --- the audit hook ----------------------------------------------------------------------------
def _in_import_machinery() -> bool:
    f = sys._getframe(2)
    while f is not None:
        fn = f.f_code.co_filename
        if fn.startswith("<frozen importlib"):
            return True
        f = f.f_back
    return False


def _called_from_ast_parse() -> bool:
    f = sys._getframe(2)
    for _ in range(4):
        if f is None:
            return False
        if f.f_code.co_name == "parse" and f.f_code.co_filename.endswith("ast.py"):
            return True
        f = f.f_back
    return False


def _path_ok(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p.rstrip(os.sep) + os.sep) for p in prefixes)


def _open_event(args: tuple[Any, ...]) -> str | None:
    path, mode, flags = [*args, None, None, None][:3]
    if isinstance(path, int) or path is None:
        return None
    p = os.path.realpath(os.fsdecode(path))
    if isinstance(mode, str):
        writes = any(c in mode for c in "wax+")
    else:
        flags = flags or 0
        writes = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
    if _path_ok(p, State.write_ok) or (not writes and _path_ok(p, State.read_ok)):
        return None
    if _in_import_machinery() and not writes:
        return None
    return f"open: {p} ({'write' if writes else 'read'})"


_HELPER_FILES = frozenset(
    ["tempfile.py", "shutil.py", "contextlib.py", "os.py", "tarfile.py", "posixpath.py"]
)
# file-system events torch's tar loader makes: (index of the path, index of its dir_fd)
_FS_EVENTS: dict[str, tuple[int, int | None]] = {
    "tempfile.mkdtemp": (0, None),
    "os.mkdir": (0, 2),
    "open": (0, None),
    "os.chmod": (0, 2),
    "os.utime": (0, 3),
    "os.chown": (0, 3),
    "os.symlink": (1, 2),
    "os.link": (1, 3),
    "os.scandir": (0, None),
    "os.listdir": (0, None),
    "os.remove": (0, 1),
    "os.rmdir": (0, 1),
    "shutil.rmtree": (0, 1),
}


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _event_path(x: Any, dir_fd: Any = None, follow: bool = True) -> str | None:
    """The absolute path an event acts on (``x`` a path, a descriptor, or a name in dir_fd);
    ``follow=False``: the last component stays a link (removing a link is not its target)."""
    if isinstance(x, int):
        return _fd_path(x) if x >= 0 else None
    if not isinstance(x, (str, bytes, os.PathLike)):
        return None
    p = os.fsdecode(x)
    if not os.path.isabs(p) and isinstance(dir_fd, int) and dir_fd >= 0:
        p = os.path.join(_fd_path(dir_fd), p)
    if follow:
        return os.path.realpath(p)
    return os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(p))), os.path.basename(p))


def _by_torch() -> bool:
    """The running event comes from torch.serialization's own code, through stdlib helpers."""
    f = sys._getframe(1)
    while f is not None and f.f_code.co_filename == HERE:
        f = f.f_back
    while f is not None and os.path.basename(f.f_code.co_filename) in _HELPER_FILES:
        f = f.f_back
    return f is not None and f.f_code.co_filename.endswith(
        os.path.join("torch", "serialization.py")
    )


def _torch_scratch(event: str, args: tuple[Any, ...]) -> bool:
    """torch's pre-1.0 tar loader extracts members into a ``mkdtemp`` folder, reads them and
    removes the folder: those events are torch's own (a link member pointing outside is not)."""
    where = _FS_EVENTS.get(event)
    if where is None or len(args) <= where[0] or not _by_torch():
        return False
    i, fd = where
    follow = event in ("open", "os.scandir", "os.listdir")  # reading goes through links
    p = _event_path(args[i], args[fd] if fd is not None and fd < len(args) else None, follow)
    if p is None:
        return False
    if event == "tempfile.mkdtemp":
        State.scratch.append(p)
        return True
    if event == "os.mkdir" and os.path.dirname(p) == os.path.realpath(tempfile.gettempdir()):
        return True  # the mkdir of that mkdtemp (raised before its own event)
    ok = tuple(State.scratch)
    if event == "os.link" and not _path_ok(_event_path(args[0], args[2]) or "", ok):
        return False  # a hard link to a file outside the folder
    return _path_ok(p, ok)


def _judge_event(event: str, args: tuple[Any, ...]) -> str | None:
    """The record for one audit event, or None when it says nothing about the input."""
    if event in _NOISE or _torch_scratch(event, args):
        return None
    if event == "import":
        mod = args[0] if args else None
        if isinstance(mod, str) and mod not in sys.modules and mod not in State.imports:
            _add(State.imports, mod)
        return None
    if event == "open":
        return _open_event(args)
    if event in ("exec", "compile", "marshal.loads", "marshal.load", "code.__new__"):
        if _in_import_machinery() or (event == "compile" and _called_from_ast_parse()):
            return None
        return f"{event}: {_short(args[0] if args else None, 120)}"
    if event in ("os.listdir", "os.scandir", "os.walk", "glob.glob") and (
        _in_import_machinery()
        or (
            args
            and _path_ok(_event_path(args[0] if args[0] is not None else ".") or "", State.read_ok)
        )
    ):
        return None
    if event in ("os.mkdir", "os.makedirs") and args:
        p = _event_path(args[0])
        if (p and _path_ok(p, State.write_ok)) or _in_import_machinery():
            return None
    if event == "object.__setattr__" and _in_import_machinery():
        return None
    return f"{event}: {_short(args)}"


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not State.on or State.in_hook:
        return
    State.in_hook = True
    try:
        rec = _judge_event(event, args)
    except Exception as exc:  # a bug of the oracle's: visible, never silent
        rec = f"oracle hook error on {event}: {type(exc).__name__}: {exc}"
    try:
        if rec is not None:
            _add(State.events, rec)
    finally:
        State.in_hook = False
    if rec is not None and (
        event.startswith(_BLOCK_PREFIXES) or (event == "open" and "(write)" in rec)
    ):
        raise PermissionError(f"refused by the torch oracle: {event}")


# --- loaders -----------------------------------------------------------------------------------
def _load_torch(path: str, out_dir: str) -> Any:
    import torch

    return torch.load(path, weights_only=False, map_location="cpu")


def _load_jit(path: str, out_dir: str) -> Any:
    import torch

    return torch.jit.load(path, map_location="cpu")


def _load_dcp(path: str, out_dir: str) -> Any:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = path if os.path.isdir(path) else os.path.dirname(path)
    dcp_to_torch_save(folder, os.path.join(out_dir, "dcp_to_torch_save.pt"))
    return None


def _load_numpy(path: str, out_dir: str) -> Any:
    import numpy as np

    got = np.load(path, allow_pickle=True)
    if hasattr(got, "files"):  # an NpzFile unpickles each member on access
        try:
            return {k: got[k] for k in got.files}
        finally:
            got.close()
    return got


def _load_pickle(path: str, out_dir: str) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


LOADERS = {
    "torch": _load_torch,
    "jit": _load_jit,
    "dcp": _load_dcp,
    "numpy": _load_numpy,
    "pickle": _load_pickle,
}


def kind_of(path: str) -> str:
    """The loader torch users reach for with this input."""
    if os.path.isdir(path):
        return "dcp"
    low = path.lower()
    if low.endswith((".npy", ".npz")):
        return "numpy"
    if os.path.basename(path) == ".metadata":
        return "pickle"
    try:
        with open(path, "rb") as f:
            if f.read(6) == b"\x93NUMPY":
                return "numpy"
    except OSError:
        pass
    return "torch"


# --- one input, in a fork -------------------------------------------------------------------
def _snapshot(dirs: list[str]) -> dict[str, tuple[int, int]]:
    snap: dict[str, tuple[int, int]] = {}
    for d in dirs:
        try:
            with os.scandir(d) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    snap[e.path] = (st.st_mtime_ns, st.st_size)
        except OSError:
            continue
    return snap


def _run_in_grandchild(req: dict[str, Any], wfd: int, cwd: str, out_dir: str) -> None:
    path = os.path.abspath(req["path"])
    kind = req.get("kind") or kind_of(path)
    res: dict[str, Any] = {"kind": kind, "loaded_ok": False, "error": None, "result_type": None}
    try:
        os.chdir(cwd)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        extra = req.get("mem_extra")
        if extra:  # on top of what the warm interpreter (torch and all) already maps
            with open("/proc/self/statm") as f:
                mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (mapped + extra, mapped + extra))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 30, 1 << 30))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        real = os.path.realpath(path)
        sys_path = [os.path.realpath(p) for p in req.get("sys_path", ())]
        sys.path[:0] = sys_path  # the victim has these modules installed
        folder = os.path.dirname(real) if kind == "dcp" else real
        State.read_ok = (real, folder, *sys_path, *_LIB_ROOTS)
        State.write_ok = (cwd, out_dir, *req.get("watch", ()))
        import warnings

        warnings.simplefilter("ignore")
        soft = float(req.get("timeout", 60)) * 0.8  # then the record still gets out

        def _soft_timeout(signum: int, frame: Any) -> None:
            res["timed_out"] = True
            raise TimeoutError(f"timeout: the oracle stopped the load after {soft:g} s")

        signal.signal(signal.SIGALRM, _soft_timeout)
        signal.setitimer(signal.ITIMER_REAL, soft)
        t0 = time.monotonic()
        sys.setprofile(_profile)
        State.on = True
        try:
            obj = LOADERS[kind](path, out_dir)
            res["loaded_ok"] = True
            res["result_type"] = type(obj).__module__ + "." + type(obj).__qualname__
        except BaseException as exc:  # what torch raised is part of the observation
            res["error"] = f"{type(exc).__name__}: {_short(str(exc), 300)}"
            res["traceback"] = "".join(traceback.format_exception(exc, limit=-6))[-2500:]
        finally:
            State.on = False
            sys.setprofile(None)
            signal.setitimer(signal.ITIMER_REAL, 0)
        res["seconds"] = round(time.monotonic() - t0, 4)
    except BaseException as exc:  # the recorders themselves failed
        res["error"] = f"oracle: {type(exc).__name__}: {_short(str(exc), 300)}"
    res.update(
        globals=State.globals,
        calls=State.calls,
        events=State.events,
        imports=State.imports,
        dispatched=State.dispatched,
    )
    try:
        data = json.dumps(res, default=str).encode()
    except Exception as exc:
        data = json.dumps({"error": f"oracle: unserialisable result: {exc}"}).encode()
    view = memoryview(data)
    while view:
        n = os.write(wfd, view)
        view = view[n:]
    os.close(wfd)


def observe_one(req: dict[str, Any]) -> dict[str, Any]:
    """Fork, load ``req['path']`` in the fork, collect its record (JSON-able)."""
    timeout = float(req.get("timeout", 60))
    cwd = tempfile.mkdtemp(prefix="oracle-cwd-")
    out_dir = tempfile.mkdtemp(prefix="oracle-out-")
    watched = [cwd, *req.get("watch", ())]
    before = _snapshot(watched)
    rfd, wfd = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the grandchild
        try:
            os.close(rfd)
            _run_in_grandchild(req, wfd, cwd, out_dir)
        finally:
            os._exit(0)
    os.close(wfd)
    chunks, timed_out = [], False
    deadline = t0 + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([rfd], [], [], left)
        if not ready:
            continue
        chunk = os.read(rfd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(rfd)
    after = _snapshot(watched)
    try:
        res = json.loads(b"".join(chunks)) if chunks else {}
    except ValueError:
        res = {}
    if not res:
        res = {"loaded_ok": False, "globals": [], "calls": [], "events": [], "imports": []}
        if timed_out:
            res["error"] = f"timeout: no result after {timeout:g} s"
        elif os.WIFSIGNALED(status):
            res["error"] = f"crash: the loader died of signal {os.WTERMSIG(status)}"
        else:
            code = os.waitstatus_to_exitcode(status)
            res["error"] = f"crash: the loader exited with status {code}"
    res["timed_out"] = timed_out or bool(res.get("timed_out"))
    res["new_files"] = sorted(p for p, st in after.items() if before.get(p) != st)
    res["wall"] = round(time.monotonic() - t0, 4)
    shutil.rmtree(cwd, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    return res


# --- set-up ------------------------------------------------------------------------------------
_LIB_ROOTS: tuple[str, ...] = ()


def _resolve(name: str) -> Any:
    import importlib

    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except Exception:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise LookupError(name)


def _allow(names: list[str]) -> None:
    """Resolve every allowlisted name: its object (and, for a class, its methods' code)."""
    for name in names:
        try:
            obj = _resolve(name)
        except Exception:
            continue
        State.keep.append(obj)
        State.allowed_objects.setdefault(id(obj), name)
        code = getattr(obj, "__code__", None)
        if code is not None:
            State.allowed_codes.setdefault(id(code), name)
        if isinstance(obj, type):
            for klass in obj.__mro__:
                if klass is object:
                    continue
                for v in vars(klass).values():
                    fn = getattr(v, "__func__", v)
                    c = getattr(fn, "__code__", None)
                    if c is not None:
                        State.keep.append(c)
                        State.allowed_codes.setdefault(id(c), name)


def _warm_up() -> None:
    """Import what torch imports lazily on a first load: a fork's imports are then the input's."""
    import numpy as np
    import torch
    import torch.distributed.checkpoint.filesystem
    import torch.distributed.checkpoint.format_utils
    import torch.jit

    real_jit_load = torch.jit.load

    def jit_load(*args: Any, **kwargs: Any) -> Any:
        if State.on:
            _add(State.dispatched, "torch.jit.load")
        return real_jit_load(*args, **kwargs)

    torch.jit.load = jit_load
    # safetensors: torch.load hands *.safetensors to it; sympy and fsspec: slow to import,
    # and a pickle reaches them only through globals, which are recorded whether imported or not
    for mod in ("safetensors.torch", "sympy", "fsspec"):
        with contextlib.suppress(Exception):
            __import__(mod)
    tmp = tempfile.mkdtemp(prefix="oracle-warm-")
    try:
        sd = {"w": torch.arange(4.0), "p": torch.nn.Parameter(torch.ones(2)), "n": np.arange(2)}
        for zip_ in (True, False):
            p = os.path.join(tmp, f"w{zip_}.pt")
            torch.save(sd, p, _use_new_zipfile_serialization=zip_)
            torch.load(p, weights_only=False, map_location="cpu")
        p = os.path.join(tmp, "a.npy")
        np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        np.load(p, allow_pickle=True)
        p = os.path.join(tmp, "a.npz")
        np.savez(p, a=np.array([{"a": 1}], dtype=object), b=np.arange(3))
        _load_numpy(p, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    global _LIB_ROOTS
    # the protocol runs over a private copy of stdout: whatever a payload prints goes elsewhere
    proto_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    setup = json.loads(sys.stdin.readline())
    sys.path[:0] = setup.get("sys_path", [])
    pickle.Unpickler = RecordingUnpickler  # type: ignore[misc]
    pickle.load = _pickle_load  # type: ignore[assignment]
    pickle.loads = _pickle_loads  # type: ignore[assignment]
    _warm_up()
    _allow(setup.get("allowlist", []))
    import site

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages()}
    roots |= {os.path.realpath(r) for r in roots} | {"/dev/null", "/dev/urandom", "/proc/self"}
    roots |= {os.path.realpath(p) for p in setup.get("read_ok", [])}
    _LIB_ROOTS = tuple(sorted(roots))
    sys.addaudithook(_audit)
    proto_out.write(json.dumps({"ready": True, "torch": sys.modules["torch"].__version__}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            res = observe_one(req)
        except Exception as exc:  # keep serving: one bad request is one failed record
            res = {"error": f"oracle: {type(exc).__name__}: {exc}", "loaded_ok": False}
        res["id"] = req.get("id")
        proto_out.write(json.dumps(res, default=str) + "\n")


if __name__ == "__main__":
    main()
