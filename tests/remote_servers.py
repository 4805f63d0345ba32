"""Servers on loopback for the remote-input tests: an HTTP file server that honours ``Range``
(and can be told to ignore it, change its ETag mid-read or die mid-read), a fake Hugging Face
Hub endpoint over the same files, and moto's S3 server. Nothing here reaches the internet."""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Behaviour:
    """What the server does wrong, set by a test."""

    def __init__(self) -> None:
        self.ignore_range = False
        self.change_etag_after: int | None = None  # ranged GETs served before the ETag changes
        self.die_after: int | None = None  # ranged GETs served before the server dies mid-body
        self.status: int | None = None  # answer every request with this status
        self.delay = 0.0  # seconds each request waits first (a round trip to a real server)
        self.no_index = False  # folders have no index page (404), as on most object stores' CDNs
        self.gets = 0
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range)


class _Handler(BaseHTTPRequestHandler):
    server: Any
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    # -- files ---------------------------------------------------------------------------
    def _file(self, rel: str) -> Path | None:
        root: Path = self.server.root
        p = (root / rel).resolve()
        return p if p.is_file() and root.resolve() in p.parents else None

    def _etag(self, p: Path) -> str:
        b: Behaviour = self.server.behaviour
        st = p.stat()
        version = "v2" if b.change_etag_after is not None and b.gets > b.change_etag_after else "v1"
        return '"' + hashlib.sha1(f"{p}:{st.st_size}:{version}".encode()).hexdigest()[:16] + '"'

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_POST(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        b: Behaviour = self.server.behaviour
        b.requests.append((self.command, self.path, self.headers.get("Range", "")))
        if b.delay:
            time.sleep(b.delay)
        if b.status is not None:
            return self._send(b.status, b"denied")
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        hub = self.server.hub_routes(self, path)
        if hub is not None:
            return hub
        rel = path.lstrip("/")
        m = re.match(r"^([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", rel)  # the Hub's file URLs
        if m and self.server.hub_repo == m.group(1):
            rel = m.group(3)
        p = self._file(rel)
        if p is None:
            if path.endswith("/") and (self.server.root / rel).is_dir() and not b.no_index:
                return self._listing(rel)
            return self._send(404, b"not found")
        self._send_file(p, head)

    def _send_file(self, p: Path, head: bool) -> None:
        b: Behaviour = self.server.behaviour
        size = p.stat().st_size
        etag = self._etag(p)
        rng = self.headers.get("Range")
        if_match = self.headers.get("If-Match")
        if rng and not b.ignore_range and not head:
            b.gets += 1
            etag = self._etag(p)
            if if_match and if_match != etag:
                return self._send(412, b"precondition failed")
            m = re.match(r"bytes=(\d+)-(\d*)$", rng)
            assert m, rng
            start, end = int(m.group(1)), min(int(m.group(2) or size - 1), size - 1)
            if start >= size:
                return self._send(416, b"")
            headers = {"Content-Range": f"bytes {start}-{end}/{size}", "ETag": etag}
            die = b.die_after is not None and b.gets > b.die_after
            return self._send_range(p, 206, start, end + 1, headers, die)
        headers = {"ETag": etag, "Accept-Ranges": "none" if b.ignore_range else "bytes"}
        if head:
            self.send_response(200)
            for k, v in {**headers, "Content-Length": str(size)}.items():
                self.send_header(k, v)
            self.end_headers()
            return None
        return self._send_range(p, 200, 0, size, headers, False)

    def _send_range(
        self, p: Path, status: int, start: int, end: int, headers: dict[str, str], die: bool
    ) -> None:
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(end - start)}.items():
            self.send_header(k, v)
        self.end_headers()
        with open(p, "rb") as f:
            f.seek(start)
            left = end - start
            if die:  # half the body, then the connection goes away
                self.wfile.write(f.read(left // 2))
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            while left:
                chunk = f.read(min(left, 1 << 20))
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client closed it (a 200 it did not want)
                left -= len(chunk)

    def _listing(self, rel: str) -> None:
        folder: Path = self.server.root / rel
        names = [p.name + ("/" if p.is_dir() else "") for p in sorted(folder.iterdir())]
        links = "".join(f'<a href="{html.escape(n)}">{html.escape(n)}</a>\n' for n in names)
        self._send(200, f"<html><body>{links}</body></html>".encode(), "text/html")

    def _send(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class FileServer(ThreadingHTTPServer):
    """Serves ``root`` on 127.0.0.1 with Range, ETag and If-Match; ``hub_repo`` also answers
    the Hugging Face Hub API calls huggingface_hub makes for that one repo."""

    daemon_threads = True

    def __init__(self, root: Path, hub_repo: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = Path(root)
        self.hub_repo = hub_repo
        self.behaviour = Behaviour()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that closes its connection early (a reader that has what it needs) is not
        an error of the server; anything else is printed as usual."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    # -- the Hub's API, for one repository --------------------------------------------------
    def _entries(self, sub: str, recursive: bool) -> list[dict[str, Any]]:
        base = self.root / sub if sub else self.root
        items = sorted(base.rglob("*") if recursive else base.iterdir())
        out = []
        for p in items:
            rel = p.relative_to(self.root).as_posix()
            if p.is_dir():
                out.append({"type": "directory", "path": rel, "oid": "0" * 40})
            else:
                oid = hashlib.sha1(rel.encode()).hexdigest()
                out.append({"type": "file", "path": rel, "size": p.stat().st_size, "oid": oid})
        return out

    def hub_routes(self, h: _Handler, path: str) -> Any:
        if self.hub_repo is None:
            return None
        repo = re.escape(self.hub_repo)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(h.path).query)
        if re.match(rf"^/api/models/{repo}(/revision/[^/]+)?$", path):
            siblings = [{"rfilename": e["path"]} for e in self._entries("", True)]
            info = {"id": self.hub_repo, "sha": COMMIT, "siblings": siblings, "private": False}
            h.send_json(info)
            return True
        m = re.match(rf"^/api/models/{repo}/tree/[^/]+/?(.*)$", path)
        if m:
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            sub = m.group(1).strip("/")
            if sub and not (self.root / sub).is_dir():
                h._send(404, b"no such folder")
                return True
            h.send_json(self._entries(sub, recursive))
            return True
        m = re.match(rf"^/api/models/{repo}/paths-info/[^/]+$", path)
        if m:
            length = int(h.headers.get("Content-Length", "0"))
            form = urllib.parse.parse_qs(h.rfile.read(length).decode())
            wanted = form.get("paths", [])
            out = [e for e in self._entries("", True) if e["path"] in wanted]
            h.send_json(out)
            return True
        if path.startswith("/api/"):
            h._send(404, b"unknown API")
            return True
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _ChildServer:
    """A server in a child process (``python -m MODULE ARGS``) on ``self.port`` of loopback."""

    port: int

    def start(self, args: list[str], name: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{name} did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class MotoServer(_ChildServer):
    """moto's S3 server in a child process on loopback (``moto_server``)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.start(["moto.server", "-H", "127.0.0.1", "-p", str(self.port)], "moto server")

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL_S3": self.url,
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_CONFIG_FILE": os.devnull,
        }


class GcsServer(_ChildServer):
    """``gcp-storage-emulator`` (a pip package: Google Cloud Storage's JSON API, in memory) in a
    child process on loopback; gcsfs finds it through ``STORAGE_EMULATOR_HOST``."""

    def __init__(self, bucket: str) -> None:
        self.port = free_port()
        self.bucket = bucket
        self.start(
            ["gcp_storage_emulator", "start", "-H", "127.0.0.1", "--port", str(self.port),
             "--in-memory", "-q", "--default-bucket", bucket],
            "the GCS emulator",
        )  # fmt: skip

    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            # gcsfs >= 2026 asks a bucket's type over gRPC first, which the emulator does not
            # speak (each ask waits 60 s): the JSON API alone, as gcsfs did before
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def upload(self, path: Path, name: str) -> None:
        """One object, through the JSON API's media upload (no gcsfs in the test process)."""
        import urllib.request

        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        req = urllib.request.Request(
            f"{self.url}/upload/storage/v1/b/{self.bucket}/o?{query}",
            data=path.read_bytes(),
            headers={"Content-Type": "application/octet-stream"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200, r.status
