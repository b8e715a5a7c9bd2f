"""gptcli.remote: the same events from any OpenAI-compatible server as from the local loop; errors as GptcliErrors.

The happy paths run against `gptcli serve`'s app on the tiny Llama; the failures against a canned
server (stdlib http.server) that answers what a real one might, so they need no model at all.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar

import pytest

from gptcli.config import SamplingConfig
from gptcli.decoding import Finished, Token
from gptcli.errors import ContextLengthError, InputError, ModelError, RemoteError
from gptcli.remote import RemoteModel
from gptcli.remote_http import open_httpx, open_urllib
from gptcli.remote_tokens import ServedTokenizer
from tests.conftest import http_server
from tests.test_server import PROMPTS, free_port, reference, serve_runtime

pytest.importorskip("fastapi")
OPENERS = {"httpx": open_httpx, "urllib": open_urllib}
GREEDY = SamplingConfig(temperature=0.0, max_tokens=10)


@pytest.fixture(scope="module")
def runtime(tiny_models):
    from gptcli.config import Settings
    from gptcli.runtime import open_runtime

    return open_runtime(Settings(model=str(tiny_models["llama"])), lambda message: None)


@pytest.fixture(scope="module")
def live(runtime):
    with serve_runtime(runtime, max_running=4) as server:
        yield server


@pytest.fixture(params=sorted(OPENERS))
def opener(request):
    if request.param == "httpx":
        pytest.importorskip("httpx")
    return OPENERS[request.param]


def test_chat_yields_the_local_loops_events(live, runtime, opener):
    expected = reference(runtime, PROMPTS[0], 10)
    model = RemoteModel(live.v1, api_key="unused", opener=opener)
    events = list(model.chat([{"role": "user", "content": PROMPTS[0]}], GREEDY))
    tokens, finished = events[:-1], events[-1]
    assert all(isinstance(e, Token) for e in tokens) and isinstance(finished, Finished)
    assert "".join(t.text for t in tokens) == finished.text == expected.text
    assert finished.reason == expected.reason
    assert finished.stats.prompt_tokens == expected.stats.prompt_tokens
    assert finished.stats.new_tokens == expected.stats.new_tokens
    assert finished.stats.total_s >= finished.stats.ttft_s > 0


def test_complete_sends_raw_text(live, runtime, opener):
    expected = reference(runtime, PROMPTS[1], 10, raw=True)
    model = RemoteModel(live.v1, opener=opener)
    *_, finished = model.complete(PROMPTS[1], GREEDY)
    assert finished.text == expected.text
    assert finished.stats.prompt_tokens == expected.stats.prompt_tokens


def test_the_openai_penalties_go_to_the_server(live, runtime, opener):
    from dataclasses import replace

    from gptcli.engine import generate
    from gptcli.prompts import encode_prompt

    params = replace(GREEDY, max_tokens=24, presence_penalty=2.0, frequency_penalty=2.0, repetition_stop=False)
    ids = encode_prompt(runtime.tokenizer, PROMPTS[0], raw=True).ids
    *_, expected = generate(runtime.backend, runtime.tokenizer, ids, params)
    *_, finished = RemoteModel(live.v1, opener=opener).complete(PROMPTS[0], params)
    assert finished.text == expected.text != reference(runtime, PROMPTS[0], 24, raw=True).text


def test_model_discovery_and_context(live):
    model = RemoteModel(live.v1)
    assert model.model == "tiny-llama"
    assert model.context_length == 128


def test_the_servers_own_tokenizer_counts_as_the_model_does(live, runtime, opener, monkeypatch):
    import gptcli.remote_tokens as remote_tokens

    served = ServedTokenizer.probe(RemoteModel(live.v1, opener=opener))
    assert served is not None and served.field == "prompt"  # gptcli serve reads vLLM's shape
    text = " ".join(PROMPTS) + "\n\nThe end, naïvely — 🎉."
    ids = runtime.tokenizer.encode(text, add_special_tokens=False)
    assert served.encode(text) == ids and served.decode(ids) == runtime.tokenizer.decode(ids)
    monkeypatch.setattr(remote_tokens, "PIECE_CHARS", 16)  # a long text goes in pieces, cut before spaces
    assert ServedTokenizer.probe(RemoteModel(live.v1, opener=opener)).encode(text) == ids
    assert served.decode([]) == ""
    # A model the server does not serve: its 404 was taken for "no /tokenize" (a false note before the error).
    with pytest.raises(ModelError, match=r"answered 404: the model 'gpt-9' does not exist"):
        ServedTokenizer.probe(RemoteModel(live.v1, model="gpt-9", opener=opener))


def test_server_errors_from_gptcli_serve(live, opener):
    with pytest.raises(ModelError, match=r"answered 404: the model 'gpt-9' does not exist"):
        list(RemoteModel(live.v1, model="gpt-9", opener=opener).complete("hi", GREEDY))
    too_long = RemoteModel(live.v1, opener=opener).chat([{"role": "user", "content": "autumn " * 300}], GREEDY)
    with pytest.raises(InputError, match=r"answered 400: This model's maximum context length is \d+ tokens"):
        list(too_long)


def test_a_url_without_its_v1_is_the_urls_error_not_an_unknown_model(live, opener):
    # gptcli serve's 404 for /models names "/models", and was taken for an unknown model: exit 5 and a hint to
    # list the models at the very URL that has none, where the fix is to add /v1 (QA)
    for url in (live.url, live.url + "/api"):
        with pytest.raises(RemoteError, match=r"answered 404: /(api/)?models is not supported") as raised:
            RemoteModel(url, opener=opener).model  # noqa: B018
        assert not isinstance(raised.value, ModelError) and raised.value.hint == "the URL usually ends in /v1"
    with pytest.raises(ModelError):  # an unknown model is still one
        list(RemoteModel(live.v1, model="gpt-9", opener=opener).complete("hi", GREEDY))


def test_a_connection_that_never_opens_is_said_so_not_a_server_slow_to_answer():
    # httpx's connect timeout (10 s) read "did not answer in 30 s" (--timeout's or the lookup's seconds, not the
    # 10 s waited), with the hint of an overloaded server, for a host that never took the connection (QA)
    pytest.importorskip("httpx")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepted: once its backlog is full, a new connection waits for nothing
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        try:
            model = RemoteModel(f"http://127.0.0.1:{port}/v1", opener=open_httpx, timeout=30, connect_timeout=0.5)
            started = time.monotonic()
            with pytest.raises(RemoteError, match=r"cannot connect to .*: no connection in 0.5 s") as raised:
                model.model  # noqa: B018
            assert time.monotonic() - started < 10 and "is the server running?" in (raised.value.hint or "")
        finally:
            for filler in fillers:
                filler.close()


# ------------------------------------------------------------------------------ a canned server


class Canned(BaseHTTPRequestHandler):
    """Answers by path; records the headers it was sent."""

    seen: ClassVar[list[dict[str, str]]] = []
    busy: ClassVar[dict[str, int]] = {}  # busy answers given, by route

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None, **headers: str) -> None:
        body = {"error": {"message": message, "type": "x", "param": None, "code": code}}
        self._send(status, json.dumps(body).encode(), headers)

    def _stream(self, events: list[str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for event in events:
            self.wfile.write(event.encode())
            self.wfile.flush()

    def _tokenizer(self, route: str, body: dict[str, Any]) -> None:
        """llama-server's /tokenize and /detokenize (one id a character) on route "llamacpp"; else no such route."""
        if route != "llamacpp":
            self._error(404, "File Not Found")
        elif self.path.endswith("/detokenize"):
            self._send(200, json.dumps({"content": "".join(chr(i) for i in body["tokens"])}).encode())
        else:  # llama-server reads `content` only: a `prompt` gets no tokens
            self._send(200, json.dumps({"tokens": [ord(c) for c in body.get("content", "")]}).encode())

    def _drip(self, status: int, content_type: str, start: bytes) -> None:
        """`start`, then a byte every 50 ms for 3 s: each read waits little, the answer never ends in time."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(start) + 60))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client gave up
            self.wfile.write(start)
            for _ in range(60):
                self.wfile.flush()
                time.sleep(0.05)
                self.wfile.write(b"x")

    def _endless(self, event: str, pause: float = 0.0) -> None:
        """`event` again and again, a stream that never ends (for 20 s at most, or until the client leaves)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        until = time.monotonic() + 20
        with contextlib.suppress(OSError):
            while time.monotonic() < until:
                self.wfile.write(event.encode())
                self.wfile.flush()
                time.sleep(pause)

    def do_GET(self) -> None:
        Canned.seen.append(dict(self.headers))
        if self.path.startswith("/drip/"):
            self._drip(200, "application/json", b'{"object": "list", "data": [')
            return
        if self.path.startswith("/slow/"):
            time.sleep(3)
        cards = {"null-id": [{"id": None}, {"id": "second"}], "no-id": [{"id": None}, {"object": "model"}]}
        cards |= {f"context-{n}": [{"id": "canned", "max_model_len": json.loads(n)}] for n in ("-5", "true", "2048")}
        # llama-server: its slot's context under meta (n_ctx_train is the model's, more than a slot may hold)
        cards["llama-server"] = [{"id": "m.gguf", "meta": {"n_ctx": 1024, "n_ctx_train": 8192, "n_vocab": 49152}}]
        data = cards.get(self.path.split("/")[1], [{"id": "canned", "object": "model"}])
        self._send(200, json.dumps({"object": "list", "data": data}).encode())

    def do_POST(self) -> None:
        Canned.seen.append(dict(self.headers))
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        route = self.path.split("/")[1]
        if self.path.endswith("tokenize"):
            self._tokenizer(route, body)
            return
        chunk = 'data: {"choices":[{"index":0,"text":"Hel","finish_reason":null}]}\n\n'
        if route == "unauthorized":
            self._error(401, "invalid API key", "invalid_api_key")
        elif route == "busy":
            self._error(503, "120 requests are already waiting", "queue_full", **{"Retry-After": "7"})
        elif route.startswith("busy-then-ok") and Canned.busy.get(route, 0) < 2:  # twice busy, then a stream
            Canned.busy[route] = Canned.busy.get(route, 0) + 1
            self._error(503, "2 requests are already waiting", "queue_full", **{"Retry-After": "0.2"})
        elif route == "bad":
            self._error(400, "temperature: must be <= 2")
        elif route == "vllm-bad":  # vLLM's ErrorResponse: the message at the top, beside object "error"
            body = {
                "object": "error",
                "message": "temperature must be non-negative, got -1.0.",
                "type": "BadRequestError",
            }
            self._send(400, json.dumps({**body, "param": None, "code": 400}).encode())
        elif route == "drip":  # a stream whose first line never ends
            self._drip(200, "text/event-stream", b'data: {"choices": [{"index": 0, "text": "')
        elif route == "drip-error":
            self._drip(500, "application/json", b'{"error": {"message": "')
        elif route == "html":
            self._send(502, b"<html>Bad Gateway</html>", {"Content-Type": "text/html"})
        elif route == "web-server":  # python -m http.server's 404: not an OpenAI-compatible server at all
            page = b'<!DOCTYPE HTML>\n<html lang="en">\n<head><title>Error response</title></head><body>404</body>'
            self._send(404, page, {"Content-Type": "text/html"})
        elif route == "slow":
            time.sleep(3)
            with contextlib.suppress(OSError):  # the client gave up long ago
                self._error(500, "too late")
        elif route == "midway-error":
            self._stream([chunk, 'data: {"error":{"message":"the engine failed"}}\n\n'])
        elif route == "null-error":  # "error": null on every chunk: no error at all
            end = '{"choices":[{"index":0,"text":"lo","finish_reason":"stop"}],"error":null}'
            self._stream([chunk.replace("}]}", '}],"error":null}'), f"data: {end}\n\n", "data: [DONE]\n\n"])
        elif route == "whole":  # a server that ignores "stream": true and sends the whole answer
            choice = (
                {"message": {"content": "hi"}} if "/chat/" in self.path else {"text": "hi", "finish_reason": "length"}
            )
            self._send(200, json.dumps({"choices": [choice], "usage": {"completion_tokens": 2}}).encode())
        elif route == "cut":
            self._stream([chunk])
        elif route == "cut-mid-line":  # the connection closes in the middle of a chunk
            self._stream([chunk, 'data: {"choices":[{"index":0,"te'])
        elif route.startswith("retry-after-"):  # a Retry-After that is no number of seconds
            after = {"retry-after-date": "Wed, 21 Oct 2015 07:28:00 GMT", "retry-after-word": "soon"}[route]
            self._error(429, "slow down", **{"Retry-After": after, "Connection": "close"})
        elif route == "traceback":  # a server that sends its whole traceback (or echoes a prompt) as the message
            self._error(500, "Traceback (most recent call last):\n" + '  File "x.py", line 1\n' * 500)
        elif route == "long-context":  # the prompt echoed first, the words that say what failed past 200 characters
            self._error(400, "prompt '" + "hi " * 100 + "' is too long: over the model's context length of 2048")
        elif route == "midway-traceback":
            traceback = json.dumps({"error": {"message": "boom\n" + "frame\n" * 2000}})
            self._stream([chunk, f"data: {traceback}\n\n"])
        elif route == "listed-message":  # a message that is not a string
            self._send(500, json.dumps({"error": {"message": ["engine", "failed"], "code": 500}}).encode())
        elif route == "gzip":  # compressed though the client did not ask (a proxy's doing)
            end = 'data: {"choices":[{"index":0,"text":"lo","finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
            body = gzip.compress((chunk + end).encode())
            self._send(200, body, {"Content-Type": "text/event-stream", "Content-Encoding": "gzip"})
        elif route == "labelled-json":  # a stream whose Content-Type a proxy made application/json
            end = 'data: {"choices":[{"index":0,"text":"lo","finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
            self._send(200, (": ok\n\n" + chunk + end).encode())
        elif route == "unlabelled-whole":  # a whole answer, though a stream was asked, labelled as text
            choice = {"index": 0, "text": "hi", "finish_reason": "length"}
            answer = {"choices": [choice], "usage": {"completion_tokens": 2}}
            self._send(200, json.dumps(answer, indent=2).encode(), {"Content-Type": "text/plain"})
        elif route == "moved":  # a proxy's redirect (http to https, a new host): the body is the proxy's page
            moved = "https://new.example/v1" + self.path.removeprefix("/moved/v1")
            self._send(301, b"<html>Moved</html>", {"Location": moved})
        elif route == "moved-far":  # a Location of 5,000 characters
            self._send(302, b"", {"Location": "https://new.example/" + "a" * 5000 + "/v1/completions"})
        elif route == "endless":  # max_tokens is the server's to keep: this one never stops
            self._endless(chunk)
        elif route == "endless-empty":  # nor this one, of chunks without text
            self._endless('data: {"choices":[]}\n\n')
        elif route == "endless-text":  # a long text in each chunk
            self._endless(chunk.replace("Hel", "x" * 4000))
        elif route == "keep-alive":  # comments, and never a chunk
            self._endless(": keep-alive\n\n", pause=0.05)
        elif route == "garbled":  # a text that is not a string: a proxy or a server of another API
            self._stream([chunk, 'data: {"choices":[{"index":0,"text":["lo"]}]}\n\n'])
        elif route == "odd-usage":  # counts that are not counts: the text still stands, the stats estimate
            usage = '{"prompt_tokens":3,"completion_tokens":"two","prompt_tokens_details":[4]}'
            end = '{"choices":[{"index":0,"text":"lo","finish_reason":"stop"}],"usage":' + usage + "}"
            self._stream([chunk, f"data: {end}\n\n", "data: [DONE]\n\n"])
        else:  # a well-behaved stream, with comments and CRLF line ends as some servers send them
            usage = '{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}'
            self._stream(
                [
                    ": keep-alive\r\n\r\n",
                    chunk.replace("\n", "\r\n"),
                    'data: {"choices":[{"index":0,"text":"lo","finish_reason":"length"}]}\n\n',
                    f'data: {{"choices":[],"usage":{usage}}}\n\n',
                    "data: [DONE]\n\n",
                ]
            )


@pytest.fixture(scope="module")
def canned() -> Iterator[str]:
    with http_server(Canned) as url:
        yield url


def remote(canned: str, route: str, opener: Any, **kwargs: Any) -> RemoteModel:
    return RemoteModel(f"{canned}/{route}/v1", model="canned", opener=opener, **kwargs)


def test_a_stream_with_comments_and_crlf(canned, opener):
    events = list(remote(canned, "ok", opener).complete("hi", GREEDY))
    assert [e.text for e in events[:-1]] == ["Hel", "lo"]
    finished = events[-1]
    assert (finished.reason, finished.text, finished.stats.prompt_tokens, finished.stats.new_tokens) == (
        "length",
        "Hello",
        3,
        2,
    )


def test_the_api_key_comes_from_the_flag_or_openai_api_key(canned, opener, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    list(remote(canned, "ok", opener).complete("hi", GREEDY))
    assert Canned.seen[-1]["Authorization"] == "Bearer from-env"
    list(remote(canned, "ok", opener, api_key="from-flag").complete("hi", GREEDY))
    assert Canned.seen[-1]["Authorization"] == "Bearer from-flag"
    monkeypatch.delenv("OPENAI_API_KEY")
    list(remote(canned, "ok", opener).complete("hi", GREEDY))
    assert "Authorization" not in Canned.seen[-1]


@pytest.mark.parametrize(
    ("route", "error", "message", "hint"),
    [
        ("unauthorized", RemoteError, "answered 401: invalid API key", "--api-key KEY or set OPENAI_API_KEY"),
        ("busy", RemoteError, "answered 503: 120 requests are already waiting", "retry in 7 s"),
        ("bad", InputError, "answered 400: temperature: must be <= 2", None),
        ("vllm-bad", InputError, "answered 400: temperature must be non-negative, got -1.0.", None),
        ("html", RemoteError, "answered 502: an HTML page (Bad Gateway), not an OpenAI-style answer", None),
        # was "answered 404: <!DOCTYPE HTML>", and a hint to end a URL that ends in /v1 with /v1
        (
            "web-server",
            RemoteError,
            "answered 404: an HTML page (Error response), not an OpenAI-style answer",
            "is it an OpenAI-compatible server?",
        ),
        ("listed-message", RemoteError, 'answered 500: ["engine", "failed"]', None),  # was ['engine', 'failed']
        ("midway-error", RemoteError, "failed mid-answer: the engine failed", None),
        # were printed whole: 10,000 characters over 501 lines, 12,000 over 2,001
        ("traceback", RemoteError, 'answered 500: Traceback (most recent call last): File "x.py", line 1', None),
        ("midway-traceback", RemoteError, "failed mid-answer: boom frame frame", None),
        ("long-context", ContextLengthError, "answered 400: prompt 'hi hi hi", None),  # known by the whole message
        ("cut", RemoteError, "closed the stream before the answer finished", None),
        # was 'sent a stream chunk that is not JSON: {"choices":[{"index":0,"te': the cut, not what it sent
        ("cut-mid-line", RemoteError, "closed the stream mid-line, before the answer finished", None),
        ("garbled", RemoteError, "sent a stream chunk not in OpenAI's shape (a text is not a string)", None),
    ],
)
def test_server_failures_are_one_line_errors(canned, opener, route, error, message, hint):
    with pytest.raises(error) as caught:  # (a timeout under the busy server's Retry-After: no waiting for it)
        list(remote(canned, route, opener, timeout=5).complete("hi", GREEDY))
    assert message in caught.value.message and "\n" not in caught.value.message
    assert len(caught.value.message) < 300
    assert caught.value.hint == hint or (hint and hint in (caught.value.hint or ""))


def test_a_model_listed_without_an_id_is_never_asked_for(canned, opener):
    # A card with "id": null was taken for the first model, and requests asked for model "None".
    assert RemoteModel(f"{canned}/null-id/v1", opener=opener).model == "second"
    with pytest.raises(RemoteError) as caught:
        RemoteModel(f"{canned}/no-id/v1", opener=opener).model  # noqa: B018
    assert caught.value.message.endswith("/no-id/v1/models listed no model with an id")
    assert "--model" in (caught.value.hint or "")


def test_a_whole_answer_labelled_as_text_is_read_whole(canned, opener):
    # It was 'closed the stream before the answer finished': none of its lines was a data line.
    events = list(remote(canned, "unlabelled-whole", opener).complete("hi", GREEDY))
    assert [e.text for e in events[:-1]] == ["hi"] and (events[-1].reason, events[-1].stats.new_tokens) == ("length", 2)


def test_a_stream_labelled_json_is_read_as_a_stream(canned, opener):
    # It was 'sent an answer that is not JSON: : ok data: {"choices"...'.
    events = list(remote(canned, "labelled-json", opener).complete("hi", GREEDY))
    assert [e.text for e in events[:-1]] == ["Hel", "lo"] and (events[-1].reason, events[-1].text) == ("stop", "Hello")


def test_a_context_that_is_no_count_of_tokens_is_unknown(canned, opener):
    # -5 and true (1 to Python) were taken for the context: "the model's context (-5 tokens) is too small to
    # summarise this text", where a server that does not say its context gets the default.
    contexts = [RemoteModel(f"{canned}/context-{n}/v1", opener=opener).context_length for n in ("-5", "true", "2048")]
    assert contexts == [None, None, 2048]


def test_llama_servers_context_is_read_from_its_meta(canned, opener):
    """QA: against llama-server (-c 2048 -np 2: 1,024 a slot) summarize assumed 4,096 and every chunk got a 400."""
    assert RemoteModel(f"{canned}/llama-server/v1", opener=opener).context_length == 1024


def test_a_whole_json_answer_to_a_stream_request_is_taken_as_it_comes(canned, opener):
    # Some OpenAI-compatible servers ignore "stream": true and answer with one application/json body; that
    # was "closed the stream before the answer finished".
    model = remote(canned, "whole", opener)
    chat = list(model.chat([{"role": "user", "content": "hi"}], GREEDY))
    assert [e.text for e in chat[:-1]] == ["hi"] and (chat[-1].reason, chat[-1].text) == ("stop", "hi")
    text = list(model.complete("hi", GREEDY))
    assert [e.text for e in text[:-1]] == ["hi"] and (text[-1].reason, text[-1].stats.new_tokens) == ("length", 2)


def test_a_server_that_sends_a_byte_at_a_time_cannot_hold_the_client(canned, opener, monkeypatch):
    # Each read gets a byte within its timeout, so a limit per read never fired: /models, an error's body and
    # a stream's line were waited for as long as the server kept sending.
    import gptcli.remote

    monkeypatch.setattr(gptcli.remote, "LOOKUP_TIMEOUT_S", 0.5)
    calls = [
        ("did not answer in", lambda: RemoteModel(f"{canned}/drip/v1", opener=opener).model),
        ("did not answer in", lambda: list(remote(canned, "drip", opener, timeout=0.5).complete("hi", GREEDY))),
        ("answered 500", lambda: list(remote(canned, "drip-error", opener).complete("hi", GREEDY))),
    ]
    for message, call in calls:
        started = time.monotonic()
        with pytest.raises(RemoteError, match=message):
            call()
        assert time.monotonic() - started < 2, message


@pytest.mark.parametrize("route", ["retry-after-date", "retry-after-word"])
def test_a_retry_after_that_is_no_number_of_seconds_says_retry_later(canned, opener, route):
    # The hint was the header as sent, in seconds: 'retry in Wed, 21 Oct 2015 07:28:00 GMT s', 'retry in soon s'.
    with pytest.raises(RemoteError) as caught:
        list(remote(canned, route, opener).complete("hi", GREEDY))
    assert caught.value.message.endswith("answered 429: slow down") and caught.value.hint == "retry later"


def test_a_gzip_stream_is_read_whichever_the_http_library(canned, opener):
    # urllib (the client without httpx) read the compressed bytes as the stream: 'closed the stream before the
    # answer finished', where httpx inflates them.
    events = list(remote(canned, "gzip", opener).complete("hi", GREEDY))
    assert [e.text for e in events[:-1]] == ["Hel", "lo"] and (events[-1].reason, events[-1].text) == ("stop", "Hello")


def test_a_body_that_inflates_far_comes_a_read_at_a_time():
    from gptcli.remote_http import READ_BYTES, inflated

    bomb = gzip.compress(b"x" * (64 << 20))  # 64 KiB that inflate to 64 MiB
    pieces = inflated(iter([bomb]))
    assert len(next(pieces)) <= READ_BYTES
    with pytest.raises(ConnectionError, match="does not inflate"):
        list(inflated(iter([b"\x1f\x8b not gzip"])))


@contextlib.contextmanager
def raw_server(answer: bytes) -> Iterator[str]:
    """A port that answers every connection with `answer`, HTTP or not, then closes it."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):  # closed at the end
            while True:
                connection, _ = listener.accept()
                with connection:
                    connection.recv(65536)
                    connection.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    finally:
        listener.close()


BROKE = "the connection broke mid-answer"
STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", "cannot connect to"),  # another program on the port
        (b"HTTP/1.1 200 OK\r\nX-Pad: " + b"x" * 70000, "cannot connect to"),  # a header past http.client's limit
        (STREAM_HEAD + b'a\r\ndata: {"ch\r\nzz\r\n', f"{BROKE}: the body was cut short or garbled"),  # a size not hex
        (STREAM_HEAD + b'40\r\ndata: {"ch', BROKE),  # a chunk cut short
    ],
    ids=["not-http", "long-header", "garbled-chunk", "cut-chunk"],
)
def test_an_answer_that_is_not_http_or_breaks_its_framing_is_one_line(opener, answer, message):
    # Over urllib, http.client's own errors (BadStatusLine, LineTooLong, IncompleteRead) are not OSErrors:
    # they went up as 'internal error: BadStatusLine: SSH-2.0-OpenSSH_9.6'.
    with raw_server(answer) as url, pytest.raises(RemoteError) as caught:
        list(RemoteModel(url, model="m", opener=opener).complete("hi", GREEDY))
    assert caught.value.message.startswith(f"{message} " if message.startswith("cannot") else f"{url}: {message}")
    assert "\n" not in caught.value.message


def test_a_redirect_is_an_error_that_names_the_new_address(canned, opener):
    # httpx answered the 301 as a stream, "closed the stream before the answer finished"; urllib followed it
    # (a POST as a GET, the API key to wherever it pointed).
    with pytest.raises(RemoteError) as caught:
        list(remote(canned, "moved", opener).complete("hi", GREEDY))
    assert caught.value.message == f"{canned}/moved/v1 answered 301: moved to https://new.example/v1/completions"
    assert caught.value.hint == "use --url https://new.example/v1 (redirects are not followed)"


def test_a_redirect_to_a_long_address_says_how_much_of_it_is_not_shown(canned, opener):
    # It was cut at 200 characters without a word: a shown URL that looked whole, and was not.
    with pytest.raises(RemoteError) as caught:
        list(remote(canned, "moved-far", opener).complete("hi", GREEDY))
    assert caught.value.message.startswith(f"{canned}/moved-far/v1 answered 302: moved to https://new.example/aaa")
    assert caught.value.message.endswith(" characters more)") and len(caught.value.message) < 300
    assert caught.value.hint.startswith("use --url https://new.example/aaa")
    assert caught.value.hint.endswith(" characters more) (redirects are not followed)")


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ("endless", "sent more than 56 events for a reply of at most 10 tokens: cut there"),
        ("endless-empty", "sent more than 56 events for a reply of at most 10 tokens: cut there"),
        ("endless-text", "sent more than 640 characters for a reply of at most 10 tokens: cut there"),
        ("keep-alive", "did not answer in"),
    ],
)
def test_a_stream_that_never_ends_is_cut(canned, opener, route, message):
    # A server that does not keep max_tokens streamed into the client's memory without end, and one sending
    # only keep-alive comments held it forever (each line restarted the wait for the next).
    started = time.monotonic()
    with pytest.raises(RemoteError) as caught:
        list(remote(canned, route, opener, timeout=1).complete("hi", GREEDY))
    assert message in caught.value.message
    assert time.monotonic() - started < 10


def test_an_error_body_is_read_no_further_than_its_first_64_kib():
    from gptcli.remote_http import Reply

    read: list[int] = []

    def endless() -> Iterator[bytes]:
        yield b'{"error": {"message": "no such route"}}'
        while len(read) < 10_000:  # 10 MB of padding, as a broken proxy might send without end
            read.append(1024)
            yield b" " * 1024

    def opener(*args: Any) -> Reply:
        return Reply(400, {"Content-Type": "application/json"}, endless(), lambda: None)

    with pytest.raises(InputError, match="answered 400: no such route"):
        list(RemoteModel("http://127.0.0.1:9/v1", model="m", opener=opener).complete("hi", GREEDY))
    assert sum(read) <= 65536


def test_a_null_error_in_a_chunk_is_no_error(canned, opener):
    events = list(remote(canned, "null-error", opener).complete("hi", GREEDY))
    assert [e.text for e in events[:-1]] == ["Hel", "lo"] and (events[-1].reason, events[-1].text) == ("stop", "Hello")


def test_a_stream_without_usage_leaves_the_prompts_count_unknown_not_zero(canned, opener):
    from gptcli.timings import timings_line, usage

    (*_, finished) = remote(canned, "null-error", opener).complete("hi", GREEDY)  # its stream sends no usage
    assert finished.stats.prompt_tokens is None and finished.stats.new_tokens == 2  # counted from the chunks
    assert usage(finished.stats) == {"prompt_tokens": None, "completion_tokens": 2, "total_tokens": None}
    assert timings_line(finished.stats).startswith("prompt ? tok · ") and finished.stats.prefill_tokens_per_s == 0


def test_usage_counts_that_are_not_counts_leave_the_text_and_estimate_the_stats(canned, opener):
    events = list(remote(canned, "odd-usage", opener).complete("hi", GREEDY))
    finished = events[-1]
    assert (finished.reason, finished.text) == ("stop", "Hello")
    assert (finished.stats.prompt_tokens, finished.stats.cached_tokens, finished.stats.new_tokens) == (3, 0, 2)


def test_a_busy_server_that_says_when_to_come_back_is_asked_again(canned, opener):
    # A full queue (503 or 429 with Retry-After) is waited out within the request's timeout, as the OpenAI
    # client does, so that a batch or summary sent --parallel 8 to a smaller server does not end at the first.
    Canned.busy.clear()
    started = time.monotonic()
    events = list(remote(canned, "busy-then-ok", opener).complete("hi", GREEDY))
    assert events[-1].text == "Hello" and Canned.busy["busy-then-ok"] == 2
    assert 0.4 <= time.monotonic() - started < 3
    with pytest.raises(RemoteError, match="answered 503: 2 requests are already waiting"):  # the wait outlasts it
        list(remote(canned, "busy-then-ok-2", opener, timeout=0.3).complete("hi", GREEDY))


def test_a_server_that_goes_away_while_a_busy_answer_is_waited_out_is_lost_not_busy(canned, opener):
    """It answered 503 with Retry-After, then stopped: the error said 'answered 503 ... retry in 0.2 s', of a server
    that was no longer there."""
    Canned.busy.clear()
    calls = []

    def stopping(*args: Any) -> Any:
        calls.append(args)
        if len(calls) > 1:
            raise ConnectionError("Connection refused")
        return opener(*args)

    with pytest.raises(RemoteError) as caught:
        list(remote(canned, "busy-then-ok-3", stopping).complete("hi", GREEDY))
    assert caught.value.message == f"lost {canned}/busy-then-ok-3/v1: Connection refused" and len(calls) == 2
    assert "did the server stop or restart?" in caught.value.hint


def test_a_refused_connection(opener):
    port = free_port()  # bound and closed again: nothing listens there now
    with pytest.raises(RemoteError) as caught:
        list(RemoteModel(f"http://127.0.0.1:{port}/v1", model="m", opener=opener).complete("hi", GREEDY))
    assert caught.value.message.startswith(f"cannot connect to http://127.0.0.1:{port}/v1: ")
    assert "gptcli serve" in caught.value.hint


def test_a_lookup_that_never_answers_fails_in_seconds_not_minutes(canned, opener, monkeypatch):
    import gptcli.remote

    monkeypatch.setattr(gptcli.remote, "LOOKUP_TIMEOUT_S", 0.5)
    started = time.monotonic()
    with pytest.raises(RemoteError, match="did not answer in"):
        RemoteModel(f"{canned}/slow/v1", opener=opener).model  # noqa: B018  (the stream timeout stays 600 s)
    assert time.monotonic() - started < 2.5


def test_an_api_key_a_header_cannot_carry_is_a_usage_error_that_does_not_show_it():
    from gptcli.errors import UsageError

    for key in ("sk-é", "abc\ndef", "two words"):
        with pytest.raises(UsageError) as caught:
            RemoteModel("http://127.0.0.1:9/v1", api_key=key, model="m")
        assert key not in caught.value.message and "--api-key" in caught.value.message


def test_a_timeout(canned, opener):
    started = time.monotonic()
    with pytest.raises(RemoteError, match="did not answer in"):
        list(remote(canned, "slow", opener, timeout=0.5).complete("hi", GREEDY))
    assert time.monotonic() - started < 2.5


def test_a_llama_server_tokenizer_and_none_at_all(canned, opener):
    served = ServedTokenizer.probe(remote(canned, "llamacpp", opener))
    assert served is not None and served.field == "content"
    assert served.encode("abc") == [97, 98, 99] and served.decode([104, 105]) == "hi"
    assert ServedTokenizer.probe(remote(canned, "ok", opener)) is None  # 404: an estimate it is


def test_text_pieces_cut_after_a_newline_else_before_a_space():
    from gptcli.textio import text_pieces

    text = "alpha beta\ngamma delta epsilon " + "x" * 40
    pieces = list(text_pieces(text, 12))
    assert "".join(pieces) == text and all(len(p) <= 12 for p in pieces)
    assert pieces == ["alpha beta\n", "gamma delta", " epsilon", " " + "x" * 11, "x" * 12, "x" * 12, "x" * 5]


def test_run_streams_starts_lazily_and_hands_a_streams_error_back():
    import itertools

    from gptcli.decoding import NO_STATS
    from gptcli.fanout import run_streams

    started: list[int] = []

    def start(index: int) -> Any:
        def stream() -> Iterator[Any]:
            started.append(index)
            if index == 1:
                raise InputError("refused")
            yield Token(str(index), None, 0.0)
            yield Finished("stop", NO_STATS, str(index), ())

        return stream

    events = run_streams((start(i) for i in itertools.count()), 2)
    ended: dict[int, Any] = {}
    for index, event in events:
        if isinstance(event, (Finished, InputError)):
            ended[index] = event
        if len(ended) == 4:
            break
    events.close()
    assert isinstance(ended[1], InputError) and ended[0].text == "0" and len(ended) == 4
    assert len(started) <= 6  # at most two running, from an endless source


def test_run_streams_starts_no_stream_while_the_caller_says_wait():
    """A batch file through --url holds finished results for input order; `may_start` is how it says it holds
    enough: while it says no, no stream starts beside those running (none running: one starts anyway)."""
    from gptcli.decoding import NO_STATS
    from gptcli.fanout import run_streams

    started: list[int] = []

    def start(index: int) -> Any:
        def stream() -> Iterator[Any]:
            started.append(index)
            yield Finished("stop", NO_STATS, str(index), ())

        return stream

    allowed = {"yes": False}
    events = run_streams((start(i) for i in range(5)), 4, may_start=lambda: allowed["yes"])
    ended = [index for index, event in events if isinstance(event, Finished)]
    assert ended == [0, 1, 2, 3, 4]  # one at a time, each after the last ended, though four may run
    assert started == [0, 1, 2, 3, 4]


def test_requests_share_one_tls_context(canned, monkeypatch):
    """httpx loaded the CA bundle for each request (~20 ms of CPU): a batch file through --url spent more of
    its time there than the server did. One context serves every request."""
    import ssl

    loads: list[object] = []
    real = ssl.SSLContext.load_verify_locations

    def counting(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        loads.append(args or kwargs)
        real(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counting)
    for _ in range(5):
        events = list(remote(canned, "ok", open_httpx).complete("hi", GREEDY))
        assert events[-1].text == "Hello"
    assert len(loads) <= 1


def test_ctrl_c_while_a_busy_server_holds_the_request_ends_the_reply_as_interrupted(canned, opener):
    """QA (llama-server, all slots busy): Ctrl-C before the answer's headers came was outside the stream's handling:
    a chat left at once (exit 130) without saving the message, `generate --json` printed no object."""
    import os
    import signal

    model = remote(canned, "slow", opener)  # answers after 3 s
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))  # well inside the 3 s wait
    timer.start()
    try:
        events = list(model.complete("hi", SamplingConfig(max_tokens=4)))
    except KeyboardInterrupt:  # (let out, it would end pytest itself)
        pytest.fail("Ctrl-C while the request waited was let out of the stream")
    finally:
        timer.cancel()
    assert [(type(e), e.reason, e.text) for e in events] == [(Finished, "interrupted", "")]
    assert events[0].stats.new_tokens == 0 and events[0].stats.first_token_s is None


def test_ignore_eos_is_sent_as_the_other_extras_are():
    """QA: `/set ignore_eos true` in a `--url` chat was accepted and never sent (vLLM and llama-server take it)."""
    from gptcli.remote_requests import sampling_fields

    assert sampling_fields(SamplingConfig(ignore_eos=True), "m")["ignore_eos"] is True
    assert "ignore_eos" not in sampling_fields(SamplingConfig(), "m")  # the neutral value is not sent


def test_a_server_that_answered_then_went_away_is_said_so_not_a_wrong_url(opener):
    """QA: llama-server killed mid-batch gave 'cannot connect ... Server disconnected without sending a response'
    with the hint 'does the server speak HTTPS?', though it had answered plain HTTP all along."""
    with http_server(Canned) as url:
        model = RemoteModel(f"{url}/v1", opener=opener)
        assert model.model == "canned"  # it answers
    with pytest.raises(RemoteError) as gone:
        model.complete("hi", SamplingConfig(max_tokens=2)).__next__()
    assert gone.value.message.startswith(f"lost {url}/v1: ") and "did the server stop" in gone.value.hint
    with pytest.raises(RemoteError) as never:  # a client that never had an answer: still the URL's fault
        RemoteModel(f"{url}/v1", opener=opener).models()
    assert never.value.message.startswith(f"cannot connect to {url}/v1") and "is the server running" in never.value.hint
