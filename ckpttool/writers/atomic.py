"""All-or-nothing output: write to a temp file beside the target, fsync, then rename.

A failed, interrupted (SIGINT, SIGTERM, SIGHUP) or refused write leaves no partial file and
never touches an existing output. Only SIGKILL (or a power cut) can leave a ``.*.ckpttool-tmp``
file behind (it is never renamed into place, so the target stays intact). Every temp file and
folder is registered while it exists (:func:`remove_temps` removes what an interruption left).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Iterator

from .. import signals
from ..errors import CheckpointError, InterruptedWriteError
from .weight_sets import _check_set, _same_file, displaced_set, is_shard_output

TMP_SUFFIX = ".ckpttool-tmp"


def resolve_output(dst: str) -> str:
    """Write through a symbolic link to its target, as ``cp`` does (never replace the link)."""
    return os.path.realpath(dst) if os.path.islink(dst) else dst


def check_target(
    sources: str | list[str],
    dst: str,
    *,
    force: bool,
    in_place: bool | None,
    is_dir: bool = False,
) -> None:
    """Refuse outputs that would clobber something without being asked to.

    ``sources`` are every file the input is made of (an index and its shards); ``in_place`` is
    None for commands that have no ``--in-place`` option. Shards written into a folder replace
    its ``model.safetensors`` and a ``model.safetensors`` written into a folder of shards
    replaces them (with ``force``): never two weight sets side by side.
    """
    files = [sources] if isinstance(sources, str) else list(sources)
    shown, dst = dst, resolve_output(dst)  # messages name the path the user gave
    same = any(os.path.exists(dst) and _same_file(s, dst) for s in files)
    if same and not in_place:
        remedy = "in_place" if in_place is not None else None
        raise CheckpointError(shown, "output is the input file", remedy=remedy)
    if is_dir:
        if os.path.lexists(dst) and not os.path.isdir(dst):
            raise CheckpointError(shown, "output exists and is not a folder")
        if os.path.isdir(dst):
            replaced = [n for n in os.listdir(dst) if is_shard_output(n)]
            _check_set(shown, files, dst, replaced, force, shards=True)
    else:
        if os.path.isdir(dst):
            raise CheckpointError(shown, "output is a directory; give a file name")
        if os.path.lexists(dst) and not force and not same:
            raise CheckpointError(shown, "output exists", remedy="force")
        folder = os.path.dirname(os.path.abspath(dst))
        _check_set(shown, files, folder, displaced_set(dst), force, shards=False)
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise CheckpointError(shown, f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        if _read_only(parent):  # EROFS: no permission would help
            raise CheckpointError(shown, f"read-only filesystem: cannot write in {parent}")
        raise CheckpointError(shown, f"permission denied: cannot write in {parent}")


def _read_only(folder: str) -> bool:
    """Whether ``folder`` lies on a filesystem mounted read-only."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def describe_os_error(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "disk full while writing; nothing was written"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded while writing; nothing was written"
    if exc.errno == errno.EFBIG:
        return "file too large for this filesystem or limit; nothing was written"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied; nothing was written"
    if exc.errno == errno.EROFS:
        return "read-only filesystem; nothing was written"
    return f"write failed ({exc.strerror or exc}); nothing was written"


# -- interruptions -----------------------------------------------------------------------
# Temp files and folders of the writes in progress (path -> "file" or "dir"), so that the
# command line can remove them even if a signal cut an unwinding short, and the outputs this
# process has renamed into place (an interruption after that must not say "nothing written").
_live: dict[str, str] = {}
_written: list[str] = []


def _new_file(folder: str, prefix: str, suffix: str) -> tuple[int, str]:
    """A new empty file of an unused name in ``folder``, open for reading and writing, only by
    its owner: ``tempfile.mkstemp`` without importing ``tempfile`` (with ``random`` and
    ``shutil``: ~3 ms of a short command)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = os.path.join(folder, f"{prefix}{os.urandom(6).hex()}{suffix}")
        try:
            return os.open(path, flags, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", folder)


def _mkdtemp(*, prefix: str, suffix: str, dir: str) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=dir)


def _forget(path: str) -> None:
    """Remove a registered temp file or folder (quietly) and drop it from the registry."""
    kind = _live.pop(path, None)
    if kind == "dir":
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    elif kind == "file":
        with contextlib.suppress(OSError):
            os.unlink(path)


def remove_temps() -> None:
    """Remove the temp files and folders of every write still in progress (last first)."""
    for path in reversed(list(_live)):
        _forget(path)


def written_outputs() -> list[str]:
    """The outputs this process has renamed into place so far (their resolved paths)."""
    return list(_written)


@contextlib.contextmanager
def interrupts_as_errors(dst: str) -> Iterator[None]:
    """Make SIGINT/SIGTERM/SIGHUP unwind the write so that the cleanup below runs.

    Under the command line's policy (``signals.install``) signals already raise
    :class:`~ckpttool.signals.Interrupted`, which is let through. Called from a library, the
    signals are caught for the duration of the block only (those the program ignores stay
    ignored) and become :class:`~ckpttool.errors.InterruptedWriteError`.
    """
    if signals.installed():
        yield
        return
    signals.reset()
    before = len(_written)
    old: dict[signal.Signals, object] = {}
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        for sig in signals.SIGNALS:
            previous = signals.handle(sig)
            if previous is not None:
                old[sig] = previous
    try:
        yield
    except (signals.Interrupted, KeyboardInterrupt):
        if dst in _written[before:]:  # the signal came once this output was in place
            raise InterruptedWriteError(dst, "interrupted after the output was written") from None
        raise InterruptedWriteError(dst, "interrupted; nothing was written") from None
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)  # type: ignore[arg-type]


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(dst: str, *, weight_set: bool = False) -> Iterator[str]:
    """Yield a temp path beside ``dst``; on success fsync it and rename it over ``dst``.

    A symbolic link at ``dst`` is written through (its target is replaced). Signals are held
    while the temp file is created and registered, while it is renamed into place, and while
    it is removed after a failure, so none of these is ever half done. ``weight_set``: the
    output is a Hugging Face folder's ``model.safetensors``, which replaces the sharded set
    beside it (:func:`displaced_set`) in the same step.
    """
    dst = resolve_output(dst)
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise CheckpointError(dst, f"output folder {parent} does not exist")
    tmp: str | None = None
    try:
        with interrupts_as_errors(dst):
            try:
                with signals.held():
                    fd, tmp = _new_file(parent, "." + os.path.basename(dst) + ".", TMP_SUFFIX)
                    _live[tmp] = "file"
                os.close(fd)
                yield tmp
                _fsync(tmp)
                os.chmod(tmp, 0o666 & ~_umask())
                with signals.held():
                    signals.check()  # one swallowed on its way still stops the commit
                    displaced = displaced_set(dst) if weight_set else []
                    old = _commit_file(tmp, dst, parent, displaced)
                    _live.pop(tmp, None)
                    _written.append(dst)
                    if old is not None:
                        _forget(old)
            except OSError as exc:
                raise CheckpointError(dst, describe_os_error(exc)) from None
        _fsync_dir(parent)
    finally:
        if tmp is not None and tmp in _live:
            with signals.held():
                _forget(tmp)


def _commit_file(tmp: str, dst: str, parent: str, displaced: list[str]) -> str | None:
    """Rename ``tmp`` over ``dst``, first moving the ``displaced`` files of ``parent`` into a
    temp folder (returned, to be removed); on an OS error put them back."""
    if not displaced:
        os.replace(tmp, dst)
        return None
    old = _mkdtemp(prefix=".old.", suffix=TMP_SUFFIX, dir=parent)
    _live[old] = "dir"
    moved: list[str] = []
    try:
        for name in displaced:
            os.rename(os.path.join(parent, name), os.path.join(old, name))
            moved.append(name)
        os.replace(tmp, dst)
    except OSError:
        for name in moved:
            os.rename(os.path.join(old, name), os.path.join(parent, name))
        _forget(old)
        raise
    return old


@contextlib.contextmanager
def atomic_shards(dst: str) -> Iterator[str]:
    """Yield a temp folder for new shards; on success they replace the old shards in ``dst``.

    ``dst`` is created if missing. Other files in it (``config.json``, the input) are never
    touched; previous shards and index are replaced as a set: moved aside, the new files moved
    in, then the old ones deleted, with SIGINT/SIGTERM/SIGHUP held meanwhile. On failure
    ``dst`` is as it was (and removed again if this call created it).
    """
    made: list[str] = []  # registered temp folders (and dst if this call created it)
    try:
        with interrupts_as_errors(dst):
            try:
                with signals.held():
                    if not os.path.isdir(dst):
                        os.mkdir(dst)
                        _live[dst] = "dir"
                        made.append(dst)
                    tmp = _mkdtemp(prefix=".shards.", suffix=TMP_SUFFIX, dir=dst)
                    _live[tmp] = "dir"
                    made.append(tmp)
                yield tmp
                new = sorted(os.listdir(tmp))
                for name in new:
                    _fsync(os.path.join(tmp, name))
                with signals.held():
                    signals.check()  # one swallowed on its way still stops the commit
                    old = _mkdtemp(prefix=".old.", suffix=TMP_SUFFIX, dir=dst)
                    _live[old] = "dir"
                    made.append(old)
                    _replace_shards(dst, tmp, old, new)
                    _live.pop(dst, None)  # committed: dst stays even if this call made it
                    _written.append(dst)
            except OSError as exc:
                raise CheckpointError(dst, describe_os_error(exc)) from None
        _fsync_dir(dst)
    finally:
        with signals.held():
            for path in reversed(made):
                _forget(path)


@contextlib.contextmanager
def atomic_folder(dst: str) -> Iterator[str]:
    """Yield a temp folder beside ``dst``; on success its files are synced and it replaces
    ``dst`` as a whole (a previous ``dst`` is moved aside, then deleted).

    Used for outputs that are a folder of their own (a DCP checkpoint). The caller has checked
    that replacing an existing ``dst`` is wanted. On failure ``dst`` is as it was.
    """
    dst = os.path.abspath(resolve_output(dst))
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        raise CheckpointError(dst, f"output folder {parent} does not exist")
    made: list[str] = []
    try:
        with interrupts_as_errors(dst):
            try:
                with signals.held():
                    prefix = "." + os.path.basename(dst) + "."
                    tmp = _mkdtemp(prefix=prefix, suffix=TMP_SUFFIX, dir=parent)
                    _live[tmp] = "dir"
                    made.append(tmp)
                os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
                yield tmp
                for name in sorted(os.listdir(tmp)):
                    _fsync(os.path.join(tmp, name))
                _fsync_dir(tmp)
                with signals.held():
                    signals.check()  # one swallowed on its way still stops the commit
                    if os.path.lexists(dst):
                        old = _mkdtemp(prefix=prefix, suffix=TMP_SUFFIX, dir=parent)
                        _live[old] = "dir"
                        made.append(old)
                        os.rename(dst, os.path.join(old, "old"))
                        try:
                            os.rename(tmp, dst)
                        except OSError:
                            os.rename(os.path.join(old, "old"), dst)
                            raise
                    else:
                        os.rename(tmp, dst)
                    _live.pop(tmp, None)
                    _written.append(dst)
            except OSError as exc:
                raise CheckpointError(dst, describe_os_error(exc)) from None
        _fsync_dir(parent)
    finally:
        with signals.held():
            for path in reversed(made):
                _forget(path)


def _replace_shards(dst: str, tmp: str, old: str, new: list[str]) -> None:
    """Move the shards in ``dst`` into ``old``, then ``new`` from ``tmp`` into ``dst``; on an
    OS error put everything back as it was."""
    moved: list[str] = []
    try:
        for name in sorted(os.listdir(dst)):
            if is_shard_output(name):
                os.rename(os.path.join(dst, name), os.path.join(old, name))
                moved.append(name)
        for name in new:  # the index comes last in sorted order
            os.rename(os.path.join(tmp, name), os.path.join(dst, name))
    except OSError:
        for name in new:
            if os.path.exists(os.path.join(dst, name)) and name not in moved:
                os.unlink(os.path.join(dst, name))
        for name in moved:
            os.rename(os.path.join(old, name), os.path.join(dst, name))
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
