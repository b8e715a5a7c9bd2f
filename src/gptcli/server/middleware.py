"""Pure ASGI middleware: request counting, CORS for the allowed origins, the API key, other sites' pages, and the
body-size limit.

They wrap the app outermost-first in that order, so a refused request is still counted, a browser can read
why its request was refused (a 401), and an unauthenticated or cross-site client never gets its body read.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from starlette.responses import Response

from gptcli.server.errors import APIError
from gptcli.server.metrics import Metrics
from gptcli.server.origins import AllowedOrigins
from gptcli.server.serving import LOOPBACK_NAMES, is_loopback

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]
ASGIApp = Callable[[Scope, Receive, Send], Any]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestCounter:
    """Count every HTTP request by route and final status (unknown paths share one 'other' label)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = {r for r in routes if "{" not in r}
        # Routes with a path parameter count under their template: "/v1/models/{model_id:path}".
        self.templates = [(r.split("{", 1)[0], r) for r in routes if "{" in r]

    def label(self, path: str) -> str:
        if path in self.routes:
            return path
        return next((template for prefix, template in self.templates if path.startswith(prefix)), "other")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self.label(scope["path"])
        status: int | None = None
        finished = failed = False

        async def counting_send(message: dict[str, Any]) -> None:
            nonlocal status, finished
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True

        try:
            await self.app(scope, receive, counting_send)
        except BaseException:
            failed = True
            raise
        finally:
            self.metrics.count_request(route, _final_status(status, finished, failed))


def _final_status(status: int | None, finished: bool, failed: bool) -> int:
    """The status a request counts under: what was sent, or nginx's 499 for a client that left first.

    A client can leave before an answer was due (e.g. while sending its body) or in the middle of one (a stream
    it stopped reading): both are 499, not the 200 whose headers went out. An app that failed before its answer
    was complete is a 500.
    """
    if status is not None and finished:
        return status
    return 500 if failed else 499


class ApiKeyGuard:
    """With a key set, every path except the open ones needs `Authorization: Bearer <key>` (401 otherwise)."""

    def __init__(self, app: ASGIApp, api_key: str | None, open_paths: Iterable[str]) -> None:
        self.app = app
        self.api_key = api_key
        self.open_paths = set(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.api_key or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"authorization") or ""
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            await self.app(scope, receive, send)
            return
        message = "invalid API key" if given else "missing API key: send the header 'Authorization: Bearer <key>'"
        error = APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await error.response()(scope, receive, send)


class CorsHeaders:
    """Let the pages of the allowed origins read the answers (CORS): a preflight (OPTIONS with
    Access-Control-Request-Method) is answered here, with no key, and every other answer to such a page (a stream
    too, and a 401) names its origin in Access-Control-Allow-Origin. Other origins pass by untouched."""

    def __init__(self, app: ASGIApp, allowed: AllowedOrigins) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = _header(scope, b"origin") if scope["type"] == "http" else None
        if origin is None or not self.allowed.allows(origin):
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS" and _header(scope, b"access-control-request-method") is not None:
            await Response(status_code=204, headers=preflight_headers(scope, origin))(scope, receive, send)
            return
        added = self.allowed.answer_headers(origin)

        async def with_cors(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *added]}
            await send(message)

        await self.app(scope, receive, with_cors)


# What a page may send when it asks for no headers, or for some that are not header names.
DEFAULT_ALLOWED_HEADERS = "Authorization, Content-Type"
_HEADER_NAMES = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+(?:[ \t]*,[ \t]*[!#$%&'*+.^_`|~0-9a-z-]+)*", re.IGNORECASE)
PREFLIGHT_MAX_AGE_S = 600  # how long a browser may reuse the answer (Chromium keeps it at most 2 hours)


def preflight_headers(scope: Scope, origin: str) -> dict[str, str]:
    """The answer to an allowed origin's preflight: its methods, the headers it asked for (OpenAI's JS SDK sends its
    own x-stainless-* ones beside Authorization: the key still guards every request that follows)."""
    asked = (_header(scope, b"access-control-request-headers") or "").strip()
    headers = {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": asked if _HEADER_NAMES.fullmatch(asked) else DEFAULT_ALLOWED_HEADERS,
        "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
        "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    }
    if (_header(scope, b"access-control-request-private-network") or "").lower() == "true":
        headers["Access-Control-Allow-Private-Network"] = "true"  # a public site's page calling this machine
    return headers


# Names a DNS rebinding cannot take (ollama's list): special-use or local-network domains no public DNS answers for
LOCAL_SUFFIXES = (".localhost", ".local", ".internal")


def this_machine(name: str) -> bool:
    """`name` (a Host's, lowercase, port and trailing dot left off) names this machine or its local network, as
    ollama allows on a loopback server: localhost and *.localhost, *.local and *.internal, the machine's own host
    name, or an IP address that is loopback, private or unspecified (`OLLAMA_HOST=0.0.0.0:11434` clients send that)."""
    if name in LOOPBACK_NAMES or name.endswith(LOCAL_SUFFIXES):
        return True
    try:
        address = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return name == socket.gethostname().lower()
    return address.is_private or address.is_unspecified  # private: loopback addresses too


class CrossSiteGuard:
    """Refuse (403) a request that another site's web page made a browser send, as ollama does by default, unless
    that site's origin is allowed (--allowed-origin).

    A page anywhere could otherwise POST to a keyless server on the user's loopback and make the model
    generate (it cannot read the answer: no CORS headers are sent, but the machine works for it). The chat
    page is this origin's own; API clients (curl, SDKs) send no Origin. Reading (GET) stays open.

    A server on a loopback address (`listen_host`, as --host gave it) also refuses any request for a name that
    is not this machine's (DNS rebinding: a page whose name an attacker's DNS turned into 127.0.0.1 is this
    server's own origin to the browser, so it could read every answer and pass the checks above).
    """

    def __init__(self, app: ASGIApp, allowed: AllowedOrigins | None = None, listen_host: str | None = None) -> None:
        self.app = app
        self.allowed = allowed or AllowedOrigins()
        self.on_loopback = listen_host is not None and is_loopback(listen_host)

    def foreign_host(self, scope: Scope) -> str | None:
        """The request's Host when the server is on loopback and that is not a name for this machine."""
        host = _header(scope, b"host")
        if not self.on_loopback or not host:  # HTTP/1.0 sends none
            return None
        try:
            name = (urlsplit(f"//{host}").hostname or "").rstrip(".")
        except ValueError:  # "[::1" and the like
            return host
        return None if this_machine(name) else host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (host := self.foreign_host(scope)) is not None:
            message = (
                f"this server answers requests for this machine's names and addresses, not for {host!r}: a web page "
                "may have had that name point at this machine (DNS rebinding)"
            )
            hint = "a reverse proxy before it should send this machine's Host (nginx: proxy_set_header Host localhost)"
            await APIError(403, f"{message} ({hint})", code="host_not_allowed").response()(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] not in {"GET", "HEAD", "OPTIONS"}:
            origin = _header(scope, b"origin")
            fetch_site = _header(scope, b"sec-fetch-site")
            host = (_header(scope, b"host") or "").lower()
            # The browser's own word first (behind a reverse proxy, Host is the proxy's upstream); else Origin.
            if not self.allowed.allows(origin) and (
                fetch_site in {"cross-site", "same-site"}
                or (
                    fetch_site is None
                    and origin is not None
                    and (origin == "null" or urlsplit(origin).netloc.lower() != host)
                )
            ):
                message = (
                    f"a web page from {origin or 'another site'} may not use this server: only its own chat page, "
                    "programs (curl, OpenAI's SDK) and the origins the server was started with --allowed-origin may"
                )
                await APIError(403, message, code="cross_origin").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# A body must keep coming (nginx's client_body_timeout) and arrive whole within a bound: one shorter than its
# Content-Length, or sent a byte at a time, held its connection and task forever.
BODY_IDLE_S = 30.0
BODY_TOTAL_S = 300.0


class BodyLimit:
    """Refuse a request body over `limit` bytes with 413, while reading it and before anything parses it;
    one that stalls for `idle_s` or is not whole after `total_s` gets 408.

    The body is read here in full (it is small by construction) and replayed to the app; later
    receive() calls go to the server, so the app still hears about a client that disconnects.
    """

    def __init__(self, app: ASGIApp, limit: int, idle_s: float = BODY_IDLE_S, total_s: float = BODY_TOTAL_S) -> None:
        self.app = app
        self.limit = limit
        self.idle_s = idle_s
        self.total_s = total_s

    def _too_large(self) -> APIError:
        return APIError(
            413, f"the request body is over the server's limit of {self.limit} bytes", code="body_too_large"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in {"GET", "HEAD", "OPTIONS"}:
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large().response()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.total_s
        while True:
            wait = min(self.idle_s, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(wait, 0.0))
            except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11
                error = APIError(
                    408,
                    f"the request body stopped coming (or took over {self.total_s:g} s): "
                    f"{size} bytes arrived, {_header(scope, b'content-length') or 'more'} were due",
                    code="request_timeout",
                    headers={"Connection": "close"},
                )
                await error.response()(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large().response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
