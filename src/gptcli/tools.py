"""Tool calls (OpenAI's `tools` and `tool_choice`) for any model, the way llama.cpp's generic handler does it.

The model is told the tools and how to answer in a system message (a chat template that reads `tools` writes
them itself), and its reply is constrained to JSON (gptcli.constraints): `{"tool_calls": [{"name", "arguments"},
...]}`, each call's arguments fitting that tool's `parameters` schema, or, when the choice is "auto",
`{"response": "<text>"}` (with a response_format, `{"response": <JSON of its schema>}`; gptcli.tool_reply
reads it back). Conversations that hold calls and their results are written for the template: as they are
where it reads `tools`, else as text any model can read.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from typing import Any

from gptcli.config import OutputConstraint
from gptcli.constraints import schema_constraint
from gptcli.errors import ConfigError, ToolError
from gptcli.jsonl import json_kind
from gptcli.prompts import NEW_TURN, Messages, Prompt, build_prompt, transcript
from gptcli.schema_width import check_depth
from gptcli.tokenizer import Tokenizer
from gptcli.tool_schemas import closed, rebased

MAX_TOOLS = 128  # OpenAI's limit
MAX_NAME = 256  # characters of a tool's name (OpenAI's names are shorter; other servers take longer ones)
CHOICES = ("none", "auto", "required")
CHOICE_SHAPE = (
    'none, auto, required, {"type": "function", "function": {"name": "<a tool\'s name>"}} or'
    ' {"type": "allowed_tools", "allowed_tools": {"mode": "auto" or "required", "tools": [...]}}'
)
ALLOWED_SHAPE = '{"type": "function", "function": {"name": "<a tool\'s name>"}}'
TOOL_SHAPE = '{"type": "function", "function": {"name", "description", "parameters"}}'
NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON Schema of an object


@dataclass(frozen=True)
class ToolSpec:
    """What a request allows: the tools the reply may call, whether it must call one, and how many at once."""

    tools: tuple[Tool, ...]  # those the reply may call (a named choice: that one)
    required: bool  # a call, not a text reply ("required", or a named function)
    parallel: bool  # several calls in one reply
    native: bool = False  # the chat template writes the tools itself
    constraint: OutputConstraint | None = None  # on the reply's JSON (reply_schema)
    answer: dict[str, Any] | None = None  # the JSON Schema a text reply's answer fits (response_format's); None: text

    @property
    def named(self) -> str | None:
        return self.tools[0].name if self.required and len(self.tools) == 1 else None


def parse_tools(value: Any) -> list[Tool]:
    """OpenAI's `tools` list, checked; ToolError names the field that does not fit."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ToolError(f"tools: must be a list of {TOOL_SHAPE}", "tools")
    if len(value) > MAX_TOOLS:
        raise ToolError(f"tools: at most {MAX_TOOLS} tools, not {len(value)}", "tools")
    tools: list[Tool] = []
    for index, item in enumerate(value):
        where = f"tools.{index}"
        if not isinstance(item, dict) or item.get("type") != "function":
            raise ToolError(f"{where}.type: must be 'function' (a tool is {TOOL_SHAPE})", f"{where}.type")
        function = item.get("function")
        if not isinstance(function, dict):
            raise ToolError(
                f"{where}.function: must be an object {{name, description, parameters}}", f"{where}.function"
            )
        name = function.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
            raise ToolError(
                f"{where}.function.name: must be a name of 1 to {MAX_NAME} characters", f"{where}.function.name"
            )
        if any(tool.name == name for tool in tools):
            raise ToolError(f"{where}.function.name: '{name}' names two tools", f"{where}.function.name")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            message = f"{where}.function.description: must be a string"
            raise ToolError(message, f"{where}.function.description")
        tools.append(
            Tool(name, description or "", _parameters(function.get("parameters"), f"{where}.function.parameters"))
        )
    return tools


def _parameters(schema: Any, where: str) -> dict[str, Any]:
    """A tool's `parameters`: a JSON Schema of an object that llguidance can enforce (none: no arguments)."""
    if schema is None:
        return NO_ARGUMENTS
    if not isinstance(schema, dict):
        raise ToolError(f"{where}: must be a JSON Schema object, not {json_kind(schema)}", where)
    if schema.get("type", "object") != "object":
        raise ToolError(f"{where}: must describe an object (type: object), not type {schema['type']!r}", where)
    try:
        check_depth(schema, where)  # before closing walks it
        # Arguments are an object (also where the schema leaves type out) holding the properties it names.
        schema = closed({"type": "object", **schema})
        schema_constraint(schema, where)
    except ConfigError as exc:
        raise ToolError(exc.message, where, hint=exc.hint) from None
    return schema


def answer_schema(constraint: OutputConstraint | None) -> dict[str, Any] | None:
    """The JSON Schema a reply that calls no tool answers in, for a `response_format`'s constraint (json_object's:
    any object; a schema `true`: any JSON, `{}`); None: text (type text, or no response_format)."""
    if constraint is None:
        return None
    return json.loads(constraint.source) if constraint.kind == "json_schema" else {}


def tool_spec(
    tools: Any, choice: Any, parallel: bool | None, *, native: bool = False, answer: dict[str, Any] | None = None
) -> ToolSpec | None:
    """The tools a reply may call, checked, with the constraint on its JSON; None when it calls none. `answer`:
    the JSON Schema a reply that calls none answers in (response_format's), else text."""
    listed = parse_tools(tools)
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        listed, choice = _allowed(listed, choice.get("allowed_tools"))
    elif isinstance(choice, dict):
        name = _function_name(choice)
        if choice.get("type") != "function" or name is None:
            raise ToolError(f"tool_choice: must be {CHOICE_SHAPE}", "tool_choice")
        listed, choice = [_named(listed, name, "tool_choice.function.name")], "required"
    elif choice not in CHOICES:
        raise ToolError(f"tool_choice: must be {CHOICE_SHAPE}", "tool_choice")
    if choice == "none" or (choice == "auto" and not listed):
        return None
    if not listed:
        raise ToolError("tool_choice: 'required' needs tools to call; list them in tools", "tool_choice")
    # One call a reply unless asked for more: llama-server's default; a small model allowed several repeats one.
    spec = ToolSpec(tuple(listed), choice != "auto", bool(parallel), native, answer=answer)
    try:
        constraint = schema_constraint(reply_schema(spec), "tools")
    except ConfigError as exc:
        raise ToolError(exc.message, "tools", hint=exc.hint) from None
    return replace(spec, constraint=constraint)


def _function_name(choice: dict[str, Any]) -> str | None:
    """The name in `{"function": {"name"}}` (Chat Completions), or in `{"name"}` (the Responses API)."""
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else choice.get("name")
    return name if isinstance(name, str) else None


def _named(listed: list[Tool], name: str, where: str) -> Tool:
    found = next((tool for tool in listed if tool.name == name), None)
    if found is None:
        known = ", ".join(tool.name for tool in listed) or "none given"
        raise ToolError(f"{where}: no tool named '{name}' in tools ({known})", where)
    return found


def _allowed(listed: list[Tool], allowed: Any) -> tuple[list[Tool], str]:
    """OpenAI's `{"type": "allowed_tools", "allowed_tools": {"mode", "tools"}}`: the tools of `tools` it
    names, and the mode ("auto" or "required") the reply takes with them."""
    where = "tool_choice.allowed_tools"
    if not isinstance(allowed, dict) or allowed.get("mode") not in ("auto", "required"):
        raise ToolError(f"{where}.mode: must be auto or required", f"{where}.mode")
    entries = allowed.get("tools")
    if not isinstance(entries, list) or not entries:
        raise ToolError(f"{where}.tools: must list the tools allowed, each {ALLOWED_SHAPE}", f"{where}.tools")
    chosen: list[Tool] = []
    for index, entry in enumerate(entries):
        name = _function_name(entry) if isinstance(entry, dict) and entry.get("type") == "function" else None
        if name is None:
            raise ToolError(f"{where}.tools.{index}: must be {ALLOWED_SHAPE}", f"{where}.tools.{index}")
        tool = _named(listed, name, f"{where}.tools.{index}.function.name")
        chosen += [] if tool in chosen else [tool]
    return chosen, allowed["mode"]


def reply_schema(spec: ToolSpec) -> dict[str, Any]:
    """The JSON Schema of the reply: the calls (each tool's name and its arguments), or, for "auto", a text reply."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": {"$ref": f"#/$defs/tool_{index}"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for index, tool in enumerate(spec.tools)
    ]
    items = calls[0] if len(calls) == 1 else {"anyOf": calls}
    array = {"type": "array", "items": items, "minItems": 1, **({} if spec.parallel else {"maxItems": 1})}
    schema: dict[str, Any] = _object("tool_calls", array)
    defs = {f"tool_{i}": tool.parameters for i, tool in enumerate(spec.tools)}
    if not spec.required:
        answer = {"type": "string"} if spec.answer is None else {"$ref": "#/$defs/answer"}
        schema = {"anyOf": [schema, _object("response", answer)]}
        defs.update({} if spec.answer is None else {"answer": spec.answer})
    # Each tool's schema (and the answer's) sits under $defs, its own references (#/$defs/X, #) pointed there; its
    # `$id` goes, as a base URI there would resolve those references against that URI instead.
    moved = {name: {k: v for k, v in part.items() if k != "$id"} for name, part in defs.items()}
    schema["$defs"] = {name: rebased(part, f"#/$defs/{name}") for name, part in moved.items()}
    return schema


def _object(key: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {key: schema}, "required": [key], "additionalProperties": False}


TEXT_REPLY = '{"response": "..."} (your answer in the string)'
ANSWER_REPLY = '{"response": <your answer>}, your answer JSON of this JSON Schema: '
SEVERAL = " (a call per item: several only when the request needs several)"


def instructions(spec: ToolSpec) -> str:
    """The system message's text: the tools (unless the template writes them) and the JSON to answer in."""
    name = json.dumps(spec.named, ensure_ascii=False) if spec.named else '"<tool name>"'  # a name's quotes escaped
    calls = f'{{"tool_calls": [{{"name": {name}, "arguments": {{<its arguments>}}}}]}}'
    calls += SEVERAL if spec.parallel else ""
    if spec.named:
        answer = f"Call the tool {spec.named}. Reply with JSON only: {calls}"
    elif spec.required:
        answer = f"Call {'one or more tools' if spec.parallel else 'one tool'}. Reply with JSON only: {calls}"
    else:
        text = TEXT_REPLY if spec.answer is None else ANSWER_REPLY + json.dumps(spec.answer, ensure_ascii=False)
        answer = f"Reply with JSON only: to call tools, {calls}; to answer the user directly, {text}"
    if spec.native:
        return answer
    listed = "\n".join(
        f"- {tool.name}: {tool.description or '(no description)'} {_schema(tool)}" for tool in spec.tools
    )
    return f"{LISTING}\n{listed}\n{answer}"


LISTING = "You can call these tools (each: its name, what it does, the JSON Schema of its arguments):"


def _schema(tool: Tool) -> str:
    return "Arguments: " + json.dumps(tool.parameters, ensure_ascii=False)


def template_tools(spec: ToolSpec) -> list[dict[str, Any]]:
    """The tools in OpenAI's shape, as chat templates that read `tools` take them."""
    return [
        {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
        for t in spec.tools
    ]


def prompt_messages(messages: Messages, spec: ToolSpec | None, *, native: bool) -> Messages:
    """The conversation for the prompt builder: the instructions in the system message, and the calls
    (assistant `tool_calls`) and results (`tool` messages) as the template takes them (`native`: as they
    are, with parsed arguments) or as text: a call as the JSON the model answers in, results as the
    user's "Result of <name>: ..."."""
    names = {
        call.get("id"): call["function"]["name"] for message in messages for call in message.get("tool_calls") or ()
    }
    written: Messages = []
    for at, message in enumerate(messages):
        calls = message.get("tool_calls") or []
        if native:
            turn = {**message, "content": message.get("content") or ""}
            if calls:
                turn["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _arguments(c)}} for c in calls]
            written.append(turn)
        elif message["role"] == "tool":
            name = message.get("name") or names.get(message.get("tool_call_id")) or "the tool"
            result = f"Result of {name}: {message.get('content') or ''}"
            if at and messages[at - 1]["role"] == "tool":  # one user turn holds a round of results
                written[-1] = {"role": "user", "content": written[-1]["content"] + "\n" + result}
            else:
                written.append({"role": "user", "content": result})
        else:
            text = message.get("content") or ""
            if calls:
                said = [{"name": c["function"]["name"], "arguments": _arguments(c)} for c in calls]
                text = (text + "\n" if text else "") + json.dumps({"tool_calls": said}, ensure_ascii=False)
            written.append({"role": message["role"], "content": text})
    if spec is not None:
        said = instructions(spec)
        if written and written[0]["role"] == "system":
            written[0] = {**written[0], "content": f"{written[0]['content']}\n\n{said}"}
        else:
            written.insert(0, {"role": "system", "content": said})
    return written


def _arguments(call: dict[str, Any]) -> Any:
    """A call's arguments as JSON (OpenAI sends them as a JSON string); text that is no JSON stays text."""
    text = call["function"].get("arguments")
    try:
        return json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return text


def chat_prompt(tokenizer: Tokenizer, turns: Messages, spec: ToolSpec | None, ending: str = NEW_TURN) -> Prompt:
    """A conversation's prompt as `gptcli chat` builds it (the chat template, or a plain transcript for a base
    model), with the tools the reply may call and how to call them; the server's and batch files' one builder.
    `ending`: a new turn, the last message continued, or none (gptcli.prompts.prompt_ending)."""
    native = tokenizer.supports_tools
    listed = template_tools(spec) if spec is not None and native else None
    written = prompt_messages(turns, spec, native=native)
    plain = functools.partial(transcript, ending=ending)
    return build_prompt(tokenizer, written, plain=plain, tools=listed, ending=ending)


CALL_SHAPE = '{"id", "type": "function", "function": {"name", "arguments"}}'


def call_fields(message: dict[str, Any], index: int) -> dict[str, Any]:
    """The tool-call fields of the conversation's message `index`, checked, as prompt_messages takes them: an
    assistant's `tool_calls` (arguments a JSON string, or an object as ollama's clients send them), a tool
    result's `tool_call_id` and `name`. ToolError names the field that does not fit."""
    where = f"messages.{index}"
    fields: dict[str, Any] = {}
    if calls := message.get("tool_calls"):
        if message.get("role") != "assistant":
            raise ToolError(f"{where}.tool_calls: only an assistant's message holds tool calls", f"{where}.tool_calls")
        if not isinstance(calls, list):
            raise ToolError(f"{where}.tool_calls: must be a list of {CALL_SHAPE}", f"{where}.tool_calls")
        fields["tool_calls"] = [_call(call, f"{where}.tool_calls.{at}") for at, call in enumerate(calls)]
    if message.get("role") == "tool":
        for key in ("tool_call_id", "name"):
            if (value := message.get(key)) is not None and not isinstance(value, str):
                raise ToolError(f"{where}.{key}: must be a string", f"{where}.{key}")
            fields.update({key: value} if value is not None else {})
    return fields


def _call(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or call.get("type", "function") != "function":
        raise ToolError(f"{where}: must be {CALL_SHAPE}", where)
    if not isinstance(call.get("id"), (str, type(None))):
        raise ToolError(f"{where}.id: must be a string", f"{where}.id")
    if not isinstance(name := function.get("name"), str):
        raise ToolError(f"{where}.function.name: must be the called tool's name", f"{where}.function.name")
    if not isinstance(arguments := function.get("arguments"), (str, dict)):
        message = f"{where}.function.arguments: must be a JSON string or an object"
        raise ToolError(message, f"{where}.function.arguments")
    return {"id": call.get("id"), "type": "function", "function": {"name": name, "arguments": arguments}}
