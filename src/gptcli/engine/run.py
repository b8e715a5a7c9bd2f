"""Driving the engine from the caller's thread: one sequence (`generate`), or many in order (`run_all`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from gptcli.backends.base import Backend
from gptcli.config import SamplingConfig
from gptcli.decoding import Event, Finished, KVSession
from gptcli.engine.handle import SequenceHandle
from gptcli.engine.limits import EngineLimits
from gptcli.engine.scheduler import Engine
from gptcli.tokenizer import Tokenizer


def generate(
    backend: Backend,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    params: SamplingConfig,
    *,
    session: KVSession | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Iterator[Event]:
    """One sequence through the engine, in this thread: Token events, then one Finished."""
    if not prompt_ids:
        raise ValueError("generate() needs at least one prompt token")
    context = backend.info.context_length
    limits = EngineLimits(max_running=1, kv_budget_tokens=context, max_queue=1)
    engine = Engine(backend, tokenizer, limits, clock=clock)
    handle = engine.submit(prompt_ids, params, session=session)
    for _, event in engine.run([handle]):
        try:
            yield event
        except KeyboardInterrupt:  # thrown in by a caller Ctrl-C'd between two events: end as mid-step
            engine.interrupt()  # the rest of the text and the Finished ('interrupted') come next


def run_all(engine: Engine, requests: Iterable[tuple[Sequence[int], SamplingConfig]]) -> Iterator[tuple[int, Event]]:
    """Run requests concurrently, in order of arrival, and yield (request index, event).

    Requests are read lazily and submitted only while the engine has room to start them, so a batch
    file of any length holds at most `max_running` sequences (plus one waiting) in memory. Ctrl-C (a
    sequence finished 'interrupted') ends the run: the requests not yet read are never started.
    """
    source = iter(enumerate(requests))
    live: dict[int, tuple[int, SequenceHandle]] = {}
    exhausted = False
    while True:
        while not exhausted and len(live) <= engine.limits.max_running:
            item = next(source, None)
            if item is None:
                exhausted = True
                break
            index, (ids, params) = item
            handle = engine.submit(ids, params)
            live[handle.id] = (index, handle)
        if not live:
            return
        for handle, event in engine.run_some([h for _, h in live.values()]):
            yield live[handle.id][0], event
            if isinstance(event, Finished):
                del live[handle.id]
                exhausted = exhausted or event.reason == "interrupted"
