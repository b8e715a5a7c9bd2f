"""One `gptcli train` process per run folder: gptcli.locks' owner lock on a file in the folder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gptcli import locks
from gptcli.train.errors import RunError

LOCK_FILE = ".gptcli-train.lock"


def _busy(folder: Path) -> Callable[[str], RunError]:
    def busy(pid: str) -> RunError:
        return RunError(
            f"{folder} is being trained by another gptcli process (pid {pid or '?'})",
            hint="wait for it to finish, or stop it first",
        )

    return busy


def check_unlocked(folder: Path) -> None:
    """Raise RunError naming the owner when another process holds the folder's lock (nothing is created)."""
    locks.check_unlocked(folder / LOCK_FILE, _busy(folder))


@contextmanager
def run_lock(folder: Path, *, enabled: bool = True) -> Iterator[None]:
    """Hold the folder's lock for the duration (creating the folder); RunError naming the owner if taken."""
    if not enabled:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with locks.owner_lock(folder / LOCK_FILE, _busy(folder)):
        yield
