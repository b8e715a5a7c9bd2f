"""What the fuzzers share: a time bound on one case (a Hang raised in the main thread) and the peak RSS.

Imported by its siblings as `fuzz_limits`: scripts/ is on the path when they run, and tests.conftest.load_script
puts it there for the suite's seeded subsets.
"""

from __future__ import annotations

import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Hang(BaseException):
    """A case over its time bound (raised by the alarm, past every `except Exception` of the code it runs)."""


def rss_mib() -> float:
    """This process's peak resident memory so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def time_limit(seconds: float, *, cpu: bool = False) -> Iterator[None]:
    """At most `seconds` of wall time, as a Hang raised in the main thread. With `cpu`: `seconds` of CPU time (all
    threads: the machine may be busy with others) and 5 times that of wall time (a wait: a FIFO, a lock, a network)."""

    def alarm(signum: int, _: Any) -> None:
        raise Hang(
            f"over {seconds} s" + (f" of {'CPU' if signum == signal.SIGPROF else '5x wall'} time" if cpu else "")
        )

    timers = [(signal.SIGALRM, signal.ITIMER_REAL, 5 * seconds if cpu else seconds)]
    if cpu:
        timers.append((signal.SIGPROF, signal.ITIMER_PROF, seconds))
    previous = {number: signal.signal(number, alarm) for number, _, _ in timers}
    for _, timer, bound in timers:
        signal.setitimer(timer, bound)
    try:
        yield
    finally:
        for number, timer, _ in timers:
            signal.setitimer(timer, 0)
            signal.signal(number, previous[number])
