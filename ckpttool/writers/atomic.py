"""All-or-nothing output: write to a temp file beside the target, fsync, then rename.

A failed, interrupted (Ctrl-C, SIGTERM) or refused write leaves no partial file and never
touches an existing output. Only SIGKILL can leave a ``.*.ckpttool-tmp`` file behind (it is
never renamed into place, so the target stays intact).
"""

from __future__ import annotations

import contextlib
import errno
import os
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


def check_target(
    src: str | list[str], dst: str, *, force: bool, in_place: bool, is_dir: bool = False
) -> None:
    """Refuse outputs that would clobber something without being asked to."""
    sources = [src] if isinstance(src, str) else src
    for s in sources:
        if os.path.exists(dst) and _same_file(s, dst) and not in_place:
            raise CheckpointError(dst, "output is the input file; pass --in-place to replace it")
    if os.path.isdir(dst) and not is_dir:
        raise CheckpointError(dst, "output is a directory; give a file name")
    if (
        os.path.lexists(dst)
        and not force
        and not (in_place and any(_same_file(s, dst) for s in sources))
    ) and not (is_dir and os.path.isdir(dst) and not os.listdir(dst)):
        raise CheckpointError(dst, "output exists; pass --force to replace it")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise CheckpointError(dst, f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CheckpointError(dst, f"permission denied: cannot write in {parent}")


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
    """Yield a temp path beside ``dst``; on success fsync it and rename it over ``dst``."""
    parent = os.path.dirname(os.path.abspath(dst))
    try:
        fd, tmp = tempfile.mkstemp(
            prefix="." + os.path.basename(dst) + ".", suffix=TMP_SUFFIX, dir=parent
        )
    except OSError as exc:
        raise CheckpointError(dst, describe_os_error(exc)) from None
    os.close(fd)
    done = False
    try:
        with interrupts_as_errors(dst):
            try:
                yield tmp
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.chmod(tmp, 0o666 & ~_umask())
                os.replace(tmp, dst)
                done = True
            except OSError as exc:
                raise CheckpointError(dst, describe_os_error(exc)) from None
        _fsync_dir(parent)
    finally:
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(dst: str) -> Iterator[str]:
    """Yield a temp folder beside ``dst``; on success it replaces ``dst`` (all or nothing)."""
    import shutil

    parent = os.path.dirname(os.path.abspath(dst))
    try:
        tmp = tempfile.mkdtemp(
            prefix="." + os.path.basename(dst) + ".", suffix=TMP_SUFFIX, dir=parent
        )
    except OSError as exc:
        raise CheckpointError(dst, describe_os_error(exc)) from None
    done = False
    old: str | None = None
    try:
        with interrupts_as_errors(dst):
            try:
                yield tmp
                for name in os.listdir(tmp):
                    fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                os.chmod(tmp, 0o777 & ~_umask())
                if os.path.lexists(dst):
                    old = tempfile.mkdtemp(prefix=".old.", suffix=TMP_SUFFIX, dir=parent)
                    os.rmdir(old)
                    os.rename(dst, old)
                os.rename(tmp, dst)
                done = True
            except OSError as exc:
                if old is not None and not os.path.lexists(dst):
                    os.rename(old, dst)
                    old = None
                raise CheckpointError(dst, describe_os_error(exc)) from None
        _fsync_dir(parent)
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(old)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
