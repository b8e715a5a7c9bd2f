"""`gptcli models list|pull|info`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from gptcli.cli import common as c

app = typer.Typer(help="List, fetch and inspect models.", no_args_is_help=True)


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
    """Catalogue aliases and what is in the cache, with sizes.

    Example: gptcli models list
    """
    from gptcli.models import list_models

    rows = list_models()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("name", "aliases", "status", "size", "source / path"):
        table.add_column(column)
    for row in rows:
        status = "cached" if row["cached"] else ("installed" if row["installed"] else "not installed")
        table.add_row(
            row["name"],
            ", ".join(row["aliases"]) or "-",
            status,
            human_size(row["size_bytes"]),
            row["path"] or row["description"],
        )
    c.stdout_console().print(table)


@app.command()
def pull(
    model: Annotated[str, typer.Argument(help="Model reference (default: the default model).")] = "",
    config: c.ConfigOpt = None,
) -> None:
    """Fetch and convert a model ahead of time, so the first run starts fast.

    Example: gptcli models pull
    """
    from gptcli.runtime import open_model

    settings = c.resolve_settings(config, model=model or None).settings
    local = open_model(settings, c.note)
    print(local.path)


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="Model reference (default: the default model).")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: c.ConfigOpt = None,
) -> None:
    """Architecture, parameters, layers, context, vocab, dtype, size, source and cache path.

    Example: gptcli models info smollm2-135m-instruct
    """
    from gptcli.models import describe
    from gptcli.runtime import open_model

    settings = c.resolve_settings(config, model=model or None).settings
    facts = describe(open_model(settings, c.note))
    if as_json:
        print(json.dumps(facts, indent=2))
        return
    facts["params"] = f"{facts['params']:,} ({facts['params'] / 1e6:.1f} M)"
    facts["size_bytes"] = human_size(facts["size_bytes"])
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        print(f"{key.replace('_bytes', '').ljust(width)}  {value}")
