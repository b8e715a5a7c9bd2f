"""Locks between gptcli processes, as flocks: the kernel drops one when its process dies (even by kill -9), so a
lock file left by a dead process is simply taken over.

- `owner_lock`: one process at a time for as long as it works (a training run's folder, a batch's results file);
  the file holds the owner's pid, which the error for a second process names; it is removed on release.
- `short_lock`: a moment's exclusive hold of a folder around a read-check-write (a chat's save), waited for.

Where the file system cannot lock (some network mounts) or the lock file cannot be made, the work goes on
unlocked, as it did before there were locks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gptcli.errors import GptcliError

UNLOCKABLE = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL})
SHORT_WAIT_S = 10.0  # how long short_lock waits for another process's save before it says so


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


def check_unlocked(path: Path, busy: Callable[[str], GptcliError]) -> None:
    """Raise busy(owner's pid) when another process holds the lock at `path` (nothing is created)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        if not _try_lock(fd, fcntl.LOCK_SH):
            raise busy(_owner(path))
    except OSError as exc:
        if exc.errno not in UNLOCKABLE:
            raise
    finally:
        os.close(fd)


@contextmanager
def owner_lock(path: Path, busy: Callable[[str], GptcliError]) -> Iterator[None]:
    """Hold the lock at `path` for the duration, writing this pid in it; busy(owner's pid) if another holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a folder we may not write in (the lock file cannot be made): unlocked
            yield
            return
        try:
            locked = _try_lock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in UNLOCKABLE:
                raise
            yield
            return
        if not locked:
            os.close(fd)
            raise busy(_owner(path))
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous owner removed this file while we waited for it: lock the new one
    try:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:  # a full disk: the lock holds all the same (the pid only names its owner to another process)
            pass
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def short_lock(folder: Path, *, wait_s: float = SHORT_WAIT_S) -> Iterator[None]:
    """An exclusive hold of `folder` (an flock on the folder itself: no file of its own in it), waited for up to
    `wait_s` seconds; past that a GptcliError, since another process's hold is meant to last a moment."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise GptcliError(
                        f"{folder} is held by another gptcli process for more than {wait_s:g} s",
                        hint="see whether one is stuck (`ps`), then run the command again",
                    ) from None
                time.sleep(0.01)
            except OSError as exc:
                if exc.errno not in UNLOCKABLE:
                    raise
                break  # this file system cannot lock: go on unlocked
        yield
    finally:
        os.close(fd)
