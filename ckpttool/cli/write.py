"""The writing commands: ``convert`` (a torch zip for CPU), ``to-safetensors`` and
``consolidate`` (a folder of shards into one checkpoint); convert and to-safetensors given a
folder of shards consolidate it."""

from __future__ import annotations

from typing import Any

import click

from .app import EPILOG, cli, writes
from .options import (
    ALL,
    ALLOW_USER_CLASSES,
    ONLY,
    STATE_DICT,
    deprecated_alias,
    is_shard_folder,
    key_options,
    output_options,
    run_ranked_writer,
    run_writer,
    shard_size,
    writer_kwargs,
)
from .results import emit
from .writer_reports import consolidate_report, convert_report, to_safetensors_report


@cli.command(epilog=EPILOG)
@click.argument("input_path", metavar="INPUT", type=str)
@click.argument("output_path", metavar="OUTPUT", type=str)
@key_options
@STATE_DICT
@ONLY
@ALLOW_USER_CLASSES
@click.option(
    "--plain-objects",
    is_flag=True,
    help="Replace objects torch.load(weights_only=True) refuses (argparse.Namespace, numpy "
    "scalars and arrays, ...) by plain dicts, numbers and tensors.",
)
@click.option("--in-place", is_flag=True, help="Allow OUTPUT to be INPUT (still atomic).")
@output_options
@deprecated_alias("--key", "--state-dict", "state_dict")
def convert(
    input_path: str,
    output_path: str,
    state_dict: str | None,
    only: str | None,
    plain_objects: bool,
    in_place: bool,
    as_json: bool,
    verbose: bool,
    **opts: Any,
) -> None:
    """Re-save a checkpoint for CPU, optionally renaming keys.

    Writes a torch zip file in which every storage is tagged cpu, whatever device it was
    saved from, so a plain torch.load works anywhere. Storage bytes are copied as they are;
    the output is written to a temp file, verified, then renamed into place.

    \b
    Example:
      ckpttool convert ddp_best.pth best_cpu.pt --strip-module
      ckpttool convert model.safetensors model.pt --add-module
      ckpttool convert train.ckpt w.pt --only state_dict --replace-prefix model.=
    """
    writes(output_path)
    from ..ops.convert import convert as do_convert

    quiet, kwargs = writer_kwargs(opts)
    if is_shard_folder(input_path):  # DCP / DeepSpeed: consolidated, with the same options
        if plain_objects or in_place or state_dict:
            raise click.UsageError(
                "--plain-objects, --in-place and --state-dict do not apply to a folder of shards"
            )
        select = only or "all"
        _consolidate_folder(
            input_path, output_path, (quiet, as_json, verbose), kwargs, select, "pt", None
        )
        return
    result = run_writer(
        quiet,
        lambda progress: do_convert(
            input_path,
            output_path,
            key=state_dict,
            only=only,
            plain_objects=plain_objects,
            in_place=in_place,
            progress=progress,
            **kwargs,
        ),
    )
    report = convert_report(result, output_path)
    emit("convert", result, report, quiet=quiet, as_json=as_json, remote=True)


@cli.command(name="to-safetensors", epilog=EPILOG)
@click.argument("input_path", metavar="INPUT", type=str)
@click.argument("output_path", metavar="OUTPUT", type=str)
@key_options
@STATE_DICT
@ALL
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="Add to __metadata__.")
@click.option(
    "--duplicate-shared",
    is_flag=True,
    help="Write tied/shared tensors as independent copies instead of one copy + aliases.",
)
@click.option("--keep", multiple=True, metavar="NAME", help="Prefer NAME when deduplicating.")
@click.option(
    "--max-shard-size",
    metavar="SIZE",
    help="Shard into OUTPUT/ (a folder) with model.safetensors.index.json, e.g. 5GB.",
)
@output_options
@deprecated_alias("--key", "--state-dict", "state_dict")
def to_safetensors(
    input_path: str,
    output_path: str,
    state_dict: str | None,
    everything: bool,
    metadata: tuple[str, ...],
    duplicate_shared: bool,
    keep: tuple[str, ...],
    max_shard_size: str | None,
    as_json: bool,
    verbose: bool,
    **opts: Any,
) -> None:
    """Write a checkpoint's tensors as safetensors (streamed, verified).

    By default writes the model state dict found in the checkpoint (a bare state dict, or
    model/state_dict/... inside a training checkpoint). Scalar entries (epoch, step) go to
    __metadata__ as strings with {"format": "pt"}; what is left out is reported. Tied
    weights are stored once and their aliases recorded in __metadata__. --all writes the
    tensors of every entry, named by their dotted path (optimizer.state.0.exp_avg).

    \b
    Example:
      ckpttool to-safetensors best.pth model.safetensors --strip-module
      ckpttool to-safetensors big.pt out/ --max-shard-size 5GB
    """
    writes(output_path)
    from ..ops.to_safetensors import to_safetensors as do_convert

    quiet, kwargs = writer_kwargs(opts)
    _one_of(everything and state_dict is not None, duplicate_shared and bool(keep))
    meta = _metadata(metadata)
    shard = shard_size(max_shard_size, output_path)
    if is_shard_folder(input_path):  # DCP / DeepSpeed: consolidated, with the same options
        if meta or keep or duplicate_shared:
            raise click.UsageError(
                "--metadata, --keep and --duplicate-shared do not apply to a folder of shards"
            )
        select = "all" if everything else state_dict or "model"
        how = (quiet, as_json, verbose)
        _consolidate_folder(input_path, output_path, how, kwargs, select, "safetensors", shard)
        return
    result = run_writer(
        quiet,
        lambda progress: do_convert(
            input_path,
            output_path,
            key=state_dict,
            all_tensors=everything,
            metadata=meta,
            duplicate_shared=duplicate_shared,
            keep=keep,
            max_shard_size=shard,
            progress=progress,
            **kwargs,
        ),
    )
    report = to_safetensors_report(result, output_path, sharded=bool(max_shard_size))
    emit("to-safetensors", result, report, quiet=quiet, as_json=as_json, remote=True)


def _one_of(all_and_state_dict: bool, duplicate_and_keep: bool) -> None:
    """to-safetensors' options that contradict each other: a usage error."""
    if all_and_state_dict:
        raise click.UsageError(
            "--all writes every tensor; --state-dict chooses one state dict: give one"
        )
    if duplicate_and_keep:
        raise click.UsageError(
            "--keep chooses the name stored once for tied tensors; --duplicate-shared stores "
            "every name: give one"
        )


def _metadata(specs: tuple[str, ...]) -> dict[str, str]:
    """The --metadata KEY=VALUE options as a dict (a key ckpttool sets itself is refused)."""
    from ..ops.to_safetensors import RESERVED_METADATA

    meta = {}
    for spec in specs:
        if "=" not in spec:
            raise click.BadParameter(f"{spec!r} is not KEY=VALUE", param_hint="--metadata")
        k, v = spec.split("=", 1)
        if k in RESERVED_METADATA:
            raise click.BadParameter(
                f"{k!r} is a key ckpttool sets itself", param_hint="--metadata"
            )
        meta[k] = v
    return meta


def _consolidate_folder(
    input_path: str,
    output_path: str,
    how: tuple[bool, bool, bool],
    kwargs: dict[str, Any],
    select: str,
    fmt: str | None,
    shard: int | None,
) -> None:
    """Consolidate a folder of shards and report it (consolidate, and convert/to-safetensors
    given a folder); ``how``: (quiet, as_json, verbose)."""
    from ..ops.consolidate import consolidate as do_consolidate

    quiet, as_json, _verbose = how  # writers always name what URLs cost
    result, quiet, as_json = run_ranked_writer(  # under torchrun: the ranks write together
        quiet,
        as_json,
        lambda progress, ranks: do_consolidate(
            input_path,
            output_path,
            select=select,
            max_shard_size=shard,
            output_format=fmt,
            progress=progress,
            ranks=ranks,
            **kwargs,
        ),
    )
    command = click.get_current_context().info_name or "consolidate"
    report = consolidate_report(result, output_path, kwargs.get("dtype"), bool(shard))
    emit(command, result, report, quiet=quiet, as_json=as_json, remote=True)


@cli.command(epilog=EPILOG)
@click.argument("input_path", metavar="FOLDER", type=str)
@click.argument("output_path", metavar="OUTPUT", type=str)
@key_options
@ONLY
@ALL
@ALLOW_USER_CLASSES
@click.option(
    "--max-shard-size",
    metavar="SIZE",
    help="Shard into OUTPUT/ (a folder) of safetensors with an index, e.g. 5GB.",
)
@output_options
@deprecated_alias("--key", "--only", "only")
def consolidate(
    input_path: str,
    output_path: str,
    only: str | None,
    everything: bool,
    max_shard_size: str | None,
    as_json: bool,
    verbose: bool,
    **opts: Any,
) -> None:
    """Merge a distributed checkpoint folder (DCP/FSDP, DeepSpeed ZeRO, per-rank) into one file.

    Writes the model state dict (what load_state_dict accepts) by default, as a torch zip
    (.pt) or, for an OUTPUT ending in .safetensors, as safetensors: for DCP the model's
    tensors as saved, for ZeRO-1/2/3 the fp32 master weights rebuilt from the partitions (as
    DeepSpeed's zero_to_fp32 does), for per-rank DTensor saves (model_world_size_W_rank_R.pt)
    the local shards placed as their placements say, for Megatron-core torch_dist (iter_N/, its
    parent, a NeMo folder) the tensors not under optimizer., by Megatron's global keys (as its
    load_plain_tensors returns them, layers stacked). --all writes the whole nested object (as
    torch's dcp_to_torch_save does), --only one entry (e.g. optim). Each tensor is copied range
    by range from its shards: memory stays flat, torch and DeepSpeed are not needed.

    \b
    Example:
      ckpttool consolidate checkpoints/step-1000 model.safetensors
      ckpttool consolidate ds_ckpt/ model_fp32.pt
      ckpttool consolidate checkpoints/step-1000 full.pt --all
      ckpttool consolidate checkpoints/step-1000 out/ --max-shard-size 5GB
    """
    quiet, kwargs = writer_kwargs(opts)
    if only and everything:
        raise click.UsageError("--only writes one entry, --all everything: give one of them")
    shard = shard_size(max_shard_size, output_path)
    select = "all" if everything else only or "model"
    writes(output_path)
    _consolidate_folder(
        input_path, output_path, (quiet, as_json, verbose), kwargs, select, None, shard
    )


for _param in consolidate.params:  # the shared options, as they read for a folder of shards
    if _param.name == "dtype":
        _param.help = "Cast the model's floating-point weights (optimizer state is kept)."
