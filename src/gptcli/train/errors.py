"""Errors specific to training. Exit codes come from the shared table in gptcli.errors."""

from __future__ import annotations

from gptcli.errors import EXIT_INPUT, EXIT_RUNTIME, GptcliError


class RunError(GptcliError):
    """`--resume` of a folder that is not a run, or with a config the run cannot continue under (exit 6)."""

    exit_code = EXIT_INPUT


class DivergedError(GptcliError):
    """The loss became NaN or infinite; the last good checkpoint is kept (exit 1)."""

    exit_code = EXIT_RUNTIME


class DiskFullError(GptcliError):
    """No space left while writing a checkpoint; the previous checkpoints are intact (exit 1)."""

    exit_code = EXIT_RUNTIME


class RankStopped(GptcliError):
    """Under torchrun, rank 0 failed while this rank waited for it: it stops too, with rank 0's exit code (rank 0
    reports the error; the others need not repeat it)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
