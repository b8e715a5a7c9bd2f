"""gptcli serve: the OpenAI-compatible routes, their errors, streaming, batching, disconnects and shutdown.

Most tests talk to a real uvicorn server on a free loopback port (in this process, over the tiny Llama)
with the real `openai` client; the flag, key, limit and SIGTERM tests start `python -m gptcli serve`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, run_cli

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def add(a, b):",
    "ROMEO: But soft",
    "Emoji: 🙂🚀",
    "中文测试：你好",
    "Stop here: END.",
    "autumn leaves",
]


class SlowBackend:
    """A backend whose every step takes at least `delay` seconds, so a request is still running when we act."""

    def __init__(self, inner: Any, delay: float) -> None:
        self._inner = inner
        self._delay = delay

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name == "step":

            def slow_step(batch: Any) -> Any:
                time.sleep(self._delay)
                return value(batch)

            return slow_step
        return value

    def forward(self, ids: Any, cache: Any) -> Any:
        time.sleep(self._delay)
        return self._inner.forward(ids, cache)


@dataclass
class Live:
    url: str
    state: Any
    engine: Any

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def client(self, **kwargs: Any) -> Any:
        return openai.OpenAI(base_url=self.v1, api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)


@contextlib.contextmanager
def serve_runtime(
    runtime: Any,
    *,
    delay: float = 0.0,
    api_key: str | None = None,
    connections: int = 1024,
    allowed_origins: tuple[str, ...] = (),
    **limits: Any,
) -> Iterator[Live]:
    """The real app and engine over an already loaded runtime, served from a thread."""
    from gptcli.config import SamplingConfig
    from gptcli.engine import Engine, EngineLimits
    from gptcli.server.app import ServerConfig, create_app
    from gptcli.server.metrics import Metrics
    from gptcli.server.origins import AllowedOrigins
    from gptcli.server.serving import ThreadedServer
    from gptcli.server.state import ServerState

    backend = SlowBackend(runtime.backend, delay) if delay else runtime.backend
    engine = Engine(backend, runtime.tokenizer, EngineLimits(**limits))
    state = ServerState(
        engine=engine,
        tokenizer=runtime.tokenizer,
        model_name="tiny-llama",
        context_length=runtime.backend.info.context_length,
        defaults=SamplingConfig(),
        metrics=Metrics(engine.snapshot),
    )
    origins = AllowedOrigins.parse(allowed_origins, api_key)
    app = create_app(state, ServerConfig(api_key=api_key, allowed_origins=origins, host="127.0.0.1"))
    with ThreadedServer(app, grace_s=1.0, drain=engine.stop, max_connections=connections) as url:
        yield Live(url, state, engine)


@pytest.fixture(scope="module")
def runtime(tiny_models):
    from gptcli.config import Settings
    from gptcli.runtime import open_runtime

    return open_runtime(Settings(model=str(tiny_models["llama"])), lambda message: None)


@pytest.fixture(scope="module")
def live(runtime) -> Iterator[Live]:
    with serve_runtime(runtime, max_running=8) as server:
        yield server


def reference(runtime: Any, prompt: str, max_tokens: int, *, raw: bool = False, stop: tuple[str, ...] = ()) -> Any:
    """What `gptcli generate` produces for this prompt alone at temperature 0 (the same loop, in-process)."""
    from gptcli.config import SamplingConfig
    from gptcli.engine import generate
    from gptcli.prompts import encode_prompt

    ids = encode_prompt(runtime.tokenizer, prompt, raw=raw).ids
    params = SamplingConfig(temperature=0.0, max_tokens=max_tokens, stop=stop)
    *_, finished = generate(runtime.backend, runtime.tokenizer, ids, params)
    return finished


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# ---------------------------------------------------------------------------------------------- routes


def test_models_and_health(live):
    assert httpx.head(live.url + "/health").status_code == 200  # was 405
    client = live.client()
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    assert client.models.retrieve("tiny-llama").id == "tiny-llama"
    health = httpx.get(live.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_the_chat_page_answers_head_as_get_without_a_body(live):
    """`curl -I` and load balancers probe the page with HEAD: the GET's status and headers, no body."""
    page = httpx.get(live.url + "/")
    head = httpx.head(live.url + "/")
    assert head.status_code == 200  # was 405
    assert head.content == b""
    for name in ("content-type", "content-length", "content-security-policy", "x-content-type-options"):
        assert head.headers[name] == page.headers[name], name


def test_chat_completion_matches_generate(live, runtime):
    expected = reference(runtime, PROMPTS[0], 12)
    reply = live.client().chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0, max_tokens=12
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == {"stop": "stop", "length": "length", "context": "length"}[expected.reason]
    assert reply.usage.prompt_tokens == expected.stats.prompt_tokens
    assert reply.usage.completion_tokens == expected.stats.new_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"


def test_chat_stream_with_usage(live, runtime):
    expected = reference(runtime, PROMPTS[1], 10)
    stream = live.client().chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": PROMPTS[1]}],
        temperature=0,
        max_completion_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.stats.new_tokens


def test_sse_framing_ends_with_done(live):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    # No Content-Type header, as `curl -d` sends it: the body is JSON all the same.
    response = httpx.post(live.v1 + "/chat/completions", content=json.dumps(body))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert "usage" not in events[-2]  # include_usage was not asked for


def test_completions_streamed_and_not(live, runtime):
    expected = reference(runtime, PROMPTS[2], 8, raw=True)
    client = live.client()
    whole = client.completions.create(model="tiny-llama", prompt=PROMPTS[2], temperature=0, max_tokens=8)
    assert whole.choices[0].text == expected.text
    assert whole.usage.prompt_tokens == expected.stats.prompt_tokens
    streamed = client.completions.create(
        model="tiny-llama", prompt=PROMPTS[2], temperature=0, max_tokens=8, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == expected.text
    echoed = client.completions.create(model="tiny-llama", prompt=PROMPTS[2], temperature=0, max_tokens=8, echo=True)
    assert echoed.choices[0].text == PROMPTS[2] + expected.text


def test_completions_with_several_prompts_answer_each_as_alone(live, runtime):
    prompts = [PROMPTS[0], PROMPTS[5], PROMPTS[2]]
    expected = [reference(runtime, prompt, 8, raw=True) for prompt in prompts]
    client = live.client()
    whole = client.completions.create(model="tiny-llama", prompt=prompts, temperature=0, max_tokens=8)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert [c.text for c in whole.choices] == [e.text for e in expected]
    assert whole.usage.prompt_tokens == sum(e.stats.prompt_tokens for e in expected)
    assert whole.usage.completion_tokens == sum(e.stats.new_tokens for e in expected)
    chunks = list(
        client.completions.create(
            model="tiny-llama", prompt=prompts, temperature=0, max_tokens=8, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    texts = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
    assert texts == [e.text for e in expected]
    finishes = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finishes == [0, 1, 2] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    ids = [runtime.tokenizer.encode(prompt) for prompt in prompts[:2]]
    by_ids = client.completions.create(model="tiny-llama", prompt=ids, temperature=0, max_tokens=8)
    assert [c.text for c in by_ids.choices] == [e.text for e in expected[:2]]
    # Evaluation harnesses score a batch of prompts in one request.
    scored = client.completions.create(model="tiny-llama", prompt=prompts, echo=True, logprobs=0, max_tokens=0)
    assert [len(c.logprobs.tokens) for c in scored.choices] == [e.stats.prompt_tokens for e in expected]
    for body in ({"prompt": ["x"] * 65}, {"prompt": ["x", ""]}, {"prompt": [[1, 2], []]}):
        response = httpx.post(live.v1 + "/completions", json={**body, "max_tokens": 2})
        assert response.status_code == 400 and error_of(response)["param"].startswith("prompt"), response.text


def test_connections_past_the_limit_get_503_until_one_closes(runtime):
    """--max-queue bounds the engine's requests, but nothing bounded the connections: each client that stopped
    reading kept its finished stream's output in the server's memory, 200 of them in an audit."""
    from urllib.parse import urlsplit

    import httpx

    with serve_runtime(runtime, connections=2) as server:
        address = urlsplit(server.url)
        held = [socket.create_connection((address.hostname, address.port)) for _ in range(2)]
        try:
            deadline = time.monotonic() + 5  # until the server has taken both
            while httpx.get(server.url + "/health").status_code != 503:
                assert time.monotonic() < deadline, "a third connection was served past the limit of two"
                time.sleep(0.05)
        finally:
            for connection in held:
                connection.close()
        deadline = time.monotonic() + 5
        while httpx.get(server.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "the server stayed full after the connections closed"
            time.sleep(0.05)


def test_a_prompt_list_the_queue_cannot_take_runs_none_of_its_prompts(runtime):
    with serve_runtime(runtime, delay=0.05, max_running=1, max_queue=1) as server:
        body = {"prompt": "a", "max_tokens": 12, "ignore_eos": True}
        busy = threading.Thread(target=httpx.post, args=(server.v1 + "/completions",), kwargs={"json": body})
        busy.start()
        assert wait_until(lambda: server.engine.snapshot().running == 1)
        response = httpx.post(server.v1 + "/completions", json={"prompt": ["b", "c"], "max_tokens": 50})
        assert response.status_code == 503 and "Retry-After" in response.headers  # "c" finds the queue full
        busy.join()
        assert wait_until(lambda: server.engine.idle)
        stats = server.engine.snapshot()
        assert stats.prompt_tokens == 1 and stats.tokens_generated <= 12  # the busy request's: "b" never ran
        # More prompts than the server ever takes at once: a 400 that says so, not a 503 to retry forever.
        too_many = httpx.post(server.v1 + "/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 2})
        assert too_many.status_code == 400 and error_of(too_many)["param"] == "prompt"
        assert "at most 2 at once (--parallel 1 + --max-queue 1)" in error_of(too_many)["message"]


def test_tokenize_and_detokenize_in_both_peers_shapes(live, runtime):
    tok = runtime.tokenizer
    vllm = httpx.post(live.url + "/tokenize", json={"model": "tiny-llama", "prompt": PROMPTS[5]}).json()
    assert vllm["tokens"] == tok.encode(PROMPTS[5], add_special_tokens=True) and vllm["count"] == len(vllm["tokens"])
    assert vllm["max_model_len"] == live.state.context_length
    llama = httpx.post(live.url + "/tokenize", json={"content": PROMPTS[5], "with_pieces": True}).json()
    plain = tok.encode(PROMPTS[5], add_special_tokens=False)
    assert [t["id"] for t in llama["tokens"]] == plain
    for token in llama["tokens"]:  # its text, or its bytes where that is part of a character (below)
        text = tok.decode([token["id"]], skip_special_tokens=False)
        assert token["piece"] == text if isinstance(token["piece"], str) else "\ufffd" in text
    # A piece of a character is its bytes, as llama-server gives it: each was "\ufffd", the bytes lost.
    text = "日本語 ñ 🙂"
    pieces = [
        t["piece"]
        for t in httpx.post(live.url + "/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    ]
    assert any(isinstance(piece, list) for piece in pieces) and not any(
        "\ufffd" in piece for piece in pieces if isinstance(piece, str)
    )
    assert b"".join(bytes(p) if isinstance(p, list) else p.encode() for p in pieces) == text.encode()
    messages = [{"role": "user", "content": PROMPTS[0]}]
    chat = httpx.post(live.url + "/tokenize", json={"messages": messages}).json()
    reply = live.client().chat.completions.create(model="default", messages=messages, max_tokens=1)
    assert chat["count"] == reply.usage.prompt_tokens
    back = httpx.post(live.url + "/detokenize", json={"tokens": vllm["tokens"]}).json()
    assert back["prompt"] == back["content"] == tok.decode(vllm["tokens"], skip_special_tokens=False)
    for path, body, param in [
        ("/tokenize", {"prompt": "a", "content": "b"}, None),
        ("/tokenize", {}, None),
        ("/detokenize", {"tokens": [tok.vocab_size]}, "tokens"),
    ]:
        response = httpx.post(live.url + path, json=body)
        assert response.status_code == 400 and error_of(response)["param"] == param, response.text
    assert httpx.post(live.url + "/tokenize", json={"model": "gpt-4o", "prompt": "a"}).status_code == 404


def test_a_messages_text_parts_are_joined_a_line_each(live):
    """`[{"type": "text", "text": "Context: ..."}, {"type": "text", "text": "Question: ..."}]` (LangChain's
    multi-part content) reached the model as "...green.Question: ...": the parts now read as vLLM joins them."""
    context, question = "Context: the sky is green.", "Question: what colour is the sky?"
    parts = [{"type": "text", "text": context}, {"type": "text", "text": question}]

    def count(content: object) -> list[int]:
        body = {"messages": [{"role": "user", "content": content}]}
        return httpx.post(live.url + "/tokenize", json=body).json()["tokens"]

    assert count(parts) == count(f"{context}\n{question}") != count(context + question)
    reply = live.client().chat.completions.create(
        model="default", messages=[{"role": "user", "content": parts}], max_tokens=1
    )
    assert reply.usage.prompt_tokens == len(count(parts))


def test_prompts_are_tokenized_off_the_event_loop_without_the_gil(live, runtime, monkeypatch):
    """A 1 MB prompt took a second to tokenize on the event loop, holding the GIL: no stream moved meanwhile."""
    import asyncio

    tokenizer_class = type(runtime.tokenizer)
    encode = tokenizer_class.encode
    on_loop: list[bool] = []

    def watched(self, text, **kwargs):
        on_loop.append(asyncio._get_running_loop() is not None)
        return encode(self, text, **kwargs)

    monkeypatch.setattr(tokenizer_class, "encode", watched)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    httpx.post(live.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1}, timeout=30)
    httpx.post(live.url + "/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1}, timeout=30)
    httpx.post(live.url + "/tokenize", json={"messages": messages}, timeout=30)
    httpx.post(live.url + "/tokenize", json={"prompt": "a"}, timeout=30)
    assert len(on_loop) >= 5 and not any(on_loop), on_loop
    monkeypatch.undo()

    text = " ".join(f"w{i * 7919 % 100_003}" for i in range(200_000))  # ~1.4 MB that tokenizes slowly
    ticks = 0
    done = threading.Event()

    def tick() -> None:
        nonlocal ticks
        while not done.is_set():
            time.sleep(0.001)
            ticks += 1

    ticker = threading.Thread(target=tick)
    ticker.start()
    started = time.perf_counter()
    runtime.tokenizer.encode(text)
    took = time.perf_counter() - started
    done.set()
    ticker.join()
    assert took < 0.1 or ticks > 10, (took, ticks)  # another thread ran while it worked (with the GIL held: ~2)


def test_stop_strings_and_ignored_parameters(live, runtime):
    full = reference(runtime, PROMPTS[3], 16).text
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].strip())
    expected = full[: full.find(stop)]
    reply = live.client().chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": PROMPTS[3]}],
        temperature=0,
        max_tokens=16,
        stop=[stop, "never-appears"],
        seed=3,
        user="someone",
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice="none",  # it answers in text (tool calls: tests/test_server_tools.py)
        extra_body={"top_k": 5, "min_p": 0.0, "repetition_penalty": 1.0, "logit_bias": {}},
    )
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "stop"
    single = live.client().completions.create(model="default", prompt="x", max_tokens=2, stop="zzz")
    assert single.choices[0].finish_reason in {"stop", "length"}


def test_chat_logprobs_streamed_and_not(live, runtime):
    client = live.client()
    ask = dict(model="tiny-llama", messages=[{"role": "user", "content": PROMPTS[4]}], temperature=0, max_tokens=10)
    whole = client.chat.completions.create(**ask, logprobs=True, top_logprobs=3)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    for entry in content:
        values = [alternative.logprob for alternative in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True) and values[0] <= 0
        # Greedy: the chosen token is the model's most likely one, with the same log-probability.
        assert entry.top_logprobs[0].token == entry.token and entry.logprob == values[0]
        # A piece of a character (its token decodes to U+FFFD) has its own bytes; a whole token's are its UTF-8.
        assert entry.bytes == list(entry.token.encode("utf-8")) or entry.token == "\ufffd"
    expected = reference(runtime, PROMPTS[4], 10)
    assert whole.choices[0].message.content == expected.text
    # The first token's log-probability is the model's own log-softmax over the prompt.
    import numpy as np

    from gptcli.prompts import encode_prompt

    logits, _ = runtime.backend.forward(encode_prompt(runtime.tokenizer, PROMPTS[4]).ids, runtime.backend.new_cache())
    row = np.asarray(logits, dtype=np.float64)
    log_softmax = row - row.max() - np.log(np.exp(row - row.max()).sum())
    assert content[0].logprob == pytest.approx(float(log_softmax[expected.token_ids[0]]), abs=1e-5)
    streamed = list(client.chat.completions.create(**ask, logprobs=True, top_logprobs=3, stream=True))
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in content]
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected.text
    plain = client.chat.completions.create(**ask)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == expected.text
    bare = client.chat.completions.create(**ask, logprobs=True)
    assert [e.top_logprobs for e in bare.choices[0].logprobs.content] == [[]] * len(content)


def test_chat_logprobs_bytes_are_a_split_characters_own(live, runtime):
    # A token that is a piece of a character decodes alone to U+FFFD; `bytes` is what lets a client join
    # the pieces back (OpenAI's reason for the field), so it carries the piece's bytes, not U+FFFD's.
    pieces = runtime.tokenizer.encode("🚀", add_special_tokens=False)
    assert len(pieces) > 1
    client = live.client()
    ask = dict(model="tiny-llama", messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0, max_tokens=4)
    reply = client.chat.completions.create(
        **ask, logprobs=True, top_logprobs=1, logit_bias={str(pieces[0]): 100}, extra_body={"ignore_eos": True}
    )
    entries = reply.choices[0].logprobs.content
    assert len({bytes(e.bytes) for e in entries}) == 1 and entries[0].token == "\ufffd"
    assert entries[0].bytes and "🚀".encode().startswith(bytes(entries[0].bytes))


def test_completion_logprobs_in_the_legacy_format(live, runtime):
    client = live.client()
    reply = client.completions.create(model="tiny-llama", prompt=PROMPTS[0], temperature=0, max_tokens=8, logprobs=2)
    scored = reply.choices[0].logprobs
    assert len(scored.tokens) == len(scored.token_logprobs) == len(scored.text_offset) == reply.usage.completion_tokens
    assert scored.text_offset[0] == 0
    text = reply.choices[0].text
    for token, offset in zip(scored.tokens, scored.text_offset, strict=True):  # each token's text is where it says
        assert token == "\ufffd" or text[offset:].startswith(token), (token, offset, text)
    for token, value, top in zip(scored.tokens, scored.token_logprobs, scored.top_logprobs, strict=True):
        assert top[token] == value and max(top.values()) == value  # greedy: the chosen token is the best
    streamed = list(client.completions.create(
        model="tiny-llama", prompt=PROMPTS[0], temperature=0, max_tokens=8, logprobs=2, stream=True
    ))  # fmt: skip
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in streamed if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == scored.tokens and offsets == scored.text_offset


def test_completion_text_offsets_index_the_text_across_a_split_character(live, runtime):
    # Each of "日本語" and "コ" is several tokens (pieces decoding alone to U+FFFD); a piece adds no character
    # to the text, so every offset after one still points into the returned text, as the prompt's own do.
    prompt = "日本語の文章:コ ok"
    assert any(runtime.tokenizer.decode([i]) == "\ufffd" for i in runtime.tokenizer.encode(prompt))
    ask = dict(model="tiny-llama", prompt=prompt, temperature=0, echo=True, logprobs=1, max_tokens=0)
    choice = live.client().completions.create(**ask).choices[0]
    tokens, offsets = choice.logprobs.tokens, choice.logprobs.text_offset
    assert choice.text == prompt and offsets == sorted(offsets) and offsets[-1] < len(prompt)
    for token, offset in zip(tokens, offsets, strict=True):
        assert token == "\ufffd" or prompt[offset:].startswith(token), (token, offset)
    assert offsets[-1] + len(tokens[-1]) == len(prompt)


def test_echo_with_logprobs_scores_the_prompt_as_evaluation_harnesses_ask(live, runtime):
    import numpy as np

    from gptcli.backends.base import score_positions

    client = live.client()
    ask = dict(model="tiny-llama", prompt=PROMPTS[3], temperature=0, echo=True, logprobs=1)
    scored = client.completions.create(**ask, max_tokens=0)
    choice = scored.choices[0]
    ids = runtime.tokenizer.encode(PROMPTS[3], add_special_tokens=True)
    assert choice.text == PROMPTS[3] and choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    rows, _ = score_positions(runtime.backend, ids, runtime.backend.new_cache())
    rows = np.asarray(rows, dtype=np.float64)
    log_softmax = rows - rows.max(1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(1, keepdims=True))
    expected = [float(log_softmax[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    # With new tokens too: the prompt's entries, then the same entries a request without echo gets.
    both = client.completions.create(**ask, max_tokens=4).choices[0]
    plain = client.completions.create(**{**ask, "echo": False}, max_tokens=4).choices[0]
    assert both.text == PROMPTS[3] + plain.text
    assert both.logprobs.tokens == lp.tokens + plain.logprobs.tokens
    assert both.logprobs.token_logprobs[: len(ids)] == lp.token_logprobs
    # The reply's first logprob comes from the last row of a prompt read with every position's logits, the
    # plain request's from a one-row product: on an AVX2-only CPU the two round apart (7e-9 seen), elsewhere not.
    assert both.logprobs.token_logprobs[len(ids) :] == pytest.approx(plain.logprobs.token_logprobs, rel=1e-6, abs=1e-6)


def test_logit_bias_bans_and_forces_tokens(live, runtime):
    expected = reference(runtime, PROMPTS[1], 6, raw=True)
    client = live.client()
    ask = dict(model="tiny-llama", prompt=PROMPTS[1], temperature=0, max_tokens=6)
    banned = expected.token_ids[0]
    reply = client.completions.create(**ask, logprobs=0, logit_bias={str(banned): -100})
    first = reply.choices[0].logprobs.tokens[0]
    assert first != runtime.tokenizer.decode([banned], skip_special_tokens=False)
    forced = 42 if banned != 42 else 43
    reply = client.completions.create(**ask, logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert reply.choices[0].text == runtime.tokenizer.decode([forced] * 6)


def test_frequency_and_presence_penalties_shape_the_reply(live, runtime):
    from gptcli.config import SamplingConfig
    from gptcli.engine import generate
    from gptcli.prompts import encode_prompt

    ids = encode_prompt(runtime.tokenizer, PROMPTS[0], raw=True).ids
    penalties = dict(presence_penalty=2.0, frequency_penalty=2.0)
    params = SamplingConfig(temperature=0.0, max_tokens=24, ignore_eos=True, repetition_stop=False, **penalties)
    *_, alone = generate(runtime.backend, runtime.tokenizer, ids, params)
    client = live.client()
    ask = dict(model="tiny-llama", prompt=PROMPTS[0], temperature=0, max_tokens=24, extra_body={"ignore_eos": True})
    served = client.completions.create(**ask, **penalties).choices[0].text
    plain = client.completions.create(**ask).choices[0].text
    assert served == alone.text != plain


def test_a_conversation_that_grows_reuses_its_prefix_and_answers_as_fresh(runtime):
    history = [{"role": "user", "content": PROMPTS[3] + " " + PROMPTS[0]}]
    with serve_runtime(runtime, max_running=4, prefill_chunk=8, prefix_cache=4) as server:
        client = server.client()
        first = client.chat.completions.create(model="default", messages=history, temperature=0, max_tokens=8)
        history += [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": PROMPTS[1]},
        ]
        second = client.chat.completions.create(model="default", messages=history, temperature=0, max_tokens=8)
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert cached >= 8 and cached % 8 == 0 and cached < second.usage.prompt_tokens
        metrics = httpx.get(server.url + "/metrics").text
        assert re.search(r"^gptcli_kv_cached_tokens [1-9]", metrics, re.M)
    with serve_runtime(runtime, max_running=4, prefill_chunk=8) as fresh_server:  # no prefix cache
        fresh = fresh_server.client().chat.completions.create(
            model="default", messages=history, temperature=0, max_tokens=8
        )
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert second.choices[0].message.content == fresh.choices[0].message.content


def test_ignore_eos_generates_exactly_max_tokens(live):
    forced = live.client().completions.create(
        model="tiny-llama", prompt=PROMPTS[0], temperature=0, max_tokens=60, extra_body={"ignore_eos": True}
    )
    assert forced.usage.completion_tokens == 60 and forced.choices[0].finish_reason == "length"


def test_sampling_with_a_seed_repeats(live):
    client = live.client()
    ask = dict(model="tiny-llama", prompt="Once", temperature=1.0, top_p=0.9, max_tokens=10, seed=42)
    assert client.completions.create(**ask).choices[0].text == client.completions.create(**ask).choices[0].text
    # -1 is llama.cpp's "a fresh seed": it samples (before, numpy refused it and the engine's thread died,
    # so every later request hung).
    for _ in range(2):
        fresh = client.with_options(timeout=30).completions.create(**{**ask, "seed": -1})
        assert fresh.choices[0].finish_reason in ("length", "stop")


def test_eight_concurrent_streams_match_generate_alone(live, runtime, tiny_models):
    alone = [reference(runtime, prompt, 12) for prompt in PROMPTS]
    expected = [finished.text for finished in alone]
    # The same text as the real `gptcli generate` program gives (checked for one prompt: it is the same loop).
    cli = run_cli("generate", PROMPTS[0], "-m", str(tiny_models["llama"]), "-t", "0", "-n", "12")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.decode().removesuffix("\n") == expected[0].removesuffix("\n")

    results: dict[int, str] = {}
    barrier = threading.Barrier(len(PROMPTS))

    def ask(index: int) -> None:
        client = live.client()
        barrier.wait()
        stream = client.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": PROMPTS[index]}],
            temperature=0,
            max_tokens=12,
            stream=True,
        )
        results[index] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    steps_before = live.engine.snapshot().steps
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [results.get(i) for i in range(len(PROMPTS))] == expected
    assert live.engine.snapshot().running == 0
    # They shared the engine's steps: one at a time, each would take a step per token.
    assert live.engine.snapshot().steps - steps_before < sum(f.stats.new_tokens for f in alone) / 2


def test_metrics(live):
    live.client().completions.create(model="tiny-llama", prompt="Once", max_tokens=3)
    httpx.get(live.url + "/nowhere")
    text = httpx.get(live.url + "/metrics").text
    assert re.search(r'^gptcli_requests_total\{route="/v1/completions",status="200"\} [1-9]', text, re.M)
    assert re.search(r'^gptcli_requests_total\{route="other",status="404"\} [1-9]', text, re.M)
    httpx.get(live.v1 + "/models/tiny-llama")
    text = httpx.get(live.url + "/metrics").text
    assert re.search(r'^gptcli_requests_total\{route="/v1/models/\{model_id:path\}",status="200"\} [1-9]', text, re.M)
    for name in ("prompt_tokens_total", "generation_tokens_total"):
        assert re.search(rf"^gptcli_{name} [1-9]", text, re.M), name
    assert re.search(r"^gptcli_time_to_first_token_seconds_count [1-9]", text, re.M)
    assert re.search(r'^gptcli_e2e_request_latency_seconds_bucket\{le="\+Inf"\} [1-9]', text, re.M)
    for gauge in ("queue_depth", "running_sequences", "kv_used_tokens", "kv_budget_tokens"):
        assert re.search(rf"^# TYPE gptcli_{gauge} gauge\ngptcli_{gauge} \d", text, re.M), gauge
    # A client that leaves while sending its body is no server error (it was counted a 500): nginx's 499.
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"prompt"')
    left = r'^gptcli_requests_total\{route="/v1/completions",status="499"\} 1$'
    assert wait_until(lambda: re.search(left, httpx.get(live.url + "/metrics").text, re.M))
    assert 'route="/v1/completions",status="500"' not in httpx.get(live.url + "/metrics").text


# ---------------------------------------------------------------------------------------------- errors


def error_of(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_bad_parameters_are_400_in_openai_shape(live):
    client = live.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}], n=2)
    assert caught.value.param == "n" and "n=1" in caught.value.message
    url = live.v1 + "/chat/completions"
    cases = [
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": 5}, "stop"),
        ({"messages": [{"role": "user", "content": "hi"}], "seed": -2}, "seed"),  # -1 is "random"
        ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**63}, "seed"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"10": 101}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 2.5}, "presence_penalty"),
        ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": -3}, "frequency_penalty"),
        ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"ten": 1}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"99999999": -1}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        # A call demanded with no tool to call, or in the older form, which would come back as text.
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [], "tool_choice": "required"}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "hi"}], "function_call": {"name": "f"}}, "function_call"),
    ]
    for body, param in cases:
        response = httpx.post(url, json=body)
        assert response.status_code == 400, body
        error = error_of(response)
        assert error["type"] == "invalid_request_error" and error["param"] == param, (body, error)
    completions = [
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),  # 0 only scores the prompt (echo and logprobs)
        ({"prompt": "hi", "max_tokens": 0, "echo": True, "logprobs": 1, "stream": True}, "stream"),
    ]
    for body, param in completions:
        response = httpx.post(live.v1 + "/completions", json=body)
        assert response.status_code == 400 and error_of(response)["param"] == param, (body, response.text)
    broken = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
    assert broken.status_code == 400 and error_of(broken)["code"] == "invalid_json"
    # Valid JSON that Python will not read as an int: it was told "not valid JSON".
    long_number = httpx.post(url, content=b'{"max_tokens": ' + b"9" * 5000 + b"}")
    assert long_number.status_code == 400, long_number.text
    assert error_of(long_number)["message"] == "the request body holds a number of 5,000 digits, over 4,300"


def test_vllm_and_llama_cpps_off_values_for_top_k_and_min_p_are_taken(live):
    """top_k -1 (vLLM's and llama.cpp's "all tokens") and min_p 1 (vLLM takes [0, 1]) were 400s."""
    url = live.v1 + "/chat/completions"
    asked = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 1.0, "seed": 3}

    def reply(**fields: Any) -> str:
        response = httpx.post(url, json={**asked, **fields}, timeout=30)
        assert response.status_code == 200, (fields, response.text)
        return response.json()["choices"][0]["message"]["content"]

    assert reply(top_k=-1, min_p=0) == reply(top_k=0, min_p=0)  # every token
    assert reply(min_p=1) == reply(temperature=0)  # the likeliest alone
    for field, value in (("top_k", -2), ("min_p", 1.01)):
        refused = httpx.post(url, json={**asked, field: value}, timeout=30)
        assert refused.status_code == 400 and error_of(refused)["param"] == field, refused.text


def test_nan_and_infinity_are_400s_that_say_a_number_must_be_finite(live):
    # Python's JSON reads NaN and Infinity; "temperature: NaN" was told it must be at most 2, and
    # "repetition_penalty: Infinity" (only bounded below) was taken.
    hi = [{"role": "user", "content": "hi"}]
    cases = [
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": float("-inf")}, "top_p"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"logit_bias": {"5": float("nan")}}, "logit_bias.5"),
    ]
    for fields, param in cases:
        response = httpx.post(live.v1 + "/chat/completions", content=json.dumps({"messages": hi, **fields}))
        error = error_of(response)
        assert response.status_code == 400 and error["param"] == param, (fields, error)
        assert error["message"] == f"{param}: Input should be a finite number", error


def test_hostile_bodies_are_400s_that_name_the_field(live):
    """What a careless or hostile client sends: never a 500, and the server stays well."""
    hi = [{"role": "user", "content": "hi"}]
    cases = [
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "/chat/completions", "messages.0.content"),
        (b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', "/chat/completions", "messages.0.content"),
        (b'{"prompt": "x", "model": "\\udfff"}', "/completions", "model"),
        (b'{"prompt": ["ok", "\\ud800"]}', "/completions", "prompt.1"),
        (b'{"prompt": [[1], [999999]]}', "/completions", "prompt.1"),  # its message named prompt.1, its param prompt
        (b"[" * 5000 + b"]" * 5000, "/chat/completions", None),
        (json.dumps({"messages": hi, "max_tokens": True}).encode(), "/chat/completions", "max_tokens"),
        (json.dumps({"messages": hi, "max_tokens": "5"}).encode(), "/chat/completions", "max_tokens"),
        (json.dumps({"prompt": [True, 2]}).encode(), "/completions", "prompt"),
        (json.dumps({"messages": hi, "logit_bias": {"\u00b2": 1}}).encode(), "/chat/completions", "logit_bias"),
        (json.dumps({"messages": hi, "logit_bias": {"5": 60, "05": 60}}).encode(), "/chat/completions", "logit_bias"),
        (json.dumps({"messages": hi, "stream_options": {"include_usage": True}}).encode(), "/chat/completions", None),
    ]
    for raw, route, param in cases:
        response = httpx.post(live.v1 + route, content=raw)
        assert response.status_code == 400, (raw[:60], response.text)
        error = error_of(response)
        assert param is None or error["param"] == param, (raw[:60], error)
    assert error["param"] == "stream_options"
    for route, body in (("/tokenize", b'{"prompt": "\\ud800"}'), ("/tokenize", b'{"messages": []}')):
        response = httpx.post(live.url + route, content=body)
        assert response.status_code == 400, response.text
    # An emoji escaped as a surrogate pair (as json.dumps writes it) is text.
    emoji = json.dumps({"messages": [{"role": "user", "content": "\U0001f389"}], "max_tokens": 2}).encode()
    assert httpx.post(live.v1 + "/chat/completions", content=emoji).status_code == 200


def test_tiny_temperatures_and_penalties_sample_rather_than_fail(live):
    hi = [{"role": "user", "content": "hi"}]
    for extra in ({"temperature": 1e-308}, {"temperature": 1, "repetition_penalty": 1e-38}):
        response = httpx.post(live.v1 + "/chat/completions", json={"messages": hi, "max_tokens": 4, **extra})
        assert response.status_code == 200, (extra, response.text)
    greedy = httpx.post(live.v1 + "/chat/completions", json={"messages": hi, "max_tokens": 6, "temperature": 0})
    tiny = httpx.post(live.v1 + "/chat/completions", json={"messages": hi, "max_tokens": 6, "temperature": 1e-6})
    assert tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]


def test_unknown_model_is_404(live):
    with pytest.raises(openai.NotFoundError) as caught:
        live.client().completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    assert caught.value.code == "model_not_found"
    assert httpx.get(live.v1 + "/models/gpt-4o").status_code == 404
    missing = httpx.get(live.url + "/v1/nothing-here")
    assert missing.status_code == 404 and error_of(missing)["type"] == "not_found_error"


def test_an_openai_route_this_server_lacks_says_what_it_answers(live):
    """The SDK's embeddings call got a bare "Not Found"; it now reads which routes there are."""
    with pytest.raises(openai.NotFoundError) as caught:
        live.client().embeddings.create(model="tiny-llama", input="hi")
    message = caught.value.message
    assert "/v1/embeddings is not supported" in message and "/v1/chat/completions" in message, message
    assert "{" not in error_of(caught.value.response)["message"]  # no route templates in it
    wrong = httpx.get(live.v1 + "/chat/completions")  # a route of its own, another method: 405, not 404
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert error_of(wrong)["message"] == "/v1/chat/completions takes POST, not GET"
    assert httpx.get(live.v1 + "/models").status_code == 200  # the routes before it still answer
    assert httpx.post(live.v1 + "/responses/input_tokens", json={"input": "hi"}).status_code == 200
    counting = httpx.get(live.v1 + "/responses/input_tokens")  # was a 404 for a stored response of that name
    assert counting.status_code == 405 and counting.headers["allow"] == "POST", counting.text


def test_a_path_or_method_outside_v1_gets_the_same_404_or_405(live):
    """/favicon.ico, /v2/... got a bare "Not Found" with code null, POST /health a bare "Method Not Allowed";
    /v1 (no slash) a redirect to /v1/, itself a 404."""
    for path in ("/favicon.ico", "/v2/chat/completions", "/health/x", "/v1"):
        missing = httpx.get(live.url + path)
        error = error_of(missing)
        assert missing.status_code == 404 and error["code"] == "not_found", (path, missing.text)
        assert error["message"].startswith(f"{path} is not supported: gptcli serve answers "), error
    wrong = httpx.post(live.url + "/health")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, HEAD"
    assert error_of(wrong)["message"] == "/health takes GET, HEAD, not POST"


def test_options_gets_the_same_404_or_405_as_any_other_method(live):
    """Without --allowed-origin (whose preflights are answered), OPTIONS got a bare "Method Not Allowed" 405 with
    Allow: GET, DELETE, PATCH, HEAD, POST, PUT on any path: the catch-all route's methods left it out."""
    missing = httpx.options(live.url + "/no/such/path")
    assert missing.status_code == 404 and error_of(missing)["code"] == "not_found", missing.text
    wrong = httpx.options(live.v1 + "/chat/completions", headers={"Origin": "http://localhost:3000"})
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST", wrong.text
    assert error_of(wrong)["message"] == "/v1/chat/completions takes POST, not OPTIONS"


def test_an_unexpected_exception_is_a_500_in_openai_shape_logged_once(live, monkeypatch):
    """A route that failed unexpectedly (asyncio.to_thread's "can't start new thread" under memory pressure) answered
    Starlette's plain-text "Internal Server Error"."""
    import logging

    from gptcli.server import ollama_routes, openai_routes

    def no_thread(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(openai_routes, "chat_request_prompt", no_thread)
    monkeypatch.setattr(ollama_routes, "chat_request_prompt", no_thread)
    logged: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = logged.append  # type: ignore[method-assign]
    logging.getLogger("uvicorn.error").addHandler(handler)

    def tracebacks() -> list[logging.LogRecord]:
        return [record for record in logged if record.exc_info and "can't start new thread" in str(record.exc_info[1])]

    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        failed = httpx.post(live.v1 + "/chat/completions", json=body, timeout=30)
        ollama = httpx.post(live.url + "/api/chat", json={**body, "stream": False}, timeout=30)
        # uvicorn logs the exception after the 500 has gone out: on a busy machine, after the client has it
        wait_until(lambda: len(tracebacks()) >= 2, 5)
        time.sleep(0.2)  # (and a third, were there one, would come now)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert failed.status_code == 500, failed.text
    error = error_of(failed)
    assert error["type"] == "server_error" and error["code"] == "internal_error", error
    assert "Traceback" not in failed.text and "can't start new thread" not in failed.text
    assert ollama.status_code == 500 and set(ollama.json()) == {"error"}, ollama.text  # ollama's shape there
    assert len(tracebacks()) == 2, [record.getMessage() for record in logged]  # one each
    assert httpx.get(live.url + "/health").status_code == 200  # still serving


def test_an_allowed_origins_page_can_read_the_500_too(runtime, monkeypatch):
    """QA: the 500 (written outside every middleware) had no CORS headers, so an allowed page could not read it."""
    from gptcli.server import openai_routes

    def no_thread(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(openai_routes, "chat_request_prompt", no_thread)
    page = "http://localhost:3000"
    with serve_runtime(runtime, allowed_origins=(page,)) as server:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        failed = httpx.post(server.v1 + "/chat/completions", json=body, headers={"Origin": page}, timeout=30)
        other = httpx.post(server.v1 + "/chat/completions", json=body, headers={"Origin": "http://x.test"}, timeout=30)
    assert failed.status_code == 500 and failed.headers["access-control-allow-origin"] == page, failed.headers
    assert "Origin" in failed.headers["vary"]
    assert "access-control-allow-origin" not in other.headers  # another origin's: refused before, and no CORS


def test_prompt_over_the_context_is_context_length_exceeded(live):
    with pytest.raises(openai.BadRequestError) as caught:
        live.client().chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "autumn leaves " * 200}]
        )
    assert caught.value.code == "context_length_exceeded"
    # OpenAI's and vLLM's words, by which litellm knows the error (it reads the message, not the code)
    assert re.fullmatch(
        r"This model's maximum context length is 128 tokens\. However, your messages resulted in \d+ tokens\. "
        r"Please reduce the length of the messages\.",
        caught.value.body["message"],
    ), caught.value.body


def test_a_message_without_content_is_a_400_unless_it_holds_tool_calls(live):
    for message in ({"role": "user", "content": None}, {"role": "system"}, {"role": "assistant", "content": None}):
        body = {"messages": [message, {"role": "user", "content": "hi"}], "max_tokens": 2}
        refused = httpx.post(live.v1 + "/chat/completions", json=body, timeout=30)
        error = error_of(refused)
        assert refused.status_code == 400 and error["param"] == "messages.0.content", refused.text
        assert (
            error["message"]
            == f"messages.0.content: a {message['role']} message needs content (text, or a list of text parts)"
        )
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    turns.append({"role": "tool", "tool_call_id": "c1", "content": "42"})
    ran = httpx.post(live.v1 + "/chat/completions", json={"messages": turns, "max_tokens": 2}, timeout=30)
    assert ran.status_code == 200, ran.text


# ---------------------------------------------------------------------------------------------- disconnects


def test_a_client_that_disconnects_frees_its_slot(runtime):
    with serve_runtime(runtime, delay=0.05, max_running=1) as slow:
        cancelled = []
        real_cancel = slow.engine.cancel
        slow.engine.cancel = lambda handle: (cancelled.append(handle.id), real_cancel(handle))
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "stream": True}
        with httpx.stream("POST", slow.v1 + "/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if '"content"' in line and '"role"' not in line)
            assert slow.engine.snapshot().running == 1
        # The client is gone: the server cancels the sequence and the engine frees it at its next step.
        assert wait_until(lambda: slow.engine.snapshot().running == 0, 10)
        assert len(cancelled) == 1
        metrics = httpx.get(slow.url + "/metrics").text
        assert re.search(r"^gptcli_running_sequences 0$", metrics, re.M)
        assert re.search(r"^gptcli_kv_used_tokens 0$", metrics, re.M)
        # An abandoned stream is no success, though its 200 went out first: nginx's 499, as for an unsent body.
        assert re.search(r'^gptcli_requests_total\{route="/v1/chat/completions",status="499"\} 1$', metrics, re.M)
        assert 'route="/v1/chat/completions",status="200"' not in metrics
        # The slot is free again: the next request runs to the end.
        after = httpx.post(slow.v1 + "/completions", json={"prompt": "Once", "max_tokens": 2}, timeout=30)
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] >= 1


def test_a_non_streaming_client_that_disconnects_is_cancelled_too(runtime):
    with serve_runtime(runtime, delay=0.05, max_running=1) as slow:
        # Greedy: this prompt runs all 100 tokens (5 s here). Sampled, 5 seeds in 200 drew EOS within the
        # 0.5 s the client waits, and the reply came back before it could disconnect.
        body = {"prompt": "Once", "max_tokens": 100, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(slow.v1 + "/completions", json=body, timeout=0.5)
        assert wait_until(lambda: slow.engine.snapshot().running == 0, 10)
        assert slow.engine.snapshot().tokens_generated < 60
        left = r'^gptcli_requests_total\{route="/v1/completions",status="499"\} 1$'
        assert wait_until(lambda: re.search(left, httpx.get(slow.url + "/metrics").text, re.M))


def test_a_client_that_resets_mid_stream_leaves_no_asyncio_warning(runtime, caplog):
    # A client gone mid-stream (a reset: SO_LINGER 0) is heard of at the next read or write. When the loop was busy
    # (many streams), the events queued meanwhile were all written without yielding to it, so uvicorn never learnt
    # of the loss, and asyncio logged "socket.send() raised exception." from the fifth write on.
    import asyncio
    import struct

    held, reset = threading.Event(), threading.Event()

    def hold_the_loop() -> None:  # as other streams would: the engine goes on meanwhile, its events queue up
        held.set()
        assert reset.wait(10)
        start = slow.engine.snapshot().tokens_generated
        assert wait_until(lambda: slow.engine.snapshot().tokens_generated >= start + 30, 10)

    with serve_runtime(runtime, delay=0.01, max_running=1) as slow:
        loops = []
        submit = slow.engine.submit
        slow.engine.submit = lambda *a, **k: (loops.append(asyncio.get_running_loop()), submit(*a, **k))[1]
        host, port = slow.url.removeprefix("http://").split(":")
        context = runtime.backend.info.context_length
        body = {"prompt": "Once", "max_tokens": context - 8, "ignore_eos": True, "stream": True}
        data = json.dumps(body).encode()
        request = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        request += b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
        with caplog.at_level("WARNING", logger="asyncio"):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(request)
                received = b""
                while received.count(b"data: ") < 2:
                    received += sock.recv(65536)
                loops[0].call_soon_threadsafe(hold_the_loop)
                assert held.wait(10)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            reset.set()
            assert wait_until(lambda: slow.engine.snapshot().running == 0, 10)
        assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


# ---------------------------------------------------------------------------------------------- the program


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def llama_tok(tiny_models):
    from gptcli.tokenizer import Tokenizer

    return Tokenizer(tiny_models["llama"])


def scripted_env(tok, text: str, delay: float = 0.0) -> dict[str, str]:
    ids = [*tok.encode(text, add_special_tokens=False), min(tok.eos_ids)]
    return {
        "GPTCLI_BACKEND_PATHS": "scripted=tests.scripted:ScriptedBackend",
        "GPTCLI_TEST_SCRIPT": json.dumps(ids),
        "GPTCLI_TEST_DELAY": str(delay),
        "GPTCLI_TEST_CONTEXT": "128",
    }


@contextlib.contextmanager
def serve_process(model: Path, *flags: str, env: dict[str, str]) -> Iterator[tuple[subprocess.Popen, str]]:
    """`python -m gptcli serve` on a free port; yields the process and its base URL once it serves."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gptcli", "serve", "-m", str(model), "-b", "scripted", "--port", str(port), *flags],
        cwd=REPO,
        env={**os.environ, **env},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stderr.readline()  # "serving on http://…" (https with a certificate): the app has started
        scheme = "https" if "--ssl-certfile" in flags else "http"
        assert line.startswith(f"serving on {scheme}://127.0.0.1:{port} "), line + process.stderr.read()
        yield process, f"{scheme}://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        process.stderr.close()


def test_a_request_the_kv_budget_cannot_hold_names_max_tokens_not_a_cli_flag(runtime):
    with serve_runtime(runtime, kv_budget_tokens=64) as server:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}
        refused = httpx.post(server.v1 + "/chat/completions", json=body, timeout=30)
        error = error_of(refused)
        assert refused.status_code == 400 and error["param"] == "max_tokens", refused.text
        assert "KV budget is 64" in error["message"] and "--max-tokens" not in error["message"]
        body["max_tokens"] = 8
        assert httpx.post(server.v1 + "/chat/completions", json=body, timeout=30).status_code == 200
        newer = {"messages": body["messages"], "max_completion_tokens": 100}  # it named max_tokens, not sent
        error = error_of(httpx.post(server.v1 + "/chat/completions", json=newer, timeout=30))
        assert error["param"] == "max_completion_tokens" and error["message"].startswith("max_completion_tokens: ")


def test_a_prompt_that_alone_fills_the_kv_budget_says_to_shorten_it_not_to_ask_fewer_tokens(runtime):
    """'ask for fewer tokens' sent the client round in circles: with the prompt alone over the budget, even
    max_tokens 1 is refused. It is the prompt's error, as a prompt over the context is."""
    with serve_runtime(runtime, kv_budget_tokens=40) as server:
        body = {"messages": [{"role": "user", "content": "autumn leaves " * 20}], "max_tokens": 1}
        refused = httpx.post(server.v1 + "/chat/completions", json=body, timeout=30)
        error = error_of(refused)
        assert refused.status_code == 400 and error["param"] == "messages", refused.text
        assert error["code"] == "context_length_exceeded" and "KV budget (40)" in error["message"]
        assert "shorten" in error["message"] and "fewer tokens" not in error["message"]
        refused = httpx.post(server.v1 + "/completions", json={"prompt": "x " * 60, "max_tokens": 1}, timeout=30)
        assert refused.status_code == 400 and error_of(refused)["param"] == "prompt", refused.text


def test_max_model_len_is_what_one_request_may_hold_under_a_small_kv_budget(runtime):
    """Clients plan by max_model_len (summarize --url cuts its chunks to it, chat --url its window): with a
    --kv-budget under the model's context, the context was advertised, and every request past the budget was
    refused as too long (summarize --url sent its whole document in one call and failed, exit 6)."""
    context = runtime.backend.info.context_length
    budget = max(16, context // 2)
    with serve_runtime(runtime, kv_budget_tokens=budget) as server:
        card = httpx.get(server.v1 + "/models", timeout=30).json()["data"][0]
        assert card["max_model_len"] == budget < context
        counted = httpx.post(server.url + "/tokenize", json={"prompt": "hi"}, timeout=30).json()
        assert counted["max_model_len"] == budget
        [running] = httpx.get(server.url + "/api/ps", timeout=30).json()["models"]  # ollama's clients read these
        shown = httpx.post(server.url + "/api/show", json={"model": "tiny-llama"}, timeout=30).json()
        assert running["context_length"] == budget and f"num_ctx         {budget}" in shown["parameters"]
        assert shown["model_info"]["llama.context_length"] == context  # the model's own, as it was trained
        # what it advertises is what it takes: a prompt and reply that fill it are answered
        prompt = [5] * (budget - 4)
        body = {"prompt": prompt, "max_tokens": 4, "ignore_eos": True}
        answer = httpx.post(server.v1 + "/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["total_tokens"] == budget
    with serve_runtime(runtime) as server:  # a budget over the context: the context, as before
        assert httpx.get(server.v1 + "/models", timeout=30).json()["data"][0]["max_model_len"] == context


def test_another_sites_page_may_not_make_the_server_generate(live):
    """Any web page could POST to a keyless loopback server (a form or a no-cors fetch) and spend the machine."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    host = live.url.removeprefix("http://")
    for headers in (
        {"Origin": "https://evil.example"},  # an older browser: no Sec-Fetch-Site
        {"Origin": "null"},  # a sandboxed or file:// page
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Origin": "http://localhost:3000", "Sec-Fetch-Site": "same-site"},
    ):
        refused = httpx.post(live.v1 + "/chat/completions", json=body, headers=headers, timeout=30)
        assert refused.status_code == 403 and error_of(refused)["code"] == "cross_origin", (headers, refused.text)
    for headers in (
        {},  # curl, the SDKs
        {"Origin": live.url},  # the chat page itself
        {"Origin": "https://chat.example.com", "Sec-Fetch-Site": "same-origin", "Host": host},  # behind a proxy
    ):
        answered = httpx.post(live.v1 + "/chat/completions", json=body, headers=headers, timeout=30)
        assert answered.status_code == 200, (headers, answered.text)
    assert httpx.get(live.v1 + "/models", headers={"Origin": "https://evil.example"}).status_code == 200


def test_a_body_that_stops_coming_is_a_408_not_a_connection_held_forever():
    """A body shorter than its Content-Length (or one byte a minute) used to keep its task waiting forever."""
    import asyncio

    from gptcli.server.middleware import BodyLimit

    async def never_called(scope, receive, send):
        raise AssertionError("the app ran on a body that never came")

    def drive(idle_s: float, total_s: float, pieces: list[bytes], gap_s: float) -> list[dict]:
        sent: list[dict] = []

        async def receive():
            if pieces:
                await asyncio.sleep(gap_s)
                return {"type": "http.request", "body": pieces.pop(0), "more_body": True}
            await asyncio.sleep(3600)  # the rest never comes

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "headers": [(b"content-length", b"100")]}
        limit = BodyLimit(never_called, limit=1 << 20, idle_s=idle_s, total_s=total_s)
        asyncio.run(asyncio.wait_for(limit(scope, receive, send), timeout=30))
        return sent

    stalled = drive(0.2, 60, [b'{"prompt": '], 0.0)  # 11 bytes, then nothing
    assert stalled[0]["status"] == 408
    error = json.loads(stalled[1]["body"])["error"]
    assert error["code"] == "request_timeout" and "11 bytes arrived, 100 were due" in error["message"]
    trickle = drive(0.5, 0.6, [b"x"] * 20, 0.1)  # each byte in time, the whole too slow
    assert trickle[0]["status"] == 408


def test_key_limits_and_queue_in_a_real_process(tiny_models, llama_tok):
    flags = (
        "--api-key",
        "sesame",
        "--max-body",
        "2048",
        "--parallel",
        "1",
        "--max-queue",
        "0",
        "--log-level",
        "warning",
    )
    env = scripted_env(llama_tok, "one two three four five six seven eight nine ten", delay=0.1)
    with serve_process(tiny_models["llama"], *flags, env=env) as (_, url):
        assert httpx.get(url + "/health").status_code == 200  # open without the key
        assert httpx.get(url + "/").status_code == 200  # the page asks for the key itself
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = httpx.get(url + "/v1/models", headers=headers)
            assert refused.status_code == 401 and error_of(refused)["type"] == "authentication_error"
        assert httpx.get(url + "/metrics").status_code == 401
        key = {"Authorization": "Bearer sesame"}
        assert httpx.get(url + "/v1/models", headers=key).json()["data"][0]["id"] == "tiny-llama"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        # An over-size body: refused while reading, before parsing, with or without a Content-Length.
        big = b'{"prompt": "' + b"x" * 4096 + b'"}'
        too_big = httpx.post(url + "/v1/completions", content=big, headers=key)
        assert too_big.status_code == 413 and error_of(too_big)["code"] == "body_too_large"
        chunked = httpx.post(url + "/v1/completions", content=iter([big[:1000], big[1000:]]), headers=key)
        assert chunked.status_code == 413
        # --parallel 1 --max-queue 0: a request takes the free slot (before, 0 refused every request);
        # one that comes while the slot is taken finds no queue.
        client = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert client.completions.create(model="tiny-llama", prompt="hi", max_tokens=2).choices[0].text
        long = threading.Thread(target=client.completions.create, kwargs={"model": "tiny-llama", "prompt": "hi"})
        long.start()
        time.sleep(0.4)  # its ~11 steps of 0.1 s have begun
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model="tiny-llama", prompt="hi", max_tokens=2)
        long.join(30)
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"] == "1"


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
def test_sigterm_lets_the_request_in_flight_finish(tiny_models, llama_tok, stop):
    """SIGHUP (the terminal `gptcli serve` ran in closed) killed the server at once, the request in flight with
    it: uvicorn takes only SIGINT and SIGTERM. It now stops as gracefully as SIGTERM."""
    text = "Once upon a time there was a tiny model"
    env = scripted_env(llama_tok, text, delay=0.1)
    with serve_process(tiny_models["llama"], "--grace", "20", "--log-level", "warning", env=env) as (process, url):
        answer: dict[str, Any] = {}

        def ask() -> None:
            body = {"prompt": "x", "max_tokens": 50, "temperature": 0}
            answer["response"] = httpx.post(url + "/v1/completions", json=body, timeout=60)

        asking = threading.Thread(target=ask)
        asking.start()
        time.sleep(0.5)  # the request is in flight: ~10 steps of 0.1 s
        process.send_signal(getattr(signal, stop))
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # it no longer accepts connections
            httpx.get(url + "/health", timeout=2)
        asking.join(timeout=30)
        assert process.wait(timeout=30) == 0
        response = answer["response"]
        assert response.status_code == 200
        assert response.json()["choices"][0]["text"] == text
        assert response.json()["choices"][0]["finish_reason"] == "stop"


def test_sigterm_cancels_what_outlasts_the_grace(tiny_models, llama_tok):
    env = scripted_env(llama_tok, "autumn leaves " * 30, delay=0.1)  # ~60 tokens: 6 s of work
    with serve_process(tiny_models["llama"], "--grace", "0.5", "--log-level", "warning", env=env) as (process, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model="tiny-llama", prompt="x", max_tokens=100, stream=True)
        text = next(stream).choices[0].text
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        # The cut-off reply ends with an error event, which OpenAI's client raises: not a silent, short answer.
        with pytest.raises(openai.APIError, match="the server is shutting down"):
            for chunk in stream:
                assert chunk.choices[0].finish_reason is None
                text += chunk.choices[0].text
        assert time.monotonic() - signalled < 3.0  # the grace, then the engine cancelled it
        assert text and len(text) < len("autumn leaves " * 30)
        assert process.wait(timeout=10) == 0


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tiny_models, llama_tok):
    env = scripted_env(llama_tok, "autumn leaves " * 30, delay=0.1)
    with serve_process(tiny_models["llama"], "--grace", "30", "--log-level", "warning", env=env) as (process, url):
        body = {"prompt": "x", "max_tokens": 100, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            process.send_signal(signal.SIGINT)  # the first waits up to --grace for the reply
            time.sleep(0.3)
            signalled = time.monotonic()
            process.send_signal(signal.SIGINT)  # the second does not
            assert process.wait(timeout=10) == 130
            assert time.monotonic() - signalled < 3.0
            with pytest.raises(httpx.RemoteProtocolError):
                list(lines)
        log = process.stderr.read()
        assert "Traceback" not in log and log.strip().endswith("stopped at once: 1 request(s) in flight cut off")


def test_ctrl_c_stops_with_130(tiny_models, llama_tok):
    env = scripted_env(llama_tok, "hi")
    with serve_process(tiny_models["llama"], "--log-level", "warning", env=env) as (process, _):
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=15) == 130


def imported_after(statement: str, modules: tuple[str, ...]) -> list[str]:
    code = f"import sys; {statement}; print(' '.join(m for m in {modules!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return out.stdout.split()


def test_import_hygiene():
    # The CLI stays light (no web stack at import time); the server has no Typer or Rich.
    web = ("fastapi", "starlette", "uvicorn", "httpx", "torch")
    assert imported_after("import gptcli.cli.app, gptcli.cli.serve_cmd", web) == []
    assert imported_after("import gptcli.server.app, gptcli.server.serving, gptcli.remote", ("typer", "rich")) == []


def test_listening_beyond_loopback_needs_a_key():
    result = run_cli("serve", "--host", "0.0.0.0", "--port", "9")
    assert result.returncode == 2
    assert result.stderr.decode().startswith("error: listening on 0.0.0.0 would let anyone")
    assert "--insecure-no-key" in result.stderr.decode()


@pytest.mark.parametrize("key", ["", "café", " sesame", "tab\tkey", "two words"])
def test_an_api_key_no_client_could_send_is_a_usage_error_that_does_not_show_it(key):
    # Before: the server started, and then refused every client (or, empty, had no key at all).
    result = run_cli("serve", "--port", "9", "--api-key", key)
    assert result.returncode == 2
    stderr = result.stderr.decode()
    assert stderr.startswith("error: ") and re.search(r"api[- ]key", stderr, re.IGNORECASE)
    assert not key.strip() or key.strip() not in stderr


def test_a_busy_port_fails_before_loading(tiny_models):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        result = run_cli("serve", "-m", str(tiny_models["llama"]), "--port", str(port), timeout=60)
    assert result.returncode == 1
    assert re.match(rf"error: cannot listen on 127\.0\.0\.1:{port}: ", result.stderr.decode())


def test_a_base_models_chat_reply_ends_where_it_would_write_the_users_turn(tiny_models, tmp_path):
    """A model without a chat template gets a transcript: its reply went on with 'User: ...' (and so did a batch
    file's messages line)."""
    from gptcli.tokenizer import Tokenizer

    base = Tokenizer(tiny_models["gpt2"])
    env = scripted_env(base, "Hi there.\nUser: and who am I?")
    with serve_process(tiny_models["gpt2"], "--log-level", "warning", env=env) as (_, url):
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 40}
        answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=30).json()["choices"][0]
        assert answer["message"]["content"] == "Hi there." and answer["finish_reason"] == "stop", answer
    lines = tmp_path / "in.jsonl"
    lines.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "hello"}]}) + "\n")
    argv = ["generate", "--batch", str(lines), "-m", str(tiny_models["gpt2"]), "-b", "scripted", "-n", "40"]
    batch = subprocess.run(
        [sys.executable, "-m", "gptcli", *argv],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        timeout=120,
    )
    assert batch.returncode == 0, batch.stderr.decode()
    assert json.loads(batch.stdout.decode().splitlines()[0])["text"] == "Hi there."
