"""How ollama's API answers: a reply as NDJSON lines (`message` or `response` pieces, then a `done` line with the
timings in nanoseconds) or one object, the served model as /api/tags, /api/show and /api/ps describe one, and
errors as `{"error": "..."}` (`OllamaErrors`, for every /api/ answer, the middleware's too)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from gptcli.decoding import Finished, Token
from gptcli.server.errors import APIError
from gptcli.server.state import DEFAULT_ALIAS, ServerState
from gptcli.tool_reply import ReplyReader, ToolReply

NDJSON = "application/x-ndjson"
LATEST = ":latest"  # the tag ollama's clients add to a name without one
# Our finish reasons as ollama names them ("load": a request with no prompt, which only loads the model).
DONE_REASONS = {"length": "length", "context": "length"}
BYTES_PER_PARAMETER = {"float32": 4.0, "fp32": 4.0, "float16": 2.0, "fp16": 2.0, "bfloat16": 2.0, "int8": 1.0}
# The weights' type as ollama names a quantization level (the onnx backend's int8 and int4 as llama.cpp's nearest).
LEVELS = {
    "float32": "F32",
    "fp32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "bfloat16": "BF16",
    "int8": "Q8_0",
    "int4": "Q4_0",
}
NEVER = datetime(2318, 1, 1, tzinfo=timezone.utc)  # /api/ps's expires_at: the model stays loaded


def timestamp(moment: datetime | None = None) -> str:
    """RFC 3339 in UTC, as ollama's created_at and modified_at are written."""
    return (moment or datetime.now(timezone.utc)).isoformat().replace("+00:00", "Z")


def ndjson(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n"


def tagged(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else name + LATEST


def served_as(state: ServerState, requested: str | None) -> str:
    """The name an answer gives the served model: as asked (its name or 'default', with or without ':latest'), or
    its tagged name when none is given; any other model is ollama's 404."""
    if requested in (None, ""):
        return tagged(state.model_name)
    if requested.removesuffix(LATEST) in (DEFAULT_ALIAS, state.model_name):
        return requested
    message = f"model '{requested}' not found: this server serves '{tagged(state.model_name)}'"
    raise APIError(404, message, param="model", code="model_not_found")


# --------------------------------------------------------------------------------------------------- the model


def details(state: ServerState) -> dict[str, Any]:
    """ollama's `details` of the served model, from what the backend says of it."""
    info = getattr(getattr(state.engine, "backend", None), "info", None)
    family = (
        str(getattr(info, "architecture", "") or "").lower().removesuffix("forcausallm").removesuffix("lmheadmodel")
    )
    params = int(getattr(info, "params", 0) or 0)
    size = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.2f}M"
    dtype = str(getattr(info, "dtype", "") or "")
    return {
        "parent_model": "",
        "format": "safetensors",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": size if params else "",
        "quantization_level": LEVELS.get(dtype, dtype.upper()),
    }


def model_size(state: ServerState) -> int:
    """The weights' bytes, from the parameters and their type."""
    info = getattr(getattr(state.engine, "backend", None), "info", None)
    params = int(getattr(info, "params", 0) or 0)
    return int(params * BYTES_PER_PARAMETER.get(str(getattr(info, "dtype", "")), 0.5))


def model_entry(state: ServerState) -> dict[str, Any]:
    """The served model as /api/tags lists it."""
    name = tagged(state.model_name)
    modified = datetime.fromtimestamp(state.created, timezone.utc) if state.created else None
    return {
        "name": name,
        "model": name,
        "modified_at": timestamp(modified),
        "size": model_size(state),
        "digest": hashlib.sha256(f"{state.model_name}\n{state.context_length}".encode()).hexdigest(),
        "details": details(state),
    }


def running_entry(state: ServerState) -> dict[str, Any]:
    """The served model as /api/ps lists it: loaded until the server stops."""
    info = getattr(getattr(state.engine, "backend", None), "info", None)
    on_gpu = str(getattr(info, "device", "cpu")).startswith("cuda")
    entry = model_entry(state)
    entry.pop("modified_at")
    vram = entry["size"] if on_gpu else 0
    return {**entry, "expires_at": timestamp(NEVER), "size_vram": vram, "context_length": state.max_model_len}


def show_body(state: ServerState) -> dict[str, Any]:
    """/api/show: the model's details, its chat template, the server's sampling defaults and its context length."""
    defaults = state.defaults
    parameters = {
        "temperature": defaults.temperature,
        "top_p": defaults.top_p,
        "top_k": defaults.top_k,
        "min_p": defaults.min_p,
        "repeat_penalty": defaults.repetition_penalty,
        "num_predict": defaults.max_tokens,
        "num_ctx": state.max_model_len,  # what a request may hold (the model's own is in model_info)
    }
    found = details(state)
    family = found["family"] or "general"
    info = getattr(getattr(state.engine, "backend", None), "info", None)
    return {
        "modelfile": f"FROM {tagged(state.model_name)}\n",
        "parameters": "\n".join(f"{key:<16}{value}" for key, value in parameters.items()),
        "template": state.tokenizer.chat_template or "",
        "details": found,
        "model_info": {
            "general.architecture": family,
            "general.parameter_count": int(getattr(info, "params", 0) or 0),
            f"{family}.context_length": state.context_length,
        },
        "capabilities": ["completion", "tools"],
        "modified_at": model_entry(state)["modified_at"],
    }


# --------------------------------------------------------------------------------------------------- a reply


@dataclass
class ReplyWriter:
    """One answer of /api/chat (`chat`: a `message`) or /api/generate (a `response`, and the `context` of token ids
    to send back). A reply that may call tools (`tools`) is gptcli.tools' JSON, read back into calls or text."""

    model: str
    chat: bool
    arrived: float  # time.perf_counter() when the request came
    tools: bool = False
    text_replies: bool = True  # with tools: an answer is text (else JSON of format's schema)
    prompt_ids: list[int] = field(default_factory=list)  # generate: the start of the context it returns

    def line(self, text: str, *, done: bool = False, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """A line (or the whole answer) carrying `text`, and an assistant's tool calls."""
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                message["tool_calls"] = calls
            said: dict[str, Any] = {"message": message}
        else:
            said = {"response": text}
        return {"model": self.model, "created_at": timestamp(), **said, "done": done}

    def loaded(self, reason: str = "load") -> dict[str, Any]:
        """The answer to a request with no prompt (ollama's way to load a model, or with keep_alive 0 unload it)."""
        return {**self.line(""), "done": True, "done_reason": reason}

    def final(self, finished: Finished, text: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The `done` line: the finish reason and ollama's counts and timings (nanoseconds)."""
        stats = finished.stats
        ending = {
            **self.line(text, done=True, calls=calls),
            "done_reason": DONE_REASONS.get(finished.reason, "stop"),
            "total_duration": int((time.perf_counter() - self.arrived) * 1e9),
            "load_duration": 0,  # the model stays loaded
            "prompt_eval_count": stats.prompt_tokens,
            "prompt_eval_duration": int(stats.prefill_s * 1e9),
            "eval_count": stats.new_tokens,
            "eval_duration": max(1, int(stats.decode_s * 1e9)),  # clients divide by it
        }
        if not self.chat:
            ending["context"] = [*self.prompt_ids, *finished.token_ids]
        return ending

    def read(self, finished: Finished) -> ToolReply:
        if not self.tools:
            return ToolReply((), finished.text)
        reader = ReplyReader(text=self.text_replies)
        reader.push(finished.text)
        return reader.finish()

    def whole(self, finished: Finished) -> dict[str, Any]:
        """The answer to a request with stream false."""
        reply = self.read(finished)
        return self.final(finished, reply.content or "", ollama_calls(reply))

    async def lines(
        self, source: AsyncIterator[tuple[int, Token | Finished]], failure: Callable[[Finished], APIError]
    ) -> AsyncIterator[str]:
        """The streamed answer: text as it comes (a call's JSON held until whole), the calls on a line of their
        own, then the done line; a reply that fails ends with `{"error": ...}`, which ollama's clients raise."""
        reader = ReplyReader(text=self.text_replies) if self.tools else None
        sent = ""
        async with aclosing(source) as events:
            async for _, event in events:
                if isinstance(event, Token):
                    text = reader.push(event.text) if reader is not None else event.text
                    if text:
                        sent += text
                        yield ndjson(self.line(text))
                    continue
                if event.reason in ("cancelled", "error"):
                    yield ndjson({"error": failure(event).message})
                    return
                reply = reader.finish() if reader is not None else ToolReply((), event.text)
                if calls := ollama_calls(reply):
                    yield ndjson(self.line("", calls=calls))
                elif rest := (reply.content or "")[len(sent) :]:  # not streamed: an answer's JSON, calls cut short
                    yield ndjson(self.line(rest))
                yield ndjson(self.final(event, ""))


def ollama_calls(reply: ToolReply) -> list[dict[str, Any]]:
    """The calls as ollama's `message.tool_calls`: arguments an object, not JSON text."""
    return [{"function": {"name": call.name, "arguments": json.loads(call.arguments)}} for call in reply.calls]


# --------------------------------------------------------------------------------------------------- errors

Scope = dict[str, Any]


class OllamaErrors:
    """ASGI middleware: an error answer under /api/ is ollama's `{"error": "<message>"}` (its clients read that
    string), whoever wrote it in OpenAI's shape (a route, the API key's 401, the body limit's 413, a full queue's
    503); the status and headers stay."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] | None = None
        body = b""

        async def reshaping(message: dict[str, Any]) -> None:
            nonlocal start, body
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            body += message.get("body", b"")
            if message.get("more_body", False):
                return
            reshaped = ollama_error(body)
            headers = [(key, value) for key, value in start["headers"] if key.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(reshaped)).encode())]})
            await send({"type": "http.response.body", "body": reshaped, "more_body": False})

        await self.app(scope, receive, reshaping)


def ollama_error(body: bytes) -> bytes:
    """OpenAI's error body as ollama's; any other body as it is."""
    try:
        found = json.loads(body)
    except ValueError:
        return body
    error = found.get("error") if isinstance(found, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return body
    return json.dumps({"error": error["message"]}, ensure_ascii=False).encode()
