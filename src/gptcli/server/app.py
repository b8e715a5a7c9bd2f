"""The ASGI app factory: OpenAI and ollama routes, the chat page, /health and /metrics, guarded by the middleware."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response

from gptcli import __version__
from gptcli.server.errors import EVERY_METHOD, install_error_handlers, route_not_served
from gptcli.server.middleware import ApiKeyGuard, BodyLimit, CorsHeaders, CrossSiteGuard, RequestCounter
from gptcli.server.ollama_routes import router as ollama_router
from gptcli.server.ollama_shapes import OllamaErrors
from gptcli.server.openai_routes import router
from gptcli.server.origins import AllowedOrigins
from gptcli.server.responses_routes import router as responses_router
from gptcli.server.state import ServerState
from gptcli.server.token_routes import router as token_router

OPEN_PATHS = ("/health", "/")  # reachable without the API key (the page asks for it)
# The page talks to this origin only, and only its own <script> and <style> (by hash) may run: markup that
# reached the DOM some other way (an inline handler, a <script>, a style attribute) stays inert.
PAGE_CSP = (
    "default-src 'none'; script-src {script}; style-src {style}; connect-src 'self'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def inline_hashes(page: str, tag: str) -> str:
    """The CSP source list that allows exactly the page's inline <tag> blocks ('none' if it has none)."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
    digests = (base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() for block in blocks)
    return " ".join(f"'sha256-{digest}'" for digest in digests) or "'none'"


def page_headers(page: str) -> dict[str, str]:
    csp = PAGE_CSP.format(script=inline_hashes(page, "script"), style=inline_hashes(page, "style"))
    return {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


@dataclass(frozen=True)
class ServerConfig:
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    manage_engine: bool = True  # start the engine with the app, stop it when the app stops
    allowed_origins: AllowedOrigins = field(default_factory=AllowedOrigins)  # other sites' pages (--allowed-origin)
    host: str | None = None  # the address it listens on (--host): on loopback, requests for other names are refused


def chat_page() -> str:
    return resources.files("gptcli.server").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(state: ServerState, config: ServerConfig | None = None) -> FastAPI:
    """The whole server as one ASGI application over an engine that the caller built."""
    config = config or ServerConfig()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if config.manage_engine:
            state.engine.start()
        try:
            yield
        finally:
            if config.manage_engine:
                # The server's drain (serving.make_server) has let in-flight work finish; end what is left.
                await asyncio.to_thread(state.engine.stop, 0.0)

    app = FastAPI(title="gptcli", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gptcli = state
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(responses_router)
    app.include_router(token_router)
    app.include_router(ollama_router)  # ollama's API (/api/*), for the apps that speak it
    page = chat_page()
    headers = page_headers(page)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # HEAD: curl -I, load balancers
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: what some load balancers probe with
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": state.model_name}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    served = [*router.routes, *responses_router.routes, *token_router.routes, *ollama_router.routes]
    openai_paths = sorted({path for route in served if (path := getattr(route, "path", "")).startswith("/v1/")})
    openai_answers = ", ".join(path for path in openai_paths if "{" not in path) + " (and ollama's API under /api)"
    other_answers = "/ (the chat page), /health, /metrics, /tokenize, /detokenize, OpenAI's API under /v1 and ollama's"
    other_answers += " under /api"

    # Last, so that it takes only what no route above serves: OpenAI's other routes (embeddings, images, audio,
    # files...) get a line naming what this server answers, and any other path (/favicon.ico, /v2/...) or
    # method (POST /health) the same 404 or 405 in OpenAI's shape, not a bare "Not Found" without a code.
    @app.api_route("/{rest:path}", methods=EVERY_METHOD, include_in_schema=False)
    async def unsupported(rest: str, request: Request) -> Response:
        path = f"/{rest}"
        answers = openai_answers if path == "/v1" or path.startswith("/v1/") else other_answers
        # app.routes holds this app's own routes (/, /health, /metrics); an included router's are in `served`.
        raise route_not_served(path, request.method, [*served, *app.routes], answers)

    # Added innermost first: the counter sees every answer, the key is checked before the body is read, and an
    # allowed origin's page can read a 401 (a preflight needs no key).
    routes = ["/", "/health", "/metrics", *(getattr(route, "path", "") for route in served)]
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(CrossSiteGuard, allowed=config.allowed_origins, listen_host=config.host)
    app.add_middleware(ApiKeyGuard, api_key=config.api_key, open_paths=OPEN_PATHS)
    if config.allowed_origins:
        app.add_middleware(CorsHeaders, allowed=config.allowed_origins)
        app.state.allowed_origins = config.allowed_origins  # the 500 handler, outside every middleware, adds them too
    app.add_middleware(OllamaErrors)  # /api/*'s errors, the middleware's above too, in ollama's shape
    app.add_middleware(RequestCounter, metrics=state.metrics, routes=routes)
    return app
