"""Every error a user can cause, each with its exit code (see the README's table)."""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from collections.abc import Callable
from typing import Any

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_BACKEND = 4
EXIT_MODEL = 5
EXIT_INPUT = 6
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM
QUOTED_VALUE = 200  # characters of a value an error quotes (a config file's or variable's may run to a megabyte)


def clipped(text: str, limit: int = QUOTED_VALUE) -> str:
    """`text` as an error quotes it: at most about `limit` characters, then how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 40]}... ({len(text) - limit + 40:,} characters more)"


def escaped_byte(char: str) -> str | None:
    """`\\xff` for a character that stands for a byte that was not UTF-8 (how Python carries such a byte of a file
    name or an argument: a lone surrogate, U+DC80-U+DCFF), else None."""
    code = ord(char)
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else None


class GptcliError(Exception):
    """Base of all user-facing errors: a one-line message, an optional hint, an exit code."""

    exit_code: int = EXIT_RUNTIME
    # The HTTP status the server answers with when a request causes this error.
    http_status: int = 500

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(GptcliError):
    """A config file, environment variable or flag value that cannot be used."""

    exit_code = EXIT_CONFIG
    http_status = 400


class FieldError(ConfigError):
    """A field of a request (server request, batch line) that cannot be used; `param` names the field."""

    def __init__(self, message: str, param: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.param = param


class ResponseFormatError(FieldError):
    """A `response_format` that cannot be used."""


class ToolError(FieldError):
    """`tools`, `tool_choice` or a message's tool call that cannot be used."""


class BackendError(GptcliError):
    """An unknown backend, or one that cannot run here (missing package, no GPU)."""

    exit_code = EXIT_BACKEND


class ModelError(GptcliError):
    """A model reference that resolves to nothing, or to something that is not a usable model."""

    exit_code = EXIT_MODEL


class MemoryShortError(GptcliError):
    """A model whose weights alone need more memory than the machine has left (exit 1: the machine, not the input):
    refused before loading, where the kernel would otherwise kill the load minutes later without a word."""


def debug_enabled() -> bool:
    """GPTCLI_DEBUG=1: let errors out with their traceback (and the libraries' own error logs)."""
    return os.environ.get("GPTCLI_DEBUG", "") not in {"", "0", "false"}


# How the C and C++ libraries underneath say an allocation failed, in the text of what they raise (torch's
# "DefaultCPUAllocator: can't allocate memory", ONNX Runtime's "std::bad_alloc", an OSError's ENOMEM).
ALLOCATION_FAILED = ("bad_alloc", "can't allocate memory", "Cannot allocate memory", "Failed to allocate memory")


def allocation_failed(exc: BaseException) -> bool:
    """`exc` says that memory ran out (a MemoryError, ENOMEM, or a library's allocator failing)."""
    if isinstance(exc, MemoryError) or getattr(exc, "errno", None) == errno.ENOMEM:
        return True
    return any(text in str(exc) for text in ALLOCATION_FAILED)


def out_of_memory(doing: str = "") -> MemoryShortError:
    """Memory ran out (while `doing`: "loading model X"): the machine's, or a `ulimit -v`'s (exit 1)."""
    return MemoryShortError(
        f"out of memory {doing}".rstrip(),
        hint="free some memory, or use a smaller model or precision (--precision int8/int4); a `ulimit -v` counts too",
    )


class ChatTemplateRefusal(ModelError):
    """The chat template's own raise_exception: it does not take these messages (roles out of order, a tool result
    it cannot place), where a template that fails is the model's fault; a batch line's error, a 400 in the server."""


class InputError(GptcliError):
    """Bad user input: empty prompt, unreadable or binary file, prompt too long for the context."""

    exit_code = EXIT_INPUT
    http_status = 400


class ContextLengthError(InputError):
    """A prompt that does not fit the model's context, as a server says it (OpenAI's context_length_exceeded)."""


class QueueFullError(InputError):
    """The engine already holds as many waiting sequences as it may (server: 503 with Retry-After)."""

    http_status = 503


class UsageError(GptcliError):
    """A combination of arguments that makes no sense."""

    exit_code = EXIT_USAGE
    http_status = 400


class RemoteError(GptcliError):
    """An OpenAI-compatible server that cannot be reached, or that answered with an error."""

    exit_code = EXIT_RUNTIME


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a timeout, a service manager), raised as an interrupt by the handler gptcli.cli.app
    installs: every command keeps what it made as on Ctrl-C, then gptcli exits 143."""

    seen = False  # one arrived in this process (also where it was passed on as Ctrl-C: bench's worker)


def _hangup() -> int | None:
    """SIGHUP, unless this process started with it ignored (`nohup`, asked to outlive the terminal: kept so)."""
    sig = getattr(signal, "SIGHUP", None)
    return None if sig is None or signal.getsignal(sig) == signal.SIG_IGN else sig


# What stops a command as Ctrl-C does: SIGTERM (`kill`, a timeout, a service manager) and SIGHUP (the terminal
# closed, an ssh session dropped), which would otherwise kill it as kill -9 does, losing what it made.
TERMINATING_SIGNALS = tuple(sig for sig in (signal.SIGTERM, _hangup()) if sig is not None)
STOP_SIGNALS = (signal.SIGINT, *TERMINATING_SIGNALS)


def ignore_stops(*, for_good: bool = False) -> None:
    """From here on SIGINT, SIGTERM and SIGHUP do nothing: a stop is being handled (what finished is handed over)
    or the process is ending. A handler that does nothing, not SIG_IGN: a signal that came before this ran finds
    SIG_IGN and Python prints "OSError: Signal 15 ignored due to race condition". `for_good` (the process is about
    to exit) then sets SIG_IGN as well: the interpreter's shutdown puts a Python handler back to the default, which
    kills the process by the signal (its exit status lost) when a second stop comes while it shuts down (~0.4 s
    after a model ran), but leaves SIG_IGN alone. signal.signal runs what is pending first (with the no-op
    handler), so the race above is down to a few instructions. Main thread only."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _do_nothing)
    if for_good:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def after_hangup(signum: int) -> None:
    """A stop handler's first step: after SIGHUP the terminal is gone, so what went to it goes to /dev/null."""
    if signum == getattr(signal, "SIGHUP", None):
        silence_terminal()


def silence_terminal() -> None:
    """Point stdout and stderr, where they are a terminal, at /dev/null: after SIGHUP the terminal is gone, and a
    write there fails (EIO) and would end a command before it keeps what it made."""
    _to_devnull(_is_terminal)


def silence_closed_pipes() -> None:
    """Point stdout and stderr, where they are a pipe whose reader went away (`| head`), at /dev/null."""
    _to_devnull(_reader_gone)


def _to_devnull(which: Callable[[int], bool]) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            try:
                if which(fd):
                    os.dup2(devnull, fd)
            except OSError:
                pass
    finally:
        os.close(devnull)


def stdout_reader_went_away() -> bool:
    """After a SystemExit(1): whether it is how Typer or Rich answered a closed stdout pipe (Typer after wrapping
    stdout in a PacifyFlushWrapper, Rich after pointing stdout at /dev/null)."""
    if type(sys.stdout).__name__ == "PacifyFlushWrapper":
        return True
    try:
        return os.path.samestat(os.fstat(sys.stdout.fileno()), os.stat(os.devnull))
    except (OSError, ValueError):
        return False


def _reader_gone(fd: int) -> bool:
    """Whether `fd` is a pipe (or socket) nobody reads any more: poll says POLLERR for its write end."""
    import select

    mode = os.fstat(fd).st_mode
    if not stat.S_ISFIFO(mode) and not stat.S_ISSOCK(mode):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _is_terminal(fd: int) -> bool:
    """Whether `fd` is a terminal, also one that hung up: isatty asks the terminal itself (tcgetattr), which fails
    once it is gone, so Linux's terminal devices are also known by their numbers (ttys 4, /dev/tty 5, ptys 136-143)."""
    try:
        if os.isatty(fd):
            return True
        info = os.fstat(fd)
    except OSError:
        return False
    major = os.major(info.st_rdev)
    return stat.S_ISCHR(info.st_mode) and (major in (4, 5) or 136 <= major <= 143)


def _do_nothing(signum: int, frame: Any) -> None:
    """A stop after the one being handled (see ignore_stops)."""
