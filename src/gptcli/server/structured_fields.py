"""The structured-output fields of vLLM's and llama-server's clients on a chat or text completion, beside OpenAI's
`response_format`: checked by gptcli.output_requests, as a batch line's are, and a 400 naming the field."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from gptcli.config import OutputConstraint
from gptcli.errors import FieldError
from gptcli.output_requests import (
    OUTPUT_FIELDS,
    asked_fields,
    beside_tools,
    requested_output,
    response_format_param,
)
from gptcli.server.errors import APIError, field_error


class StructuredFields(BaseModel):
    """vLLM's `structured_outputs` (0.10 on) and its older `guided_*` fields; llama-server's `json_schema` and
    `grammar`. Any type here: gptcli.output_requests checks each value and names the one that does not fit."""

    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    json_schema: Any = None
    grammar: Any = None
    guided_decoding_backend: Any = None  # vLLM's older options: accepted, and change nothing here
    guided_whitespace_pattern: Any = None

    def _output_values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in OUTPUT_FIELDS}

    def output_field(self) -> str | None:
        """The field (`structured_outputs.regex`, `guided_json`, ...) that asks for structured output; None: none."""
        try:
            asked = asked_fields(self._output_values())
        except FieldError as exc:
            return exc.param
        return asked[0][0] if asked else None

    def output_param(self) -> str:
        """The field a failing grammar's 400 names: the one that asks for structured output, else where the request's
        response_format holds its schema (`response_format.json_schema.schema`, as a keyword it cannot enforce names
        it), else response_format."""
        formatted = getattr(self, "response_format", None)  # a chat's or a completion's (SamplingRequest's field)
        return self.output_field() or response_format_param(formatted.model_dump(by_alias=True) if formatted else None)

    def output_constraint(self, formatted: OutputConstraint | None) -> OutputConstraint | None:
        """The constraint these fields ask for, else `formatted` (a JSON response_format's): both is a 400."""
        try:
            found = requested_output(self._output_values(), beside=None if formatted is None else "response_format")
        except FieldError as exc:
            raise field_error(exc) from None
        return formatted if found is None else found[1]

    def refuse_beside_tools(self, format_field: str = "response_format") -> None:
        """Tools make the reply JSON of their own: structured output asked for beside them is a 400, whose hint
        names `format_field`, where this route takes the format of a reply that calls no tool."""
        if (field := self.output_field()) is not None:
            error = beside_tools(field, format_field)
            raise APIError(400, f"{error.message}; {error.hint}", param=field, code="invalid_value")
