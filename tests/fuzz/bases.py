"""Valid base files to mutate: real ``torch.save`` / ``safetensors`` output plus a few
corpus cases (protocol 4, big-endian, a user class, two payloads). The payload bases
embed the marker path of the folder they are written to, so a mutated payload that
somehow runs leaves the marker behind."""

from __future__ import annotations

from pathlib import Path

try:
    from ..hostile import corpus
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from hostile import corpus

CORPUS_BASES = (
    "ok_protocol4_memoized",
    "ok_big_endian_byteorder",
    "ok_pickled_module_object",
    "ok_basic_legacy",
    "st_ok_basic",
    "payload_os_system",
    "legacy_payload_in_main",
)


def make_bases(folder: Path) -> list[bytes]:
    """Write nothing permanent; return the bytes of every base (folder: for the payloads)."""
    folder = Path(folder)
    out: list[bytes] = []
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of the project
        torch = None
    if torch is not None:
        t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        sd = {
            "model.w": t,
            "model.view": t[1:, ::2],
            "model.h": torch.ones(5, dtype=torch.float16),
            "step": 3,
            "cfg": {"lr": 0.1, "names": ["a", "b"]},
        }
        tmp = folder / ".base.pt"
        torch.save(sd, tmp)
        out.append(tmp.read_bytes())
        torch.save(sd, tmp, _use_new_zipfile_serialization=False)
        out.append(tmp.read_bytes())
        tmp.unlink()
        try:
            from safetensors.torch import save
        except ImportError:  # pragma: no cover
            pass
        else:
            out.append(save({"w": t, "h": torch.ones(5, dtype=torch.float16)}, {"f": "pt"}))
    for cid in CORPUS_BASES:
        sub = folder / f".base-{cid}"
        sub.mkdir(exist_ok=True)
        p = corpus.CASES_BY_ID[cid].build(sub)
        out.append(p.read_bytes())
        p.unlink()
    return out


def marker_paths(folder: Path) -> list[Path]:
    return [corpus.marker_path(Path(folder) / f".base-{cid}") for cid in CORPUS_BASES]


# -- bases for the structure-aware oracle fuzzer (tests/fuzz/oracle_fuzz.py) -------------------
FIXTURE_BASES = (
    "ddp_rank0_checkpoint.pt",
    "tied_weights.pt",
    "fp16_bf16.pt",
    "lightning_style.ckpt",
    "noncontiguous_view.pt",
    "legacy_format.pt",
)


def structured_bases(folder: Path) -> list[tuple[str, str, bytes]]:
    """(name, format, bytes): committed fixtures, ``torch.save`` outputs (zip protocols 2 and 4,
    legacy), a pre-1.0 tar checkpoint, a plain pickle and a numpy object array. Formats: zip,
    legacy, tar, pickle, npy."""
    import argparse
    import io
    import pickle

    from .stream_mut import tar_checkpoint

    repo = Path(__file__).resolve().parents[2]
    out: list[tuple[str, str, bytes]] = []
    for name in FIXTURE_BASES:
        data = (repo / "fixtures" / name).read_bytes()
        out.append((name, "zip" if data.startswith(b"PK") else "legacy", data))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import numpy as np
        import torch
    except ImportError:  # pragma: no cover - torch and numpy are test dependencies
        return out
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd = {"w": t, "view": t[1:, ::2], "h": torch.ones(2, dtype=torch.float16), "step": 3}
    sd["ns"] = argparse.Namespace(lr=0.5)
    for label, kw in (("torch-p2.pt", {}), ("torch-p4.pt", {"pickle_protocol": 4})):
        tmp = folder / label
        torch.save(sd, tmp, **kw)
        data = _pin_serialization_id(tmp.read_bytes())
        tmp.unlink()
        out.append((label, "zip", data))
    from ckpttool.testing import save_legacy  # torch's legacy writer, storage keys pinned

    buf = io.BytesIO()
    save_legacy(sd, buf)
    out.append(("torch-legacy.pt", "legacy", buf.getvalue()))
    out.append(("tar-pre-1.0.pt", "tar", tar_checkpoint()))
    plain = {"a": [1, 2], "ns": argparse.Namespace(x=1), "t": (1.5, "s")}
    out.append(("plain-p2.pkl", "pickle", pickle.dumps(plain, 2)))
    out.append(("plain-p4.pkl", "pickle", pickle.dumps(plain, 4)))
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    out.append(("objects.npy", "npy", buf.getvalue()))
    return out


def _pin_serialization_id(data: bytes) -> bytes:
    """torch.save's ``.data/serialization_id`` (random) set to zeros, its CRCs fixed in place,
    so that the same code gives the same base (and the oracle's cache serves the next run)."""
    import io
    import struct
    import zipfile
    import zlib

    if not data.startswith(b"PK"):
        return data
    buf = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = next(
            (i for i in zf.infolist() if i.filename.endswith(".data/serialization_id")), None
        )
        cd = zf.start_dir
    if info is None or info.compress_type != 0:
        return data
    at = info.header_offset
    n, m = struct.unpack("<HH", buf[at + 26 : at + 30])
    start = at + 30 + n + m
    new = b"0" * info.file_size
    crc = struct.pack("<I", zlib.crc32(new))
    buf[start : start + info.file_size] = new
    end = start + info.file_size
    if buf[end : end + 4] == b"PK\x07\x08":  # the data descriptor torch writes
        buf[end + 4 : end + 8] = crc
    pos = cd
    while buf[pos : pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack("<HHH", buf[pos + 28 : pos + 34])
        if buf[pos + 46 : pos + 46 + n].decode("utf-8", "replace") == info.filename:
            buf[pos + 16 : pos + 20] = crc
        pos += 46 + n + m + k
    return bytes(buf)
