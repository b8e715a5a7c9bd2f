"""Isolation: each configuration runs in its own child process, so its peak memory is its own.

`python -m gptcli.bench.worker` (the child) reads one job (JSON) on stdin, runs it and prints its
result as one JSON line on stdout; its progress goes to stderr. `run_isolated` is the parent's side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from typing import Any

from gptcli.bench.job import Job
from gptcli.errors import (
    EXIT_INTERRUPTED,
    BackendError,
    ConfigError,
    GptcliError,
    InputError,
    ModelError,
    UsageError,
)


def error_from_exit_code(code: int) -> type[GptcliError]:
    """The error class a worker's exit code stands for, so the parent re-raises the same kind."""
    for cls in (BackendError, ConfigError, InputError, ModelError, UsageError):
        if cls.exit_code == code:
            return cls
    return GptcliError


def run_isolated(job: Job) -> dict[str, Any]:
    """Run `run_job` in a fresh interpreter; its progress goes straight to our stderr.

    Ctrl-C reaches the worker too (same process group): it stops, and hands over what it finished.
    Here the first Ctrl-C only sets a flag (a raising handler could drop the worker's answer in
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
        if len(interrupts) > 1:
            proc.kill()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_interrupt) if main_thread else None
    try:
        out, _ = proc.communicate(replace(job, isolated=True).to_json().encode())
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
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


def _notify(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def main() -> int:
    from gptcli.bench.runner import run_job

    job = Job.from_json(sys.stdin.read())
    try:
        result = run_job(job, notify=_notify)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except GptcliError as exc:
        result = {"error": exc.message, "hint": exc.hint, "exit_code": exc.exit_code}
    except Exception as exc:
        if os.environ.get("GPTCLI_DEBUG", "") not in {"", "0", "false"}:
            raise
        result = {"error": f"internal error: {type(exc).__name__}: {exc}", "hint": "set GPTCLI_DEBUG=1", "exit_code": 1}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
