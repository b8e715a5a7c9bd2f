"""A reply that may call tools, read back: the constrained JSON gptcli.tools asks for (`ReplyReader`, as it
streams or whole) into its calls or its text, and the calls in OpenAI's shape (`openai_calls`)."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@dataclass(frozen=True)
class ToolReply:
    """The reply read back: its calls, or its text (a `response`, or the raw JSON of a reply cut short)."""

    calls: tuple[ToolCall, ...]
    content: str | None


RESPONSE_START = '{"response": "'  # how the constrained reply begins (constraints.JSON_OPTIONS: ", " and ": ")
# JSON string pieces that decode alone: plain characters, a simple escape, or a \u escape (a UTF-16 pair whole)
STRING_PIECE = re.compile(
    r'[^"\\]+|\\["\\/bfnrt]|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u(?![dD][89abAB])[0-9a-fA-F]{4}'
)


class ReplyReader:
    """Reads the constrained reply as the decoder writes it: `push` returns the text of a `response`
    as it comes, `finish` the calls, or, for a reply cut short, the text it holds (no partial call)."""

    def __init__(self) -> None:
        self.raw = ""
        self._read = len(RESPONSE_START)  # where the response's string is read up to
        self._text: list[str] = []

    @property
    def is_response(self) -> bool:
        return self.raw.startswith(RESPONSE_START)

    def push(self, text: str) -> str:
        """Add the reply's next text; the response's text it completes ("" for calls, or until it is known)."""
        self.raw += text
        if not self.is_response:
            return ""
        pieces = []
        while match := STRING_PIECE.match(self.raw, self._read):
            piece = match.group()
            pieces.append(piece if piece[0] != "\\" else json.loads(f'"{piece}"'))
            self._read = match.end()
        said = "".join(pieces)
        self._text.append(said)
        return said

    def finish(self) -> ToolReply:
        try:
            reply = json.loads(self.raw)
        except ValueError:  # cut short: the response's text so far, or the calls' raw JSON (no call is whole)
            return ToolReply((), "".join(self._text) if self.is_response else self.raw)
        if "response" in reply:
            return ToolReply((), reply["response"])
        calls = tuple(
            ToolCall(f"call_{uuid.uuid4().hex[:24]}", call["name"], json.dumps(call["arguments"], ensure_ascii=False))
            for call in reply["tool_calls"]
        )
        return ToolReply(calls, None)


def openai_calls(reply: ToolReply) -> list[dict[str, Any]]:
    """The calls as OpenAI's `message.tool_calls`."""
    return [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        for call in reply.calls
    ]
