"""Batch-file lines as requests: one JSON line parsed, checked and made into what runs (`parse_request`),
and a finished line as its JSON result (`result_record`, `error_record`); gptcli.batchfile runs them.

A request line is an object with `prompt` (text) or `messages` (chat messages), and optionally an
`id`, a `system` message, `raw` (no chat template) and per-line sampling settings (`temperature`,
`top_p`, `top_k`, `min_p`, `repetition_penalty`, `frequency_penalty`, `presence_penalty`, `max_tokens`,
`seed`, `stop`, and vLLM's `min_tokens`, `stop_token_ids`, `include_stop_str_in_output`: gptcli.stopping checks
them as it checks the server's), structured output (OpenAI's `response_format`, or vLLM's and llama-server's
fields, checked as the server checks them: gptcli.output_requests); a `messages` line may carry OpenAI's `tools`,
`tool_choice` and `parallel_tool_calls` (gptcli.tools, as the server takes them; a JSON `response_format`
is then the format of a reply that calls none), and its result then holds the reply's `tool_calls`; and vLLM's
`continue_final_message` and `add_generation_prompt` (a last message from the assistant is continued, as the
server continues it: gptcli.prompts.prompt_ending). A line
that cannot be run (bad JSON, unknown keys, a prompt over the context, messages its chat template refuses)
becomes an error result for that line.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from gptcli.config import SAMPLING_KNOBS, OutputConstraint, Settings, with_sampling
from gptcli.decoding import Finished
from gptcli.errors import ChatTemplateRefusal, ConfigError, InputError, ToolError
from gptcli.jsonl import MAX_LINE_BYTES, parse_line
from gptcli.output_requests import IGNORED_FIELDS, OUTPUT_FIELDS, beside_tools, requested_output, response_format
from gptcli.prompts import (
    MESSAGE_ROLES,
    PREFILL_FIELDS,
    Messages,
    Prompt,
    fit_prompt,
    joined_parts,
    messages_for,
    prompt_ending,
    template_role,
    transcript_sampling,
)
from gptcli.stopping import STOP_FIELDS, stop_options
from gptcli.textio import lone_surrogate_at, one_line
from gptcli.timings import usage
from gptcli.tokenizer import Tokenizer
from gptcli.tool_reply import openai_calls, reply_of
from gptcli.tools import ToolSpec, answer_schema, call_fields, chat_prompt, tool_spec

SAMPLING_KEYS = (*SAMPLING_KNOBS, "max_tokens", "seed", "stop")
TOOL_KEYS = ("tools", "tool_choice", "parallel_tool_calls")
OUTPUT_KEYS = ("response_format", *OUTPUT_FIELDS, *IGNORED_FIELDS)  # structured output, as the server takes it
REQUEST_KEYS = {"id", "prompt", "messages", "system", "raw", *OUTPUT_KEYS, *SAMPLING_KEYS, *TOOL_KEYS}
REQUEST_KEYS |= {*STOP_FIELDS, *PREFILL_FIELDS}  # vLLM's stopping options (gptcli.stopping), and prefill
FINISH_NAMES = {"context": "length"}  # OpenAI's names: a full context is a length stop


@dataclass(frozen=True)
class BatchRequest:
    """One parsed line: what to run, or why it cannot run."""

    index: int
    id: str
    prompt_ids: list[int] = field(default_factory=list)  # run here: the prompt, templated and encoded
    settings: Settings | None = None
    messages: Messages | None = None  # run on a server: the chat to send
    text: str | None = None  # run on a server: a `raw` prompt, sent to /v1/completions as is
    error: str | None = None
    numbered: bool = False  # the line has no `id`: its id is its line number
    tools: dict[str, Any] | None = None  # the line's TOOL_KEYS (and response_format), where its reply may call tools
    prefill: dict[str, Any] | None = None  # run on a server: the line's PREFILL_FIELDS, sent as given
    text_replies: bool = True  # a reply that calls no tool is text (else the JSON of its response_format's schema)


def _text_of(content: Any, index: int) -> Any:
    """A message's content as the server reads it: a string, or OpenAI's list of text parts
    ([{"type": "text", "text": "..."}], as OpenAI's batch files and SDKs write it) joined a line each."""
    if not isinstance(content, list):
        return content
    if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
        raise InputError(f"messages.{index}: only text content is supported (a string, or a list of text parts)")
    if not all(isinstance(part.get("text"), str) for part in content):
        raise InputError(f"messages.{index}: each text part needs a string `text`")
    return joined_parts([part["text"] for part in content])


def _checked_messages(messages: Any) -> Messages:
    """Role and content (null for an assistant's tool calls), with the calls and results the server takes."""
    if not isinstance(messages, list) or not messages:
        raise InputError("`messages` must be a non-empty list")
    turns = []
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)):
            raise InputError("each message needs a string `role` and `content`")
        content = _text_of(message.get("content"), index)
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise InputError("each message needs a string `role` and `content`")
        if message["role"] not in MESSAGE_ROLES:
            raise InputError(f"unknown message role {message['role']!r} (known: {', '.join(MESSAGE_ROLES)})")
        turns.append({"role": template_role(message["role"]), "content": content, **call_fields(message, index)})
    return turns


def _encode_messages(
    tokenizer: Tokenizer, messages: Any, tools: ToolSpec | None = None, fields: dict[str, Any] | None = None
) -> Prompt:
    # As the server builds a chat (the chat template, or a plain transcript), with its tools and the line's
    # PREFILL_FIELDS (in `fields`: by default a last message from the assistant is continued).
    turns = _checked_messages(messages)
    return chat_prompt(tokenizer, turns, tools, prompt_ending(fields or {}, turns, tools=tools is not None))


def _line_tools(data: dict, tokenizer: Tokenizer | None, answer: dict[str, Any] | None) -> ToolSpec | None:
    """The tools the line's reply may call, checked as the server checks them; None: a text reply.
    `answer`: the JSON Schema of the line's own `response_format`, which a reply that calls none answers in."""
    if not any(key in data for key in TOOL_KEYS):
        return None
    if "messages" not in data:
        raise InputError("`tools`, `tool_choice` and `parallel_tool_calls` go with `messages`, not `prompt`")
    parallel = data.get("parallel_tool_calls")
    if not isinstance(parallel, (bool, type(None))):
        raise ToolError("parallel_tool_calls: must be true or false", "parallel_tool_calls")
    native = tokenizer is not None and tokenizer.supports_tools
    return tool_spec(data.get("tools"), data.get("tool_choice"), parallel, native=native, answer=answer)


def parse_request(
    number: int,
    raw: bytes | None,
    tokenizer: Tokenizer | None,
    settings: Settings,
    context_length: int,
    *,
    plain_prompts: bool = False,
) -> BatchRequest:
    """Turn one line into a request; every problem becomes the line's error, never an exception.

    Without a tokenizer (the model is on a server) the request keeps its messages, or its raw text, to send;
    `plain_prompts`: the served model has no chat template, so a `prompt` is text to complete, as it is here."""
    line_id, numbered = str(number), True
    try:
        if raw is None:
            raise InputError(f"the line is over {MAX_LINE_BYTES // (1024 * 1024)} MiB")
        try:
            data = parse_line(raw)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if not isinstance(data, dict):
            raise InputError("a line must be a JSON object")
        found = lone_surrogate_at(raw, data)  # no result holding it could be written (UTF-8)
        if "id" in data and (found is None or found[0] != "id"):  # the line's own id, for its error result too
            if not isinstance(data["id"], (str, int)) or isinstance(data["id"], bool):
                raise InputError("`id` must be a string or a whole number")
            line_id, numbered = str(data["id"]), False
        if found is not None:
            raise InputError(f"`{found[0]}` holds {found[1]}, a lone surrogate that is not text")
        unknown = sorted(set(data) - REQUEST_KEYS)
        if unknown:
            raise InputError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(REQUEST_KEYS))})")
        changes = {k: data[k] for k in SAMPLING_KEYS if k in data}
        line_settings = with_sampling(settings, "the line", **changes) if changes else settings
        vocab_size = tokenizer.vocab_size if tokenizer is not None else None  # with --url, the server checks the ids
        sampling = stop_options(data, line_settings.sampling, vocab_size)
        line_settings = replace(line_settings, sampling=sampling)
        answer, asked = None, _asked_output(data)
        if asked is not None:  # OpenAI's, vLLM's or llama-server's, as a server takes it: over the run's flags
            if asked[1] is not None and tokenizer is not None:
                _check_opens(asked[0], asked[1], tokenizer)
            answer = answer_schema(asked[1]) if asked[0] == "response_format" else None
            line_settings = replace(line_settings, sampling=replace(line_settings.sampling, constraint=asked[1]))
        if ("prompt" in data) == ("messages" in data):
            raise InputError("give exactly one of `prompt` or `messages`")
        # The reply's JSON, constrained here (a server constrains it itself: the tools and the format are sent)
        if (tools := _line_tools(data, tokenizer, answer)) is not None:
            if asked is not None and asked[0] != "response_format":
                raise beside_tools(asked[0])
            constraint = tools.constraint if tokenizer is not None else None
            line_settings = replace(line_settings, sampling=replace(line_settings.sampling, constraint=constraint))
        stop = "stop" if "stop" in data and any(line_settings.sampling.stop) else ""
        stop = stop or ("stop_token_ids" if line_settings.sampling.stop_token_ids else "")
        if stop and tools is not None:  # the reply is JSON, a text reply's included
            raise InputError(f"`{stop}` does not go with `tools`: the reply is JSON and ends where its grammar does")
        if stop and line_settings.sampling.constraint is not None:
            raise InputError(f"`{stop}` does not go with structured output: the reply ends where its grammar does")
        system = data.get("system", line_settings.system)
        _check_prompt_options(data)
        sent = {key: data[key] for key in (*TOOL_KEYS, "response_format") if key in data}
        sent = sent if tools is not None else None
        shape = {"numbered": numbered, "tools": sent, "text_replies": tools is None or tools.answer is None}
        if tokenizer is None:
            if asked is not None and asked[1] is not None and asked[1].kind in ("regex", "grammar"):  # or a choice
                raise InputError(f"{asked[0]}: does not work with --url: OpenAI's response_format has only JSON")
            send = _to_send(data, system, tools is not None, plain_prompts)
            return BatchRequest(number, line_id, settings=line_settings, **shape, **send)
        if "messages" in data:
            prompt = _encode_messages(tokenizer, data["messages"], tools, data)
            if len(prompt.ids) >= context_length:
                message = f"the prompt is {len(prompt.ids)} tokens but the model's context holds {context_length}"
                raise InputError(message)
            line_settings = replace(line_settings, sampling=transcript_sampling(line_settings.sampling, tokenizer))
        else:
            prompt = fit_prompt(
                tokenizer,
                data["prompt"],
                context_length=context_length,
                max_tokens=line_settings.sampling.max_tokens,
                on_overflow=line_settings.on_overflow,
                system=system,
                raw=data.get("raw", False),
            )
        # A `prompt` completed as is, or messages whose last one is continued: the reply reads on from its text.
        sampling = replace(line_settings.sampling, continues_prompt=prompt.continues)
        return BatchRequest(number, line_id, prompt.ids, replace(line_settings, sampling=sampling), **shape)
    except (InputError, ConfigError, ChatTemplateRefusal) as exc:
        return BatchRequest(number, line_id, error=exc.message, numbered=numbered)


def _to_send(data: dict, system: str | None, tools: bool, plain: bool) -> dict[str, Any]:
    """What a server is sent for a line: its messages (and its PREFILL_FIELDS, checked), a prompt as a user
    message, or a raw prompt (any prompt, `plain`: the served model has no template; tools aside) as text."""
    if "messages" in data:
        turns = _checked_messages(data["messages"])
        prompt_ending(data, turns, tools=tools)  # the server decides; a bad field is the line's error
        prefill = {key: data[key] for key in PREFILL_FIELDS if key in data}
        return {"messages": turns, "prefill": prefill or None}
    if data.get("raw") or (plain and not tools):
        return {"text": data["prompt"]}
    return {"messages": messages_for(data["prompt"], system)}


def _asked_output(data: dict) -> tuple[str, OutputConstraint | None] | None:
    """The line's structured output, as (the key that asks for it, its constraint; None: text); None: not asked."""
    formatted = None
    if "response_format" in data:
        formatted = response_format(data["response_format"], "the line's `response_format`")
    beside = "response_format" if formatted is not None else None
    found = requested_output({key: data.get(key) for key in OUTPUT_FIELDS}, beside=beside)
    return found or (("response_format", formatted) if "response_format" in data else None)


def _check_opens(field: str, constraint: OutputConstraint, tokenizer: Tokenizer) -> None:
    """As the server checks a request's before it answers: a grammar no token can start (`[a&&b]`, found only
    against the vocabulary) is the line's error naming its field, as the server's 400 names it."""
    from gptcli.constraints import prepare  # the grammar engine, only for a line that asks for one

    try:
        prepare(constraint, tokenizer, field)
    except ConfigError as exc:
        raise InputError(exc.message) from None


def _check_prompt_options(data: dict) -> None:
    """`system` and `raw` shape a `prompt` through the chat template: refuse what would be silently dropped."""
    if "prompt" in data and (not isinstance(data["prompt"], str) or not data["prompt"].strip()):
        raise InputError("`prompt` must be non-empty text")
    if "system" in data and not isinstance(data["system"], str):
        raise InputError("`system` must be text")
    if "raw" in data and not isinstance(data["raw"], bool):
        raise InputError("`raw` must be true or false")
    if "prompt" in data and (given := next((key for key in PREFILL_FIELDS if key in data), None)):
        raise InputError(f"`{given}` goes with `messages`: a `prompt` is the user's message")
    if "messages" in data and ("system" in data or "raw" in data):
        raise InputError('`system` and `raw` go with `prompt`; in `messages`, give a {"role": "system"} message')
    if data.get("raw") and "system" in data:
        raise InputError("`raw: true` sends the prompt without the chat template, so `system` would be dropped")


def result_record(request: BatchRequest, finished: Finished) -> dict[str, Any]:
    if finished.reason == "error":  # the line's output grammar could not go on (its own schema or format)
        return error_record(request.id, finished.error or "generation failed")
    stats = finished.stats
    record: dict[str, Any] = {"id": request.id, "text": finished.text}
    finish = FINISH_NAMES.get(finished.reason, finished.reason)
    if request.tools is not None:  # as the server's message: its calls (text null), or its text
        reply = reply_of(finished, text_replies=request.text_replies)
        record["text"] = reply.content
        if reply.calls:
            record["tool_calls"], finish = openai_calls(reply), "tool_calls"
    return {
        **record,
        "finish_reason": finish,
        "usage": {**usage(stats), "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}},
    }


def error_record(request_id: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "error": {"message": one_line(message), "type": "invalid_request_error"}}
