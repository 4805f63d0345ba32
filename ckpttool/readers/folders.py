"""What a folder that is not one checkpoint holds, worded so that the user knows what to pass.

Training libraries leave folders of checkpoints, not checkpoints: transformers' Trainer writes
``checkpoint-500/``, ``checkpoint-1000/`` into its output folder, accelerate's ``save_state``
``checkpoints/checkpoint_0/``..., DeepSpeed a ``global_stepN/`` per save named by ``latest``.
``open_checkpoint`` calls :func:`describe` when a folder is none of the layouts it reads, and
:func:`enclosing_folder` names the folder of shards a file belongs to.
"""

from __future__ import annotations

import os
import re

from . import zero_files

_SHOWN = 4  # names listed before "and N more"


def _natural(name: str) -> list[object]:
    """Sort key that puts checkpoint-1000 after checkpoint-500."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path), key=_natural)
    except OSError:
        return []


def _checkpoint_files(folder: str) -> list[str]:
    """The names of the checkpoint-like files directly inside ``folder``."""
    from ..unpickling.discover import SUFFIXES

    return [
        n
        for n in _listdir(folder)
        if (n == ".metadata" or n.lower().endswith(SUFFIXES))
        and os.path.isfile(os.path.join(folder, n))
    ]


def _holds_checkpoint(folder: str) -> bool:
    return bool(_checkpoint_files(folder)) or zero_files.tag_folder(folder) is not None


def _checkpoint_folders(path: str, depth: int = 2) -> list[str]:
    """Sub-folders (relative paths) holding a checkpoint, looked for ``depth`` levels down."""
    out: list[str] = []
    for name in _listdir(path):
        sub = os.path.join(path, name)
        if name.startswith(".") or not os.path.isdir(sub) or os.path.islink(sub):
            continue
        if _holds_checkpoint(sub):
            out.append(name)
        elif depth > 1:
            out += [os.path.join(name, inner) for inner in _checkpoint_folders(sub, depth - 1)]
    return out


def _shown(names: list[str]) -> str:
    more = len(names) - _SHOWN
    return ", ".join(names[:_SHOWN]) + (f" and {more} more" if more > 0 else "")


def _last(names: list[str]) -> str:
    """The newest-looking name: the highest step (checkpoint-1000 over checkpoint-500)."""
    return max(names, key=lambda n: [_natural(p) for p in n.split(os.sep)])


def _deepspeed_latest(path: str) -> str | None:
    """A DeepSpeed folder whose ``latest`` names a tag that holds no save."""
    tag = zero_files.tag_of(path)
    if tag is None:
        return None
    tags = [n for n in _listdir(path) if zero_files.holds_states(os.path.join(path, n))]
    where = os.path.join(path, tag)
    missing = "which is not there" if not os.path.exists(where) else "which holds no model states"
    said = f"its `latest` names {tag!r}, {missing}"
    if not tags:
        return f"is a DeepSpeed folder, but {said} and no other tag folder holds a save either"
    return (
        f"is a DeepSpeed folder, but {said} (it holds {_shown(tags)}): pass the tag folder"
        f"{', e.g.' if len(tags) > 1 else ''} {os.path.join(path, _last(tags))}, or fix `latest`"
    )


def describe(path: str) -> str:
    """Why ``path``, a folder, is not one checkpoint, naming what it holds and what to pass.

    Example:
        >>> describe("output")  # doctest: +SKIP
        'is a folder of 2 checkpoints (checkpoint-500, checkpoint-1000), not one checkpoint:
        pass one of them, e.g. output/checkpoint-1000'
    """
    found = _deepspeed_latest(path)
    if found is not None:
        return found
    files = _checkpoint_files(path)
    folders = _checkpoint_folders(path)
    if files:
        also = f" and {len(folders)} checkpoint folders" if len(folders) > 1 else ""
        also = f" and a checkpoint folder ({folders[0]})" if len(folders) == 1 else also
        return (
            f"is a folder of checkpoint files ({_shown(files)}){also}, not one checkpoint: "
            f"pass {'one of them, e.g. ' if len(files) + len(folders) > 1 else ''}"
            f"{os.path.join(path, files[0])}"
        )
    if folders:
        many = f"{len(folders)} checkpoints" if len(folders) > 1 else "a checkpoint"
        return (
            f"is a folder of {many} ({_shown(folders)}), not one checkpoint: pass "
            f"{'one of them, e.g. ' if len(folders) > 1 else ''}"
            f"{os.path.join(path, _last(folders))}"
        )
    return "is a directory, not a checkpoint file"


def enclosing_folder(path: str) -> str | None:
    """The folder of shards (DCP, DeepSpeed) that the file ``path`` lies in, if it is one."""
    from . import is_distributed_folder

    parent = os.path.dirname(path) or "."
    return parent if is_distributed_folder(parent) else None
