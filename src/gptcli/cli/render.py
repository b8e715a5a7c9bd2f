"""Everything the CLI shows: the consoles, notes and warnings, error lines, streamed model text, the stats
line and stage progress. Model text is written literally, never parsed as Rich markup.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterable
from functools import cached_property
from typing import Any, TextIO

from gptcli.errors import GptcliError
from gptcli.textio import escaped_matches
from gptcli.timings import usage

QUIET, NORMAL, VERBOSE = -1, 0, 1
# What a terminal acts on rather than shows: C0 controls but tab and line feed (ESC starts a sequence that can
# set the title or clear the screen), DEL, C1 controls, and the bidirectional overrides that reorder a line.
_TERMINAL_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_verbosity = NORMAL


def set_verbosity(level: int) -> None:
    """`gptcli -q` (QUIET: errors only) or `gptcli -v` (VERBOSE: load details and timings too)."""
    global _verbosity
    _verbosity = level


def verbosity() -> int:
    return _verbosity


def stderr_console() -> Any:
    """The console for everything on stderr but errors: silent under `-q` (notes, warnings, progress)."""
    return _shared_stderr_console(quiet=_verbosity <= QUIET)


_stderr_consoles: dict[bool, tuple[Any, Any]] = {}  # quiet? -> (the sys.stderr it writes to, the console)


def _shared_stderr_console(*, quiet: bool) -> Any:
    """One console per stderr stream: a note printed while a progress bar is live must go through the bar's
    own console, which prints it above the bar; a console of its own would tear the bar."""
    from rich.console import Console

    # A live display swaps sys.stderr for a proxy of itself: the stream under it is the one to match.
    stream = getattr(sys.stderr, "rich_proxied_file", sys.stderr)
    made = _stderr_consoles.get(quiet)
    if made is None or made[0] is not stream:  # tests swap sys.stderr between runs
        made = (stream, Console(stderr=True, highlight=False, soft_wrap=True, quiet=quiet))
        _stderr_consoles[quiet] = made
    return made[1]


def stdout_console() -> Any:
    """Tables on stdout: terminal width on a TTY; wide enough to never cut a path in a pipe."""
    from rich.console import Console

    piped = not sys.stdout.isatty()
    return Console(highlight=False, soft_wrap=True, width=240 if piped else None, markup=False)  # cells are user text


def note(message: str) -> None:
    """A progress or warning line on stderr (model text never goes through here).

    Under `-q` only safety warnings pass (`warning: pickle loading is on …`, said every time it is used)."""
    console = _error_console() if message.startswith("warning: pickle") else stderr_console()
    console.print(inert(message), markup=False, style="dim")


def detail(message: str) -> None:
    """A line shown only under `-v`: what was loaded from where, how long things took."""
    if _verbosity >= VERBOSE:
        stderr_console().print(inert(message), markup=False, style="dim")


def warn(message: str) -> None:
    stderr_console().print(f"warning: {inert(message)}", markup=False, style="yellow")


def report(error: GptcliError) -> None:
    """`error: …` and, where there is one, `hint: …` on stderr (even under `-q`). With no memory left for Rich (it
    imports modules as it prints: a MemoryError there showed a traceback), the lines go out plain."""
    lines = [f"error: {inert(joined_lines(error.message))}"]
    if error.hint:
        lines.append(f"hint: {inert(joined_lines(error.hint))}")
    try:
        console = _error_console()
        console.print(lines[0], markup=False, style="bold red")
        for line in lines[1:]:
            console.print(line, markup=False)
    except MemoryError:
        os.write(2, "".join(line + "\n" for line in lines).encode("utf-8", "replace"))


def joined_lines(text: str) -> str:
    """A message that a library wrote over several lines, on one (an error is one line, then its hint).
    Not `textio.one_line`, which escapes the breaks of a quoted value and clips it, for JSON answers."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def inert(text: str) -> str:
    """`text` with what a terminal would act on written as escapes (`\\x1b`): a message quotes what a server,
    a file or a model's card said, and none of it may retitle, clear or rewrite the user's terminal."""
    return escaped_matches(_TERMINAL_CONTROLS, text)


def add_row(table: Any, *cells: str) -> None:
    """A Rich table's row, each cell inert: names, paths, descriptions and statuses come from folders, files,
    config values and plugins' errors."""
    table.add_row(*(inert(cell) for cell in cells))


def _error_console() -> Any:
    """Errors, the pickle warning and asked-for stats: shown under `-q` too."""
    return _shared_stderr_console(quiet=False)


def stream_text(events: Iterable[Any], out: TextIO | None = None, *, show: bool = True) -> Any:
    """Write each Token's text as it comes; return the Finished event (None if cut short by Ctrl-C).

    The text ends with a newline; an interrupted reply always gets one, so the next output starts clean.
    A KeyboardInterrupt between events is re-raised after that newline: what was written stays written.
    """
    from gptcli.decoding import Token

    out = out or sys.stdout
    finished = None
    last = ""
    try:
        for event in events:
            if not isinstance(event, Token):
                finished = event
            elif show and event.text:
                out.write(event.text)
                out.flush()
                last = event.text
    finally:
        interrupted = finished is None or finished.reason == "interrupted"
        if show and (interrupted or not last.endswith("\n")):
            out.write("\n")
            out.flush()
    return finished


def stream_markdown(events: Iterable[Any]) -> None:
    """Render a reply as Markdown on stdout, redrawn live as tokens arrive (a terminal only).

    Its own console wraps paragraphs at the terminal's width: the tables' console (`stdout_console`) leaves
    wrapping to the terminal, and Live crops each line it draws at that width, so a reply showed one
    line of each paragraph.
    """
    from rich.console import Console
    from rich.live import Live
    from rich.markdown import Markdown

    from gptcli.decoding import Token

    text = ""
    console = Console(highlight=False, markup=False)
    with Live(console=console, refresh_per_second=12, vertical_overflow="visible") as live:
        for event in events:
            if isinstance(event, Token) and event.text:
                text += event.text
                live.update(Markdown(text))


def result_fields(finished: Any) -> dict[str, Any]:
    """A finished reply for `--json`: text, finish reason, OpenAI-style usage, timings."""
    stats = finished.stats
    return {
        "text": finished.text,
        "finish_reason": finished.reason,
        **({"error": finished.error} if getattr(finished, "error", "") else {}),
        "usage": usage(stats),
        "timings": stats.timings(),
    }


def print_stats(finished: Any, backend: str, device: str, seed: int | None) -> None:
    """The `--stats` line on stderr: timings, why it stopped, where it ran, the seed."""
    from gptcli.timings import timings_line

    _error_console().print(  # asked for: shown under -q too
        f"{timings_line(finished.stats)} · finish {finished.reason} · {backend}/{device} · seed {seed}",
        markup=False,
        style="dim",
    )


class StageProgress:
    """Rich bars on stderr (a terminal only) for a core `progress(stage, done, total)` callback.

    One bar per stage; a stage gets its bar once it has run for `show_after` seconds, so quick steps
    show none. `transient` bars disappear when the work is done. With `plain_lines`, stderr that is not a
    terminal (a CI log) gets one line as each step starts (a new `detail`), with the time so far, instead
    of nothing; the caller says when the stage is done.
    """

    def __init__(
        self, *, enabled: bool = True, show_after: float = 0.0, transient: bool = True, plain_lines: bool = False
    ) -> None:
        self.shown = enabled and _verbosity > QUIET
        self.plain_lines = plain_lines
        self.show_after = show_after
        self.transient = transient
        self.progress: Any = None
        self.started: dict[str, float] = {}
        self.tasks: dict[str, Any] = {}
        self.said: dict[str, str] = {}

    # Rich is imported when a stage is first reported, not before: most loads report none (a start-up's ~20 ms).
    @cached_property
    def console(self) -> Any:
        return stderr_console()

    @cached_property
    def enabled(self) -> bool:
        return self.shown and self.console.is_terminal

    @cached_property
    def plain(self) -> bool:
        return self.shown and self.plain_lines and not self.console.is_terminal

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    @property
    def stage(self) -> str | None:
        """The stage it heard of last, shown or not: where a Ctrl-C stopped the work."""
        return next(reversed(self.started), None)

    def __call__(self, stage: str, done: int, total: int | None, detail: str = "") -> None:
        """Update `stage`'s bar; `detail` is free text after it (tokens, rate, ETA)."""
        now = time.monotonic()
        started = self.started.setdefault(stage, now)
        if self.plain and self.said.get(stage) != detail and (total is None or done < total):
            self.said[stage] = detail
            self.console.print(inert(f"{stage}: {detail} ({now - started:.0f} s)"), markup=False, style="dim")
        if not self.enabled:
            return
        if stage not in self.tasks:
            if now - started < self.show_after:
                return
            self.tasks[stage] = self._bars().add_task(stage, total=total, detail=detail)
        self.progress.update(self.tasks[stage], completed=done, total=total, detail=detail)

    def _bars(self) -> Any:
        if self.progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[detail]}", markup=False),
                console=self.console,
                transient=self.transient,
            )
            self.progress.start()
        return self.progress


INCOMPLETE = {
    "length": "at --max-tokens ({max_tokens})",
    "repetition": "as a loop (--no-repetition-stop lets it run on)",
    "context": "at the model's context limit",
}


def warn_if_incomplete(finished: Any, sampling: Any) -> None:
    """Structured output cut short (exit 0, as any reply cut short) says on stderr that it is not whole."""
    where = INCOMPLETE.get(finished.reason)
    if sampling.constraint is None or where is None:
        return
    cut = f"the output was cut {where.format(max_tokens=sampling.max_tokens)}"
    if sampling.constraint.kind in ("regex", "grammar"):
        warn(f"{cut}: it may not match --{sampling.constraint.kind} in full")
        return
    try:
        json.loads(finished.text)
    except ValueError:
        warn(f"{cut} before the JSON was complete: it does not parse")
        return
    warn(f"{cut} before the JSON was complete: it parses, but may be missing its end (a number's last digits)")
