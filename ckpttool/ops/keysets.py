"""The keys side of ``check``: what a state dict holds under each key, from a checkpoint's
metadata or from a model built on torch's meta device, and which keys name one tensor.

A safetensors file's tied tensors that ``to-safetensors`` stored once (``ckpttool.aliases``)
count under every name, as ``ckpttool.load`` returns them; a Hugging Face folder whose
``config.json`` says ``tie_word_embeddings`` holds the tied names its weights store once
(:func:`with_config_ties`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, replace

from ..errors import CheckpointError, DangerousCheckpointError
from ..model import TensorRef
from ..tree import iter_tensors
from .sides import (
    chosen_state_dict,
    config_ties,
    dangerous_globals,
    folder_notes,
    recorded_aliases,
    tied_groups,
)


@dataclass(frozen=True)
class KeySpec:
    """What a state dict holds under one key (dtype and shape None: not a tensor)."""

    dtype: str | None
    shape: tuple[int, ...] | None


@dataclass(frozen=True)
class KeySet:
    """One side of a check: a state dict's keys, and which keys name the same tensor."""

    source: str  # the file, or the model factory
    path: str | None  # the state dict's dotted path in the file ("" the root); None: a model
    keys: dict[str, KeySpec]
    tied: tuple[tuple[str, ...], ...] = ()  # groups of keys holding one tensor
    dangerous: tuple[str, ...] = ()  # dangerous globals the file's pickle names (never run)
    notes: tuple[str, ...] = ()  # e.g. the folder holds a second weight set, not read
    ties_config: bool = False  # its Hugging Face config.json says tie_word_embeddings
    implied: tuple[tuple[str, str], ...] = ()  # (key, the stored key it is tied to)
    recorded: tuple[tuple[str, str], ...] = ()  # ckpttool.aliases: (alias, stored key)


def checkpoint_keys(path: str | os.PathLike[str], key: str | None = None) -> KeySet:
    """The keys, shapes and dtypes of a checkpoint's model state dict (or the one at ``key``);
    a safetensors file's recorded aliases count as keys, tied to the tensor they name."""
    from ..readers import open_checkpoint

    ckpt = open_checkpoint(path)
    dangerous = dangerous_globals(ckpt)
    sd = chosen_state_dict(ckpt, key)
    if sd is None:
        if dangerous:
            raise DangerousCheckpointError(ckpt.path, list(dangerous))
        raise CheckpointError(ckpt.path, "holds no state dict (no mapping of names to tensors)")
    named = list(sd.node.items()) if sd.source == "dict" else list(iter_tensors(sd.node))
    keys = {
        name: KeySpec(value.dtype, tuple(value.shape))
        if isinstance(value, TensorRef)
        else KeySpec(None, None)
        for name, value in named
    }
    tied = tied_groups(named)
    stored_once: dict[str, list[str]] = {}
    recorded = recorded_aliases(ckpt) if sd.node is ckpt.root else {}
    for alias, stored in recorded.items():
        keys[alias] = keys[stored]
        stored_once.setdefault(stored, [stored]).append(alias)
    tied += [tuple(g) for g in stored_once.values()]
    return KeySet(
        ckpt.path,
        sd.path,
        keys,
        tuple(tied),
        dangerous,
        folder_notes(ckpt),
        ties_config=config_ties(ckpt),
        recorded=tuple(recorded.items()),
    )


def with_config_ties(ref: KeySet, groups: Iterable[tuple[str, ...]]) -> KeySet:
    """``ref`` with the tied names its model holds (``ref.ties_config``, see
    :func:`~ckpttool.ops.sides.config_ties`): when the checkpoint holds a group of names for
    one tensor (its ``groups``, e.g. ``transformer.wte.weight`` and ``lm_head.weight``) of
    which ``ref`` stores one, the model holds the others too (``save_pretrained`` stores a
    tied tensor once)."""
    if not ref.ties_config:
        return ref
    keys, tied, implied = dict(ref.keys), list(ref.tied), []
    for group in groups:
        present = [k for k in group if k in ref.keys]
        absent = [k for k in group if k not in ref.keys]
        if not present or not absent:
            continue
        for k in absent:
            keys[k] = ref.keys[present[0]]
            implied.append((k, present[0]))
        tied.append(tuple(group))
    if not implied:
        return ref
    return replace(ref, keys=keys, tied=tuple(tied), implied=ref.implied + tuple(implied))


def model_keys(spec: str) -> KeySet:
    """Build ``module:factory`` on torch's meta device and read its ``state_dict()`` keys.

    This imports the module and runs the factory (user code): callers opt in explicitly. The
    module may also be a ``.py`` file path; the working directory is importable.
    """
    import importlib
    import importlib.util
    import sys

    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise CheckpointError(None, f"model {spec!r} is not MODULE:FACTORY")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        if module_name.endswith(".py"):
            loaded = importlib.util.spec_from_file_location("_ckpttool_model", module_name)
            if loaded is None or loaded.loader is None:
                raise CheckpointError(module_name, "cannot be imported")
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        factory = getattr(module, attr)
        import torch

        with torch.device("meta"):
            model = factory()
        state = model.state_dict(keep_vars=True)
    except CheckpointError:
        raise
    except Exception as exc:  # user code: any failure is reported as one line
        raise CheckpointError(None, f"building the model {spec!r} failed: {exc!r}") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    keys: dict[str, KeySpec] = {}
    by_id: dict[int, list[str]] = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            keys[name] = KeySpec(str(value.dtype).removeprefix("torch."), tuple(value.shape))
            by_id.setdefault(id(value), []).append(name)
        else:
            keys[name] = KeySpec(None, None)
    return KeySet(spec, None, keys, tuple(tuple(g) for g in by_id.values() if len(g) > 1))
