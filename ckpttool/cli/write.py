"""The writing commands: ``convert`` (a torch zip for CPU), ``to-safetensors`` and
``consolidate`` (a folder of shards into one checkpoint); convert and to-safetensors given a
folder of shards consolidate it."""

from __future__ import annotations

from typing import Any

import click

from .app import EPILOG, cli, writes
from .fixes import idle_text, kept_prefix_text, left_out_text
from .options import (
    ALLOW_USER_CLASSES,
    echo_remote_usage,
    is_shard_folder,
    key_options,
    run_writer,
    shard_size,
    writer_kwargs,
)


@cli.command(epilog=EPILOG)
@click.argument("input_path", metavar="INPUT", type=str)
@click.argument("output_path", metavar="OUTPUT", type=str)
@key_options
@ALLOW_USER_CLASSES
@click.option("--only", metavar="PATH", help="Write just this entry (e.g. model).")
@click.option(
    "--plain-objects",
    is_flag=True,
    help="Replace objects torch.load(weights_only=True) refuses (argparse.Namespace, numpy "
    "scalars and arrays, ...) by plain dicts, numbers and tensors.",
)
@click.option("--in-place", is_flag=True, help="Allow OUTPUT to be INPUT (still atomic).")
def convert(
    input_path: str,
    output_path: str,
    only: str | None,
    plain_objects: bool,
    in_place: bool,
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
        if plain_objects or in_place or kwargs.get("key"):
            raise click.UsageError(
                "--plain-objects, --in-place and --key do not apply to a folder of shards"
            )
        _consolidate_folder(input_path, output_path, quiet, kwargs, only or "all", "pt", None)
        return
    result = run_writer(
        quiet,
        lambda progress: do_convert(
            input_path,
            output_path,
            only=only,
            plain_objects=plain_objects,
            in_place=in_place,
            progress=progress,
            **kwargs,
        ),
    )
    if not quiet:
        _report_convert(result, output_path)


def _report_convert(result: Any, output_path: str) -> None:
    """What convert did, on stderr: renames, replacements, notes, what it wrote."""
    from ..render import escape

    idle_in = {sd_path for sd_path, _, _ in result.idle}
    for sd_path, n in result.renamed:
        where = f"'{escape(sd_path)}'" if sd_path else "(root)"
        if n or sd_path not in idle_in:  # else the warning below says why
            click.echo(f"renamed {n} {_keys(n)} in state dict {where}", err=True)
    for sd_path, action, arg in result.idle:
        click.echo(escape(idle_text(action, arg, sd_path)), err=True)
    if result.key_unused:
        click.echo(
            "warning: --key names the state dict to rename, and no rename option was given: it "
            "changed nothing (--only writes just one entry)",
            err=True,
        )
    for r in result.replaced:
        click.echo(f"replaced {r}", err=True)
    left = result.unsafe_globals
    if left:
        click.echo(
            "note: the output still pickles "
            + ", ".join(left[:4])
            + (" and more" if len(left) > 4 else "")
            + ": torch.load(weights_only=True) refuses it; --plain-objects replaces them",
            err=True,
        )
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    check = f"verified: {result.verification}" if result.verified else "not verified"
    click.echo(
        f"wrote {escape(output_path)}: {_count(result.tensors, 'tensor')} in "
        f"{_count(result.storages, 'storage')}, "
        f"all on cpu ({check})",
        err=True,
    )
    echo_remote_usage(always=True)  # a URL input: what reading it cost


@cli.command(name="to-safetensors", epilog=EPILOG)
@click.argument("input_path", metavar="INPUT", type=str)
@click.argument("output_path", metavar="OUTPUT", type=str)
@key_options
@click.option("--all", "all_tensors", is_flag=True, help="Write every tensor, named by path.")
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
def to_safetensors(
    input_path: str,
    output_path: str,
    all_tensors: bool,
    metadata: tuple[str, ...],
    duplicate_shared: bool,
    keep: tuple[str, ...],
    max_shard_size: str | None,
    **opts: Any,
) -> None:
    """Write a checkpoint's tensors as safetensors (streamed, verified).

    By default writes the model state dict found in the checkpoint (a bare state dict, or
    model/state_dict/... inside a training checkpoint). Scalar entries (epoch, step) go to
    __metadata__ as strings with {"format": "pt"}; what is left out is reported. Tied
    weights are stored once and their aliases recorded in __metadata__.

    \b
    Example:
      ckpttool to-safetensors best.pth model.safetensors --strip-module
      ckpttool to-safetensors big.pt out/ --max-shard-size 5GB
    """
    writes(output_path)
    from ..ops.to_safetensors import to_safetensors as do_convert

    quiet, kwargs = writer_kwargs(opts)
    if all_tensors and kwargs.get("key") is not None:
        raise click.UsageError("--all writes every tensor; --key chooses one state dict: give one")
    if duplicate_shared and keep:
        raise click.UsageError(
            "--keep chooses the name stored once for tied tensors; --duplicate-shared stores "
            "every name: give one"
        )
    meta = _metadata(metadata)
    shard = shard_size(max_shard_size, output_path)
    if is_shard_folder(input_path):  # DCP / DeepSpeed: consolidated, with the same options
        if meta or keep or duplicate_shared:
            raise click.UsageError(
                "--metadata, --keep and --duplicate-shared do not apply to a folder of shards"
            )
        select = "all" if all_tensors else kwargs.pop("key", None) or "model"
        _consolidate_folder(input_path, output_path, quiet, kwargs, select, "safetensors", shard)
        return
    result = run_writer(
        quiet,
        lambda progress: do_convert(
            input_path,
            output_path,
            all_tensors=all_tensors,
            metadata=meta,
            duplicate_shared=duplicate_shared,
            keep=keep,
            max_shard_size=shard,
            progress=progress,
            **kwargs,
        ),
    )
    if not quiet:
        _report_to_safetensors(result, output_path, sharded=bool(max_shard_size))


def _keys(n: int) -> str:
    return "key" if n == 1 else "keys"


def _count(n: int, noun: str) -> str:
    """``1 shard``, ``2 shards``."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


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


def _report_to_safetensors(result: Any, output_path: str, sharded: bool) -> None:
    """What to-safetensors did, on stderr: renames, tied tensors, what it left out and wrote."""
    from ..render import escape

    if result.renamed:
        click.echo(f"renamed {result.renamed} {_keys(result.renamed)}", err=True)
    for action, arg in result.idle:
        click.echo(escape(idle_text(action, arg)), err=True)
    if result.kept_prefix:
        click.echo(escape(kept_prefix_text(result.kept_prefix)), err=True)
    for alias, kept in result.aliases.items():
        click.echo(f"shared: {escape(alias)} is stored once as {escape(kept)}", err=True)
    for item in result.left_out:
        click.echo(f"left out: {escape(left_out_text(item))}", err=True)
    for note in result.notes:
        click.echo(f"note: {escape(note)}", err=True)
    check = "verified" if result.verified else "not verified"
    where = escape(output_path)
    files = f" in {_count(len(result.files) - 1, 'shard')}" if sharded else ""
    click.echo(f"wrote {where}: {_count(result.tensors, 'tensor')}{files} ({check})", err=True)
    echo_remote_usage(always=True)


def _consolidate_folder(
    input_path: str,
    output_path: str,
    quiet: bool,
    kwargs: dict[str, Any],
    select: str,
    fmt: str | None,
    shard: int | None,
) -> None:
    """Consolidate a folder of shards and report it (consolidate, and convert/to-safetensors
    given a folder)."""
    from ..ops.consolidate import consolidate as do_consolidate
    from ..ops.ranks import Ranks
    from ..render import escape

    kwargs = {k: v for k, v in kwargs.items() if k != "key"}
    ranks = Ranks.from_environment()  # under torchrun: the ranks write together
    quiet = quiet or (ranks is not None and ranks.rank != 0)  # rank 0 reports
    try:
        result = run_writer(
            quiet,
            lambda progress: do_consolidate(
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
    finally:
        if ranks is not None:
            ranks.close()
    if quiet:
        return
    if result.renamed:
        click.echo(f"renamed {result.renamed} {_keys(result.renamed)}", err=True)
    for action, arg in result.idle:
        click.echo(escape(idle_text(action, arg)), err=True)
    if result.cast:
        click.echo(f"cast {result.cast} tensors to {kwargs['dtype']}", err=True)
    for item in result.left_out:
        click.echo(f"left out: {escape(left_out_text(item))}", err=True)
    for note in result.notes:
        click.echo(f"note: {escape(note)}", err=True)
    check = "verified" if result.verified else "not verified"
    files = f" in {_count(len(result.files) - 1, 'shard')}" if shard else ""
    click.echo(
        f"wrote {escape(output_path)}: {escape(result.selected)} of a {result.kind} checkpoint "
        f"from {_count(result.world_size, 'rank')}, {_count(result.tensors, 'tensor')}{files} "
        f"({check})",
        err=True,
    )


@cli.command(epilog=EPILOG)
@click.argument("input_path", metavar="FOLDER", type=str)
@click.argument("output_path", metavar="OUTPUT", type=str)
@key_options
@ALLOW_USER_CLASSES
@click.option("--all", "all_entries", is_flag=True, help="Write everything (optimizer, step...).")
@click.option(
    "--max-shard-size",
    metavar="SIZE",
    help="Shard into OUTPUT/ (a folder) of safetensors with an index, e.g. 5GB.",
)
def consolidate(
    input_path: str,
    output_path: str,
    all_entries: bool,
    max_shard_size: str | None,
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
    torch's dcp_to_torch_save does), --key one entry (e.g. optim). Each tensor is copied range
    by range from its shards: memory stays flat, torch and DeepSpeed are not needed.

    \b
    Example:
      ckpttool consolidate checkpoints/step-1000 model.safetensors
      ckpttool consolidate ds_ckpt/ model_fp32.pt
      ckpttool consolidate checkpoints/step-1000 full.pt --all
      ckpttool consolidate checkpoints/step-1000 out/ --max-shard-size 5GB
    """
    quiet, kwargs = writer_kwargs(opts)
    key = kwargs.pop("key")
    if key and all_entries:
        raise click.UsageError("--key writes one entry, --all everything: give one of them")
    shard = shard_size(max_shard_size, output_path)
    select = "all" if all_entries else key or "model"
    writes(output_path)
    _consolidate_folder(input_path, output_path, quiet, kwargs, select, None, shard)


for _param in consolidate.params:  # the shared options, as they read for a folder of shards
    if _param.name == "key":
        _param.help = "Write this entry instead of the model weights (e.g. optim)."
    elif _param.name == "dtype":
        _param.help = "Cast the model's floating-point weights (optimizer state is kept)."
