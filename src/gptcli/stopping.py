"""How a reply stops, beside end-of-sequence and max_tokens: stop strings found across token boundaries
(`StopMatcher`) and a reply that only repeats itself (`RepetitionDetector`). gptcli.decoding applies them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class StopMatcher:
    """Find stop strings across token boundaries; hold back only a tail that could start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._buffer = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to show, whether a stop string was hit)."""
        self._buffer += text
        if not self.stops:
            out, self._buffer = self._buffer, ""
            return out, False
        hits = [i for i in (self._buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self._buffer = self._buffer[: min(hits)], ""
            return out, True
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self._buffer)), hold, -1):
                if self._buffer.endswith(stop[:size]):
                    hold = size
                    break
        cut = len(self._buffer) - hold
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out, False

    def flush(self) -> str:
        out, self._buffer = self._buffer, ""
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
