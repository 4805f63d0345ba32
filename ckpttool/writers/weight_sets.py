"""A Hugging Face folder's weight sets: one ``model.safetensors``, or shards and their index.

A folder must never hold both sets once ckpttool has written one (transformers reads one and
other tools the other): writing one set replaces the other, as one atomic step, and only with
``force`` (:mod:`.atomic` does the writing; this module says what is replaced and refuses).
"""

from __future__ import annotations

import os
import re

from ..errors import CheckpointError


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


_SHARD = re.compile(
    r"model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json|model\.safetensors"
)
SINGLE = "model.safetensors"  # a Hugging Face folder's one-file weight set


def is_shard_output(name: str) -> bool:
    """A file of a Hugging Face folder's safetensors weights (one file, or shards and their
    index): ``to-safetensors --max-shard-size`` replaces them all as one set (with --force)."""
    return _SHARD.fullmatch(name) is not None


def displaced_set(dst: str) -> list[str]:
    """The sharded weight set (index, shards) beside ``dst`` that writing ``dst`` replaces:
    a folder must never hold both ``model.safetensors`` and shards that may disagree, since
    transformers reads one and other tools the other. Empty unless ``dst`` is
    ``model.safetensors``."""
    if os.path.basename(dst) != SINGLE:
        return []
    parent = os.path.dirname(os.path.abspath(dst))
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return []
    return [n for n in names if is_shard_output(n) and n != SINGLE]


def _check_set(
    shown: str, files: list[str], folder: str, replaced: list[str], force: bool, *, shards: bool
) -> None:
    """Refuse replacing the weight set ``replaced`` (names in ``folder``) without ``force``, and
    always when it holds a file of the input (``shards``: the output is a folder of shards)."""
    for name in replaced:
        if any(_same_file(s, os.path.join(folder, name)) for s in files):
            if shards:
                raise CheckpointError(shown, f"output is the input file ({name})")
            raise CheckpointError(
                shown, f"writing it would replace the input's {name}: write it elsewhere"
            )
    if not replaced or force:
        return
    if shards and replaced == [SINGLE]:  # shards into a folder holding model.safetensors
        what = SINGLE
        new = "shards beside it make"
    elif not shards:  # model.safetensors into a folder of shards
        count = sum(1 for n in replaced if not n.endswith(".json"))
        index = [n for n in replaced if n.endswith(".json")]
        what = f"sharded weights ({', '.join([*index, f'{count} shards'])})"
        new = f"{SINGLE} beside them makes"
    else:
        raise CheckpointError(shown, "output exists", remedy="force")
    raise CheckpointError(
        shown, f"the folder holds {what}: {new} a second weight set", remedy="force_set"
    )
