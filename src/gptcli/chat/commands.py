"""Slash commands, terminal-independent, and the one dispatch of a typed line for the pipe and the REPL."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gptcli.chat.conversation import ChatFileError, is_save_of, read_conversation_file, write_conversation_file
from gptcli.chat.session import SAMPLING_KEYS, ChatSession, Turn
from gptcli.config import OutputConstraint
from gptcli.errors import ConfigError, InputError, UsageError
from gptcli.timings import timings_line

COMMANDS: dict[str, str] = {
    "/help": "list these commands",
    "/system TEXT": "set the system message (no TEXT: show it; none: clear it)",
    "/set KEY VALUE": "change a sampling setting: " + ", ".join(SAMPLING_KEYS),
    "/format KIND": "the replies' format: text, json, schema FILE, regex PATTERN or grammar FILE (no KIND: show it)",
    "/show": "settings, model and the token budget used/left",
    "/reset": "start a new conversation (the old one stays saved)",
    "/retry": "regenerate the last reply",
    "/undo": "drop the last exchange",
    "/save FILE": "save the conversation as Markdown (.md) or JSON (.json)",
    "/load FILE": "continue a conversation saved as JSON",
    "/stats": "timings of the last reply",
    "/exit": "leave (Ctrl-D does too)",
}


@dataclass(frozen=True)
class CommandResult:
    """What the REPL should do: print `output`, then maybe 'retry' (generate again) or 'exit'."""

    output: str = ""
    action: str | None = None


def is_command(line: str) -> bool:
    return line.startswith("/") and not line.startswith("//")


def help_text() -> str:
    width = max(len(k) for k in COMMANDS)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in COMMANDS.items())


MODEL_TEMPLATE = "the model's"  # /show's chat template without --chat-template
NO_TEMPLATE = "none: a plain transcript (User: / Assistant: lines)"  # a model without one (chat warns at start)


def show_text(chat: ChatSession, backend_name: str = "") -> str:
    conv = chat.conversation
    s = chat.settings.sampling
    dropped = conv.window_start
    trimmed = f"{dropped} oldest messages no longer sent to the model" if dropped else "none"
    template = conv.chat_template or (MODEL_TEMPLATE if chat.tokenizer.chat_template else NO_TEMPLATE)
    more = chat.next_turn()[0] - dropped  # a long last reply leaves no room for older exchanges
    if more > 0:
        trimmed += f"; the next message drops the oldest {more}" if not dropped else f"; the next drops {more} more"
        trimmed += " (no room for them)"
    lines = [
        f"model              {conv.model}{chat.where(backend_name)}",
        f"conversation       {conv.id} ({len(conv.messages)} messages)",
        f"system             {conv.system or '-'}",
        f"chat template      {template}",
        f"tokens             {chat.budget_line()}",
        f"trimmed            {trimmed}",
    ]
    for key in SAMPLING_KEYS:
        value = getattr(s, key)
        lines.append(f"{key.ljust(18)} {_shown(value)}{chat.setting_note(key)}")
    lines.append(f"{'output'.ljust(18)} {_output_format(s.constraint, chat.output_source)}")
    return "\n".join(lines)


FORMAT_FLAGS = {"json": "--format json", "json_schema": "--json-schema", "regex": "--regex", "grammar": "--grammar"}
FORMAT_KINDS = {"json": "json", "json_schema": "schema", "regex": "regex", "grammar": "grammar"}  # /format's words


def format_flag(constraint: OutputConstraint | None) -> str:
    """The flag that gives a chat this output format (a ChatSession's `output_source` when it was given)."""
    return FORMAT_FLAGS[constraint.kind] if constraint is not None else ""


def _output_format(constraint: OutputConstraint | None, set_by: str) -> str:
    """The structured output the replies must follow, in one line, with what set it: a flag (--json-schema, --format
    json, --regex, --grammar), `/format KIND`, or the chat file it was resumed or loaded from."""
    if constraint is None:
        return "free text"
    label = f"({set_by or 'saved with the conversation'})"
    if constraint.kind == "json":
        return f"any JSON {label}"
    source = " ".join(constraint.source.split())
    shown = source if len(source) <= 60 else source[:59] + "…"
    if constraint.kind in ("regex", "grammar"):
        return f"{constraint.kind} {shown} {label}"
    return f"JSON Schema {shown} {label}"


FORMAT_USAGE = "usage: /format text | json | schema FILE | regex PATTERN | grammar FILE"


def parse_format(arg: str) -> OutputConstraint | None:
    """`/format`'s argument as an output format, checked as the flags are (None: free text)."""
    from gptcli import constraints
    from gptcli.textio import GRAMMAR_FILE, SCHEMA_FILE, read_text_file

    kind, _, rest = arg.partition(" ")
    rest = rest.strip()
    if kind in {"text", "json"} and not rest:
        return constraints.ANY_JSON if kind == "json" else None
    if kind == "schema" and rest:
        path = Path(rest).expanduser()
        return constraints.json_schema(read_text_file(path, SCHEMA_FILE), str(path))
    if kind == "regex" and rest:
        return constraints.regex(rest, "/format regex")
    if kind == "grammar" and rest:  # llama.cpp's GBNF or Lark, as --grammar
        path = Path(rest).expanduser()
        return constraints.grammar_text(read_text_file(path, GRAMMAR_FILE), str(path))
    raise UsageError(
        FORMAT_USAGE, hint="text: free replies; json: any JSON; a JSON Schema file; a regex; a grammar file"
    )


def _shown(value: object) -> str:
    """A setting's value as /show and /set print it, as /set takes it: stop strings comma-separated, no value as
    `none` (a seed's: random), not Python's None or an empty line."""
    if isinstance(value, tuple):
        return ", ".join(value) or "none"
    return "none" if value is None else str(value)


def stats_text(chat: ChatSession) -> str:
    if chat.last_stats is None:
        return "no reply yet"
    return timings_line(chat.last_stats, cached=chat.cached_tokens_are)


def run_command(chat: ChatSession, line: str, backend_name: str = "") -> CommandResult:
    """Execute a slash command. Errors raise GptcliError; the REPL prints them and goes on."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    name = name.lower()
    if name in {"/exit", "/quit", "/bye"}:
        return CommandResult(action="exit")
    if name in {"/help", "/?"}:
        return CommandResult(help_text())
    if name == "/system":
        if not arg:
            return CommandResult(f"system: {chat.conversation.system or '-'}")
        if arg.lower() in {"none", "null"}:  # as /set seed none and /set stop none
            chat.set_system("")
            return CommandResult("system message cleared")
        chat.set_system(arg)
        return CommandResult("system message set")
    if name == "/set":
        key, _, value = arg.partition(" ")
        if not key or not value.strip():
            raise UsageError("usage: /set KEY VALUE", hint="settings: " + ", ".join(SAMPLING_KEYS))
        try:
            stored = chat.set_sampling(key, value.strip())
        except ConfigError as exc:  # its message names "/set KEY" (set_sampling); its hint names the flag
            raise UsageError(exc.message) from None
        return CommandResult(f"{key} = {_shown(stored)}")
    if name == "/format":
        if arg:
            constraint = parse_format(arg)
            chat.set_output(constraint, f"/format {FORMAT_KINDS[constraint.kind]}" if constraint else "")
        return CommandResult(f"output: {_output_format(chat.settings.sampling.constraint, chat.output_source)}")
    if name == "/show":
        return CommandResult(show_text(chat, backend_name))
    if name == "/reset":
        chat.reset()
        return CommandResult("new conversation " + chat.conversation.id)
    if name == "/retry":
        return CommandResult(action="retry")
    if name == "/undo":
        removed = chat.undo()
        return CommandResult(f"dropped the last exchange ({removed} messages)")
    if name == "/save":
        if not arg:
            raise UsageError("usage: /save FILE.md or /save FILE.json")
        path = Path(arg).expanduser()
        if path.is_file() and path.resolve() not in chat.own_files and not is_save_of(path, chat.conversation):
            raise InputError(
                f"{path} already exists and is not a save of this conversation",
                hint="choose another name, or remove that file first",
            )
        try:
            kind = write_conversation_file(chat.conversation, path)
        except OSError as exc:  # a folder that cannot be made or written: say so, the chat goes on
            raise InputError(f"cannot save to {path}: {exc.strerror or exc}") from None
        chat.own_files.add(path.resolve())
        return CommandResult(f"saved {kind} to {path}")
    if name == "/load":
        if not arg:
            raise UsageError("usage: /load FILE.json")
        path = Path(arg).expanduser()
        try:
            chat.load(read_conversation_file(path))
        except ChatFileError as exc:  # too long to save: refused before anything changed
            raise InputError(
                f"cannot load {path}: {exc.message}", hint="trim the file: drop its oldest messages"
            ) from None
        chat.own_files.add(path.resolve())  # /save may write it back
        count = len(chat.conversation.messages)
        return CommandResult(f"loaded {count} messages as conversation {chat.conversation.id}")
    if name == "/stats":
        return CommandResult(stats_text(chat))
    raise UsageError(f"unknown command {name}", hint="/help lists the commands")


def collect_message(first: str, more: Callable[[], str | None]) -> str:
    '''A message as typed: one line, or `"""` … `"""` spanning lines (`more()` gives the next, None at EOF).'''
    if not first.lstrip().startswith('"""'):
        return first
    body = first.lstrip()[3:]
    if body.rstrip().endswith('"""'):
        return body.rstrip()[:-3]
    lines = [body] if body else []
    while (line := more()) is not None:
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            break
        lines.append(line)
    return "\n".join(lines).strip("\n")


@dataclass(frozen=True)
class Step:
    """What one typed line led to: command output to show, a reply to stream (`turn`), or leaving."""

    output: str = ""
    turn: Turn | None = None
    exit: bool = False


def dispatch(chat: ChatSession, text: str, backend_name: str = "") -> Step:
    """The one dispatch, for the pipe and the REPL: a slash command, or a user message to reply to.

    Errors raise GptcliError; the caller prints them and goes on.
    """
    if not is_command(text):
        return Step(turn=chat.say(text))
    result = run_command(chat, text, backend_name)
    if result.action == "retry":
        return Step(result.output, turn=chat.retry())
    return Step(result.output, exit=result.action == "exit")
