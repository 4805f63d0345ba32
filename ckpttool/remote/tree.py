"""Folders at a URL: which files they hold, for the readers of folders of shards.

A local folder is listed by the kernel; a folder URL is listed once per process, the way its
store lists: a bucket prefix (S3, GCS) and a Hub repository by their APIs, an HTTP folder by
its index page (nginx ``autoindex``, ``python -m http.server``). An HTTP server without index
pages cannot be listed: its files are then derived from what a save itself says, by the hook
the readers set (:func:`derive_with`; ``readers/remote_files.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..errors import CheckpointError
from .errors import NotFound

_lock = threading.Lock()
_trees: dict[str, frozenset[str]] = {}  # folder URL (no trailing "/") -> relative file paths

_derive: Callable[[str, Callable[[str], bool]], set[str]] | None = None


def reset() -> None:
    with _lock:
        _trees.clear()


def exists(url: str) -> bool:
    """Whether the store has a file at ``url`` (one ``HEAD`` the first time; a missing file is
    False, any other failure raises)."""
    from . import open_remote

    try:
        open_remote(url)
    except NotFound:
        return False
    return True


def _root_of(url: str) -> str | None:
    """The listed folder ``url`` lies in (or is), the deepest one."""
    url = url.rstrip("/")
    with _lock:
        roots = [r for r in _trees if url == r or url.startswith(r + "/")]
    return max(roots, key=len) if roots else None


def files(folder: str) -> frozenset[str]:
    """Every file under a folder URL, as paths relative to it (listed once per process)."""
    root = folder.rstrip("/")
    with _lock:
        found = _trees.get(root)
    if found is not None:
        return found
    names = frozenset(_list(root))
    with _lock:
        return _trees.setdefault(root, names)


def _list(root: str) -> set[str]:
    from . import list_files

    scheme = root.split("://", 1)[0].lower()
    try:
        listed = list_files(root + "/")
    except CheckpointError:
        if scheme not in ("http", "https"):
            raise
        listed = []  # no index page: derived from the save's own files
    names = {u[len(root) + 1 :] for u in listed if u.startswith(root + "/")}
    if not names and scheme in ("http", "https") and _derive is not None:
        names = _derive(root, exists)
    return names


def derive_with(derive: Callable[[str, Callable[[str], bool]], set[str]]) -> None:
    """How the files of a folder that cannot be listed are found: ``derive(root, exists)``
    (the readers of folders of shards set it: see ``readers/remote_files.py``)."""
    global _derive
    _derive = derive


def isfile(url: str) -> bool:
    root = _root_of(url)
    if root is None:
        return exists(url)
    return url[len(root) + 1 :] in files(root) if url != root else False


def isdir(url: str) -> bool:
    """Whether ``url`` is a folder: one of a listed folder's sub-folders, or a URL its store
    calls a folder (an HTTP URL ending in ``/``, a prefix, a Hub repository or folder)."""
    root = _root_of(url)
    if root is not None:
        rel = url.rstrip("/")[len(root) + 1 :]
        return not rel or any(n.startswith(rel + "/") for n in files(root))
    from . import is_folder

    if not is_folder(url):
        return False
    files(url)  # listed now: what lies under it is answered from the listing
    return True


def listdir(url: str) -> list[str]:
    """The names directly inside a folder URL (files and sub-folders)."""
    root = _root_of(url) or url.rstrip("/")
    rel = url.rstrip("/")[len(root) + 1 :]
    prefix = rel + "/" if rel else ""
    return sorted({n[len(prefix) :].split("/", 1)[0] for n in files(root) if n.startswith(prefix)})


def walk(folder: str) -> list[str]:
    """Every file under a folder URL, as URLs."""
    root = _root_of(folder) or folder.rstrip("/")
    rel = folder.rstrip("/")[len(root) + 1 :]
    prefix = rel + "/" if rel else ""
    return sorted(f"{root}/{n}" for n in files(root) if n.startswith(prefix))
