"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from gptcli.config import SamplingConfig
from gptcli.decoding import Finished, Stats, Token
from gptcli.errors import ConfigError
from gptcli.prompts import transcript_sampling
from gptcli.sampling import TokenLogprob
from gptcli.server.engine_bridge import EngineStream, check_fits, wait_for_disconnect
from gptcli.server.errors import APIError, error_body
from gptcli.server.prompt_ids import chat_request_prompt, completion_prompts
from gptcli.server.schemas import ChatRequest, CompletionRequest, SamplingRequest, parse_body
from gptcli.server.shapes import Shape, usage
from gptcli.server.sse import DONE, EventStreamResponse, sse
from gptcli.server.state import ServerState
from gptcli.server.tool_replies import ToolShape

router = APIRouter(prefix="/v1")

# Our finish reasons as OpenAI names them; "cancelled" (client gone, server stopping) is never sent: a stream
# still read when the server's shutdown cancels it ends with an error event instead.
OPENAI_FINISH = {"stop": "stop", "length": "length", "context": "length", "repetition": "stop", "interrupted": "stop"}


def state_of(request: Request) -> ServerState:
    return request.app.state.gptcli


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = state_of(request)
    return {"object": "list", "data": [state.model_card()]}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    state = state_of(request)
    state.check_model(model_id)
    return state.model_card()


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    state = state_of(request)
    body = await parse_body(request, ChatRequest)
    state.check_model(body.model)
    # Off the event loop: a long prompt takes a while to tokenize, and tools' schemas to compile.
    tools = await asyncio.to_thread(body.tool_spec, state.tokenizer)
    prompt = await asyncio.to_thread(chat_request_prompt, state.tokenizer, body.messages, tools, body)
    context = prompt.ids if prompt.continues else []  # an assistant's message continued: its text reads on
    if tools is None:
        shape = Shape(
            "chat", state.model_name, tokenizer=state.tokenizer, constraint_param=body.output_param(), context=context
        )
    else:
        text_replies = tools.answer is None
        shape = ToolShape(
            "chat", state.model_name, tokenizer=state.tokenizer, text_replies=text_replies, context=context
        )
    return await respond(request, state, body, [prompt.ids], [shape], continues=prompt.continues)


@router.post("/completions")
async def completions(request: Request) -> Response:
    state = state_of(request)
    body = await parse_body(request, CompletionRequest)
    state.check_model(body.model)
    prompts = await asyncio.to_thread(completion_prompts, state.tokenizer, body.prompt)
    # the response's id, for every choice
    one = Shape("text", state.model_name, tokenizer=state.tokenizer, constraint_param=body.output_param())
    shapes = [
        replace(one, echo=text if body.echo else "", prompt_ids=ids, context=ids, index=index)
        for index, (ids, text) in enumerate(prompts)
    ]
    return await respond(request, state, body, [ids for ids, _ in prompts], shapes, continues=True)


async def respond(
    request: Request,
    state: ServerState,
    body: SamplingRequest,
    prompts: list[list[int]],
    shapes: list[Shape],
    *,
    continues: bool,
) -> Response:
    """Check each prompt fits, submit them all to the engine, then stream or wait for the whole answer.
    `continues`: the replies continue the prompts' text (completions, a message continued), not a new turn."""
    chat = shapes[0].kind == "chat"
    param = PROMPT_PARAM[chat]
    submitted = await submit(
        state,
        body,
        prompts,
        chat=chat,
        constraint_param=shapes[0].constraint_param,
        prompt_param=param,
        continues=continues,
    )
    if body.stream:
        events = stream_body(submitted.events, shapes, include_usage=body.include_usage)
        return EventStreamResponse(events, on_close=submitted.cancel)
    finished = await whole(request, submitted)
    if finished is None:
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
    with_logprobs = submitted.params.logprobs is not None
    choices = [
        shape.choice(done, OPENAI_FINISH.get(done.reason, "stop"), with_logprobs=with_logprobs)
        for shape, done in zip(shapes, finished, strict=True)
    ]
    whole_body = {**shapes[0].envelope(False), "choices": choices, "usage": usage([f.stats for f in finished])}
    return JSONResponse(whole_body)


PROMPT_PARAM = {True: "messages", False: "prompt"}  # the field that holds a chat's (True) or a completion's prompt


@dataclass
class Submitted:
    """A request's sequences in the engine: their merged events, and the sampling settings they run with."""

    streams: list[EngineStream]
    events: AsyncIterator[tuple[int, Token | Finished]]
    params: SamplingConfig
    constraint_param: str  # the field that set the reply's grammar (a failing one's 400 names it)

    def cancel(self) -> None:
        for stream in self.streams:
            stream.cancel()


async def submit(
    state: ServerState,
    body: SamplingRequest,
    prompts: list[list[int]],
    *,
    chat: bool,
    constraint_param: str,
    prompt_param: str,
    tokens_param: str | None = None,
    continues: bool = False,
) -> Submitted:
    """Check each prompt fits (a 400 naming `prompt_param`, or `tokens_param` where fewer tokens would fit: by
    default the body's own max_tokens field), then submit them all to the engine (chat: a base model's transcript
    stops where it would write the user's turn; `continues`: each reply continues its prompt's text, decoded after
    it); the routes of every API share it."""
    tokens_param = tokens_param or body.max_tokens_field()
    limits = state.engine.limits
    if len(prompts) > limits.max_running + limits.max_queue:  # a 503 would send the client round forever
        message = (
            f"prompt: {len(prompts)} prompts, but this server runs and queues at most "
            f"{limits.max_running + limits.max_queue} at once (--parallel {limits.max_running} + "
            f"--max-queue {limits.max_queue}); send fewer in one request"
        )
        raise APIError(400, message, param="prompt", code="invalid_value")
    for ids in prompts:
        if len(ids) >= state.context_length:
            message = context_exceeded(len(ids), state.context_length, prompt_param)
            raise APIError(400, message, param=prompt_param, code="context_length_exceeded")
    arrived = time.perf_counter()
    params = replace(body.sampling(state.defaults, state.tokenizer.vocab_size), continues_prompt=continues)
    if chat:  # a base model's transcript: its reply ends where it would write the user's turn
        params = transcript_sampling(params, state.tokenizer)
    if params.constraint is not None:  # the token table and grammar, built here rather than in the engine's step
        from gptcli.constraints import prepare

        try:
            await asyncio.to_thread(prepare, params.constraint, state.tokenizer, constraint_param)
        except ConfigError as exc:  # it matches nothing, or fails at its first token: the request's own format
            raise APIError(400, exc.message, param=constraint_param, code="invalid_value") from None
    check_fits(state.engine, prompts, params, prompt_param=prompt_param, tokens_param=tokens_param)
    streams: list[EngineStream] = []
    try:
        for ids in prompts:
            streams.append(EngineStream(state.engine, ids, params))
    except BaseException:  # a full queue for one prompt: none of the request's prompts runs
        for stream in streams:
            stream.cancel()
        raise
    constrained = params.constraint is not None
    events = merged([timed_events(stream, state, arrived, constrained=constrained) for stream in streams])
    return Submitted(streams, events, params, constraint_param)


async def whole(request: Request, submitted: Submitted) -> list[Finished] | None:
    """Each sequence's Finished event once all have ended; None when the client left first (generation stops).
    A sequence the engine cancelled (shutdown) or that failed raises the API error it causes."""
    waiter = asyncio.ensure_future(wait_for_disconnect(request))
    collector = asyncio.ensure_future(last_events(submitted.events, len(submitted.streams)))
    try:
        await asyncio.wait({waiter, collector}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        client_left = not collector.done()
        if client_left:  # (or this task was cancelled): stop generating for it
            submitted.cancel()
            collector.cancel()
    if client_left:
        return None
    finished = collector.result()
    if any(f.reason == "cancelled" for f in finished):
        raise shutdown_error()
    if failed := next((f for f in finished if f.reason == "error"), None):
        raise failure_error(failed, submitted.constraint_param)
    return finished


def context_exceeded(prompt_tokens: int, context: int, prompt_param: str) -> str:
    """A prompt over the context, in OpenAI's and vLLM's words: clients such as litellm know the error by them
    (OpenAI's SDK puts only the message in the exception's text; `code` is context_length_exceeded too)."""
    return (
        f"This model's maximum context length is {context} tokens. However, your {prompt_param} resulted in "
        f"{prompt_tokens} tokens. Please reduce the length of the {prompt_param}."
    )


def shutdown_error() -> APIError:
    """A request the engine cancelled while the client still waits: the server is stopping (--grace ran out)."""
    return APIError(503, "the request was cancelled: the server is shutting down", headers={"Retry-After": "1"})


def failure_error(finished: Finished, param: str) -> APIError:
    """A reply that ended in error: the request's output grammar (400, with why, naming `param`), else the
    engine (500)."""
    if finished.error:  # only structured output says why: the request's own schema, format or tools
        return APIError(400, f"{param}: {finished.error}", param=param, code="invalid_value")
    return APIError(500, "the engine failed while generating this response")


async def merged(sources: list[AsyncIterator[Token | Finished]]) -> AsyncIterator[tuple[int, Token | Finished]]:
    """(source index, event) as the sources' events come; each source's own order is kept. Leaving early
    closes every source (which cancels its sequence)."""
    if len(sources) == 1:  # the usual case, without a task in between
        async with aclosing(sources[0]) as only:
            async for event in only:
                yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Token | Finished]] = asyncio.Queue()

    async def pump(index: int, source: AsyncIterator[Token | Finished]) -> None:
        async with aclosing(source) as events:
            async for event in events:
                await queue.put((index, event))

    tasks = [asyncio.ensure_future(pump(index, source)) for index, source in enumerate(sources)]
    try:
        remaining = len(sources)
        while remaining:
            index, event = await queue.get()
            remaining -= isinstance(event, Finished)
            yield index, event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def timed_events(
    stream: EngineStream, state: ServerState, arrived: float, *, constrained: bool = False
) -> AsyncIterator[Token | Finished]:
    """The sequence's events, recording time to first token and end-to-end latency as they pass.

    A `constrained` reply (structured output, tools) that the repetition stop cut is an unfinished match: it
    ends as "length", as one cut at max_tokens does (and as vLLM, which has no such stop, reports the same
    runaway reply), so that no API says it finished (OpenAI's `parse()` and LangChain read `stop` as a whole
    match; Responses: `incomplete`; ollama: `done_reason` "length")."""
    first = True
    async with aclosing(stream.events()) as events:
        async for event in events:
            if isinstance(event, Token) and first and event.id is not None:
                first = False
                state.metrics.observe_first_token(time.perf_counter() - arrived)
            if isinstance(event, Finished):
                state.metrics.observe_finished(
                    prompt_tokens=event.stats.prompt_tokens,
                    cached_tokens=event.stats.cached_tokens,
                    new_tokens=event.stats.new_tokens,
                    e2e_s=time.perf_counter() - arrived,
                )
                if constrained and event.reason == "repetition":
                    event = replace(event, reason="length")
            yield event


async def last_events(events: AsyncIterator[tuple[int, Token | Finished]], count: int) -> list[Finished]:
    """Each of `count` sequences' Finished event, by index."""
    finished: dict[int, Finished] = {}
    async with aclosing(events) as source:
        async for index, event in source:
            if isinstance(event, Finished):
                finished[index] = event
    if len(finished) != count:
        raise RuntimeError("the engine ended a sequence without a Finished event")
    return [finished[index] for index in range(count)]


async def stream_body(
    events: AsyncIterator[tuple[int, Token | Finished]], shapes: list[Shape], *, include_usage: bool
) -> AsyncIterator[str]:
    """SSE chunks: the role (chat), text deltas, each choice's finish reason, usage if asked, then [DONE].

    A token's logprobs ride on the chunk that carries its text; a token whose text is held back (part of
    a character, the start of a possible stop string) has them sent with the next text, or before the
    finish reason. Several prompts' choices interleave, each chunk naming its choice's index."""
    scored: list[list[tuple[int, TokenLogprob]]] = [[] for _ in shapes]
    stats: list[Stats] = []
    async with aclosing(events) as source:
        for shape in shapes:
            if shape.kind == "chat":
                yield sse(shape.chunk(role=True))
            if shape.echo:
                yield sse(shape.chunk(text=shape.echo))
        async for index, event in source:
            shape = shapes[index]
            if isinstance(event, Token):
                if event.id is not None and event.logprob is not None:
                    scored[index].append((event.id, event.logprob))
                if event.text and (chunks := shape.text_chunks(event.text, scored[index])):
                    for chunk in chunks:
                        yield sse(chunk)
                    scored[index] = []
                continue
            if event.reason in ("cancelled", "error"):
                # An error event rather than a silent end, so that a client (OpenAI's SDK raises on it) does not
                # take a cut-off reply for a whole one. A client that left reads nothing more: only the server's
                # shutdown cancels a sequence whose stream is still read.
                error = (
                    shutdown_error() if event.reason == "cancelled" else failure_error(event, shape.constraint_param)
                )
                yield sse(error_body(error.status, error.message, param=error.param, code=error.code))
                yield DONE
                return
            for chunk in shape.finish_chunks(OPENAI_FINISH.get(event.reason, "stop"), scored[index]):
                yield sse(chunk)
            stats.append(event.stats)
        if include_usage:
            yield sse(shapes[0].usage_chunk(stats))
        yield DONE
