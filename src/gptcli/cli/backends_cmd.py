"""`gptcli backends`: every registered backend and whether it can run here."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from gptcli.cli import common as c


def backends(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List backends (built-ins, then plugins) with `ok` or why they cannot run here.

    Example: gptcli backends
    """
    from gptcli.backends.base import list_backends
    from gptcli.errors import GptcliError

    rows = []
    for spec in list_backends():
        try:
            reason = spec.load_class().unavailable_reason("auto")
        except GptcliError as exc:
            reason = exc.message
        rows.append({"name": spec.name, "origin": spec.origin, "status": reason or "ok"})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("backend", "from", "status"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["origin"], row["status"])
    c.stdout_console().print(table)
