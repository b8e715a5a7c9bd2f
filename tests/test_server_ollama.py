"""ollama's own API (/api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version) with the real `ollama`
client against a server on a free loopback port over the tiny random Llama (its context widened, as in
test_server_tools): the same text as the OpenAI routes for the same request, streams, format, tools, the
model's descriptions, and errors in ollama's shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.test_server import serve_runtime, wait_until
from tests.test_server_tools import ASK, SCHEMAS, TOOLS, widened_server

ollama = pytest.importorskip("ollama")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pydantic = pytest.importorskip("pydantic")
pytest.importorskip("fastapi")

GREEDY = {"temperature": 0, "num_predict": 12}
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def live(tiny_models, tmp_path_factory) -> Iterator[Any]:
    with widened_server(tiny_models, tmp_path_factory.mktemp("ollama") / "tiny-llama") as server:
        yield server


def client(live: Any, **headers: str) -> Any:
    return ollama.Client(host=live.url, headers=headers or None)


def openai_chat(live: Any, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    body = {"messages": messages, "temperature": 0, "max_tokens": 12, **fields}
    return httpx.post(live.v1 + "/chat/completions", json=body, timeout=60).json()


class Digit(pydantic.BaseModel):
    n: int = pydantic.Field(ge=0, le=9)


# ---------------------------------------------------------------------------------------------- chat


def test_chat_gives_the_chat_routes_text_and_ollamas_counts(live):
    expected = openai_chat(live, MESSAGES)
    reply = client(live).chat(model="tiny-llama", messages=MESSAGES, options=GREEDY, stream=False)
    assert reply.model == "tiny-llama" and reply.done and reply.message.role == "assistant"
    assert reply.message.content == expected["choices"][0]["message"]["content"] != ""
    assert reply.done_reason == {"length": "length", "stop": "stop"}[expected["choices"][0]["finish_reason"]]
    assert reply.prompt_eval_count == expected["usage"]["prompt_tokens"]
    assert reply.eval_count == expected["usage"]["completion_tokens"]
    assert reply.total_duration >= reply.eval_duration > 0 and reply.load_duration == 0
    assert reply.created_at.endswith("Z")


def test_chat_streams_by_default_and_its_pieces_join_to_the_whole_reply(live):
    whole = client(live).chat(model="tiny-llama:latest", messages=MESSAGES, options=GREEDY, stream=False)
    with httpx.stream("POST", live.url + "/api/chat", json={"messages": MESSAGES, "options": GREEDY}) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    *pieces, last = lines
    assert pieces and all(not piece["done"] and piece["message"]["role"] == "assistant" for piece in pieces)
    assert "".join(piece["message"]["content"] for piece in pieces) == whole.message.content
    assert last["done"] and last["message"]["content"] == "" and last["eval_count"] == whole.eval_count
    assert last["done_reason"] == whole.done_reason and last["model"] == "tiny-llama:latest"
    streamed = list(client(live).chat(model="default", messages=MESSAGES, options=GREEDY, stream=True))
    assert "".join(part.message.content for part in streamed) == whole.message.content


def test_chat_options_are_the_sampling_settings(live):
    """seed, top_k, stop, repeat_penalty and num_predict as the chat route's fields of the same meaning."""
    options = {"temperature": 1.0, "seed": 7, "top_k": 5, "top_p": 0.9, "repeat_penalty": 1.2, "num_predict": 20}
    fields = {"temperature": 1.0, "seed": 7, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.2, "max_tokens": 20}
    expected = openai_chat(live, MESSAGES, **fields)["choices"][0]["message"]["content"]
    reply = client(live).chat(model="tiny-llama", messages=MESSAGES, options=options, stream=False)
    assert reply.message.content == expected
    until = client(live).chat(model="tiny-llama", messages=MESSAGES, options={"num_predict": -1, "seed": 1})
    assert until.done and until.eval_count >= 1  # -1: until the context (or end of sequence)
    ignored = {**GREEDY, "mirostat": 2, "num_ctx": 8192, "num_thread": 2, "someday": "an option ollama adds"}
    same = client(live).chat(model="tiny-llama", messages=MESSAGES, options=ignored, keep_alive="5m", think=False)
    assert (
        same.message.content == client(live).chat(model="tiny-llama", messages=MESSAGES, options=GREEDY).message.content
    )


def test_ollamas_off_values_for_top_k_and_repeat_penalty_are_taken(live):
    """top_k -1 and repeat_penalty 0 (off in ollama's runner) were 400s; a penalty of 0 would divide logits by 0."""
    sampled = {"temperature": 1.0, "seed": 5, "num_predict": 8, "min_p": 0}
    off = client(live).chat(model="tiny-llama", messages=MESSAGES, options={**sampled, "top_k": 0, "repeat_penalty": 1})
    for options in ({"top_k": -1}, {"repeat_penalty": 0}):
        reply = client(live).chat(model="tiny-llama", messages=MESSAGES, options={**sampled, **options})
        assert reply.message.content == off.message.content, options
    refused = httpx.post(live.url + "/api/chat", json={"messages": MESSAGES, "options": {"repeat_penalty": -1}})
    assert refused.status_code == 400, refused.text  # QA: it said "greater than 0", of a field that takes 0
    assert refused.json()["error"] == "options.repeat_penalty: Input should be greater than or equal to 0", refused.text


def test_a_message_may_leave_content_out(live):
    """As ollama reads it: empty. The /v1 routes' 400 for a message without content is not this API's."""
    body = {"messages": [{"role": "system"}, *MESSAGES], "options": GREEDY, "stream": False}
    reply = httpx.post(live.url + "/api/chat", json=body, timeout=60)
    assert reply.status_code == 200 and reply.json()["done"], reply.text


def test_format_json_and_a_pydantic_schema_give_json_that_fits(live):
    schema = Digit.model_json_schema()
    reply = client(live).chat(model="tiny-llama", messages=MESSAGES, format=schema, options={"num_predict": 30})
    assert Digit.model_validate_json(reply.message.content)
    generated = client(live).generate(model="tiny-llama", prompt="A digit", format=schema, options={"seed": 3})
    assert Digit.model_validate_json(generated.response)
    as_json = client(live).chat(model="tiny-llama", messages=MESSAGES, format="json", options={"num_predict": 400})
    if as_json.done_reason == "stop":  # a random model's JSON may run past the budget
        assert isinstance(json.loads(as_json.message.content), dict | list | str | int | float | bool | None)
    bad = {"type": "object", "properties": {"n": {"type": "nonsense"}}}
    with pytest.raises(ollama.ResponseError) as caught:
        client(live).chat(model="tiny-llama", messages=MESSAGES, format=bad)
    assert caught.value.status_code == 400 and caught.value.error.startswith("format: "), caught.value.error


def test_tool_calls_have_arguments_as_an_object_and_results_go_back_as_tool_messages(live):
    """ollama has no tool_choice: a seeded sampled reply that calls a tool, its arguments checked against its schema,
    streamed and whole the same; its result sent back as ollama's clients send it."""
    calls = []
    for seed in range(8):
        options = {"temperature": 1.0, "seed": seed, "num_predict": 120}
        reply = client(live).chat(model="tiny-llama", messages=ASK, tools=TOOLS, options=options)
        if reply.message.tool_calls:
            calls = reply.message.tool_calls
            streamed = list(
                client(live).chat(model="tiny-llama", messages=ASK, tools=TOOLS, options=options, stream=True)
            )
            assert [part.message.tool_calls for part in streamed if part.message.tool_calls] == [calls]
            break
    assert calls, "no seed of eight called a tool"
    for call in calls:  # (the client's Tool type drops a schema's bounds: minimum, maximum, additionalProperties)
        assert isinstance(call.function.arguments, dict)
        assert set(call.function.arguments) <= set(SCHEMAS[call.function.name]["properties"]), call
    raw = httpx.post(
        live.url + "/api/chat", json={"messages": ASK, "tools": TOOLS, "options": options, "stream": False}
    )
    for call in raw.json()["message"]["tool_calls"]:  # sent whole, the bounds hold
        jsonschema.validate(call["function"]["arguments"], SCHEMAS[call["function"]["name"]])
    results = [{"role": "tool", "tool_name": call.function.name, "content": "Sunny, 21 degrees"} for call in calls]
    asked = [*ASK, reply.message, *results]
    answered = client(live).chat(model="tiny-llama", messages=asked, tools=TOOLS, options=GREEDY)
    assert answered.done and answered.prompt_eval_count > reply.prompt_eval_count


# ---------------------------------------------------------------------------------------------- generate


def test_generate_writes_the_prompt_as_the_users_message_or_raw(live):
    expected = openai_chat(live, [{"role": "user", "content": "Name a color."}])["choices"][0]["message"]["content"]
    reply = client(live).generate(model="tiny-llama", prompt="Name a color.", options=GREEDY)
    assert reply.response == expected and reply.done and reply.eval_count >= 1
    with_system = client(live).generate(
        model="tiny-llama", prompt="Name a color.", system="Answer briefly.", options=GREEDY
    )
    assert with_system.response == openai_chat(live, MESSAGES)["choices"][0]["message"]["content"]
    completion = httpx.post(live.v1 + "/completions", json={"prompt": "Once upon", "temperature": 0, "max_tokens": 12})
    raw = client(live).generate(model="tiny-llama", prompt="Once upon", raw=True, options=GREEDY)
    assert raw.response == completion.json()["choices"][0]["text"]
    assert len(raw.context) == raw.prompt_eval_count + raw.eval_count  # the prompt's ids, then the reply's
    streamed = list(
        client(live).generate(model="tiny-llama", prompt="Once upon", raw=True, options=GREEDY, stream=True)
    )
    assert "".join(part.response for part in streamed) == raw.response and streamed[-1].done
    follow = client(live).generate(model="tiny-llama", prompt=" again", raw=True, context=raw.context, options=GREEDY)
    assert follow.prompt_eval_count > len(raw.context)  # the context it was given comes first


def test_an_empty_prompt_only_loads_the_model(live):
    loaded = client(live).generate(model="tiny-llama")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    unloaded = client(live).chat(model="tiny-llama", messages=[], keep_alive=0)
    assert unloaded.done and unloaded.done_reason == "unload"


# ---------------------------------------------------------------------------------------------- the model


def test_list_show_ps_and_version_describe_the_served_model(live):
    [listed] = client(live).list().models
    assert listed.model == "tiny-llama:latest" and listed.size > 0 and len(listed.digest) == 64
    assert listed.details.family == "llama" and listed.details.parameter_size.endswith("M")
    assert listed.details.quantization_level in ("F32", "BF16", "F16")
    shown = client(live).show("tiny-llama")
    assert shown.modelinfo["llama.context_length"] == 2048 and "temperature" in shown.parameters
    assert shown.template == live.state.tokenizer.chat_template and "tools" in shown.capabilities
    [running] = client(live).ps().models
    assert running.model == "tiny-llama:latest" and running.context_length == 2048
    assert httpx.get(live.url + "/api/version").json()["version"].count(".") == 2


# ---------------------------------------------------------------------------------------------- errors


def test_errors_are_ollamas_shape_with_the_status(live):
    cases = [
        (lambda: client(live).chat(model="llama3", messages=MESSAGES), 404, "model 'llama3' not found"),
        (lambda: client(live).show("llama3:latest"), 404, "model 'llama3:latest' not found"),
        (lambda: client(live).chat(model="tiny-llama", messages=MESSAGES, options={"temperature": "hot"}), 400, ""),
        (
            lambda: client(live).chat(model="tiny-llama", messages=MESSAGES, options={"num_predict": 0}),
            400,
            "options.num_predict: must be 1 or more tokens, or -1 or -2 (until the context is full)",
        ),
        (lambda: client(live).generate(model="tiny-llama", prompt="a", suffix="b"), 400, "suffix: "),
        (lambda: client(live).generate(model="tiny-llama", prompt="a", images=[b"\x89PNG"]), 400, "images: "),
        (lambda: client(live).pull("llama3"), 404, "/api/pull is not supported"),
    ]
    for call, status, said in cases:
        with pytest.raises(ollama.ResponseError) as caught:
            call()
        assert caught.value.status_code == status and isinstance(caught.value.error, str), caught.value
        assert caught.value.error.startswith(said) and "\n" not in caught.value.error, caught.value.error
    hot = httpx.post(live.url + "/api/chat", json={"messages": MESSAGES, "options": {"temperature": "hot"}})
    assert hot.json() == {"error": hot.json()["error"]} and hot.json()["error"].startswith("options.temperature: ")
    xml = httpx.post(live.url + "/api/chat", json={"messages": MESSAGES, "format": "xml"})  # the client refuses it
    assert xml.status_code == 400 and xml.json() == {"error": 'format: must be "json" or a JSON Schema (an object)'}
    wrong = httpx.get(live.url + "/api/chat")
    assert wrong.status_code == 405 and wrong.json() == {"error": "/api/chat takes POST, not GET"}
    for method in ("OPTIONS", "PUT", "PATCH"):  # OPTIONS was a bare 405 (PUT and PATCH named the OpenAI routes)
        wrong = httpx.request(method, live.url + "/api/chat")
        assert wrong.status_code == 405 and wrong.json() == {"error": f"/api/chat takes POST, not {method}"}
        missing = httpx.request(method, live.url + "/api/pull")
        assert missing.status_code == 404 and missing.json()["error"].startswith("/api/pull is not supported: ")
        assert "for the one model it serves" in missing.json()["error"], missing.text
    for path in ("/api/tags", "/api/version"):  # ollama answers HEAD there too (apps probe for a server with it)
        head = httpx.head(live.url + path)
        assert head.status_code == 200 and head.content == b"", (path, head.status_code)
    picture = [{"role": "user", "content": "What is it?", "images": ["iVBORw0KGgo="]}]
    refused = httpx.post(live.url + "/api/chat", json={"messages": picture})
    assert refused.status_code == 400 and refused.json()["error"].startswith("messages.0.images: ")


def test_the_api_key_guards_ollamas_routes_too(runtime):
    with serve_runtime(runtime, api_key="sesame") as guarded:
        for path in ("/api/tags", "/api/ps"):
            refused = httpx.get(guarded.url + path)
            assert refused.status_code == 401 and isinstance(refused.json()["error"], str), refused.text
        with pytest.raises(ollama.ResponseError) as caught:
            client(guarded).generate(model="tiny-llama", prompt="Once", options=GREEDY)
        assert caught.value.status_code == 401
        reply = client(guarded, Authorization="Bearer sesame").generate(
            model="tiny-llama", prompt="Once", options=GREEDY
        )
        assert reply.done and reply.eval_count >= 1
        metrics = httpx.get(guarded.url + "/metrics", headers={"Authorization": "Bearer sesame"}).text
        assert 'route="/api/generate",status="200"' in metrics and 'route="/api/tags",status="401"' in metrics


@pytest.fixture(scope="module")
def runtime(tiny_models):
    from gptcli.config import Settings
    from gptcli.runtime import open_runtime

    return open_runtime(Settings(model=str(tiny_models["llama"])), lambda message: None)


def test_a_client_that_leaves_mid_stream_cancels_its_sequence(runtime):
    with serve_runtime(runtime, delay=0.05, max_running=1) as slow:
        # A format no reply can end early: 50 numbers at least (end of sequence comes no sooner), cut at 100 tokens.
        many = {"type": "array", "items": {"type": "integer"}, "minItems": 50}
        body = {"prompt": "Once", "raw": True, "format": many, "options": {"num_predict": 100}}
        with httpx.stream("POST", slow.url + "/api/generate", json=body, timeout=30) as response:
            lines = (line for line in response.iter_lines() if line)
            assert json.loads(next(lines))["done"] is False
            if (running := slow.engine.snapshot()).running != 1:  # it ended without the client leaving: say how
                pytest.fail(f"the sequence ended on its own: {running}; the reply went on with {list(lines)}")
        assert wait_until(lambda: slow.engine.snapshot().running == 0, 10)
        assert slow.engine.snapshot().tokens_generated < 60


# ---------------------------------------------------------------------------------------------- the default model


@pytest.mark.integration
@pytest.mark.slow
def test_the_default_model_answers_through_ollamas_client(default_model):
    from gptcli.config import Settings
    from gptcli.runtime import open_runtime

    runtime = open_runtime(Settings(model=str(default_model.path)), lambda message: None)
    with serve_runtime(runtime, max_running=2) as served:
        ask = [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What colour is the sky?"},
        ]
        reply = client(served).chat(model="default", messages=ask, options={"temperature": 0, "num_predict": 20})
        assert "blue" in reply.message.content.lower(), reply.message.content
        [listed] = client(served).list().models
        assert listed.details.family == "llama" and listed.details.parameter_size.endswith("M")
        city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        weather = {
            "type": "function",
            "function": {"name": "get_weather", "description": "The weather.", "parameters": city},
        }
        where = [{"role": "user", "content": "Weather in Paris?"}]
        called = client(served).chat(model="default", messages=where, tools=[weather], options={"temperature": 0})
        [call] = called.message.tool_calls
        assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}, called.message
