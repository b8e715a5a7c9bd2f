"""`gptcli backends`: every registered backend and whether it can run here."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from gptcli.cli import common as c
from gptcli.cli.render import add_row


def backends(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List backends (built-ins, then plugins) with `ok` or why they cannot run here.

    A plugin that fails to import shows its distribution, version and error; one that claims a
    name already taken is shown as a conflict. GPTCLI_PLUGINS=none|name,... limits which plugins load.

    Examples:
      gptcli backends
      gptcli backends --json
      GPTCLI_PLUGINS=none gptcli backends
    """
    from gptcli.backends.base import list_backends
    from gptcli.backends.plugin_discovery import plugin_filter_warning

    rows = [backend_row(spec) for spec in list_backends()]
    filter_warning = plugin_filter_warning()
    if filter_warning:
        c.warn(filter_warning)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("backend", "from", "status"):
        table.add_column(column)
    for row in rows:
        add_row(table, row["name"], row["origin"], row["status"])
    c.stdout_console().print(table)


def backend_row(spec: Any) -> dict[str, Any]:
    """One row: importing the backend (and asking it) is the only way to know, so failures are caught."""
    from gptcli.backends.base import unavailable_reason
    from gptcli.errors import GptcliError

    error = None
    try:
        reason = unavailable_reason(spec.load_class(), f"backend '{spec.name}' ({spec.origin})", "auto")
    except GptcliError as exc:  # a plugin that does not import, or whose own unavailable_reason() is broken
        reason = error = exc.message
    return {
        "name": spec.name,
        "origin": spec.origin,
        "distribution": spec.distribution,
        "version": spec.version,
        "status": reason or "ok",
        "conflict": spec.conflict is not None,
        "error": error,
        "auto": _auto_choices(spec) if reason is None else None,  # what `auto` settings pick here
    }


def _auto_choices(spec: Any) -> dict[str, Any] | None:
    try:
        choices = getattr(spec.load_class(), "auto_choices", None)
        return choices() if choices is not None else None
    except (Exception, SystemExit):  # a plugin's answer is optional and never breaks the listing
        return None
