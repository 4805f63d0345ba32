"""A Hugging Face sharded checkpoint, given its ``*.index.json`` (``weight_map``: name -> shard)."""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import CheckpointError
from ..model import Checkpoint, StorageInfo, TensorRef
from ..source import is_url, join, open_source, parent
from ..tree import iter_tensors

MAX_INDEX_BYTES = 256 * 1000 * 1000


def read(path: str, file_bytes: int) -> Checkpoint:
    from . import open_checkpoint  # shards are opened like any other file

    if file_bytes > MAX_INDEX_BYTES:
        raise CheckpointError(path, "index file is too large")
    try:
        with open_source(path) as f:
            index = json.loads(f.pread(file_bytes, 0).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"index is not valid JSON ({exc})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(path, "index has no weight_map of tensor name to shard file")
    folder = parent(path)
    shards: dict[str, Checkpoint] = {}
    for shard in dict.fromkeys(weight_map.values()):
        if os.path.basename(shard) != shard or shard in (".", "..") or not shard:
            raise CheckpointError(path, f"weight_map names {shard!r}, outside the index's folder")
        shard_path = join(folder, shard)
        if not is_url(shard_path) and not os.path.exists(shard_path):
            raise CheckpointError(path, f"shard {shard} is missing")
        ckpt = open_checkpoint(shard_path, _allow_index=False)
        shards[shard] = ckpt
    root: dict[str, TensorRef] = {}
    storages: dict[str, StorageInfo] = {}
    globals_: list[str] = []
    by_shard = {s: dict(iter_tensors(c.root)) for s, c in shards.items()}
    for name, shard in weight_map.items():
        ref = by_shard[shard].get(name)
        if ref is None:
            raise CheckpointError(path, f"tensor {name!r} is not in its shard {shard}")
        root[name] = ref
    for shard, ckpt in shards.items():
        extra = set(by_shard[shard]) - set(k for k, v in weight_map.items() if v == shard)
        if extra:
            raise CheckpointError(
                path, f"shard {shard} holds {sorted(extra)[0]!r}, which the index does not list"
            )
        for s in ckpt.storages.values():
            storages[f"{shard}:{s.key}"] = s
        globals_ += [g for g in ckpt.globals if g not in globals_]
    facts: dict[str, Any] = {
        "shards": list(shards),
        "index_metadata": index.get("metadata"),
        "metadata": next(iter(shards.values())).facts.get("metadata") if shards else None,
    }
    total = sum(c.file_bytes for c in shards.values())
    return Checkpoint(
        path=path,
        format="hf-sharded",
        file_bytes=total,
        root=root,
        storages=storages,
        globals=globals_,
        facts=facts,
    )
