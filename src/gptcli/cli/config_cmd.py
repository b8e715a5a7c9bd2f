"""`gptcli config show|path`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from gptcli.cli import common as c
from gptcli.cli.helpfmt import HelpGroup
from gptcli.cli.render import stdout_console
from gptcli.cli.settings import resolve_settings

app = typer.Typer(
    help="Show the resolved configuration.",
    no_args_is_help=True,
    cls=HelpGroup,
    rich_markup_mode=None,
)


@app.command()
def show(
    config: c.ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Every setting, its resolved value and where it came from (default, file, $GPTCLI_*, flag).

    Example: gptcli config show --config my.yaml
    """
    resolved = resolve_settings(config)
    rows = resolved.rows()
    if as_json:
        print(json.dumps({k: {"value": v, "source": s} for k, v, s in rows}, indent=2))
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("key", "value", "source"):
        table.add_column(column)
    for key, value, source in rows:
        table.add_row(key, json.dumps(value) if not isinstance(value, str) else value, source)
    stdout_console().print(table)


@app.command()
def path() -> None:
    """Print where the user config file is read from.

    Example: gptcli config path
    """
    from gptcli.paths import user_config_file

    print(user_config_file())
