"""Remote inputs (issue 21): URLs read by range requests, on servers started here on loopback.

An HTTP server of our own (Range, ETag, If-Match; told to ignore Range, change its ETag or die
mid-read), moto's S3 server, and a fake Hugging Face Hub endpoint (``HF_ENDPOINT``). The same
files are read locally: reports, verdicts and written outputs must be the same.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")

from tests.remote_servers import FileServer

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TOKEN = "hf_test_secret_token_never_printed"


def ckpttool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "CKPTTOOL_REMOTE_TIMEOUT": "5", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ckpttool", *args], capture_output=True, text=True, env=full
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixtures, a bigger zip/legacy/safetensors trio (storages far past the first block)
    and a hostile zip whose storage is big: what the servers serve."""
    import torch

    root = tmp_path_factory.mktemp("served")
    for p in FIXTURES.iterdir():
        if p.is_file() and p.suffix in (".pt", ".ckpt", ".safetensors"):
            shutil.copy(p, root / p.name)
    shutil.copytree(FIXTURES / "sharded", root / "sharded")
    gen = torch.Generator().manual_seed(0)
    sd = {f"layer{i}.weight": torch.randint(-99, 99, (512, 1024), generator=gen).float()
          for i in range(6)}  # fmt: skip
    sd["emb.weight"] = sd["layer0.weight"][:, :512].t()  # a strided view
    torch.save({"model": sd, "step": 7}, root / "big.pt")
    torch.save(sd, root / "big_legacy.pt", _use_new_zipfile_serialization=False)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, root / "big.safetensors")
    many = {f"p{i}": torch.full((20_000,), float(i)) for i in range(200)}  # 80 KB apart
    torch.save(many, root / "many_records.pt")

    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, ("echo pwned",))

    torch.save({"w": torch.zeros(2_000_000), "x": Evil()}, root / "hostile_big.pt")
    return root


@pytest.fixture(scope="module")
def http(files: Path) -> Any:
    srv = FileServer(files, hub_repo="org/tiny")
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _behave(request: pytest.FixtureRequest) -> Any:
    yield
    if "http" in request.fixturenames:
        srv = request.getfixturevalue("http")
        srv.behaviour.__init__()


def _report(path: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    r = ckpttool("inspect", path, "--json", env=env)
    assert r.returncode in (0, 3), r.stderr
    return dict(json.loads(r.stdout))


def _same_report(local: dict[str, Any], remote: dict[str, Any]) -> None:
    usage = remote.pop("remote")
    assert usage["requests"] > 0
    for rep in (local, remote):
        rep.pop("path")
        if rep.get("folder"):  # the same weights chosen, in a local folder and at a URL
            rep["folder"].pop("path")
        for t in rep["tensors"]:
            t.pop("storage", None)
    assert local == remote


# -- reading: the same report, from a few requests ---------------------------------------------
@pytest.mark.parametrize(
    "name", ["big.pt", "big_legacy.pt", "big.safetensors", "ddp_rank0_checkpoint.pt", "sharded/"]
)
def test_inspect_over_http_prints_the_local_report(http: Any, files: Path, name: str) -> None:
    remote = _report(f"{http.url}/{name}")
    local = _report(str(files / name))
    _same_report(local, remote)


@pytest.mark.parametrize("name", ["big.pt", "big.safetensors"])
def test_inspect_fetches_the_metadata_only(http: Any, files: Path, name: str) -> None:
    size = (files / name).stat().st_size
    usage = _report(f"{http.url}/{name}")["remote"]
    assert size > 12_000_000
    assert usage["bytes"] < 1_000_000
    assert usage["requests"] <= 12
    spans = [r[2].split("=")[1].split("-") for r in http.behaviour.requests if r[2]]
    assert all(int(b) - int(a) < 300_000 for a, b in spans)  # no 2 MB storage was fetched


def test_inspect_of_many_records_takes_a_handful_of_requests(http: Any, files: Path) -> None:
    """A storage record's local header only says where its bytes start: inspect and the
    verdict do not fetch it (200 records: a request each would be 200)."""
    remote = _report(f"{http.url}/many_records.pt")
    assert remote["remote"]["requests"] <= 6
    assert remote["verdict"] == _report(str(files / "many_records.pt"))["verdict"]


def test_verbose_says_bytes_and_requests(http: Any) -> None:
    r = ckpttool("inspect", f"{http.url}/big.pt", "-v")
    assert r.returncode == 0
    line = [x for x in r.stderr.splitlines() if x.startswith("remote: ")]
    assert line and "bytes in" in line[0] and "requests" in line[0]
    assert "remote:" not in ckpttool("inspect", str(FIXTURES / "model.safetensors"), "-v").stderr


# -- scan ---------------------------------------------------------------------------------------
def _verdicts(out: str) -> dict[str, str]:
    data = json.loads(out)
    return {f["path"].rstrip("/").split("/", 3)[-1]: f["verdict"] for f in data["files"]}


def _local_verdicts(files: Path) -> dict[str, str]:
    r = ckpttool("scan", str(files), "--json")
    data = json.loads(r.stdout)
    return {os.path.relpath(f["path"], files): f["verdict"] for f in data["files"]}


def test_scan_of_an_http_folder_gives_the_local_verdicts(http: Any, files: Path) -> None:
    r = ckpttool("scan", http.url + "/", "--json")
    assert r.returncode == 3, r.stderr
    data = json.loads(r.stdout)
    got = {f["path"][len(http.url) + 1 :]: f["verdict"] for f in data["files"]}
    want = _local_verdicts(files)
    assert got == want and len(got) >= 20  # the "20-file repo-like folder"
    assert got["hostile_big.pt"] == got["malicious.pt"] == "dangerous"
    per = {f["url"]: f["bytes"] for f in data["remote"]["files"]}
    assert per[f"{http.url}/hostile_big.pt"] <= 2 * 262_144  # two windows of its 8 MB
    assert data["remote"]["bytes"] < sum(p.stat().st_size for p in files.rglob("*") if p.is_file())
    # the server's log: of the hostile file's 8 MB storage, only what the metadata windows at
    # its start and its end hold was asked for (the middle, where no metadata lies, never)
    start, nbytes = _record_span(files / "hostile_big.pt", "data/0")
    spans = [
        [int(x) for x in q[2].split("=")[1].split("-")]
        for q in http.behaviour.requests
        if q[1] == "/hostile_big.pt" and q[2]
    ]
    assert spans and nbytes == 8_000_000
    fetched = sum(max(0, min(b + 1, start + nbytes) - max(a, start)) for a, b in spans)
    assert fetched <= 2 * 262_144
    assert not [a for a, b in spans if 262_144 < a < start + nbytes - 2 * 262_144]


def _record_span(path: Path, suffix: str) -> tuple[int, int]:
    """(data offset, size) of the zip record whose name ends with ``suffix``."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_credentials_in_a_url_are_never_printed(http: Any, tmp_path: Path) -> None:
    """A password in the URL or a presigned URL's signature: not in any line or report."""
    secret = "s3cr3t-never-shown"
    user = http.url.replace("http://", f"http://me:{secret}@")
    query = f"?X-Amz-Credential={secret}&X-Amz-Signature={secret}&v=1"
    for url in (f"{user}/big.pt", f"{http.url}/big.pt{query}"):
        r = ckpttool("inspect", url, "-v", "--json")
        assert r.returncode == 0, r.stderr
        assert secret not in r.stdout + r.stderr and "***" in r.stdout + r.stderr
        out = tmp_path / "o.safetensors"
        r = ckpttool("to-safetensors", url, str(out), "--all")
        assert r.returncode == 0 and secret not in r.stdout + r.stderr, r.stderr
        out.unlink()
    http.behaviour.status = 403
    r = ckpttool("inspect", f"{user}/big.pt{query}")
    assert r.returncode == 1 and "access denied" in r.stderr and secret not in r.stderr


# -- writing from a URL ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["big.pt", "big_legacy.pt", "big.safetensors"])
def test_remote_convert_and_to_safetensors_equal_local(
    http: Any, files: Path, tmp_path: Path, name: str
) -> None:
    for cmd, ext in (("convert", ".pt"), ("to-safetensors", ".safetensors")):
        extra = ["--all"] if cmd == "to-safetensors" and name == "big.pt" else []
        remote = ckpttool(cmd, f"{http.url}/{name}", str(tmp_path / f"r{ext}"), *extra)
        assert remote.returncode == 0, remote.stderr
        assert "remote: " in remote.stderr
        local = ckpttool(cmd, str(files / name), str(tmp_path / f"l{ext}"), *extra)
        assert local.returncode == 0, local.stderr
        assert filecmp.cmp(tmp_path / f"r{ext}", tmp_path / f"l{ext}", shallow=False)


def test_remote_diff_and_check(http: Any, files: Path) -> None:
    r = ckpttool("diff", f"{http.url}/big.pt", str(files / "big.pt"), "--values", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["equal"]
    assert json.loads(r.stdout)["remote"]["bytes"] > 12_000_000  # diff reads every tensor
    r = ckpttool("diff", f"{http.url}/big.pt", f"{http.url}/big_legacy.pt")
    assert r.returncode == 4 and "state dict" in r.stdout  # the entry 'step' differs
    r = ckpttool("check", f"{http.url}/big.pt", "--against", f"{http.url}/big.safetensors")
    assert r.returncode == 0, r.stderr
    assert "would load" in r.stdout


# -- failures: one line, exit 1, nothing written -------------------------------------------------
def _one_line_failure(r: subprocess.CompletedProcess[str], words: str, out: Path) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_a_server_without_ranges_is_refused_before_the_download(http: Any, tmp_path: Path) -> None:
    http.behaviour.ignore_range = True
    out = tmp_path / "o.pt"
    r = ckpttool("convert", f"{http.url}/big.pt", str(out))
    _one_line_failure(r, "ignores HTTP range requests", out)
    assert "download it" in r.stderr


@pytest.mark.parametrize(("status", "words"), [(404, "no such file"), (403, "access denied"),
                                               (401, "needs credentials")])  # fmt: skip
def test_http_errors_are_one_line(http: Any, tmp_path: Path, status: int, words: str) -> None:
    http.behaviour.status = status
    out = tmp_path / "o.safetensors"
    r = ckpttool("to-safetensors", f"{http.url}/big.pt", str(out), env={"HF_TOKEN": TOKEN})
    _one_line_failure(r, words, out)
    assert TOKEN not in r.stderr + r.stdout


def test_a_file_that_changes_mid_read_writes_nothing(http: Any, tmp_path: Path) -> None:
    http.behaviour.change_etag_after = 3  # the metadata reads pass, the copy meets a new ETag
    out = tmp_path / "o.pt"
    r = ckpttool("convert", f"{http.url}/big.pt", str(out))
    _one_line_failure(r, "changed on the server while it was read", out)


def test_a_server_dying_mid_read_writes_nothing(http: Any, tmp_path: Path) -> None:
    http.behaviour.die_after = 3
    out = tmp_path / "o.safetensors"
    r = ckpttool("to-safetensors", f"{http.url}/big.safetensors", str(out))
    _one_line_failure(r, "", out)


def test_nothing_listening_is_one_line(tmp_path: Path) -> None:
    from tests.remote_servers import free_port

    r = ckpttool("inspect", f"http://127.0.0.1:{free_port()}/x.pt")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "connection" in r.stderr


# -- the base install ------------------------------------------------------------------------------
def test_importing_ckpttool_imports_no_remote_library() -> None:
    code = (
        "import sys, ckpttool, ckpttool.cli, ckpttool.readers, ckpttool.source; "
        "ckpttool.open_checkpoint(sys.argv[1]); "
        "bad = [m for m in ('fsspec', 'aiohttp', 's3fs', 'huggingface_hub') if m in sys.modules]; "
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code, str(FIXTURES / "ddp_rank0_checkpoint.pt")])
    assert r.returncode == 0


def test_without_the_extra_a_url_says_how_to_get_it() -> None:
    code = (
        "import sys; sys.modules['fsspec'] = None; "
        "from ckpttool.cli import main; sys.argv = ['ckpttool', 'inspect', sys.argv[1]]; main()"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, "https://127.0.0.1:9/x.pt"], capture_output=True, text=True
    )
    assert r.returncode == 1
    assert "pip install 'ckpttool[remote]'" in r.stderr and len(r.stderr.splitlines()) == 1


# -- the Hub, through HF_ENDPOINT -----------------------------------------------------------------
def test_hf_repo_files_revisions_and_whole_repos(http: Any, files: Path, tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    env = {"HF_ENDPOINT": http.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"}
    _same_report(_report(str(files / "big.pt")), _report("hf://org/tiny/big.pt", env))
    rev = _report("hf://org/tiny@main/sharded", env)
    assert rev["format"] == "hf-sharded" and rev["tensor_count"] == 4
    r = ckpttool("scan", "hf://org/tiny", "--json", env=env)
    got = {f["path"][len("hf://org/tiny/") :]: f["verdict"] for f in json.loads(r.stdout)["files"]}
    assert got == _local_verdicts(files)
    out = tmp_path / "hf.safetensors"
    r = ckpttool("to-safetensors", "hf://org/tiny/big_legacy.pt", str(out), env=env)
    assert r.returncode == 0, r.stderr
    ckpttool("to-safetensors", str(files / "big_legacy.pt"), str(tmp_path / "l.safetensors"))
    assert filecmp.cmp(out, tmp_path / "l.safetensors", shallow=False)
    assert TOKEN not in r.stderr + r.stdout
    assert any("/resolve/" + "0123456789abcdef" in q[1] for q in http.behaviour.requests)


# -- S3, on moto's server ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3(files: Path) -> Any:
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    from tests.remote_servers import MotoServer

    srv = MotoServer()
    client = boto3.client("s3", endpoint_url=srv.url, **_creds(srv.env()))
    client.create_bucket(Bucket="ckpts")
    for p in sorted(files.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), "ckpts", "run1/" + p.relative_to(files).as_posix())
    yield srv
    srv.stop()


def _creds(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


def test_s3_scan_inspect_and_convert(s3: Any, files: Path, tmp_path: Path) -> None:
    env = s3.env()
    r = ckpttool("scan", "s3://ckpts/run1/", "--json", env=env)
    assert r.returncode == 3, r.stderr
    data = json.loads(r.stdout)
    got = {f["path"][len("s3://ckpts/run1/") :]: f["verdict"] for f in data["files"]}
    assert got == _local_verdicts(files)
    assert data["remote"]["bytes"] > 0
    _same_report(_report(str(files / "big.pt")), _report("s3://ckpts/run1/big.pt", env))
    out = tmp_path / "s3.pt"
    r = ckpttool("convert", "s3://ckpts/run1/big_legacy.pt", str(out), env=env)
    assert r.returncode == 0, r.stderr
    ckpttool("convert", str(files / "big_legacy.pt"), str(tmp_path / "l.pt"))
    assert filecmp.cmp(out, tmp_path / "l.pt", shallow=False)
    r = ckpttool("inspect", "s3://ckpts/run1/nothing.pt", env=env)
    assert r.returncode == 1 and "no such file" in r.stderr and len(r.stderr.splitlines()) == 1
    assert env["AWS_SECRET_ACCESS_KEY"] not in r.stderr


def test_a_zip_rewritten_by_another_tool_is_refused_when_copied(
    http: Any, files: Path, tmp_path: Path
) -> None:
    """A URL's record offsets are where torch's writer puts them, checked against each local
    header when the record is first read: a zip rewritten without torch's padding still
    inspects, and a writer refuses it in one line (one request per record is not paid)."""
    import zipfile

    src = files / "ddp_rank0_checkpoint.pt"
    repacked = files / "repacked.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(repacked, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    try:
        assert _report(f"{http.url}/repacked.pt")["tensor_count"] == 16
        out = tmp_path / "o.pt"
        r = ckpttool("convert", f"{http.url}/repacked.pt", str(out))
        _one_line_failure(r, "does not lie where torch's writer puts it", out)
        assert ckpttool("convert", str(repacked), str(out)).returncode == 0
    finally:
        repacked.unlink()


# -- Google Cloud Storage, on gcp-storage-emulator -----------------------------------------------
@pytest.fixture(scope="module")
def gcs(files: Path) -> Any:
    pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    from tests.remote_servers import GcsServer

    srv = GcsServer("ckpts")
    for p in sorted(files.rglob("*")):
        if p.is_file():
            srv.upload(p, "run1/" + p.relative_to(files).as_posix())
    yield srv
    srv.stop()


def test_gs_reads_are_pinned_to_the_generation_first_seen(
    gcs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every range of a gs:// object asks for the generation its first stat saw, so a
    replaced object is never read half old, half new. The emulator serves the newest
    generation whatever is asked (Cloud Storage answers 404 for one that is gone): the asks
    are recorded, and gcsfs' 404 is raised where the emulator would have answered it."""
    from ckpttool.errors import CheckpointError
    from ckpttool.remote.stores import FsspecBackend

    for key, value in gcs.env().items():
        monkeypatch.setenv(key, value)
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"A" * 1000)
    gcs.upload(blob, "pin/blob.bin")
    backend = FsspecBackend("gs://ckpts/pin/blob.bin", lambda url, n: None)
    stat = backend.stat()
    asked: list[Any] = []
    real = backend.fs.cat_file

    def cat_file(path: str, **kw: Any) -> Any:
        asked.append(kw.get("generation"))
        if kw.get("generation") != backend.fs.info(path)["generation"]:
            raise FileNotFoundError(path)  # what gcsfs raises for Cloud Storage's 404
        return real(path, **kw)

    monkeypatch.setattr(backend.fs, "cat_file", cat_file)
    assert backend.fetch(0, 10) == b"A" * 10
    blob.write_bytes(b"B" * 1000)
    gcs.upload(blob, "pin/blob.bin")  # a new generation replaces the object
    backend.fs.invalidate_cache()
    with pytest.raises(CheckpointError, match="changed on the server while it was read"):
        backend.fetch(10, 20)
    assert asked == [stat.version, stat.version] and stat.version


def test_gs_inspect_scan_and_convert_equal_local(gcs: Any, files: Path, tmp_path: Path) -> None:
    env = gcs.env()
    _same_report(_report(str(files / "big.pt")), _report("gs://ckpts/run1/big.pt", env))
    r = ckpttool("scan", "gs://ckpts/run1/", "--json", env=env)
    assert r.returncode == 3, r.stderr
    data = json.loads(r.stdout)
    got = {f["path"][len("gs://ckpts/run1/") :]: f["verdict"] for f in data["files"]}
    assert got == _local_verdicts(files)
    assert 0 < data["remote"]["bytes"] < sum(p.stat().st_size for p in files.rglob("*.pt"))
    for cmd, name, ext in (("convert", "big_legacy.pt", ".pt"),
                           ("to-safetensors", "big.safetensors", ".safetensors")):  # fmt: skip
        r = ckpttool(cmd, f"gs://ckpts/run1/{name}", str(tmp_path / f"r{ext}"), env=env)
        assert r.returncode == 0, r.stderr
        assert "remote: gs://ckpts/run1/" in r.stderr
        assert ckpttool(cmd, str(files / name), str(tmp_path / f"l{ext}")).returncode == 0
        assert filecmp.cmp(tmp_path / f"r{ext}", tmp_path / f"l{ext}", shallow=False)
    r = ckpttool("inspect", "gs://ckpts/run1/nothing.pt", env=env)
    assert r.returncode == 1 and "no such file" in r.stderr and len(r.stderr.splitlines()) == 1
