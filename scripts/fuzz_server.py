"""A seeded mutation fuzzer for the server's request handling and the batch line parser.

    .venv/bin/python scripts/fuzz_server.py --cases 3000 --seed 1

It starts from valid request bodies (chat and text completions, /tokenize, /detokenize: tools, response_format,
logprobs, logit_bias, stop, streams, echo, token-list prompts, vLLM's stopping options), mutates them (a key
dropped, duplicated or given another JSON type, a body wrapped in a list, cut short, not UTF-8, a wrong
Content-Type, deep nesting, huge arrays and strings, lone surrogates, NUL bytes) and sends each to the real app
over a tiny random-weight model, in process. The oracle: a documented status, OpenAI's error shape with a
one-line message, never a 500 or an exception, never a request over --timeout seconds, a well-formed SSE stream
that ends with [DONE]; every mutated batch line gives a result or a one-line error, never an exception. Each
failure is printed with its body (cut short) and the run exits 1; tests/test_server_fuzz.py runs a few hundred.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import re
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuzz_limits import Hang, rss_mib, time_limit

REPO = Path(__file__).resolve().parents[1]
STATUSES = {200, 400, 401, 403, 404, 408, 413, 503}
MAX_BODY = 1 << 20

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}, "days": {"type": "integer"}},
    "required": ["city"],
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.", "parameters": WEATHER}}]
CALLED = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
HI = [{"role": "user", "content": "Hello"}]
CORPUS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"model": "tiny", "messages": HI, "max_tokens": 4}),
    (
        "/v1/chat/completions",
        {"messages": HI, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}},
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
                {"role": "assistant", "content": None, "tool_calls": CALLED},
                {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"},
                {"role": "user", "content": "And tomorrow?"},
            ],
            "tools": TOOLS,
            "tool_choice": "auto",
            "parallel_tool_calls": False,
            "max_tokens": 8,
        },
    ),
    (
        "/v1/chat/completions",
        {"messages": HI, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    ),
    (
        "/v1/chat/completions",
        {
            "messages": HI,
            "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": True}},
            "max_completion_tokens": 12,
            "stream": True,
        },
    ),
    ("/v1/chat/completions", {"messages": HI, "response_format": {"type": "json_object"}, "max_tokens": 6}),
    (
        "/v1/chat/completions",
        {
            "messages": HI,
            "logprobs": True,
            "top_logprobs": 3,
            "logit_bias": {"5": 10, "7": -100},
            "temperature": 0.7,
            "top_p": 0.9,
            "seed": 3,
            "stop": ["\n", "END"],
            "max_tokens": 5,
        },
    ),
    (
        "/v1/chat/completions",
        {
            "messages": HI,
            "min_tokens": 2,
            "stop_token_ids": [5, 9],
            "include_stop_str_in_output": True,
            "max_tokens": 4,
            "top_k": 5,
            "min_p": 0.1,
            "repetition_penalty": 1.1,
            "frequency_penalty": 0.5,
            "presence_penalty": -0.5,
            "ignore_eos": True,
            "n": 1,
        },
    ),
    ("/v1/completions", {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 4, "echo": True}),
    ("/v1/completions", {"prompt": ["Once", "The capital"], "max_tokens": 3, "logprobs": 2, "stream": True}),
    ("/v1/completions", {"prompt": [5, 6, 7, 8], "max_tokens": 0, "echo": True, "logprobs": 1}),
    ("/v1/completions", {"prompt": [[5, 6], [7, 8]], "max_tokens": 2, "stop": "END", "min_tokens": 1}),
    ("/tokenize", {"prompt": "Hello there", "add_special_tokens": False}),
    ("/tokenize", {"content": "Hello", "with_pieces": True, "add_special": True}),
    ("/tokenize", {"messages": HI, "tools": TOOLS, "response_format": {"type": "json_object"}}),
    ("/detokenize", {"model": "tiny", "tokens": [5, 6, 7]}),
    # vLLM's and llama-server's structured output, assistant prefill, the Responses API
    ("/v1/chat/completions", {"messages": HI, "structured_outputs": {"choice": ["yes", "no"]}, "max_tokens": 4}),
    ("/v1/chat/completions", {"messages": HI, "guided_regex": "[0-9]{2}", "stream": True}),
    ("/v1/completions", {"prompt": "Hi", "grammar": 'root ::= "a" | "b"', "max_tokens": 3}),
    ("/v1/completions", {"prompt": "Hi", "json_schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}),
    (
        "/v1/chat/completions",
        {"messages": [*HI, {"role": "assistant", "content": "Well,"}], "continue_final_message": True, "max_tokens": 4},
    ),
    ("/tokenize", {"messages": [*HI, {"role": "assistant", "content": "So"}], "add_generation_prompt": False}),
    ("/v1/responses", {"model": "tiny", "input": "Hello", "instructions": "Be brief.", "max_output_tokens": 4}),
    (
        "/v1/responses",
        {
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
            "stream": True,
            "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}}},
            "max_output_tokens": 6,
        },
    ),
    (
        "/v1/responses",
        {
            "input": [
                {"role": "user", "content": "Weather?"},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            ],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            "tool_choice": "auto",
            "max_output_tokens": 8,
        },
    ),
    ("/v1/responses/input_tokens", {"input": "Hello there", "instructions": "Be brief."}),
    # ollama's own API (its answers stream as JSON lines by default; its errors are {"error": "..."})
    ("/api/chat", {"model": "tiny", "messages": HI, "options": {"temperature": 0.5, "num_predict": 4, "seed": 1}}),
    ("/api/chat", {"model": "default", "messages": HI, "stream": False, "format": "json", "options": {"top_k": 3}}),
    (
        "/api/chat",
        {"model": "tiny:latest", "messages": HI, "tools": TOOLS, "stream": False, "options": {"num_predict": 24}},
    ),
    ("/api/generate", {"model": "tiny", "prompt": "Once", "system": "Be brief.", "options": {"num_predict": 3}}),
    ("/api/generate", {"model": "tiny", "prompt": "Once", "raw": True, "stream": False, "context": [5, 6]}),
    ("/api/show", {"model": "tiny"}),
]

DEEP = 10_000


DEEP_MARK = "@deep:"  # a string that serialize() writes as a list nested that deep (json.dumps would recurse)


def serialize(value: Any, *, ascii_only: bool = True) -> bytes:
    """JSON bytes, lone surrogates kept as they are, each DEEP_MARK string as its nested list."""
    raw = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    return re.sub(rb'"' + DEEP_MARK.encode() + rb'(\d+)"', lambda m: b"[" * int(m[1]) + b"]" * int(m[1]), raw)


def odd_values(rng: random.Random) -> Any:
    """A value of another JSON type or an awkward one of the same type."""
    choices: list[Any] = [
        None,
        True,
        False,
        0,
        -1,
        1,
        2**64,
        -(2**63),
        1e308,
        -1e308,
        0.5,
        "",
        "5",
        "auto",
        "\ud800",
        "a\x00b",
        [],
        {},
        [None],
        [1, "a"],
        {"type": "function"},
        {"": None},
        f"{DEEP_MARK}{rng.choice([50, 500, 900, 990, 2000, DEEP])}",
        "x" * rng.choice([1000, 100_000]),
        [0] * rng.choice([100, 10_000]),
        [{"role": "user", "content": "a"}] * 200,
        [HI[0], {"role": "bogus", "content": "x"}],
        {"type": "json_schema", "json_schema": {"schema": {"type": "array", "items": [[[]]]}}},
    ]
    return copy.deepcopy(rng.choice(choices))


def same_type(value: Any, rng: random.Random) -> Any:
    """Another value of `value`'s JSON type, often at an edge (the mutations that reach generation)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([0, 1, 2, 20, 21, 63, 64, 65, 127, 128, 399, 400, 2047, 2048, 10**9, 2**63 - 1, -2])
    if isinstance(value, float):
        return rng.choice([0.0, 1e-308, 5e-324, 0.999999, 1.0, 2.0, 2.000001, 100.0, -100.0])
    if isinstance(value, str):
        return rng.choice(
            ["", " ", "\n", "🙂", "中文", "<|im_end|>", "<|endoftext|>", "END", "a" * 300, "\u200b", value * 3]
        )
    if isinstance(value, list):
        return rng.choice([[], value * rng.choice([2, 16, 65]), value[:1], value[::-1]])
    if isinstance(value, dict):
        return rng.choice([{}, {**value, "extra": 1}])
    return value


def paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path to a value inside `value` (dict keys and list indexes), the root included."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*prefix, key))
    elif isinstance(value, list) and len(value) < 50:
        for index, item in enumerate(value):
            yield from paths(item, (*prefix, index))


def value_at(value: Any, path: tuple) -> Any:
    for part in path:
        value = value[part]
    return value


def set_at(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    parent = value
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = new
    return value


def drop_at(value: Any, path: tuple) -> Any:
    if not path:
        return value
    parent = value
    for part in path[:-1]:
        parent = parent[part]
    del parent[path[-1]]
    return value


@dataclass
class Case:
    route: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    what: str = ""


def mutate(rng: random.Random) -> Case:
    route, base = rng.choice(CORPUS)
    body = copy.deepcopy(base)
    steps = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        where = rng.choice(list(paths(body)))
        kind = rng.random()
        if kind < 0.2 and where:
            body = drop_at(body, where)
            steps.append(f"drop {where}")
        elif kind < 0.3 and where:
            parent = body
            for part in where[:-1]:
                parent = parent[part]
            body = set_at(body, where, [parent[where[-1]]] * rng.choice([2, 3]))
            steps.append(f"wrap {where}")
        elif kind < 0.35:
            key = rng.choice(["stream", "logprobs", "echo", "tools", "response_format", "stream_options", "prompt"])
            if isinstance(body, dict):
                body[key] = odd_values(rng) if rng.random() < 0.5 else True
                steps.append(f"add {key}")
        elif kind < 0.65:
            body = set_at(body, where, same_type(value_at(body, where), rng))
            steps.append(f"edge {where}")
        else:
            body = set_at(body, where, odd_values(rng))
            steps.append(f"set {where}")
    raw = serialize(body, ascii_only=rng.random() < 0.8)
    headers = {"Content-Type": "application/json"}
    roll = rng.random()
    if roll < 0.05:
        raw = serialize([body])
        steps.append("list body")
    elif roll < 0.09:
        raw = raw[: rng.randrange(len(raw) + 1)]
        steps.append("cut short")
    elif roll < 0.12:
        at = rng.randrange(len(raw) + 1)
        raw = raw[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"]) + raw[at:]
        steps.append("bad bytes")
    elif roll < 0.15:
        headers = {
            "Content-Type": rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
        }
        steps.append("content type")
    elif roll < 0.17 and raw.startswith(b"{") and len(raw) > 2:
        first = next(iter(body)) if isinstance(body, dict) and body else None
        if first is not None:
            raw = b"{" + json.dumps(first).encode() + b": " + serialize(odd_values(rng)) + b", " + raw[1:]
            steps.append(f"duplicate {first!r}")
    elif roll < 0.19:
        raw = rng.choice([b"", b"null", b"[]", b"0", b'"x"', b"NaN", b"{", b"\xff\xfe", b"{}" * 3, b"1e999"])
        steps.append("not an object")
    elif roll < 0.2:
        raw = b"[" * DEEP + b"]" * DEEP
        steps.append("deep body")
    return Case(route, raw, headers, "; ".join(steps))


def error_problems(payload: Any) -> list[str]:
    """What is wrong with an error body, against OpenAI's shape with a one-line message."""
    if not isinstance(payload, dict) or set(payload) != {"error"} or not isinstance(payload["error"], dict):
        return [f"not OpenAI's error shape: {str(payload)[:200]}"]
    error = payload["error"]
    message = error.get("message")
    problems = []
    if set(error) != {"message", "type", "param", "code"}:
        problems.append(f"error keys {sorted(error)}")
    if not isinstance(message, str) or not message or "\n" in message:
        problems.append(f"message is not one line: {message!r:.300}")
    elif "Traceback" in message or len(message) > 2000:
        problems.append(f"message looks like a traceback or is huge: {message[:300]!r}")
    return problems


RESPONSE_ENDS = ("response.completed", "response.incomplete", "response.failed")  # the Responses API's last event


def named_stream_problems(events: list[str]) -> list[str]:
    """The Responses API's stream: `event: NAME` then `data: {...}` (its type NAME) each, ending in RESPONSE_ENDS."""
    names = []
    for event in events:
        head, _, data = event.partition("\n")
        if not (head.startswith("event: ") and data.startswith("data: ")):
            return [f"not a named SSE event: {event[:200]!r}"]
        try:
            payload = json.loads(data[6:])
        except ValueError:
            return [f"an event is not JSON: {event[:200]!r}"]
        if payload.get("type") != head[7:]:
            return [f"an event's type is not its name: {event[:200]!r}"]
        names.append(head[7:])
    if not names or names[-1] not in RESPONSE_ENDS:
        return [f"the stream does not end with one of {RESPONSE_ENDS}: {names[-3:]}"]
    return []


def stream_problems(text: str) -> list[str]:
    events = text.split("\n\n")
    if events and events[-1] == "":
        events.pop()
    if events and events[0].startswith("event: "):
        return named_stream_problems(events)
    if not events or events[-1] != "data: [DONE]":
        return [f"the stream does not end with [DONE]: {text[-300:]!r}"]
    for event in events[:-1]:
        if not event.startswith("data: "):
            return [f"not an SSE data event: {event[:200]!r}"]
        try:
            payload = json.loads(event[6:])
        except ValueError:
            return [f"an event is not JSON: {event[:200]!r}"]
        if "error" in payload:
            return error_problems(payload)
    return []


def ollama_error_problems(payload: Any) -> list[str]:
    """ollama's error body: {"error": "one line"}."""
    if not isinstance(payload, dict) or set(payload) != {"error"} or not isinstance(payload["error"], str):
        return [f"not ollama's error shape: {str(payload)[:200]}"]
    message = payload["error"]
    if not message or "\n" in message or "Traceback" in message or len(message) > 2000:
        return [f"message is not one short line: {message[:300]!r}"]
    return []


def ndjson_problems(text: str) -> list[str]:
    """ollama's stream: JSON lines, the last one done (or an error line)."""
    lines = [line for line in text.split("\n") if line]
    try:
        payloads = [json.loads(line) for line in lines]
    except ValueError:
        return [f"a line of the stream is not JSON: {text[-300:]!r}"]
    if not payloads:
        return ["an empty stream"]
    last = payloads[-1]
    if "error" in last:
        return ollama_error_problems(last)
    return [] if last.get("done") is True else [f"the stream does not end with done: {lines[-1][:200]!r}"]


def response_problems(status: int, headers: Any, content: bytes, streamed: bool, ollama: bool = False) -> list[str]:
    if status not in STATUSES | ({405} if ollama else set()):
        return [f"status {status}: {content[:300]!r}"]
    kind = headers.get("content-type", "")
    if status == 200 and kind.startswith("text/event-stream"):
        return stream_problems(content.decode("utf-8"))
    if status == 200 and kind.startswith("application/x-ndjson"):
        return ndjson_problems(content.decode("utf-8"))
    try:
        payload = json.loads(content)
    except ValueError:
        return [f"status {status} with a body that is not JSON: {content[:300]!r}"]
    if status != 200:
        return ollama_error_problems(payload) if ollama else error_problems(payload)
    if streamed:
        return ["asked for a stream, got JSON"]
    return []


def widen_context(folder: Path) -> Path:
    """The tiny random Llama in `folder`, its context widened to 2,048 (tools' prompts are long)."""
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    return folder


def serving_model(root: Path) -> Path:
    """The test suite's tiny random Llama, made in `root`, its context widened."""
    sys.path.insert(0, str(REPO))
    from tests.conftest import build_tiny_models

    return widen_context(build_tiny_models(root)["llama"])


@contextmanager
def app_client(model: Path) -> Iterator[Any]:
    """A TestClient over the real app and engine (max_tokens defaults to 16, so a mutated request stays quick)."""
    from starlette.testclient import TestClient

    from gptcli.config import SamplingConfig, Settings
    from gptcli.engine import Engine, EngineLimits
    from gptcli.runtime import open_runtime
    from gptcli.server.app import ServerConfig, create_app
    from gptcli.server.metrics import Metrics
    from gptcli.server.state import ServerState

    runtime = open_runtime(Settings(model=str(model)), lambda message: None)
    engine = Engine(runtime.backend, runtime.tokenizer, EngineLimits(max_running=4))
    state = ServerState(
        engine=engine,
        tokenizer=runtime.tokenizer,
        model_name="tiny",
        context_length=runtime.backend.info.context_length,
        defaults=SamplingConfig(max_tokens=16),
        metrics=Metrics(engine.snapshot),
    )
    app = create_app(state, ServerConfig(max_body_bytes=MAX_BODY))
    with TestClient(app, raise_server_exceptions=True) as client:
        client.runtime = runtime  # type: ignore[attr-defined]
        yield client


class LoggedErrors(logging.Handler):
    """Log records at ERROR or with a traceback (asyncio's "exception was never retrieved", uvicorn's ...)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(f"{record.name}: {record.getMessage()[:300]}")


@dataclass
class Failure:
    case: Case
    problems: list[str]

    def __str__(self) -> str:
        return f"{self.case.route} [{self.case.what}] {self.case.body[:400]!r}\n    " + "\n    ".join(self.problems)


def send(client: Any, case: Case, timeout: float, statuses: Counter[int]) -> list[str]:
    try:
        streams = case.route.startswith("/v1/") and not case.route.endswith("/input_tokens")  # a count never streams
        streamed = streams and json.loads(case.body).get("stream") is True
    except Exception:  # any body
        streamed = False
    started = time.monotonic()
    try:
        with time_limit(timeout):
            response = client.post(case.route, content=case.body, headers=case.headers)
    except Hang as exc:
        return [f"hang: {exc}"]
    except Exception:  # the point: nothing may escape the app
        return ["an exception escaped the app: " + traceback.format_exc(limit=-4).replace("\n", " | ")[-1500:]]
    statuses[response.status_code] += 1
    ollama = case.route.startswith("/api/")
    problems = response_problems(response.status_code, response.headers, response.content, streamed, ollama)
    if time.monotonic() - started > timeout:
        problems.append(f"took {time.monotonic() - started:.1f} s")
    return problems


def fuzz_server(
    client: Any, cases: int, seed: int, timeout: float = 10.0, statuses: Counter[int] | None = None
) -> list[Failure]:
    statuses = Counter() if statuses is None else statuses
    rng = random.Random(seed)
    logged = LoggedErrors()
    logging.getLogger().addHandler(logged)
    failures = []
    try:
        for _ in range(cases):
            case = mutate(rng)
            problems = send(client, case, timeout, statuses)
            if logged.records:
                problems += [f"logged: {line}" for line in logged.records]
                logged.records.clear()
            if problems:
                failures.append(Failure(case, problems))
    finally:
        logging.getLogger().removeHandler(logged)
    return failures


BATCH_CORPUS: list[dict[str, Any]] = [
    {"id": "a", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0.5, "stop": ["\n"]},
    {"prompt": "Hi", "system": "Be brief.", "seed": 3, "top_k": 4, "min_p": 0.1, "min_tokens": 1},
    {"prompt": "Hi", "raw": True, "stop_token_ids": [5], "include_stop_str_in_output": True},
    {"id": 7, "messages": HI, "response_format": {"type": "json_object"}},
    {"messages": [*HI, {"role": "assistant", "content": None, "tool_calls": CALLED}], "tools": TOOLS},
    {"messages": HI, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": True},
    {"prompt": "Hi", "structured_outputs": {"regex": "[a-z]+"}, "max_tokens": 4},
    {"messages": HI, "guided_choice": ["yes", "no"]},
    {"messages": [*HI, {"role": "assistant", "content": "Well,"}], "continue_final_message": True},
]


def mutate_line(rng: random.Random) -> bytes:
    line = copy.deepcopy(rng.choice(BATCH_CORPUS))
    for _ in range(rng.choice([1, 2])):
        where = rng.choice(list(paths(line)))
        roll = rng.random()
        if where and roll < 0.3:
            line = drop_at(line, where)
        else:
            value = odd_values(rng) if roll > 0.6 else same_type(value_at(line, where), rng)
            line = set_at(line, where, value)
    raw = serialize(line, ascii_only=rng.random() < 0.5)
    roll = rng.random()
    if roll < 0.05:
        raw = raw[: rng.randrange(len(raw) + 1)]
    elif roll < 0.08:
        raw = raw.replace(b'"', b"\xff", 1)
    elif roll < 0.1:
        raw = b"[" * DEEP + b"]" * DEEP
    return raw


def fuzz_batch(runtime: Any, cases: int, seed: int) -> list[Failure]:
    """Mutated batch lines through batch_requests.parse_request: a request or a one-line error, never raising."""
    from gptcli.batch_requests import error_record, parse_request
    from gptcli.config import Settings

    rng = random.Random(seed)
    settings = Settings(model="tiny")
    context = runtime.backend.info.context_length
    failures = []
    for number in range(cases):
        raw = mutate_line(rng)
        case = Case("batch line", raw)
        try:
            with time_limit(10.0):
                request = parse_request(number, raw, runtime.tokenizer, settings, context)
        except (Exception, Hang):  # the point: a line never raises, nor runs past its bound
            trace = traceback.format_exc(limit=-4).replace("\n", " | ")[-1500:]
            failures.append(Failure(case, [f"parse_request raised: {trace}"]))
            continue
        if request.error is not None and ("\n" in request.error or not request.error.strip()):
            failures.append(Failure(case, [f"the error is not one line: {request.error[:300]!r}"]))
        try:  # as the results file is written: UTF-8
            json.dumps(error_record(request.id, request.error or ""), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            failures.append(Failure(case, [f"its result cannot be written: {exc}"]))
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000, help="server requests to send (default 2000)")
    parser.add_argument("--batch-cases", type=int, default=None, help="batch lines to parse (default: --cases)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds a request may take (default 10)")
    parser.add_argument("--max-rss-growth", type=float, default=1024, help="MiB the process may grow by (1024)")
    args = parser.parse_args()
    sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    with tempfile.TemporaryDirectory() as folder:
        model = serving_model(Path(folder))
        before = rss_mib()
        with app_client(model) as client:
            started = time.monotonic()
            statuses: Counter[int] = Counter()
            failures = fuzz_server(client, args.cases, args.seed, args.timeout, statuses)
            batch_cases = args.cases if args.batch_cases is None else args.batch_cases
            failures += fuzz_batch(client.runtime, batch_cases, args.seed)
    for failure in failures:
        print(failure)
    print(
        f"{args.cases} requests and {batch_cases} batch lines (seed {args.seed}) in "
        f"{time.monotonic() - started:.0f} s: {len(failures)} failures; "
        f"peak RSS {rss_mib():.0f} MiB (from {before:.0f}); statuses {dict(sorted(statuses.items()))}"
    )
    if (grown := rss_mib() - before) > args.max_rss_growth:  # coarse: a request that ate memory unbounded
        print(f"the process grew by {grown:.0f} MiB, over --max-rss-growth {args.max_rss_growth:g}")
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
