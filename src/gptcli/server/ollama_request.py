"""ollama's request bodies (POST /api/chat, /api/generate, /api/show) read into what the OpenAI routes take: its
`options` as sampling fields, `format` as a response_format, its messages (tool calls' arguments an object, a
tool's result named by `tool_name`) as a chat's. A 400 names ollama's field (`options.temperature`, `format`),
not the OpenAI field it became."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from gptcli.server.errors import APIError
from gptcli.server.schemas import REQUEST_MODEL, ChatRequest, SamplingRequest, validate_body

Request = TypeVar("Request", bound=SamplingRequest)

# ollama's options that set what an OpenAI request's fields set here.
OPTION_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
# An error's OpenAI field, as this API names it (the longest first: a message is rewritten by prefix).
OLLAMA_NAMES = {
    "response_format.json_schema.schema": "format",
    "response_format": "format",
    "max_tokens": "options.num_predict",
    **{field: f"options.{option}" for option, field in OPTION_FIELDS.items()},
}
UNTIL_CONTEXT = (-1, -2)  # num_predict: generate until the context is full (ollama's -2 fills it too)


def invalid(param: str, says: str) -> APIError:
    return APIError(400, f"{param}: {says}", param=param, code="invalid_value")


def ollama_name(param: str) -> str:
    """An OpenAI field's name (`response_format.json_schema.schema`, `max_tokens`) as ollama's request names it."""
    for field, name in OLLAMA_NAMES.items():
        if param == field or param.startswith(field + "."):
            return name if field.startswith("response_format") else name + param[len(field) :]
    return param


@contextlib.contextmanager
def ollama_names() -> Iterator[None]:
    """Errors raised inside name ollama's fields rather than the OpenAI ones they were read into."""
    try:
        yield
    except APIError as exc:
        if exc.param is None or (renamed := ollama_name(exc.param)) == exc.param:
            raise
        message = exc.message.replace(exc.param, renamed, 1)
        raise APIError(exc.status, message, param=renamed, code=exc.code, headers=exc.headers) from None


class OllamaOptions(BaseModel):
    """ollama's `options`. The honoured ones are read into the sampling settings; the others (typed as ollama
    types them, so a wrong type is still a 400) are accepted and change nothing, as ollama ignores options a
    model does not use; an unknown one is ignored, as ollama does."""

    model_config = REQUEST_MODEL
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    num_predict: int | None = None
    stop: str | list[str] | None = None
    repeat_penalty: float | None = Field(None, ge=0)  # 0 is off, as 1 is (openai_fields)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: int | None = None  # the model's own context is used
    # Accepted, and change nothing here.
    num_keep: int | None = None
    typical_p: float | None = None
    repeat_last_n: int | None = None
    tfs_z: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    penalize_newline: bool | None = None
    numa: bool | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    low_vram: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    num_thread: int | None = None


class OllamaBody(BaseModel):
    """What /api/chat and /api/generate share: the model, `format`, `options` and `stream` (true unless false).
    `keep_alive` (the model stays loaded) and `think` (no served model thinks here) are accepted."""

    model_config = REQUEST_MODEL
    model: str | None = None
    format: Any = None
    options: OllamaOptions | None = None
    stream: bool | None = True
    keep_alive: Any = None
    think: Any = None

    @property
    def streamed(self) -> bool:
        return self.stream is not False

    @property
    def until_context(self) -> bool:
        """num_predict -1 (or -2): the reply may run until the context is full."""
        return self.options is not None and self.options.num_predict in UNTIL_CONTEXT

    def openai_fields(self) -> dict[str, Any]:
        """The sampling, stopping and output fields of an OpenAI request that asks what this one asks."""
        fields: dict[str, Any] = {}
        options = self.options or OllamaOptions()
        for option, field in OPTION_FIELDS.items():
            if (value := getattr(options, option)) is not None:
                fields[field] = value
        if options.repeat_penalty == 0:  # off in ollama's runner, as 1 is: the sampler would divide logits by 0
            fields["repetition_penalty"] = 1.0
        if options.num_predict is not None and options.num_predict not in UNTIL_CONTEXT:
            if options.num_predict < 1:
                until = "-1 or -2 (until the context is full)"
                raise invalid("options.num_predict", f"must be 1 or more tokens, or {until}")
            fields["max_tokens"] = options.num_predict
        if (response_format := self.response_format()) is not None:
            fields["response_format"] = response_format
        return fields

    def response_format(self) -> dict[str, Any] | None:
        """`format` ("json", or a JSON Schema object) as OpenAI's response_format; None: free text."""
        if self.format in (None, ""):
            return None
        if self.format == "json":
            return {"type": "json_object"}
        if isinstance(self.format, dict):
            return {"type": "json_schema", "json_schema": {"name": "format", "schema": self.format}}
        raise invalid("format", 'must be "json" or a JSON Schema (an object)')

    def fit_max_tokens(self, request: SamplingRequest, prompt_tokens: int, room: int) -> None:
        """num_predict -1: as many tokens as `room` (the context, or the KV budget) leaves after the prompt."""
        if self.until_context:
            request.max_tokens = max(1, room - prompt_tokens)

    def as_openai(self, kind: type[Request], fields: dict[str, Any]) -> Request:
        with ollama_names():
            return validate_body(kind, {**self.openai_fields(), **fields})


class OllamaChat(OllamaBody):
    """POST /api/chat's body: messages (images are a 400: the served model reads text) and tools."""

    messages: list[Any] | None = None
    tools: Any = None

    def chat_request(self) -> ChatRequest:
        messages = [openai_message(message, index) for index, message in enumerate(self.messages or [])]
        return self.as_openai(ChatRequest, {"messages": messages, "tools": self.tools})


def openai_message(message: Any, index: int) -> dict[str, Any]:
    """An ollama message as a chat completion's: a tool result's `tool_name` is its `name`; `thinking` is dropped."""
    where = f"messages.{index}"
    if not isinstance(message, dict):
        raise invalid(where, "must be a message {role, content}")
    if message.get("images"):
        raise invalid(f"{where}.images", "images are not supported: the served model reads text only")
    turn = {key: message[key] for key in ("role", "content", "tool_calls") if message.get(key) is not None}
    turn.setdefault("content", "")  # ollama reads a message without content as empty
    if message.get("tool_name") is not None:
        turn["name"] = message["tool_name"]
    return turn


class OllamaGenerate(OllamaBody):
    """POST /api/generate's body. `raw` sends the prompt as it is, else it is the user's message in the chat template
    (after `system`); `context` (the token ids an earlier answer returned, deprecated by ollama) is put before it."""

    prompt: str | None = None
    system: str | None = None
    raw: bool | None = None
    context: list[int] | None = None
    suffix: Any = None
    images: Any = None
    template: Any = None

    def check(self) -> None:
        """What this server cannot do: each a 400 that names the field."""
        if self.suffix:
            raise invalid("suffix", "fill-in-the-middle is not supported: send the text before it as the prompt")
        if self.images:
            raise invalid("images", "images are not supported: the served model reads text only")
        if self.template:
            message = "a request's own template is not supported: the model's chat template is used (or raw true)"
            raise invalid("template", message)

    def chat_request(self) -> ChatRequest:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return self.as_openai(ChatRequest, {"messages": [*system, {"role": "user", "content": self.prompt}]})

    def raw_request(self) -> SamplingRequest:
        return self.as_openai(SamplingRequest, {})

    def context_ids(self, vocab_size: int) -> list[int]:
        ids = list(self.context or [])
        if ids and (min(ids) < 0 or max(ids) >= vocab_size):
            raise invalid("context", f"token ids must be in [0, {vocab_size}): send back the context an answer gave")
        return ids


class OllamaShow(BaseModel):
    """POST /api/show's body: the model (`name` in older clients); `verbose` changes nothing."""

    model_config = REQUEST_MODEL
    model: str | None = None
    name: str | None = None
    verbose: bool | None = None
