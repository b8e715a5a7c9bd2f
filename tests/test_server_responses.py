"""OpenAI's Responses API (POST /v1/responses) with the real `openai` client (`responses.create`, `responses.stream`)
against a server on a free loopback port over the tiny random Llama (its context widened, as in
test_server_tools): the same tokens as the chat route for the same messages, text.format, function tools and
their round trip, and each field this stateless server refuses, named."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.test_server_tools import SCHEMAS, TOOLS, widened_server

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pydantic = pytest.importorskip("pydantic")
pytest.importorskip("fastapi")

# The chat route's TOOLS as the Responses API writes a tool: name, description and parameters at its top level.
FLAT_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]
ITEMS = [
    {"role": "developer", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "input_text", "text": t} for t in ("One word.", "A color?")]},
]
# A message's parts are joined a line each (as vLLM joins them).
CHAT_ITEMS = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "One word.\nA color?"}]


@pytest.fixture(scope="module")
def live(tiny_models, tmp_path_factory) -> Iterator[Any]:
    with widened_server(tiny_models, tmp_path_factory.mktemp("responses") / "tiny-llama") as server:
        yield server


class Digit(pydantic.BaseModel):
    n: int = pydantic.Field(ge=0, le=9)


def create(live: Any, **fields: Any) -> Any:
    request = {"model": "tiny-llama", "input": "Hello there", "temperature": 0, "max_output_tokens": 12, **fields}
    return live.client().responses.create(**request)


def without_ids(response: Any) -> list[dict[str, Any]]:
    """The output items, less what is new in each response (ids)."""
    drop = {"id", "call_id"}
    return [{key: value for key, value in item.model_dump().items() if key not in drop} for item in response.output]


def test_a_text_response_has_the_sdks_shape_and_output_text(live):
    response = create(live)
    assert response.object == "response" and response.id.startswith("resp_") and response.model == "tiny-llama"
    assert response.status in ("completed", "incomplete") and response.temperature == 0
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and response.output_text == message.content[0].text != ""
    usage = response.usage
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens and usage.output_tokens >= 1
    assert usage.input_tokens_details.cached_tokens >= 0 and usage.output_tokens_details.reasoning_tokens == 0
    assert response.tools == [] and response.tool_choice == "auto" and response.text.format.type == "text"


def test_input_items_and_instructions_give_the_chat_routes_tokens(live):
    """The same conversation through both routes: the same prompt ids, so at temperature 0 the same reply."""
    chat = live.client().chat.completions.create(model="tiny-llama", messages=CHAT_ITEMS, temperature=0, max_tokens=12)
    expected = chat.choices[0].message.content
    for fields in (
        {"input": ITEMS},
        {"input": ITEMS[1:], "instructions": "Answer briefly."},
        {"input": [{"type": "message", **item} for item in ITEMS]},
    ):
        response = create(live, **fields)
        assert response.output_text == expected, fields
        assert response.usage.input_tokens == chat.usage.prompt_tokens, fields
    plain = live.client().chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Hello there"}], temperature=0, max_tokens=12
    )
    assert create(live).output_text == plain.choices[0].message.content  # a string is one user message


def test_a_last_assistant_item_is_history_and_the_reply_a_new_message(live):
    """The chat route continues a last assistant message (assistant prefill); this API has no prefill: its output
    is a new message, so such an item is history, as the chat route's continue_final_message false reads it."""
    items = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Red"}]
    chat = live.client().chat.completions.create(
        model="tiny-llama",
        messages=items,
        temperature=0,
        max_tokens=12,
        extra_body={"continue_final_message": False},
    )
    response = create(live, input=items)
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens


def test_input_tokens_counts_the_prompt_a_response_reads(live):
    """POST /v1/responses/input_tokens was the 404 of a stored response ("no response 'input_tokens'")."""
    client = live.client()
    for fields in ({"input": "Hello there"}, {"input": ITEMS[1:], "instructions": "Answer briefly."}):
        counted = client.responses.input_tokens.count(model="tiny-llama", **fields)
        assert counted.object == "response.input_tokens"
        assert counted.input_tokens == create(live, **fields).usage.input_tokens, fields
    with pytest.raises(openai.BadRequestError):
        client.responses.input_tokens.count(model="tiny-llama", input="hi", previous_response_id="resp_1")


def test_a_streamed_response_is_the_same_response(live):
    whole = create(live)
    events = list(create(live, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ], kinds
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete" if whole.status == "incomplete" else "response.completed",
    ], kinds
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    assert "".join(event.delta for event in deltas) == whole.output_text and len(deltas) > 1
    assert {(event.item_id, event.output_index, event.content_index) for event in deltas} == {(events[2].item.id, 0, 0)}
    assert events[-1].response.output_text == whole.output_text
    assert without_ids(events[-1].response) == without_ids(whole)
    # The SDK's helper checks the events' order, and needs response.completed: a JSON reply, which its grammar ends.
    with live.client().responses.stream(model="tiny-llama", input="Hi", temperature=0, text_format=Digit) as stream:
        texts = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    again = live.client().responses.parse(model="tiny-llama", input="Hi", temperature=0, text_format=Digit)
    assert final.status == again.status == "completed" and "".join(texts) == final.output_text == again.output_text
    assert isinstance(final.output_parsed, Digit) and final.output_parsed == again.output_parsed
    assert without_ids(final) == without_ids(again)


def test_raw_events_are_named_and_no_done_marker_follows(live):
    body = {"input": "Hi", "max_output_tokens": 3, "stream": True, "temperature": 0}  # random: an end within 3, once
    with httpx.stream("POST", live.v1 + "/responses", json=body, timeout=30) as response:
        raw = response.read().decode()
    blocks = [block for block in raw.split("\n\n") if block]
    for block in blocks:
        name, data = block.split("\n")
        assert name.startswith("event: ") and name[7:] == json.loads(data.removeprefix("data: "))["type"], block
    assert "[DONE]" not in raw and blocks[-1].startswith("event: response.incomplete")


def test_max_output_tokens_cut_is_incomplete(live):
    response = create(live, max_output_tokens=2)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 2 and response.output[0].status == "incomplete"
    events = list(create(live, max_output_tokens=2, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.incomplete_details.reason == (
        "max_output_tokens"
    )


def test_json_schema_text_format_gives_json_that_fits(live):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    text = {"format": {"type": "json_schema", "name": "digit", "schema": schema, "strict": True}}
    for seed in range(2):
        response = create(live, text=text, max_output_tokens=40, temperature=1.0, extra_body={"seed": seed})
        assert response.status == "completed", response
        jsonschema.validate(json.loads(response.output_text), schema)
        assert response.text.format.type == "json_schema" and response.text.format.name == "digit"
    anything = create(live, text={"format": {"type": "json_object"}}, max_output_tokens=60)
    assert anything.status == "incomplete" or isinstance(json.loads(anything.output_text), dict)


def test_a_required_tool_gives_a_function_call_and_its_output_goes_back(live):
    response = create(live, tools=FLAT_TOOLS, tool_choice="required", max_output_tokens=120)
    [call] = response.output
    assert call.type == "function_call" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert response.status == "completed" and response.output_text == ""
    named = create(live, tools=FLAT_TOOLS, tool_choice={"type": "function", "name": "get_time"}, max_output_tokens=120)
    assert [item.name for item in named.output] == ["get_time"]
    only = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_weather"}]}
    assert [item.name for item in create(live, tools=FLAT_TOOLS, tool_choice=only, max_output_tokens=120).output] == [
        "get_weather"
    ]
    streamed = list(create(live, tools=FLAT_TOOLS, tool_choice="required", max_output_tokens=120, stream=True))
    kinds = [event.type for event in streamed]
    assert kinds[2:-1] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ], kinds
    assert without_ids(streamed[-1].response) == without_ids(response)
    # The round trip: the call and its output sent back as items; the reply is text again.
    history = [
        {"role": "user", "content": "Hello there"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 degrees"},
    ]
    answer = create(live, input=history, tools=FLAT_TOOLS, tool_choice="none", max_output_tokens=8)
    assert answer.output[0].type == "message" and answer.output_text
    chat_history = [
        {"role": "user", "content": "Hello there"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": call.call_id, "name": call.name, "content": "Sunny, 21 degrees"},
    ]
    chat = live.client().chat.completions.create(
        model="tiny-llama", messages=chat_history, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=8
    )
    assert answer.output_text == chat.choices[0].message.content
    sdk_items = [*history[:1], *[item.model_dump(exclude_none=True) for item in response.output], history[2]]
    assert create(live, input=sdk_items, tools=FLAT_TOOLS, max_output_tokens=8).status  # the SDK's own items


BAD = [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "keeps no responses"),
    ({"conversation": "conv_1"}, "conversation", "keeps no responses"),
    ({"max_tokens": 5}, "max_tokens", "use max_output_tokens"),
    ({"response_format": {"type": "json_object"}}, "response_format", "use text.format"),
    ({"input": None}, "input", "must be a string or a non-empty list"),
    ({"input": []}, "input", "must be a string or a non-empty list"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input.0.type", "'reasoning' items are not supported"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        "input.0.content.0.type",
        "only text content",
    ),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input.0.role", "must be one of"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.call_id", "non-empty string"),
    (  # stateless: an output whose call is not in the input answers nothing (OpenAI: 400 too)
        {"input": [{"type": "function_call_output", "call_id": "call_1", "output": "21 C"}]},
        "input.0.call_id",
        "no function_call item before it has call_id 'call_1'",
    ),
    ({"tools": [{"type": "web_search_preview"}]}, "tools.0.type", "only function tools"),
    (
        {"tools": [{"type": "function", "name": "f", "parameters": {"type": "string"}}]},
        "tools.0.parameters",
        "must describe an object",
    ),
    ({"tools": FLAT_TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name", "no tool named"),
    ({"tools": FLAT_TOOLS, "tool_choice": {"type": "file_search"}}, "tool_choice", "only function tools"),
    ({"text": {"format": {"type": "json_schema", "name": "a"}}}, "text.format.schema", "required"),
    ({"text": {"format": {"type": "json_schema", "schema": {"type": 3}}}}, "text.format.schema", ""),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type", "json_schema"),
    ({"text": {"format": {"type": "json_object", "schema": {}}}}, "text.format.schema", "not a field"),
    ({"tools": [{"type": "function", "description": "no name"}]}, "tools.0.name", "must be a name"),
    (
        {"tools": FLAT_TOOLS, "tool_choice": {"type": "allowed_tools", "mode": "any", "tools": []}},
        "tool_choice.mode",
        "must be auto or required",
    ),
    ({"background": True}, "background", "keeps no responses"),
    ({"top_logprobs": 2}, "top_logprobs", "not supported"),
    ({"max_output_tokens": 0}, "max_output_tokens", ""),
]


def test_each_field_this_server_cannot_use_is_a_400_naming_it(live):
    for fields, param, says in BAD:
        response = httpx.post(live.v1 + "/responses", json={"input": "hi", **fields}, timeout=30)
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == param and says in error["message"], (fields, error)
        assert error["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as raised:
        create(live, previous_response_id="resp_abc")
    assert raised.value.body["param"] == "previous_response_id"


def test_a_tool_choice_error_shows_this_apis_shapes_not_chat_completions(live):
    """They showed Chat Completions' nesting ({"function": {"name"}}, {"allowed_tools": {...}}), which this route
    then refused when a client sent it as shown."""
    chat_nesting = ('"function": {', '"allowed_tools": {')
    for choice, param in (
        ({"type": "function"}, "tool_choice"),
        ({"type": "allowed_tools", "mode": "auto", "tools": []}, "tool_choice.tools"),
        ({"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function"}]}, "tool_choice.tools.0"),
    ):
        body = {"input": "hi", "tools": FLAT_TOOLS, "tool_choice": choice}
        error = httpx.post(live.v1 + "/responses", json=body, timeout=30).json()["error"]
        assert error["param"] == param and not any(nested in error["message"] for nested in chat_nesting), error
        assert '{"type": "function", "name"' in error["message"], error
    shown = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_time"}]}
    body = {"input": "hi", "tools": FLAT_TOOLS, "tool_choice": shown, "max_output_tokens": 120}
    assert httpx.post(live.v1 + "/responses", json=body, timeout=60).status_code == 200


def test_min_tokens_over_the_reply_length_names_max_output_tokens(live):
    # This API's length field is max_output_tokens: naming max_tokens (a 400 here) would not name the fix.
    for fields, limit in (({"max_output_tokens": 4}, 4), ({}, 512)):  # as asked, or the server's default
        response = httpx.post(live.v1 + "/responses", json={"input": "hi", "min_tokens": 600, **fields}, timeout=30)
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "min_tokens", error
        assert error["message"] == f"min_tokens: must be at most max_output_tokens ({limit}), got 600"


def test_structured_output_fields_beside_tools_point_to_text_format(live):
    # response_format, which the chat route's hint names, is a 400 on this route: the fix is text.format.
    body = {"input": "hi", "tools": FLAT_TOOLS, "guided_choice": ["a", "b"], "max_output_tokens": 4}
    error = httpx.post(live.v1 + "/responses", json=body, timeout=30).json()["error"]
    assert error["param"] == "guided_choice" and "does not go with tools" in error["message"], error
    assert error["message"].endswith("as a JSON text.format"), error


def test_unknown_model_and_stored_responses_are_404s(live):
    with pytest.raises(openai.NotFoundError):
        create(live, model="gpt-5")
    with pytest.raises(openai.NotFoundError) as raised:
        live.client().responses.retrieve("resp_123")
    assert "keeps no responses" in raised.value.message
    metrics = httpx.get(live.url + "/metrics").text
    assert 'route="/v1/responses",status="200"' in metrics and 'route="/v1/responses",status="400"' in metrics


def test_store_metadata_and_user_are_accepted_and_echoed(live):
    response = create(live, store=True, metadata={"k": "v"}, user="u1", include=["reasoning.encrypted_content"])
    assert response.metadata == {"k": "v"} and response.user == "u1" and response.output_text


def test_a_reply_that_fails_mid_stream_ends_with_an_error_event_and_response_failed():
    """A grammar that fails (or the server's shutdown) after text was streamed: not a silent short reply."""
    import asyncio

    from gptcli.decoding import Finished, Stats, Token
    from gptcli.server.openai_routes import failure_error
    from gptcli.server.responses_shapes import ResponseWriter

    stats = Stats(3, 0, 1, 1, 0.0, 0.0, 0.0, 0.0)

    async def source():
        yield 0, Token("Hi", 7, 0.0)
        yield 0, Finished("error", stats, "Hi", (7,), error="the grammar allows no token here")

    async def written() -> list[str]:
        writer = ResponseWriter("m", {"tools": []})
        return [chunk async for chunk in writer.events(source(), lambda done: failure_error(done, "text.format"))]

    events = [json.loads(chunk.split("data: ", 1)[1]) for chunk in asyncio.run(written())]
    assert [event["type"] for event in events][-3:] == ["response.output_text.delta", "error", "response.failed"]
    assert events[-2]["param"] == "text.format" and "allows no token" in events[-2]["message"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["message"] == events[-2]["message"]
    assert failed["output"][0]["content"][0]["text"] == "Hi" and failed["output"][0]["status"] == "incomplete"


def test_a_client_that_leaves_cancels_its_response(tiny_models):
    """Streamed or not, a client gone stops the generating (its slot freed), as on the chat route."""
    from gptcli.config import Settings
    from gptcli.runtime import open_runtime
    from tests.test_server import serve_runtime, wait_until

    runtime = open_runtime(Settings(model=str(tiny_models["llama"])), lambda message: None)
    with serve_runtime(runtime, delay=0.05, max_running=1) as slow:
        body = {"input": "hi", "max_output_tokens": 100, "temperature": 0}
        with httpx.stream("POST", slow.v1 + "/responses", json={**body, "stream": True}, timeout=30) as response:
            assert next(line for line in response.iter_lines() if "output_text.delta" in line)
            assert slow.engine.snapshot().running == 1
        assert wait_until(lambda: slow.engine.snapshot().running == 0, 10)
        before = slow.engine.snapshot().tokens_generated
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(slow.v1 + "/responses", json=body, timeout=0.5)
        assert wait_until(lambda: slow.engine.snapshot().running == 0, 10)
        assert slow.engine.snapshot().tokens_generated - before < 60


def test_a_request_the_kv_budget_cannot_hold_names_this_apis_fields(tiny_models):
    """As the chat route's 400s name max_tokens and messages: here max_output_tokens and input."""
    from gptcli.config import Settings
    from gptcli.runtime import open_runtime
    from tests.test_server import serve_runtime

    runtime = open_runtime(Settings(model=str(tiny_models["llama"])), lambda message: None)
    with serve_runtime(runtime, kv_budget_tokens=40) as server:
        for body, param in (
            ({"input": "hi", "max_output_tokens": 200}, "max_output_tokens"),
            ({"input": "autumn leaves " * 20, "max_output_tokens": 1}, "input"),
        ):
            refused = httpx.post(server.v1 + "/responses", json=body, timeout=30)
            error = refused.json()["error"]
            assert refused.status_code == 400 and error["param"] == param, refused.text
            assert error["message"].startswith(f"{param}: ") and "KV budget" in error["message"], error


# ---------------------------------------------------------------------------------------------- the default model


@pytest.mark.integration
@pytest.mark.slow
def test_the_default_model_answers_and_calls_a_tool_through_the_responses_api(default_model):
    from gptcli.config import Settings
    from gptcli.runtime import open_runtime
    from tests.test_server import serve_runtime

    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    weather = {
        "type": "function",
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": city,
    }
    runtime = open_runtime(Settings(model=str(default_model.path)), lambda message: None)
    with serve_runtime(runtime, max_running=2) as live:
        client = live.client()
        ask = {"model": "default", "temperature": 0, "max_output_tokens": 40}
        answer = client.responses.create(**ask, instructions="Answer in one word.", input="What colour is the sky?")
        assert "blue" in answer.output_text.lower(), answer.output_text
        with client.responses.stream(**ask, input="Weather in Paris?", tools=[weather], tool_choice="required") as s:
            called = s.get_final_response()
        [call] = called.output
        assert call.type == "function_call" and call.name == "get_weather"
        assert json.loads(call.arguments)["city"] == "Paris", call
        items = [
            {"role": "user", "content": "Weather in Paris?"},
            *[item.model_dump(exclude_none=True) for item in called.output],
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 degrees Celsius"},
        ]
        read = client.responses.create(**ask, input=items, tools=[weather])
        assert read.status == "completed" and "21" in read.output_text, read.output_text  # it read the result
