"""A seeded fuzzer for client mode (`--url`): the real commands against a misbehaving OpenAI-compatible server.

    .venv/bin/python scripts/fuzz_client.py --cases 500 --seed 1

Each case starts a client command in process (`generate`, `generate --raw`, `--json`, `generate --batch`,
`chat` on a pipe, plain and `--jsonl`, `summarize`) against a loopback server whose answer is a mutation of a
valid OpenAI reply: SSE streams with comments, CRLF, `event:` lines, chunks with no choices or only usage,
`[DONE]` missing, a stream cut mid-line or mid-character, bytes split across reads, fields null or of another
type, unknown finish reasons, malformed tool calls and logprobs; whole JSON answers where a stream was asked;
gzip bodies, HTTP/1.0 without a length, a wrong Content-Type; error statuses (429/500/502/503, with or without
Retry-After) with OpenAI's, ollama's, vLLM's, HTML or plain-text bodies; redirects; a server that never
answers, drips a byte at a time, streams without end or sends a huge body; an https URL on the plain port;
/v1/models and /tokenize mutated alike. The oracle: an exit code README documents, one `error:` line naming
the server on failure and never a traceback or an internal error, no case over its time bound (the client's
timeouts are shortened to --timeout), no endless answer read to its end (the client must cut it), and a
reply's text that arrived before the stream broke kept (printed, in --json's object, in the saved chat; one
--jsonl record for the message). Failures are printed with their case and the run exits 1;
tests/test_client_fuzz.py runs a seeded subset.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import io
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fuzz_limits import Hang, time_limit

REPO = Path(__file__).resolve().parents[1]
EXIT_CODES = {0, 1, 2, 3, 4, 5, 6, 130, 143}
TEXTS = ["Hel", "lo", " wörld", " 🚀", "!"]  # multi-byte characters, so cuts can land inside one
ENDLESS_BYTES = 64 << 20  # an endless answer the client reads this far was not cut
MODEL = "fuzz-model"


# --- what the server sends ------------------------------------------------------------------------------
@dataclass
class Answer:
    """One HTTP answer: status, headers, body pieces (each written and flushed alone), how it is framed."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    pieces: list[bytes] = field(default_factory=list)
    framing: str = "length"  # "length", "chunked", "close" (HTTP/1.0, no length)
    pause: float = 0.0  # between pieces
    endless: bytes | None = None  # sent again and again after the pieces
    never: bool = False  # accept, read the request, never answer
    raw: bytes | None = None  # sent as it is, no HTTP of ours around it
    sent: int = 0  # body bytes written (the oracle reads it)


def valid_chunks(chat: bool, rng: random.Random) -> list[dict[str, Any]]:
    texts = TEXTS[: rng.randint(1, len(TEXTS))]
    base = {"id": "x1", "object": "chat.completion.chunk" if chat else "text_completion", "created": 1, "model": MODEL}
    chunks: list[dict[str, Any]] = []
    if chat:
        chunks.append({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
    for text in texts:
        choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
        chunks.append({**base, "choices": [{**choice, "finish_reason": None}]})
    end = {"index": 0, "delta": {}} if chat else {"index": 0, "text": ""}
    chunks.append({**base, "choices": [{**end, "finish_reason": rng.choice(["stop", "length"])}]})
    chunks.append({**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": len(texts)}})
    return chunks


def whole_answer(chat: bool, rng: random.Random) -> dict[str, Any]:
    text = "".join(TEXTS[: rng.randint(1, len(TEXTS))])
    choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    return {"id": "x", "object": "x", "model": MODEL, "choices": [{**choice, "finish_reason": "stop"}], "usage": usage}


ODD_VALUES: list[Any] = [None, 0, -1, 1.5, True, "", "x", [], {}, [None], {"a": 1}, "\u0000", 10**30]


def odd_value(rng: random.Random) -> Any:
    """A fresh copy: a shared list placed twice in one answer could be mutated into itself (a cycle)."""
    return copy.deepcopy(
        rng.choice([*ODD_VALUES, "unknown_reason", [{"index": 0}], [{"function": None}], {"content": None}])
    )


def field_paths(node: Any) -> Iterator[tuple[Any, Any]]:
    """(container, key) for every value in a JSON value, however deep."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield node, key
        yield from field_paths(value)


def mutate_fields(obj: Any, rng: random.Random, times: int) -> Any:
    """`obj` with `times` random fields (anywhere in it) set to odd values or dropped."""
    for _ in range(times):
        paths = list(field_paths(obj))
        if not paths:
            return obj
        parent, key = rng.choice(paths)
        if isinstance(parent, dict) and rng.random() < 0.2:
            del parent[key]
        else:
            parent[key] = odd_value(rng)
    return obj


EXTRA_FIELDS: list[tuple[str, Any]] = [
    ("tool_calls", [{"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}]),
    ("tool_calls", [{"index": "0", "function": {"arguments": 3}}]),
    ("logprobs", {"content": [{"token": "x", "logprob": "nan"}]}),
    ("logprobs", [1, 2]),
    ("reasoning_content", "thinking"),
    ("content", None),
    ("refusal", "no"),
]


def sse(chunks: list[Any], rng: random.Random) -> bytes:
    """The chunks as an SSE stream, dressed as some server would: comments, event: lines, CRLF, [DONE] or not."""
    end = "\r\n" if rng.random() < 0.2 else "\n"
    lines: list[str] = []
    if rng.random() < 0.2:
        lines.append(": ping")
    for chunk in chunks:
        if rng.random() < 0.1:
            lines.append("event: message")
        data = chunk if isinstance(chunk, str) else json.dumps(chunk, ensure_ascii=rng.random() < 0.5)
        lines += [f"data:{' ' if rng.random() < 0.8 else ''}{data}", ""]
        if rng.random() < 0.05:
            lines += [": keep-alive", ""]
    if rng.random() < 0.85:
        lines += ["data: [DONE]", ""]
    return (end.join(lines) + end).encode()


def split_pieces(body: bytes, rng: random.Random) -> list[bytes]:
    """The body cut at random places (mid-line, mid-character), each piece a read of its own."""
    if not body or rng.random() < 0.5:
        return [body]
    cuts = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, rng.randint(1, 12))))
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]


NOT_HTTP = [b"SSH-2.0-OpenSSH_9.6\r\n", b"\x15\x03\x01\x00\x02\x02\x50", b"220 smtp ready\r\n"]  # SSH, TLS, SMTP
RETRY_AFTERS = ["0", "1", "0.2", "abc", "-1", "1e9", "Wed, 21 Oct 2015 07:28:00 GMT"]
ERROR_BODIES: list[Callable[[int], tuple[str, bytes]]] = [
    lambda s: ("application/json", json.dumps({"error": {"message": f"openai says {s}", "code": None}}).encode()),
    lambda s: ("application/json", json.dumps({"error": f"ollama says {s}"}).encode()),
    lambda s: ("application/json", json.dumps({"object": "error", "message": f"vllm says {s}", "code": s}).encode()),
    lambda s: ("application/json", json.dumps({"detail": f"fastapi says {s}"}).encode()),
    lambda s: ("text/html", b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"),
    lambda s: ("text/plain", b"upstream connect error or disconnect/reset before headers"),
    lambda s: ("application/json", b""),
    lambda s: ("application/json", b'{"error": {"message": null}}'),
    lambda s: ("application/json", b'{"error": {"message": ["a", "b"]}}'),
    lambda s: ("application/json", b"[1, 2]"),
    lambda s: ("text/plain", b"\xff\xfe\x00bad bytes\nsecond line"),
    lambda s: ("application/json", json.dumps({"error": {"message": "line one\nline two\r\n" + "x" * 500}}).encode()),
]


def generation_answer(chat: bool, rng: random.Random) -> tuple[str, Answer, list[str]]:
    """A mutated answer to a chat or text completion: (its name, it, the texts sent before anything broke)."""
    kind = rng.choices(
        ["stream", "stream-fields", "stream-extra", "stream-cut", "whole", "whole-fields", "error", "redirect",
         "never", "drip", "endless", "endless-comments", "huge", "wrong-type", "sse-as-json", "gzip", "http10",
         "chunked", "chunked-cut", "chunked-garbled", "not-http", "long-header"],
        weights=[10, 8, 5, 8, 4, 4, 10, 2, 1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 2, 1, 1, 1],
    )[0]  # fmt: skip
    chunks = valid_chunks(chat, rng)
    sent = [
        c["choices"][0]["delta"].get("content") if chat else c["choices"][0]["text"] for c in chunks if c["choices"]
    ]
    sent = [t for t in sent if t]
    stream_type = {"Content-Type": "text/event-stream"}
    json_type = {"Content-Type": "application/json"}
    answer = Answer(headers=dict(stream_type))
    if kind == "stream":
        answer.pieces = split_pieces(sse(chunks, rng), rng)
    elif kind == "stream-fields":
        answer.pieces = split_pieces(sse(mutate_fields(chunks, rng, rng.randint(1, 3)), rng), rng)
        sent = []
    elif kind == "stream-extra":
        target = rng.choice(chunks[1:-1])
        name, value = rng.choice(EXTRA_FIELDS)
        where = target["choices"][0].setdefault("delta", {}) if chat else target["choices"][0]
        where[name] = value
        if rng.random() < 0.3:
            chunks.insert(rng.randrange(len(chunks)), {"choices": [], "usage": {"completion_tokens": 1}})
        answer.pieces = split_pieces(sse(chunks, rng), rng)
        sent = []
    elif kind == "stream-cut":  # the connection drops after some bytes (maybe mid-line, mid-character)
        body = sse(chunks[:-1], rng)
        cut = rng.randrange(1, len(body))
        answer.pieces, answer.framing = split_pieces(body[:cut], rng), "close"
        sent = texts_before(body[:cut], chat)
    elif kind in ("whole", "whole-fields"):
        reply = whole_answer(chat, rng)
        if kind == "whole-fields":
            mutate_fields(reply, rng, rng.randint(1, 3))
        labels = [json_type, json_type, {}, stream_type, {"Content-Type": "text/plain"}]  # mostly JSON, else not
        answer.headers = dict(rng.choice(labels))
        answer.pieces = split_pieces(json.dumps(reply, indent=rng.choice([None, 2])).encode(), rng)
        sent = []
    elif kind == "error":
        status = rng.choice([400, 401, 403, 404, 413, 422, 429, 500, 502, 503, 504])
        content_type, body = rng.choice(ERROR_BODIES)(status)
        answer.status, answer.headers, answer.pieces = status, {"Content-Type": content_type}, [body]
        if status in (429, 503) and rng.random() < 0.6:
            answer.headers["Retry-After"] = rng.choice(
                ["0", "1", "0.2", "abc", "-1", "1e9", "Wed, 21 Oct 2015 07:28:00 GMT"]
            )
        sent = []
    elif kind == "redirect":
        answer.status = rng.choice([301, 302, 307, 308])
        answer.headers = {"Location": rng.choice(["/elsewhere/v1/chat/completions", "http://127.0.0.1:1/v1", "/loop"])}
        sent = []
    elif kind == "never":
        answer.never, sent = True, []
    elif kind == "drip":  # a byte at a time, a line that never ends
        body = b'data: {"choices": [{"index": 0, "delta": {"content": "' + b"a" * 200
        answer.pieces, answer.pause, answer.framing, sent = [bytes([b]) for b in body], 0.05, "close", []
    elif kind == "endless":  # max_tokens is the server's to keep: this one never stops
        chunk = chunks[1] if chat else chunks[0]
        answer.pieces, answer.framing = [], "close"
        answer.endless = f"data: {json.dumps(chunk)}\n\n".encode() * 64
        sent = []
    elif kind == "endless-comments":
        answer.pieces, answer.framing, answer.endless, sent = [], "close", b": keep-alive\n\n" * 64, []
        answer.pause = 0.01
    elif kind == "huge":  # one JSON answer that never ends
        answer.headers, answer.framing = dict(json_type), "close"
        answer.pieces, answer.endless, sent = [b'{"choices": [{"text": "'], b"a" * 65536, []
    elif kind == "wrong-type":
        answer.headers = {"Content-Type": rng.choice(["text/plain", "text/html", "application/octet-stream", ""])}
        answer.pieces = split_pieces(sse(chunks, rng), rng)
    elif kind == "sse-as-json":  # a stream labelled JSON
        answer.headers = dict(json_type)
        answer.pieces = [sse(chunks, rng)]
        sent = []
    elif kind == "gzip":
        answer.headers = {**stream_type, "Content-Encoding": "gzip"}
        answer.pieces = [gzip.compress(sse(chunks, rng))]
    elif kind == "http10":
        answer.pieces, answer.framing = split_pieces(sse(chunks, rng), rng), "close"
    elif kind.startswith("chunked"):  # Transfer-Encoding: chunked, whole, cut inside a chunk, or a size not hex
        answer.pieces, answer.framing = split_pieces(sse(chunks, rng), rng), kind
        sent = [] if kind != "chunked" else sent
    elif kind == "not-http":  # another program on the port
        answer.raw, sent = rng.choice(NOT_HTTP), []
    elif kind == "long-header":
        answer.raw, sent = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"x" * 70000 + b"\r\n\r\n", []
    return kind, answer, sent


def texts_before(body: bytes, chat: bool) -> list[str]:
    """The texts of the whole data lines in a stream cut short."""
    texts = []
    for line in body.split(b"\n")[:-1]:
        line = line.strip()
        if not line.startswith(b"data:") or line == b"data: [DONE]":
            continue
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
            choice = json.loads(line[5:])["choices"][0]
            text = choice["delta"].get("content") if chat else choice["text"]
            if text:
                texts.append(text)
    return texts


def models_answer(rng: random.Random) -> tuple[str, Answer]:
    card = {"id": MODEL, "object": "model", "owned_by": "fuzz", "max_model_len": 2048}
    answer = Answer(headers={"Content-Type": "application/json"})
    kind = rng.choices(["ok", "fields", "error", "not-json", "never", "huge"], weights=[70, 12, 8, 5, 1, 1])[0]
    if kind == "ok":
        answer.pieces = [json.dumps({"object": "list", "data": [card]}).encode()]
    elif kind == "fields":
        answer.pieces = [json.dumps(mutate_fields({"object": "list", "data": [card]}, rng, rng.randint(1, 2))).encode()]
    elif kind == "error":
        answer.status = rng.choice([401, 404, 500, 502])
        content_type, body = rng.choice(ERROR_BODIES)(answer.status)
        answer.headers, answer.pieces = {"Content-Type": content_type}, [body]
    elif kind == "not-json":
        answer.headers, answer.pieces = {"Content-Type": "text/html"}, [b"<html>hello</html>"]
    elif kind == "never":
        answer.never = True
    else:
        answer.framing, answer.pieces, answer.endless = "close", [b'{"data": ['], b'{"id": "m"},' * 4096
    return kind, answer


def tokenize_answer(rng: random.Random) -> tuple[str, Answer]:
    kind = rng.choices(["404", "ok", "odd"], weights=[70, 15, 15])[0]
    if kind == "404":
        return kind, Answer(404, {"Content-Type": "text/plain"}, [b"Not Found"])
    tokens: Any = [1, 2, 3] if kind == "ok" else rng.choice([[1.5], "abc", None, [[1]], {"tokens": 1}, [True]])
    return kind, Answer(200, {"Content-Type": "application/json"}, [json.dumps({"tokens": tokens}).encode()])


# --- the server ---------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One case's server: what each route answers."""

    number: int
    models: tuple[str, Answer]
    tokenize: tuple[str, Answer]
    generation: Callable[[bool], tuple[str, Answer, list[str]]]
    answers: list[tuple[str, str, Answer]] = field(default_factory=list)  # (route, kind, answer) as sent
    stop: threading.Event = field(default_factory=threading.Event)


CASES: dict[int, Case] = {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        parts = self.path.split("/")
        case = CASES.get(int(parts[1][1:])) if len(parts) > 2 and parts[1][1:].isdigit() else None
        if case is None:
            self._write(Answer(404, {"Content-Type": "text/plain"}, [b"no such case"]))
            return
        route = "/" + "/".join(parts[2:])
        if route.endswith("/models"):
            kind, answer = case.models
        elif route.endswith("/tokenize") or route.endswith("/detokenize"):
            kind, answer = case.tokenize
        elif route.endswith("/completions"):
            kind, answer, _ = case.generation(route.endswith("/chat/completions"))
        else:
            kind, answer = "unknown-route", Answer(404, {"Content-Type": "text/plain"}, [b"Not Found"])
        answer = Answer(**{**answer.__dict__, "sent": 0})  # a fresh count for every request
        case.answers.append((route, kind, answer))
        with contextlib.suppress(OSError):
            self._write(answer, case.stop)

    def _write(self, answer: Answer, stop: threading.Event | None = None) -> None:
        if answer.never:
            (stop or threading.Event()).wait(60)
            self.close_connection = True
            return
        if answer.raw is not None:
            self.wfile.write(answer.raw)
            self.close_connection = True
            return
        if answer.framing == "close":
            self.protocol_version = "HTTP/1.0"
        if answer.framing.startswith("chunked"):
            answer.headers = {**answer.headers, "Transfer-Encoding": "chunked"}
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        if answer.framing == "length" and answer.endless is None:
            self.send_header("Content-Length", str(sum(map(len, answer.pieces))))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        for index, piece in enumerate(answer.pieces):
            self.wfile.write(framed(piece, answer.framing, last=index == len(answer.pieces) - 1))
            self.wfile.flush()
            answer.sent += len(piece)
            if answer.pause:
                time.sleep(answer.pause)
            if stop is not None and stop.is_set():
                return
        while answer.endless is not None and answer.sent < ENDLESS_BYTES and not (stop and stop.is_set()):
            self.wfile.write(answer.endless)
            answer.sent += len(answer.endless)
            if answer.pause:
                time.sleep(answer.pause)


def framed(piece: bytes, framing: str, *, last: bool) -> bytes:
    """A piece as it goes on the wire: as it is, or as a chunk (the last one cut, or with a size not in hex)."""
    if not framing.startswith("chunked") or not piece:
        return piece
    if last and framing == "chunked-cut":
        return b"%x\r\n%s" % (len(piece) + 10, piece)
    size = b"zz" if last and framing == "chunked-garbled" else b"%x" % len(piece)
    return size + b"\r\n" + piece + b"\r\n" + (b"0\r\n\r\n" if last and framing == "chunked" else b"")


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that left mid-answer: not the client's traceback (stderr is the command's, captured)


@contextlib.contextmanager
def serving() -> Iterator[int]:
    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


# --- the client commands -----------------------------------------------------------------------------------
@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float


def run_cli(argv: list[str], stdin: bytes, bound: float) -> Outcome:
    """The real CLI in process, its streams captured; Hang past `bound` seconds."""
    from gptcli.cli.app import run

    out, err = io.BytesIO(), io.BytesIO()
    saved = sys.stdin, sys.stdout, sys.stderr
    streams = (
        io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"),
        io.TextIOWrapper(out, encoding="utf-8", write_through=True),
        io.TextIOWrapper(err, encoding="utf-8", write_through=True),
    )
    sys.stdin, sys.stdout, sys.stderr = streams
    started = time.monotonic()
    try:
        with time_limit(bound):
            code = run(argv)
    except Hang:
        code = -1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdin, sys.stdout, sys.stderr = saved
    seconds = time.monotonic() - started
    outcome = Outcome(code, out.getvalue().decode(errors="replace"), err.getvalue().decode(errors="replace"), seconds)
    for stream in streams:
        stream.detach()
    return outcome


def command(rng: random.Random, url: str, folder: Path) -> tuple[str, list[str], bytes, bool]:
    """(its name, argv, stdin, whether it is a chat completion) for a random client command."""
    model = ["--model", MODEL] if rng.random() < 0.5 else []
    n = ["-n", str(rng.choice([4, 16, 512]))]
    names = ["generate", "raw", "json", "batch", "chat", "jsonl", "summarize"]
    name = rng.choices(names, weights=[25, 15, 15, 10, 15, 10, 10])[0]
    if name == "generate":
        return name, ["generate", "hi", "--url", url, *model, *n], b"", True
    if name == "raw":
        return name, ["generate", "hi", "--raw", "--url", url, *model, *n], b"", False
    if name == "json":
        return name, ["generate", "hi", "--json", "--url", url, *model, *n], b"", True
    if name == "batch":
        lines = folder / "in.jsonl"
        (folder / "out.jsonl").unlink(missing_ok=True)
        lines.write_text('{"prompt": "hi"}\n{"messages": [{"role": "user", "content": "yo"}]}\n')
        argv = ["generate", "--batch", str(lines), "-o", str(folder / "out.jsonl"), "--url", url, *model, *n]
        return name, argv, b"", True
    if name in ("chat", "jsonl"):
        jsonl = ["--jsonl"] if name == "jsonl" else []
        return name, ["chat", *jsonl, "--url", url, *model, *n], b"hello\n", True
    return name, ["summarize", "--url", url, *model, *n], ("The river rose. " * 20).encode(), True


# --- the oracle --------------------------------------------------------------------------------------------
SERVER_NOISE = re.compile(r"-{40}\nException occurred during processing of request.*?-{40}\n?", re.DOTALL)


def client_lines(stderr: str) -> str:
    """stderr without what a server thread in the process printed there (socketserver's report of a request
    whose client left: the suite's other canned servers too, whose threads may outlive their tests)."""
    return SERVER_NOISE.sub("", stderr)


def problems(outcome: Outcome, case: Case, name: str, url: str, bound: float) -> list[str]:
    found = []
    if outcome.code == -1:
        return [f"hung: no end within {bound:g} s"]
    if outcome.code not in EXIT_CODES:
        found.append(f"exit code {outcome.code} is not a documented one")
    if "Traceback" in client_lines(outcome.stderr) or "internal error" in outcome.stderr:
        found.append("a traceback or an internal error")
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("error:")]
    if outcome.code not in (0, 130) and name != "batch":
        if len(errors) != 1:
            found.append(f"{len(errors)} error: lines on failure")
        elif "127.0.0.1" not in errors[0]:
            found.append("the error does not name the server")
    for route, kind, answer in case.answers:
        if answer.endless is not None and answer.sent >= ENDLESS_BYTES:
            found.append(f"the endless answer to {route} ({kind}) was read {ENDLESS_BYTES >> 20} MiB deep")
    return found


def partial_kept(outcome: Outcome, name: str, sent: list[str], home: Path) -> str | None:
    """A stream that broke after some text: generate printed it (--json: in its object), a chat saved it (and
    --jsonl wrote it in its record)."""
    text = "".join(sent)
    if not sent or outcome.code == 0:
        return None
    if name in ("generate", "raw") and text not in outcome.stdout:
        return f"the text received before the break ({text!r}) was not printed"
    if name == "json":
        try:
            printed = json.loads(outcome.stdout)["text"]
        except (ValueError, KeyError, TypeError):
            return f"the text received before the break ({text!r}): no --json object"
        if text not in printed:
            return f"the text received before the break ({text!r}) is not in the --json object"
    if name in ("chat", "jsonl"):
        saved = [json.loads(path.read_text()) for path in home.glob("**/chats/*.json")]
        replies = [m.get("content") for c in saved for m in c.get("messages", []) if m.get("role") == "assistant"]
        if not any(text in (reply or "") for reply in replies):
            return f"the text received before the break ({text!r}) was not saved in the chat"
    if name == "jsonl":  # ... and is in the message's one record (it was an error alone)
        try:
            content = json.loads(outcome.stdout.splitlines()[-1]).get("content")
        except (ValueError, IndexError, AttributeError):
            return f"the text received before the break ({text!r}): no --jsonl record"
        if text not in (content or ""):
            return f"the text received before the break ({text!r}) is not in the --jsonl record"
    return None


def records(outcome: Outcome, name: str, asked: bool) -> str | None:
    """chat --jsonl: exactly one record for the message, once its reply was asked for."""
    lines = outcome.stdout.splitlines()
    if name == "jsonl" and asked and len(lines) != 1:
        return f"{len(lines)} --jsonl records for one message"
    return None


def run_case(
    number: int, rng: random.Random, port: int, folder: Path, timeout: float, home: Path
) -> tuple[str, list[str]]:
    scheme = "https" if rng.random() < 0.02 else "http"
    url = f"{scheme}://127.0.0.1:{port}/c{number}/v1"
    gens: list[tuple[str, Answer, list[str]]] = []
    fixed = rng.random() < 0.5  # every request of the case gets the same kind of answer, or each its own
    seed = rng.random()

    def generation(chat: bool) -> tuple[str, Answer, list[str]]:
        made = generation_answer(chat, random.Random(seed) if fixed else rng)
        gens.append(made)
        return made

    case = Case(number, models_answer(rng), tokenize_answer(rng), generation)
    CASES[number] = case
    name, argv, stdin, _ = command(rng, url, folder)
    bound = timeout * 4 + 10
    library = rng.choice(["httpx", "urllib"])  # httpx when it is installed, else the standard library
    try:
        with http_library(library):
            outcome = run_cli(argv, stdin, bound)
    finally:
        case.stop.set()
        del CASES[number]
    found = problems(outcome, case, name, url, bound)
    if len(gens) == 1 and (lost := partial_kept(outcome, name, gens[0][2], home)):
        found.append(lost)
    if odd := records(outcome, name, bool(gens)):
        found.append(odd)
    for path in home.glob("**/chats/*.json"):  # each case's chat alone
        path.unlink()
    kinds = ",".join(kind for _, kind, _ in case.answers) or "no request"
    label = f"case {number}: {' '.join(argv)} [{kinds}] ({library}) -> exit {outcome.code} in {outcome.seconds:.1f} s"
    errors = [line for line in outcome.stderr.splitlines() if line.startswith(("error:", "hint:"))]
    if errors:
        label += "\n    " + " | ".join(errors)[:300]
    if found:
        err = " | ".join(outcome.stderr.strip().splitlines()[-3:])
        label += f"\n    {'; '.join(found)}\n    stderr: {err[:300]}\n    stdout: {outcome.stdout[:120]!r}"
    return label, found


@contextlib.contextmanager
def http_library(name: str) -> Iterator[None]:
    """The client's requests through httpx or urllib."""
    import gptcli.remote
    from gptcli import remote_http

    saved = gptcli.remote.default_opener
    opener = remote_http.open_httpx if name == "httpx" else remote_http.open_urllib
    gptcli.remote.default_opener = lambda: opener
    try:
        yield
    finally:
        gptcli.remote.default_opener = saved


@contextlib.contextmanager
def client_settings(timeout: float, home: Path) -> Iterator[None]:
    """The client's timeouts (600 s to read, 10 s to connect) cut to `timeout`, so that a hang shows in seconds,
    and its state in `home`; both as they were afterwards."""
    import gptcli.remote

    defaults = gptcli.remote.RemoteModel.__init__.__kwdefaults__
    saved = dict(defaults), (gptcli.remote.DEFAULT_TIMEOUT_S, gptcli.remote.LOOKUP_TIMEOUT_S), dict(os.environ)
    defaults["connect_timeout"] = timeout
    gptcli.remote.DEFAULT_TIMEOUT_S = gptcli.remote.LOOKUP_TIMEOUT_S = timeout
    for name in ("GPTCLI_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
        os.environ[name] = str(home / name.lower())
    os.environ.pop("OPENAI_API_KEY", None)
    try:
        yield
    finally:
        defaults.update(saved[0])
        gptcli.remote.DEFAULT_TIMEOUT_S, gptcli.remote.LOOKUP_TIMEOUT_S = saved[1]
        os.environ.clear()
        os.environ.update(saved[2])


def fuzz(cases: int, seed: int, timeout: float, verbose: bool = False) -> list[str]:
    """Run `cases` cases; the failures' descriptions."""
    rng = random.Random(seed)
    failures = []
    kinds: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as home, serving() as port, client_settings(timeout, Path(home)):
        folder = Path(home) / "work"
        folder.mkdir()
        for number in range(cases):
            label, found = run_case(number, random.Random(rng.random()), port, folder, timeout, Path(home))
            kinds["failed" if found else "ok"] += 1
            if found:
                failures.append(label)
                print(label, flush=True)
            elif verbose:
                print(label, flush=True)
    print(f"{cases} cases, seed {seed}: {dict(kinds)}", file=sys.stderr)
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=2.0, help="the client's timeouts, shortened (default 2 s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every case, not only failures")
    args = parser.parse_args()
    return 1 if fuzz(args.cases, args.seed, args.timeout, args.verbose) else 0


if __name__ == "__main__":
    sys.exit(main())
