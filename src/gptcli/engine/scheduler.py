"""The scheduler: many sequences decoded together, joining and leaving at step boundaries.

Decoding is bound by memory: each step streams every weight once, so B sequences advanced in the same
backend step cost little more than one. The engine keeps a queue of waiting sequences and a set of
running ones; each `step()`:
  1. drops cancelled sequences (their caches go back to the backend now),
  2. admits waiting sequences while there is room (`max_running`) and KV budget,
  3. builds one batch: one token for each decoding sequence and prefill chunks for sequences still
     reading their prompt (at most `prefill_chunk` tokens each, at fixed offsets, so a sequence is cut
     the same way alone or in company; at most `step_prefill_tokens` in all, oldest first, so a burst
     of long prompts never stalls the sequences already decoding; a prompt's last chunk may also use a
     second budget, so a short prompt never waits for a long one),
  4. runs `batched_step` once, and hands each finished prompt's logits to that sequence's
     `SequenceDecoder` (the one decoding state machine), which emits its events. A sequence that asks
     for its prompt's logprobs reads its prompt beside the batch instead (scoring.py).

The KV budget is counted in positions: a sequence reserves `min(prompt + max_tokens, context)` when
it is admitted, so a running sequence never runs out and nothing running is ever disturbed by a new
one. A sequence that could never fit fails at `submit` with a clear error.

With `prefix_cache` > 0 (the server), finished sequences' caches are kept for prompts that start
alike (prefix_cache.py); kept positions count against the KV budget but never make a sequence wait.

The engine runs either in the caller's thread (run.py: `generate`, `run_all`, the CLI) or in a background
thread (`start`/`stop`: the server). Events reach a sequence's owner through its `on_event` callback or its
handle's queue.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import numpy as np

from gptcli.backends.base import Backend, check_token_ids, fork_of, release_cache
from gptcli.config import SamplingConfig
from gptcli.decoding import Event, KVSession, SequenceDecoder, common_prefix
from gptcli.engine.handle import SequenceHandle
from gptcli.engine.limits import EngineLimits, EngineStats, default_kv_budget, kv_reserve, startable
from gptcli.engine.prefix_cache import PrefixCache
from gptcli.engine.scoring import step_scoring_prompts
from gptcli.engine.sequence import SequenceState
from gptcli.errors import ConfigError, QueueFullError
from gptcli.sampling import TokenLogprob
from gptcli.stopping import check_min_tokens
from gptcli.tokenizer import Tokenizer

_log = logging.getLogger(__name__)


class Engine:
    """Continuous batching over one backend. See the module docstring."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        limits: EngineLimits | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.limits = limits or EngineLimits()
        if self.limits.max_running < 1:
            raise ConfigError("--parallel must be at least 1", hint="pass --parallel 1 or more")
        if self.limits.prefill_chunk < 1:
            raise ConfigError("the prefill chunk must be at least 1 token")
        self.kv_budget = self.limits.kv_budget_tokens or default_kv_budget(backend, self.limits.max_running)
        self.clock = clock
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._waiting: deque[SequenceState] = deque()
        self._running: list[SequenceState] = []
        self._cancelled: set[int] = set()
        self._kv_used = 0
        release = functools.partial(release_cache, backend)
        self._prefixes = PrefixCache(self.limits.prefix_cache, self.limits.prefill_chunk, release, fork_of(backend))
        self._steps = 0
        self._generated = 0
        self._prompt_tokens = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._background = False

    def check_fits(self, prompt_tokens: int, params: SamplingConfig) -> int:
        """The KV positions a sequence reserves; an InputError when it could never run, a FieldError naming
        min_tokens when the context cannot hold that many tokens after the prompt."""
        context = self.backend.info.context_length
        reserve = kv_reserve(prompt_tokens, params.max_tokens, context, self.kv_budget)
        check_min_tokens(params, prompt_tokens, context)
        return reserve

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingConfig,
        *,
        on_event: Callable[[Event], None] | None = None,
        session: KVSession | None = None,
    ) -> SequenceHandle:
        """Queue a sequence; thread-safe. `session` keeps its cache after the sequence (chat)."""
        prompt = list(prompt_ids)
        check_token_ids(prompt, self.backend.info.vocab_size)
        reserve = self.check_fits(len(prompt), params)
        with self._lock:
            if self._stopping:
                raise QueueFullError("the server is shutting down", hint="retry against another replica")
            # Until the next step admits them, new sequences wait even for a free slot: only those the next
            # step cannot start (no slot, or no KV room) are queued (--max-queue 0: no queue, not "refuse everything").
            free = max(0, self.limits.max_running - len(self._running))
            reserves = [*(s.reserve for s in self._waiting), reserve]  # with this one
            room = self.kv_budget - self._kv_used  # the prefix cache's positions give way (_admit)
            if (queued := len(reserves) - startable(reserves, free, room)) > self.limits.max_queue:
                waiting = f"{queued - 1} requests are already waiting for a slot"
                if queued == 2:
                    waiting = "1 request is already waiting for a slot"
                if not self.limits.max_queue:  # not "0 requests are already waiting"
                    waiting = "every slot is taken and nothing may wait for one"
                raise QueueFullError(f"{waiting} (--max-queue {self.limits.max_queue})", hint="retry in a moment")
            handle = SequenceHandle(next(self._ids), len(prompt), on_event)
            owned = session is None
            self._waiting.append(
                # Not KVSession(backend) here: a new cache may grow the backend's KV pool, which only the
                # engine's thread may touch (this may be a server's request thread).
                SequenceState(handle, prompt, params, session, owned, reserve, self.clock())
            )
            self._lock.notify_all()
        return handle

    def cancel(self, handle: SequenceHandle) -> None:
        """Thread-safe: the sequence ends with reason 'cancelled' and frees its cache at the next step."""
        with self._lock:
            if not handle.done:
                self._cancelled.add(handle.id)
                self._lock.notify_all()

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._running

    def snapshot(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                running=len(self._running),
                waiting=len(self._waiting),
                kv_used_tokens=self._kv_used,
                kv_budget_tokens=self.kv_budget,
                kv_cached_tokens=self._prefixes.positions,
                steps=self._steps,
                tokens_generated=self._generated,
                prompt_tokens=self._prompt_tokens,
            )

    def step(self) -> bool:
        """Advance every running sequence by one backend step. False when there was nothing to do."""
        self._drop_cancelled()
        self._admit()
        if not self._running:
            return False
        batch, inputs = self._plan_step()
        try:
            logits, caches, scores = self._run_step(batch, inputs)
        except KeyboardInterrupt:
            self._rewind(batch)
            raise
        except Exception as exc:
            self._rewind(batch)
            if not self._background:
                raise
            self._fail(batch, exc)
            return True
        now = self.clock()
        self._steps += 1
        for index, (row, seq, (ids, _), cache) in enumerate(zip(logits, batch, inputs, caches, strict=True)):
            seq.session.cache = cache
            seq.session.ids.extend(ids)
            seq.prompt_scores.extend(scores.get(index, ()))
            if seq.pending:
                del seq.pending[: len(ids)]
                if seq.pending:
                    continue  # more of the prompt to read before this sequence can sample
            try:
                if seq.decoder is None:
                    seq.decoder = self._new_decoder(seq)
                else:
                    self._generated += 1
                self._emit(seq, seq.decoder.accept(np.asarray(row), now, len(seq.session.ids)))
            except Exception as exc:  # one sequence's failure ends that sequence, not the step it shared
                if not self._background:
                    raise
                self._fail([seq], exc)
        return True

    def _run_step(
        self, batch: list[SequenceState], inputs: list[tuple[list[int], object]]
    ) -> tuple[list[np.ndarray], list[object], dict[int, list[TokenLogprob]]]:
        scoring = {
            row: (seq.prompt, len(seq.session.ids), seq.params.prompt_logprobs or 0)
            for row, seq in enumerate(batch)
            if seq.pending and seq.scores_prompt
        }
        return step_scoring_prompts(self.backend, inputs, scoring)

    def _plan_step(self) -> tuple[list[SequenceState], list[tuple[list[int], object]]]:
        """This step's rows: one token for every decoding sequence, then prompt chunks in order of arrival
        while they fit the step's prefill budget (the first always goes, so every step makes progress).

        Capping the prompt tokens per step keeps a burst of long prompts from stalling the sequences
        already decoding (their inter-token latency) and gives the earliest arrivals their first token first.
        A prompt's last chunk may use a second budget: a short request that comes while a long prompt is read
        starts at the next step, not after it (a 31-token chat waited 38 s behind a 4,000-token one).
        """
        batch: list[SequenceState] = []
        inputs: list[tuple[list[int], object]] = []
        prefill, full, budget = 0, False, self.limits.step_prefill_tokens
        for seq in self._running:
            if seq.pending:
                self._share(seq)
                ids = seq.next_chunk(self.limits.prefill_chunk)
                ends = len(ids) == len(seq.pending)
                full = full or (not ends and prefill > 0 and prefill + len(ids) > budget)
                if (full and not ends) or (prefill > 0 and prefill + len(ids) > 2 * budget):
                    continue  # a later step (a long prompt waits with every later one); chunk boundaries hold
                prefill += len(ids)
            elif seq.decoder is not None and not seq.decoder.done:
                assert seq.decoder.next_token is not None
                ids = [seq.decoder.next_token]
            else:
                continue
            batch.append(seq)
            inputs.append((ids, seq.session.cache))
        return batch, inputs

    def _share(self, seq: SequenceState) -> None:
        """Copy the whole chunks another running sequence has already read of this prompt, not read them again."""
        if self._prefixes.capacity and seq.shares_prefix:  # nothing to build when the cache is off (the CLI)
            others = [(o.session, len(o.prompt)) for o in self._running if o is not seq and o.shares_prefix]
            if reused := self._prefixes.share(seq.session, seq.prompt, others):
                seq.pending, seq.cached = seq.prompt[reused:], reused

    def _new_decoder(self, seq: SequenceState, params: SamplingConfig | None = None) -> SequenceDecoder:
        return SequenceDecoder(
            self.tokenizer,
            seq.prompt,
            params or seq.params,
            context_length=self.backend.info.context_length,
            start=seq.submitted,
            cached_tokens=seq.cached,
            clock=self.clock,
            prompt_logprobs=seq.prompt_scores,
        )

    def _admit(self) -> None:
        with self._lock:
            while self._waiting and len(self._running) < self.limits.max_running:
                seq = self._waiting[0]
                while self._prefixes and self._kv_used + self._prefixes.positions + seq.reserve > self.kv_budget:
                    self._prefixes.evict_oldest()  # the prefix cache never makes a sequence wait
                if self._kv_used + seq.reserve > self.kv_budget and self._running:
                    break  # wait for room; a sequence alone always fits (check_fits)
                self._waiting.popleft()
                self._kv_used += seq.reserve
                self._running.append(seq)
                self._prompt_tokens += len(seq.prompt)
        for seq in self._running:
            if not seq.started:
                self._start_prefill(seq)

    def _start_prefill(self, seq: SequenceState) -> None:
        """Reuse the longest prefix the sequence's session already holds; read the rest as pending."""
        reuse = None
        if seq.session is None:
            with self._lock:
                reuse = self._prefixes.take(seq.prompt) if seq.shares_prefix else None
            seq.session = reuse[0] if reuse else KVSession(self.backend)
        session = seq.session
        common = min(common_prefix(session.ids, seq.prompt), len(seq.prompt) - 1)  # one token must run
        if reuse:
            common = reuse[1]  # whole chunks only (prefix_cache.py)
        if seq.scores_prompt:
            common = 0  # every prompt token is scored, so none is taken from the cache
            seq.prompt_scores = [None]  # nothing predicts the first one
        if common < len(session.ids):
            session.cache = self.backend.truncate(session.cache, common)
            del session.ids[common:]
        seq.started = True
        seq.cached = common
        seq.pending = seq.prompt[common:]

    def _emit(self, seq: SequenceState, events: Iterable[Event]) -> None:
        for event in events:
            seq.handle._deliver(event)
        if seq.decoder is not None and seq.decoder.done:
            self._retire(seq)

    def _retire(self, seq: SequenceState) -> None:
        """Take a finished sequence out of the running set and give its cache back (once)."""
        if seq.retired:
            return
        seq.retired = True
        with self._lock:
            if seq in self._running:
                self._running.remove(seq)
                self._kv_used -= seq.reserve
            self._cancelled.discard(seq.handle.id)
            self._lock.notify_all()
        if seq.owns_session and seq.session is not None:
            reusable = seq.handle.error is None and seq.shares_prefix
            with self._lock:
                if not (reusable and self._prefixes.keep(seq.session, len(seq.prompt))):
                    release_cache(self.backend, seq.session.cache)

    def _rewind(self, batch: list[SequenceState]) -> None:
        """After a failed or interrupted step, make each cache hold exactly the ids recorded for it."""
        for seq in batch:
            try:
                seq.session.cache = self.backend.truncate(seq.session.cache, len(seq.session.ids))
            except Exception:  # the cache is dropped below anyway when the sequence ends
                seq.session.cache = self.backend.new_cache() if not seq.session.ids else seq.session.cache

    def _finish(self, seq: SequenceState, reason: str) -> None:
        if seq.decoder is None:  # it never sampled: a decoder only to report the end, without the sampling
            # settings (one that broke the sequence, such as a seed numpy refuses, must not break its end)
            seq.decoder = self._new_decoder(seq, replace(seq.params, seed=None, constraint=None))
        self._emit(seq, seq.decoder.finish(reason))

    def _fail(self, batch: list[SequenceState], exc: BaseException) -> None:
        for seq in batch:
            if seq.handle.done:
                continue
            _log.error("sequence %d failed", seq.handle.id, exc_info=exc)
            seq.handle.error = exc
            self._finish(seq, "error")

    def _drop_cancelled(self) -> None:
        with self._lock:
            if not self._cancelled:
                return
            gone = [s for s in itertools.chain(self._waiting, self._running) if s.handle.id in self._cancelled]
            for seq in gone:
                if seq in self._waiting:
                    self._waiting.remove(seq)
        for seq in gone:
            self._finish(seq, "cancelled")

    def interrupt(self, reason: str = "interrupted") -> None:
        """End every waiting and running sequence now (Ctrl-C in the CLI, shutdown in the server)."""
        with self._lock:
            everyone = list(self._running) + list(self._waiting)
            self._waiting.clear()
        for seq in everyone:
            self._finish(seq, reason)

    # ------------------------------------------------------------------ in the background (run.py: in this thread)

    def start(self) -> None:
        """Run steps in a background thread (the server) until `stop`."""
        if self._thread is not None:
            return
        self._background = True
        self._thread = threading.Thread(target=self._loop, name="gptcli-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self.idle and not self._cancelled and not self._stopping:
                    self._lock.wait()
                if self._stopping and self.idle:
                    return
            try:
                self.step()
            except Exception as exc:  # a failure outside any one sequence: end those it may have touched,
                self._fail(list(self._running), exc)  # never the thread every later request waits on

    def stop(self, grace_s: float = 0.0) -> None:
        """Refuse new sequences, let running ones finish for up to `grace_s`, cancel the rest, end the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        deadline = time.monotonic() + max(grace_s, 0.0)
        while not self.idle and time.monotonic() < deadline and self._thread is not None:
            time.sleep(0.02)
        if not self.idle:
            with self._lock:
                self._cancelled.update(s.handle.id for s in itertools.chain(self._waiting, self._running))
                self._lock.notify_all()
            if self._thread is None:
                self._drop_cancelled()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
