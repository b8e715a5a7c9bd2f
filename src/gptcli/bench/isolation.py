"""Isolation: each configuration runs in its own child process (gptcli.bench.worker), so its peak memory
is its own. This is the parent's side: start the worker, hand it the job, read back its result or error.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from typing import Any

from gptcli.bench.job import Job
from gptcli.errors import (
    STOP_SIGNALS,
    BackendError,
    ConfigError,
    GptcliError,
    InputError,
    ModelError,
    Terminated,
    UsageError,
    after_hangup,
)


def error_from_exit_code(code: int) -> type[GptcliError]:
    """The error class a worker's exit code stands for, so the parent re-raises the same kind."""
    for cls in (BackendError, ConfigError, InputError, ModelError, UsageError):
        if cls.exit_code == code:
            return cls
    return GptcliError


def run_isolated(job: Job) -> dict[str, Any]:
    """Run `run_job` in a fresh interpreter; its progress goes straight to our stderr.

    The first Ctrl-C or SIGTERM here is passed on to the worker as Ctrl-C (a `kill` reaches only this process;
    a terminal's Ctrl-C or `timeout` reach both, and the worker stops once): it stops, and hands over what it
    finished. Here that first one only sets a flag (a raising handler could drop the worker's answer in
    flight); a second one kills the worker.
    """
    import signal
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-m", "gptcli.bench.worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    interrupts: list[int] = []

    def on_interrupt(signum: int, _frame: Any) -> None:
        interrupts.append(signum)
        after_hangup(signum)
        if signum != signal.SIGINT:
            Terminated.seen = True  # gptcli exits 143
        if len(interrupts) == 1:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        else:
            proc.kill()

    main_thread = threading.current_thread() is threading.main_thread()
    signals = STOP_SIGNALS if main_thread else ()
    previous = {sig: signal.signal(sig, on_interrupt) for sig in signals}
    try:
        out, _ = proc.communicate(replace(job, isolated=True).to_json().encode())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stdout = out.decode().strip()
    if not stdout and (interrupts or proc.returncode in (130, -2)):
        raise KeyboardInterrupt
    try:
        result = json.loads(stdout.splitlines()[-1])
    except (ValueError, IndexError):
        raise GptcliError(
            f"benchmark worker for {job.settings.backend} exited with status {proc.returncode} and no result",
            hint="set GPTCLI_DEBUG=1 for its traceback, or pass --in-process",
        ) from None
    if interrupts:
        result["interrupted"] = True
    if "error" in result:
        raise error_from_exit_code(result.get("exit_code", 1))(result["error"], hint=result.get("hint"))
    return result
