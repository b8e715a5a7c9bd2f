"""File descriptors: every connection holds one, so the process's limit on open files (`ulimit -n`) bounds how
many clients the server can take. At startup the soft limit goes up to the hard one, the connection cap comes down
to what is left, and the loop's complaint when the limit is reached anyway is said once in a while, not per client.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from typing import Any

# Kept for what the process opens while it serves, beyond the descriptors open when it starts (a module imported on
# first use, a grammar's cache file, /proc reads for the metrics).
RESERVED_DESCRIPTORS = 16
# asyncio says "socket.accept() out of system resource" with a traceback for every connection waiting in the backlog
# each time the listening socket is ready: with 20 descriptors, 30 clients made ~10,000 of them in 3 s.
ACCEPT_ERROR_EVERY_S = 10.0
ACCEPT_ERROR = "socket.accept() out of system resource"

log = logging.getLogger("uvicorn.error")  # the server's log, as uvicorn configures it (--log-level)


def raise_descriptor_limit() -> int | None:
    """Raise the soft limit on open files to the hard one, as Go's runtime and many servers do (harmless: the hard
    limit is what the system grants; a soft one of 1,024 is a common default), and return the limit now in force;
    None where there is none to raise (Windows, or unlimited)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):  # macOS refuses an unlimited hard limit: keep the soft one
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def open_descriptors() -> int:
    """How many files the process has open (0 where the system does not say)."""
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            return max(len(os.listdir(listing)) - 1, 0)  # less the one listing it
        except OSError:
            continue
    return 0


def connection_cap(wanted: int) -> int:
    """The connections to serve at once: `wanted`, or fewer where the limit on open files leaves less room (after
    raising it, see raise_descriptor_limit), said in one log line."""
    limit = raise_descriptor_limit()
    if limit is None:
        return wanted
    in_use = open_descriptors()
    room = max(limit - in_use - RESERVED_DESCRIPTORS, 1)
    if room < wanted:
        log.warning(
            "serving at most %d connections at once, not %d: the process may open %d files (ulimit -n), %d are "
            "open; raise the limit to serve more",
            room,
            wanted,
            limit,
            in_use,
        )
    return min(room, wanted)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, every_s: float = ACCEPT_ERROR_EVERY_S) -> None:
    """Say the loop's "out of system resource" (no descriptor left to accept a connection with) in one line at most
    every `every_s` seconds; pass any other error on to the loop's handler as before. The connections it could not
    accept wait in the backlog until some close."""
    previous = loop.get_exception_handler()
    said_at = -math.inf

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        nonlocal said_at
        if _stale_accept_retry(context):
            return
        if context.get("message") != ACCEPT_ERROR:
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - said_at >= every_s:
            said_at = now
            error = context.get("exception")
            reason = getattr(error, "strerror", None) or str(error)
            log.warning(
                "cannot accept new connections: %s (ulimit -n); they wait until others close (said at most every %g s)",
                reason,
                every_s,
            )

    loop.set_exception_handler(handler)


def _stale_accept_retry(context: dict[str, Any]) -> bool:
    """A retry of accept() that asyncio scheduled before the listening socket closed, failing now that it has.

    On "out of system resource" CPython (3.11) schedules a retry a second later for every connection it could not
    accept, up to the backlog (2,048) in one go; once the server stops, each of them fails on the closed socket
    ("Invalid file descriptor: -1") with a traceback: 80,000 lines of log from 60 clients under `ulimit -n 40`."""
    callback = getattr(context.get("handle"), "_callback", None)
    retry = getattr(callback, "__name__", "") == "_start_serving"
    return retry and isinstance(context.get("exception"), (ValueError, OSError))
