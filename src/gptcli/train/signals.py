"""The signals that stop a training run between two steps, so that it saves a checkpoint first."""

from __future__ import annotations

import signal
import threading
from typing import Any

from gptcli.errors import STOP_SIGNALS, Terminated, after_hangup


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP set a flag the loop checks after each step; a second one interrupts at once.

    SIGHUP (the terminal closed, an ssh session dropped) used to kill the run as kill -9 does, losing up to
    a checkpoint interval: it now stops it as SIGTERM does (exit 143), with the output that went to the
    closed terminal sent to /dev/null, since writing there fails and would end the run before it saves. Under
    `nohup` (SIGHUP ignored from the start) SIGHUP stays ignored: the run goes on, as asked.
    """

    active: StopSignals | None = None  # the run's, while it trains (request_stop reaches it)

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        after_hangup(signum)
        if signum != signal.SIGINT:
            Terminated.seen = True  # the run still ends as on Ctrl-C, then gptcli exits 143
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignals:
        StopSignals.active = self
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        StopSignals.active = None
        for sig, old in self._old.items():
            signal.signal(sig, old)


def request_stop(reason: int) -> None:
    """Stop the training run at its next step boundary, saving a checkpoint first, as a signal would (`reason`:
    the signal it stands for; the output's reader went away: SIGPIPE). Nothing when no run trains."""
    active = StopSignals.active
    if active is not None and active.received is None:
        active.received = reason
