"""A chat choice whose reply may call tools: the constrained JSON read back (gptcli.tools) into OpenAI's shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gptcli.decoding import Finished
from gptcli.server.shapes import Shape
from gptcli.tools import ReplyReader, ToolReply


@dataclass
class ToolShape(Shape):
    """`message.tool_calls` with `finish_reason: "tool_calls"` for a reply that calls tools; `content` for a text
    reply (`{"response": ...}`), and for a reply cut short (its text so far, or the raw JSON of unfinished
    calls: no partial call is presented as one)."""

    constraint_param: str = "tools"

    def choice(self, finished: Finished, finish: str, *, with_logprobs: bool = False) -> dict[str, Any]:
        whole = super().choice(finished, finish, with_logprobs=with_logprobs)
        reader = ReplyReader()
        reader.push(finished.text)
        reply = reader.finish()
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.calls:
            message["tool_calls"] = openai_calls(reply)
        return {**whole, "message": message, "finish_reason": "tool_calls" if reply.calls else finish}


def openai_calls(reply: ToolReply) -> list[dict[str, Any]]:
    """The calls as OpenAI's `message.tool_calls`."""
    return [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        for call in reply.calls
    ]
