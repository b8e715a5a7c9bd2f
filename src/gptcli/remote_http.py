"""HTTP for the remote client: one request as a `Reply` (status, headers, lines as they arrive), through
httpx when it is installed, the standard library otherwise; and what a busy answer asks of the client."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class Reply:
    """An HTTP response being read: its status, its lines as they arrive, and how to stop reading."""

    status: int
    headers: Mapping[str, str]
    lines: Iterator[str]
    close: Callable[[], None]

    def header(self, name: str) -> str | None:
        """A header's value, whatever case the server (or the HTTP library) gave its name."""
        name = name.lower()
        return next((value for key, value in self.headers.items() if key.lower() == name), None)

    def text(self) -> str:
        try:
            return "\n".join(self.lines)
        finally:
            self.close()


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
    except httpx.TimeoutException as exc:
        client.close()
        raise TimeoutError(str(exc)) from None
    except httpx.TransportError as exc:
        client.close()
        raise ConnectionError(str(exc) or type(exc).__name__) from None

    def lines() -> Iterator[str]:
        try:
            yield from response.iter_lines()
        except httpx.TimeoutException as exc:
            raise TimeoutError(str(exc)) from None
        except httpx.TransportError as exc:
            raise ConnectionError(str(exc) or type(exc).__name__) from None

    def close() -> None:
        response.close()
        client.close()

    return Reply(response.status_code, dict(response.headers), lines(), close)


def open_urllib(
    method: str, url: str, headers: dict[str, str], body: bytes | None, timeout: float, connect_timeout: float
) -> Reply:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # one limit for connecting and reading
    except urllib.error.HTTPError as exc:
        response = exc  # an error status: its body is the OpenAI error
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise TimeoutError(str(reason)) from None
        raise ConnectionError(getattr(reason, "strerror", None) or str(reason)) from None
    except TimeoutError as exc:
        raise TimeoutError(str(exc)) from None

    def lines() -> Iterator[str]:
        try:
            for raw in response:
                yield raw.decode("utf-8", errors="replace").rstrip("\r\n")
        except TimeoutError as exc:
            raise TimeoutError(str(exc)) from None
        except OSError as exc:
            raise ConnectionError(str(exc)) from None

    return Reply(response.status, dict(response.headers.items()), lines(), response.close)


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
