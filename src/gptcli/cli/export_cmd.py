"""`gptcli export`: turn a model into a cached (or saved) ONNX Runtime graph ahead of time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gptcli.cli import common as c


def export(
    model: Annotated[str | None, typer.Argument(help="Model reference (default: the configured model).")] = None,
    precision: Annotated[str, typer.Option("--precision", help="fp32 | fp16 (CUDA) | int8 | int4.")] = "fp32",
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda: where the graph will run.")] = "auto",
    output: Annotated[
        Path | None,
        c.path_option("--output", "-o", help="Write the export to this folder instead of the cache.", folder=True),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Export again even when a cached export exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the sidecar record as JSON.")] = False,
    config: c.ConfigOpt = None,
    allow_pickle: c.AllowPickleOpt = None,
) -> None:
    """Export a model to ONNX (fused attention, KV cache I/O), cached for `--backend onnx`.

    Prints the export folder on stdout. `gptcli generate --backend onnx` exports on first use too.

    Examples:
      gptcli export
      gptcli export ./my-gpt2 --precision int4 --output ./my-gpt2-onnx
      gptcli export smollm2-135m-instruct --precision fp16 --device cuda
    """
    from gptcli.backends.base import LoadOptions, get_backend_class
    from gptcli.backends.int4_native import onnx_op_for
    from gptcli.cli.local_run import open_local_model
    from gptcli.config import FIELDS, coerce
    from gptcli.export import ensure_export
    from gptcli.runtime import check_memory

    if output is not None and output.exists() and not output.is_dir():
        from gptcli.errors import InputError

        raise InputError(f"--output {output} is a file, not a folder", hint="give a folder for the export")
    precision = coerce(FIELDS["precision"], precision, "--precision")  # exit 3, as for every command
    device = coerce(FIELDS["device"], device, "--device")
    if device == "auto":  # the answer the onnx backend gives: a listed CUDA provider is not enough
        from gptcli.hardware import ONNXRUNTIME, resolve_device

        device = "cuda" if precision == "fp16" else resolve_device("auto", ONNXRUNTIME)
    settings = c.resolve_settings(config, model=model, allow_pickle=allow_pickle).settings
    local = open_local_model(settings)
    check_memory(get_backend_class("onnx"), local.path, LoadOptions(device=device, precision=precision))
    # Into the cache: the export `--backend onnx` loads, with gptcli's int4 operator where it runs here.
    native = output is None and onnx_op_for(precision, device, local.path, c.note) is not None
    result = ensure_export(
        local.path, precision=precision, device=device, output=output, force=force, notify=c.note, native_int4=native
    )
    if as_json:
        print(json.dumps({"folder": str(result.folder), **result.meta}, indent=2))
    else:
        print(result.folder)
