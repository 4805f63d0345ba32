"""zip64 end-to-end check (not for CI: writes ~3 files of --size, default 4.5 GiB each).

Builds a DDP-style checkpoint (``{"model": {"module.blocks.N.weight": fp16 filler of 1 GiB,
..., "module.tail.weight": fp32}, "epoch": 1}``, every storage tagged ``cuda:0``) that is bigger
than 4 GiB, so torch writes it as zip64: one filler tensor straddles the 4 GiB file offset and
the LAST tensor, ``module.tail.weight``, starts past it, with known values at its first and last
elements (1234.5 and -4321.25).  The actual data offsets are read back from the zip directory
with the stdlib ``zipfile`` and printed.

Then, each run measured like the other benchmarks (``_harness.py``):

1. ``ckpttool inspect --json IN``: must be fast/small (< 0.3 s, < 100 MB) and must report
   ``module.tail.weight`` with the right shape and dtype (and, if it reports offsets, the
   right data offset);
2. ``ckpttool convert --strip-module -q IN OUT.pt``: the output is opened with
   ``torch.load(mmap=True)``; ``tail.weight`` must hold the known first/last values, the
   straddling tensor must hold the generator's values on both sides of the 4 GiB mark, and
   every tensor must equal the input's;
3. ``ckpttool to-safetensors -q IN OUT.safetensors``: the same checks via
   ``safetensors.safe_open`` (keys may keep ``module.`` here: no ``--strip-module``).

Prints PASS/FAIL lines and a timing table; exit status 1 if anything failed.  The input is
cached (sidecar json) and kept with ``--keep``; outputs are always deleted.

Example::

    .venv/bin/python benchmarks/bench_zip64.py --keep
"""

from __future__ import annotations

import argparse
import contextlib
import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import make_big_checkpoint as mbc
from _harness import (
    Case,
    CaseResult,
    RunStats,
    add_common_args,
    ckpttool_argv,
    emit,
    format_size,
    parse_size,
    python_env,
    remove_outputs,
    run_cases,
)

FOUR_GIB = 1 << 32
FILLER_BYTES = 1 << 30
TAIL_NUMEL = 1_000_003
TAIL_FIRST = 1234.5
TAIL_LAST = -4321.25
TAIL_NAME = "module.tail.weight"
VERSION = 1


# --------------------------------------------------------------------------------------
# building (subprocess; imports torch)


def filler_sizes(total: int) -> list[int]:
    """Byte sizes of the fp16 filler tensors for a file of about ``total`` bytes."""
    body = total - TAIL_NUMEL * 4 - (1 << 20)
    sizes = []
    while body > 0:
        n = min(FILLER_BYTES, body)
        n -= n % 2
        if n <= 0:
            break
        sizes.append(n)
        body -= n
    return sizes


def build(path: Path, total: int) -> None:
    import torch

    sizes = filler_sizes(total)
    arena = mbc.Arena(path.parent, mbc.Arena.bytes_needed([*sizes, TAIL_NUMEL * 4]))
    sd: dict[str, Any] = {}
    for i, nbytes in enumerate(sizes):
        t = arena.tensor((nbytes // 2,), torch.float16)
        mbc.fill(t, i)
        sd[f"module.blocks.{i}.weight"] = t
    tail = arena.tensor((TAIL_NUMEL,), torch.float32)
    mbc.fill(tail, len(sizes))
    tail[0] = TAIL_FIRST
    tail[-1] = TAIL_LAST
    sd[TAIL_NAME] = tail
    mbc.save_tagged({"model": sd, "epoch": 1}, path)


def params(total: int) -> dict[str, Any]:
    return {"zip64_version": VERSION, "size_bytes": total}


def ensure_input(workdir: Path, total: int, force: bool) -> tuple[Path, bool]:
    """(path, created_now)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"zip64_{format_size(total)}.pt"
    side = mbc.sidecar_path(path)
    try:
        info = json.loads(side.read_text())
        if (
            not force
            and info["params"] == params(total)
            and path.stat().st_size == info["file_bytes"]
        ):
            print(f"[gen] reusing {path}", file=sys.stderr)
            return path, False
    except (OSError, ValueError, KeyError):
        pass
    print(f"[gen] generating {path} ...", file=sys.stderr, flush=True)
    subprocess.run(
        [sys.executable, __file__, "_build", str(path), str(total)], check=True, env=python_env()
    )
    side.write_text(json.dumps({"params": params(total), "file_bytes": path.stat().st_size}))
    return path, True


# --------------------------------------------------------------------------------------
# zip layout (stdlib)


def record_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """``{"data/N": (data_offset, nbytes)}`` for the stored records of a torch zip file."""
    out: dict[str, tuple[int, int]] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        for info in zf.infolist():
            fh.seek(info.header_offset)
            local = fh.read(30)
            sig, *_rest = struct.unpack("<IHHHHHIIIHH", local)
            if sig != 0x04034B50:
                raise ValueError(f"bad local header for {info.filename}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            offset = info.header_offset + 30 + name_len + extra_len
            key = info.filename.split("/", 1)[1] if "/" in info.filename else info.filename
            out[key] = (offset, info.file_size)
    return out


def layout(path: Path, n_fillers: int, mark: int = FOUR_GIB) -> dict[str, Any]:
    recs = record_offsets(path)
    tail_key = f"data/{n_fillers}"  # storages are written in pickling order
    straddle = [
        (int(k.split("/")[1]), off, size)
        for k, (off, size) in recs.items()
        if k.startswith("data/") and off < mark < off + size
    ]
    return {
        "mark": mark,
        "file_bytes": path.stat().st_size,
        "tail_offset": recs[tail_key][0],
        "tail_nbytes": recs[tail_key][1],
        "straddle": straddle[0] if straddle else None,
    }


# --------------------------------------------------------------------------------------
# verification (subprocess; imports torch / safetensors)


def _find_tensor_dict(obj: Any, suffix: str) -> dict[str, Any] | None:
    if isinstance(obj, dict):
        if any(isinstance(k, str) and k.endswith(suffix) for k in obj):
            return obj
        for v in obj.values():
            found = _find_tensor_dict(v, suffix)
            if found is not None:
                return found
    return None


def verify(kind: str, out: Path, src: Path, lay: dict[str, Any]) -> list[str]:
    """Compare ``out`` (kind "pt" or "safetensors") with ``src``; returns failure messages."""
    import torch

    failures: list[str] = []
    src_sd = _find_tensor_dict(
        torch.load(src, mmap=True, map_location="cpu", weights_only=True), "tail.weight"
    )
    assert src_sd is not None
    src_by_short = {k.removeprefix("module."): v for k, v in src_sd.items()}

    if kind == "pt":
        loaded = torch.load(out, mmap=True, map_location="cpu", weights_only=True)
        found = _find_tensor_dict(loaded, "tail.weight")
        if found is None:
            return ["no dict with a key ending in 'tail.weight' in the output"]
        out_sd = dict(found)

        def get(name: str) -> Any:
            return out_sd[name]
    else:
        from safetensors import safe_open

        handle = safe_open(str(out), framework="pt")
        out_sd = {k: None for k in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)

        def get(name: str) -> Any:
            return handle.get_tensor(name)

    def out_name(short: str) -> str | None:
        matches = [k for k in out_sd if k == short or k.endswith("." + short)]
        return min(matches, key=len) if matches else None

    if kind == "pt" and any(k.startswith("module.") for k in out_sd):
        failures.append("output keys still start with 'module.' (convert --strip-module)")

    tail_name = out_name("tail.weight")
    if tail_name is None:
        return [*failures, "tail.weight missing from the output"]
    tail = get(tail_name)
    if tail.dtype != torch.float32 or tuple(tail.shape) != (TAIL_NUMEL,):
        failures.append(f"tail.weight is {tail.dtype} {tuple(tail.shape)}")
    else:
        first, last = float(tail[0]), float(tail[-1])
        if first != TAIL_FIRST or last != TAIL_LAST:
            failures.append(
                f"tail.weight first/last = {first}/{last}, want {TAIL_FIRST}/{TAIL_LAST}"
            )
        else:
            print(f"tail.weight[0] = {first}, tail.weight[-1] = {last}")

    if lay["straddle"] is not None:
        index, off, _ = lay["straddle"]
        short = f"blocks.{index}.weight"
        name = out_name(short)
        if name is None:
            failures.append(f"{short} missing from the output")
        else:
            t = get(name)
            b = (lay["mark"] - off) // t.element_size()  # first element at/after the mark
            for i in (b - 1, b):
                want = torch.tensor(mbc.expected_value(index, i), dtype=torch.float16).item()
                got = t.view(-1)[i].item()
                if got != want:
                    failures.append(f"{short}[{i}] = {got}, want {want}")
            print(f"{short}[{b - 1}:{b + 1}] (around the mark) = {t.view(-1)[b - 1 : b + 1]}")

    for short, ref in src_by_short.items():
        name = out_name(short)
        if name is None:
            failures.append(f"{short} missing from the output")
            continue
        t = get(name)
        if t.dtype != ref.dtype or t.shape != ref.shape or not torch.equal(t, ref):
            failures.append(f"{short} differs from the input")
    return failures


# --------------------------------------------------------------------------------------
# inspect --json check (stdlib)


def _walk(obj: Any, path: str = "") -> list[tuple[str, Any]]:
    out = [(path, obj)]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _walk(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _walk(v, f"{path}[{i}]")
    return out


def check_inspect_json(text: str, lay: dict[str, Any]) -> tuple[list[str], str]:
    """Find the tail tensor's entry in ``inspect --json`` output, whatever the schema."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        return [f"inspect --json output is not JSON: {exc}"], ""
    entry: Any = None
    for where, node in _walk(doc):
        if isinstance(node, dict):
            if any(
                isinstance(v, str) and (v == TAIL_NAME or v.endswith("." + TAIL_NAME))
                for v in node.values()
            ):
                entry = node
                break
            if TAIL_NAME in node and isinstance(node[TAIL_NAME], dict):
                entry = node[TAIL_NAME]
                break
        _ = where
    if entry is None:
        return [f"{TAIL_NAME} not found in inspect --json output"], ""
    shown = json.dumps(entry)[:400]
    failures = []
    flat = json.dumps(entry)
    if str(TAIL_NUMEL) not in flat:
        failures.append(f"shape/numel {TAIL_NUMEL} not in the tail entry")
    if "float32" not in flat and "FloatStorage" not in flat and '"F32"' not in flat:
        failures.append("dtype float32 not in the tail entry")
    # a file offset, if the schema has one ("storage_offset" counts elements: not that)
    offsets = [
        v
        for k, v in entry.items()
        if k in {"offset", "data_offset", "file_offset", "byte_offset"} and isinstance(v, int)
    ]
    if offsets and lay["tail_offset"] not in offsets:
        failures.append(f"reported offset(s) {offsets} != actual data offset {lay['tail_offset']}")
    return failures, shown


# --------------------------------------------------------------------------------------


def _internal(argv: list[str]) -> int:
    cmd = argv[0]
    if cmd == "_build":
        build(Path(argv[1]), int(argv[2]))
        return 0
    if cmd == "_verify":
        kind, out, src, lay = argv[1], Path(argv[2]), Path(argv[3]), json.loads(argv[4])
        failures = verify(kind, out, src, lay)
        for f in failures:
            print(f"FAILED: {f}")
        return 1 if failures else 0
    raise SystemExit(f"unknown internal command {cmd}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("_"):
        return _internal(argv)
    ap = argparse.ArgumentParser(
        description="zip64 check: build a >4 GiB checkpoint whose last tensor starts past the "
        "4 GiB mark, then check ckpttool inspect --json / convert / to-safetensors on it. "
        "Needs about 3x --size of free disk. Not for CI.",
        epilog="example: bench_zip64.py --keep",
    )
    ap.add_argument(
        "--size",
        type=parse_size,
        default=parse_size("4.5GiB"),
        help="checkpoint size, must exceed 4GiB (default 4.5GiB)",
    )
    ap.add_argument(
        "--mark",
        type=parse_size,
        default=FOUR_GIB,
        help="file offset the last tensor must start past (default 4GiB; a smaller "
        "value only serves to try this script quickly on a small file)",
    )
    add_common_args(ap)
    ap.set_defaults(repeat=1)
    args = ap.parse_args(argv)
    if args.size <= args.mark + (64 << 20):
        ap.error("--size must exceed --mark (4GiB) by more than 64MiB")

    env = python_env()
    workdir: Path = args.workdir
    path, created = ensure_input(workdir, args.size, args.force_generate)
    n_fillers = len(filler_sizes(args.size))
    checks: list[tuple[str, bool, str]] = []
    results: list[CaseResult] = []
    try:
        lay = layout(path, n_fillers, args.mark)
        ok = lay["tail_offset"] > args.mark and lay["file_bytes"] > args.mark
        checks.append(
            (
                f"input{' (zip64)' if args.mark >= FOUR_GIB else ''}: the last tensor starts "
                f"past {format_size(args.mark)}",
                ok,
                f"file {lay['file_bytes']:,} B, {TAIL_NAME} data at offset {lay['tail_offset']:,}"
                f", straddling record data/{lay['straddle'][0] if lay['straddle'] else '-'}",
            )
        )
        stdout_holder: dict[str, RunStats] = {}

        def keep_stdout(stats: RunStats) -> str | None:
            stdout_holder["inspect"] = stats
            return None

        out_pt = workdir / "zip64.converted.pt"
        out_st = workdir / "zip64.safetensors"
        cp_out = workdir / "zip64.cp-out"
        cases = [
            Case(
                "cp IN OUT",
                ["cp", str(path), str(cp_out)],
                outputs=[cp_out],
                baseline=True,
                warmup=1,
            ),
            Case(
                "ckpttool inspect --json IN",
                ckpttool_argv("inspect", "--json", str(path)),
                env=env,
                capture_stdout=True,
                check=keep_stdout,
                target_wall_s=0.3,
                target_mb=100,
            ),
        ]
        results += run_cases(
            cases,
            repeat=args.repeat,
            warmup=args.warmup,
            sync=not args.no_sync,
            max_load=args.max_load,
        )
        if "inspect" in stdout_holder and stdout_holder["inspect"].returncode == 0:
            fails, shown = check_inspect_json(stdout_holder["inspect"].stdout or "", lay)
            checks.append(
                ("inspect --json reports the tail tensor", not fails, "; ".join(fails) or shown)
            )
        else:
            checks.append(("inspect --json reports the tail tensor", False, "inspect failed"))

        for kind, label, sub, out in (
            (
                "pt",
                "ckpttool convert --strip-module -q IN OUT",
                ["convert", "--strip-module"],
                out_pt,
            ),
            ("safetensors", "ckpttool to-safetensors -q IN OUT", ["to-safetensors"], out_st),
        ):
            case = Case(
                label, ckpttool_argv(*sub, "-q", str(path), str(out)), outputs=[out], env=env
            )
            [res] = run_cases(
                [case],
                repeat=args.repeat,
                warmup=args.warmup,
                sync=not args.no_sync,
                max_load=args.max_load,
                keep_outputs=True,
            )
            results.append(res)
            if res.failed:
                checks.append((f"{sub[0]} output values", False, "command failed"))
            else:
                print(f"[check] verifying {out.name} ...", file=sys.stderr, flush=True)
                proc = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "_verify",
                        kind,
                        str(out),
                        str(path),
                        json.dumps(lay),
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                detail = (proc.stdout + proc.stderr[-2000:]).strip()
                checks.append((f"{sub[0]} output values", proc.returncode == 0, detail))
            remove_outputs([out])
    finally:
        remove_outputs([workdir / "zip64.converted.pt", workdir / "zip64.safetensors"])
        if created and not args.keep:
            remove_outputs([path, mbc.sidecar_path(path)])
        with contextlib.suppress(OSError):
            workdir.rmdir()  # only if empty

    emit(
        "zip64 (> 4 GiB) end-to-end check",
        [(f"{path.name}", results)],
        args.json,
        checks=[{"check": c, "ok": ok, "detail": d} for c, ok, d in checks],
    )
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
        if detail:
            print("    " + detail.replace("\n", "\n    "))
    failed = any(not ok for _, ok, _ in checks) or any(r.failed for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
