"""The Typer application and the one exit path: errors → `error:`/`hint:` lines and exit codes."""

from __future__ import annotations

import os
import sys
from typing import Annotated

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
from gptcli.cli.render import report
from gptcli.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, GptcliError

app = typer.Typer(
    name="gptcli",
    help="Train, run, chat with and benchmark GPT-style language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"gptcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Train, run, chat with and benchmark GPT-style language models."""


# The four ways gptcli is used first, then the tools around them.
app.command("generate")(generate.generate)
app.command("chat")(chat_cmd.chat)
app.command("summarize")(summarize_cmd.summarize)
app.command("serve")(serve_cmd.serve)
app.command("bench")(bench_cmd.bench)
app.command("train")(train_cmd.train)
app.command("export")(export_cmd.export)
app.add_typer(eval_cmd.app, name="eval")
app.add_typer(models_cmd.app, name="models")
app.add_typer(chats_cmd.app, name="chats")
app.add_typer(templates_cmd.app, name="templates")
app.add_typer(runs_cmd.app, name="runs")
app.add_typer(config_cmd.app, name="config")
app.command("backends")(backends_cmd.backends)


def debug_enabled() -> bool:
    """GPTCLI_DEBUG=1: let errors out with their traceback."""
    return os.environ.get("GPTCLI_DEBUG", "") not in {"", "0", "false"}


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (never raises, except with GPTCLI_DEBUG=1)."""
    try:
        result = app(args=argv, prog_name="gptcli", standalone_mode=False)
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
        # The reader went away (`| head`): stop quietly, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        if _is_usage_error(exc):  # Typer's (vendored) click usage errors: they print themselves
            exc.show()  # type: ignore[attr-defined]
            return exc.exit_code  # type: ignore[attr-defined]
        if debug_enabled():
            raise
        report(GptcliError(f"internal error: {type(exc).__name__}: {exc}", hint="set GPTCLI_DEBUG=1 for the traceback"))
        return EXIT_RUNTIME


def _is_usage_error(exc: Exception) -> bool:
    return any(cls.__name__ == "ClickException" for cls in type(exc).__mro__)


def main() -> None:
    sys.exit(run())
