"""OpenAI's Responses API: POST /v1/responses over the chat route's machinery (the same prompt, tools, constraints,
engine submission and waiting), written as a response object or its events. Stateless: nothing is stored, so
there is no response to GET, and previous_response_id is a 400 (responses_request)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from gptcli.decoding import Finished
from gptcli.prompts import Prompt
from gptcli.server.errors import APIError, route_not_served
from gptcli.server.openai_routes import failure_error, shutdown_error, state_of, submit, whole
from gptcli.server.prefill_fields import PrefillFields
from gptcli.server.prompt_ids import chat_request_prompt
from gptcli.server.responses_request import STATELESS, ResponsesRequest
from gptcli.server.responses_shapes import ResponseWriter
from gptcli.server.schemas import parse_body
from gptcli.server.sse import EventStreamResponse
from gptcli.tools import ToolSpec

# This API has no assistant prefill: its output is a new message, so a last assistant item is history.
NEW_TURN = PrefillFields(continue_final_message=False)

router = APIRouter(prefix="/v1")


@router.post("/responses")
async def create_response(request: Request) -> Response:
    state = state_of(request)
    body = await parse_body(request, ResponsesRequest)
    tools, prompt = await _prompt(state, body)
    constraint_param = "tools" if tools is not None else body.output_param()
    submitted = await submit(
        state,
        body,
        [prompt.ids],
        chat=True,
        constraint_param=constraint_param,
        prompt_param="input",
        tokens_param="max_output_tokens",
    )
    text_replies = tools is None or tools.answer is None
    writer = ResponseWriter(
        state.model_name, body.echoed(submitted.params), tools=tools is not None, text_replies=text_replies
    )
    if body.stream:

        def failure(finished: Finished) -> APIError:
            return shutdown_error() if finished.reason == "cancelled" else failure_error(finished, constraint_param)

        return EventStreamResponse(writer.events(submitted.events, failure), on_close=submitted.cancel)
    finished = await whole(request, submitted)
    if finished is None:
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
    return JSONResponse(writer.whole(finished[0]))


@router.post("/responses/input_tokens")
async def count_input_tokens(request: Request) -> Response:
    """OpenAI's token count of a request (`client.responses.input_tokens.count`): its prompt, as created."""
    state = state_of(request)
    body = await parse_body(request, ResponsesRequest)
    _, prompt = await _prompt(state, body)
    return JSONResponse({"object": "response.input_tokens", "input_tokens": len(prompt.ids)})


async def _prompt(state: Any, body: ResponsesRequest) -> tuple[ToolSpec | None, Prompt]:
    """A request's tools and prompt, checked: what the response is made from."""
    body.check()
    state.check_model(body.model)
    messages = body.messages()
    # Off the event loop: a long prompt takes a while to tokenize, and tools' schemas to compile.
    tools = await asyncio.to_thread(body.tool_spec, state.tokenizer)
    try:
        prompt = await asyncio.to_thread(chat_request_prompt, state.tokenizer, messages, tools, NEW_TURN)
    except APIError as exc:  # the chat template refused the conversation: it is this API's input
        raise APIError(exc.status, exc.message, param="input", code=exc.code) from None
    return tools, prompt


@router.api_route("/responses/{response_id:path}", methods=["GET", "POST", "DELETE"])
async def stored_response(response_id: str, request: Request) -> Response:
    """Reading, cancelling or deleting a response: none is kept here. A route of its own asked with another
    method (GET /v1/responses/input_tokens) is that route's 405, not a response of that name."""
    wrong_method = route_not_served(request.url.path, request.method, router.routes, "")
    if wrong_method.status == 405:
        raise wrong_method
    message = f"no response '{response_id}': {STATELESS} (store is accepted and changes nothing)"
    raise APIError(404, message, param="response_id", code="not_found")
