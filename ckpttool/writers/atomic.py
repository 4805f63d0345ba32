"""All-or-nothing output: write to a temp file beside the target, fsync, then rename.

A failed, interrupted (Ctrl-C, SIGTERM) or refused write leaves no partial file and never
touches an existing output. Only SIGKILL can leave a ``.*.ckpttool-tmp`` file behind (it is
never renamed into place, so the target stays intact).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import tempfile
from collections.abc import Iterator
from types import FrameType

from ..errors import CheckpointError, InterruptedWriteError

TMP_SUFFIX = ".ckpttool-tmp"


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def resolve_output(dst: str) -> str:
    """Write through a symbolic link to its target, as ``cp`` does (never replace the link)."""
    return os.path.realpath(dst) if os.path.islink(dst) else dst


_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json")


def is_shard_output(name: str) -> bool:
    """A file that ``to-safetensors --max-shard-size`` writes (and replaces with --force)."""
    return _SHARD.fullmatch(name) is not None


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
    None for commands that have no ``--in-place`` option.
    """
    files = [sources] if isinstance(sources, str) else list(sources)
    shown, dst = dst, resolve_output(dst)  # messages name the path the user gave
    same = any(os.path.exists(dst) and _same_file(s, dst) for s in files)
    if same and not in_place:
        hint = "; pass --in-place to replace it" if in_place is not None else ""
        raise CheckpointError(shown, f"output is the input file{hint}")
    if is_dir:
        if os.path.lexists(dst) and not os.path.isdir(dst):
            raise CheckpointError(shown, "output exists and is not a folder")
        if os.path.isdir(dst):
            replaced = [n for n in os.listdir(dst) if is_shard_output(n)]
            if any(_same_file(s, os.path.join(dst, n)) for s in files for n in replaced):
                raise CheckpointError(shown, "output is the input file")
            if replaced and not force:
                raise CheckpointError(shown, "output exists; pass --force to replace it")
    else:
        if os.path.isdir(dst):
            raise CheckpointError(shown, "output is a directory; give a file name")
        if os.path.lexists(dst) and not force and not same:
            raise CheckpointError(shown, "output exists; pass --force to replace it")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise CheckpointError(shown, f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CheckpointError(shown, f"permission denied: cannot write in {parent}")


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


@contextlib.contextmanager
def interrupts_as_errors(dst: str) -> Iterator[None]:
    """Turn SIGINT/SIGTERM into an exception so the cleanup below runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise InterruptedWriteError(dst, "interrupted; nothing was written")

    old: dict[int, object] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        old = {}
    try:
        yield
    except KeyboardInterrupt:
        raise InterruptedWriteError(dst, "interrupted; nothing was written") from None
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)  # type: ignore[arg-type]


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the output is renamed into place: a commit is never half done.

    A signal that arrives meanwhile is delivered after the block (the write has then finished).
    """
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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
def atomic_file(dst: str) -> Iterator[str]:
    """Yield a temp path beside ``dst``; on success fsync it and rename it over ``dst``.

    A symbolic link at ``dst`` is written through (its target is replaced).
    """
    dst = resolve_output(dst)
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise CheckpointError(dst, f"output folder {parent} does not exist")
    tmp: str | None = None
    committed = False
    try:
        with interrupts_as_errors(dst):
            try:
                fd, tmp = tempfile.mkstemp(
                    prefix="." + os.path.basename(dst) + ".", suffix=TMP_SUFFIX, dir=parent
                )
                os.close(fd)
                yield tmp
                _fsync(tmp)
                os.chmod(tmp, 0o666 & ~_umask())
                with _signals_held():
                    os.replace(tmp, dst)
                    committed = True
            except OSError as exc:
                raise CheckpointError(dst, describe_os_error(exc)) from None
        _fsync_dir(parent)
    finally:
        if not committed and tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_shards(dst: str) -> Iterator[str]:
    """Yield a temp folder for new shards; on success they replace the old shards in ``dst``.

    ``dst`` is created if missing. Other files in it (``config.json``, the input) are never
    touched; previous shards and index are replaced as a set: moved aside, the new files moved
    in, then the old ones deleted, with SIGINT/SIGTERM held meanwhile. On failure ``dst`` is as
    it was (and removed again if this call created it).
    """
    import shutil

    created = False
    tmp: str | None = None
    old: str | None = None
    committed = False
    try:
        with interrupts_as_errors(dst):
            try:
                if not os.path.isdir(dst):
                    os.mkdir(dst)
                    created = True
                tmp = tempfile.mkdtemp(prefix=".shards.", suffix=TMP_SUFFIX, dir=dst)
                yield tmp
                new = sorted(os.listdir(tmp))
                for name in new:
                    _fsync(os.path.join(tmp, name))
                with _signals_held():
                    old = tempfile.mkdtemp(prefix=".old.", suffix=TMP_SUFFIX, dir=dst)
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
                    committed = True
            except OSError as exc:
                raise CheckpointError(dst, describe_os_error(exc)) from None
        _fsync_dir(dst)
    finally:
        for folder in (tmp, old):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        if created and not committed:
            shutil.rmtree(dst, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
