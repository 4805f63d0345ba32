"""The files of a folder of shards at a URL that cannot be listed (an HTTP server without index
pages), derived from what the save itself says, one ``HEAD`` per name tried.

* DCP: ``.metadata`` names every ``.distcp`` file in its storage index; ``meta.pt`` (Lightning's
  entries beside the shards) is looked for.
* DeepSpeed: ``latest`` names the tag folder, which holds ``mp_rank_00_model_states.pt``
  (ZeRO-1/2) or one ``zero_pp_rank_R_mp_rank_00_model_states.pt`` per rank (ZeRO-3), and one
  ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`` per rank: R counts from 0 until a name
  is missing (the reader then checks the world size the files themselves record).

Files a save does not name (a stray pickle beside the shards) are not seen this way: scanning
such a folder covers what the loaders read, not every file on the server. Listable folders
(index pages, buckets, the Hub) are listed instead (``remote/tree.py``).
"""

from __future__ import annotations

from collections.abc import Callable

_DCP = (".metadata", "latest", "meta.pt")
_DS_MODEL = "mp_rank_00_model_states.pt"
_DS_PER_RANK = (
    "zero_pp_rank_{}_mp_rank_00_model_states.pt",
    "zero_pp_rank_{}_mp_rank_00_optim_states.pt",
    "bf16_zero_pp_rank_{}_mp_rank_00_optim_states.pt",
)
_MAX_RANKS = 1 << 16


def enable() -> None:
    """Let folder URLs that cannot be listed be read as folders of shards."""
    from ..remote import tree

    tree.derive_with(derive)


def derive(root: str, exists: Callable[[str], bool]) -> set[str]:
    """The files (relative paths) a DCP or DeepSpeed save at ``root`` consists of."""
    names = {n for n in _DCP if exists(f"{root}/{n}")}
    if ".metadata" in names:
        from .dcp import item_ranges

        names |= {f[len(root) + 1 :] for f, *_ in item_ranges(root) if f.startswith(root + "/")}
        return names
    if "latest" in names:
        from .zero_files import tag_of

        tag = tag_of(root)
        if tag is not None:
            names |= {f"{tag}/{n}" for n in _deepspeed(f"{root}/{tag}", exists)}
    return names | _deepspeed(root, exists)


def _deepspeed(folder: str, exists: Callable[[str], bool]) -> set[str]:
    out = {_DS_MODEL} if exists(f"{folder}/{_DS_MODEL}") else set()
    for pattern in _DS_PER_RANK:
        rank = 0
        while rank < _MAX_RANKS and exists(f"{folder}/{pattern.format(rank)}"):
            out.add(pattern.format(rank))
            rank += 1
    return out
