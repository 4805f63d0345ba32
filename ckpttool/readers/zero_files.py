"""Finding a DeepSpeed save's files: ``latest``, its tag folder, the model states files.

Decided from ``latest`` and the model states files' zip signature, not from names alone;
:mod:`.deepspeed` reads what these find.
"""

from __future__ import annotations

import re

from ..source import getsize, isdir, isfile, join, listdir, read_bytes

LATEST = "latest"
MODEL_STATES = re.compile(r"mp_rank_(\d+)_model_states\.pt")
ZERO3_MODEL_STATES = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt")


def is_zip(path: str) -> bool:
    try:
        return read_bytes(path, 4) == b"PK\x03\x04"
    except OSError:
        return False


def tag_of(folder: str) -> str | None:
    """The tag named by ``folder/latest``, if that is a short text file naming a sub-folder."""
    latest = join(folder, LATEST)
    try:
        if not isfile(latest) or getsize(latest) > 4096:
            return None
        tag = read_bytes(latest, 4096).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not tag or tag in (".", "..") or any(c in tag for c in "/\\\0\n"):
        return None
    return tag


def holds_states(folder: str) -> bool:
    try:
        names = listdir(folder)
    except OSError:
        return False
    return any(
        (MODEL_STATES.fullmatch(n) or ZERO3_MODEL_STATES.fullmatch(n))
        and is_zip(join(folder, n))
        for n in names
    )


def tag_folder(path: str) -> str | None:
    """The folder holding a DeepSpeed save's files: ``path/<latest tag>`` or ``path`` itself.

    Returns None when ``path`` is not a DeepSpeed checkpoint folder (decided from ``latest`` and
    the model states files' zip signature, not from names alone).
    """
    if not isdir(path):
        return None
    tag = tag_of(path)
    if tag is not None and holds_states(join(path, tag)):
        return join(path, tag)
    return path if holds_states(path) else None


def is_deepspeed_folder(path: str) -> bool:
    """Whether ``path`` is a DeepSpeed checkpoint folder (the top folder or one tag folder)."""
    return tag_folder(path) is not None
