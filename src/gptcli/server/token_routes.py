"""/tokenize and /detokenize: the served model's tokenizer, in vLLM's and llama.cpp's server shapes.

A client that counts tokens before it sends (to fit a context, to price a prompt) asks the server that
will read them. Both peers' request fields are taken: vLLM's `prompt` / `messages` and
`add_special_tokens` (default true), llama.cpp's `content`, `add_special` (default false) and
`with_pieces`. The answer carries both peers' fields too. A chat's `tools` (with `tool_choice`,
`parallel_tool_calls` and `response_format`) count as the chat route writes them into the prompt.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, model_validator

from gptcli.server.errors import APIError
from gptcli.server.prefill_fields import PrefillFields
from gptcli.server.prompt_ids import chat_request_prompt
from gptcli.server.schemas import REQUEST_MODEL, ChatMessage, ToolFields, parse_body
from gptcli.server.state import ServerState
from gptcli.tokenizer import Tokenizer
from gptcli.tools import ToolSpec

router = APIRouter()
MAX_DETOKENIZE = 1 << 20  # token ids in one /detokenize request (the body limit comes first in practice)


class TokenizeRequest(ToolFields, PrefillFields):
    model: str | None = None
    prompt: str | None = None  # vLLM
    content: str | None = None  # llama.cpp
    messages: list[ChatMessage] | None = Field(None, min_length=1)  # vLLM: rendered as the chat route does
    add_special_tokens: bool | None = None  # vLLM (default true)
    add_special: bool | None = None  # llama.cpp (default false)
    with_pieces: bool = False  # llama.cpp: each token as {"id", "piece"}

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        given = [name for name in ("prompt", "content", "messages") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("send exactly one of prompt, content (text) or messages (a chat)")
        return self

    def chat_tools(self, tokenizer: Tokenizer) -> ToolSpec | None:
        """The tools in the chat's prompt, as the chat route reads them; a 400 beside a text to tokenize."""
        if self.messages is None and (self.tools is not None or self.tool_choice is not None):
            message = "tools: only a chat's prompt holds them; send the messages with the tools"
            raise APIError(400, message, param="tools", code="invalid_value")
        return self.tool_spec(tokenizer)


class DetokenizeRequest(BaseModel):
    model_config = REQUEST_MODEL
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE)


def _state(request: Request) -> ServerState:
    return request.app.state.gptcli


@router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    state = _state(request)
    body = await parse_body(request, TokenizeRequest)
    state.check_model(body.model)
    tools = await asyncio.to_thread(body.chat_tools, state.tokenizer)  # off the event loop, as the chat route
    if body.messages is not None:
        ids = (await asyncio.to_thread(chat_request_prompt, state.tokenizer, body.messages, tools, body)).ids
    else:
        text = body.prompt if body.prompt is not None else body.content
        special = body.add_special_tokens if body.add_special_tokens is not None else body.add_special
        if special is None:
            special = body.prompt is not None  # each peer's own default
        ids = await asyncio.to_thread(state.tokenizer.encode, text or "", add_special_tokens=special)
    tokens: list[Any] = ids
    if body.with_pieces:
        tokens = [{"id": i, "piece": _piece(state.tokenizer.token_bytes(i))} for i in ids]
    return {"tokens": tokens, "count": len(ids), "max_model_len": state.max_model_len}


def _piece(data: bytes) -> str | list[int]:
    """A token's text, or, as llama-server gives it, its bytes where they are part of a character ("日" split
    over two tokens): a "\ufffd" for each would lose them."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)


@router.post("/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    state = _state(request)
    body = await parse_body(request, DetokenizeRequest)
    state.check_model(body.model)
    vocab = state.tokenizer.vocab_size
    if body.tokens and (min(body.tokens) < 0 or max(body.tokens) >= vocab):
        raise APIError(400, f"tokens: token ids must be in [0, {vocab})", param="tokens", code="invalid_value")
    text = state.tokenizer.decode(body.tokens, skip_special_tokens=False)
    return {"prompt": text, "content": text}
