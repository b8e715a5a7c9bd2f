"""gptcli serve's connections: what a client that connects and then holds its connection can make the server do.

A real uvicorn server on a free loopback port, over a small Starlette app (no model), talked to with raw sockets.
"""

from __future__ import annotations

import asyncio
import http.client
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("uvicorn")
starlette = pytest.importorskip("starlette")


def small_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    async def health(_: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def echo(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"{len(await request.body())} bytes")

    async def slow_stream(_: Request) -> StreamingResponse:
        async def pieces() -> Any:
            for piece in range(4):
                await asyncio.sleep(0.4)
                yield f"{piece}\n"

        return StreamingResponse(pieces())

    return Starlette(
        routes=[Route("/health", health), Route("/echo", echo, methods=["POST"]), Route("/stream", slow_stream)]
    )


@pytest.fixture
def address(monkeypatch) -> Iterator[tuple[str, int]]:
    from gptcli.server import serving

    monkeypatch.setattr(serving, "HEADER_TIMEOUT_S", 0.6, raising=False)
    with serving.ThreadedServer(small_app()) as url:
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closed the connection within `seconds` (the answer it may have sent first is read)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def answer(sock: socket.socket) -> tuple[int, bytes]:
    """The status and body of the answer to the request just sent on `sock`."""
    sock.settimeout(10.0)
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.read()


def test_a_connection_that_does_not_finish_its_headers_in_time_is_closed(address):
    """A client that sent nothing, or half a request, or a header line now and then held its connection for as long
    as it liked: 1,024 of them (the connection limit) got every other request a 503, /health too."""
    silent = socket.create_connection(address)
    half = socket.create_connection(address)
    half.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    trickle = socket.create_connection(address)
    stop = threading.Event()

    def trickle_headers() -> None:
        try:
            trickle.sendall(b"GET /health HTTP/1.1\r\n")
            for line in range(40):  # a line every 0.1 s: 4 s of headers, each in time for the keep-alive timer
                if stop.wait(0.1):
                    return
                trickle.sendall(f"X-Line-{line}: x\r\n".encode())
        except OSError:
            pass  # closed: what this test wants

    sender = threading.Thread(target=trickle_headers)
    sender.start()
    started = time.monotonic()
    try:
        for sock in (silent, half, trickle):
            assert closed_within(sock, 3.0), "a connection without whole headers stayed open"
        assert time.monotonic() - started < 3.0
    finally:
        stop.set()
        sender.join()
        for sock in (silent, half, trickle):
            sock.close()
    with socket.create_connection(address) as sock:  # the server still answers
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert answer(sock) == (200, b"ok")


def test_the_header_timeout_leaves_answers_bodies_and_keep_alive_alone(address):
    """Once its headers came, a request may take longer than the header timeout: its body, its streamed answer,
    and the next request on the same connection (whose own headers start the timer again)."""
    with socket.create_connection(address) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # 1.6 s of answer
        assert answer(sock) == (200, b"0\n1\n2\n3\n")
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 8\r\n\r\n")
        for _ in range(8):  # a body over 1.6 s: BodyLimit's to bound, not the header timer's
            time.sleep(0.2)
            sock.sendall(b"x")
        assert answer(sock) == (200, b"8 bytes")
        time.sleep(0.3)  # idle a while, within keep-alive and the header timeout
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert answer(sock) == (200, b"ok")
        assert closed_within(sock, 3.0)  # and then nothing: closed, by the header timer before keep-alive's 5 s


def serve_under_ulimit(model: Any, tok: Any, ulimit: str, clients: int = 0) -> tuple[str, str]:
    """`gptcli serve` started under `ulimit`, `clients` streaming requests at once for 2 s: its stderr, and its limits
    on open files as it served them."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.test_server import free_port, scripted_env

    port = free_port()
    command = f'ulimit {ulimit} && exec "$0" -m gptcli serve -m "$1" -b scripted --port {port} --log-level warning'
    env = {**os.environ, **scripted_env(tok, "one two three " * 10, delay=0.05)}
    server = subprocess.Popen(
        ["sh", "-c", command, sys.executable, str(model)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    held: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 60
        while True:  # until it serves
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                with socket.create_connection(("127.0.0.1", port)) as probe:
                    probe.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    if answer(probe)[0] == 200:
                        break
            except OSError:
                time.sleep(0.1)
        with open(f"/proc/{server.pid}/limits") as file:
            limits = next(line for line in file if line.startswith("Max open files"))
        request = b'{"prompt": "Once", "max_tokens": 20, "stream": true}'
        for _ in range(clients):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s"
                % (len(request), request)
            )
            held.append(sock)
        time.sleep(2 if clients else 0)
    finally:
        for sock in held:
            sock.close()
        server.terminate()
        _, log = server.communicate(timeout=30)
    return log, limits


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/limits")
def test_a_low_file_limit_lowers_the_connection_cap_and_says_the_accept_error_once(tiny_models):
    """Under `ulimit -n 20` 30 streams at once wrote ~10,000 copies of asyncio's "socket.accept() out of system
    resource" with its traceback in 3 s (18 MB of log): one for each connection waiting, each time the loop tried."""
    from gptcli.tokenizer import Tokenizer

    tok = Tokenizer(tiny_models["llama"])
    log, limits = serve_under_ulimit(tiny_models["llama"], tok, "-n 40", clients=60)
    lines = log.splitlines()
    assert len(lines) < 200, f"{len(lines)} lines of log"
    assert "socket.accept() out of system resource" not in log
    assert sum("cannot accept new connections: Too many open files" in line for line in lines) == 1, log
    assert re.search(r"serving at most \d+ connections at once, not 1024: the process may open 40 files", log), log
    # With room to raise it, the soft limit goes up to the hard one (a soft 1,024 is a common default).
    log, limits = serve_under_ulimit(tiny_models["llama"], tok, "-Sn 40")
    soft, hard = limits.split()[3:5]
    assert soft == hard != "40", limits


def test_the_accept_error_filter_passes_other_errors_on():
    import logging

    from gptcli.server.descriptors import ACCEPT_ERROR, quiet_accept_errors

    loop = asyncio.new_event_loop()
    logged: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = logged.append  # type: ignore[method-assign]
    logging.getLogger("uvicorn.error").addHandler(handler)
    try:
        others: list[str] = []
        loop.set_exception_handler(lambda _, context: others.append(context["message"]))
        quiet_accept_errors(loop, every_s=3600)
        for _ in range(2048):  # asyncio's once per backlog slot
            loop.call_exception_handler({"message": ACCEPT_ERROR, "exception": OSError(24, "Too many open files")})

        # the accept() retries asyncio scheduled, firing after the listening socket closed (the server stopping)
        def _start_serving() -> None:
            pass

        retry = asyncio.Handle(_start_serving, (), loop)
        for _ in range(2048):
            failure = {"message": "Exception in callback", "handle": retry, "exception": ValueError("fd: -1")}
            loop.call_exception_handler(failure)
        loop.call_exception_handler({"message": "Task exception was never retrieved"})
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
        loop.close()
    assert [record.getMessage().split(";")[0] for record in logged] == [
        "cannot accept new connections: Too many open files (ulimit -n)"
    ]
    assert others == ["Task exception was never retrieved"]
