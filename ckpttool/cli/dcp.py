"""``to-dcp``: a torch.distributed.checkpoint folder from any checkpoint, for FSDP to resume."""

from __future__ import annotations

from typing import Any

import click

from .app import EPILOG, cli, writes
from .options import (
    ONLY,
    deprecated_alias,
    key_options,
    output_options,
    run_ranked_writer,
    writer_kwargs,
)
from .results import emit
from .writer_reports import to_dcp_report


@cli.command(name="to-dcp", epilog=EPILOG)
@click.argument("input_path", metavar="INPUT", type=str)
@click.argument("output_path", metavar="FOLDER", type=str)
@key_options
@ONLY
@click.option(
    "--model-only", is_flag=True, help="Write only the model state dict, its keys at the top."
)
@click.option(
    "--under",
    metavar="KEY",
    help="Nest what is written under KEY (e.g. model: keys model.<name>).",
)
@click.option(
    "--not-param",
    "not_parameters",
    multiple=True,
    metavar="PATTERN",
    help="Model keys a numbered optimizer does not hold (e.g. 'frozen.*'), to name it.",
)
@output_options
@deprecated_alias("--key", "--only", "only")
def to_dcp(
    input_path: str,
    output_path: str,
    only: str | None,
    model_only: bool,
    under: str | None,
    not_parameters: tuple[str, ...],
    as_json: bool,
    verbose: bool,
    **opts: Any,
) -> None:
    """Write a torch.distributed.checkpoint (DCP) folder that FSDP jobs dcp.load.

    INPUT is any checkpoint ckpttool reads: a .pt, a safetensors file or folder, a Hugging
    Face folder, a DeepSpeed ZeRO folder or a DCP folder. FOLDER gets .metadata and
    __0_0.distcp as dcp.save writes them; dcp.load reshards each tensor to the loading job's
    world size. By default everything is written with its nesting (as torch_save_to_dcp
    does); an optimizer state dict that numbers its parameters is keyed by the model's
    parameter names, as get_state_dict keys it (refused if they cannot be told apart).
    Tensors are copied, not loaded: memory stays flat, torch is not needed.

    \b
    Example:
      ckpttool to-dcp best.pt ckpt/step-0
      ckpttool to-dcp hf-model/ ckpt/step-0 --under model
      ckpttool to-dcp ds_ckpt/ ckpt/step-0 --model-only --dtype bfloat16
    """
    writes(output_path)
    from ..ops.to_dcp import to_dcp as do_to_dcp

    quiet, kwargs = writer_kwargs(opts)
    if model_only and only is not None:
        raise click.UsageError("--model-only writes the model, --only one entry: give one")
    result, quiet, as_json = run_ranked_writer(  # under torchrun: each rank its own file
        quiet,
        as_json,
        lambda progress, ranks: do_to_dcp(
            input_path,
            output_path,
            key=only,
            model_only=model_only,
            under=under,
            not_parameters=not_parameters,
            progress=progress,
            ranks=ranks,
            **kwargs,
        ),
    )
    report = to_dcp_report(result, output_path, kwargs.get("dtype"))
    emit("to-dcp", result, report, quiet=quiet, as_json=as_json, remote=True)


for _param in to_dcp.params:
    if _param.name == "dtype":
        _param.help = "Cast the model's floating-point weights (optimizer state is kept)."
