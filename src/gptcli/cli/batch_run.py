"""`gptcli generate --batch FILE`: run a JSONL file of requests concurrently, results as JSONL."""

from __future__ import annotations

import contextlib
import functools
import io
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import typer

from gptcli.cli import render
from gptcli.errors import EXIT_INTERRUPTED, GptcliError, InputError, UsageError
from gptcli.paths import NO_ROOM_ERRNOS, no_room_fix


def _holding_results_lock(run: Callable[..., None]) -> Callable[..., None]:
    """`run` with the lock of its `output` held (see _results_lock)."""

    @functools.wraps(run)
    def locked(*args: Any, output: Path | None, **kwargs: Any) -> None:
        with _results_lock(output):
            run(*args, output=output, **kwargs)

    return locked


@contextlib.contextmanager
def _results_lock(output: Path | None) -> Iterator[None]:
    """One gptcli process at a time writes a results file (two runs, or a --resume beside the run, each wrote
    every result: twice in the file). Its lock is a file beside it, removed at the end."""
    from gptcli.jsonl import results_lock_path
    from gptcli.locks import owner_lock

    if output is None or (output.exists() and not output.is_file()):  # stdout, a pipe, a device: nothing to share
        yield
        return

    def busy(pid: str) -> InputError:
        return InputError(
            f"{output} is being written by another gptcli process (pid {pid or '?'})",
            hint="wait for it to finish (or stop it), then --resume; or write to another file",
        )

    with contextlib.suppress(OSError):  # a folder that cannot be made fails as the results are opened
        output.parent.mkdir(parents=True, exist_ok=True)
    with owner_lock(results_lock_path(output), busy):
        yield


@_holding_results_lock
def run_batch_file(
    settings: Any,
    batch: Path,
    *,
    output: Path | None,
    resume: bool,
    parallel: int | None,
    kv_budget: str | None,
    remote: Any = None,
) -> None:
    """Load the model once (or use the server's: `remote`), run every line, write results in input order."""
    from gptcli.batchfile import run_batch
    from gptcli.jsonl import (
        ResultWriter,
        check_results_file,
        completed_ids,
        count_lines,
        holds_results,
        may_wait,
        open_results,
        read_lines,
    )

    if resume and output is None:
        raise UsageError("--resume needs --output FILE", hint="it skips the ids already in that file")
    if output is not None and output.is_dir():
        raise InputError(f"{output} is a folder", hint="give a file for the results, e.g. results.jsonl")
    if output is not None and str(batch) != "-" and output.exists() and batch.exists() and output.samefile(batch):
        raise UsageError(f"--output {output} is the --batch file itself", hint="write the results to another file")
    if output is not None and output.exists() and not resume and output.stat().st_size > 0:
        if not holds_results(output):  # a requests file, say: never hint at removing it
            raise UsageError(f"{output} is not empty and does not hold results", hint="give --output a new file")
        raise UsageError(f"{output} already holds results", hint="pass --resume to continue it, or remove it")
    if output is not None and resume:
        check_results_file(output)
    try:
        source = batch.open("rb") if str(batch) != "-" else _stdin_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {batch}: {exc.strerror}", hint="check the path") from None
    if (total := count_lines(batch)) == 0:  # before the model loads; a pipe is known to be empty only at its end
        raise _no_requests(batch)
    skip = completed_ids(output) if resume and output is not None else set()
    if skip:
        render.note(f"resuming: {len(skip)} results already in {output}")
    sink: IO[str]
    with contextlib.ExitStack() as stack:
        # The output first: a path that cannot be written fails before the model loads.
        sink = stack.enter_context(_closed_after(open_results(output, resume=resume))) if output else sys.stdout
        lines, requests = _lines(settings, read_lines(source), parallel or 8, kv_budget, remote)
        bar = stack.enter_context(render.StageProgress())
        counter = _TokenRate(bar, total)
        try:
            summary = run_batch(
                lines,
                requests,
                ResultWriter(sink),
                skip=skip,
                on_token=counter,
                on_result=counter.result,
                read_ahead=may_wait(batch),
            )
        except OSError as exc:  # a full disk under the results: what was written stays, and --resume goes on from it
            if output is None or exc.errno not in NO_ROOM_ERRNOS or exc.filename != str(output):
                raise
            kept = "the results written so far are kept"
            raise GptcliError(
                f"{output}: {exc.strerror}",
                hint=f"{no_room_fix(exc.errno)}, then continue with --resume -o {output}: {kept}",
            ) from None
    render.note(
        f"{summary.ok} done, {summary.failed} failed, {summary.skipped} skipped; "
        f"{summary.completion_tokens} tokens at {counter.rate(summary.completion_tokens):.1f} tok/s"
    )
    if summary.interrupted:
        render.stderr_console().print(
            "interrupted: the finished results are written" + (f"; rerun with --resume -o {output}" if output else ""),
            style="yellow",
            markup=False,
        )
        raise typer.Exit(EXIT_INTERRUPTED)
    if not (summary.ok or summary.failed or summary.skipped):
        raise _no_requests(batch)
    if summary.failed and not summary.ok:  # as `gptcli generate` fails on the one prompt a one-line batch holds
        where = f"in {output}" if output else "on stdout"
        raise InputError(
            f"every line that ran failed ({summary.failed}): each error is its result {where}",
            hint="fix those lines, then run them again",
        )


def _no_requests(batch: Path) -> InputError:
    """An empty (or all blank) batch: "0 done" and exit 0 hid a wrong path or a producer that wrote nothing."""
    name = "stdin" if str(batch) == "-" else str(batch)
    return InputError(f"{name} holds no requests", hint='give one JSON object per line, e.g. {"prompt": "Hello"}')


def _stdin_bytes() -> IO[bytes]:
    """`-`: stdin, through a reader of its own. The lines are read on a thread that may still wait in a read
    when the run ends (Ctrl-C while a pipe is quiet), and sys.stdin's own reader is closed at exit: waited
    for by that thread, the close aborted the process ('could not acquire lock ... at interpreter shutdown').
    A stdin that was closed (`<&-`, sys.stdin None) holds no lines, as an empty one."""
    stdin = getattr(sys.stdin, "buffer", None)
    if stdin is None:
        return io.BytesIO()
    try:
        return open(stdin.fileno(), "rb", closefd=False)
    except (OSError, ValueError):  # no file behind it (a test's stdin): read as it is
        return stdin


@contextlib.contextmanager
def _closed_after(handle: IO[str]) -> Iterator[IO[str]]:
    """Close the results file; after a failure (a full disk), quietly: the first error is the one to report."""
    try:
        yield handle
    except BaseException:
        with contextlib.suppress(OSError):
            handle.close()
        raise
    handle.close()


def _lines(settings: Any, numbered_lines: Any, running: int, kv_budget: str | None, remote: Any) -> tuple[Any, Any]:
    """Where the lines run (this machine's engine, or the server), and the parsed requests, read lazily."""
    from gptcli.batch_requests import parse_request
    from gptcli.batchfile import LocalLines, RemoteLines

    if remote is not None:  # the server applies its template and checks its context
        plain = remote.templated is False  # no template there: a prompt is text to complete, as it is here
        lines = (parse_request(n, raw, None, settings, 0, plain_prompts=plain) for n, raw in numbered_lines)
        return RemoteLines(remote, running), lines
    from gptcli.cli.local_run import load_runtime
    from gptcli.engine import Engine, EngineLimits, default_prefix_cache, parse_kv_budget

    parse_kv_budget(kv_budget, 1)  # its syntax, before the model is loaded (a size needs the model's numbers)
    runtime = load_runtime(settings)
    info = runtime.backend.info
    budget = parse_kv_budget(kv_budget, info.kv_bytes_per_token)
    # Lines that share a long start (a few-shot prefix, a document) read it once: the answers are unchanged.
    prefix_cache = default_prefix_cache(runtime.backend, running)
    limits = EngineLimits(max_running=running, kv_budget_tokens=budget, prefix_cache=prefix_cache)
    engine = Engine(runtime.backend, runtime.tokenizer, limits)
    requests = (parse_request(n, raw, runtime.tokenizer, settings, info.context_length) for n, raw in numbered_lines)
    return LocalLines(engine), requests


class _TokenRate:
    """The progress line: results done of the lines in the file, tokens generated and tokens per second."""

    def __init__(self, bar: render.StageProgress, lines: int | None) -> None:
        self.bar = bar
        self.lines = lines
        self.done = 0
        self.tokens = 0
        self.start = time.perf_counter()

    def rate(self, tokens: int | None = None) -> float:
        elapsed = time.perf_counter() - self.start
        return (self.tokens if tokens is None else tokens) / elapsed if elapsed > 0 else 0.0

    def result(self, summary: Any) -> None:
        self.done = summary.ok + summary.failed + summary.skipped
        self(0)

    def __call__(self, count: int) -> None:
        self.tokens += count
        self.bar("batch", self.done, self.lines, f"{self.tokens} tokens, {self.rate():.1f} tok/s")
