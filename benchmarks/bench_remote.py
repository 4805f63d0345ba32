"""Remote inputs (issue 21): bytes, requests and wall time of ``ckpttool inspect``/``scan`` of a
URL against downloading the file first, for zip, legacy and safetensors inputs; and of
``ckpttool consolidate`` of a DCP folder URL against downloading the folder first.

The files are served on loopback by the tests' HTTP server (Range, ETag), optionally with a
delay per request (``--rtt-ms``) to stand for a real server's round trip. Inputs: a DDP rank-0
zip checkpoint from ``make_big_checkpoint.py`` (``--size``), the same tensors re-saved in the
legacy format (``torch.save(..., _use_new_zipfile_serialization=False)``) and as safetensors
(``ckpttool to-safetensors``), and a DCP folder of the same tensors (``dcp.save`` in one
process, 4 ``.distcp`` files). Each row is a fresh ``python -m ckpttool`` process.

    .venv/bin/python benchmarks/bench_remote.py --size 2GB --rtt-ms 20
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from _harness import format_size, parse_size, python_env, repo_root
from make_big_checkpoint import Spec, ensure_checkpoint

sys.path.insert(0, str(repo_root()))
from tests.remote_servers import FileServer


def _ckpttool(*args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "ckpttool", *args], capture_output=True, text=True, env=python_env()
    )
    return time.perf_counter() - t, r


def _inputs(folder: Path, size: int) -> dict[str, Path]:
    zip_path = ensure_checkpoint(folder, Spec(size, layout="flat"), quiet=True)
    legacy = folder / (zip_path.stem + ".legacy.pt")
    if not legacy.exists():
        code = (
            "import sys, torch; sd = torch.load(sys.argv[1], mmap=True, map_location='cpu'); "
            "torch.save(sd, sys.argv[2], _use_new_zipfile_serialization=False)"
        )
        subprocess.run([sys.executable, "-c", code, str(zip_path), str(legacy)], check=True)
    st = folder / (zip_path.stem + ".safetensors")
    if not st.exists():
        _, r = _ckpttool("to-safetensors", str(zip_path), str(st), "-q", "--no-verify")
        assert r.returncode == 0, r.stderr
    return {"zip": zip_path, "legacy": legacy, "safetensors": st}


def _dcp_folder(folder: Path, zip_path: Path) -> Path:
    """The zip's tensors as a DCP folder (one process, 4 files), made once."""
    out = folder / (zip_path.stem + ".dcp")
    if not (out / ".metadata").exists():
        code = (
            "import sys, warnings, torch, torch.distributed.checkpoint as dcp; "
            "warnings.simplefilter('ignore'); "
            "sd = torch.load(sys.argv[1], mmap=True, map_location='cpu', weights_only=False); "
            "sd = sd.get('model', sd) if isinstance(sd, dict) else sd; "
            "dcp.save({'model': sd}, storage_writer=dcp.FileSystemWriter(sys.argv[2], "
            "thread_count=4))"
        )
        subprocess.run([sys.executable, "-c", code, str(zip_path), str(out)], check=True)
    return out


def _download(url: str, dst: Path) -> float:
    t = time.perf_counter()
    with urllib.request.urlopen(url) as r, open(dst, "wb") as f:
        while chunk := r.read(8 << 20):
            f.write(chunk)
    return time.perf_counter() - t


def _row(kind: str, how: str, wall: float, nbytes: int, requests: int, same: str) -> str:
    return f"| {kind} | {how} | {wall:.2f} | {format_size(nbytes)} | {requests} | {same} |"


def bench(folder: Path, size: int, rtt: float) -> list[str]:
    files = _inputs(folder, size)
    srv = FileServer(folder)
    srv.behaviour.delay = rtt
    rows = []
    try:
        for kind, path in files.items():
            url = f"{srv.url}/{path.name}"
            local_wall, local = _ckpttool("inspect", str(path), "--json")
            wall, r = _ckpttool("inspect", url, "--json")
            assert r.returncode == 0, r.stderr
            rep, ref = json.loads(r.stdout), json.loads(local.stdout)
            usage = rep.pop("remote")
            same = "same report" if {**rep, "path": ""} == {**ref, "path": ""} else "DIFFERS"
            rows.append(_row(kind, "inspect URL", wall, usage["bytes"], usage["requests"], same))
            wall, r = _ckpttool("scan", url, "--json")
            usage = json.loads(r.stdout)["remote"]
            rows.append(_row(kind, "scan URL", wall, usage["bytes"], usage["requests"], ""))
            dst = folder / ("downloaded-" + path.name)
            took = _download(url, dst)
            dwall, _ = _ckpttool("inspect", str(dst))
            dst.unlink()
            n = path.stat().st_size
            rows.append(_row(kind, "download, then inspect", took + dwall, n, 1, ""))
            rows.append(_row(kind, "(inspect the local file)", local_wall, 0, 0, ""))
        rows += _consolidate_rows(folder, _dcp_folder(folder, files["zip"]), srv.url)
    finally:
        srv.stop()
    return rows


def _consolidate_rows(folder: Path, dcp: Path, base: str) -> list[str]:
    """consolidate of the DCP folder's URL (streamed) vs downloading its files first."""
    url = f"{base}/{dcp.name}/"
    out, ref = folder / "remote-consolidated.safetensors", folder / "local-consolidated.safetensors"
    local_wall, r = _ckpttool("consolidate", str(dcp), str(ref), "-q")
    assert r.returncode == 0, r.stderr
    wall, r = _ckpttool("consolidate", url, str(out))
    assert r.returncode == 0, r.stderr
    total = [x for x in r.stderr.splitlines() if x.startswith("remote: ")][-1]
    m = re.search(r"([\d,]+) bytes in (\d+) requests in all$", total)
    assert m, r.stderr
    nbytes, requests = int(m.group(1).replace(",", "")), int(m.group(2))
    same = "same file" if out.read_bytes() == ref.read_bytes() else "DIFFERS"
    out.unlink()
    copy = folder / "downloaded-dcp"
    copy.mkdir(exist_ok=True)
    took = sum(_download(url + p.name, copy / p.name) for p in dcp.iterdir())
    dwall, r = _ckpttool("consolidate", str(copy), str(out), "-q")
    assert r.returncode == 0, r.stderr
    size = sum(p.stat().st_size for p in dcp.iterdir())
    files = len(list(dcp.iterdir()))
    for p in [*copy.iterdir(), out, ref]:
        p.unlink()
    copy.rmdir()
    return [
        _row("dcp folder", "consolidate URL", wall, nbytes, requests, same),
        _row("dcp folder", "download, then consolidate", took + dwall, size, files, ""),
        _row("dcp folder", "(consolidate the local folder)", local_wall, 0, 0, ""),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2GB", help="size of the zip input (default 2GB)")
    ap.add_argument("--rtt-ms", type=float, default=0.0, help="delay per request, ms")
    ap.add_argument("--workdir", default="/tmp/ckpttool-bench")
    args = ap.parse_args()
    size = parse_size(args.size)
    rows = bench(Path(args.workdir), size, args.rtt_ms / 1000)
    print(f"inputs of {format_size(size)}, loopback HTTP, {args.rtt_ms:g} ms per request\n")
    print("| input | how | wall s | bytes fetched | requests | |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
