"""Reading what the user gives a command: stdin when piped, a file, the argument."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gptcli.errors import InputError
from gptcli.textio import decode_text, read_text_file


def isatty(stream: Any) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (ValueError, OSError):
        return False


def read_stdin_if_piped() -> str:
    stream = sys.stdin
    if stream is None or stream.closed:
        return ""
    try:
        if stream.isatty():
            return ""
    except (ValueError, OSError):
        return ""
    buffer = getattr(stream, "buffer", None)
    data = buffer.read() if buffer is not None else stream.read().encode("utf-8")
    return decode_text(data, "standard input")


def gather_prompt(argument: str | None, file: Path | None) -> str:
    """stdin first, then the file, then the argument, joined by blank lines. Empty is an error."""
    parts = [read_stdin_if_piped()]
    if file is not None:
        parts.append(read_text_file(file))
    if argument is not None:
        parts.append(argument)
    text = "\n\n".join(p.strip("\n") for p in parts if p.strip())
    if not text.strip():
        raise InputError("the prompt is empty", hint="give it as an argument, with -f FILE, or on stdin")
    return text


def stdin_lines() -> Iterator[str]:
    """stdin line by line (decoded like any input, line ends dropped)."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:
        yield from (line.rstrip("\n") for line in sys.stdin)
        return
    for raw in buffer:
        yield decode_text(raw, "standard input").rstrip("\r\n")
