"""What megatron-core's own loader returns for a ``torch_dist`` folder, saved with torch.save.

Run as a child process (megatron-core is slow to import and warns):
``python tests/megatron_reference.py FOLDER OUT.pt``. OUT.pt holds
``{"plain": load_plain_tensors(FOLDER), "everything": load(load_sharded_metadata(FOLDER))}``:
the first is the common state with every tensor under its global key, the second adds the
ShardedObjects under their unique keys. Two patches let it run on a CPU build of torch
(``torch.cuda.current_device()`` names the device of one all-reduced flag).
"""

from __future__ import annotations

import os
import sys
import warnings


def main(folder: str, out: str) -> None:
    warnings.simplefilter("ignore")
    import numpy
    if not hasattr(numpy, "product"):
        numpy.product = numpy.prod
    import torch
    import torch.distributed as dist

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29700 + os.getpid() % 200))
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import dist_checkpointing as mdc
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    plain = mdc.load_plain_tensors(folder)
    everything = mdc.load(load_sharded_metadata(folder), folder, validate_access_integrity=False)
    torch.save({"plain": plain, "everything": everything}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
