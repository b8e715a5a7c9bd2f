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
    for _, event in drive(engine, [handle]):
        try:
            yield event
        except KeyboardInterrupt:  # thrown in by a caller Ctrl-C'd between two events: end as mid-step
            engine.interrupt()  # the rest of the text and the Finished ('interrupted') come next


def run_all(
    engine: Engine,
    requests: Iterable[tuple[Sequence[int], SamplingConfig]],
    *,
    may_start: Callable[[], bool] | None = None,
) -> Iterator[tuple[int, Event]]:
    """Run requests concurrently, in order of arrival, and yield (request index, event).

    Requests are read lazily and submitted only while the engine has room to start them, so a batch
    file of any length holds at most `max_running` sequences (plus one waiting) in memory. `may_start`,
    when given, must also say yes before another request is read while some still run (the caller's own
    bound: results it holds). Ctrl-C (a sequence finished 'interrupted') ends the run: the requests not
    yet read are never started.
    """
    source = iter(enumerate(requests))
    live: dict[int, tuple[int, SequenceHandle]] = {}
    exhausted = False
    while True:
        while (
            not exhausted and len(live) <= engine.limits.max_running and (not live or may_start is None or may_start())
        ):
            item = next(source, None)
            if item is None:
                exhausted = True
                break
            index, (ids, params) = item
            handle = engine.submit(ids, params)
            live[handle.id] = (index, handle)
        if not live:
            return
        for handle, event in step_once(engine, [h for _, h in live.values()]):
            yield live[handle.id][0], event
            if isinstance(event, Finished):
                del live[handle.id]
                exhausted = exhausted or event.reason == "interrupted"


def drive(engine: Engine, handles: Iterable[SequenceHandle]) -> Iterator[tuple[SequenceHandle, Event]]:
    """Step in this thread until the given sequences finish, yielding their events as they come.

    Ctrl-C during a step ends every sequence with reason 'interrupted' (held-back text flushed)
    and the events still come out; the caller decides the exit code.
    """
    pending = list(handles)
    while pending:
        yield from step_once(engine, pending)
        pending = [h for h in pending if not h.done]


def step_once(engine: Engine, handles: list[SequenceHandle]) -> Iterator[tuple[SequenceHandle, Event]]:
    """One step in this thread; yield the events it produced for `handles`, in their order."""
    try:
        progressed = engine.step()
    except KeyboardInterrupt:
        engine.interrupt()
        progressed = True
    for handle in handles:
        for event in handle._pending():
            yield handle, event
    if not progressed and any(not h.done for h in handles):
        raise RuntimeError("the engine has nothing to run but sequences are still pending")
