"""The one decoding loop: prefill → sample → stop checks → incremental detokenize → events.

generate, chat, summarize and bench all consume `generate()`; every backend feeds it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from gptcli.backends.base import Backend
from gptcli.config import SamplingConfig
from gptcli.sampling import make_rng, sample
from gptcli.tokenizer import Tokenizer

FINISH_REASONS = ("stop", "length", "context", "interrupted")


@dataclass(frozen=True)
class Stats:
    """Timings of one generation, all derived from event timestamps."""

    prompt_tokens: int
    cached_tokens: int
    new_tokens: int
    decode_steps: int
    ttft_s: float
    prefill_s: float
    decode_s: float
    total_s: float

    @property
    def prefill_tokens_per_s(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token comes out of the prefill; each later one costs one decode step.
        return self.decode_steps / self.decode_s if self.decode_steps and self.decode_s > 0 else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "new_tokens": self.new_tokens,
            "ttft_s": round(self.ttft_s, 4),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "total_s": round(self.total_s, 4),
        }


@dataclass(frozen=True)
class Token:
    """Text that can no longer change. id is None for held-back text released at the end."""

    text: str
    id: int | None
    t: float


@dataclass(frozen=True)
class Finished:
    """The last event: why generation stopped, its timings and the whole text."""

    reason: str
    stats: Stats
    text: str
    token_ids: tuple[int, ...]


Event = Token | Finished


class IncrementalDetokenizer:
    """Emit only text that later tokens cannot change (no `�` from split UTF-8 characters)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._decode = tokenizer.decode
        self.ids: list[int] = []
        self._prefix = 0  # start of the window that gives decoding its context
        self._read = 0  # tokens before this are already emitted

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return after[len(before) :]


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


class KVSession:
    """A backend cache plus the token ids it holds, so a new prompt re-uses the shared prefix."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.cache = backend.new_cache()
        self.ids: list[int] = []

    def feed(self, ids: Sequence[int]) -> tuple[np.ndarray, int]:
        """Make the cache hold `ids`; return last-position logits and how many ids were re-used."""
        common = 0
        for a, b in zip(self.ids, ids, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one token must run to produce logits
        if common < len(self.ids):
            self.cache = self.backend.truncate(self.cache, common)
        logits, self.cache = self.backend.forward(ids[common:], self.cache)
        self.ids = list(ids)
        return logits, common

    def step(self, token_id: int) -> np.ndarray:
        logits, self.cache = self.backend.forward([token_id], self.cache)
        self.ids.append(token_id)
        return logits


def generate(
    backend: Backend,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    params: SamplingConfig,
    *,
    session: KVSession | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Iterator[Event]:
    """Stream Token events, then one Finished. Ctrl-C ends it with reason 'interrupted'."""
    if not prompt_ids:
        raise ValueError("generate() needs at least one prompt token")
    session = session or KVSession(backend)
    rng = make_rng(params.seed)
    detok = IncrementalDetokenizer(tokenizer)
    stopper = StopMatcher(params.stop)
    eos = tokenizer.eos_ids
    context = backend.info.context_length
    history = list(prompt_ids)
    start = clock()
    first_token_at = prefill_end = last_step_end = start
    reason = "length"
    hit_stop = False
    pieces: list[str] = []
    cached = 0
    steps = 0
    try:
        logits, cached = session.feed(prompt_ids)
        prefill_end = last_step_end = clock()
        while True:
            token_id = sample(logits, params, rng, history)
            if token_id in eos:
                reason = "stop"
                break
            history.append(token_id)
            text, hit_stop = stopper.push(detok.add(token_id))
            now = clock()
            if len(detok.ids) == 1:
                first_token_at = now
            pieces.append(text)
            yield Token(text, token_id, now)
            if hit_stop:
                reason = "stop"
                break
            if len(detok.ids) >= params.max_tokens:
                reason = "length"
                break
            if len(session.ids) + 1 > context:
                reason = "context"
                break
            logits = session.step(token_id)
            steps += 1
            last_step_end = clock()
    except KeyboardInterrupt:
        reason = "interrupted"
    if not hit_stop:
        # Release what was held back: bytes of an unfinished character, the start of a stop string.
        tail, hit_stop = stopper.push(detok.flush())
        tail += "" if hit_stop else stopper.flush()
        if tail:
            pieces.append(tail)
            yield Token(tail, None, clock())
    end = clock()
    new = len(detok.ids)
    stats = Stats(
        prompt_tokens=len(prompt_ids),
        cached_tokens=cached,
        new_tokens=new,
        decode_steps=steps,
        ttft_s=(first_token_at if new else end) - start,
        prefill_s=prefill_end - start,
        decode_s=max(last_step_end - first_token_at, 0.0) if steps else 0.0,
        total_s=end - start,
    )
    yield Finished(reason, stats, "".join(pieces), tuple(detok.ids))
