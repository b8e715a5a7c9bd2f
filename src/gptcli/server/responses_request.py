"""The Responses API's request (POST /v1/responses), read into what the chat route already takes: its input
items as a chat's messages, its function tools and tool_choice as `tools` checks them, its `text.format` as a
response_format's constraint. Stateless, as vLLM without a store: a field that needs a kept response is a 400.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from pydantic import Field, PrivateAttr

from gptcli import tools as chat_tools
from gptcli.config import OutputConstraint, SamplingConfig
from gptcli.errors import ResponseFormatError, ToolError
from gptcli.prompts import joined_parts
from gptcli.server.errors import APIError
from gptcli.server.schemas import ChatMessage, SamplingRequest
from gptcli.tokenizer import Tokenizer
from gptcli.tools import CHOICES, ToolSpec, answer_schema, tool_spec

ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text")  # a message's text: what a client wrote, or a reply it sends back
ITEMS = "message {role, content}, function_call {call_id, name, arguments} or function_call_output {call_id, output}"
TOOL_SHAPE = '{"type": "function", "name", "description", "parameters"}'
CHOICE_SHAPE = 'none, auto, required, {"type": "function", "name": ...} or {"type": "allowed_tools", "mode", "tools"}'
FORMATS = ("text", "json_object", "json_schema")
FORMAT_SHAPE = 'text.format is {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "name", "schema"}'
FORMAT_FIELDS = {"name": (str, "a string"), "description": (str, "a string"), "strict": (bool, "true or false")}
STATELESS = "this server keeps no responses"
# Chat Completions' names on this route: a 400 naming the Responses API's own.
CHAT_NAMES = {"max_tokens": "max_output_tokens", "response_format": "text.format", "messages": "input"}


def invalid(param: str, says: str) -> APIError:
    return APIError(400, f"{param}: {says}", param=param, code="invalid_value")


# The shapes a tools error shows, as Chat Completions nests them (gptcli.tools) and as this API writes them.
RESPONSES_SHAPES = {
    chat_tools.CHOICE_SHAPE: CHOICE_SHAPE,
    chat_tools.ALLOWED_SHAPE: '{"type": "function", "name": "<a tool\'s name>"}',
    chat_tools.TOOL_SHAPE: TOOL_SHAPE,
}


def responses_param(text: str) -> str:
    """A tools error as the Responses API names its fields: `tools.0.function.name` is `tools.0.name` there,
    `tool_choice.function.name` is `tool_choice.name`, `tool_choice.allowed_tools.mode` is `tool_choice.mode`;
    the shapes it shows are this API's (a chat shape sent here is refused)."""
    for chat_shape, shape in RESPONSES_SHAPES.items():
        text = text.replace(chat_shape, shape)
    text = text.replace("tool_choice.allowed_tools.", "tool_choice.")
    return re.sub(r"\.function\.(?=name|description|parameters)", ".", text)


class ResponsesRequest(SamplingRequest):
    """OpenAI's `client.responses.create(...)` body. Sampling (and our extras: top_k, seed, stop, ...) is the chat
    route's; `include`, `reasoning`, `truncation`, `store`, `service_tier` and the like are accepted and change
    nothing (nothing is stored; there is no reasoning to include)."""

    input: Any = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    text: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool | None = None
    previous_response_id: Any = None
    conversation: Any = None
    background: Any = None
    prompt: Any = None
    top_logprobs: Any = None
    _tools: ToolSpec | None = PrivateAttr(None)
    _format: tuple[OutputConstraint | None] | None = PrivateAttr(None)

    def check(self) -> None:
        """What a stateless server cannot do, and Chat Completions' names for fields this API names otherwise:
        each a 400 that names the field and the fix."""
        if self.previous_response_id is not None:
            raise invalid("previous_response_id", f"{STATELESS}: send the whole conversation in input")
        if self.conversation is not None:
            raise invalid("conversation", f"{STATELESS} or conversations: send the whole conversation in input")
        if self.background:
            raise invalid("background", f"{STATELESS} to fetch later: leave background out (or stream)")
        if self.prompt is not None:
            raise invalid("prompt", "stored prompts are not supported: send the text in instructions and input")
        if self.top_logprobs not in (None, 0):
            raise invalid("top_logprobs", "not supported on /v1/responses: /v1/chat/completions gives logprobs")
        given = {**(self.model_extra or {}), **{name: getattr(self, name) for name in type(self).model_fields}}
        for name, instead in CHAT_NAMES.items():
            if given.get(name) is not None:
                raise invalid(name, f"not a field of the Responses API: use {instead}")

    def requested_max_tokens(self) -> int | None:
        return self.max_output_tokens

    def max_tokens_field(self) -> str:
        return "max_output_tokens"

    # ----------------------------------------------------------------------------------------------- the input

    def messages(self) -> list[ChatMessage]:
        """The instructions (a system message) and the input items as the chat route's messages: a string is
        one user message; consecutive function_call items are one assistant message's tool_calls."""
        turns: list[dict[str, Any]] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return [ChatMessage.model_validate(turn) for turn in [*turns, {"role": "user", "content": self.input}]]
        if not isinstance(self.input, list) or not self.input:
            raise invalid("input", f"must be a string or a non-empty list of items: {ITEMS}")
        names: dict[str, str] = {}  # each call's tool, for its output
        for index, item in enumerate(self.input):
            where = f"input.{index}"
            if not isinstance(item, dict):
                raise invalid(where, f"must be an item: {ITEMS}")
            kind = item.get("type", "message")
            if kind == "message":
                turns.append({"role": _role(item, where), "content": _text(item.get("content"), f"{where}.content")})
            elif kind == "function_call":
                call = _call(item, where)
                names[call["id"]] = call["function"]["name"]
                if turns and turns[-1]["role"] == "assistant":  # the calls of the reply before it
                    turns[-1].setdefault("tool_calls", []).append(call)
                else:
                    turns.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                call_id = _string(item, "call_id", where)
                if call_id not in names:  # stateless: the call it answers is in this input, or it answers none
                    message = f"no function_call item before it has call_id {call_id!r}: send the call with its output"
                    raise invalid(f"{where}.call_id", message)
                output = _text(item.get("output"), f"{where}.output")
                turns.append({"role": "tool", "tool_call_id": call_id, "name": names[call_id], "content": output})
            else:
                message = f"{kind!r} items are not supported here, only {ITEMS}"
                raise invalid(f"{where}.type", message)
        return [ChatMessage.model_validate(turn) for turn in turns]

    # ------------------------------------------------------------------------------------------ tools and format

    def tool_spec(self, tokenizer: Tokenizer) -> ToolSpec | None:
        """The tools the reply may call (checked once, as the chat route checks them: a 400 naming the field in
        this API's terms); None: a text reply. With a JSON text.format, a reply that calls none answers in it."""
        if self._tools is None and (self.tools is not None or self.tool_choice is not None):
            try:
                self._tools = tool_spec(
                    self._chat_tools(),
                    self._chat_tool_choice(),
                    self.parallel_tool_calls,
                    native=tokenizer.supports_tools,
                    answer=answer_schema(self.text_constraint()),
                )
            except ToolError as exc:
                message, param = responses_param(exc.message), responses_param(exc.param)
                raise APIError(400, message, param=param, code="invalid_value") from None
            if self._tools is not None:
                self.refuse_beside_tools("text.format")  # vLLM's structured-output fields: tools make the reply JSON
        return self._tools

    def _chat_tools(self) -> list[dict[str, Any]] | None:
        """The function tools as Chat Completions nests them (name, description, parameters under `function`)."""
        if self.tools is None:
            return None
        if not isinstance(self.tools, list):
            raise invalid("tools", f"must be a list of function tools, each {TOOL_SHAPE}")
        listed = []
        for index, tool in enumerate(self.tools):
            if not isinstance(tool, dict):
                raise invalid(f"tools.{index}", f"must be a function tool {TOOL_SHAPE}")
            if tool.get("type") != "function":
                message = f"only function tools are supported here, not {tool.get('type')!r} (a tool is {TOOL_SHAPE})"
                raise invalid(f"tools.{index}.type", message)
            function = {key: tool[key] for key in ("name", "description", "parameters") if key in tool}
            listed.append({"type": "function", "function": function})
        return listed

    def _chat_tool_choice(self) -> Any:
        choice = self.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
            return {"type": "allowed_tools", "allowed_tools": {key: choice.get(key) for key in ("mode", "tools")}}
        if isinstance(choice, dict) and choice.get("type") == "function":
            return choice  # {"type": "function", "name": ...}: gptcli.tools reads this form too
        if choice is not None and choice not in CHOICES:
            raise invalid("tool_choice", f"must be {CHOICE_SHAPE} (only function tools are supported here)")
        return choice

    def text_format(self) -> dict[str, Any] | None:
        """`text.format`, checked against its documented shape (a 400 naming the field); None: not given."""
        if self.text is None:
            return None
        if not isinstance(self.text, dict):
            raise invalid("text", f"must be an object {{format}} ({FORMAT_SHAPE})")
        found = self.text.get("format")
        if found is None:
            return None
        if not isinstance(found, dict) or found.get("type") not in FORMATS:
            raise invalid("text.format.type" if isinstance(found, dict) else "text.format", FORMAT_SHAPE)
        kind = found["type"]
        fields = {"type", "schema", *FORMAT_FIELDS} if kind == "json_schema" else {"type"}
        if (extra := next((key for key in found if key not in fields), None)) is not None:
            raise invalid(f"text.format.{extra}", f"not a field of a {kind} format ({FORMAT_SHAPE})")
        for key, (kinds, says) in FORMAT_FIELDS.items():
            if found.get(key) is not None and not isinstance(found[key], kinds):
                raise invalid(f"text.format.{key}", f"must be {says}")
        if kind == "json_schema" and found.get("schema") is None:
            raise invalid("text.format.schema", "required for type json_schema (the JSON Schema of the reply)")
        return found

    def text_constraint(self) -> OutputConstraint | None:
        """The constraint `text.format` asks for, as a response_format's (gptcli.output_requests); None: text."""
        if self._format is None:
            found = self.text_format()
            constraint = None
            if found is not None and found["type"] != "text":
                asked = (
                    {"type": "json_object"}
                    if found["type"] == "json_object"
                    else {
                        "type": "json_schema",
                        "schema": found["schema"],
                    }
                )
                from gptcli import output_requests

                try:  # the schema beside the type: its errors name text.format.schema, as this API places it
                    constraint = output_requests.response_format(asked, "text.format")
                except ResponseFormatError as exc:
                    raise APIError(400, exc.message, param=exc.param, code="invalid_value") from None
            self._format = (constraint,)
        return self._format[0]

    def output_param(self) -> str:
        """The field a failing grammar's 400 names: vLLM's structured-output field if one asks, else text.format
        (text.format.schema for a schema, as a keyword it cannot enforce names it)."""
        if (field := self.output_field()) is not None:
            return field
        found = self.text.get("format") if isinstance(self.text, dict) else None
        return "text.format.schema" if isinstance(found, dict) and found.get("type") == "json_schema" else "text.format"

    def output_constraint(self, formatted: OutputConstraint | None) -> OutputConstraint | None:
        """SamplingRequest's hook: text.format stands where a chat's response_format does."""
        text = self.text_constraint()
        if text is not None and (field := self.output_field()) is not None:
            raise invalid(field, f"give one kind of structured output per request: {field} or text.format")
        return text if text is not None else super().output_constraint(None)

    def sampling(self, defaults: SamplingConfig, vocab_size: int) -> SamplingConfig:
        params = super().sampling(defaults, vocab_size)
        return params if self._tools is None else replace(params, constraint=self._tools.constraint)

    def echoed(self, params: SamplingConfig) -> dict[str, Any]:
        """The settings a response repeats (the SDK's Response requires some): as asked, or as applied."""
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata or {},
            "parallel_tool_calls": bool(self.parallel_tool_calls),  # left out: one call a reply (tools.tool_spec)
            "previous_response_id": None,
            "store": False,  # nothing is kept
            "temperature": params.temperature,
            "text": {"format": self.text_format() or {"type": "text"}},
            "tool_choice": self.tool_choice if self.tool_choice is not None else "auto",
            "tools": self.tools or [],
            "top_p": params.top_p,
            "truncation": "disabled",
            "user": self.user,
        }


def _role(item: dict[str, Any], where: str) -> str:
    role = item.get("role")
    if role not in ROLES:
        raise invalid(f"{where}.role", f"must be one of {', '.join(ROLES)}, not {role!r}")
    return role


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise invalid(f"{where}.{key}", "must be a non-empty string")
    return value


def _text(content: Any, where: str) -> str:
    """A message's content (or a call's output): a string, or a list of text parts joined (`joined_parts`)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(where, "must be a string or a list of input_text parts")
    pieces = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            message = f"only text content (input_text, output_text) is supported here, not {kind!r}"
            raise invalid(f"{where}.{index}.type", message)
        if not isinstance(part.get("text"), str):
            raise invalid(f"{where}.{index}.text", "must be a string")
        pieces.append(part["text"])
    return joined_parts(pieces)


def _call(item: dict[str, Any], where: str) -> dict[str, Any]:
    """A function_call item (a call an earlier reply made) as a chat message's tool call."""
    call_id = _string(item, "call_id", where)
    name = _string(item, "name", where)
    if not isinstance(arguments := item.get("arguments"), str):
        raise invalid(f"{where}.arguments", "must be the call's arguments as a JSON string")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
