"""A reply that may call tools, read back: the constrained JSON gptcli.tools asks for (`ReplyReader`, as it
streams or whole) into its calls or its text, the calls in OpenAI's shape (`openai_calls`), and a server's
calls in that shape read back (`StreamedCalls`, for a client: gptcli.remote)."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, fields
from typing import Any

from gptcli.decoding import Finished


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


ANSWER_START = '{"response": '  # how a reply that calls no tool begins (constraints.JSON_OPTIONS: ", " and ": ")
RESPONSE_START = ANSWER_START + '"'  # a text reply's
# JSON string pieces that decode alone: plain characters, a simple escape, or a \u escape (a UTF-16 pair whole)
STRING_PIECE = re.compile(
    r'[^"\\]+|\\["\\/bfnrt]|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u(?![dD][89abAB])[0-9a-fA-F]{4}'
)


class ReplyReader:
    """Reads the constrained reply as the decoder writes it: `push` returns the text of a `response`
    as it comes, `finish` the calls, or, for a reply cut short, the text it holds (no partial call)."""

    def __init__(self, *, text: bool = True) -> None:
        self.text = text  # a reply that calls no tool is text (else JSON of response_format's schema)
        self.raw = ""
        self._read = len(RESPONSE_START)  # where the response's string is read up to
        self._text: list[str] = []

    @property
    def is_response(self) -> bool:
        return self.text and self.raw.startswith(RESPONSE_START)

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

    @staticmethod
    def _answer(raw: str) -> str:
        return raw.removeprefix(ANSWER_START)

    def finish(self) -> ToolReply:
        try:
            reply = json.loads(self.raw)
        except ValueError:  # cut short: the response's text so far, an answer's JSON so far, or the calls' raw JSON
            return ToolReply((), "".join(self._text) if self.is_response else self._answer(self.raw))
        if "response" in reply:  # text, or the JSON of an answer in response_format's schema, as it was written
            return ToolReply((), reply["response"] if self.is_response else self._answer(self.raw[:-1]))
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


def read_reply(text: str, *, text_replies: bool = True) -> ToolReply:
    """A whole reply's calls, or its text (`text_replies` false: the JSON of response_format's answer)."""
    reader = ReplyReader(text=text_replies)
    reader.push(text)
    return reader.finish()


@dataclass(frozen=True)
class CallsFinished(Finished):
    """The end of a reply that a server already read into calls or text (its `tool_calls` and `content`)."""

    reply: ToolReply = ToolReply((), None)


def reply_of(finished: Finished, *, text_replies: bool = True) -> ToolReply:
    """The calls or text of a reply that may call tools: as a server read it, or read here from its JSON
    (`text_replies` false: a reply that calls none is the JSON of response_format's answer)."""
    if isinstance(finished, CallsFinished):
        return finished.reply
    return read_reply(finished.text, text_replies=text_replies)


class StreamedCalls:
    """A server's `tool_calls` put back together: OpenAI streams each call's index, id and name first and its
    arguments in pieces after; a whole answer's `message.tool_calls` (no index) reads the same way."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def add(self, pieces: list[dict[str, Any]]) -> None:
        for position, piece in enumerate(pieces):
            index = piece["index"] if isinstance(piece.get("index"), int) else position
            call = self._calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            function = piece.get("function") if isinstance(piece.get("function"), dict) else {}
            call["id"] = call["id"] or str(piece.get("id") or "")
            call["name"] = call["name"] or str(function.get("name") or "")
            arguments = function.get("arguments") or ""
            call["arguments"] += arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)

    def finished(self, finished: Finished) -> CallsFinished:
        """`finished` (the content streamed as its text) with the calls, or that text, as its reply."""
        calls = tuple(ToolCall(c["id"], c["name"], c["arguments"]) for _, c in sorted(self._calls.items()))
        reply = ToolReply(calls, None if calls else finished.text)
        return CallsFinished(**{f.name: getattr(finished, f.name) for f in fields(finished)}, reply=reply)
