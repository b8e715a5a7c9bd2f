"""Request bodies of the OpenAI routes (pydantic), and how they become sampling settings (prompt ids: prompt_ids.py).

Parameters OpenAI defines that we do not implement (audio, ...) are accepted and ignored
(`extra="allow"`), so existing clients keep working; the README lists them. A demanded function call in the
older form (`function_call`) is the exception: it would come back as text. The known ones are strictly
typed, as OpenAI checks them. `response_format` (text, json_object, json_schema) is enforced by
gptcli.constraints (vLLM's and llama-server's structured-output fields too: structured_fields.py), `tools` by
gptcli.tools; `logit_bias` and `logprobs` go to the sampling settings (gptcli.sampling).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from starlette.requests import Request

from gptcli.config import MAX_STOP_STRINGS, SAMPLING_KNOBS, OutputConstraint, SamplingConfig
from gptcli.errors import ResponseFormatError, ToolError
from gptcli.jsonl import TooManyDigits, whole_number
from gptcli.prompts import MESSAGE_ROLES, joined_parts, template_role
from gptcli.server.errors import APIError
from gptcli.server.prefill_fields import PrefillFields
from gptcli.server.stop_fields import StopFields
from gptcli.server.structured_fields import StructuredFields
from gptcli.textio import lone_surrogate_at
from gptcli.tokenizer import Tokenizer
from gptcli.tools import ToolSpec, answer_schema, call_fields, tool_spec

MAX_LOGIT_BIAS = 1024  # entries in one request's logit_bias
MAX_LOGIT_BIAS_VALUE = 100.0  # OpenAI's range: -100 to 100
MAX_TOKEN_DIGITS = 18  # a logit_bias key longer than this is no token id (and Python's int() takes 4,300 digits)
MAX_PROMPTS = 64  # prompts in one completions request (each is one choice)
MAX_TOP_LOGPROBS = 20  # OpenAI's chat limit (vLLM's default too); legacy completions share it here
Body = TypeVar("Body", bound=BaseModel)
# Unknown fields are kept (and ignored); known ones have strict types, as OpenAI's API checks them: "5" is
# not a number and true is not 1. Python's JSON reads NaN and Infinity, which no number field takes.
REQUEST_MODEL = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
UNION_MEMBER = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|[A-Z]\w*)$")


async def parse_body(request: Request, model: type[Body]) -> Body:
    """The JSON body as `model`, whatever Content-Type says (curl -d sends a form type); 400 otherwise."""
    raw = await request.body()
    try:
        data = json.loads(raw, parse_int=whole_number)
    except TooManyDigits as exc:
        raise APIError(400, f"the request body holds {exc}", code="invalid_value") from None
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    if (found := lone_surrogate_at(raw, data)) is not None:
        where, char = found
        message = f"{where}: holds {char}, a lone UTF-16 surrogate that is not text"
        raise APIError(400, message, param=where, code="invalid_value")
    return validate_body(model, data)


def validate_body(model: type[Body], data: dict[str, Any]) -> Body:
    """A JSON object as `model`: its first problem a 400 naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        # Drop the union-member names pydantic adds to the location ("stop.str" → "stop").
        loc = [str(part) for part in first.get("loc", ()) if not UNION_MEMBER.match(str(part))]
        param = ".".join(loc) or None
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        raise APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value") from None


class StreamOptions(BaseModel):
    model_config = REQUEST_MODEL
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`: a name, the schema, and `strict` (always enforced here)."""

    model_config = ConfigDict(**REQUEST_MODEL, populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON that fits a schema."""

    model_config = REQUEST_MODEL
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> OutputConstraint | None:
        """The structured-output constraint, checked now: a bad schema, or a field that does not fit the
        type (`json_schema` with type json_object, an unknown field), is a 400 that names the field."""
        from gptcli import output_requests

        try:
            return output_requests.response_format(self.model_dump(by_alias=True), "response_format")
        except ResponseFormatError as exc:
            raise APIError(400, exc.message, param=exc.param, code="invalid_value") from None

    def schema(self) -> dict[str, Any] | None:
        """The JSON Schema a reply that calls no tool answers in (tools.answer_schema); None: text."""
        return answer_schema(self.constraint())


class SamplingRequest(StopFields, StructuredFields):
    """What chat and text completions share: the model, sampling, stopping and streaming."""

    model_config = REQUEST_MODEL

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-1, lt=2**63)  # -1: a fresh random seed, as llama.cpp's server takes it
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Extras (vLLM and llama.cpp accept them too).
    top_k: int | None = Field(None, ge=-1)  # -1 and 0: every token (vLLM, llama.cpp)
    min_p: float | None = Field(None, ge=0, le=1)  # 1: the likeliest token alone (vLLM takes [0, 1])
    repetition_penalty: float | None = Field(None, gt=0)
    # vLLM's and llama.cpp's benchmark switch: generate exactly max_tokens (no EOS, no repetition stop).
    ignore_eos: bool | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_by_token_id(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens")
        tokens: dict[int, str] = {}
        for key, bias in value.items():
            if not (key.strip().isascii() and key.strip().isdigit()):
                raise ValueError(f"keys are token ids (as strings), not {key!r}")
            if len(digits := key.strip().lstrip("0")) > MAX_TOKEN_DIGITS:  # int() refuses over 4,300 digits
                raise ValueError(f"token {digits[:MAX_TOKEN_DIGITS]}... ({len(digits)} digits) is in no vocabulary")
            if not -MAX_LOGIT_BIAS_VALUE <= bias <= MAX_LOGIT_BIAS_VALUE:
                raise ValueError(f"a bias is between -100 and 100, not {bias} (token {key})")
            if (token := int(key)) in tokens:
                raise ValueError(f"token {token} is given twice ({tokens[token]!r} and {key!r})")
            tokens[token] = key
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def max_tokens_field(self) -> str:
        """The field that sets the reply's length in this request, as an error names it."""
        return "max_tokens"

    def requested_logprobs(self) -> int | None:
        """How many alternatives each token's logprobs entry lists (0: the token only); None: no logprobs."""
        return None

    def requested_prompt_logprobs(self) -> int | None:
        """The same for the prompt's tokens (completions with echo); None: not asked for."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, defaults: SamplingConfig, vocab_size: int) -> SamplingConfig:
        """The server's defaults (its config files and flags), overridden by what the request sets."""
        changes: dict[str, object] = {
            name: getattr(self, name) for name in (*SAMPLING_KNOBS, "seed") if getattr(self, name) is not None
        }
        if self.stream_options is not None and not self.stream:
            message = "stream_options: only allowed when stream is true"
            raise APIError(400, message, param="stream_options", code="invalid_value")
        if self.seed == -1:
            changes["seed"] = None
        if self.top_k == -1:
            changes["top_k"] = 0  # the sampler's "off"
        if (max_tokens := self.requested_max_tokens()) is not None:
            changes["max_tokens"] = max_tokens
        if self.stop is not None:
            changes["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if self.ignore_eos:
            changes["ignore_eos"] = True
            changes["repetition_stop"] = False
        # With structured output, stop strings are accepted and not applied (the decoder's rule: the grammar ends
        # the reply; a stop would cut the JSON short of a match). Not a 400: clients send `stop` routinely.
        formatted = self.response_format.constraint() if self.response_format is not None else None
        if (constraint := self.output_constraint(formatted)) is not None:  # vLLM's and llama-server's fields too
            changes["constraint"] = constraint
        if self.logit_bias:
            bias = tuple((int(key), float(value)) for key, value in self.logit_bias.items())
            if (worst := max(token for token, _ in bias)) >= vocab_size:
                message = f"logit_bias: token {worst} is not in the vocabulary [0, {vocab_size})"
                raise APIError(400, message, param="logit_bias", code="invalid_value")
            changes["logit_bias"] = bias
        changes.update(logprobs=self.requested_logprobs(), prompt_logprobs=self.requested_prompt_logprobs())
        return self.stop_options(replace(defaults, **changes), vocab_size, self.max_tokens_field())


class ContentPart(BaseModel):
    model_config = REQUEST_MODEL
    type: str
    text: str | None = None


class CalledFunction(BaseModel):
    model_config = REQUEST_MODEL
    name: str
    arguments: str | dict[str, Any]  # OpenAI's JSON text; ollama's clients send the object


class MessageToolCall(BaseModel):
    """A call an earlier reply made, as the client sends the conversation back."""

    model_config = REQUEST_MODEL
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = REQUEST_MODEL
    role: Literal[MESSAGE_ROLES]  # type: ignore[valid-type]
    content: str | list[ContentPart] | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's
    tool_call_id: str | None = None  # a tool's result: the call it answers
    name: str | None = None  # a tool's result: the tool's name (another role's is ignored, as OpenAI's models do)

    def turn(self, index: int) -> dict[str, Any]:
        """The message as gptcli.tools takes it: role and text, and an assistant's calls, a tool's call id."""
        turn: dict[str, Any] = {
            "role": template_role(self.role),
            "content": self.text(index),
        }
        try:
            turn.update(call_fields(self.model_dump(include={"role", "tool_calls", "tool_call_id", "name"}), index))
        except ToolError as exc:
            raise APIError(400, exc.message, param=exc.param, code="invalid_value") from None
        return turn

    def text(self, index: int) -> str:
        if self.content is None:
            if self.tool_calls:  # an assistant's calls, without words: OpenAI's own replies send null
                return ""
            message = f"messages.{index}.content: a {self.role} message needs content (text, or a list of text parts)"
            raise APIError(400, message, param=f"messages.{index}.content", code="invalid_value")
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(
                    400,
                    f"messages.{index}: only text content is supported",
                    param=f"messages.{index}.content",
                    code="invalid_value",
                )
            pieces.append(part.text)
        return joined_parts(pieces)


class ToolFields(BaseModel):
    """The tools a chat's reply may call: chat completions, and /tokenize counting the prompt they are part of.
    With a JSON response_format, a reply that calls none answers in its schema (OpenAI's Agents SDK sends both:
    the tools, and the format of the final answer)."""

    model_config = REQUEST_MODEL
    # Checked by gptcli.tools (tool_spec), which names the field that does not fit.
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    _tools: ToolSpec | None = PrivateAttr(None)

    def tool_spec(self, tokenizer: Tokenizer) -> ToolSpec | None:
        """The tools the reply may call (checked once: a 400 naming the field); None: a text reply."""
        if self._tools is None and (self.tools is not None or self.tool_choice is not None):
            answer = self.response_format.schema() if self.response_format is not None else None
            try:
                self._tools = tool_spec(
                    self.tools,
                    self.tool_choice,
                    self.parallel_tool_calls,
                    native=tokenizer.supports_tools,
                    answer=answer,
                )
            except ToolError as exc:
                raise APIError(400, exc.message, param=exc.param, code="invalid_value") from None
        return self._tools


class ChatRequest(SamplingRequest, ToolFields, PrefillFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # The older form (`functions`) is ignored, so a demanded call would come back as text: a 400.
    function_call: Any = None

    @field_validator("function_call")
    @classmethod
    def _no_forced_call(cls, value: Any) -> Any:
        if value in (None, "auto", "none"):
            return value
        raise ValueError("functions and function_call are not supported (only ignored): use tools and tool_choice")

    def tool_spec(self, tokenizer: Tokenizer) -> ToolSpec | None:
        if (tools := super().tool_spec(tokenizer)) is not None:
            self.refuse_beside_tools()  # tools make the reply JSON of their own
        return tools

    def sampling(self, defaults: SamplingConfig, vocab_size: int) -> SamplingConfig:
        params = super().sampling(defaults, vocab_size)
        return params if self._tools is None else replace(params, constraint=self._tools.constraint)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs", code="invalid_value")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # 0 with echo and logprobs: score the prompt and generate nothing (what evaluation harnesses ask).
    max_tokens: int | None = Field(None, ge=0)

    def requested_max_tokens(self) -> int | None:
        if self.max_tokens == 0 and not (self.echo and self.logprobs is not None):
            raise APIError(
                400,
                "max_tokens: 0 only scores the prompt, with echo and logprobs; ask for 1 or more tokens",
                param="max_tokens",
                code="invalid_value",
            )
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def requested_prompt_logprobs(self) -> int | None:
        if self.logprobs is None or not self.echo:
            return None
        if self.stream:
            raise APIError(
                400,
                "echo with logprobs (the prompt's logprobs) is not streamed; ask with stream false",
                param="stream",
                code="invalid_value",
            )
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _some_prompts(cls, value: str | list[str] | list[int] | list[list[int]]) -> Any:
        if not value or (isinstance(value, list) and any(not item and item != 0 for item in value)):
            raise ValueError("the prompt is empty")
        if isinstance(value, list) and not isinstance(value[0], int) and len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
        return value
