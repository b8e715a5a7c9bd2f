"""The prefix cache: finished sequences' KV sessions, kept for later prompts that start the same way.

Each kept session is cut back to its prompt's whole prefill chunks, and a new prompt reuses the longest
run of whole chunks it shares with one: a copy of them (the backend's `fork`), so several sequences that
arrive together share one prefix; a backend without `fork` hands the kept session itself over. Running
sequences share too (`share`): before a sequence reads its next chunk, it copies the whole chunks another
running sequence has already read of the same prompt start, so a burst of alike prompts reads it once.

Only whole chunks are reused: a fresh run would have read those positions in the very same chunks (the
same tokens at the same offsets), so a reused prefix gives the same answers as none. The engine counts
the kept positions against its KV budget and evicts the oldest before any sequence would wait for room.
Touched by the engine's thread only (the engine's lock guards what other threads read).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gptcli.backends.base import Cache
from gptcli.decoding import KVSession, common_prefix


@dataclass
class _Kept:
    session: KVSession
    positions: int  # its first `positions` are whole chunks of a prompt


class PrefixCache:
    """At most `capacity` sessions, oldest first; `release` gives a cache it drops back to the backend."""

    def __init__(
        self,
        capacity: int,
        chunk: int,
        release: Callable[[Cache], None],
        fork: Callable[[Cache, int], Cache] | None = None,
    ) -> None:
        self.capacity = capacity
        self.chunk = chunk
        self.release = release
        self.fork = fork
        self.kept: list[_Kept] = []
        self.positions = 0  # KV positions held, for the budget

    def __len__(self) -> int:
        return len(self.kept)

    def take(self, prompt: Sequence[int]) -> tuple[KVSession, int] | None:
        """The session holding the most whole chunks `prompt` starts with (out of the cache), and how many
        of its positions to keep; None when no whole chunk matches."""
        best, best_positions = -1, 0
        for index, kept in enumerate(self.kept):
            usable = self._whole_chunks(kept.session.ids, prompt, kept.positions)
            if usable > best_positions:
                best, best_positions = index, usable
        if best < 0:
            return None
        kept = self.kept.pop(best)
        if self.fork is not None:  # a copy: the entry stays, now the newest
            self.kept.append(kept)
            source = kept.session
            copy = KVSession(source.backend, self.fork(source.cache, best_positions), source.ids[:best_positions])
            return copy, best_positions
        self.positions -= kept.positions
        return kept.session, best_positions

    def share(self, session: KVSession, prompt: Sequence[int], others: list[tuple[KVSession, int]]) -> int:
        """Before `session` reads the next chunk of `prompt`: when another running session (with its prompt's
        length) has already read more of the same whole chunks, replace `session`'s cache with a copy of
        them and return how many positions it now holds (0: nothing to share, or no `fork`)."""
        if self.capacity < 1 or self.fork is None:
            return 0
        done, need = len(session.ids), len(session.ids) + self.chunk
        best, source = done, None
        for other, prompt_length in others:
            if len(other.ids) < need or other.ids[:need] != list(prompt[:need]):
                continue  # cheap test first: not even the next chunk in common
            usable = self._whole_chunks(other.ids, prompt, prompt_length)
            if usable > best:
                best, source = usable, other
        if source is None:
            return 0
        old = session.cache
        session.cache, session.ids = self.fork(source.cache, best), list(prompt[:best])
        self.release(old)
        return best

    def _whole_chunks(self, ids: Sequence[int], prompt: Sequence[int], limit: int) -> int:
        """How many positions of `ids` (whole chunks, at most `limit`) `prompt` may take: at least one of
        its tokens must still run to give logits."""
        usable = min(common_prefix(ids, prompt), limit, len(prompt) - 1)
        return usable - usable % self.chunk

    def keep(self, session: KVSession, prompt_length: int) -> bool:
        """Cut the session back to its prompt's whole chunks and keep it (evicting the oldest past
        `capacity`); False when there is nothing new to keep.

        One entry per prefix: a session whose chunks an entry already holds only makes that entry the
        newest, and entries the session holds all of go. Otherwise a run of requests on one system prompt
        filled every entry with copies of it and evicted every other prompt's prefix."""
        positions = min(prompt_length, len(session.ids))
        positions -= positions % self.chunk
        if self.capacity < 1 or positions == 0:
            return False
        ids = session.ids[:positions]
        for index, kept in enumerate(self.kept):
            if kept.positions >= positions and kept.session.ids[:positions] == ids:
                self.kept.append(self.kept.pop(index))
                return False
        for kept in [k for k in self.kept if k.session.ids[: k.positions] == ids[: k.positions]]:
            self.kept.remove(kept)
            self.positions -= kept.positions
            self.release(kept.session.cache)
        session.cache = session.backend.truncate(session.cache, positions)
        del session.ids[positions:]
        self.kept.append(_Kept(session, positions))
        self.positions += positions
        while len(self.kept) > self.capacity:
            self.evict_oldest()
        return True

    def evict_oldest(self) -> None:
        kept = self.kept.pop(0)
        self.positions -= kept.positions
        self.release(kept.session.cache)
