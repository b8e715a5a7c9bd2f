"""The Typer application and the one exit path: errors → `error:`/`hint:` lines and exit codes."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Annotated, Any

import typer

from gptcli import __version__
from gptcli.cli import (
    backends_cmd,
    bench_cmd,
    chat_cmd,
    chats_cmd,
    config_cmd,
    eval_cmd,
    export_cmd,
    generate,
    models_cmd,
    runs_cmd,
    serve_cmd,
    summarize_cmd,
    templates_cmd,
    train_cmd,
)
from gptcli.cli.habits import habit_hint
from gptcli.cli.helpfmt import HelpGroup
from gptcli.cli.render import NORMAL, QUIET, VERBOSE, report, set_verbosity
from gptcli.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_TERMINATED,
    TERMINATING_SIGNALS,
    GptcliError,
    Terminated,
    UsageError,
    after_hangup,
    allocation_failed,
    clipped,
    debug_enabled,
    escaped_byte,
    ignore_stops,
    out_of_memory,
    stdout_reader_went_away,
)
from gptcli.paths import environment_error

ROOT_FLAGS = {"-q", "--quiet", "-v", "--verbose"}


def _version(value: bool) -> None:
    if value:
        print(f"gptcli {__version__}")
        raise typer.Exit()


def root(
    version: Annotated[
        bool, typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Only errors on stderr: no progress, notes or warnings.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also what was loaded from where, and timings.")
    ] = False,
) -> None:
    """Train, run, chat with and benchmark GPT-style language models."""
    if quiet and verbose:
        raise UsageError("--quiet and --verbose cannot be used together")
    set_verbosity(QUIET if quiet else VERBOSE if verbose else NORMAL)


# The four ways gptcli is used first, then the tools around them (the order `gptcli --help` lists them in).
COMMANDS: dict[str, Callable[..., Any] | typer.Typer] = {
    "generate": generate.generate,
    "chat": chat_cmd.chat,
    "summarize": summarize_cmd.summarize,
    "serve": serve_cmd.serve,
    "bench": bench_cmd.bench,
    "train": train_cmd.train,
    "export": export_cmd.export,
    "eval": eval_cmd.app,
    "models": models_cmd.app,
    "chats": chats_cmd.app,
    "templates": templates_cmd.app,
    "runs": runs_cmd.app,
    "config": config_cmd.app,
    "backends": backends_cmd.backends,
}


def build_app(only: str | None = None) -> typer.Typer:
    """The CLI, or with `only` the same CLI holding just that command.

    Typer turns every command's signature into Click parameters on each run, ~40 ms for all of them:
    a run that names its command (`invoked_command`) converts only that one.
    """
    cli = typer.Typer(
        name="gptcli",
        help="Train, run, chat with and benchmark GPT-style language models.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=True,
        context_settings={"help_option_names": ["-h", "--help"]},
        cls=HelpGroup,
        rich_markup_mode=None,  # Click's plain layout: readable at 80 columns (see cli.helpfmt)
    )
    cli.callback()(root)
    for name, command in COMMANDS.items():
        if only in (None, name):
            if isinstance(command, typer.Typer):
                cli.add_typer(command, name=name)
            else:
                cli.command(name)(command)
    return cli


app = build_app()


def invoked_command(argv: list[str]) -> str | None:
    """The command `argv` names (after any -q/-v), or None: no command, --help/--version, a typo, or
    shell completion asking (those need every command)."""
    if completing():
        return None
    for arg in argv:
        if arg not in ROOT_FLAGS:
            return arg if arg in COMMANDS else None
    return None


def completing() -> bool:
    """A shell asking for completions ($_GPTCLI_COMPLETE, or the variable of `python -m gptcli`)."""
    return any(key.startswith("_") and key.endswith("_COMPLETE") for key in os.environ)


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM or SIGHUP: an interrupt that keeps what was made, then exit 143 (run)."""
    after_hangup(signum)
    if Terminated.seen:  # a second kill: the first is being handled (what was made is being kept): not cut again
        return
    Terminated.seen = True
    raise Terminated()


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (never raises, except with GPTCLI_DEBUG=1)."""
    Terminated.seen = False  # per run: tests run several in one process
    code = _run(argv)
    # A command may take the interrupt as its way out (the chat REPL leaves at its prompt): still 143.
    return EXIT_TERMINATED if Terminated.seen and code in (EXIT_OK, EXIT_INTERRUPTED) else code


def _run(argv: list[str] | None) -> int:
    if threading.current_thread() is threading.main_thread():  # train and serve set their own while they run
        for sig in TERMINATING_SIGNALS:
            signal.signal(sig, _on_sigterm)
    _mark_stdout_errors()
    set_verbosity(NORMAL)  # the root callback sets -q/-v; a run that never reaches it starts from normal
    try:
        os.getcwd()
    except FileNotFoundError:  # torch and friends fail obscurely (or abort) in a deleted folder: say it first
        report(GptcliError("the current folder no longer exists", hint="cd to a folder that exists"))
        return EXIT_RUNTIME
    if completing():  # Typer renders zsh/fish help texts with Rich: wrapped, a long one became a bogus candidate
        os.environ["TERMINAL_WIDTH"] = str(1 << 16)
    argv = sys.argv[1:] if argv is None else argv
    try:
        cli = build_app(invoked_command(argv))
        result = cli(args=argv, prog_name="gptcli", standalone_mode=False)
        sys.stdout.flush()  # a full device fails here for short outputs, inside the error handling below
        return result if isinstance(result, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except GptcliError as exc:
        if debug_enabled():
            raise
        report(exc)
        return exc.exit_code
    except BrokenPipeError:
        _discard_stdout()  # the reader went away (`| head`): stop quietly, exit 0
        return EXIT_OK
    except SystemExit as exc:
        if exc.code != 1 or not stdout_reader_went_away():
            raise
        _discard_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except OSError as exc:
        if debug_enabled():
            raise
        error = _stdout_error(exc) or environment_error(exc) or (out_of_memory() if allocation_failed(exc) else None)
        report(error or _internal(exc))
        return error.exit_code if error else EXIT_RUNTIME
    except UnicodeEncodeError as exc:  # stdout set to an encoding that cannot hold the text (PYTHONIOENCODING=ascii)
        if debug_enabled():
            raise
        if exc.encoding != getattr(sys.stdout, "encoding", None):
            report(_internal(exc))
            return EXIT_RUNTIME
        _discard_stdout()
        report(_unencodable(exc))
        return EXIT_RUNTIME
    except MemoryError as exc:
        if debug_enabled():
            raise
        report(out_of_memory(f"({exc})" if str(exc) else ""))
        return EXIT_RUNTIME
    except Exception as exc:
        if _is_usage_error(exc):  # Typer's (vendored) click errors, in gptcli's own two lines
            if type(exc).__name__ == "NoArgsIsHelpError":  # a command group called alone: its help, exit 2
                exc.show()  # type: ignore[attr-defined]
                return exc.exit_code  # type: ignore[attr-defined]
            context = getattr(exc, "ctx", None)
            command = context.command_path if context is not None else _command_path(cli, argv)
            message, hint = habit_hint(exc) or (exc.format_message(), f"see `{command} -h`")  # type: ignore[attr-defined]
            report(GptcliError(message, hint=hint))
            return exc.exit_code  # type: ignore[attr-defined]
        if debug_enabled():
            raise
        report(_internal(exc))
        return EXIT_RUNTIME
    except BaseException as exc:  # a Rust library's panic (pyo3's PanicException is no Exception): one line too
        if type(exc).__name__ != "PanicException" or debug_enabled():
            raise
        report(_panic(exc))
        return EXIT_RUNTIME


def _panic(exc: BaseException) -> GptcliError:
    """A Rust library (tokenizers, llguidance) that panicked: most often it could not start its threads."""
    message = clipped((str(exc).splitlines() or [type(exc).__name__])[0], 300)
    if "thread" in message.lower():
        return GptcliError(
            f"a library could not start its threads ({message})",
            hint="a process limit (`ulimit -u`) is too low for gptcli's threads: raise it",
        )
    return GptcliError(f"a library failed: {message}", hint="set GPTCLI_DEBUG=1 for the traceback, and report it")


def _command_path(cli: typer.Typer, argv: list[str]) -> str:
    """`gptcli COMMAND [SUBCOMMAND]` as argv names it, for an error Click raised without its context
    (`gptcli generate --model` with no value)."""
    command, words = typer.main.get_command(cli), ["gptcli"]
    for arg in argv:
        sub = getattr(command, "commands", {}).get(arg)
        if sub is None and (arg not in ROOT_FLAGS or len(words) > 1):
            break
        if sub is not None:
            command, words = sub, [*words, arg]
    return " ".join(words)


def _unencodable(exc: UnicodeEncodeError) -> GptcliError:
    """The error for text stdout's encoding cannot hold: a character, or a byte that was never UTF-8 (a file name's
    or an argument's, which Python carries as a lone surrogate: no UTF-8 stdout holds it unless told to)."""
    char = exc.object[exc.start]
    if (byte := escaped_byte(char)) is not None:
        return GptcliError(
            f"cannot write to stdout: the text holds the byte {byte}, which is not UTF-8 "
            "(from a file or folder name, or an argument)",
            hint="rename it to UTF-8, or set PYTHONIOENCODING=utf-8:surrogateescape to pass such bytes through",
        )
    return GptcliError(
        f"cannot write to stdout: its encoding ({exc.encoding}) cannot hold U+{ord(char):04X}",
        hint="use a UTF-8 locale, or set PYTHONIOENCODING=utf-8",
    )


def _internal(exc: BaseException) -> GptcliError:
    return GptcliError(f"internal error: {type(exc).__name__}: {exc}", hint="set GPTCLI_DEBUG=1 for the traceback")


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit neither fails nor complains (a stdout with no
    descriptor, as an in-process caller's, is left as it is: run() never raises)."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)


def _stdout_error(exc: OSError) -> GptcliError | None:
    """An error naming stdout when writing to it failed (`> /dev/full`), else None."""
    if not getattr(exc, "on_stdout", False):
        return None
    try:
        target = f" ({os.readlink(f'/proc/self/fd/{sys.stdout.fileno()}')})"
    except (OSError, ValueError):
        target = ""
    _discard_stdout()
    return GptcliError(f"cannot write to stdout{target}: {exc.strerror or exc}")


class _StdoutText(io.TextIOWrapper):
    """stdout, marking the errors of its writes so that the error line can name stdout.

    The marking sits above the buffer, not on the raw file: a Ctrl-C that lands just after a raw write
    (in Python code there) made the buffer keep bytes already written and write them a second time.
    """

    def write(self, text: str) -> int:
        try:
            return super().write(text)
        except OSError as exc:
            exc.on_stdout = True  # type: ignore[attr-defined]
            raise

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as exc:
            exc.on_stdout = True  # type: ignore[attr-defined]
            raise


def _mark_stdout_errors() -> None:
    """Put the interpreter's stdout on a _StdoutText (same descriptor, encoding and buffering)."""
    stdout = sys.stdout
    if stdout is None or stdout is not sys.__stdout__:  # captured by a test, or already done
        return
    try:
        fd = stdout.fileno()
        if stdout.isatty():  # a terminal is never full; leave the interactive stdout as it is
            return
        stdout.flush()
    except (OSError, ValueError):
        return
    raw = io.FileIO(fd, "w", closefd=False)
    sys.stdout = _StdoutText(
        io.BufferedWriter(raw), encoding=stdout.encoding, errors=stdout.errors, line_buffering=stdout.line_buffering
    )


def _is_usage_error(exc: Exception) -> bool:
    return any(cls.__name__ == "ClickException" for cls in type(exc).__mro__)


def main() -> None:
    code = run()
    if threading.current_thread() is threading.main_thread():
        # A signal during the interpreter's shutdown is not raised in its atexit callbacks, nor kills the process.
        ignore_stops(for_good=True)
    sys.exit(code)
