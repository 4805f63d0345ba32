"""The globals a DCP ``.metadata`` pickle may name, read as data by :mod:`.dcp` (never imported).

The verdict on the file is the policy's (``unpickling/``), not this table: megatron-core's own
Metadata subclass is read here, but loading it imports megatron.core (``unvetted code``).
"""

from __future__ import annotations

from .. import dtypes
from ..unpickling.lists import DCP_PLAN_CLASSES, DCP_PLANNER

META = "torch.distributed.checkpoint.metadata."
# megatron-core 0.8 to 0.15 pickle Metadata and SavePlan subclasses of their own (with an
# ``mcore_data`` field): read as data here; the verdict calls them unvetted code (loading
# imports megatron.core), as for any class of another library.
MCORE = "megatron.core.dist_checkpointing.strategies.torch."
MCORE_CLASSES = (MCORE + "MCoreMetadata", MCORE + "MCoreSavePlan")
_OLD_PROPS = "torch.distributed._shard.sharded_tensor.metadata."
# The globals a .metadata pickle may name: read as data, never imported.
ALLOWED_GLOBALS = frozenset(
    {
        META + "Metadata",
        META + "TensorStorageMetadata",
        META + "BytesStorageMetadata",
        META + "ChunkStorageMetadata",
        META + "TensorProperties",
        META + "_MEM_FORMAT_ENCODING",
        META + "MetadataIndex",
        META + "StorageMeta",
        _OLD_PROPS + "TensorProperties",
        _OLD_PROPS + "MEM_FORMAT_ENCODING",
        "torch.distributed.checkpoint.filesystem._StorageInfo",
        "torch.distributed.checkpoint.filesystem._StoragePrefix",
        "torch.Size",
        "torch.strided",
        "torch.serialization._get_layout",
        "collections.OrderedDict",
        "builtins.set",
        "pathlib.PosixPath",
        "pathlib.PurePosixPath",
        "pathlib.WindowsPath",
        "pathlib.PureWindowsPath",
        "pathlib._local.PosixPath",
        "pathlib._local.WindowsPath",
        *(DCP_PLANNER + c for c in DCP_PLAN_CLASSES),  # Megatron-core's cached save plans
        *MCORE_CLASSES,
    }
)


def allowed(name: str) -> bool:
    return name in ALLOWED_GLOBALS or (name.startswith("torch.") and name[6:] in dtypes.DTYPES)
