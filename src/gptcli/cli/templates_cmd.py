"""`gptcli templates list|show|path`: built-in and user prompt templates."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from gptcli.cli import render
from gptcli.cli.helpfmt import HelpGroup

app = typer.Typer(
    help="Prompt templates for `gptcli generate --template NAME`.",
    no_args_is_help=True,
    cls=HelpGroup,
    rich_markup_mode=None,
)


@app.command("list")
def list_(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Every template: built-ins and those in the user templates folder.

    Example: gptcli templates list
    """
    from gptcli.templates import list_templates

    templates = list_templates(on_error=lambda exc: render.warn(f"left out: {exc.message}"))
    if as_json:
        rows = [
            {
                "name": t.name,
                "source": t.source,
                "path": str(t.path) if t.path else None,
                "description": t.description,
                "variables": dict(t.variables),
                "required": t.required,
                "sampling": {k: list(v) if isinstance(v, tuple) else v for k, v in t.sampling.items()},
            }
            for t in templates
        ]
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("name", "source", "variables", "description"):
        table.add_column(column)
    for t in templates:
        names, required = [k for k in t.fields if k != "input"], set(t.required)
        variables = ", ".join(k if k in required else f"{k}={t.variables[k]!r}" for k in names)
        render.add_row(table, t.name, t.source, variables or "-", t.description)
    render.stdout_console().print(table)


@app.command()
def show(name: Annotated[str, typer.Argument(help="Template name.")]) -> None:
    """Print a template as YAML.

    Example: gptcli templates show translate
    """
    import yaml

    from gptcli.templates import get_template

    class Dumper(yaml.SafeDumper):
        """Multi-line text as a `|` block, as a template file is written (PyYAML quotes it where it must)."""

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    template = get_template(name)
    render.note(f"# {template.source}: {template.path}")
    data = template.to_yaml_dict()
    print(yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=100), end="")


@app.command()
def path() -> None:
    """Print the folder user templates are read from (NAME.yaml files).

    Example: gptcli templates path
    """
    from gptcli.templates import user_templates_dir

    print(user_templates_dir())
