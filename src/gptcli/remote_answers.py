"""What an OpenAI-compatible server answered, read: an error body's message (in any server's shape), a stream
chunk or a whole answer checked against OpenAI's shape, the token counts of its usage object, a streamed
reply's stats, and a redirect (not followed)."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

from gptcli.decoding import Stats
from gptcli.errors import ContextLengthError, GptcliError, InputError, ModelError, RemoteError, clipped

HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
HTML_TAG = re.compile(r"<[^>]*>")


def error_message(text: str) -> tuple[str, str | None]:
    """OpenAI's {"error": {"message", "code"}}, vLLM's {"object": "error", "message"}, FastAPI's {"detail"}, or
    the body's first line; the message as one line (a server may send a traceback), whole: errors quote it
    clipped, after it decided what kind of error it is."""
    message, code = _error_parts(text)
    return " ".join(message.split()), code


def _error_parts(text: str) -> tuple[str, str | None]:
    try:
        data = json.loads(text)
    except ValueError:
        page = text.strip()
        if page.startswith("<"):  # a web server's page (python -m http.server, a proxy): its title, not "<!DOCTYPE"
            found = HTML_TITLE.search(page[:8192])
            title = " ".join((found.group(1) if found else HTML_TAG.sub(" ", page[:8192])).split())[:80]
            return f"an HTML page{f' ({title})' if title else ''}, not an OpenAI-style answer", None
        return (page.splitlines() or [""])[0], None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        message = error.get("message") or ""
        if not isinstance(message, str):  # shown as the JSON it was, not in Python's words (['a', 'b'])
            message = json.dumps(message)
        return message, error.get("code")
    if isinstance(error, str):
        return error, None
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return data["message"], data.get("code") if isinstance(data.get("code"), str) else None
    if isinstance(data, dict) and isinstance(data.get("detail"), str):
        return data["detail"], None
    return text.strip(), None


def parse_chunk(data: str, base_url: str, *, chat: bool, whole: bool = False) -> dict[str, Any]:
    """A stream chunk, checked; or (`whole`) a whole answer as one chunk, each chat message as its delta."""
    what = "an answer" if whole else "a stream chunk"
    try:
        chunk = json.loads(data)
    except ValueError:
        raise RemoteError(f"{base_url} sent {what} that is not JSON: {data[:80]}") from None
    if not isinstance(chunk, dict):
        raise RemoteError(f"{base_url} sent {what} that is not an object")
    if chunk.get("error") is not None:  # a field "error": null (beside the text) is no error
        message, _ = error_message(data)
        raise RemoteError(f"{base_url} failed mid-answer: {clipped(message)}")
    if whole and chat and isinstance(chunk.get("choices"), list):
        chunk["choices"] = [{**c, "delta": c.get("message")} if isinstance(c, dict) else c for c in chunk["choices"]]
    if problem := chunk_problem(chunk, chat=chat):
        raise RemoteError(f"{base_url} sent {what} not in OpenAI's shape ({problem}): {data[:80]}")
    return chunk


def chunk_problem(chunk: dict[str, Any], *, chat: bool) -> str | None:
    """What of a chunk's choices is not in OpenAI's shape (a list of objects, their text a string), else None."""
    choices = chunk.get("choices")
    if choices is not None and not (isinstance(choices, list) and all(isinstance(c, dict) for c in choices)):
        return "choices is not a list of objects"
    for choice in choices or []:
        delta = choice.get("delta")
        if delta is not None and not isinstance(delta, dict):
            return "a delta is not an object"
        name, text = ("delta.content", (delta or {}).get("content")) if chat else ("text", choice.get("text"))
        if text is not None and not isinstance(text, str):
            return f"a {name} is not a string"
        called = (delta or {}).get("tool_calls") if chat else None
        if called is not None and not (isinstance(called, list) and all(isinstance(c, dict) for c in called)):
            return "a delta.tool_calls is not a list of objects"
        if not isinstance(choice.get("finish_reason"), (str, type(None))):
            return "a finish_reason is not a string"
    return None


def count(usage: Any, key: str) -> int | None:
    """A token count from a server's usage object; None where it gives none or one that is not a count, as for a
    server that sends no usage (its new tokens are then counted from the chunks)."""
    value = usage.get(key) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def streamed_stats(
    start: float,
    first: float | None,
    end: float,
    new_tokens: int,
    *,
    prompt_tokens: int | None = None,
    cached_tokens: int = 0,
) -> Stats:
    """A streamed reply's stats, from when it was asked for, its first token's time (None: none came) and its end.
    The server's own prefill is not seen here: it is the time to the first token. The prompt's tokens are the
    server's count (None: it gave none, or the stream broke before its end)."""
    first = end if first is None else first
    steps = max(new_tokens - 1, 0)
    return Stats(
        prompt_tokens, cached_tokens, new_tokens, steps, first - start, first - start, end - first, end - start
    )


def redirect_error(base_url: str, reply: Any, url: str, path: str) -> RemoteError:
    """A redirect, not followed: it would take the request (and its API key) where --url did not say."""
    from urllib.parse import urljoin

    where = f"{base_url} answered {reply.status}"
    location = " ".join((reply.header("Location") or "").split())
    if not location:
        return RemoteError(f"{where}, a redirect to nowhere", hint="is this an OpenAI-style URL?")
    with contextlib.suppress(ValueError):  # not a URL: shown as sent
        location = urljoin(url, location)
    moved = location.removesuffix(path) if location.endswith(path) else None
    hint = f"use --url {clipped(moved)}" if moved else "give --url the new address"
    return RemoteError(f"{where}: moved to {clipped(location)}", hint=f"{hint} (redirects are not followed)")


# How servers word it when the code is missing: vLLM "maximum context length", llama-server "context size".
_CONTEXT_WORDS = re.compile(r"context (length|size|window)|model's context", re.IGNORECASE)
_REASONS = {401: "unauthorized", 403: "forbidden", 404: "not found", 429: "too many requests", 503: "busy"}


def status_error(base_url: str, status: int, text: str, retry: float | None, path: str = "") -> GptcliError:
    """An error status (and its body's `text`, its Retry-After in seconds) as the GptcliError it means, with the
    server's own message. A 404 for `/models` itself, or one a server says is a route's (`code: not_found`), is the
    URL's (it lacks its /v1, say), whatever its message says of models: not an unknown model (exit 5)."""
    message, code = error_message(text)
    where = f"{base_url} answered {status}"
    message = message or _REASONS.get(status, "request failed")  # the whole of it decides the kind
    said = clipped(message)
    route_missing = path == "/models" or code == "not_found"
    if status == 404 and (code == "model_not_found" or ("model" in message.lower() and not route_missing)):
        return ModelError(f"{where}: {said}", hint="`curl <url>/models` lists what it serves")
    if status == 400 and (code == "context_length_exceeded" or _CONTEXT_WORDS.search(message)):
        return ContextLengthError(f"{where}: {said}")
    if status in (400, 413, 422):
        return InputError(f"{where}: {said}")
    if status in (401, 403):
        return RemoteError(f"{where}: {said}", hint="pass --api-key KEY or set OPENAI_API_KEY")
    if status in (429, 503):  # retry: seconds; not a date, nor what is not a time at all ("retry in abc s")
        return RemoteError(f"{where}: {said}", hint=f"retry in {retry:g} s" if retry is not None else "retry later")
    if status == 404:
        hint = "is it an OpenAI-compatible server?" if base_url.endswith("/v1") else "the URL usually ends in /v1"
        return RemoteError(f"{where}: {said}", hint=hint)
    return RemoteError(f"{where}: {said}")
