"""Reading torch.distributed.checkpoint folders written by real FSDP2 + ``dcp.save`` on CPU.

The folders are made once per session by 4 gloo processes (a small GPT-like model with tied
embeddings, AdamW state, a buffer, an uneven and an empty-on-some-ranks shard, and DTensors
sharded along dim 1 and on a 2-D mesh); ranks 0 and 1 then save again as a world of 2.
torch's own ``dcp_to_torch_save`` is the oracle.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ckpttool.errors import CheckpointError, DangerousCheckpointError
from ckpttool.readers import dcp as dcp_reader
from ckpttool.readers import open_checkpoint
from ckpttool.readers.distributed import DistributedCheckpoint

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.checkpoint")

WORKER = textwrap.dedent(
    """
    import datetime, os, sys
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    rank, ports, out = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]

    class Block(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.ln1 = torch.nn.LayerNorm(d)
            self.qkv = torch.nn.Linear(d, 3 * d)
            self.proj = torch.nn.Linear(d, d)
            self.fc = torch.nn.Linear(d, 4 * d)
            self.out = torch.nn.Linear(4 * d, d)

        def forward(self, x):
            q, k, v = self.qkv(self.ln1(x)).chunk(3, -1)
            x = x + self.proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
            return x + self.out(torch.relu(self.fc(x)))

    class GPT(torch.nn.Module):
        def __init__(self, vocab=67, d=24):
            super().__init__()
            self.tok = torch.nn.Embedding(vocab, d)
            self.pos = torch.nn.Parameter(torch.randn(16, d))
            self.tiny = torch.nn.Parameter(torch.randn(3, 5))  # fewer rows than ranks
            self.blocks = torch.nn.ModuleList(Block(d) for _ in range(2))
            self.ln = torch.nn.LayerNorm(d)
            self.head = torch.nn.Linear(d, vocab, bias=False)
            self.head.weight = self.tok.weight  # tied
            self.register_buffer("mask", torch.tril(torch.ones(16, 16)))
            self.register_buffer("counts", torch.arange(7, dtype=torch.int64))

        def forward(self, idx):
            x = self.tok(idx) + self.pos[: idx.shape[1]] + self.tiny.sum()
            for b in self.blocks:
                x = b(x)
            return self.head(self.ln(x))

    def save(world, port, folder):
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=240),
        )
        torch.manual_seed(0)
        mesh = init_device_mesh("cpu", (world,))
        model = GPT()
        for b in model.blocks:
            fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(2):
            model(torch.randint(0, 67, (2, 8))).sum().backward()
            opt.step()
            opt.zero_grad()
        msd, osd = get_state_dict(model, opt)
        w = torch.arange(60, dtype=torch.float32).reshape(6, 10)
        tp = {"cols": distribute_tensor(w, mesh, [Shard(1)])}
        if world == 4:
            mesh2 = init_device_mesh("cpu", (2, 2))
            tp["grid"] = distribute_tensor(w.to(torch.bfloat16), mesh2, [Shard(0), Shard(1)])
        state = {"model": msd, "optim": osd, "step": 2, "extra": {"epoch": 1, "note": "hi"},
                 "tp": tp}
        dcp.save(state, checkpoint_id=folder)
        dist.barrier()
        dist.destroy_process_group()

    save(4, ports[0], os.path.join(out, "w4"))
    if rank < 2:
        save(2, ports[1], os.path.join(out, "w2"))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_dcp_folders(out: Path) -> dict[int, Path]:
    """Run FSDP2 + dcp.save with 4 and then 2 gloo ranks on CPU; {world size: folder}."""
    script = out / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    ports = f"{_free_port()},{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), ports, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(4)
    ]
    try:
        logs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:  # a rank that failed leaves the others waiting at a barrier
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"a DCP fixture rank failed:\n{log[-3000:]}")
    return {4: out / "w4", 2: out / "w2"}


_CACHE: dict[str, dict[int, Path]] = {}


def dcp_folders(factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The session's DCP folders (made once, shared by test_dcp and test_consolidate)."""
    if "folders" not in _CACHE:
        _CACHE["folders"] = make_dcp_folders(factory.mktemp("dcp"))
    return _CACHE["folders"]


def torch_consolidated(folder: Path, tmp: Path) -> dict[str, Any]:
    """What torch's dcp_to_torch_save makes of the folder (loaded back)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"oracle-{folder.name}.pt"
    if not out.exists():
        dcp_to_torch_save(str(folder), str(out))
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="session")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    return dcp_folders(tmp_path_factory)


@pytest.fixture(scope="session")
def oracle(folders: dict[int, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("oracle")
    return {w: torch_consolidated(f, tmp) for w, f in folders.items()}


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flat(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: obj}


def _read_logical(dc: DistributedCheckpoint, name: str) -> Any:
    """A logical tensor's values, assembled from its segments by plain reads."""
    t = dc.by_name()[name]
    buf = bytearray(t.nbytes)
    for seg in t.segments:
        with open(seg.file, "rb") as f:
            f.seek(seg.offset)
            buf[seg.dest : seg.dest + seg.nbytes] = f.read(seg.nbytes)
    if not buf:
        return torch.empty(t.shape, dtype=getattr(torch, t.dtype))
    return torch.frombuffer(buf, dtype=getattr(torch, t.dtype)).reshape(t.shape)


# -- reading ------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 4])
def test_logical_tensors_equal_torch(folders: dict[int, Path], oracle: Any, world: int) -> None:
    dc = dcp_reader.read(str(folders[world]))
    assert dc.kind == "dcp" and dc.world_size == world
    want = _flat(oracle[world])
    tensors = {k: v for k, v in want.items() if isinstance(v, torch.Tensor)}
    assert sorted(t.name for t in dc.tensors) == sorted(tensors)
    for t in dc.tensors:
        ref = tensors[t.name]
        assert t.dtype == str(ref.dtype).removeprefix("torch."), t.name
        assert t.shape == tuple(ref.shape), t.name
        assert torch.equal(_read_logical(dc, t.name), ref), t.name
    for name, value in dc.entries.items():  # non-tensor values, found where torch nests them
        node = oracle[world]
        for part in dc.facts["paths"][name]:
            node = node[part]
        assert node == value and type(node) is type(value), name
    assert {"step", "extra.note", "optim.param_groups.0.params"} <= set(dc.entries)


def test_layout_facts(folders: dict[int, Path]) -> None:
    dc = dcp_reader.read(str(folders[4]))
    by = dc.by_name()
    assert len(by["model.tok.weight"].segments) == 4  # FSDP2: one dim-0 chunk per rank
    assert len(by["model.mask"].segments) == 1  # a replicated buffer is stored once
    assert len(by["tp.cols"].segments) == 6 * 4  # a dim-1 shard is one segment per row
    assert by["tp.grid"].dtype == "bfloat16" and len(by["tp.grid"].segments) == 6 * 2
    assert by["model.tiny"].shape == (3, 5)
    assert by["optim.state.tok.weight.step"].shape == ()
    assert {t.group for t in dc.tensors} == {"model", "optimizer", "other"}
    assert by["model.head.weight"].group == "model"  # tied weights are stored twice
    assert {f for f, _ in dc.files} >= {str(folders[4] / f"__{r}_0.distcp") for r in range(4)}


def test_open_checkpoint_presents_the_nested_structure(
    folders: dict[int, Path], oracle: Any
) -> None:
    ckpt = open_checkpoint(folders[2])
    assert ckpt.format == "dcp"
    assert list(ckpt.root) == list(oracle[2])  # nested, in torch's order
    assert list(ckpt.root["model"]) == list(oracle[2]["model"])
    assert ckpt.root["step"] == 2
    assert ckpt.root["optim"]["param_groups"][0]["lr"] == 0.001
    names = {t.name for t in ckpt.tensors()}
    assert "model.blocks.0.qkv.weight" in names
    assert "optim.state.blocks.0.qkv.weight.exp_avg" in names
    assert all(g.startswith(("torch.", "collections.")) for g in ckpt.globals)


def test_inspect_cli_describes_the_folder(folders: dict[int, Path], oracle: Any) -> None:
    from click.testing import CliRunner

    from ckpttool.cli import cli

    res = CliRunner().invoke(cli, ["inspect", str(folders[4])])
    assert res.exit_code == 0, res.output
    assert "(DCP), 4 ranks, 5 files" in res.output
    n_model = len(oracle[4]["model"])
    assert f"- model state dict 'model': {n_model} tensors" in res.output
    res = CliRunner().invoke(cli, ["inspect", str(folders[4]), "--json"])
    assert res.exit_code == 0
    import json

    rep = json.loads(res.output)
    dist = rep["distributed"]
    assert dist["kind"] == "dcp" and dist["world_size"] == 4
    assert dist["model_tensors"] == n_model
    assert dist["optimizer_tensors"] == len(_flat(oracle[4]["optim"]["state"]))
    assert dist["consolidates_into"]["model"]["tensors"] == n_model


# -- hostile and unsupported folders --------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rewrite_metadata(folder: Path, edit: Any) -> None:
    """Load .metadata with torch's real classes, edit it, pickle it back."""
    with open(folder / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own fixture, written by torch a moment ago
    edit(md)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f)


def test_refuses_transforms(folders: dict[int, Path], tmp_path: Path) -> None:
    bad = _copy(folders[2], tmp_path / "t")

    def edit(md: Any) -> None:
        first = next(iter(md.storage_data))
        md.storage_data[first].transform_descriptors = ["zstd"]

    _rewrite_metadata(bad, edit)
    with pytest.raises(CheckpointError, match=r"transforms.*zstd"):
        open_checkpoint(bad)


def test_refuses_unknown_global(folders: dict[int, Path], tmp_path: Path) -> None:
    bad = _copy(folders[2], tmp_path / "u")
    data = (bad / ".metadata").read_bytes()
    (bad / ".metadata").write_bytes(
        data.replace(b"BytesStorageMetadata", b"BytesStorageMetadatX", 1)
    )
    with pytest.raises(CheckpointError, match="BytesStorageMetadatX"):
        open_checkpoint(bad)


def test_refuses_dangerous_metadata(tmp_path: Path) -> None:
    bad = tmp_path / "d"
    bad.mkdir()
    (bad / ".metadata").write_bytes(b"\x80\x04cos\nsystem\n(S'echo hi'\ntR.")
    with pytest.raises(DangerousCheckpointError, match=r"os\.system"):
        open_checkpoint(bad)


def test_refuses_paths_outside_the_folder(folders: dict[int, Path], tmp_path: Path) -> None:
    bad = _copy(folders[2], tmp_path / "p")

    def edit(md: Any) -> None:
        first = next(iter(md.storage_data))
        md.storage_data[first].relative_path = "../../etc/passwd"

    _rewrite_metadata(bad, edit)
    with pytest.raises(CheckpointError, match="unexpected file"):
        open_checkpoint(bad)


def test_refuses_truncated_shard(folders: dict[int, Path], tmp_path: Path) -> None:
    bad = _copy(folders[2], tmp_path / "tr")
    shard = bad / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(bad)


def test_refuses_missing_chunk(folders: dict[int, Path], tmp_path: Path) -> None:
    bad = _copy(folders[2], tmp_path / "m")

    def edit(md: Any) -> None:
        tsm = md.state_dict_metadata["model.pos"]
        tsm.chunks = tsm.chunks[:1]

    _rewrite_metadata(bad, edit)
    with pytest.raises(CheckpointError, match=r"do not cover|hold"):
        open_checkpoint(bad)


def test_chunk_segments_for_boxes() -> None:
    segs = dcp_reader._chunk_segments((4, 6), 4, (2, 3), (2, 3), "f", 100)
    assert [(s.offset, s.nbytes, s.dest) for s in segs] == [(100, 12, 60), (112, 12, 84)]
    assert dcp_reader._chunk_segments((4, 6), 2, (2, 0), (2, 6), "f", 0)[0].dest == 24
    assert dcp_reader._chunk_segments((0, 6), 2, (0, 0), (0, 6), "f", 0) == []


def _placeholder(name: str, state: Any = None, *args: Any) -> Any:
    from ckpttool.model import Opaque

    cls = type(name.rsplit(".", 1)[1], (Opaque,), {"__ck_global__": name})
    obj = cls.__new__(cls, *args)
    obj.__setstate__(state)
    return obj


def test_tensor_properties_across_torch_versions() -> None:
    """Tuple state (__getstate__ since torch 2.0), dict state (a plain dataclass), the older
    home in torch.distributed._shard, and a layout pickled through _get_layout."""
    from ckpttool.model import Opaque
    from ckpttool.unpickling.unpickler import DTypeRef

    strided = type("strided", (Opaque,), {"__ck_global__": "torch.strided"})
    enc = _placeholder("torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING", None, 0)
    new = _placeholder(
        "torch.distributed.checkpoint.metadata.TensorProperties",
        (DTypeRef("bfloat16"), strided, False, enc, False),
    )
    old = _placeholder(
        "torch.distributed._shard.sharded_tensor.metadata.TensorProperties",
        {"dtype": DTypeRef("float16"), "layout": strided, "requires_grad": False},
    )
    via_layout = _placeholder(
        "torch.distributed.checkpoint.metadata.TensorProperties",
        (DTypeRef("int8"), _placeholder("torch.serialization._get_layout", None, "torch.strided")),
    )
    assert dcp_reader._dtype_of(new, "x", "m") == "bfloat16"
    assert dcp_reader._dtype_of(old, "x", "m") == "float16"
    assert dcp_reader._dtype_of(via_layout, "x", "m") == "int8"
    sparse = type("sparse_coo", (Opaque,), {"__ck_global__": "torch.sparse_coo"})
    bad = _placeholder(
        "torch.distributed.checkpoint.metadata.TensorProperties",
        (DTypeRef("float32"), sparse, False, enc, False),
    )
    with pytest.raises(CheckpointError, match=r"layout 'torch\.sparse_coo'"):
        dcp_reader._dtype_of(bad, "x", "m")


def test_flat_keys_without_planner_data(folders: dict[int, Path], tmp_path: Path) -> None:
    flat = _copy(folders[2], tmp_path / "flat")

    def edit(md: Any) -> None:
        md.planner_data = None

    _rewrite_metadata(flat, edit)
    ckpt = open_checkpoint(flat)
    assert "model.tok.weight" in ckpt.root and ckpt.root["step"] == 2
    dc = ckpt.facts["distributed"]
    assert dc.by_name()["model.tok.weight"].group == "model"
    assert dc.by_name()["optim.state.tok.weight.exp_avg"].group == "optimizer"


def test_safetensors_serialization_format(tmp_path: Path) -> None:
    """``FileSystemWriter(serialization_format=SAFETENSORS)`` appends one safetensors file per
    rank after the pickled values; every tensor item points at its start."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

    saved = {
        "model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)},
        "step": 3,
    }
    folder = tmp_path / "st"
    writer = FileSystemWriter(str(folder), serialization_format=SerializationFormat.SAFETENSORS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: torch warns that it saves alone
        dcp.save(saved, storage_writer=writer, no_dist=True)
    dc = dcp_reader.read(str(folder))
    assert dc.entries == {"step": 3}
    for name, ref in saved["model"].items():
        assert torch.equal(_read_logical(dc, f"model.{name}"), ref)


def test_refuses_item_that_contradicts_the_metadata(
    folders: dict[int, Path], tmp_path: Path
) -> None:
    bad = _copy(folders[2], tmp_path / "c")

    def edit(md: Any) -> None:
        chunk = md.state_dict_metadata["model.pos"].chunks[0]
        chunk.sizes = torch.Size([chunk.sizes[0] - 1, *chunk.sizes[1:]])

    _rewrite_metadata(bad, edit)
    with pytest.raises(CheckpointError, match=r"item 'model\.pos' holds a float32 tensor"):
        open_checkpoint(bad)


# -- the metadata is read as few times as it can be (issue 22: consolidation speed) ----------------
def test_a_folders_metadata_is_read_once_for_its_verdict(
    folders: dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four .distcp files, one reading of .metadata into their items (it was one per file)."""
    calls: list[str] = []
    real = dcp_reader.item_ranges

    def counted(folder: str) -> Any:
        calls.append(folder)
        return real(folder)

    monkeypatch.setattr(dcp_reader, "item_ranges", counted)  # the readers import it late
    dc = open_checkpoint(folders[4])
    assert dc.verdict is not None and dc.verdict.safe
    assert calls == [str(folders[4])]


def test_a_bad_metadata_is_read_once_and_still_makes_every_file_unreadable(
    folders: dict[int, Path], tmp_path: Path
) -> None:
    from ckpttool.unpickling.discover import scan_file, scan_files

    bad = _copy(folders[4], tmp_path / "m")
    calls: list[str] = []

    def broken(folder: str) -> Any:
        calls.append(folder)
        raise CheckpointError(folder, "is unreadable on purpose")

    files = sorted(str(p) for p in bad.glob("*.distcp"))
    verdict = scan_files(files, dcp_items=broken)
    assert len(calls) == 1
    assert verdict.kind == "unreadable"
    assert any("unreadable on purpose" in r for r in verdict.reasons("unreadable"))
    for f in files:  # each file alone says the same, so merging lost nothing
        assert scan_file(f, dcp_items=broken).reasons("unreadable") == verdict.reasons(
            "unreadable"
        )


def test_the_metadata_the_verdict_walked_is_not_walked_again(
    folders: dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader's pre-pass over a pickle (pickletools, ~0.1 s for a big .metadata) is skipped
    for the bytes the verdict's walk parsed whole; a pickle with bytes after its STOP is not
    one of them."""
    from ckpttool.unpickling import loaders, parsed, scan
    from ckpttool.unpickling.loaders import Found

    walked: list[int] = []
    monkeypatch.setattr(scan, "_scan", lambda f, end: walked.append(end) or (None, None))
    parsed._PARSED.clear()
    data = (folders[4] / ".metadata").read_bytes()
    open_checkpoint(folders[4])
    assert walked and len(data) not in walked  # the items' pickles were; the metadata not
    assert parsed.was_parsed(data)
    parsed._PARSED.clear()
    loaders.pickle_chain(data + b"junk", 0, len(data) + 4, "x", Found())
    assert not parsed.was_parsed(data) and not parsed.was_parsed(data + b"junk")


def test_a_metadata_the_verdict_unpickled_is_not_unpickled_again(
    folders: dict[int, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a folder unpickles its .metadata once: the read takes the tree the verdict's
    item list made of the same bytes. Bytes that changed in between are unpickled afresh."""
    from ckpttool.unpickling import scan

    real = scan.unpickle
    metas: list[str] = []

    def counted(path: str, *args: Any, **kwargs: Any) -> Any:
        if path.endswith(".metadata"):
            metas.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(scan, "unpickle", counted)
    whole = open_checkpoint(folders[4])
    assert len(metas) == 1
    folder = _copy(folders[4], tmp_path / "m")
    dcp_reader.item_ranges(str(folder))
    assert len(metas) == 2
    with open(folder / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own fixture, written by torch a moment ago
    (folder / ".metadata").write_bytes(pickle.dumps(md, protocol=2))  # the same tree, new bytes
    again = dcp_reader.read(str(folder))
    assert len(metas) == 3
    first = dcp_reader.read(str(folders[4]))
    assert [t.name for t in again.tensors] == [t.name for t in first.tensors]
    assert len(first.tensors) == len(whole.tensors())


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_every_item_byte_the_read_takes_was_advised_first(
    folders: dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder out of the page cache has its items' headers, pickles and directories read in
    one queue: every read of a .distcp file while the folder is read lies in a range advised
    (``WILLNEED``) before it, and each item's first and last bytes were advised."""
    from ckpttool.readers import dcp_items

    monkeypatch.setattr(dcp_items, "ADVISE_MIN", 1)  # the fixture's files hold few items
    folder = str(folders[4])
    items = dcp_reader.item_ranges(folder)
    inode = {os.stat(f).st_ino: f for f, *_ in items}
    advised: list[tuple[str, int, int]] = []
    reads: list[tuple[str, int, int]] = []
    fadvise, pread, preadv = os.posix_fadvise, os.pread, os.preadv

    def file_of(fd: int) -> str | None:
        return inode.get(os.fstat(fd).st_ino)

    def spy_fadvise(fd: int, off: int, n: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_WILLNEED
        advised.append((str(file_of(fd)), off, off + n))
        fadvise(fd, off, n, advice)

    def spy_pread(fd: int, n: int, off: int) -> bytes:
        got = pread(fd, n, off)
        if file_of(fd) is not None:
            reads.append((str(file_of(fd)), off, off + len(got)))
        return got

    def spy_preadv(fd: int, buffers: Any, off: int) -> int:
        got = preadv(fd, buffers, off)
        if file_of(fd) is not None:
            reads.append((str(file_of(fd)), off, off + got))
        return got

    monkeypatch.setattr(os, "posix_fadvise", spy_fadvise)
    monkeypatch.setattr(os, "pread", spy_pread)
    monkeypatch.setattr(os, "preadv", spy_preadv)
    dcp_reader.read(folder)
    assert reads
    for f, start, end in reads:
        assert any(f == g and a <= start and end <= b for g, a, b in advised), (f, start, end)
    for f, off, length, _plain in items:
        assert (f, off, off + min(length, dcp_items.EDGE)) in advised
        assert (f, off + length - min(length, dcp_items.EDGE), off + length) in advised or (
            length <= dcp_items.EDGE
        )
