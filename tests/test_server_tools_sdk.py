"""Tool calls as SDK users and agent frameworks send them (the `openai` client's helpers, the schemas real tools
have), and the routes beside chat that read a chat's tools (/tokenize), against a server on a free loopback
port over the tiny random Llama (its context widened, as in test_server_tools)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import reads
from tests.test_server_tools import ASK, TOOLS, widened_server

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def live(tiny_models, tmp_path_factory) -> Iterator[Any]:
    with widened_server(tiny_models, tmp_path_factory.mktemp("tools-sdk") / "tiny-llama") as server:
        yield server


def test_tokenize_counts_a_chats_tools_as_the_chat_route_writes_them(live):
    """vLLM's /tokenize takes a chat's tools: the count a client checks against the context must be the
    prompt's (the tools' system message was left out: 34 tokens counted for a 140-token prompt)."""
    plain = httpx.post(live.url + "/tokenize", json={"messages": ASK}).json()["count"]
    answer = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
    for fields in (
        {"tools": TOOLS},
        {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": True},
        {"tools": TOOLS, "response_format": answer},  # the answer's format, in the instructions
    ):
        chat = httpx.post(live.v1 + "/chat/completions", json={"messages": ASK, "max_tokens": 1, **fields})
        counted = httpx.post(live.url + "/tokenize", json={"messages": ASK, **fields}).json()["count"]
        assert counted == chat.json()["usage"]["prompt_tokens"] > plain, (fields, counted, plain)
    none = httpx.post(live.url + "/tokenize", json={"messages": ASK, "tools": TOOLS, "tool_choice": "none"})
    assert none.json()["count"] == plain  # no tools in use: the prompt the chat route writes without them


def test_tokenize_refuses_tools_it_cannot_count(live):
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]
    cases = [
        ({"messages": ASK, "tools": bad}, "tools.0.function.parameters"),
        ({"prompt": "hi", "tools": TOOLS}, "tools"),  # a text has no tools in it
    ]
    for body, param in cases:
        response = httpx.post(live.url + "/tokenize", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def allowed(mode: str, *names: str) -> dict[str, Any]:
    """OpenAI's tool_choice that limits the calls to some of the tools."""
    tools = [{"type": "function", "function": {"name": name}} for name in names]
    return {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": tools}}


def test_allowed_tools_limits_the_calls_to_the_tools_it_names(live):
    """The openai SDK's `tool_choice={"type": "allowed_tools", ...}` (was a 400: tool_choice must be ...)."""
    from tests.test_server_tools import ask, checked_calls

    for seed in range(3):
        reply = ask(live, tools=TOOLS, tool_choice=allowed("required", "get_time"), temperature=1.0, seed=seed)
        assert [name for name, _ in checked_calls(reply.choices[0])] == ["get_time"], reply


def test_allowed_tools_takes_its_mode_and_names_what_does_not_fit(live):
    from gptcli.tools import tool_spec

    auto = tool_spec(TOOLS, allowed("auto", "get_weather", "get_weather"), None)
    required = tool_spec(TOOLS, allowed("required", "get_time", "get_weather"), None)
    assert [tool.name for tool in auto.tools] == ["get_weather"] and not auto.required
    assert [tool.name for tool in required.tools] == ["get_time", "get_weather"] and required.required
    flat = [{"type": "function", "name": "get_time"}]  # the Responses API's form of a tool's name
    responses_form = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": flat}}
    assert [tool.name for tool in tool_spec(TOOLS, responses_form, None).tools] == ["get_time"]
    where = "tool_choice.allowed_tools"
    cases = [
        (allowed("any", "get_time"), f"{where}.mode", "must be auto or required"),
        (allowed("auto"), f"{where}.tools", "must list the tools allowed"),
        (allowed("auto", "get_news"), f"{where}.tools.0.function.name", "no tool named 'get_news'"),
        ({"type": "allowed_tools"}, f"{where}.mode", "must be auto or required"),
    ]
    for choice, param, says in cases:
        response = httpx.post(
            live.v1 + "/chat/completions", json={"messages": ASK, "tools": TOOLS, "tool_choice": choice}
        )
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == param and says in error["message"], (choice, error)


BASE = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 8}}, "required": ["a"]}
EXTENSION = {"properties": {"b": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["b"]}
COMPOSED = [  # one object of a base and an extension, as OpenAPI's inheritance and zod's intersections write it
    {"allOf": [{"$ref": "#/$defs/Base"}, EXTENSION], "$defs": {"Base": BASE}},
    {"type": "object", "allOf": [BASE, EXTENSION]},
    {**BASE, "allOf": [EXTENSION]},
]


def test_allof_parts_make_one_object_holding_the_properties_they_name_together(live):
    """Each part was closed to its own properties, so a base and its extension refused each other: a 400
    "required property 'a' is unsatisfiable" for a schema llguidance (and llama.cpp) read as it is."""
    from gptcli.tools import tool_spec
    from tests.test_server_tools import ask

    jsonschema = pytest.importorskip("jsonschema")
    for schema in COMPOSED:
        tools = [{"type": "function", "function": {"name": "put", "parameters": schema}}]
        spec = tool_spec(tools, "required", None)
        call = '{"tool_calls": [{"name": "put", "arguments": %s}]}'
        assert reads(spec.constraint, call % '{"a": "x", "b": 1}'), schema
        assert not reads(spec.constraint, call % '{"a": "x", "b": 1, "c": 2}'), schema  # still closed, as a whole
        assert not reads(spec.constraint, call % '{"a": "x"}'), schema  # each part's own rules hold
        reply = ask(live, tools=tools, tool_choice="required").choices[0]
        assert reply.finish_reason == "tool_calls", reply
        jsonschema.validate(json.loads(reply.message.tool_calls[0].function.arguments), schema)


def test_choices_beside_an_objects_properties_are_rules_on_that_object():
    """{"properties": {"kind"}, "anyOf": [{"properties": {"kind": {"const": "x"}, "a"}}, ...]}: each choice was
    closed to its own properties, which the object's closing refused in turn (a 400, 'required property ... is
    unsatisfiable', or a choice that could never be taken); a choice without properties beside them is closed."""
    from gptcli.tools import tool_spec

    kinds = [
        {"properties": {"kind": {"const": "x"}, "a": {"type": "string"}}, "required": ["kind", "a"]},
        {"properties": {"kind": {"const": "y"}, "b": {"type": "integer"}}, "required": ["kind", "b"]},
    ]
    beside = {"type": "object", "properties": {"kind": {"enum": ["x", "y"]}}, "required": ["kind"], "anyOf": kinds}
    whole = {"anyOf": kinds}  # no properties of its own: each choice is a whole object, closed as before
    call = '{"tool_calls": [{"name": "f", "arguments": %s}]}'
    wrong = ['{"kind": "x", "b": 1}', '{"kind": "x", "a": "s", "z": 1}']  # x's rule broken; a property none names
    for schema, also_wrong in ((beside, []), (whole, ['{"kind": "y", "a": "s", "b": 1}'])):  # beside: a is named
        spec = tool_spec([{"type": "function", "function": {"name": "f", "parameters": schema}}], "required", None)
        for right in ('{"kind": "x", "a": "s"}', '{"kind": "y", "b": 1}'):
            assert reads(spec.constraint, call % right), (schema, right)
        for arguments in wrong + also_wrong:
            assert not reads(spec.constraint, call % arguments), (schema, arguments)


def test_the_sdks_stream_helper_assembles_a_call_as_the_whole_reply_has_it(live):
    """client.chat.completions.stream: its events fire and its final message is the non-streamed one (content
    was "" there, from the role's chunk, and a content.delta event of "" fired before the call)."""
    fields = {"model": "tiny-llama", "messages": ASK, "tools": TOOLS, "tool_choice": "required", "temperature": 0}
    client = openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0)
    whole = client.chat.completions.create(**fields, max_tokens=120).choices[0].message
    with client.chat.completions.stream(**fields, max_tokens=120) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion().choices[0]
    assert "content.delta" not in kinds and "tool_calls.function.arguments.done" in kinds, kinds
    assert final.finish_reason == "tool_calls" and final.message.content is None is whole.content
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in whole.tool_calls
    ]


def test_a_streamed_empty_text_reply_is_content_not_null():
    """With the role's content null, an empty text reply ({"response": ""}) sends its "" before it ends."""
    from gptcli.server.tool_replies import ToolShape

    shape = ToolShape("chat", "tiny-llama")
    deltas = [shape.chunk(role=True), *shape.text_chunks('{"response": ""}', []), *shape.finish_chunks("stop", [])]
    assert [chunk["choices"][0]["delta"].get("content") for chunk in deltas] == [None, "", None]


def test_response_format_beside_tools_is_the_answers_format(live):
    """OpenAI's Agents SDK sends tools and the final answer's response_format together (was a 400: 'a reply that
    may call tools is JSON of its own'): a reply that calls no tool answers in the format, as `parsed`."""
    from typing import Literal

    from openai.lib._parsing._completions import type_to_response_format_param
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        city: Literal["Paris", "Rome"]
        days: int = Field(ge=1, le=7)

    client = openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0)
    strict = [{**tool, "function": {**tool["function"], "strict": True}} for tool in TOOLS]  # as parse() wants them
    kinds = set()
    for seed in range(8):
        fields = {"model": "tiny-llama", "messages": ASK, "tools": strict, "temperature": 1.0, "seed": seed}
        choice = client.chat.completions.parse(**fields, response_format=Answer, max_tokens=120).choices[0]
        kinds.add(choice.finish_reason)
        if choice.finish_reason != "stop":
            assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
            continue
        assert isinstance(choice.message.parsed, Answer) and not choice.message.tool_calls, choice
        sent = type_to_response_format_param(Answer)  # what parse() sent, streamed
        chunks = client.chat.completions.create(**fields, response_format=sent, max_tokens=120, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == choice.message.content, seed
    assert kinds == {"stop", "tool_calls"}, kinds  # both kinds of reply, over these seeds


def test_an_answer_in_response_format_comes_back_as_it_was_written():
    """The answer's JSON as the model wrote it (a string answer stays JSON, not its text); cut short, what it
    wrote of it; as response_format alone returns it."""
    from gptcli.tool_reply import ReplyReader

    for raw, content in (
        ('{"response": "yes"}', '"yes"'),  # a schema {"enum": ["yes", "no"]}: JSON, as parse() reads it
        ('{"response": {"n": 1e5, "s": "caf\\u00e9"}}', '{"n": 1e5, "s": "caf\\u00e9"}'),
        ('{"response": {"n": 1', '{"n": 1'),  # cut short by max_tokens
        ('{"tool_calls": [{"na', '{"tool_calls": [{"na'),
    ):
        reader = ReplyReader(text=False)
        assert "".join(reader.push(piece) for piece in raw) == ""  # nothing streams as text
        assert reader.finish().content == content, raw
    text = ReplyReader()
    text.push('{"response": "yes"}')
    assert text.finish().content == "yes"  # a text reply's text


def test_a_pydantic_tool_with_formats_llguidance_does_not_know_is_called(live):
    """openai.pydantic_function_tool of a model with a Path, bytes and a SecretStr (formats "path", "binary",
    "password": a 400, 'Unknown format: path'); the formats are annotations, each value a string."""
    from pathlib import Path

    from pydantic import BaseModel, SecretStr

    from tests.test_server_tools import ask

    class Save(BaseModel):
        path: Path
        data: bytes
        key: SecretStr

    tool = openai.pydantic_function_tool(Save)
    schema = tool["function"]["parameters"]
    assert [schema["properties"][name]["format"] for name in ("path", "data", "key")] == ["path", "binary", "password"]
    for value in schema["properties"].values():
        value["maxLength"] = 8  # so that the random model's strings end
    reply = ask(live, tools=[tool], tool_choice="required").choices[0]
    assert reply.finish_reason == "tool_calls", reply
    arguments = json.loads(reply.message.tool_calls[0].function.arguments)
    Save.model_validate(arguments)
    answer = ask(live, response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    Save.model_validate_json(answer.choices[0].message.content)  # a response_format of it too


def test_a_property_named_like_a_keyword_keeps_its_reference():
    """pydantic's field `type: Kind` (an Enum) is {"$ref": "#/$defs/Kind"} under properties.type: that schema was
    taken for the keyword's data, its reference not pointed under the reply's $defs (a 400, "Pointer '/$defs/Kind'
    does not exist"), in a tool's parameters and in a response_format beside tools alike."""
    from enum import Enum

    from pydantic import BaseModel

    from gptcli.tools import tool_spec

    class Kind(str, Enum):
        a = "a"
        b = "b"

    class Item(BaseModel):
        type: Kind
        format: Kind

    tool = openai.pydantic_function_tool(Item)
    assert tool["function"]["parameters"]["properties"]["type"] == {"$ref": "#/$defs/Kind"}
    call = '{"tool_calls": [{"name": "Item", "arguments": %s}]}'
    spec = tool_spec([tool], "required", None)
    assert reads(spec.constraint, call % '{"type": "a", "format": "b"}')
    assert not reads(spec.constraint, call % '{"type": "c", "format": "b"}')
    answered = tool_spec(TOOLS, "auto", None, answer=tool["function"]["parameters"])
    assert reads(answered.constraint, '{"response": {"type": "b", "format": "a"}}')
    assert not reads(answered.constraint, '{"response": {"type": "b", "format": "z"}}')
