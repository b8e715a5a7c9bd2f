"""A request's fields in OpenAI's words, as the remote client sends them: the sampling settings (our extras only
when set away from neutral) and structured output as `response_format`."""

from __future__ import annotations

import json
from typing import Any

from gptcli.config import OutputConstraint, SamplingConfig
from gptcli.errors import InputError

DEFAULTS = SamplingConfig()
# Sent only when set away from neutral: OpenAI's penalties, and our extras (which api.openai.com refuses).
EXTRAS: dict[str, Any] = dict(frequency_penalty=0.0, presence_penalty=0.0, top_k=0, min_p=DEFAULTS.min_p)
EXTRAS.update(
    repetition_penalty=1.0, min_tokens=0, stop_token_ids=(), include_stop_str_in_output=False, ignore_eos=False
)


def sampling_fields(params: SamplingConfig, model: str) -> dict[str, Any]:
    """A streamed request's fields for `params`, asking `model`."""
    body: dict[str, Any] = {
        "model": model,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop and params.constraint is None:  # a structured output ends where its grammar does
        body["stop"] = list(params.stop)
    body.update({name: getattr(params, name) for name, neutral in EXTRAS.items() if getattr(params, name) != neutral})
    if params.constraint is not None:
        body["response_format"] = response_format(params.constraint)
    return body


def response_format(constraint: OutputConstraint) -> dict[str, Any]:
    """Structured output in OpenAI's words: `--format json` as a JSON object, `--json-schema` as itself."""
    if constraint.kind == "json":
        return {"type": "json_object"}
    if constraint.kind != "json_schema":
        raise InputError(f"a {constraint.kind} constraint has no OpenAI format", hint="run the model here")
    schema = json.loads(constraint.source)
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}
