"""The weights of a Hugging Face model folder, chosen exactly as transformers chooses them.

transformers (``modeling_utils._get_resolved_checkpoint_files``, 4.x and 5.x) loads from a
local folder the file that ``config.json`` names as ``transformers_weights``, else the first
of ``model.safetensors``, ``model.safetensors.index.json``, ``pytorch_model.bin``,
``pytorch_model.bin.index.json`` that exists. A folder holding more than one of them holds two
weight sets, and only the first is ever loaded: ckpttool reads that one too and says so.
A folder with none of them but exactly one other ``*.index.json`` opens as that index.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# transformers' order (use_safetensors left at its default)
HF_WEIGHTS = (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX)
MAX_CONFIG_BYTES = 16 * 1000 * 1000


@dataclass(frozen=True)
class FolderWeights:
    """The weights file chosen in a folder, why, and the other weight sets it ignores."""

    folder: str
    weights: str  # the file name chosen, in ``folder``
    chosen_by: str  # "transformers" (its order), "config" (transformers_weights), "index"
    ignored: tuple[str, ...] = ()  # other weight sets present (file names), never read

    @property
    def path(self) -> str:
        if "://" in self.folder:  # a folder URL
            return self.folder.rstrip("/") + "/" + self.weights
        return os.path.join(self.folder, self.weights)

    def fact(self) -> dict[str, Any]:
        return {
            "path": self.folder,
            "weights": self.weights,
            "chosen_by": self.chosen_by,
            "ignored": list(self.ignored),
        }


def config(folder: str) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict ({} when absent, too large or not a JSON object)."""
    import json  # here: a command on a plain file never reads one (~1.4 ms)

    path = os.path.join(folder, "config.json")
    try:
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            return {}
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _explicit(folder: str) -> str | None:
    """``config.json``'s ``transformers_weights``, checked as transformers checks it."""
    name = config(folder).get("transformers_weights")
    if name is None:
        return None
    where = os.path.join(folder, "config.json")
    if not isinstance(name, str) or not name.endswith((".safetensors", ".safetensors.index.json")):
        raise CheckpointError(
            where, f"transformers_weights {name!r} is not a .safetensors file or index"
        )
    base = os.path.abspath(folder)
    if os.path.commonpath([base, os.path.abspath(os.path.join(folder, name))]) != base:
        raise CheckpointError(where, f"transformers_weights {name!r} is outside the folder")
    if not os.path.isfile(os.path.join(folder, name)):
        raise CheckpointError(where, f"transformers_weights names {name!r}, which is missing")
    return name


def choose(folder: str) -> FolderWeights | None:
    """The weights ``from_pretrained(folder)`` loads (None: the folder holds none)."""
    try:
        names = set(os.listdir(folder))
    except OSError:
        return None
    present = [n for n in HF_WEIGHTS if n in names and os.path.isfile(os.path.join(folder, n))]
    explicit = _explicit(folder) if "config.json" in names else None
    if explicit is not None:
        ignored = tuple(n for n in present if n != explicit)
        return FolderWeights(folder, explicit, "config", ignored)
    if present:
        return FolderWeights(folder, present[0], "transformers", tuple(present[1:]))
    indexes = sorted(n for n in names if n.endswith(".index.json"))
    if len(indexes) == 1:
        return FolderWeights(folder, indexes[0], "index")
    return None


def note(fact: dict[str, Any] | None) -> str | None:
    """The warning for a folder that holds more than one weight set (None: it holds one)."""
    if not fact or not fact.get("ignored"):
        return None
    ignored = fact["ignored"]
    others = " and ".join(ignored) if len(ignored) < 3 else ", ".join(ignored)
    why = "config.json names it" if fact["chosen_by"] == "config" else "transformers loads it"
    count = "two" if len(ignored) == 1 else str(len(ignored) + 1)
    verb = "is" if len(ignored) == 1 else "are"
    return (
        f"{fact['path']} holds {count} weight sets: {fact['weights']} is read ({why}) and "
        f"{others} {verb} ignored; if they differ, remove the stale set so that every tool "
        "reads the same weights"
    )


def output_notes(facts: dict[str, Any], dst: str, sharded: bool) -> list[str]:
    """The input's folder (``facts`` of the checkpoint read), and the output's once written,
    if either holds two weight sets (a ``pytorch_model.bin`` beside a new
    ``model.safetensors``, say)."""
    notes = [note(facts.get("folder"))]
    if sharded or os.path.basename(dst) == SAFE_WEIGHTS:
        folder = dst if sharded else os.path.dirname(dst) or "."
        try:
            chosen = choose(folder)
        except CheckpointError as exc:  # a config.json naming weights that are not there
            notes.append(exc.message)
        else:
            notes.append(note(chosen.fact() if chosen else None))
    return list(dict.fromkeys(n for n in notes if n))
