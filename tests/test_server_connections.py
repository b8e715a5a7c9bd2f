"""gptcli serve's connections: what a client that connects and then holds its connection can make the server do.

A real uvicorn server on a free loopback port, over a small Starlette app (no model), talked to with raw sockets.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
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
