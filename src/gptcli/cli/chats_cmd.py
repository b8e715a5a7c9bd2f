"""`gptcli chats list|show|export|rm`: the conversations `gptcli chat` saved."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from gptcli.cli import common as c
from gptcli.cli import render
from gptcli.cli.helpfmt import HelpGroup
from gptcli.errors import InputError, UsageError

app = typer.Typer(
    help="List, show, export and delete saved chat conversations.",
    no_args_is_help=True,
    cls=HelpGroup,
    rich_markup_mode=None,
)


@app.command("list")
def list_(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Saved conversations, most recent first.

    Example: gptcli chats list
    """
    from gptcli.chat import ConversationStore

    store = ConversationStore()
    convs = store.list()
    for reason in store.skipped:
        render.warn(f"skipped {reason}")
    if as_json:
        rows = [
            {"id": cv.id, "title": cv.title, "model": cv.model, "messages": len(cv.messages), "updated": cv.updated}
            for cv in convs
        ]
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    if not convs:
        render.note("no saved conversations yet (start one with `gptcli chat`)")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("id", "updated", "messages", "model", "title"):
        table.add_column(column)
    for cv in convs:
        # the model's name may be a server's (chat --url) and the title is what was typed or pasted
        render.add_row(table, cv.id, cv.updated[:16].replace("T", " "), str(len(cv.messages)), cv.model, cv.title)
    render.stdout_console().print(table)


@app.command()
def show(
    conversation_id: Annotated[str, typer.Argument(help="Conversation id (or a unique prefix).", parser=c.nonempty_id)],
) -> None:
    """Print a conversation as Markdown.

    Example: gptcli chats show 20260101-120000-ab12
    """
    from gptcli.chat import ConversationStore, to_markdown

    sys.stdout.write(to_markdown(ConversationStore().load(conversation_id)))


@app.command()
def export(
    conversation_id: Annotated[str, typer.Argument(help="Conversation id (or a unique prefix).", parser=c.nonempty_id)],
    fmt: Annotated[str, typer.Option("--format", help="md | json")] = "md",
    output: Annotated[Path | None, c.path_option("--output", "-o", help="Write to a file instead of stdout.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a file that is already there.")] = False,
) -> None:
    """Export a conversation as Markdown or JSON.

    Examples:
      gptcli chats export 20260101-120000-ab12 --format json > chat.json
      gptcli chats export 20260101-12 --format md -o chat.md   # a unique start
    """
    from gptcli.atomicio import write_atomic
    from gptcli.chat import ConversationStore, to_markdown
    from gptcli.chat.conversation import conversation_json

    if fmt not in {"md", "json"}:
        raise UsageError(f"--format must be md or json, got {fmt!r}")
    exists = InputError(f"{output} already exists", hint="add --force to replace it, or choose another -o")
    replace = force or (output is not None and output.is_file() and not output.stat().st_size)  # new or empty
    if output is not None and output.is_file() and not replace:
        raise exists
    conv = ConversationStore().load(conversation_id)
    # JSON as the store writes it (compact when long), so that /load takes back what the store holds
    text = to_markdown(conv) if fmt == "md" else conversation_json(conv).decode("utf-8")
    if output is None:
        sys.stdout.write(text)
    else:
        try:  # exclusive: another export's file made since the check above is not replaced either
            write_atomic(output, text, mode=0o600, exclusive=not replace)
        except FileExistsError:
            raise exists from None
        render.note(f"wrote {output}")


@app.command("rm")
def rm(
    conversation_ids: Annotated[
        list[str], typer.Argument(help="Conversation ids (or unique prefixes).", parser=c.nonempty_id)
    ],
) -> None:
    """Delete saved conversations.

    Example: gptcli chats rm 20260101-120000-ab12
    """
    from gptcli.chat import ConversationStore

    store = ConversationStore()
    for ref in conversation_ids:
        render.note(f"deleted {store.delete(ref)}")
