"""`gptcli chat` on a pipe: one user turn per line (or a \"\"\" block), replies and only replies on stdout.

Plain mode writes each reply as it streams, ending with a newline. `--jsonl` writes one JSON object per
user message, so a reply spanning lines stays one record:
`{"role": "assistant", "content": …, "finish_reason": …, "conversation": …, "usage": {…}}`;
a message that could not be answered gets `{"error": …, "hint": …}` in its place (a reply that broke off: its
record with what came, `"finish_reason": "error"` and the error), and when the fault is not the message's own
(the server is gone, the model unknown) the chat ends there with that error's exit code.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from gptcli.cli import render
from gptcli.cli.chat_repl import ReplyInterrupts, SecondInterrupt, report_end, stream_plain
from gptcli.cli.inputs import stdin_lines
from gptcli.errors import EXIT_INTERRUPTED, ConfigError, GptcliError, InputError, UsageError
from gptcli.timings import usage

# What one line can get wrong (too long, a bad command or /set value): that line is answered with the
# error and the chat goes on. Anything else (a server gone, an unknown model) ends it with its exit code.
MESSAGE_ERRORS = (InputError, UsageError, ConfigError)


def run_piped(session: Any, backend_name: str, *, jsonl: bool = False) -> None:
    """Answer stdin line by line; Ctrl-C stops the current reply (kept, marked interrupted) and exits 130."""
    from gptcli.chat import collect_message, dispatch, is_command, stats_text

    lines = stdin_lines()

    def next_line() -> str | None:  # inside a """ block: a bad line is the whole block's error
        line = next(lines, None)
        if isinstance(line, InputError):
            raise line
        return line

    for first in lines:
        text = ""
        try:
            if isinstance(first, InputError):  # too long, or not text: that line's error, and the chat goes on
                raise first
            text = collect_message(first, next_line)
            if not text.strip():
                continue
            step = dispatch(session, text, backend_name)
        except GptcliError as exc:
            render.report(exc)
            if jsonl and not is_command(text):  # one record per user message, even a refused one
                write_record({"error": exc.message, "hint": exc.hint})
            if not isinstance(exc, MESSAGE_ERRORS):  # the server or the model failed, not this message:
                raise typer.Exit(exc.exit_code) from None  # the next lines would fail alike (saved so far)
            continue
        if step.output:
            print(step.output, file=sys.stderr)
        if step.exit:
            break
        if step.turn is None:
            continue
        try:
            interrupted = collect_json(step.turn, session) if jsonl else stream_plain(step.turn)
        except GptcliError as exc:  # the reply broke off (a server's stream): kept in the chat; its record, the end
            if jsonl:  # what came of the reply, as `generate --json` gives it: finish_reason "error"
                cut = reply_record(step.turn, session.conversation.id)
                write_record({**cut, "finish_reason": "error", "error": exc.message, "hint": exc.hint})
            raise
        report_end(step.turn, session.settings.sampling)
        render.detail(stats_text(session))  # -v: the reply's timings
        if interrupted:
            render.stderr_console().print("interrupted", style="yellow")
            raise typer.Exit(EXIT_INTERRUPTED)


def collect_json(turn: Any, session: Any) -> bool:
    """Run one reply to its end and write it as one JSON line; return whether Ctrl-C cut it."""
    try:
        with ReplyInterrupts():
            for _ in turn:
                pass
    except (KeyboardInterrupt, SecondInterrupt):
        turn.close()
    write_record(reply_record(turn, session.conversation.id))
    return bool(turn.interrupted)


def reply_record(turn: Any, conversation_id: str) -> dict[str, Any]:
    """A finished (or interrupted) reply as a JSON-ready dict."""
    finished = turn.finished
    text = finished.text if finished is not None else turn.text
    record: dict[str, Any] = {
        "role": "assistant",
        "content": text,
        "finish_reason": finished.reason if finished is not None else "interrupted",
        "conversation": conversation_id,
    }
    if finished is not None and finished.stats is not None:
        stats = finished.stats
        record["usage"] = usage(stats)
    return record


def write_record(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()
