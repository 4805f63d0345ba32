"""Folders of shards at a URL (issue 21): DCP and DeepSpeed ZeRO folders served over HTTP (with
and without index pages), from moto's S3 server and as a subfolder of a Hub repository, read
by range requests. Reports, verdicts and consolidated files must equal the local ones byte for
byte; a server that dies mid-read leaves one line and nothing written.

The folders are the sessions' own: FSDP2 + ``dcp.save`` on 2 gloo ranks (``tests/test_dcp.py``)
and DeepSpeed ZeRO-2/3 saves (``tests/test_deepspeed.py``, skipped without DeepSpeed), plus a
DCP folder of bigger tensors saved in one process (two ``.distcp`` files per rank).
"""

from __future__ import annotations

import filecmp
import importlib.util
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")
torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.checkpoint")

from tests.remote_servers import FileServer  # noqa: E402
from tests.test_remote import TOKEN, _creds  # noqa: E402

FOLDERS = ["dcp", "zero3"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the servers serve: ``dcp/`` (2 ranks), ``big/`` (one rank, 2 files, 4 MB tensors)
    and, with DeepSpeed, ``zero3/`` and ``zero2/`` (``latest`` and a tag folder)."""
    import torch.distributed.checkpoint as dcp

    from tests.test_dcp import dcp_folders

    root = tmp_path_factory.mktemp("served_shards")
    shutil.copytree(dcp_folders(tmp_path_factory)[2], root / "dcp")
    gen = torch.Generator().manual_seed(0)
    state = {
        "model": {f"l{i}.weight": torch.randint(-9, 9, (1024, 1024), generator=gen).float()
                  for i in range(4)},
        "step": 5,
    }  # fmt: skip
    writer = dcp.FileSystemWriter(str(root / "big"), thread_count=2)
    with pytest.warns(UserWarning, match="single process"):
        dcp.save(state, storage_writer=writer)
    if importlib.util.find_spec("deepspeed") is not None:
        from tests.test_deepspeed import zero_folders

        zero = zero_folders(tmp_path_factory)
        shutil.copytree(zero / "zero3_bf16", root / "zero3", ignore=shutil.ignore_patterns("*.py"))
        shutil.copytree(zero / "zero2_fp32", root / "zero2", ignore=shutil.ignore_patterns("*.py"))
    return root


@pytest.fixture(scope="module")
def http(shards: Path) -> Iterator[FileServer]:
    srv = FileServer(shards, hub_repo="org/shards")
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _fresh(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test counts its own bytes and lists folders again; the server behaves again."""
    from ckpttool import remote

    remote.reset()
    yield
    remote.reset()
    if "http" in request.fixturenames:
        request.getfixturevalue("http").behaviour.__init__()


def _needs(shards: Path, name: str) -> None:
    if not (shards / name).exists():
        pytest.skip("DeepSpeed is not installed (it writes the ZeRO folders)")


def _inspect(run_cli: Callable[..., Any], path: str) -> dict[str, Any]:
    r = run_cli("inspect", path, "--json")
    assert r.exit_code == 0, r.stderr
    out = dict(json.loads(r.stdout))
    out.pop("remote", None)
    return out


def _same_report(local: dict[str, Any], remote: dict[str, Any], folder: Path, url: str) -> None:
    """The remote report is the local one with the folder's path replaced by its URL."""
    text = json.dumps(local).replace(str(folder), url.rstrip("/"))
    assert json.loads(text) == remote


def _consolidated_equal(
    run_cli: Callable[..., Any], url: str, folder: Path, tmp: Path, *args: str
) -> str:
    """Consolidate the URL and the local folder with ``args``; the outputs are equal byte for
    byte. Returns the remote run's stderr."""
    name = "out.safetensors" if "safetensors" in args else "out.pt"
    args = tuple(a for a in args if a != "safetensors")
    r = run_cli("consolidate", url, tmp / f"r-{name}", *args)
    assert r.exit_code == 0, r.stderr
    loc = run_cli("consolidate", folder, tmp / f"l-{name}", *args)
    assert loc.exit_code == 0, loc.stderr
    assert filecmp.cmp(tmp / f"r-{name}", tmp / f"l-{name}", shallow=False)
    return str(r.stderr)


# -- HTTP ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", [True, False], ids=["index-pages", "no-index-pages"])
@pytest.mark.parametrize("name", FOLDERS)
def test_a_folder_of_shards_over_http_reads_as_the_local_one(
    http: FileServer, shards: Path, run_cli: Any, tmp_path: Path, name: str, index: bool
) -> None:
    _needs(shards, name)
    http.behaviour.no_index = not index
    url = f"{http.url}/{name}/"
    _same_report(_inspect(run_cli, str(shards / name)), _inspect(run_cli, url), shards / name, url)
    err = _consolidated_equal(run_cli, url, shards / name, tmp_path, "--all")
    assert "remote: " in err and "bytes in" in err
    if not index:  # the files were found from the save's own records, not from a listing
        assert not [q for q in http.behaviour.requests if q[1].endswith("/") and q[0] == "GET"][1:]
    r = run_cli("scan", url, "--json")
    loc = run_cli("scan", shards / name, "--json")
    assert r.exit_code == loc.exit_code, r.stderr  # ZeRO's optimizer states: unvetted (5)
    got = {f["path"][len(url) :]: f["verdict"] for f in json.loads(r.stdout)["files"]}
    want = {
        str(Path(f["path"]).relative_to(shards / name)): f["verdict"]
        for f in json.loads(loc.stdout)["files"]
    }
    assert got == want


def test_consolidated_safetensors_and_to_dcp_equal_local(
    http: FileServer, shards: Path, run_cli: Any, tmp_path: Path
) -> None:
    url = f"{http.url}/dcp/"
    _consolidated_equal(run_cli, url, shards / "dcp", tmp_path, "safetensors")
    r = run_cli("to-safetensors", url, tmp_path / "ts.safetensors")
    assert r.exit_code == 0, r.stderr
    assert filecmp.cmp(tmp_path / "ts.safetensors", tmp_path / "l-out.safetensors", shallow=False)
    for where, src in (("a", url), ("b", str(shards / "dcp"))):
        (tmp_path / where).mkdir()
        r = run_cli("to-dcp", src, tmp_path / where / "out")
        assert r.exit_code == 0, r.stderr
    for f in (tmp_path / "b" / "out").iterdir():
        assert filecmp.cmp(tmp_path / "a" / "out" / f.name, f, shallow=False), f.name


def test_inspect_of_a_remote_dcp_folder_fetches_no_tensor_bytes(
    http: FileServer, shards: Path, run_cli: Any, tmp_path: Path
) -> None:
    """16 MB of tensors in two files: inspect reads the metadata and each item's zip directory
    (a few windows), consolidate streams each tensor in ranges of at most 8 MiB."""
    url = f"{http.url}/big/"
    r = run_cli("inspect", url, "--json")
    assert r.exit_code == 0, r.stderr
    usage = json.loads(r.stdout)["remote"]
    total = sum(p.stat().st_size for p in (shards / "big").iterdir())
    assert total > 16_000_000 and usage["bytes"] < 1_200_000 and usage["requests"] <= 16
    http.behaviour.requests.clear()
    _consolidated_equal(run_cli, url, shards / "big", tmp_path, "safetensors")
    spans = [r[2].split("=")[1].split("-") for r in http.behaviour.requests if r[2]]
    assert max(int(b) - int(a) + 1 for a, b in spans) <= 8 << 20


def test_a_server_dying_mid_consolidate_writes_nothing(
    http: FileServer, shards: Path, run_cli: Any, tmp_path: Path
) -> None:
    run_cli("inspect", f"{http.url}/big/")  # how many ranged reads the metadata needs
    reads = sum(1 for q in http.behaviour.requests if q[2])
    from ckpttool import remote

    remote.reset()
    http.behaviour.__init__()
    http.behaviour.die_after = reads + 1  # the metadata reads pass, a tensor's copy is cut
    out = tmp_path / "o.safetensors"
    r = run_cli("consolidate", f"{http.url}/big/", out)
    assert r.exit_code == 1, (r.stdout, r.stderr)
    assert len(r.err_lines) == 1 and r.err_lines[0].startswith("Error: "), r.stderr
    assert "connection to the server failed" in r.stderr or "changed on the server" in r.stderr
    assert not list(tmp_path.iterdir())


# -- S3 and the Hub -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3(shards: Path) -> Iterator[Any]:
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    from tests.remote_servers import MotoServer

    srv = MotoServer()
    client = boto3.client("s3", endpoint_url=srv.url, **_creds(srv.env()))
    client.create_bucket(Bucket="shards")
    for p in sorted(shards.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), "shards", "run/" + p.relative_to(shards).as_posix())
    yield srv
    srv.stop()


@pytest.mark.parametrize("name", ["dcp", "zero2"])
def test_a_folder_of_shards_in_s3_reads_as_the_local_one(
    s3: Any, shards: Path, run_cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    _needs(shards, name)
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    url = f"s3://shards/run/{name}"  # a prefix, without the trailing slash
    _same_report(_inspect(run_cli, str(shards / name)), _inspect(run_cli, url), shards / name, url)
    err = _consolidated_equal(run_cli, url, shards / name, tmp_path)
    assert "remote: " in err and s3.env()["AWS_SECRET_ACCESS_KEY"] not in err
    r, loc = run_cli("scan", url, "--json"), run_cli("scan", shards / name, "--json")
    assert r.exit_code == loc.exit_code, r.stderr
    got = {f["path"][len(url) + 1 :]: f["verdict"] for f in json.loads(r.stdout)["files"]}
    want = {
        str(Path(f["path"]).relative_to(shards / name)): f["verdict"]
        for f in json.loads(loc.stdout)["files"]
    }
    assert got == want and json.loads(r.stdout)["remote"]["bytes"] > 0


def test_a_folder_of_shards_in_a_hub_repo_reads_as_the_local_one(
    http: FileServer, shards: Path, run_cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_ENDPOINT", http.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    url, folder = "hf://org/shards/dcp", shards / "dcp"  # a folder of a repository
    _same_report(_inspect(run_cli, str(folder)), _inspect(run_cli, url), folder, url)
    err = _consolidated_equal(run_cli, url, shards / "dcp", tmp_path, "--all")
    assert TOKEN not in err
