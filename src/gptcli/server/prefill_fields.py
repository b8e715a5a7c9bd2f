"""Whether a chat's last message, the assistant's, is continued (assistant prefill): vLLM's request fields
`continue_final_message` and `add_generation_prompt`, on chat completions and /tokenize. gptcli.prompts decides
(prompt_ending, as for a batch line), and a field that does not fit is a 400 that names it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from gptcli.errors import FieldError
from gptcli.prompts import PREFILL_FIELDS, Messages, prompt_ending
from gptcli.server.errors import field_error


class PrefillFields(BaseModel):
    """The request fields; typed Any so that gptcli.prompts alone checks them (strictly: 1 is not true)."""

    continue_final_message: Any = None
    add_generation_prompt: Any = None

    def prompt_ending(self, turns: Messages, *, tools: bool) -> str:
        """How the prompt of these messages ends: a new turn, the last message continued, or none."""
        try:
            return prompt_ending({name: getattr(self, name) for name in PREFILL_FIELDS}, turns, tools=tools)
        except FieldError as exc:
            raise field_error(exc) from None
