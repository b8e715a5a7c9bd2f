"""`--help` that reads well at 80 columns: Click's plain layout, examples kept whole, no word cut in two.

Every Typer app of the CLI is made with `cls=HelpGroup` and `rich_markup_mode=None`. The group fixes each
command's help the first time it is looked up:
- an `Examples:` block (a heading line, then indented lines) is printed line for line, never rewrapped,
  and a one-line `Example: gptcli …` becomes such a block;
- prose wraps between words only: never at a hyphen (`--no-repetition-stop`, `map-reduce` stay whole);
- the command list shows each command's whole first paragraph, wrapped, instead of cutting it with `...`.
Bool flags show no `<bool>` placeholder in this layout (Click prints only the flag).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import Any

from typer import _click
from typer.core import TyperGroup

RAW = "\b"  # Click: a paragraph whose first line is \b is printed as it is
_HYPHEN = "\ue000"  # a private-use character standing in for "-" while text is wrapped
_ONE_LINE_EXAMPLE = re.compile(r"^(Examples?):\s+(\S.*)$")


class HelpFormatter(_click.formatting.HelpFormatter):
    """Click's formatter, wrapping only at spaces: hyphens are hidden from the wrapper and put back."""

    def write_text(self, text: str) -> None:
        super().write_text(text.replace("-", _HYPHEN))

    def write_dl(self, rows: Sequence[tuple[str, str]], col_max: int = 30, col_spacing: int = 2) -> None:
        rows = [(first.replace("-", _HYPHEN), second.replace("-", _HYPHEN)) for first, second in rows]
        super().write_dl(rows, col_max, col_spacing)

    def getvalue(self) -> str:
        return super().getvalue().replace(_HYPHEN, "-")


class HelpContext(_click.core.Context):
    formatter_class = HelpFormatter


def keep_blocks(text: str) -> str:
    """The help text with its example blocks marked so that Click prints them line for line."""
    paragraphs = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        lines = paragraph.split("\n")
        one_line = _ONE_LINE_EXAMPLE.match(paragraph)
        if len(lines) == 1 and one_line:
            paragraph = f"{RAW}\n{one_line[1]}:\n  {one_line[2]}"
        elif (
            len(lines) > 1
            and lines[0] != RAW
            and lines[0].endswith(":")
            and all(line.startswith(" ") for line in lines[1:])
        ):
            paragraph = f"{RAW}\n{paragraph}"
        paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


def first_paragraph(text: str) -> str:
    """The first paragraph of a help text on one line (the command list's entry)."""
    return " ".join(inspect.cleandoc(text).split("\n\n")[0].split())


def polish(command: Any) -> None:
    """Give a command (once) the block-keeping help, its whole first paragraph as short help, our formatter."""
    if getattr(command, "_gptcli_help", False):
        return
    if command.help:
        command.short_help = command.short_help or first_paragraph(command.help)
        command.help = keep_blocks(command.help)
    command.context_class = HelpContext
    command._gptcli_help = True


class HelpGroup(TyperGroup):
    """A Typer group whose commands (and itself) get `polish`ed help."""

    context_class = HelpContext

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            polish(command)
        return command

    def format_help(self, ctx: Any, formatter: Any) -> None:
        polish(self)
        super().format_help(ctx, formatter)
