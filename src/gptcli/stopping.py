"""How a reply stops, beside end-of-sequence and max_tokens: stop strings found across token boundaries
(`StopMatcher`) and a reply that only repeats itself (`RepetitionDetector`). gptcli.decoding applies them.

`stop_options` reads vLLM's stopping options (its "extra sampling parameters") of one request, a server's or
a batch line's, into its settings: `min_tokens` (end-of-sequence, `stop_token_ids` and stop strings wait until
that many tokens were generated), `stop_token_ids` (each ends the reply as end-of-sequence does) and
`include_stop_str_in_output` (the stop string or stop token that ends a reply stays in its text).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from gptcli.config import SamplingConfig
from gptcli.errors import FieldError

MAX_STOP_TOKEN_IDS = 64  # entries in one request's stop_token_ids
STOP_FIELDS = ("min_tokens", "stop_token_ids", "include_stop_str_in_output")


def stop_options(
    fields: Mapping[str, Any], params: SamplingConfig, vocab_size: int | None, max_tokens_field: str = "max_tokens"
) -> SamplingConfig:
    """`params` with the request's STOP_FIELDS (absent or None: unchanged), checked alike for the server and batch
    lines: a FieldError names the field. `params.max_tokens` is the request's own, which it sets in
    `max_tokens_field` (the Responses API's max_output_tokens); `vocab_size` None: the model is on a server (a
    batch run with --url), which checks the ids against its vocabulary."""
    changes: dict[str, Any] = {}
    if (minimum := fields.get("min_tokens")) is not None:
        if not _whole(minimum) or minimum < 0:
            raise FieldError(f"min_tokens: must be a whole number >= 0, got {_short(minimum)}", "min_tokens")
        if minimum > params.max_tokens:
            message = f"min_tokens: must be at most {max_tokens_field} ({params.max_tokens}), got {minimum}"
            raise FieldError(message, "min_tokens")
        changes["min_tokens"] = minimum
    if (ids := fields.get("stop_token_ids")) is not None:
        if not isinstance(ids, list):
            raise FieldError(f"stop_token_ids: must be a list of token ids, got {_short(ids)}", "stop_token_ids")
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise FieldError(
                f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} token ids, got {len(ids)}", "stop_token_ids"
            )
        for token in ids:
            if not _whole(token):
                message = f"stop_token_ids: a token id is a whole number, got {_short(token)}"
                raise FieldError(message, "stop_token_ids")
            if token < 0 or (vocab_size is not None and token >= vocab_size):
                where = f"the vocabulary [0, {vocab_size})" if vocab_size is not None else "a vocabulary (ids are >= 0)"
                raise FieldError(f"stop_token_ids: token {token} is not in {where}", "stop_token_ids")
        changes["stop_token_ids"] = tuple(dict.fromkeys(ids))
    if (keep := fields.get("include_stop_str_in_output")) is not None:
        if not isinstance(keep, bool):
            message = f"include_stop_str_in_output: must be true or false, got {_short(keep)}"
            raise FieldError(message, "include_stop_str_in_output")
        changes["include_stop_str_in_output"] = keep
    return replace(params, **changes) if changes else params


def check_min_tokens(params: SamplingConfig, prompt_tokens: int, context: int) -> None:
    """A min_tokens the model's context cannot hold after this prompt (the reply would run to the context's end,
    never reaching it): a FieldError naming the bound, as stop_options names max_tokens."""
    room = context - prompt_tokens
    if params.min_tokens > room:
        message = (
            f"min_tokens: must be at most {room}, what the model's context ({context} tokens) holds after the prompt"
            f" ({prompt_tokens} tokens), got {params.min_tokens}"
        )
        raise FieldError(message, "min_tokens")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # strict, as the server's types: true is not 1


def _short(value: Any) -> str:
    """A request's value as an error quotes it: as JSON writes it (true, "5"), cut to a few words."""
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 40 else text[:37] + "..."


class StopMatcher:
    """Find stop strings across token boundaries; hold back only a tail that could start one.

    `keep` (vLLM's include_stop_str_in_output): the stop string that ends the text stays in it, so nothing is
    held back; the last characters shown are kept to find a stop string that began in them."""

    def __init__(self, stops: Sequence[str], *, keep: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.keep = keep
        self._longest = max((len(s) for s in self.stops), default=0)
        self._buffer = ""  # the text a stop string could still end in: the last characters shown, then those held
        self._shown = 0  # how many leading characters of the buffer were already shown
        self._seen = 0  # how many leading characters of the buffer were already searched (or were not to be)

    def push(self, text: str, *, match: bool = True) -> tuple[str, bool]:
        """Add text; return (text safe to show, whether a stop string was hit). With `match` false (vLLM's
        min_tokens not yet reached) the text is not searched: only a stop string ending in later text counts."""
        self._buffer += text
        if not self.stops:
            out, self._buffer = self._buffer, ""
            return out, False
        if match:
            hits = [(at, len(stop)) for stop in self.stops if (at := self._find(stop)) >= 0]
            if hits:
                at, size = min(hits)
                out = self._buffer[self._shown : at + size if self.keep else at]
                self._buffer, self._shown, self._seen = "", 0, 0
                return out, True
        pending = self._buffer[self._shown :]
        hold = 0
        for stop in [] if self.keep else self.stops:
            for size in range(min(len(stop) - 1, len(pending)), hold, -1):
                if pending.endswith(stop[:size]):
                    hold = size
                    break
        cut = len(self._buffer) - hold
        out = self._buffer[self._shown : cut]
        window = min(cut, max(0, len(self._buffer) - (self._longest - 1)))
        self._buffer = self._buffer[window:]
        self._shown, self._seen = cut - window, len(self._buffer)
        return out, False

    def _find(self, stop: str) -> int:
        """Where `stop` first occurs in the buffer ending past what was already searched; -1: nowhere."""
        return self._buffer.find(stop, max(0, self._seen - len(stop) + 1))

    def flush(self) -> str:
        out = self._buffer[self._shown :]
        self._buffer, self._shown, self._seen = "", 0, 0
        return out


class RepetitionDetector:
    """Notices a reply that has fallen into a loop: the same block of tokens, over and over, at its end.

    For each period p (1..MAX_PERIOD) it keeps how many of the latest tokens equal the token p back;
    a block of p tokens repeated k times at the end is `run[p] >= (k - 1) * p`. A loop is a block of
    any period seen at least 4 times that spans at least 48 tokens (so a 1-token block needs 48 in a
    row: a long rule of `=====` in a document is not cut, a sentence said four times over is).
    """

    MAX_PERIOD = 96
    MIN_REPEATS = 4
    MIN_SPAN = 48

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.run = np.zeros(self.MAX_PERIOD + 1, dtype=np.int64)
        periods = np.arange(self.MAX_PERIOD + 1)
        repeats = np.maximum(self.MIN_REPEATS, -(-self.MIN_SPAN // np.maximum(periods, 1)))
        self.needed = (repeats - 1) * periods  # run length that means a loop, per period
        self.needed[0] = np.iinfo(np.int64).max

    def add(self, token_id: int) -> bool:
        """Add a generated token; True when the reply is now looping."""
        self.ids.append(token_id)
        n = len(self.ids)
        limit = min(self.MAX_PERIOD, n - 1)
        if limit < 1:
            return False
        back = np.asarray(self.ids[n - 1 - limit : n - 1][::-1])  # back[p-1] is the token p positions back
        same = back == token_id
        self.run[1 : limit + 1] = np.where(same, self.run[1 : limit + 1] + 1, 0)
        return bool(np.any(self.run[1 : limit + 1] >= self.needed[1 : limit + 1]))
