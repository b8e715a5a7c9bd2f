"""The engine's record of one submitted sequence: its prompt, settings, cache and decoding state."""

from __future__ import annotations

from dataclasses import dataclass, field

from gptcli.config import SamplingConfig
from gptcli.decoding import KVSession, SequenceDecoder
from gptcli.engine.handle import SequenceHandle
from gptcli.sampling import TokenLogprob


@dataclass
class SequenceState:
    handle: SequenceHandle
    prompt: list[int]
    params: SamplingConfig
    session: KVSession | None  # made in the engine's thread when the sequence starts, unless given
    owns_session: bool
    reserve: int
    submitted: float
    decoder: SequenceDecoder | None = None
    started: bool = False  # its prompt's reusable prefix has been matched against the session
    cached: int = 0  # prompt tokens the session already held
    retired: bool = False
    pending: list[int] = field(default_factory=list)  # prompt ids not yet in the cache
    prompt_scores: list[TokenLogprob | None] = field(default_factory=list)  # when params.prompt_logprobs is set

    @property
    def scores_prompt(self) -> bool:
        """It wants its prompt's own logprobs: every prompt position is read, none copied."""
        return self.params.prompt_logprobs is not None

    def next_chunk(self, size: int) -> list[int]:
        """The next `size`-token prompt chunk, cut at fixed offsets from where the prompt starts: the same cuts
        alone or batched, whatever the step's budget."""
        done = len(self.prompt) - len(self.pending) - self.cached
        return self.pending[: size - done % size]

    @property
    def shares_prefix(self) -> bool:
        """Its prompt's KV may come from the prefix cache or another sequence, and go to the cache."""
        return self.owns_session and not self.scores_prompt
