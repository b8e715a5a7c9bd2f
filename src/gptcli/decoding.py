"""The one per-sequence decoding state machine: sample → stop checks → incremental detokenize → events.

`SequenceDecoder` turns each row of logits a sequence receives into events (`Token`, then one
`Finished`). The engine (gptcli.engine) feeds it: alone for generate and chat, many at a time in one
batched backend step for summarize, batch files and the server.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gptcli.backends.base import Backend, Cache
from gptcli.config import SamplingConfig
from gptcli.constraints import TokenConstraint, open_constraint
from gptcli.sampling import TokenLogprob, make_rng, sample, token_logprobs
from gptcli.stopping import RepetitionDetector, StopMatcher
from gptcli.tokenizer import Tokenizer

# stop: end-of-sequence, a stop token or string, or a structured output that is complete; length: max_tokens;
# context: the context window is full; repetition: the reply only repeats itself; interrupted: Ctrl-C;
# cancelled: the caller gave up on it (a client disconnected); error: the step failed.
FINISH_REASONS = ("stop", "length", "context", "repetition", "interrupted", "cancelled", "error")


@dataclass(frozen=True)
class Stats:
    """Timings of one generation, all derived from event timestamps."""

    prompt_tokens: int | None  # None: not known (a server's reply that did not say, or was cut before it could)
    cached_tokens: int
    new_tokens: int
    decode_steps: int
    ttft_s: float
    prefill_s: float
    decode_s: float
    total_s: float

    @property
    def prefill_tokens_per_s(self) -> float:
        if self.prompt_tokens is None or self.prefill_s <= 0:
            return 0.0
        return (self.prompt_tokens - self.cached_tokens) / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token comes out of the prefill; each later one costs one decode step.
        return self.decode_steps / self.decode_s if self.decode_steps and self.decode_s > 0 else 0.0

    @property
    def first_token_s(self) -> float | None:
        """The time to the first token; None for a reply that never had one (cut before its first, or an empty
        one), whose ttft_s is the time to its end."""
        return self.ttft_s if self.new_tokens else None

    def timings(self) -> dict[str, float | None]:
        """What `--json` reports under "timings" (ttft_s null for a reply without a token)."""
        first = self.first_token_s
        return {
            "ttft_s": round(first, 4) if first is not None else None,
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "total_s": round(self.total_s, 4),
        }

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "new_tokens": self.new_tokens,
            **self.timings(),
        }


NO_STATS = Stats(0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0)  # a reply that never started (Ctrl-C before it did)


@dataclass(frozen=True)
class Token:
    """Text that can no longer change. id is None for held-back text released at the end.

    logprob is the token's log-probability (and the alternatives asked for) when the sampling settings
    ask for logprobs; the text of a token may be held back and come out with a later one."""

    text: str
    id: int | None
    t: float
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class Finished:
    """The last event: why generation stopped, its timings and the whole text (and each token's logprob, if asked)."""

    reason: str
    stats: Stats
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()  # None for the first prompt token (nothing predicts it)
    error: str = ""  # with reason "error": what went wrong, in one line, when it is known (structured output)


Event = Token | Finished


# The prompt's last tokens a reply that continues its text is decoded after: a word's space (a sentencepiece
# decoder strips the first one: "▁42" alone is "42") and the first bytes of a character split across the two.
CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Emit only text that later tokens cannot change (no `�` from split UTF-8 characters).

    `context`: tokens the text follows (a prompt's last ones), decoded before it but never emitted, so the text
    reads as it does after them (" 42", as vLLM decodes a completion); `ids` are the text's own tokens. The
    context's text is all its own, U+FFFD included (a literal one, or bytes that end it inside a character): a
    character the context began is emitted whole when the text's tokens finish it, else it stays the context's."""

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self._decode = tokenizer.decode
        self._bytes = tokenizer.token_bytes
        self.ids: list[int] = []
        self._window: list[int] = list(context)[-CONTEXT_TOKENS:]  # what is decoded: the last text written on
        self._read = len(self._window)  # tokens before this are already written (or the context's)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        self._window.append(token_id)
        text = self._unread()
        # Held back: no text yet, or the first bytes of a character. A U+FFFD of bytes no later token can make a
        # character (a stray continuation byte) is written now: held, it stopped the stream and grew the window,
        # decoded whole at every token, to the reply's end (a random model's replies took seconds).
        if text and not (text.endswith("\ufffd") and self._whole_characters() < len(self._window) - self._read):
            del self._window[: self._read]  # the tokens written now stay, as the next one's context
            self._read = len(self._window)
            return text
        return ""

    def flush(self) -> str:
        """The text held back, less a character the last tokens began and did not finish (a reply cut by max_tokens
        mid-emoji): its bytes are no text, and a U+FFFD for them is not the model's (vLLM drops them too)."""
        del self._window[self._read + self._whole_characters() :]
        text = self._unread()
        self._window.clear()
        self._read = 0
        return text

    def _whole_characters(self) -> int:
        """How many of the unread tokens end on a character's end (all of them, unless the last leave one open)."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        whole = 0
        for at, token in enumerate(self._window):
            utf8.decode(self._bytes(token))
            if at >= self._read and not utf8.getstate()[0]:  # no bytes of an unfinished character are waiting
                whole = at + 1 - self._read
        return whole

    def _unread(self) -> str:
        """The text the unread tokens add after the read ones. Where the read ones end inside a character (their
        text ends in U+FFFD) that the unread ones finish, the character is the new text's, whole."""
        read = self._decode(self._window[: self._read])
        whole = self._decode(self._window)
        start = len(read)  # back over the U+FFFD of a character the unread tokens finish
        while start and read[start - 1] == "\ufffd" and not whole.startswith(read[:start]):
            start -= 1
        return whole[start:]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids two sequences share (slices compared in C: the engine asks this every step)."""
    a, b = list(a), list(b)
    low, high = 0, min(len(a), len(b))  # a[:low] == b[:low]; the first difference is before `high`
    if a[:high] == b[:high]:
        return high
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


class KVSession:
    """A backend cache plus the token ids it holds, so a new prompt re-uses the shared prefix."""

    def __init__(self, backend: Backend, cache: Cache | None = None, ids: Sequence[int] = ()) -> None:
        """A new empty cache, or `cache` holding `ids`."""
        self.backend = backend
        self.cache = backend.new_cache() if cache is None else cache
        self.ids: list[int] = list(ids)

    def feed(self, ids: Sequence[int]) -> tuple[np.ndarray, int]:
        """Make the cache hold `ids`; return last-position logits and how many ids were re-used."""
        common = min(common_prefix(self.ids, ids), len(ids) - 1)  # at least one token must run for logits
        if common < len(self.ids):
            self.cache = self.backend.truncate(self.cache, common)
        logits, self.cache = self.backend.forward(ids[common:], self.cache)
        self.ids = list(ids)
        return logits, common

    def step(self, token_id: int) -> np.ndarray:
        logits, self.cache = self.backend.forward([token_id], self.cache)
        self.ids.append(token_id)
        return logits


class SequenceDecoder:
    """One sequence's decoding state, fed one row of logits at a time by whoever runs the backend.

    `accept(logits, now, positions)` samples the next token and returns the events it causes; once it
    returns a `Finished`, `done` is true. `positions` is how many positions the sequence's cache holds,
    so the decoder can stop before the context overflows. `next_token` is what to feed back next.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        params: SamplingConfig,
        *,
        context_length: int,
        start: float,
        cached_tokens: int = 0,
        clock: Callable[[], float] = time.perf_counter,
        prompt_logprobs: Sequence[TokenLogprob | None] = (),
    ) -> None:
        self.params = params
        self.prompt_logprobs = tuple(prompt_logprobs)
        self.context_length = context_length
        self.clock = clock
        self.rng = make_rng(params.seed)
        # A reply that continues the prompt's text (a completion, a message continued) reads as it does after it.
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids if params.continues_prompt else ())
        # A stop string (or stop token) would cut a structured output short of a match and still say "stop": the
        # grammar alone says where such a reply ends (the front doors refuse or warn about stop strings with one).
        free = params.constraint is None
        self.stopper = StopMatcher(params.stop if free else (), keep=params.include_stop_str_in_output)
        self.stop_ids = frozenset(params.stop_token_ids if free else ())
        self.loops = RepetitionDetector() if params.repetition_stop else None
        self.eos = frozenset() if params.ignore_eos else tokenizer.eos_ids
        self.enders = sorted(self.eos | self.stop_ids)  # masked out until min_tokens tokens were generated
        # Structured output: a token mask before every sample (sampling.py never sees a disallowed token).
        # The front doors check the grammar first; one that still fails ends only this sequence ("error"),
        # never the engine's step that the other sequences share.
        self.constraint: TokenConstraint | None = None
        self.failure = ""  # why the sequence ends with "error", when it does
        self.forced = False  # the last token was one the grammar left no choice about
        if params.constraint is not None:
            # A grammar that cannot be opened leaves this None: _constrained_pick ends the sequence ("error").
            try:
                self.constraint = open_constraint(params.constraint, tokenizer)
            except Exception as exc:
                self.failure = f"the output grammar could not be opened: {exc}".splitlines()[0]
        self.prompt_tokens = len(prompt_ids)
        self.cached_tokens = cached_tokens
        self.history = list(prompt_ids)
        self.pieces: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.start = start
        self.prefill_end: float | None = None
        self.first_token_at: float | None = None
        self.last_step_end = start
        self.steps = 0
        self.next_token: int | None = None
        self.finished: Finished | None = None

    @property
    def done(self) -> bool:
        return self.finished is not None

    def accept(self, logits: np.ndarray, now: float, positions: int) -> list[Event]:
        """Sample from this step's logits; return the Token (if any) and, when it ends, the Finished."""
        if self.prefill_end is None:
            self.prefill_end = now
        else:
            self.steps += 1
        self.last_step_end = now
        self.next_token = None
        if self.params.max_tokens == 0:  # only the prompt was wanted (its logprobs: the server's echo)
            return self.finish("length")
        if self.params.constraint is None:
            token_id = sample(self._held_open(logits), self.params, self.rng, self.history, self.detok.ids)
        else:
            picked = self._constrained_pick(logits)
            if isinstance(picked, str):
                return self.finish(picked)
            token_id = picked
        stop_token = token_id in self.stop_ids  # its text is the reply's only with include_stop_str_in_output
        if token_id in self.eos or (stop_token and not self.params.include_stop_str_in_output):
            return self.finish("stop")
        logprob = None
        if self.params.logprobs is not None:
            logprob = token_logprobs(logits, token_id, self.params.logprobs)
            self.logprobs.append(logprob)
        self.history.append(token_id)
        piece = self.detok.add(token_id)
        text, hit_stop = self.stopper.push(piece, match=len(self.detok.ids) > self.params.min_tokens)
        emitted = self.clock()
        if len(self.detok.ids) == 1:
            self.first_token_at = emitted
        self.pieces.append(text)
        events: list[Event] = [Token(text, token_id, emitted, logprob)]
        if hit_stop or stop_token:
            return events + self.finish("stop", stopped=hit_stop)
        if self.constraint is not None and self.constraint.complete:  # a grammar that can only end, ends
            return events + self.finish("stop")
        looping = self.loops is not None and not self.forced and self.loops.add(token_id)
        if looping and len(self.detok.ids) >= self.params.min_tokens:  # min_tokens holds off the repetition stop too
            return events + self.finish("repetition")
        if len(self.detok.ids) >= self.params.max_tokens:
            return events + self.finish("length")
        if positions + 1 >= self.context_length:  # prompt + reply fill the context (this token need not be read)
            return events + self.finish("context")
        self.next_token = token_id
        return events

    def _constrained_pick(self, logits: np.ndarray) -> int | str:
        """The next token among those the grammar allows, or the finish reason when the reply ends here."""
        constraint = self.constraint
        if constraint is None:  # the grammar could not be opened
            return "error"
        masked = constraint.mask(logits)
        if masked is None:  # the grammar allows nothing, not even end-of-sequence
            if constraint.accepting:
                return "stop"
            if not self.detok.ids:
                self.failure = "the schema or regex matches no text at all"
            else:
                self.failure = f"no token can continue the output grammar ({constraint.error or 'no match'})"
            return "error"
        if self.params.ignore_eos or len(self.detok.ids) < self.params.min_tokens:
            # End-of-sequence only where the grammar allows nothing else (min_tokens never makes a reply invalid).
            others = masked.copy()
            others[[i for i in constraint.eos_ids if i < others.shape[-1]]] = -np.inf
            masked = others if np.isfinite(others).any() else masked
        token_id = sample(masked, self.params, self.rng, self.history, self.detok.ids)
        if not constraint.allows(token_id):  # rounding in top-p's cumulative sum: take the best allowed one
            token_id = int(np.argmax(masked))
        if constraint.is_end(token_id):  # end-of-sequence is allowed only once the match is complete
            return "stop"
        self.forced = constraint.forced(token_id)  # text the grammar forced is no loop of the model's
        if constraint.advance(token_id):
            return token_id
        self.failure = f"the output grammar failed: {constraint.error or 'a token did not fit'}"
        return "error"

    def _held_open(self, logits: np.ndarray) -> np.ndarray:
        """vLLM's min_tokens: until that many tokens were generated, no token that ends the reply can be sampled."""
        if len(self.detok.ids) >= self.params.min_tokens or not self.enders:
            return logits
        held = logits.copy()
        held[[i for i in self.enders if i < held.shape[-1]]] = -np.inf
        return held

    def finish(self, reason: str, *, stopped: bool = False) -> list[Event]:
        """End the sequence: release held-back text (unless a stop string cut it) and report the stats."""
        if self.finished is not None:
            return []
        events: list[Event] = []
        if not stopped:
            # Release what was held back: bytes of an unfinished character, the start of a stop string.
            tail, hit_stop = self.stopper.push(self.detok.flush(), match=len(self.detok.ids) > self.params.min_tokens)
            tail += "" if hit_stop else self.stopper.flush()
            if tail:
                self.pieces.append(tail)
                events.append(Token(tail, None, self.clock()))
        end = self.clock()
        new = len(self.detok.ids)
        prefill_end = self.prefill_end if self.prefill_end is not None else end
        first = self.first_token_at if self.first_token_at is not None else end
        stats = Stats(
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            new_tokens=new,
            decode_steps=self.steps,
            ttft_s=(first if new else end) - self.start,
            prefill_s=prefill_end - self.start,
            decode_s=max(self.last_step_end - first, 0.0) if self.steps else 0.0,
            total_s=end - self.start,
        )
        self.next_token = None
        self.finished = Finished(
            reason,
            stats,
            "".join(self.pieces),
            tuple(self.detok.ids),
            tuple(self.logprobs),
            self.prompt_logprobs,
            self.failure if reason == "error" else "",
        )
        events.append(self.finished)
        return events
