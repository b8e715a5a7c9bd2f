"""How a Responses API answer is written: the response object (its output items, usage, the settings it ran
with) and, streamed, its events (`event:` named, each with its sequence_number) in the order OpenAI's SDK
checks them. A reply that may call tools is read back by gptcli.tool_reply, as the chat route reads it."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from gptcli.decoding import Finished, Stats, Token
from gptcli.server.errors import APIError
from gptcli.server.sse import sse
from gptcli.tool_reply import ReplyReader, ToolCall, ToolReply, read_reply

CUT = ("length", "context")  # finish reasons of a reply cut short: status incomplete (OpenAI's max_output_tokens)


def response_usage(stats: Stats) -> dict[str, Any]:
    return {
        "input_tokens": stats.prompt_tokens,
        "input_tokens_details": {"cached_tokens": stats.cached_tokens},
        "output_tokens": stats.new_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": stats.prompt_tokens + stats.new_tokens,
    }


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@dataclass
class ResponseWriter:
    """One response: its id, the message item's id, and the settings it repeats (`echoed`)."""

    model: str
    echoed: dict[str, Any]
    tools: bool = False  # the reply is gptcli.tools' JSON: calls, or an answer in {"response": ...}
    text_replies: bool = True  # with tools: an answer is text (else JSON of text.format's schema)
    response_id: str = field(default_factory=lambda: "resp_" + uuid.uuid4().hex)
    message_id: str = field(default_factory=lambda: "msg_" + uuid.uuid4().hex)
    created_at: int = field(default_factory=lambda: int(time.time()))

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        *,
        usage: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        cut: bool = False,
    ) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "model": self.model,
            "output": output,
            "usage": usage,
            **self.echoed,
        }

    def message(self, text: str, status: str) -> dict[str, Any]:
        content = [text_part(text)] if status != "in_progress" else []
        return {"id": self.message_id, "type": "message", "status": status, "role": "assistant", "content": content}

    @staticmethod
    def function_call(call: ToolCall) -> dict[str, Any]:
        item_id = "fc_" + call.id.removeprefix("call_")
        return {
            "id": item_id,
            "type": "function_call",
            "status": "completed",
            "call_id": call.id,
            "name": call.name,
            "arguments": call.arguments,
        }

    def finished(self, finished: Finished, reply: ToolReply) -> dict[str, Any]:
        """The whole response for a reply read back: its calls as function_call items, else its text as a message
        (also a reply cut short: its text so far, or the raw JSON of calls it did not finish)."""
        cut = finished.reason in CUT
        status = "incomplete" if cut else "completed"
        if reply.calls:
            output = [self.function_call(call) for call in reply.calls]
        else:
            output = [self.message(reply.content or "", status)]
        return self.response(status, output, usage=response_usage(finished.stats), cut=cut)

    def whole(self, finished: Finished) -> dict[str, Any]:
        """The response to a request that was not streamed."""
        reply = (
            read_reply(finished.text, text_replies=self.text_replies) if self.tools else ToolReply((), finished.text)
        )
        return self.finished(finished, reply)

    async def events(
        self, source: AsyncIterator[tuple[int, Token | Finished]], failure: Callable[[Finished], APIError]
    ) -> AsyncIterator[str]:
        """The streamed response: created, in_progress, the message's text as it comes (a tool call's JSON is held
        until it is whole), each output item, then completed or incomplete; a reply that fails ends with an
        `error` event and response.failed (`failure`: the API error it is)."""
        numbers = itertools.count()

        def event(kind: str, **fields: Any) -> str:
            return sse({"type": kind, "sequence_number": next(numbers), **fields}, event=kind)

        started = self.response("in_progress", [])
        yield event("response.created", response=started)
        yield event("response.in_progress", response=started)
        reader = ReplyReader(text=self.text_replies) if self.tools else None
        at = {"item_id": self.message_id, "output_index": 0}
        sent: list[str] = []  # the message's text so far
        opened = False  # its item and content part were announced
        async with aclosing(source) as events:
            async for _, done in events:
                if isinstance(done, Token):
                    text = reader.push(done.text) if reader is not None else done.text
                    if text:
                        if not opened:
                            opened = True
                            yield event(
                                "response.output_item.added", output_index=0, item=self.message("", "in_progress")
                            )
                            yield event("response.content_part.added", **at, content_index=0, part=text_part(""))
                        sent.append(text)
                        yield event("response.output_text.delta", **at, content_index=0, delta=text, logprobs=[])
                    continue
                if done.reason in ("cancelled", "error"):
                    error = failure(done)
                    yield event("error", code=error.code, message=error.message, param=error.param)
                    output = [self.message("".join(sent), "incomplete")] if opened else []
                    code = "server_error" if error.status >= 500 else "invalid_prompt"
                    failed = self.response("failed", output, error={"code": code, "message": error.message})
                    yield event("response.failed", response=failed)
                    return
                reply = reader.finish() if reader is not None else ToolReply((), done.text)
                final = self.finished(done, reply)
                for index, item in enumerate(final["output"]):
                    if item["type"] == "function_call":
                        call_at = {"item_id": item["id"], "output_index": index}
                        added = {**item, "status": "in_progress", "arguments": ""}
                        yield event("response.output_item.added", output_index=index, item=added)
                        yield event("response.function_call_arguments.delta", **call_at, delta=item["arguments"])
                        yield event("response.function_call_arguments.done", **call_at, arguments=item["arguments"])
                        yield event("response.output_item.done", output_index=index, item=item)
                        continue
                    text = item["content"][0]["text"]
                    if not opened:
                        yield event("response.output_item.added", output_index=0, item=self.message("", "in_progress"))
                        yield event("response.content_part.added", **at, content_index=0, part=text_part(""))
                    if rest := text[len("".join(sent)) :]:  # not streamed yet: an answer's JSON, calls cut short
                        yield event("response.output_text.delta", **at, content_index=0, delta=rest, logprobs=[])
                    yield event("response.output_text.done", **at, content_index=0, text=text, logprobs=[])
                    yield event("response.content_part.done", **at, content_index=0, part=item["content"][0])
                    yield event("response.output_item.done", output_index=0, item=item)
                ending = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
                yield event(ending, response=final)
