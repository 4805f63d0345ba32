"""Hugging Face safetensors shards: their names, their index, and writing a set of them.

``model-00001-of-00003.safetensors`` ... plus ``model.safetensors.index.json`` (``weight_map``:
tensor name -> shard file, ``metadata.total_size``), as ``save_pretrained`` writes them. The set
is written into a temp folder and moved in as a whole (``atomic.atomic_shards``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from .atomic import atomic_shards

INDEX_NAME = "model.safetensors.index.json"


def shard_name(i: int, n: int) -> str:
    """The file name of shard ``i`` (1-based) of ``n``."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def write_shards(
    dst: str, shards: list[list[Any]], total: int, write_one: Callable[[str, list[Any]], None]
) -> list[str]:
    """Write ``shards`` (lists of items with a ``name``) into the folder ``dst`` with their
    index, atomically; ``write_one(path, items)`` writes (and verifies) one shard file.

    Returns:
        The files written, the index last.
    """
    files: list[str] = []
    n = len(shards)
    with atomic_shards(dst) as tmpdir:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, 1):
            fname = shard_name(i, n)
            path = os.path.join(tmpdir, fname)
            open(path, "wb").close()
            write_one(path, shard)
            weight_map.update((it.name, fname) for it in shard)
            files.append(os.path.join(dst, fname))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(tmpdir, INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    files.append(os.path.join(dst, INDEX_NAME))
    return files
