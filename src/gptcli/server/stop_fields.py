"""vLLM's stopping options on chat and text completions: `min_tokens`, `stop_token_ids`,
`include_stop_str_in_output` (its "extra sampling parameters"). gptcli.stopping checks them, as it checks a
batch line's, and a bad one is a 400 that names it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from gptcli.config import SamplingConfig
from gptcli.errors import FieldError
from gptcli.server.errors import field_error
from gptcli.stopping import STOP_FIELDS, stop_options


class StopFields(BaseModel):
    """The request fields; typed Any so that gptcli.stopping alone checks them (strictly: true is not 1)."""

    min_tokens: Any = None
    stop_token_ids: Any = None
    include_stop_str_in_output: Any = None

    def stop_options(self, params: SamplingConfig, vocab_size: int, max_tokens_field: str) -> SamplingConfig:
        """`params` (with the request's max_tokens, which it sets in `max_tokens_field`) and these fields, checked
        against the model's vocabulary."""
        try:
            fields = {name: getattr(self, name) for name in STOP_FIELDS}
            return stop_options(fields, params, vocab_size, max_tokens_field)
        except FieldError as exc:
            raise field_error(exc) from None
