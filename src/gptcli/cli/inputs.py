"""Reading what the user gives a command: stdin when piped, a file, the argument."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gptcli.errors import InputError
from gptcli.textio import CHAT_MESSAGE, PROMPT, Limit, decode_text, over_limit, read_text_file, read_text_stream

STDIN = "standard input"


def isatty(stream: Any) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (ValueError, OSError):
        return False


def is_stdin(file: Path | None) -> bool:
    """A FILE argument of `-`: standard input, as for cat (the file `./-` is still a file)."""
    return file is not None and str(file) == "-"


def read_stdin_if_piped(limit: Limit = PROMPT, *, terminal: bool = False) -> str:
    """All of stdin when it is not a terminal (with `terminal`, from a terminal too: a FILE of `-`),
    at most `limit` (an InputError past it)."""
    stream = sys.stdin
    if stream is None or stream.closed:
        return ""
    try:
        if stream.isatty() and not terminal:
            return ""
    except (ValueError, OSError):
        return ""
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        return read_text_stream(buffer, STDIN, limit)
    text = stream.read(limit.max_bytes + 1)  # a text stream without bytes (tests): characters, close enough
    if len(text) > limit.max_bytes:
        raise over_limit(STDIN, limit)
    return text


def gather_prompt(argument: str | None, file: Path | None) -> str:
    """stdin first, then the file, then the argument, joined by blank lines. Empty is an error."""
    parts = [read_stdin_if_piped(terminal=is_stdin(file))]
    if file is not None and not is_stdin(file):
        parts.append(read_text_file(file, PROMPT))
    if argument is not None:
        parts.append(check_utf8(argument, "the prompt argument"))
    text = "\n\n".join(p.strip("\n") for p in parts if p.strip())
    if not text.strip():
        raise InputError("the prompt is empty", hint="give it as an argument, with -f FILE, or on stdin")
    return text


def stdin_lines(limit: Limit = CHAT_MESSAGE) -> Iterator[str | InputError]:
    """stdin line by line (decoded like any input, line ends dropped). A line over `limit`, or one that is not
    text, comes as its InputError (the rest of it read past, never held), so the reader answers it and goes on."""
    if sys.stdin is None:  # started with stdin closed (`<&-`): no lines
        return
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:
        yield from (line.rstrip("\n") for line in sys.stdin)
        return
    number = 0
    while raw := buffer.readline(limit.max_bytes + 1):
        number += 1
        if len(raw) > limit.max_bytes and not raw.endswith(b"\n"):
            yield over_limit(f"{STDIN}, a line", limit)  # at once: a pipe's line may never end
            while (rest := buffer.readline(limit.max_bytes)) and not rest.endswith(b"\n"):
                pass
            continue
        try:  # a bad byte's place is counted in its line: the line is named
            yield decode_text(raw, f"{STDIN}, line {number},", line=True).rstrip("\r\n")
        except InputError as exc:
            yield exc


def check_utf8(text: str, what: str) -> str:
    """`text` from the command line; bytes that are not UTF-8 (kept by Python as surrogates) are an InputError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{what} is not valid UTF-8 (at character {exc.start + 1})") from None
    return text
