"""Object stores and the Hub: ``s3://`` (s3fs), ``hf://`` (huggingface_hub), any other fsspec URL.

Credentials come from where each library looks (AWS environment, profile or instance role;
``HF_TOKEN`` or the token ``hf auth login`` saved); ckpttool never prints or stores them. Every
read is pinned to the version first seen: an S3 ``VersionId`` or ``If-Match`` on its ETag, a Hub
commit (the revision named is resolved to its commit once), a Cloud Storage generation.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import CheckpointError
from . import errors
from .errors import Stat


def _mapped(url: str, exc: BaseException) -> CheckpointError:
    """A library's exception as one line (its text may hold URLs or keys: not shown)."""
    text = str(exc)
    if isinstance(exc, FileNotFoundError):
        return errors.status_error(url, 404)
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return errors.status_error(url, 403)
    if "PreconditionFailed" in text or "412" in text:
        return errors.changed(url)
    if "InvalidRange" in text or "416" in text:
        return errors.status_error(url, 416)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return errors.status_error(url, status)
    if isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__:
        return errors.timed_out(url)
    return errors.lost(url, exc)


class S3Backend:
    """One object in S3 (or an S3-compatible store: ``AWS_ENDPOINT_URL_S3``)."""

    def __init__(self, url: str, count: Any) -> None:
        import fsspec

        self.url, self.count = url, count
        self.fs = fsspec.filesystem("s3")
        self.bucket, self.key, self.version_id = self.fs.split_path(url)
        self.etag: str | None = None
        self.size = -1

    def stat(self) -> Stat:
        try:
            info = self.fs.info(self.url, refresh=True)
        except Exception as exc:
            raise _mapped(self.url, exc) from None
        self.count(self.url, 0)
        if info.get("type") == "directory":
            raise CheckpointError(self.url, "is a folder (a prefix), not a checkpoint file")
        self.size = int(info["size"])
        self.etag = info.get("ETag")
        self.version_id = self.version_id or info.get("VersionId")
        return Stat(self.size, self.version_id or self.etag)

    async def _get(self, start: int, end: int) -> tuple[bytes, str | None]:
        kw: dict[str, Any] = {"Range": f"bytes={start}-{end - 1}"}
        if self.version_id:
            kw["VersionId"] = self.version_id
        elif self.etag:
            kw["IfMatch"] = self.etag
        resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key, **kw)
        try:
            return await resp["Body"].read(), resp.get("ETag")
        finally:
            resp["Body"].close()

    def fetch(self, start: int, end: int) -> bytes:
        from fsspec.asyn import sync

        try:
            body, etag = sync(self.fs.loop, self._get, start, end)
        except Exception as exc:
            raise _mapped(self.url, exc) from None
        self.count(self.url, len(body))
        if self.etag and etag not in (None, self.etag):
            raise errors.changed(self.url)
        if len(body) != end - start:
            raise errors.changed(self.url, "a range came back short")
        return bytes(body)

    def list_files(self) -> list[str]:
        try:
            found = self.fs.find(self.url.rstrip("/"))
        except Exception as exc:
            raise _mapped(self.url, exc) from None
        self.count(self.url, 0)
        return sorted("s3://" + f for f in found)


_PINNED: dict[tuple[Any, ...], str] = {}  # (endpoint, type, repo, revision) -> commit


def hf_filesystem() -> Any:
    from huggingface_hub import HfFileSystem

    # read here, not at import: the endpoint may be set after huggingface_hub was imported
    return HfFileSystem(endpoint=os.environ.get("HF_ENDPOINT") or None)


class HfBackend:
    """One file of a Hub repository, ``hf://[datasets/]org/name[@revision]/path``."""

    def __init__(self, url: str, count: Any) -> None:
        self.url, self.count = url, count
        self.fs = hf_filesystem()
        try:
            self.resolved = self.fs.resolve_path(url)
        except Exception as exc:
            raise _mapped(url, exc) from None
        self.count(url, 0)
        self.commit: str | None = None
        self.size = -1

    def _pin(self) -> str:
        """The commit the revision names now (asked once per repo and revision in a process):
        every read is of that commit."""
        r = self.resolved
        key = (self.fs.endpoint, r.repo_type, r.repo_id, r.revision)
        if key not in _PINNED:
            try:
                info = self.fs._api.repo_info(
                    r.repo_id, repo_type=r.repo_type, revision=r.revision
                )
            except Exception as exc:
                raise _mapped(self.url, exc) from None
            self.count(self.url, 0)
            _PINNED[key] = str(info.sha or r.revision)
        return _PINNED[key]

    def stat(self) -> Stat:
        self.commit = self._pin()
        r = self.resolved
        try:
            info = self.fs._api.get_paths_info(
                r.repo_id, [r.path_in_repo], repo_type=r.repo_type, revision=self.commit
            )
        except Exception as exc:
            raise _mapped(self.url, exc) from None
        self.count(self.url, 0)
        if not info or getattr(info[0], "size", None) is None:
            what = "is a folder, not a checkpoint file" if info else "no such file (HTTP 404)"
            raise CheckpointError(self.url, what)
        self.size = int(info[0].size)
        return Stat(self.size, self.commit)

    def fetch(self, start: int, end: int) -> bytes:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session

        r = self.resolved
        url = hf_hub_url(
            r.repo_id,
            r.path_in_repo,
            repo_type=r.repo_type,
            revision=self.commit,
            endpoint=self.fs.endpoint,
        )
        headers = {**build_hf_headers(token=self.fs.token), "Range": f"bytes={start}-{end - 1}"}
        session = get_session()
        try:
            with session.stream("GET", url, headers=headers, timeout=errors.timeout()) as resp:
                status = resp.status_code
                body = resp.read() if status == 206 else b""
        except Exception as exc:
            raise _mapped(self.url, exc) from None
        self.count(self.url, len(body))
        if status == 200:
            raise errors.no_ranges(self.url, self.size)
        if status != 206:
            raise errors.status_error(self.url, status)
        if len(body) != end - start:
            raise errors.changed(self.url, "a range came back short")
        return body

    def list_files(self) -> list[str]:
        r = self.resolved
        root = self.url.rstrip("/")
        commit = self._pin()
        base = f"{r.repo_id}@{commit}"
        if r.repo_type != "model":
            base = f"{r.repo_type}s/{base}"
        try:
            found = self.fs.find(base + ("/" + r.path_in_repo if r.path_in_repo else ""))
        except Exception as exc:
            raise _mapped(self.url, exc) from None
        self.count(self.url, 0)
        prefix = base + "/" + (r.path_in_repo + "/" if r.path_in_repo else "")
        return sorted(root + "/" + f[len(prefix) :] for f in found if f.startswith(prefix))


def _protocols(fs: Any) -> set[str]:
    proto = getattr(fs, "protocol", ())
    return {proto} if isinstance(proto, str) else set(proto)


class FsspecBackend:
    """Any other fsspec URL (``gs://`` through gcsfs, ...): ``cat_file`` ranges. A ``gs://``
    object is read at the generation first seen (an object replaced meanwhile is no longer
    found at it: "changed"); others get no pinning beyond a size check."""

    def __init__(self, url: str, count: Any) -> None:
        import fsspec

        self.url, self.count = url, count
        try:
            self.fs, self.path = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise CheckpointError(url, f"cannot be read: {exc}") from None
        self.size = -1
        self.generation: str | None = None

    def stat(self) -> Stat:
        try:
            info = self.fs.info(self.path)
        except Exception as exc:
            raise _mapped(self.url, exc) from None
        self.count(self.url, 0)
        if info.get("type") == "directory":
            raise CheckpointError(self.url, "is a folder, not a checkpoint file")
        self.size = int(info["size"])
        if info.get("generation") and _protocols(self.fs) & {"gs", "gcs"}:
            self.generation = str(info["generation"])
        tag = info.get("generation") or info.get("etag") or info.get("ETag")
        return Stat(self.size, str(tag) if tag else None)

    def fetch(self, start: int, end: int) -> bytes:
        pin = {"generation": self.generation} if self.generation else {}
        try:
            body = self.fs.cat_file(self.path, start=start, end=end, **pin)
        except FileNotFoundError:
            if self.size < 0:
                raise errors.status_error(self.url, 404) from None
            raise errors.changed(self.url, "it was replaced or deleted") from None
        except Exception as exc:
            raise _mapped(self.url, exc) from None
        self.count(self.url, len(body))
        if len(body) != end - start:
            raise errors.changed(self.url, "a range came back short")
        return bytes(body)

    def list_files(self) -> list[str]:
        try:
            found = self.fs.find(self.path)
        except Exception as exc:
            raise _mapped(self.url, exc) from None
        self.count(self.url, 0)
        proto = self.url.split("://", 1)[0]
        return sorted(f"{proto}://{f}" for f in found)
