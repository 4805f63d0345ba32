"""GPU check for issue 6: where a naive ``torch.load`` puts a DDP checkpoint, before and after
``ckpttool convert``. Runs only where CUDA exists (exits 0 with a message otherwise); never in CI.

One GPU:

1. build a ~100 MB MLP on ``cuda:0``, wrap it in ``nn.DataParallel`` (its keys get ``module.``,
   as DDP's do) and ``torch.save({"model": wrapped.state_dict()})``: real CUDA tensors, so every
   storage in the file is tagged ``cuda:0``;
2. in a fresh process, load it the naive way (``torch.load(path)``): report whether that created
   a CUDA context, ``torch.cuda.memory_allocated()``, the devices of the loaded tensors, whether
   ``load_state_dict(strict=True)`` into the bare model works, and the process's GPU memory as
   ``nvidia-smi`` sees it (the CUDA context included);
3. ``python -m ckpttool convert --strip-module`` (a subprocess, timed);
4. in a fresh process, load the converted file with the same plain ``torch.load(path)``: nothing
   is on the GPU and no CUDA context exists until the script itself moves the model
   (``model.to("cuda:0")``);
5. the same with ``ckpttool.training.api``: ``api.load`` of the unconverted file, and a plain
   ``torch.load`` of a file written by ``api.save`` from the CUDA model.

With more than one GPU, also the 2-rank picture: two processes, rank ``r`` on ``cuda:r``
(``torch.cuda.set_device(r)``), each loading the same file with a plain ``torch.load``: per-device
``memory_allocated`` and per-GPU process memory from ``nvidia-smi``, without and with conversion
(the "extra processes on GPU 0" of the seed issue).

Prints compact markdown tables. Needs only torch and this repository (no network)::

    python benchmarks/gpu_ddp_check.py            # ~100 MB model
    python benchmarks/gpu_ddp_check.py --mb 400   # bigger

``--rehearse-on-cpu`` runs the same plumbing on a machine without CUDA (the GPU file is faked
with ``ckpttool.testing.saved_as``); its memory columns are meaningless there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WIDTH = 2048  # one Linear(2048, 2048) layer is 16.8 MB of float32
CHILD_TIMEOUT_S = 120.0
CONVERT = [sys.executable, "-m", "ckpttool", "convert"]


# -- shared by the parent and the fresh child processes -----------------------------------------
def build_mlp(mb: int) -> Any:
    import torch
    from torch import nn

    layer_mb = (WIDTH * WIDTH + WIDTH) * 4 / 1e6
    depth = max(1, round(mb / layer_mb))
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    torch.manual_seed(0)
    return nn.Sequential(*layers[:-1])


def tensors_of(obj: Any) -> list[Any]:
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_of(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_of(v)]
    return []


def allocated() -> dict[str, int]:
    """``memory_allocated`` per device; reads allocator stats, creates no CUDA context."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {f"cuda:{d}": torch.cuda.memory_allocated(d) for d in range(torch.cuda.device_count())}


def device_used() -> dict[str, int]:
    """Bytes in use on every GPU, device-wide (all processes), from ``cudaMemGetInfo``.

    Called by the parent only, which has a context on every GPU already; the difference
    between a snapshot while a child holds its load and one before it started is that
    child's footprint (its CUDA context included), whatever pid namespace nvidia-smi sees.
    """
    import torch

    if not torch.cuda.is_available():
        return {}
    used = {}
    for d in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(d)
        used[f"cuda:{d}"] = total - free
    return used


def wait_for(path: Path, timeout: float = CHILD_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- the child: one fresh process loading one file -----------------------------------------------
def child(args: argparse.Namespace) -> int:
    """Load ``args.path`` ``args.how``, report JSON to ``args.report``, wait for the parent."""
    t0 = time.perf_counter()
    import torch

    if args.rank is not None:
        torch.cuda.set_device(args.rank)  # what every DDP script does first
    report: dict[str, Any] = {"pid": os.getpid()}
    try:
        t1 = time.perf_counter()
        if args.how == "api.load":
            from ckpttool.training import api

            device = f"cuda:{args.rank}" if args.rank is not None else "cpu"
            obj = api.load(args.path, map_location=device)
        else:
            obj = torch.load(args.path)  # the naive line: no map_location
        report["load_s"] = time.perf_counter() - t1
        report["cuda_initialised"] = torch.cuda.is_initialized()
        report["devices"] = sorted({str(t.device) for t in tensors_of(obj)})
        report["allocated"] = allocated()
        if args.mb:
            model = build_mlp(args.mb)  # on the CPU
            state = obj["model"]
            if args.how == "api.load":
                from ckpttool.training import api

                state = api.fix_state_dict(model, state).state_dict
            try:
                model.load_state_dict(state, strict=True)
                report["strict"] = "ok"
            except RuntimeError as exc:
                first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
                report["strict"] = "fails: " + first[:60]
            if torch.cuda.is_available() and args.rank is None:
                del obj, state
                model.to("cuda:0")  # the script moves it when it wants it there
                report["allocated_after_to"] = allocated()
    except Exception as exc:  # reported as a row, not a crash
        report["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
        report["cuda_initialised"] = torch.cuda.is_initialized()
        report["allocated"] = allocated()
    report["wall_s"] = time.perf_counter() - t0
    Path(args.report).write_text(json.dumps(report))
    # Stay alive (tensors and context held) until the parent has looked with nvidia-smi.
    wait_for(Path(args.report + ".go"))
    return 0


def run_children(
    work: Path, path: Path, how: str, mb: int, ranks: list[int | None]
) -> list[dict[str, Any]]:
    """Start one fresh process per rank, snapshot nvidia-smi while they hold the load."""
    procs, reports = [], []
    before = device_used()
    for i, rank in enumerate(ranks):
        report = work / f"report-{how.replace('.', '_')}-{path.stem}-{i}.json"
        for p in (report, Path(str(report) + ".go")):
            p.unlink(missing_ok=True)
        argv = [sys.executable, __file__, "--child", "--path", str(path), "--how", how]
        argv += ["--report", str(report), "--mb", str(mb if rank is None else 0)]
        if rank is not None:
            argv += ["--rank", str(rank)]
        procs.append(subprocess.Popen(argv, cwd=REPO, env=child_env()))
        reports.append(report)
    try:
        for report, proc in zip(reports, procs, strict=True):
            while not wait_for(report, 0.5):
                if proc.poll() is not None:
                    raise RuntimeError(f"child for {path.name} exited with {proc.returncode}")
        smi = nvidia_smi_by_pid()
        during = device_used()
        results = []
        for report in reports:
            data = json.loads(report.read_text())
            data["smi"] = smi.get(data["pid"], {})
            # Several children at once: the delta is theirs together.
            data["used_delta"] = {d: during[d] - before.get(d, 0) for d in during}
            results.append(data)
    finally:
        for report in reports:
            Path(str(report) + ".go").write_text("")
        for proc in procs:
            try:
                proc.wait(timeout=CHILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
    return results


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def nvidia_smi_by_pid() -> dict[int, dict[str, int]]:
    """pid -> {"cuda:N": MiB used by that process on GPU N}, from nvidia-smi (if present)."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        gpus = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,gpu_uuid", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        apps = subprocess.run(
            [
                "nvidia-smi",
                "--query-compute-apps=pid,gpu_uuid,used_memory",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    index = {}
    for line in gpus.strip().splitlines():
        i, uuid = (x.strip() for x in line.split(","))
        index[uuid] = int(i)
    out: dict[int, dict[str, int]] = {}
    for line in apps.strip().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) != 3 or not parts[0].isdigit() or parts[1] not in index:
            continue
        used = int(parts[2]) if parts[2].isdigit() else 0
        out.setdefault(int(parts[0]), {})[f"cuda:{index[parts[1]]}"] = used
    return out


# -- the parent -----------------------------------------------------------------------------------
def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def fmt_alloc(alloc: dict[str, int]) -> str:
    if not alloc:
        return "n/a"
    shown = {d: n for d, n in alloc.items() if n} or {next(iter(alloc)): 0}
    return ", ".join(f"{d} {mb(n)}" for d, n in shown.items())


def fmt_gpu(r: dict[str, Any]) -> str:
    """The child's GPU footprint: device-wide delta, and nvidia-smi's per-process figure."""
    delta = r.get("used_delta", {})
    if not delta:
        return "n/a"
    parts = [f"{d} +{n / 2**20:.0f} MiB" for d, n in delta.items() if n > 2**20] or ["none"]
    if r.get("smi"):
        parts.append("(nvidia-smi: " + ", ".join(f"{d} {n} MiB" for d, n in r["smi"].items()) + ")")
    return ", ".join(parts)


def save_gpu_checkpoint(path: Path, mb_: int, rehearse: bool) -> tuple[Any, int]:
    import torch
    from torch import nn

    model = build_mlp(mb_)
    nbytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    if rehearse:
        from ckpttool.testing import saved_as

        wrapped = nn.DataParallel(model)
        with saved_as("cuda:0"):
            torch.save({"model": wrapped.state_dict()}, path)
    else:
        model = model.to("cuda:0")
        wrapped = nn.DataParallel(model, device_ids=[0])  # module. keys, as DDP's
        torch.save({"model": wrapped.state_dict()}, path)  # real CUDA tensors
    return wrapped, nbytes


def parent(args: argparse.Namespace) -> int:
    import torch

    rehearse = args.rehearse_on_cpu
    if not torch.cuda.is_available() and not rehearse:
        print("gpu_ddp_check: CUDA is not available here; nothing to check (exit 0).")
        return 0
    sys.path.insert(0, str(REPO))
    from ckpttool.readers import open_checkpoint
    from ckpttool.training import api

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    work = Path(tempfile.mkdtemp(prefix="gpu_ddp_check-", dir=args.workdir))
    started = time.perf_counter()
    try:
        bad = work / "ddp_rank0.pt"
        wrapped, nbytes = save_gpu_checkpoint(bad, args.mb, rehearse)
        tags = sorted({s.location for s in open_checkpoint(bad).storages.values()})
        api_file = work / "api_saved.pt"
        api.save({"model": wrapped}, api_file)
        api_tags = sorted({s.location for s in open_checkpoint(api_file).storages.values()})
        del wrapped
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            device_used()  # a context on every GPU now, so later snapshots create none

        converted = work / "converted.pt"
        t = time.perf_counter()
        proc = subprocess.run(
            [*CONVERT, str(bad), str(converted), "--strip-module", "-q"],
            cwd=REPO,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            check=False,
        )
        convert_s = time.perf_counter() - t
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        conv_tags = sorted({s.location for s in open_checkpoint(converted).storages.values()})

        print(f"## gpu_ddp_check: {torch.__version__}, {gpus} GPU(s)", end="")
        if gpus:
            print(f", {torch.cuda.get_device_name(0)}", end="")
        print(f"; model {mb(nbytes)} float32\n")
        print(f"- saved from cuda:0 with module. keys: storages tagged {', '.join(tags)}")
        print(
            f"- `ckpttool convert --strip-module`: {convert_s:.2f} s; tags {', '.join(conv_tags)}"
        )
        print(f"- `api.save(model)` from cuda:0: tags {', '.join(api_tags)}\n")

        rows = [
            ("DDP file, `torch.load(path)`", bad, "torch.load"),
            ("converted, `torch.load(path)`", converted, "torch.load"),
            ("DDP file, `api.load(path)`", bad, "api.load"),
            ("api.save file, `torch.load(path)`", api_file, "torch.load"),
        ]
        print(
            "| load (fresh process) | CUDA context | memory_allocated | tensors on | "
            "strict load, bare model | GPU memory used | after `.to('cuda:0')` |"
        )
        print("|---|---|---|---|---|---|---|")
        for label, path, how in rows:
            (r,) = run_children(work, path, how, args.mb, [None])
            if "error" in r:
                print(f"| {label} | {yes(r['cuda_initialised'])} | fails: {r['error']} |||||")
                continue
            print(
                f"| {label} | {yes(r['cuda_initialised'])} | {fmt_alloc(r['allocated'])} | "
                f"{', '.join(r['devices'])} | {r.get('strict', '')} | "
                f"{fmt_gpu(r)} | {fmt_alloc(r.get('allocated_after_to', {}))} |"
            )

        if gpus >= 2:
            print("\n### 2 ranks: rank r calls `torch.cuda.set_device(r)`, then loads\n")
            print(
                "| file, load | rank | memory_allocated by device | process on GPUs (nvidia-smi) |"
            )
            print("|---|---|---|---|")
            for label, path, how in (
                ("DDP file, `torch.load(path)`", bad, "torch.load"),
                ("converted, `torch.load(path)`", converted, "torch.load"),
                ("DDP file, `api.load(path, f'cuda:{rank}')`", bad, "api.load"),
            ):
                for rank, r in enumerate(run_children(work, path, how, 0, [0, 1])):
                    where = fmt_alloc(r["allocated"]) if "error" not in r else r["error"]
                    print(f"| {label} | {rank} | {where} | {fmt_gpu(r)} |")
        elif not rehearse:
            print("\n(one GPU: the 2-rank picture needs two)")
        print(f"\ntotal {time.perf_counter() - started:.0f} s")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"files kept in {work}")
    return 0


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=100, help="model size in MB (default 100)")
    parser.add_argument("--workdir", default=None, help="folder for the temporary files")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--rehearse-on-cpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--how", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    return child(args) if args.child else parent(args)


if __name__ == "__main__":
    sys.exit(main())
