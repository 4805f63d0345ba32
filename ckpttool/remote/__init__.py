"""Checkpoints at a URL, read by range requests: ``https://``, ``hf://``, ``s3://``, ``gs://``.

Needs the ``remote`` extra (``pip install 'ckpttool[remote]'``: fsspec and aiohttp, s3fs,
huggingface_hub; gcsfs for ``gs://``). :func:`open_remote` gives one shared
:class:`~.cache.RemoteSource` per URL for the whole process, so the scanner, the reader and a
writer read the same version of the file through one cache; :func:`traffic` counts what that
cost (bytes received and requests made, per URL).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError, shown
from .cache import RemoteSource

__all__ = ["RemoteSource", "Traffic", "is_folder", "list_files", "open_remote", "traffic"]


@dataclass
class Traffic:
    """What reading remote inputs cost so far: bytes received and requests, per URL."""

    bytes: int = 0
    requests: int = 0
    per_url: dict[str, list[int]] = field(default_factory=dict)  # url -> [bytes, requests]

    def count(self, url: str, nbytes: int) -> None:
        url = shown(url)  # a presigned URL's signature is not reported
        with _lock:
            self.bytes += nbytes
            self.requests += 1
            entry = self.per_url.setdefault(url, [0, 0])
            entry[0] += nbytes
            entry[1] += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "bytes": self.bytes,
            "requests": self.requests,
            "files": [
                {"url": u, "bytes": b, "requests": r} for u, (b, r) in self.per_url.items()
            ],
        }


_lock = threading.Lock()
_traffic = Traffic()
_sources: dict[str, RemoteSource] = {}


def traffic() -> Traffic:
    """The bytes and requests remote reads have cost in this process."""
    return _traffic


def reset() -> None:
    """Forget every open source and count from zero (tests, long-lived processes)."""
    global _traffic
    from . import tree

    with _lock:
        _sources.clear()
        _traffic = Traffic()
    tree.reset()


def _backend(url: str) -> Any:
    try:
        scheme = url.split("://", 1)[0].lower()
        if scheme in ("http", "https"):
            from .http import HttpBackend

            return HttpBackend(url, _count)
        from . import stores

        if scheme in ("s3", "s3a"):
            return stores.S3Backend(url, _count)
        if scheme == "hf":
            return stores.HfBackend(url, _count)
        return stores.FsspecBackend(url, _count)
    except ImportError as exc:
        raise CheckpointError(
            url,
            f"reading URLs needs the remote extra ({exc.name or exc} is missing): "
            "pip install 'ckpttool[remote]'",
        ) from None


def _count(url: str, nbytes: int) -> None:
    _traffic.count(url, nbytes)


def open_remote(url: str) -> RemoteSource:
    """The shared source for ``url`` (its size and version are read on first use)."""
    with _lock:
        found = _sources.get(url)
    if found is not None:
        return found
    source = RemoteSource(url, _backend(url))
    with _lock:
        return _sources.setdefault(url, source)


def list_files(url: str) -> list[str]:
    """Every file under a folder URL: a Hub repo (or a folder of one), an S3 prefix, an HTTP
    folder with an index page. Empty when the URL is a file."""
    return list(_backend(url).list_files())


def is_folder(url: str) -> bool:
    """Whether ``url`` names a folder (a Hub repo root, a prefix, a URL ending in ``/``)."""
    if url.endswith("/"):
        return True
    if url.lower().startswith("hf://"):
        from .stores import hf_filesystem

        try:
            return bool(hf_filesystem().isdir(url))
        except Exception:
            return False
    if url.lower().startswith(("s3://", "gs://", "gcs://")):
        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(url)
            return bool(fs.isdir(path))
        except ImportError as exc:
            raise CheckpointError(url, f"needs the remote extra ({exc.name})") from None
        except Exception:
            return False
    return False
