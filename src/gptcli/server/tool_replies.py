"""A chat choice whose reply may call tools: the constrained JSON read back (gptcli.tool_reply) into OpenAI's shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gptcli.decoding import Finished
from gptcli.sampling import TokenLogprob
from gptcli.server.shapes import Shape
from gptcli.tool_reply import ReplyReader, openai_calls, read_reply


@dataclass
class ToolShape(Shape):
    """`message.tool_calls` with `finish_reason: "tool_calls"` for a reply that calls tools; `content` for a text
    reply (`{"response": ...}`), and for a reply cut short (its text so far, or the raw JSON of unfinished
    calls: no partial call is presented as one)."""

    constraint_param: str = "tools"
    text_replies: bool = True  # a reply that calls no tool is text (else JSON: response_format's)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._reader = ReplyReader(text=self.text_replies)  # the streamed reply

    def chunk(self, *, role: bool = False, **fields: Any) -> dict[str, Any]:
        """As Shape's, but the role's chunk says content null, as OpenAI's first chunk of a call does: whether
        the reply calls or answers is not known yet, and a client joining a call's chunks keeps content null."""
        chunk = super().chunk(role=role, **fields)
        if role:
            chunk["choices"][0]["delta"]["content"] = None
        return chunk

    def text_chunks(self, text: str, logprobs: list[tuple[int, TokenLogprob]]) -> list[dict[str, Any]]:
        """A text reply's text as it comes; a call's JSON is held until it is whole."""
        said = self._reader.push(text)
        return [self.chunk(text=said, logprobs=logprobs)] if said else []

    def finish_chunks(self, finish: str, logprobs: list[tuple[int, TokenLogprob]]) -> list[dict[str, Any]]:
        """Each call as OpenAI streams one (its index, id, type and name, then its arguments, here whole), or
        the text of a reply cut short that was not streamed yet; then the finish reason."""
        reply = self._reader.finish()
        chunks = []
        if reply.calls:
            for index, call in enumerate(openai_calls(reply)):
                named = {**call, "index": index, "function": {"name": call["function"]["name"], "arguments": ""}}
                arguments = {"index": index, "function": {"arguments": call["function"]["arguments"]}}
                chunks += [self._calls_chunk(named, logprobs if index == 0 else None), self._calls_chunk(arguments)]
            finish = "tool_calls"
        elif not self._reader.is_response and reply.content:  # an answer's JSON, or the raw JSON of calls cut short
            chunks.append(self.chunk(text=reply.content, logprobs=logprobs))
        elif logprobs or (self._reader.is_response and not reply.content):  # unsent logprobs; an empty text's ""
            chunks.append(self.chunk(text="", logprobs=logprobs))
        return [*chunks, self.chunk(finish=finish)]

    def _calls_chunk(self, call: dict[str, Any], logprobs: list[tuple[int, TokenLogprob]] | None = None) -> dict:
        chunk = self.chunk(logprobs=logprobs)
        chunk["choices"][0]["delta"]["tool_calls"] = [call]
        return chunk

    def choice(self, finished: Finished, finish: str, *, with_logprobs: bool = False) -> dict[str, Any]:
        whole = super().choice(finished, finish, with_logprobs=with_logprobs)
        reply = read_reply(finished.text, text_replies=self.text_replies)
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.calls:
            message["tool_calls"] = openai_calls(reply)
        return {**whole, "message": message, "finish_reason": "tool_calls" if reply.calls else finish}
