"""Tool calls as SDK users and agent frameworks send them (the `openai` client's helpers, the schemas real tools
have), and the routes beside chat that read a chat's tools (/tokenize), against a server on a free loopback
port over the tiny random Llama (its context widened, as in test_server_tools)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.test_server_tools import ASK, TOOLS, widened

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def live(tiny_models, tmp_path_factory) -> Iterator[Any]:
    from gptcli.config import Settings
    from gptcli.runtime import open_runtime
    from tests.test_server import serve_runtime

    folder = widened(tiny_models["llama"], tmp_path_factory.mktemp("tools-sdk") / "tiny-llama")
    runtime = open_runtime(Settings(model=str(folder)), lambda message: None)
    with serve_runtime(runtime, max_running=4) as server:
        yield server


def test_tokenize_counts_a_chats_tools_as_the_chat_route_writes_them(live):
    """vLLM's /tokenize takes a chat's tools: the count a client checks against the context must be the
    prompt's (the tools' system message was left out: 34 tokens counted for a 140-token prompt)."""
    plain = httpx.post(live.url + "/tokenize", json={"messages": ASK}).json()["count"]
    for fields in ({"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": True}):
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
