"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}} with the right HTTP status."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute

from gptcli.errors import FieldError, GptcliError, QueueFullError
from gptcli.textio import one_line

# OpenAI's error types by status (what its SDK and other clients look at besides the status).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    503: "server_overloaded",
}


class APIError(Exception):
    """An error the server answers with: status, one-line message, and OpenAI's param and code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# The methods a catch-all route takes, so that route_not_served answers each of them (OPTIONS too: left out, Starlette
# answered it with a bare 405 on any path).
EVERY_METHOD = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def route_not_served(path: str, method: str, routes: Iterable[BaseRoute], answers: str) -> APIError:
    """The answer to a path no route serves with this method: 405 naming the methods where one serves it with
    others, else 404 saying what the server answers instead (`answers`), as one line a client can act on."""
    methods = next((route.methods for route in routes if getattr(route, "path", None) == path), None)
    if methods and method not in methods:
        allowed = ", ".join(sorted(methods))
        return APIError(405, f"{path} takes {allowed}, not {method}", headers={"Allow": allowed})
    return APIError(404, f"{path} is not supported: gptcli serve answers {answers}", code="not_found")


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    shown = one_line(param) if param is not None else None
    return {"error": {"message": one_line(message), "type": kind, "param": shown, "code": code}}


def field_error(error: FieldError) -> APIError:
    """A request field the core refused (gptcli.stopping, output_requests, prompts) as the 400 that names it."""
    return APIError(400, error.message, param=error.param, code="invalid_value")


def from_gptcli_error(error: GptcliError) -> APIError:
    """A core error (engine, prompt building) as the API error it causes."""
    message = error.message + (f" ({error.hint})" if error.hint else "")
    if isinstance(error, QueueFullError):
        return APIError(503, message, code="queue_full", headers={"Retry-After": "1"})
    status = getattr(error, "http_status", 500)
    headers = {"Retry-After": "1"} if status == 503 else None
    return APIError(status, message, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem of a request body, named the way OpenAI names parameters."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the server in OpenAI's shape, including FastAPI's own (404 routes, 422 bodies)."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(GptcliError)
    async def gptcli_error(_: Request, exc: GptcliError) -> JSONResponse:
        return from_gptcli_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return APIError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, _: Exception) -> JSONResponse:
        # Starlette's outermost middleware calls this (Starlette's own was a plain-text "Internal Server Error"), then
        # raises the exception on to uvicorn, which logs its traceback, once, and goes on serving.
        error = APIError(500, "the server failed to answer this request (its log says why)", code="internal_error")
        if request.url.path.startswith("/api/"):  # outside OllamaErrors, which writes ollama's shape on its routes
            response = JSONResponse({"error": error.message}, status_code=500)
        else:
            response = error.response()
        allowed = getattr(request.app.state, "allowed_origins", None)  # outside CorsHeaders too: its headers here
        if allowed is not None:
            response.raw_headers.extend(allowed.answer_headers(request.headers.get("origin")))
        return response

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return APIError(exc.status_code, message, headers=dict(exc.headers or {})).response()
