"""Cloning instead of copying (issue 22) on filesystems that share extents.

A session fixture formats a small loop image as XFS (``-m reflink=1``) and as btrfs and mounts
it; the writers run with input and output on it, torch (or safetensors) loads the outputs and
compares them with the inputs, and FIEMAP shows that the big records share the input's blocks.
Everything here skips when this process is not root, the mkfs tools are missing or the mount
fails; elsewhere (ext4, tmpfs) the same writers copy, which the rest of the suite tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpttool
from ckpttool.readers import open_checkpoint
from ckpttool.writers import clone
from ckpttool.writers import copy as bytecopy

BLOCK = 4096
IMAGE_BYTES = 512 << 20  # sparse: only what is written takes space
MKFS = {"xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q"]}


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session", params=sorted(MKFS))
def reflink_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A folder on a freshly mounted loop image of a filesystem that can clone."""
    kind: str = request.param
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a loop image needs root")
    if shutil.which(MKFS[kind][0]) is None or shutil.which("mount") is None:
        pytest.skip(f"{MKFS[kind][0]} is not installed")
    base = tmp_path_factory.mktemp(f"{kind}-image")
    image, mnt = base / "fs.img", base / "mnt"
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    made = _run([*MKFS[kind], os.fspath(image)])
    if made.returncode:
        image.unlink()
        pytest.skip(f"{MKFS[kind][0]} failed: {made.stderr.strip()}")
    mnt.mkdir()
    mounted = _run(["mount", "-o", "loop", os.fspath(image), os.fspath(mnt)])
    if mounted.returncode:
        image.unlink()
        pytest.skip(f"cannot mount a loop {kind} image: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        if _run(["umount", os.fspath(mnt)]).returncode:
            _run(["umount", "-l", os.fspath(mnt)])
        image.unlink()


@pytest.fixture
def work(reflink_dir: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """An empty folder on the reflink filesystem for one test."""
    folder = reflink_dir / request.node.name.replace("/", "_")[:100]
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _tensors(n: int = 4) -> dict[str, torch.Tensor]:
    """Integer-valued tensors of several dtypes, most of them many blocks long (odd sizes, so
    that records start at every phase), plus small ones."""
    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        k = 100_003 + 7919 * i
        out[f"module.layer{i}.weight"] = (torch.arange(k, dtype=torch.float32) % 251 - i).reshape(k)
        out[f"module.layer{i}.half"] = (torch.arange(k + 1) % 97).to(torch.float16)
        out[f"module.layer{i}.bias"] = torch.arange(5 + i, dtype=torch.bfloat16)
    out["module.steps"] = torch.arange(3 * BLOCK + 5, dtype=torch.int64)
    return out


def _shared_fraction(path: Path, ranges: list[tuple[int, int]]) -> float:
    """The fraction of the whole blocks inside ``ranges`` that FIEMAP flags as shared."""
    fd = os.open(path, os.O_RDONLY)
    try:
        total = shared = 0
        for off, n in ranges:
            lo = -(-off // BLOCK) * BLOCK
            hi = (off + n) // BLOCK * BLOCK
            if hi <= lo:
                continue
            total += hi - lo
            shared += hi - lo if clone.shared(fd, lo, hi - lo) else 0
        return shared / total if total else 0.0
    finally:
        os.close(fd)


def _same_tensors(got: dict[str, Any], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        g = got[name]
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert torch.equal(g.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


# -- the primitives ---------------------------------------------------------------------------
def test_clone_block_says_yes_here_and_no_across_filesystems(work: Path, tmp_path: Path) -> None:
    src = work / "src.bin"
    src.write_bytes(os.urandom(3 * BLOCK))
    fd = os.open(src, os.O_RDONLY)
    try:
        assert clone.clone_block(fd, os.fspath(work)) == BLOCK
        # tmp_path is another filesystem (cloning cannot cross one)
        assert clone.clone_block(fd, os.fspath(tmp_path)) == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("phase", [0, 64, 4032, 1])
def test_copy_range_clones_the_aligned_middle_and_copies_head_and_tail(
    work: Path, phase: int
) -> None:
    data = os.urandom(40 * BLOCK + 123)
    src = work / "src.bin"
    src.write_bytes(data)
    src_off, n = 3 * BLOCK + phase, 30 * BLOCK + 77
    dst = work / "dst.bin"
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        lead = b"h" * (5 * BLOCK + phase)  # the output position has the input's phase
        bytecopy.write_all(dfd, lead)
        got = bytecopy.copy_range(sfd, src_off, n, dfd, None, BLOCK)
        assert os.lseek(dfd, 0, os.SEEK_CUR) == len(lead) + n
        head = -src_off % BLOCK
        assert got == bytecopy.Clone(head, (n - head) // BLOCK * BLOCK)
        assert clone.same_blocks(sfd, src_off + head, dfd, len(lead) + head, got.nbytes)
        assert clone.shared(dfd, len(lead) + head, got.nbytes)
        crc = bytecopy.read_back(dfd, len(lead), n, sfd, src_off, None, got)
        assert crc == bytecopy.crc_range(sfd, src_off, n)
        # another phase cannot be cloned: copied, and nothing is shared
        off2 = os.lseek(dfd, 0, os.SEEK_CUR)
        other = bytecopy.copy_range(sfd, src_off + 8, n, dfd, None, BLOCK)
        assert other == bytecopy.NOT_CLONED
        assert not clone.shared(dfd, -(-off2 // BLOCK) * BLOCK, 8 * BLOCK)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert (
        dst.read_bytes() == lead + data[src_off : src_off + n] + data[src_off + 8 : src_off + 8 + n]
    )


def test_read_back_of_a_claimed_clone_that_is_not_one_reads_and_compares(work: Path) -> None:
    """Extents that do not match fall back to reading: a wrong byte is still found."""
    data = bytearray(os.urandom(8 * BLOCK))
    (work / "a.bin").write_bytes(data)
    data[5 * BLOCK + 9] ^= 1
    (work / "b.bin").write_bytes(data)  # a copy (not shared) with one byte changed
    a = os.open(work / "a.bin", os.O_RDONLY)
    b = os.open(work / "b.bin", os.O_RDONLY)
    try:
        claimed = bytecopy.Clone(0, 8 * BLOCK)
        with pytest.raises(bytecopy.CopyMismatch, match=f"byte {5 * BLOCK + 9}"):
            bytecopy.read_back(b, 0, 8 * BLOCK, a, 0, None, claimed)
        assert not clone.same_blocks(a, 0, b, 0, 8 * BLOCK)
    finally:
        os.close(a)
        os.close(b)


def test_clones_checked_together_from_one_map_per_file(work: Path) -> None:
    """Background.check defers a cloned range's check until its result is asked for, then
    compares it on extent maps fetched once per file: shared ranges pass, head and tail are
    still compared by their bytes, and a claimed clone that is not one is read and caught."""
    data = os.urandom(64 * BLOCK)
    src = work / "src.bin"
    src.write_bytes(data)
    dst = work / "dst.bin"
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o600)
    bg = bytecopy.Background()
    try:
        jobs = []
        for src_off, n in ((BLOCK + 7, 9 * BLOCK), (20 * BLOCK + 100, 30 * BLOCK + 1)):
            pad = (src_off - os.lseek(dfd, 0, os.SEEK_CUR)) % BLOCK
            bytecopy.write_all(dfd, b"p" * pad)
            dst_off = os.lseek(dfd, 0, os.SEEK_CUR)
            got = bytecopy.copy_range(sfd, src_off, n, dfd, None, BLOCK)
            assert got.nbytes
            want = bytecopy.crc_range(sfd, src_off, n)
            job = bg.check(dfd, dst_off, n, sfd, src_off, want, got)
            jobs.append((job, want, src_off + got.start, dst_off + got.start, got.nbytes))
        assert bg.maps is None  # nothing fetched while ranges were still being cloned
        for job, want, *_ in jobs:
            assert job.result() == want
        maps = bg.maps
        assert maps is not None
        for _, _, s_at, d_at, n in jobs:  # the maps say what FIEMAP says range by range
            assert maps.same_blocks(sfd, s_at, dfd, d_at, n)
            assert clone.same_blocks(sfd, s_at, dfd, d_at, n)
            assert not maps.same_blocks(sfd, s_at + BLOCK, dfd, d_at, n - BLOCK)
        # a claimed clone of bytes that were copied (not shared, one byte changed) is read
        a, b = bytearray(data[: 8 * BLOCK]), bytearray(data[: 8 * BLOCK])
        b[5 * BLOCK + 9] ^= 1
        (work / "a.bin").write_bytes(a)
        (work / "b.bin").write_bytes(b)
        fa = os.open(work / "a.bin", os.O_RDONLY)
        fb = os.open(work / "b.bin", os.O_RDONLY)
        try:
            fresh = bytecopy.Background()
            job = fresh.check(fb, 0, 8 * BLOCK, fa, 0, 0, bytecopy.Clone(0, 8 * BLOCK))
            with pytest.raises(bytecopy.CopyMismatch, match="CRC-32"):
                job.result()
            fresh.close()
        finally:
            os.close(fa)
            os.close(fb)
    finally:
        bg.close()
        os.close(sfd)
        os.close(dfd)


# -- the writers --------------------------------------------------------------------------------
def test_convert_strip_module_shares_the_records(work: Path) -> None:
    sd = _tensors()
    sd["module.tied"] = sd["module.layer0.weight"]  # one storage, two names
    ck = {"model": sd, "optimizer": {"state": {0: {"exp_avg": sd["module.layer1.weight"] * 2}}}}
    src, out = work / "in.pt", work / "out.pt"
    torch.save(ck, src)
    result = ckpttool.convert(src, out, strip_prefix="module.")
    assert result.verified and "extents compared" in result.verification
    got = torch.load(out, map_location="cpu", weights_only=True)
    want = torch.load(src, map_location="cpu", weights_only=True)
    _same_tensors(got["model"], {k[len("module.") :]: v for k, v in want["model"].items()})
    assert got["model"]["tied"].data_ptr() == got["model"]["layer0.weight"].data_ptr()
    assert torch.equal(
        got["optimizer"]["state"][0]["exp_avg"], want["optimizer"]["state"][0]["exp_avg"]
    )
    ins, outs = open_checkpoint(src).storages, open_checkpoint(out).storages
    big = [s for s in outs.values() if s.nbytes >= 4 * BLOCK]
    assert big
    for s in big:  # each record keeps its input offset's phase within a block
        assert any(
            s.offset % BLOCK == i.offset % BLOCK and s.nbytes == i.nbytes for i in ins.values()
        )
    assert _shared_fraction(out, [(s.offset, s.nbytes) for s in big]) == 1.0
    # the input is untouched and still loads
    assert torch.equal(
        torch.load(src, weights_only=True)["model"]["module.steps"], sd["module.steps"]
    )


def test_convert_no_verify_and_cast_on_reflink(work: Path) -> None:
    sd = _tensors(2)
    src = work / "in.pt"
    torch.save(sd, src)
    ckpttool.convert(src, work / "nv.pt", verify=False)
    _same_tensors(torch.load(work / "nv.pt", weights_only=True), sd)
    ckpttool.convert(src, work / "half.pt", dtype="float16")
    got = torch.load(work / "half.pt", weights_only=True)
    for name, t in sd.items():
        want = t.to(torch.float16) if t.is_floating_point() else t
        assert torch.equal(got[name], want), name


def test_safetensors_rename_keeps_the_phase_and_shares_the_data(work: Path) -> None:
    sd = {k: v for k, v in _tensors(6).items()}
    src, out = work / "in.safetensors", work / "out.safetensors"
    save_file(sd, os.fspath(src), metadata={"format": "pt"})
    result = ckpttool.to_safetensors(src, out, strip_prefix="module.")
    assert result.verified
    _same_tensors(load_file(os.fspath(out)), {k[len("module.") :]: v for k, v in sd.items()})
    n_in = int.from_bytes(src.read_bytes()[:8], "little")
    n_out = int.from_bytes(out.read_bytes()[:8], "little")
    assert (8 + n_out) % BLOCK == (8 + n_in) % BLOCK  # the header is padded to keep the phase
    assert n_out % 8 == 0
    assert out.read_bytes()[8 + n_out - 1 : 8 + n_out] == b" "
    json.loads(out.read_bytes()[8 : 8 + n_out])  # still one JSON object
    size = out.stat().st_size
    assert _shared_fraction(out, [(8 + n_out, size - 8 - n_out)]) == 1.0


def test_safetensors_rename_of_a_subset_and_with_a_cast(work: Path) -> None:
    """Tensors dropped from the middle and a cast: the rest still lands where it can clone."""
    sd = _tensors(4)
    src = work / "in.safetensors"
    save_file(sd, os.fspath(src))
    out = work / "cast.safetensors"
    ckpttool.to_safetensors(src, out, dtype="bfloat16", replace_prefix=(("module.", "m."),))
    got = load_file(os.fspath(out))
    for name, t in sd.items():
        want = t.to(torch.bfloat16) if t.is_floating_point() else t
        assert torch.equal(got["m." + name[len("module.") :]], want), name
    n_out = int.from_bytes(out.read_bytes()[:8], "little")
    header = json.loads(out.read_bytes()[8 : 8 + n_out])
    steps = header["m.steps"]["data_offsets"]  # int64: copied as it is, and cloned
    assert _shared_fraction(out, [(8 + n_out + steps[0], steps[1] - steps[0])]) == 1.0


def test_pt_to_safetensors_on_reflink_is_exact(work: Path) -> None:
    sd = _tensors(3)
    src, out = work / "in.pt", work / "out.safetensors"
    torch.save({"model": sd, "epoch": 3}, src)
    ckpttool.to_safetensors(src, out, strip_prefix="module.")
    _same_tensors(load_file(os.fspath(out)), {k[len("module.") :]: v for k, v in sd.items()})


def test_sharded_safetensors_on_reflink(work: Path) -> None:
    sd = _tensors(3)
    src = work / "in.safetensors"
    save_file(sd, os.fspath(src))
    ckpttool.to_safetensors(src, work / "shards", max_shard_size=900_000)
    got: dict[str, torch.Tensor] = {}
    for f in sorted((work / "shards").glob("*.safetensors")):
        got.update(load_file(os.fspath(f)))
    _same_tensors(got, sd)


def _dcp(folder: Path, sd: dict[str, torch.Tensor]) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": sd}, checkpoint_id=os.fspath(folder), no_dist=True)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_dcp_consolidation_shares_whole_tensors(work: Path, suffix: str) -> None:
    """A single-process DCP save holds every tensor whole in one file; the first (biggest)
    one starts at a 64-byte aligned offset there, so it can be cloned into either format."""
    sd = {k[len("module.") :]: v for k, v in _tensors(3).items()}
    _dcp(work / "dcp", sd)
    out = work / f"out{suffix}"
    ckpttool.consolidate(work / "dcp", out)
    if suffix == ".pt":
        got = torch.load(out, map_location="cpu", weights_only=True)
    else:
        got = load_file(os.fspath(out))
    _same_tensors(got, sd)
    back = open_checkpoint(out).storages
    shared = {
        k: _shared_fraction(out, [(s.offset, s.nbytes)])
        for k, s in back.items()
        if s.nbytes >= 4 * BLOCK
    }
    assert any(f == 1.0 for f in shared.values()), shared


def test_to_dcp_clones_the_big_records(work: Path) -> None:
    """DCP items of 1 MB or more keep their input record's offset modulo a page: on a
    filesystem that clones they share the input's blocks, and torch reads the folder back."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from ckpttool.ops.to_dcp import to_dcp

    sd = _tensors(2)
    sd["module.big"] = torch.arange(300_007, dtype=torch.float32) % 251
    sd["module.wide"] = torch.arange(400_009, dtype=torch.int32).reshape(400_009, 1)
    src, out = work / "in.pt", work / "out-dcp"
    torch.save({"model": sd, "step": 3}, src)
    to_dcp(src, out)
    dcp_to_torch_save(os.fspath(out), os.fspath(work / "back.pt"))
    back = torch.load(work / "back.pt", weights_only=True)
    _same_tensors(back["model"], sd)
    assert back["step"] == 3
    fd = os.open(out / "__0_0.distcp", os.O_RDONLY)
    try:
        ext = clone.extents(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    assert ext is not None
    shared = sum(length for _, _, length, flags in ext if flags & clone.SHARED)
    big = sd["module.big"].nbytes + sd["module.wide"].nbytes
    assert shared >= big - 4 * BLOCK  # all but each record's partial head and tail blocks


def test_every_fixture_converts_exactly_on_reflink(work: Path) -> None:
    fixtures = Path(__file__).resolve().parent.parent / "fixtures"
    for name in ("single_gpu_state_dict.pt", "fp16_bf16.pt", "tied_weights.pt", "no_crc32.pt"):
        src = work / name
        shutil.copyfile(fixtures / name, src)
        out = work / f"out-{name}"
        ckpttool.convert(src, out)
        want = torch.load(src, map_location="cpu", weights_only=True)
        got = torch.load(out, map_location="cpu", weights_only=True)
        assert type(got) is type(want)
        _same_tensors(_flat(got), _flat(want))


def _flat(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)  # type: ignore[assignment]
    else:
        return {}
    out: dict[str, torch.Tensor] = {}
    for k, v in items:
        out.update(_flat(v, f"{prefix}.{k}"))
    return out


# -- runs of records taken over with their zip framing (writers/zip_runs.py) -------------------
def _entries(path: Path) -> list[Any]:
    import zipfile

    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None  # every entry's bytes match the CRC-32 the directory records
        return zf.infolist()


def test_strip_module_takes_the_records_over_as_one_clone(work: Path) -> None:
    sd = _tensors()
    sd["module.tied"] = sd["module.layer0.weight"]
    src, out = work / "in.pt", work / "out.pt"
    torch.save({"model": sd, "step": 7}, src)
    result = ckpttool.convert(src, out, strip_prefix="module.")
    assert result.verified and "extents compared" in result.verification
    for mmap in (False, True):
        got = torch.load(out, map_location="cpu", weights_only=True, mmap=mmap)
        want = torch.load(src, map_location="cpu", weights_only=True, mmap=mmap)
        _same_tensors(got["model"], {k[len("module.") :]: v for k, v in want["model"].items()})
        assert got["step"] == 7
    ins, outs = _entries(src), _entries(out)
    records = [i for i in ins if "/data/" in i.filename]
    taken = [i for i in outs if "/data/" in i.filename]
    # the input's records, under its names and flags (data descriptors), one block phase
    assert [(i.filename, i.CRC, i.flag_bits) for i in taken] == [
        (i.filename, i.CRC, i.flag_bits) for i in records
    ]
    shift = taken[0].header_offset - records[0].header_offset
    assert shift % BLOCK == 0
    pairs = zip(taken, records, strict=True)
    assert all(o.header_offset - i.header_offset == shift for o, i in pairs)
    # every whole block from the first record's header to the last record's end is shared
    # (the small records between the big ones included)
    start = records[0].header_offset
    end = max(s.offset + s.nbytes for s in open_checkpoint(src).storages.values())
    assert _shared_fraction(out, [(start + shift, end - start)]) == 1.0
    # storage records keep torch's 64-byte alignment
    assert all(s.offset % 64 == 0 for s in open_checkpoint(out).storages.values())


def test_a_run_ends_where_a_record_is_cast(work: Path) -> None:
    sd = {f"module.i{i}": torch.arange(3 * BLOCK + i, dtype=torch.int64) for i in range(3)}
    sd["module.w"] = torch.arange(5 * BLOCK, dtype=torch.float32) % 251  # cast: not taken over
    sd["module.j"] = torch.arange(BLOCK + 3, dtype=torch.int32)
    src, out = work / "in.pt", work / "out.pt"
    torch.save(sd, src)
    ckpttool.convert(src, out, strip_prefix="module.", dtype="float16")
    got = torch.load(out, map_location="cpu", weights_only=True)
    for k, v in sd.items():
        assert torch.equal(got[k[len("module.") :]], v.half() if v.is_floating_point() else v)
    flags = {i.filename.rsplit("/", 1)[1]: i.flag_bits for i in _entries(out)}
    assert [flags[k] & 0x8 for k in "012"] == [0x8, 0x8, 0x8]  # taken over, descriptors too
    assert flags["3"] & 0x8 == 0 and flags["4"] & 0x8 == 0  # written here


def test_our_own_output_is_taken_over_again(work: Path) -> None:
    """Records without data descriptors (this writer's) form a run as well."""
    sd = _tensors(2)
    src, mid, out = work / "in.pt", work / "mid.pt", work / "out.pt"
    torch.save(sd, src)
    ckpttool.convert(src, mid, strip_prefix="module.", dtype="float16")  # written here
    ckpttool.convert(mid, out, add_prefix="net.")
    got = torch.load(out, map_location="cpu", weights_only=True)
    want = torch.load(mid, map_location="cpu", weights_only=True)
    _same_tensors(got, {f"net.{k}": v for k, v in want.items()})
    assert [i.flag_bits & 0x8 for i in _entries(out)] == [0] * len(_entries(out))


def test_a_descriptor_that_disagrees_with_the_directory_ends_the_run(work: Path) -> None:
    from ckpttool.writers.pt_reduce import OutStorage
    from ckpttool.writers.zip_runs import find_run

    sd = {f"k{i}": torch.arange(BLOCK + 16 * i, dtype=torch.int64) for i in range(4)}
    src = work / "in.pt"
    torch.save(sd, src)
    storages = sorted(open_checkpoint(src).storages.values(), key=lambda s: s.offset)
    outs = [OutStorage(s.key, s.dtype, s.numel, s) for s in storages]
    fd = os.open(src, os.O_RDWR)
    try:
        run = find_run(outs, {}, fd)
        assert run is not None and [o.key for o in run.outs] == ["0", "1", "2", "3"]
        # the descriptor after record 2 records another CRC-32: records 0 and 1 only
        end = storages[2].offset + storages[2].nbytes
        assert os.pread(fd, 4, end) == b"PK\x07\x08"
        os.pwrite(fd, bytes([os.pread(fd, 1, end + 4)[0] ^ 1]), end + 4)
        run = find_run(outs, {}, fd)
        assert run is not None and [o.key for o in run.outs] == ["0", "1"]
        # a record whose key changes (a renumbered output) is not taken over
        outs[1].key = "9"
        assert find_run(outs, {}, fd) is None
    finally:
        os.close(fd)


def test_a_run_copied_wrong_fails_the_write(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 'clone' that is a copy with a changed byte: its extents are not the input's, so the
    run is compared byte for byte and the write fails, leaving nothing."""
    from ckpttool.errors import CheckpointError

    sd = _tensors(2)
    src, out = work / "in.pt", work / "out.pt"
    torch.save(sd, src)
    real = clone.clone_range

    def bad_clone(src_fd: int, src_off: int, n: int, dst_fd: int, dst_off: int) -> bool:
        data = bytearray(os.pread(src_fd, n, src_off))
        data[n // 2] ^= 1
        os.pwrite(dst_fd, data, dst_off)
        return True

    monkeypatch.setattr(clone, "clone_range", bad_clone)
    with pytest.raises(CheckpointError, match="corrupt or changed while it was copied"):
        ckpttool.convert(src, out, strip_prefix="module.")
    assert not out.exists() and sorted(p.name for p in work.iterdir()) == ["in.pt"]
    monkeypatch.setattr(clone, "clone_range", real)
    ckpttool.convert(src, out, strip_prefix="module.")
    assert out.exists()
