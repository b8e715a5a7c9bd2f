"""One `gptcli train` process per run folder: an flock on a file in the folder that holds the owner's pid.

The kernel drops an flock when its process dies (even by kill -9), so a lock file left by a dead process
is simply taken over. The file is removed on release; a process that locked a file another one had just
removed notices that its path is gone and tries again.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gptcli.train.errors import RunError

LOCK_FILE = ".gptcli-train.lock"


def _busy(folder: Path, pid: str) -> RunError:
    return RunError(
        f"{folder} is being trained by another gptcli process (pid {pid or '?'})",
        hint="wait for it to finish, or stop it first",
    )


def _owner(path: Path) -> str:
    """The pid written in a lock file (its owner writes it just after locking: wait a moment for it)."""
    for _ in range(20):
        try:
            pid = path.read_text(encoding="utf-8").strip()
        except OSError:
            return ""
        if pid:
            return pid
        time.sleep(0.05)
    return ""


def check_unlocked(folder: Path) -> None:
    """Raise RunError naming the owner when another process holds the folder's lock (nothing is created)."""
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        if not _try_lock(fd, fcntl.LOCK_SH):
            raise _busy(folder, _owner(path))
    finally:
        os.close(fd)


def _try_lock(fd: int, kind: int) -> bool:
    """flock without blocking, retried for a moment: check_unlocked's probe holds a lock for microseconds."""
    for attempt in range(10):
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt < 9:
                time.sleep(0.02)
    return False


@contextmanager
def run_lock(folder: Path, *, enabled: bool = True) -> Iterator[None]:
    """Hold the folder's lock for the duration (creating the folder); RunError naming the owner if taken."""
    if not enabled:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd, fcntl.LOCK_EX):
            os.close(fd)
            raise _busy(folder, _owner(path))
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous owner removed this file while we waited for it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
