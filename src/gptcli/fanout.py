"""Many event streams at once, each on its own thread: how client mode keeps a server's batch full.

A stream is a call that opens it (`start()`, e.g. a request to an OpenAI-compatible server) and yields
the local loop's events. At most `parallel` run at a time; the starts are read lazily, so a batch file
of any length holds only those in memory, like `engine.run_all` does locally.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

from gptcli.decoding import NO_STATS, Event, Finished
from gptcli.errors import GptcliError

Start = Callable[[], Iterator[Event]]


def run_streams(
    starts: Iterable[Start],
    parallel: int,
    *,
    may_start: Callable[[], bool] | None = None,
    wake: Callable[[Callable[[], None]], None] | None = None,
) -> Iterator[tuple[int, Event | GptcliError]]:
    """(stream index, event) as events arrive, from at most `parallel` streams at once (and, while some
    run, only when `may_start` says yes: the caller's own bound, as in `engine.run_all`). `wake`, when
    given, registers a call that another thread makes when `may_start` may have turned yes (a batch line
    became ready while streams ran): the wait for the next event ends and `may_start` is asked again.

    A stream that fails with a GptcliError yields it in place of its Finished (the caller decides whether
    that ends the run); any other exception is raised here. Ctrl-C stops every stream: the unfinished ones
    end "interrupted", and the starts not yet read are never started.
    """
    results: queue.Queue[tuple[int, Event | BaseException] | None] = queue.Queue()  # None: look again
    stop = threading.Event()
    if wake is not None:
        wake(lambda: results.put(None))

    def work(index: int, start: Start) -> None:
        try:
            stream = start()
            for event in stream:
                results.put((index, event))
                if stop.is_set():
                    stream.close()  # closes the connection: the server stops generating
                    return
        except BaseException as exc:  # handed to the caller's thread
            results.put((index, exc))

    source = iter(enumerate(starts))
    live: set[int] = set()
    exhausted = False
    try:
        while True:
            while not exhausted and len(live) < max(parallel, 1) and (not live or may_start is None or may_start()):
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                live.add(item[0])
                threading.Thread(target=work, args=item, name="gptcli-stream", daemon=True).start()
            if not live:
                return
            arrived = results.get()
            if arrived is None:
                continue
            index, event = arrived
            if isinstance(event, BaseException) and not isinstance(event, GptcliError):
                raise event
            if isinstance(event, (Finished, GptcliError)):
                live.discard(index)
            yield index, event  # type: ignore[misc]  (a BaseException that is a GptcliError)
    except KeyboardInterrupt:
        for index in sorted(live):
            yield index, Finished("interrupted", NO_STATS, "", ())
    finally:
        stop.set()
