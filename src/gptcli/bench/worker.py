"""The child side of isolation: `python -m gptcli.bench.worker` reads one job (JSON) on stdin, runs it
and prints its result as one JSON line on stdout; its progress goes to stderr. The parent's side,
which starts it, is `gptcli.bench.isolation.run_isolated`.
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

from gptcli.bench.job import Job
from gptcli.bench.runner import run_job
from gptcli.errors import EXIT_INTERRUPTED, STOP_SIGNALS, GptcliError, debug_enabled, ignore_stops


def _notify(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _warnings_only(message: str) -> None:
    if message.startswith("warning:"):
        _notify(message)


def _stop_once(signum: int, _frame: Any) -> None:
    """The first Ctrl-C or SIGTERM stops the run, which hands over what finished; the later ones are ignored, so
    the hand-over is never cut. A terminal's Ctrl-C and `timeout`'s SIGTERM reach the whole process group and
    the parent passes its own on as Ctrl-C, so one stop often comes twice; a second Ctrl-C at the parent kills
    this process (SIGKILL) instead."""
    ignore_stops()
    raise KeyboardInterrupt


def main() -> int:
    # Set here, not inherited: a gptcli started with Ctrl-C ignored (`cmd &` in a script, nohup) passed that on,
    # and the parent's Ctrl-C for a kill then did nothing until the run was over; SIGTERM killed this process
    # outright, with the finished tests.
    for sig in STOP_SIGNALS:  # SIGHUP too: a closed terminal's reaches the whole process group
        signal.signal(sig, _stop_once)
    job = Job.from_json(sys.stdin.read())
    try:
        result = run_job(job, notify=_warnings_only if job.quiet else _notify)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except GptcliError as exc:
        result = {"error": exc.message, "hint": exc.hint, "exit_code": exc.exit_code}
    except Exception as exc:
        if debug_enabled():
            raise
        result = {"error": f"internal error: {type(exc).__name__}: {exc}", "hint": "set GPTCLI_DEBUG=1", "exit_code": 1}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
