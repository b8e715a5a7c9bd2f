"""Write a file so that a crash, a kill or a full disk leaves the old version or the new, never half."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import zlib
from pathlib import Path
from typing import BinaryIO


def default_mode() -> int:
    """The mode open() gives a new file here (0o666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def apply_umask(folder: Path) -> None:
    """Give each file in `folder` the mode open() would (the umask's): safetensors and onnx write theirs 0600,
    which a cache shared by several users, or a run handed to another, could not read."""
    mode = default_mode()
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def write_atomic(
    path: Path, data: bytes | str, *, mode: int | None = None, keep_old: bool = False, exclusive: bool = False
) -> None:
    """Temp file in the same folder + fsync + os.replace. mode defaults to the old file's, else what open() would
    give; a file open() could not write (made read-only) is refused as open() refuses it, never replaced.

    A symlink is followed: its target is replaced and the link stays. A FIFO or a device (`-o /dev/stdout`)
    is written through, never replaced. An OSError names `path`, so the one-line error can say which file.
    With `keep_old`, the new file is the old one's bytes (copied in pieces, never read whole), a newline if
    its last line lacked one, then `data`: an append that a crash or a full disk cannot leave half done.
    `exclusive`: a FileExistsError naming `path` when a file is there, however late it came (a check before the
    call could not see another process's file made meanwhile, which was then replaced).
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        # Asked of `path`, not of its real path: /dev/stdout on a pipe links to "pipe:[N]", which names no file.
        if path.exists() and not path.is_file():
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
            with path.open("wb") as handle:
                handle.write(payload)
            return
        _replace(Path(os.path.realpath(path)), payload, mode, keep_old=keep_old, exclusive=exclusive)
    except OSError as exc:
        if exc.filename or exc.errno is None:
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None


def _replace(path: Path, payload: bytes, mode: int | None, *, keep_old: bool = False, exclusive: bool = False) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where one of the path's folders should be
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)) from None
    old_mode = _writable_mode(path)
    remove_abandoned_writes(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-{_HOST}-", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # named by its temporary file: the error names `path`, and the folder as the cause
        raise type(exc)(exc.errno, f"cannot create a file in {path.parent} ({exc.strerror})") from None
    try:
        os.fchmod(fd, mode if mode is not None else old_mode if old_mode is not None else default_mode())
        with os.fdopen(fd, "wb") as handle:
            if keep_old:
                _copy_lines(path, handle)
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:  # claim the name first (O_EXCL: one process gets it), then put the file in its place
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            os.replace(tmp, path)
        except OSError as exc:
            if exclusive:
                path.unlink(missing_ok=True)  # the name this call claimed
            raise type(exc)(exc.errno, exc.strerror) from None  # named by the temporary file: write_atomic names path
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# write_atomic's temporary files are `.<name>.<pid>-<host>-<random>.tmp`: the writer's process and machine (a
# folder shared between machines) tell a temporary file whose writer was killed (-9) from one still being written.
_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"
_WRITE_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)-(?P<host>[0-9a-f]{8})-[a-z0-9_]+\.tmp")


def remove_abandoned_writes(folder: Path) -> None:
    """Delete the temporary files write_atomic left in `folder` when killed between its write and its rename,
    once their writer (a process of this machine) has ended; one still being written stays."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        found = _WRITE_TEMPORARY.fullmatch(entry.name)
        if found is None or found["host"] != _HOST or not entry.is_file(follow_symlinks=False):
            continue  # not one of ours, or another machine's (its pid says nothing here)
        if not _running(int(found["pid"])):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _writable_mode(path: Path) -> int | None:
    """The permission bits of the file at `path` (None when there is none), once open() could write it: a file
    made read-only (chmod a-w) is a PermissionError naming it, as open(path, "w") would raise."""
    try:
        bits = stat.S_IMODE(os.stat(path).st_mode) & 0o777
    except FileNotFoundError:
        return None
    os.close(os.open(path, os.O_WRONLY))  # opened, not truncated: the kernel's own answer (owner, ACLs, root)
    return bits


def _copy_lines(path: Path, handle: BinaryIO) -> None:
    """`path`'s bytes into `handle` a MiB at a time, ending with a newline (nothing when there is no file)."""
    try:
        old = path.open("rb")
    except FileNotFoundError:
        return
    with old:
        shutil.copyfileobj(old, handle, 1 << 20)
        if old.tell():
            old.seek(-1, os.SEEK_END)
            if old.read(1) != b"\n":
                handle.write(b"\n")


# How a library that drops the OSError keeps the OS's error number in its message: Rust's std::io (safetensors:
# "I/O error: No space left on device (os error 28)") and Python's OSError text (the last line of pip's traceback).
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")


def disk_full(failure: BaseException | str, path: Path) -> OSError | None:
    """A full disk (ENOSPC, EDQUOT) as an OSError naming `path` (what is being made, not the temporary file inside
    it, nor the source a copy read from), so paths.environment_error says it in one line; None for any other
    failure. `failure` is an OSError, or a library's error (or output) that kept only the error number in its text."""
    if isinstance(failure, OSError):
        number = failure.errno
    elif found := _ERRNO_IN_TEXT.findall(str(failure)):
        number = int("".join(found[-1]))  # the last: pip's retries may say other errors first
    else:
        return None
    return OSError(number, os.strerror(number), str(path)) if number in (errno.ENOSPC, errno.EDQUOT) else None


def temp_dir_beside(dest: Path) -> Path:
    """A new, empty hidden folder next to `dest` (same file system, so publishing it is one rename).

    Folders an earlier writer of `dest` left behind (killed with -9 mid-export: 627 MB for the default
    model) are removed first, once the process that made them is gone."""
    dest = _followed(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(dest)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        tmp.mkdir()
    except OSError as exc:  # named by the temporary folder: the error names `dest`, and the folder as the cause
        raise type(exc)(exc.errno, f"cannot create a folder in {dest.parent} ({exc.strerror})", str(dest)) from None
    return tmp


def remove_abandoned(dest: Path) -> None:
    """Delete `.tmp-`/`.old-` folders of `dest` (temp_dir_beside, publish_dir) whose process has ended,
    and `.old-` files (a file that stood where publish_dir put a folder)."""
    remove_abandoned_in(dest.parent, dest.name)


def remove_abandoned_in(folder: Path, name: str | None = None) -> None:
    """remove_abandoned for every name in `folder` (or only `name`): what killed writers and removers left there."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for left in entries:
        kind, rest = left.name[:5], left.name[5:]
        named, pid, stamp = [*rest.rsplit("-", 2), "", ""][:3]
        ours = left.is_dir() or (kind == ".old-" and left.is_file())
        if kind not in (".tmp-", ".old-") or name not in (None, named) or left.is_symlink() or not ours:
            continue  # not one of ours (another name that starts like this one)
        if pid.isdigit() and stamp.isdigit() and not _running(int(pid)):
            _remove(left)


def remove_whole(path: Path) -> None:
    """Delete a folder so that no one sees it half deleted: one rename moves it aside (`.old-`), then it goes;
    a kill in between leaves only the hidden folder, which remove_abandoned(_in) deletes later."""
    _remove(_moved_aside(path))


def _moved_aside(path: Path) -> Path:
    aside = path.parent / f".old-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
    os.replace(path, aside)
    return aside


def _remove(path: Path) -> None:
    """Delete a folder and all in it, or a file; what cannot be deleted stays (the next writer tries again)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process: alive (a number no pid can be: not ours to judge)
        return True
    return True


def publish_dir(tmp: Path, dest: Path, *, replace: bool = True) -> None:
    """Move a finished temp folder to `dest` with a rename, so readers see all of it or nothing.

    An existing `dest` is swapped out as a whole when `replace` (moved aside, then deleted), else it
    is kept (a concurrent writer finished first, even between this check and the rename) and `tmp` is
    deleted. A link to a folder is followed (as temp_dir_beside does): its target is replaced and the link
    stays.
    """
    dest = _followed(dest)
    if not dest.exists():
        try:
            os.replace(tmp, dest)
            return
        except OSError as exc:  # another process published `dest` since (two first runs converting at once)
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not dest.is_dir():
                raise
    if not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = _moved_aside(dest)
    os.replace(tmp, dest)
    _remove(old)  # a folder, or the file that stood at `dest`


def _followed(path: Path) -> Path:
    """Where `path` leads when it is a link (a linked folder is replaced at its target), else `path`."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path
