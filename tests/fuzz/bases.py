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
