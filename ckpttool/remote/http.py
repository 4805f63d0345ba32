"""``https://`` (and ``http://``): range requests through fsspec's HTTP filesystem session.

Requests go through the aiohttp session of fsspec's ``HTTPFileSystem`` (its proxies and client
settings), but the status and headers of every answer are read here: a ``200`` to a range
request (a server that ignores ``Range``) is closed before its body is read, and every answer
must carry the ETag and size the file had when it was first seen (``If-Match`` is sent too).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..errors import CheckpointError
from . import errors
from .errors import Stat


class HttpBackend:
    """One file at an ``http(s)://`` URL."""

    def __init__(self, url: str, count: Any) -> None:
        import fsspec

        self.url = url
        self.count = count  # count(url, nbytes): one request made
        self.fs = fsspec.filesystem("https" if url.startswith("https") else "http")
        self.etag: str | None = None
        self.size = -1

    def _run(self, coro: Any, *args: Any) -> Any:
        from fsspec.asyn import sync

        try:
            return sync(self.fs.loop, coro, *args)
        except CheckpointError:
            raise
        except (asyncio.TimeoutError, TimeoutError):
            raise errors.timed_out(self.url) from None
        except Exception as exc:  # aiohttp's connection and payload errors, DNS failures...
            raise errors.lost(self.url, exc) from None

    async def _request(self, method: str, headers: dict[str, str]) -> tuple[int, Any, bytes]:
        """(status, headers, body); the body is read only for a 206, or a 200 to a GET that
        asked for no range."""
        import aiohttp

        session = await self.fs.set_session()
        limit = errors.timeout()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=limit, sock_read=limit)
        headers = {"Accept-Encoding": "identity", **headers}
        async with session.request(
            method, self.url, headers=headers, timeout=timeout, allow_redirects=True
        ) as r:
            body = b""
            wanted = r.status == 206 or (r.status == 200 and "Range" not in headers)
            if method == "GET" and wanted:
                body = await r.read()
            elif method == "GET":
                r.close()  # do not download what was not asked for
            return r.status, r.headers, body

    def stat(self) -> Stat:
        status, headers, _ = self._run(self._request, "HEAD", {})
        self.count(self.url, 0)
        if status in (405, 501):  # no HEAD: ask for the first byte instead
            return self._stat_by_get()
        if status >= 400:
            raise errors.status_error(self.url, status)
        length = headers.get("Content-Length")
        if length is None:
            return self._stat_by_get()
        self.size = int(length)
        self.etag = headers.get("ETag")
        return Stat(self.size, self.etag, headers.get("Accept-Ranges", "") != "none")

    def _stat_by_get(self) -> Stat:
        status, headers, _ = self._run(self._request, "GET", {"Range": "bytes=0-0"})
        self.count(self.url, 1)
        if status == 200:
            raise errors.no_ranges(self.url, int(headers.get("Content-Length", "-1")))
        if status != 206:
            raise errors.status_error(self.url, status)
        self.size = _total(headers)
        self.etag = headers.get("ETag")
        return Stat(self.size, self.etag)

    def fetch(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file, in one request."""
        headers = {"Range": f"bytes={start}-{end - 1}"}
        if self.etag and not self.etag.startswith("W/"):  # If-Match compares strong tags only
            headers["If-Match"] = self.etag
        status, got, body = self._run(self._request, "GET", headers)
        self.count(self.url, len(body))
        if status == 200:
            if start == 0 and end >= self.size and len(body) == self.size:
                return body  # the whole file was asked for
            raise errors.no_ranges(self.url, self.size)
        if status != 206:
            raise errors.status_error(self.url, status)
        if self.etag and got.get("ETag") not in (None, self.etag):
            raise errors.changed(self.url)
        if _total(got) not in (-1, self.size):
            raise errors.changed(self.url, "its size changed")
        if len(body) != end - start:
            raise errors.changed(self.url, "a range came back short")
        return body

    def list_files(self) -> list[str]:
        """Files under a folder URL, from its HTML index pages (fsspec's HTTP ``ls`` reads
        their links; only links below the folder are followed, 8 levels at most)."""
        root = self.url.rstrip("/") + "/"
        files: list[str] = []
        todo = [(root, 0)]
        while todo:
            folder, depth = todo.pop()
            try:
                entries = self.fs.ls(folder, detail=True)
            except Exception as exc:
                raise errors.lost(folder, exc) from None
            self.count(folder, 0)
            for e in entries:
                name = str(e["name"])
                if not name.startswith(root) or name.rstrip("/") == folder.rstrip("/"):
                    continue
                if e.get("type") == "directory" and depth < 8:
                    todo.append((name.rstrip("/") + "/", depth + 1))
                elif e.get("type") != "directory":
                    files.append(name)
        return sorted(files)


def _total(headers: Any) -> int:
    """The file size a ``Content-Range: bytes a-b/N`` header names (-1 when absent)."""
    value = headers.get("Content-Range", "")
    total = value.rpartition("/")[2]
    return int(total) if total.isdigit() else -1
