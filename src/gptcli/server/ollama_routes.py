"""ollama's own API (/api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version) over the chat and
completions routes' machinery: the same prompts, tools, constraints, engine submission and waiting, written as
ollama writes an answer (ollama_shapes). Apps that speak ollama's API (its Python and JS packages, editor and
desktop front ends) use `gptcli serve` as they would an ollama server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from gptcli.decoding import Finished
from gptcli.server.errors import EVERY_METHOD, APIError, route_not_served
from gptcli.server.ollama_request import OllamaBody, OllamaChat, OllamaGenerate, OllamaShow, ollama_names
from gptcli.server.ollama_shapes import (
    NDJSON,
    ReplyWriter,
    model_entry,
    running_entry,
    served_as,
    show_body,
)
from gptcli.server.openai_routes import Submitted, failure_error, shutdown_error, state_of, submit, whole
from gptcli.server.prompt_ids import chat_request_prompt, completion_prompts
from gptcli.server.schemas import parse_body
from gptcli.server.sse import EventStreamResponse

router = APIRouter(prefix="/api")

OLLAMA_VERSION = "0.12.0"  # the version of ollama's API this one follows (clients check it for features)
ROUTES = "/api/chat, /api/generate, /api/tags, /api/show, /api/ps and /api/version"


@router.api_route("/version", methods=["GET", "HEAD"])  # HEAD: how some apps check for an ollama server
async def version() -> dict[str, str]:
    return {"version": OLLAMA_VERSION}


@router.api_route("/tags", methods=["GET", "HEAD"])
async def tags(request: Request) -> dict[str, Any]:
    return {"models": [model_entry(state_of(request))]}


@router.get("/ps")
async def running(request: Request) -> dict[str, Any]:
    return {"models": [running_entry(state_of(request))]}


@router.post("/show")
async def show(request: Request) -> dict[str, Any]:
    state = state_of(request)
    body = await parse_body(request, OllamaShow)
    served_as(state, body.model or body.name)
    return show_body(state)


@router.post("/chat")
async def chat(request: Request) -> Response:
    arrived = time.perf_counter()
    state = state_of(request)
    body = await parse_body(request, OllamaChat)
    name = served_as(state, body.model)
    if not body.messages:
        return loaded(body, ReplyWriter(name, chat=True, arrived=arrived))
    with ollama_names():
        asked = body.chat_request()
        # Off the event loop: a long prompt takes a while to tokenize, and tools' schemas to compile.
        tools = await asyncio.to_thread(asked.tool_spec, state.tokenizer)
        prompt = await asyncio.to_thread(chat_request_prompt, state.tokenizer, asked.messages, tools)
        body.fit_max_tokens(asked, len(prompt.ids), state.max_model_len)
        submitted = await submit(
            state,
            asked,
            [prompt.ids],
            chat=True,
            constraint_param="tools" if tools is not None else "format",
            prompt_param="messages",
            tokens_param="options.num_predict",
            continues=prompt.continues,
        )
    text_replies = tools is None or tools.answer is None
    writer = ReplyWriter(name, chat=True, arrived=arrived, tools=tools is not None, text_replies=text_replies)
    return await answer(request, body, writer, submitted)


@router.post("/generate")
async def generate(request: Request) -> Response:
    arrived = time.perf_counter()
    state = state_of(request)
    body = await parse_body(request, OllamaGenerate)
    name = served_as(state, body.model)
    body.check()
    if not body.prompt:
        return loaded(body, ReplyWriter(name, chat=False, arrived=arrived))
    with ollama_names():
        if body.raw:  # the text as it is, as /v1/completions sends it
            asked = body.raw_request()
            [(ids, _)] = await asyncio.to_thread(completion_prompts, state.tokenizer, body.prompt)
            continues = True
        else:  # the user's message (after the system's) in the chat template
            asked = body.chat_request()
            prompt = await asyncio.to_thread(chat_request_prompt, state.tokenizer, asked.messages)
            ids, continues = prompt.ids, False
        ids = body.context_ids(state.tokenizer.vocab_size) + ids
        body.fit_max_tokens(asked, len(ids), state.max_model_len)
        submitted = await submit(
            state,
            asked,
            [ids],
            chat=not body.raw,
            constraint_param="format",
            prompt_param="prompt",
            tokens_param="options.num_predict",
            continues=continues,
        )
    writer = ReplyWriter(name, chat=False, arrived=arrived, prompt_ids=ids)
    return await answer(request, body, writer, submitted)


@router.api_route("/{rest:path}", methods=EVERY_METHOD, include_in_schema=False)
async def unsupported(rest: str, request: Request) -> Response:
    """ollama's other routes (pull, create, copy, delete, push, embed): this server serves one model. One of its
    own with another method is a 405 (this route would otherwise take it)."""
    raise route_not_served(f"/api/{rest}", request.method, router.routes, f"{ROUTES} for the one model it serves")


def loaded(body: OllamaBody, writer: ReplyWriter) -> Response:
    """A request with nothing to answer loads the model (ollama's preload; keep_alive 0 unloads it): it is loaded."""
    reason = "unload" if body.keep_alive in (0, "0", "0s", "0m") else "load"
    return JSONResponse(writer.loaded(reason))


async def answer(request: Request, body: OllamaBody, writer: ReplyWriter, submitted: Submitted) -> Response:
    """NDJSON lines as the reply comes (ollama's default), or the whole answer (stream false)."""
    if body.streamed:

        def failure(finished: Finished) -> APIError:
            return (
                shutdown_error()
                if finished.reason == "cancelled"
                else failure_error(finished, submitted.constraint_param)
            )

        lines = writer.lines(submitted.events, failure)
        return EventStreamResponse(lines, on_close=submitted.cancel, media_type=NDJSON)
    finished = await whole(request, submitted)
    if finished is None:
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
    return JSONResponse(writer.whole(finished[0]))
