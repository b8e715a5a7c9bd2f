"""Tool calls on the OpenAI-compatible server (gptcli.tools, server/tool_replies.py), with the real `openai`
client against a server on a free loopback port over the tiny random Llama (its context widened: the tools'
system message is longer than its 128 positions); the core's reading of a reply, piece by piece, below."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("fastapi")

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 8}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The forecast.", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a zone.", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def widened(source: Path, folder: Path, template: str | None = None) -> Path:
    """A copy of a tiny model whose context holds 2,048 positions (rope needs no more weights)."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return folder


@contextlib.contextmanager
def widened_server(tiny_models, folder: Path) -> Iterator[Any]:
    """A server on a free loopback port over the tiny Llama, its context widened (a copy in `folder`)."""
    from gptcli.config import Settings
    from gptcli.runtime import open_runtime
    from tests.test_server import serve_runtime

    runtime = open_runtime(Settings(model=str(widened(tiny_models["llama"], folder))), lambda message: None)
    with serve_runtime(runtime, max_running=4) as server:
        yield server


@pytest.fixture(scope="module")
def live(tiny_models, tmp_path_factory) -> Iterator[Any]:
    with widened_server(tiny_models, tmp_path_factory.mktemp("tools") / "tiny-llama") as server:
        yield server


def ask(live: Any, **fields: Any) -> Any:
    client = openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0)
    request = {"model": "tiny-llama", "messages": ASK, "temperature": 0, "max_tokens": 120, **fields}
    return client.chat.completions.create(**request)


def checked_calls(choice: Any) -> list[tuple[str, dict[str, Any]]]:
    """The choice's calls as (name, arguments), each validated against its tool's schema."""
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    calls = []
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_"), call
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        calls.append((call.function.name, arguments))
    return calls


def test_required_returns_a_call_whose_arguments_fit_its_schema(live):
    # One call: the random model, free to add calls, adds them until max_tokens (a cut reply, tested below).
    reply = ask(live, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    calls = checked_calls(reply.choices[0])
    assert len(calls) == 1 and calls[0][0] in SCHEMAS, calls


def test_a_named_choice_calls_that_tool(live):
    for name in SCHEMAS:
        choice = {"type": "function", "function": {"name": name}}
        calls = checked_calls(ask(live, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False).choices[0])
        assert [called for called, _ in calls] == [name], calls


def test_auto_answers_in_text_or_with_a_call(live):
    kinds = set()
    for seed in range(8):
        choice = ask(live, tools=TOOLS, temperature=1.0, seed=seed, parallel_tool_calls=False).choices[0]
        kinds.add(choice.finish_reason)
        if choice.finish_reason == "tool_calls":
            checked_calls(choice)
        else:
            assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str), choice
            assert not choice.message.tool_calls and not choice.message.content.startswith('{"'), choice
    assert "tool_calls" in kinds and len(kinds) > 1, kinds  # both kinds of reply, over these seeds


def test_parallel_calls_are_one_or_more_and_a_single_call_is_one():
    """parallel_tool_calls left out is one call, as llama-server's default (a small model allowed several
    repeats its call until max_tokens)."""
    from gptcli.tools import reply_schema, tool_spec

    many, one, unsaid = (tool_spec(TOOLS, "required", parallel) for parallel in (True, False, None))
    for spec, most in ((many, None), (one, 1), (unsaid, 1)):
        calls = reply_schema(spec)["properties"]["tool_calls"]
        assert calls["minItems"] == 1 and calls.get("maxItems") == most
        named = {call["properties"]["name"]["const"] for call in calls["items"]["anyOf"]}
        assert named == set(SCHEMAS)
    auto = reply_schema(tool_spec(TOOLS, "auto", None))
    assert [sorted(option["properties"]) for option in auto["anyOf"]] == [["tool_calls"], ["response"]]


def test_a_reply_cut_by_max_tokens_is_no_call(live):
    choice = ask(live, tools=TOOLS, tool_choice="required", max_tokens=24).choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert choice.message.content.startswith('{"tool_calls": [{"'), choice.message.content  # what it wrote


def streamed(live: Any, **fields: Any) -> tuple[str | None, list[dict[str, Any]], str, list[Any]]:
    """A streamed reply reassembled as a client does: (content, calls, finish reason, chunks)."""
    chunks = list(ask(live, stream=True, **fields))
    content, calls, finish = None, [], None
    for chunk in chunks:
        delta, finish = chunk.choices[0].delta, chunk.choices[0].finish_reason or finish
        if delta.content:
            content = (content or "") + delta.content
        for call in delta.tool_calls or []:
            if call.index == len(calls):
                calls.append({"id": call.id, "type": call.type, "name": call.function.name, "arguments": ""})
            calls[call.index]["arguments"] += call.function.arguments or ""
    return content, calls, finish, chunks


def test_a_streamed_call_reassembles_to_the_same_call_as_whole(live):
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        fields = {"tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": False}
        whole = ask(live, **fields).choices[0]
        content, calls, finish, chunks = streamed(live, **fields)
        expected = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
        assert [(c["name"], c["arguments"]) for c in calls] == expected and finish == "tool_calls", calls
        assert content is None and all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
        first = next(chunk for chunk in chunks if chunk.choices[0].delta.tool_calls).choices[0].delta.tool_calls[0]
        assert first.id and first.function.name and first.function.arguments == ""  # the name comes first
    fields = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False, "logprobs": True}
    scored = [
        token.token
        for c in streamed(live, **fields)[3]
        if c.choices[0].logprobs
        for token in c.choices[0].logprobs.content
    ]
    assert scored == [token.token for token in ask(live, **fields).choices[0].logprobs.content]  # none lost on the way


def test_a_streamed_text_reply_comes_as_content_as_it_is_written(live):
    called = False
    for seed in range(8):  # the seeds of test_auto_answers_in_text_or_with_a_call: calls first, then text
        fields = {"tools": TOOLS, "temperature": 1.0, "seed": seed, "parallel_tool_calls": False}
        whole = ask(live, **fields).choices[0]
        if whole.finish_reason == "tool_calls":
            called = True
            continue
        assert called, "the first text reply came before any call: are the tools in use?"
        content, calls, finish, chunks = streamed(live, **fields)
        assert content == whole.message.content and not calls and finish == whole.finish_reason, seed
        assert sum(bool(chunk.choices[0].delta.content) for chunk in chunks) > 3  # piece by piece, not at the end
        return
    pytest.fail("no seed answered in text")


def test_a_streamed_reply_cut_short_is_no_call(live):
    fields = {"tools": TOOLS, "tool_choice": "required", "max_tokens": 24}
    whole = ask(live, **fields).choices[0]
    content, calls, finish, _ = streamed(live, **fields)
    assert (content, calls, finish) == (whole.message.content, [], "length") and content.startswith('{"tool_calls"')


def test_none_and_no_tools_answer_as_before(live):
    plain = ask(live, max_tokens=8).choices[0]
    for fields in ({"tools": TOOLS, "tool_choice": "none"}, {"tools": [], "tool_choice": "auto"}):
        choice = ask(live, max_tokens=8, **fields).choices[0]
        assert choice.message.content == plain.message.content and not choice.message.tool_calls, fields


def test_tool_requests_that_cannot_be_used_are_400s_naming_the_field(live):
    bad_schema = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    named = {"type": "function", "function": {"name": "get_news"}}
    cases = [
        ({"tools": TOOLS, "tool_choice": named}, "tool_choice.function.name", "no tool named 'get_news'"),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "must be none, auto, required"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
            "tools.0.function.parameters",
            "not a string",
        ),
        (
            {"tools": [TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools.1.function.parameters",
            "must describe an object",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": bad_schema}}]},
            "tools.0.function.parameters",
            "keyword not supported: uniqueItems",
        ),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1.function.name", "names two tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools.0.type", "must be 'function'"),
        ({"tools": {"get_weather": WEATHER}}, "tools", "must be a list"),
        ({"tools": TOOLS, "response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "valid boolean"),
    ]
    for fields, param, says in cases:
        response = httpx.post(live.v1 + "/chat/completions", json={"messages": ASK, **fields})
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == param and says in error["message"], (fields, error)


# ---------------------------------------------------------------------------------------------- the core


def test_the_reply_schema_keeps_each_tools_references_its_own():
    from gptcli.tools import tool_spec

    item = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    nested = {"type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}}, "$defs": {"Item": item}}
    tools = [{"type": "function", "function": {"name": "put", "parameters": nested}}]
    spec = tool_spec(tools, "required", None)  # was "Pointer '/$defs/Item' does not exist" once nested
    assert spec is not None and '"$ref": "#/$defs/tool_0/$defs/Item"' in spec.constraint.source
    assert tool_spec(tools, "none", None) is None and tool_spec(None, None, None) is None


def test_a_tools_schema_with_an_id_keeps_its_references_its_own():
    """A schema's `$id` (TypeBox, hand-written schemas) is the base its `#/...` references resolve against: under the
    reply schema's $defs it sent them to that URI ('Pointer '/$defs/tool_0/definitions/A' does not exist', a 400)."""
    from gptcli.tools import tool_spec

    schema = {
        "$id": "https://example.com/put.json",
        "type": "object",
        "properties": {"item": {"$ref": "#/definitions/A"}},
        "definitions": {"A": {"type": "string"}},
    }
    spec = tool_spec([{"type": "function", "function": {"name": "put", "parameters": schema}}], "auto", None)
    assert spec is not None and '"$ref": "#/$defs/tool_0/definitions/A"' in spec.constraint.source
    assert spec.tools[0].parameters["$id"] == schema["$id"]  # the tool as the model is told of it keeps it


def test_the_instructions_write_a_named_tool_as_the_json_the_reply_holds():
    from gptcli.tools import instructions, tool_spec

    name = 'say "hi" \\ now'  # a name may hold quotes and backslashes: the call to copy must still be JSON
    spec = tool_spec([{"type": "function", "function": {"name": name}}], "required", None)
    assert spec is not None and spec.named == name
    assert '{"tool_calls": [{"name": "say \\"hi\\" \\\\ now", "arguments": {' in instructions(spec)
    auto = tool_spec([{"type": "function", "function": {"name": name}}], "auto", None)
    assert '{"tool_calls": [{"name": "<tool name>", "arguments": {' in instructions(auto)


def test_the_reader_streams_a_responses_text_split_anywhere():
    from gptcli.tool_reply import ReplyReader

    text = 'Line one\n"quoted" \\ tab\t café 🙂 \u2028 end'
    raw = json.dumps({"response": text}, ensure_ascii=True)  # every escape kind: \n, \", \\, \t, \u00e9, a pair
    for size in (1, 2, 3, 5, 7):
        reader = ReplyReader()
        said = "".join(reader.push(raw[i : i + size]) for i in range(0, len(raw), size))
        reply = reader.finish()
        assert said == text and reply.content == text and not reply.calls, size
    cut = ReplyReader()
    streamed = cut.push(raw[:30])
    assert cut.finish().content == streamed == text[: len(streamed)] and streamed  # cut short: what was said


def test_the_reader_returns_calls_only_when_whole():
    from gptcli.tool_reply import ReplyReader

    raw = '{"tool_calls": [{"name": "get_time", "arguments": {"zone": "CET"}}]}'
    reader = ReplyReader()
    assert reader.push(raw) == ""
    reply = reader.finish()
    assert reply.content is None and [(c.name, json.loads(c.arguments)) for c in reply.calls] == [
        ("get_time", {"zone": "CET"})
    ]
    cut = ReplyReader()
    cut.push(raw[:-3])
    assert cut.finish() == type(reply)((), raw[:-3])


def test_a_template_that_reads_tools_is_given_them(tiny_models, tmp_path):
    from gptcli.prompts import build_prompt
    from gptcli.tokenizer import Tokenizer
    from gptcli.tools import prompt_messages, template_tools, tool_spec
    from tests.conftest import CHATML

    native = "{% if tools %}TOOLS {{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}" + CHATML
    tok = Tokenizer(widened(tiny_models["llama"], tmp_path / "native", native))
    plain = Tokenizer(tiny_models["llama"])
    assert tok.supports_tools and not plain.supports_tools
    spec = tool_spec(TOOLS, "required", False, native=True)
    rendered = tok.render_chat(prompt_messages(ASK, spec, native=True), tools=template_tools(spec))
    assert rendered.startswith("TOOLS get_weather,get_time\n<|im_start|>system\nCall one tool.")
    assert "get_weather:" not in rendered  # the template lists them; the system message only says how to answer
    spec = tool_spec(TOOLS, "required", False)
    listed = plain.decode(build_prompt(plain, prompt_messages(ASK, spec, native=False)).ids, skip_special_tokens=False)
    assert "- get_weather: The forecast. Arguments: {" in listed and listed.startswith("<|im_start|>system\n")


def test_a_chat_without_tools_gives_a_template_tools_none_as_transformers_does(tiny_models, tmp_path):
    """Templates test `tools is not none` (transformers always passes tools, None without them): left undefined,
    that test was true and such a template wrote its tools section, empty, into every prompt."""
    from gptcli.tokenizer import Tokenizer
    from gptcli.tools import chat_prompt, tool_spec
    from tests.conftest import CHATML

    native = "{% if tools is not none %}TOOLS {{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
    tok = Tokenizer(widened(tiny_models["llama"], tmp_path / "native", native + CHATML))
    without = tok.decode(chat_prompt(tok, ASK, None).ids, skip_special_tokens=False)
    assert "TOOLS" not in without and without.startswith("<|im_start|>user\n"), without
    spec = tool_spec(TOOLS, "auto", None, native=True)
    assert tok.decode(chat_prompt(tok, ASK, spec).ids, skip_special_tokens=False).startswith(
        "TOOLS get_weather,get_time"
    )


def test_arguments_hold_only_the_properties_a_schema_names_unless_it_says_otherwise():
    from gptcli.tools import tool_spec

    open_ended = {"type": "object", "properties": {"tags": {"type": "object", "additionalProperties": True}}}
    odd = {"properties": {"properties": {"type": "object", "properties": {"a": {"type": "integer"}}}}}
    tools = [
        {"type": "function", "function": {"name": "tag", "parameters": open_ended}},
        {"type": "function", "function": {"name": "odd", "parameters": odd}},  # type left out; a key named properties
        {"type": "function", "function": {"name": "bare"}},  # no parameters: no arguments
    ]
    tag, odd_one, bare = (tool.parameters for tool in tool_spec(tools, "auto", None).tools)
    assert tag["additionalProperties"] is False and tag["properties"]["tags"]["additionalProperties"] is True
    assert odd_one["type"] == "object" and odd_one["additionalProperties"] is False
    assert odd_one["properties"]["properties"]["additionalProperties"] is False and set(odd_one["properties"]) == {
        "properties"
    }
    assert bare == {"type": "object", "properties": {}, "additionalProperties": False}


def test_a_required_property_the_schema_does_not_describe_stays_allowed_once_closed():
    """JSON Schema lets a required property that `properties` does not describe take any value; closing the object
    to its described properties made such a schema a 400 ('required property 'a' is unsatisfiable')."""
    from gptcli.tools import tool_spec

    schemas = [
        {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["a", "b"]},
        {"type": "object", "properties": {}, "required": ["a"]},
        {"properties": {"b": {"type": "string"}}, "allOf": [{"required": ["a"]}]},
    ]
    for schema in schemas:
        tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
        (closed,) = (tool.parameters for tool in tool_spec(tools, "required", None).tools)
        assert closed["properties"]["a"] == {} and closed["additionalProperties"] is False, closed


# ---------------------------------------------------------------------------------------------- conversations

CALLED = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}},
    ],
}
RESULTS = [
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    {"role": "tool", "tool_call_id": "call_2", "name": "get_time", "content": "14:05"},
]


def test_calls_and_results_in_the_conversation_are_text_the_model_reads(tiny_models):
    from gptcli.server.prompt_ids import chat_request_prompt
    from gptcli.server.schemas import ChatMessage
    from gptcli.tokenizer import Tokenizer

    tok = Tokenizer(tiny_models["llama"])
    messages = [ChatMessage(**m) for m in [*ASK, CALLED, *RESULTS]]
    prompt = tok.decode(chat_request_prompt(tok, messages).ids, skip_special_tokens=False)
    said = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {"zone": "CET"}}]
    calls = json.dumps({"tool_calls": said})
    # A call as the JSON the model answers in; a round of results as one user turn, each named (by its call's id).
    assert f"<|im_start|>assistant\n{calls}<|im_end|>" in prompt, prompt
    assert "<|im_start|>user\nResult of get_weather: Sunny, 21 C\nResult of get_time: 14:05<|im_end|>" in prompt


def test_a_template_that_reads_tools_gets_calls_and_results_as_they_are(tiny_models, tmp_path):
    from gptcli.server.prompt_ids import chat_request_prompt
    from gptcli.server.schemas import ChatMessage
    from gptcli.tokenizer import Tokenizer

    native = (
        "{% for m in messages %}{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.id }} {{ c.function.name }}"
        " {{ c.function.arguments | tojson }}\n{% endfor %}{% elif m.role == 'tool' %}RESULT {{ m.tool_call_id }}"
        " {{ m.content }}\n{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
        "{{ (tools or []) | length }} tools"
    )
    tok = Tokenizer(widened(tiny_models["llama"], tmp_path / "native", native))
    messages = [ChatMessage(**m) for m in [*ASK, CALLED, *RESULTS]]
    prompt = tok.decode(chat_request_prompt(tok, messages).ids, skip_special_tokens=False)
    assert 'CALL call_1 get_weather {"city": "Paris"}\nCALL call_2 get_time {"zone": "CET"}\n' in prompt  # objects
    assert "RESULT call_1 Sunny, 21 C\nRESULT call_2 14:05\n0 tools" in prompt


def test_a_follow_up_with_the_tools_results_is_answered(live):
    first = ask(live, tools=TOOLS, tool_choice="required", parallel_tool_calls=False).choices[0].message
    call = first.tool_calls[0]
    result = {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}
    follow_up = [*ASK, first.model_dump(exclude_none=True), result]
    for stream in (False, True):
        reply = ask(live, messages=follow_up, tools=TOOLS, parallel_tool_calls=False, stream=stream)
        if stream:
            assert [chunk.choices[0].finish_reason for chunk in reply][-1] in ("stop", "length", "tool_calls")
        else:
            assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_calls_a_conversation_cannot_hold_are_400s(live):
    on_user = {"role": "user", "content": "hi", "tool_calls": CALLED["tool_calls"]}
    nameless = {**CALLED, "tool_calls": [{"id": "c", "type": "function", "function": {"arguments": "{}"}}]}
    cases = [([on_user], "messages.0.tool_calls"), ([*ASK, nameless], "messages.1.tool_calls.0.function.name")]
    for messages, param in cases:
        response = httpx.post(live.v1 + "/chat/completions", json={"messages": messages})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


# ---------------------------------------------------------------------------------------------- the default model


@pytest.mark.integration
@pytest.mark.slow
def test_the_default_model_calls_the_weather_tool_and_reads_its_result(default_model):
    from gptcli.config import Settings
    from gptcli.runtime import open_runtime
    from tests.test_server import serve_runtime

    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    weather = {"name": "get_weather", "description": "The current weather in a city.", "parameters": city}
    tools = [{"type": "function", "function": weather}]
    runtime = open_runtime(Settings(model=str(default_model.path)), lambda message: None)
    with serve_runtime(runtime, max_running=2) as live:
        settings = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools}
        reply = ask(live, **settings, tool_choice="required", parallel_tool_calls=False).choices[0]
        assert reply.finish_reason == "tool_calls", reply
        call = reply.message.tool_calls[0]
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, city)
        assert call.function.name == "get_weather" and arguments["city"] == "Paris", call
        _, calls, finish, _ = streamed(live, **settings, parallel_tool_calls=False)  # "auto": it calls too
        assert (calls[0]["name"], calls[0]["arguments"], finish) == (
            "get_weather",
            call.function.arguments,
            "tool_calls",
        )
        result = {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees Celsius"}
        settings["messages"] += [reply.message.model_dump(exclude_none=True), result]
        answer = ask(live, **settings, parallel_tool_calls=False).choices[0]
        assert answer.finish_reason == "stop" and "21" in answer.message.content, answer  # it read the result
