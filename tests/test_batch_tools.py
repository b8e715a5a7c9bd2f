"""Tool calls in batch files: a `messages` line's tools, tool_choice and parallel_tool_calls, run here and through
a server (client mode), against the server's own answer to the same request (the tiny Llama, its context widened
for the tools' system message, as in test_server_tools)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from gptcli.batch_requests import parse_request
from gptcli.config import Settings, with_sampling
from tests import batch_lines
from tests.test_server_tools import ASK, CALLED, RESULTS, TOOLS, widened

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

SETTINGS = with_sampling(Settings(), temperature=0.0, max_tokens=120)
WEATHER = {"type": "function", "function": {"name": "get_weather"}}
LINES = [
    {"id": "required", "messages": ASK, "tools": TOOLS, "tool_choice": "required"},
    {"id": "named", "messages": ASK, "tools": TOOLS, "tool_choice": WEATHER, "parallel_tool_calls": False},
    {"id": "auto", "messages": ASK, "tools": TOOLS, "max_tokens": 40},
    {"id": "history", "messages": [*ASK, CALLED, *RESULTS], "tools": TOOLS, "tool_choice": "required"},
    {"id": "none", "messages": ASK, "tools": TOOLS, "tool_choice": "none", "max_tokens": 8},
]


@pytest.fixture(scope="module")
def live(tiny_models, tmp_path_factory) -> Iterator[tuple[Any, Any]]:
    from gptcli.runtime import open_runtime
    from tests.test_server import serve_runtime

    folder = widened(tiny_models["llama"], tmp_path_factory.mktemp("batch-tools") / "tiny-llama")
    served = open_runtime(Settings(model=str(folder)), lambda message: None)
    here = open_runtime(Settings(model=str(folder)), lambda message: None)
    with serve_runtime(served, max_running=4) as server:
        yield here, server


def run_lines(live: Any, lines: list[dict[str, Any]], *, remote: bool) -> list[dict[str, Any]]:
    here, server = live
    return batch_lines.run_lines(here, server.v1, lines, SETTINGS, remote=remote)


def answer(record: dict[str, Any]) -> tuple[Any, ...]:
    """What a result says, its calls' ids aside (each reply draws new ones)."""
    calls = record.get("tool_calls") or []
    for call in calls:
        assert call["id"].startswith("call_") and call["type"] == "function", call
        assert isinstance(json.loads(call["function"]["arguments"]), dict), call
    named = [(call["function"]["name"], call["function"]["arguments"]) for call in calls]
    return record["text"], named, record["finish_reason"]


def test_a_lines_calls_are_the_servers_for_the_same_request_here_and_through_url(live):
    _, server = live
    here = run_lines(live, LINES, remote=False)
    there = run_lines(live, LINES, remote=True)
    assert [r["id"] for r in here] == [r["id"] for r in there] == [line["id"] for line in LINES]
    for line, mine, theirs in zip(LINES, here, there, strict=True):
        body = {key: value for key, value in line.items() if key != "id"}
        body = {"temperature": 0, "max_tokens": SETTINGS.sampling.max_tokens, **body}
        reply = httpx.post(server.v1 + "/chat/completions", json=body, timeout=60).json()["choices"][0]
        message = reply["message"]
        served = {"text": message["content"], "finish_reason": reply["finish_reason"], **message}
        assert answer(mine) == answer(theirs) == answer(served), line["id"]
    calls = {r["id"]: answer(r)[1] for r in here}
    assert len(calls["required"]) == 1 and len(calls["history"]) == 1  # parallel_tool_calls left out: one call
    assert [name for name, _ in calls["named"]] == ["get_weather"]
    assert here[0]["text"] is None and here[0]["finish_reason"] == "tool_calls"
    assert "tool_calls" not in here[4] and isinstance(here[4]["text"], str)  # "none": a text reply, as before


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ({"prompt": "hi", "tools": TOOLS}, "`tools`, `tool_choice` and `parallel_tool_calls` go with `messages`"),
        ({"messages": ASK, "tools": [{"type": "function", "function": {"name": ""}}]}, "tools.0.function.name:"),
        ({"messages": ASK, "tools": TOOLS, "tool_choice": "always"}, "tool_choice: must be none, auto, required"),
        ({"messages": ASK, "tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls: must be true or"),
        ({"messages": ASK, "tools": TOOLS, "response_format": {"type": "json"}}, "the line's `response_format`.type:"),
        ({"messages": ASK, "tools": TOOLS, "stop": ["."]}, "`stop` does not go with `tools`"),
        ({"messages": [{**ASK[0], "tool_calls": CALLED["tool_calls"]}]}, "messages.0.tool_calls: only an assistant"),
        (
            {"messages": [*ASK, {**CALLED, "tool_calls": [{"function": {"arguments": "{}"}}]}], "tools": TOOLS},
            "messages.1.tool_calls.0.function.name:",
        ),
    ],
)
def test_a_tool_field_that_cannot_be_used_is_that_lines_error_naming_it(live, line, error):
    here, _ = live
    for tokenizer in (here.tokenizer, None):  # here, and before a line is sent to a server
        request = parse_request(1, json.dumps(line).encode(), tokenizer, SETTINGS, 2048)
        assert request.error is not None and request.error.startswith(error), (tokenizer, request.error)


def test_a_servers_calls_are_read_back_however_they_are_split():
    from gptcli.decoding import NO_STATS, Finished
    from gptcli.tool_reply import StreamedCalls

    calls = StreamedCalls()
    calls.add([{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_time", "arguments": ""}}])
    calls.add([{"index": 0, "function": {"arguments": '{"zone": '}}])
    calls.add([{"index": 1, "id": "call_b", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}])
    calls.add([{"index": 0, "function": {"arguments": '"CET"}'}}])
    reply = calls.finished(Finished("stop", NO_STATS, "", ())).reply
    assert [(c.id, c.name, c.arguments) for c in reply.calls] == [
        ("call_a", "get_time", '{"zone": "CET"}'),
        ("call_b", "get_weather", '{"city": "Rome"}'),
    ]
    assert reply.content is None
    assert StreamedCalls().finished(Finished("stop", NO_STATS, "Hello", ())).reply.content == "Hello"


ANSWER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}
FORMATTED = [  # OpenAI's Agents SDK sends tools with the final answer's format: a reply that calls none answers in it
    {
        "id": f"{seed}-{kind}",
        "messages": ASK,
        "tools": TOOLS,
        "response_format": rf,
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": 60,
    }
    for seed in range(6)
    for kind, rf in (
        ("schema", {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}}),
        ("object", {"type": "json_object"}),
    )
]


def test_a_lines_response_format_beside_tools_is_the_answers_format_as_the_servers(live):
    """It was the line's error ('a reply that may call tools is JSON of its own') though the server takes both."""
    _, server = live
    here = run_lines(live, FORMATTED, remote=False)
    there = run_lines(live, FORMATTED, remote=True)
    for line, mine, theirs in zip(FORMATTED, here, there, strict=True):
        body = {key: value for key, value in line.items() if key != "id"}
        reply = httpx.post(server.v1 + "/chat/completions", json=body, timeout=60).json()["choices"][0]
        message = reply["message"]
        served = {"text": message["content"], "finish_reason": reply["finish_reason"], **message}
        assert answer(mine) == answer(theirs) == answer(served), line["id"]
    answered = [(line, r["text"]) for line, r in zip(FORMATTED, here, strict=True) if r["finish_reason"] == "stop"]
    assert {line["id"].split("-")[1] for line, _ in answered} == {"schema", "object"}, here  # both, over these seeds
    for line, text in answered:  # the answer's JSON, as the model wrote it
        jsonschema.validate(json.loads(text), ANSWER if line["id"].endswith("schema") else {"type": "object"})
