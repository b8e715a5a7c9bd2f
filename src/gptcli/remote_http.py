"""HTTP for the remote client: one request as a `Reply` (status, headers, the body as it arrives), through
httpx when it is installed, the standard library otherwise; and what a busy answer asks of the client.

Every read is bounded: each wait for bytes by the request's read timeout, and the body as a whole by size and
by a deadline (a whole body) or by the wait for each line (a stream), so a server that sends a byte at a time,
or without end, cannot hold the client."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

MAX_LINE_BYTES = 16 << 20  # one line of a stream (an SSE event): a few hundred bytes in practice
READ_BYTES = 65536  # the most one read asks for


@dataclass
class Reply:
    """An HTTP response being read: its status, its body's bytes as they arrive, and how to stop reading."""

    status: int
    headers: Mapping[str, str]
    chunks: Iterator[bytes]
    close: Callable[[], None]
    deadline: float = float("inf")  # time.monotonic() by which the request as a whole must be answered
    timeout: float = float("inf")  # the seconds it was given: what the deadline was set from
    cut: bool = False  # lines() gave a last line that had no line end: the connection closed in the middle of it

    def header(self, name: str) -> str | None:
        """A header's value, whatever case the server (or the HTTP library) gave its name."""
        name = name.lower()
        return next((value for key, value in self.headers.items() if key.lower() == name), None)

    def body(self, limit: int, deadline: float | None = None) -> bytes:
        """At most `limit` bytes of the body (the rest is never read), read by `deadline` (default: the
        request's), else TimeoutError; then the reply is closed."""
        deadline = self.deadline if deadline is None else deadline
        data = bytearray()
        try:
            for chunk in self.chunks:
                data += chunk
                if len(data) >= limit:
                    return bytes(data[:limit])
                if time.monotonic() > deadline:
                    raise TimeoutError("the answer did not end in time")
            return bytes(data)
        finally:
            self.close()

    def text(self, limit: int, deadline: float | None = None) -> str:
        return self.body(limit, deadline).decode("utf-8", errors="replace")

    def lines(self, idle_s: float) -> Iterator[str]:
        """The body's lines as they arrive, without their line ends; TimeoutError when no line ends for `idle_s`
        seconds however many bytes come (a server sending a byte at a time), ConnectionError for a line over
        MAX_LINE_BYTES."""
        parts: list[bytes] = []  # the line being read
        size = 0
        last = time.monotonic()
        for chunk in self.chunks:
            *complete, rest = chunk.split(b"\n")
            if complete:
                complete[0], parts, size = b"".join((*parts, complete[0])), [], 0
                for raw in complete:
                    yield raw.decode("utf-8", errors="replace").removesuffix("\r")
                last = time.monotonic()  # (the time the caller spends on a line is not the server's)
            elif time.monotonic() - last > idle_s:
                raise TimeoutError(f"no line in {idle_s:g} s")
            parts.append(rest)
            size += len(rest)
            if size > MAX_LINE_BYTES:
                raise ConnectionError(f"a line of over {MAX_LINE_BYTES >> 20} MiB")
        if size:
            self.cut = True
            yield b"".join(parts).decode("utf-8", errors="replace").removesuffix("\r")


# The fix a failed connection's reason points to (RemoteModel gives it as the error's hint).
TLS_HINTS = {
    "not an HTTP answer": "is that the server's port? (another program answers there)",
    "CERTIFICATE_VERIFY_FAILED": "a server of yours with a self-signed certificate? trust it: SSL_CERT_FILE=cert.pem "
    "(which then stands in for the system's CA bundle)",
    "WRONG_VERSION_NUMBER": "the server speaks plain HTTP: use http://",
    "disconnected without sending a response": "does the server speak HTTPS? then use https://",
}


class ConnectFailure(ConnectionError):
    """No connection to the server; `hint` is the fix where the reason names one (a certificate not trusted)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.hint = next((hint for key, hint in TLS_HINTS.items() if key in reason), None)


@functools.cache
def _tls_context() -> Any:
    """One TLS context for every request (SSL_CERT_FILE and SSL_CERT_DIR still apply). A client built without
    one loads the CA bundle again: ~20 ms of CPU a request, so `generate --batch --url` spent more time
    there than the server spent answering (5,000 lines: 120 s of client CPU against 23 s of server work)."""
    import httpx

    return httpx.create_ssl_context()


def open_httpx(
    method: str, url: str, headers: dict[str, str], body: bytes | None, timeout: float, connect_timeout: float
) -> Reply:
    import httpx

    client = httpx.Client(timeout=httpx.Timeout(timeout, connect=connect_timeout), verify=_tls_context())
    try:
        response = client.send(client.build_request(method, url, headers=headers, content=body), stream=True)
    except httpx.ConnectTimeout:  # never connected: not a server slow to answer (the request's own timeout)
        client.close()
        raise ConnectFailure(f"no connection in {connect_timeout:g} s") from None
    except httpx.TimeoutException as exc:
        client.close()
        raise TimeoutError(str(exc)) from None
    except httpx.TransportError as exc:
        client.close()
        raise ConnectFailure(str(exc) or type(exc).__name__) from None

    def chunks() -> Iterator[bytes]:
        try:
            yield from response.iter_bytes()  # what each read brings (decompressed), each read under `timeout`
        except httpx.TimeoutException as exc:
            raise TimeoutError(str(exc)) from None
        except httpx.RemoteProtocolError as exc:  # as urllib's: h11's words, without the bytes it quotes
            said = str(exc).split(":", 1)[0] or type(exc).__name__
            raise ConnectionError(f"the body was cut short or garbled: {said}") from None
        except httpx.TransportError as exc:
            raise ConnectionError(str(exc) or type(exc).__name__) from None

    def close() -> None:
        response.close()
        client.close()

    return Reply(response.status_code, dict(response.headers), chunks(), close)


def open_urllib(
    method: str, url: str, headers: dict[str, str], body: bytes | None, timeout: float, connect_timeout: float
) -> Reply:
    import http.client
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        response = _no_redirects().open(request, timeout=timeout)  # one limit for connecting and reading
    except urllib.error.HTTPError as exc:
        response = exc  # an error status: its body is the OpenAI error
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise TimeoutError(str(reason)) from None
        raise ConnectFailure(getattr(reason, "strerror", None) or str(reason)) from None
    except TimeoutError as exc:
        raise TimeoutError(str(exc)) from None
    except OSError as exc:  # the answer's status line and headers are read outside urllib's own error handling
        raise ConnectFailure(str(exc) or type(exc).__name__) from None
    except http.client.HTTPException as exc:  # no HTTP answer (another protocol on the port), a header too long
        raise ConnectFailure(f"not an HTTP answer: {_said(exc)}") from None

    def chunks() -> Iterator[bytes]:
        try:
            while chunk := response.read1(READ_BYTES):  # what one read brings, under `timeout`
                yield chunk
        except TimeoutError as exc:
            raise TimeoutError(str(exc)) from None
        except OSError as exc:
            raise ConnectionError(str(exc)) from None
        except http.client.HTTPException as exc:  # a chunked body cut short or garbled
            raise ConnectionError(f"the body was cut short or garbled: {_said(exc)}") from None

    headers = dict(response.headers.items())
    encoding = (response.headers.get("Content-Encoding") or "").strip().lower()
    body = inflated(chunks()) if encoding in ("gzip", "x-gzip", "deflate") else chunks()
    return Reply(response.status, headers, body, response.close)


def _said(exc: Exception) -> str:
    """An http.client error in one short line: its name, and what the server sent where it says (printably)."""
    name, said = type(exc).__name__, " ".join(str(exc).split())[:80]
    return said if said.startswith(name) else f"{name} {said!r}" if said else name


def inflated(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """A gzip or zlib body (a server or proxy that compresses unasked: urllib does not) as it inflates, at most
    READ_BYTES at a time, however much a read inflates to; ConnectionError for one that is corrupt."""
    import zlib

    inflate = zlib.decompressobj(32 + zlib.MAX_WBITS)  # gzip or zlib, by its header
    try:
        for chunk in chunks:
            while chunk:
                if data := inflate.decompress(chunk, READ_BYTES):
                    yield data
                chunk = inflate.unconsumed_tail
        if data := inflate.flush():
            yield data
    except zlib.error as exc:
        raise ConnectionError(f"a compressed body that does not inflate ({exc})") from None


@functools.cache
def _no_redirects() -> Any:
    """urllib's opener without its redirect handling: a redirect is answered as it is (httpx's default too)."""
    import urllib.request

    class Unfollowed(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None  # urllib then raises the 3xx as an HTTPError: its answer

    return urllib.request.build_opener(Unfollowed)


def default_opener() -> Callable[..., Reply]:
    try:
        import httpx  # noqa: F401
    except ImportError:
        return open_urllib
    return open_httpx


def retry_after(reply: Reply) -> float | None:
    """The seconds a 429 or 503 asks the client to wait before sending again (Retry-After in seconds), or None."""
    value = (reply.header("Retry-After") or "").strip()
    try:
        seconds = float(value)
    except ValueError:  # absent, or an HTTP date (rare): not retried
        return None
    return seconds if 0 <= seconds < float("inf") else None
