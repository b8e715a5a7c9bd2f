"""Where gptcli keeps its cache, config and data (every location can be moved with an env var), and cache keys."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from gptcli.errors import ConfigError, GptcliError, InputError, ModelError, clipped, escaped_byte

SOURCE_FILE = "gptcli-source.json"  # where a cached model came from (catalogue entry, .gguf path, hub id)
RUNS_DIR = Path("runs")  # where `gptcli train` puts a run by default (relative to the working folder), and `runs` looks


def read_source(folder: Path) -> str | None:
    """Where a cached model folder came from (SOURCE_FILE), or None when it has no readable record."""
    try:
        source = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return str(source) if source is not None else None


def _platform_dir(kind: str) -> Path:
    import platformdirs

    getter = {
        "cache": platformdirs.user_cache_dir,
        "config": platformdirs.user_config_dir,
        "data": platformdirs.user_data_dir,
    }[kind]
    return Path(getter("gptcli"))


def home_dir() -> Path | None:
    """`$GPTCLI_HOME`, when set, holds cache/ and data/ together."""
    value = os.environ.get("GPTCLI_HOME")
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    """Converted models and ONNX exports: written and read by safetensors, tokenizers and ONNX, by name."""
    home = home_dir()
    folder = home / "cache" if home else _platform_dir("cache")
    fix = "set GPTCLI_HOME (or XDG_CACHE_HOME) to a folder whose name is UTF-8"
    check_utf8_path(folder, "the model libraries (safetensors, tokenizers, ONNX) take", hint=fix, error=ConfigError)
    return folder


def kernels_dir() -> Path:
    """Where gptcli keeps the native kernels it builds: $GPTCLI_KERNELS_DIR, else the cache's kernels/. A built file
    is named by its source, compiler and flags, so homes on one machine can share one folder."""
    named = os.environ.get("GPTCLI_KERNELS_DIR", "").strip()
    return Path(named).expanduser() if named else cache_dir() / "kernels"


def models_dir() -> Path:
    return cache_dir() / "models"


def pulled_models_dir() -> Path:
    """Where `gptcli models pull` keeps each catalogue model's download, a folder per model."""
    return cache_dir() / "pulled"


def exports_dir() -> Path:
    """The export cache: a folder per ONNX export (gptcli.export.cache)."""
    return cache_dir() / "onnx"


def config_dir() -> Path:
    """The user config folder: $XDG_CONFIG_HOME/gptcli (GPTCLI_HOME does not move it)."""
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return Path(xdg).expanduser() / "gptcli" if xdg else _platform_dir("config")


def user_config_file() -> Path:
    return config_dir() / "config.yaml"


def data_dir() -> Path:
    home = home_dir()
    return home / "data" if home else _platform_dir("data")


def check_utf8_path(path: Path, reader: str, hint: str, error: type[GptcliError] = InputError) -> None:
    """An `error` for a path whose name holds bytes that are not UTF-8 (Python keeps them as surrogates), where
    `reader` ("ONNX takes", "the tokenizers library takes": libraries that take a path as UTF-8 text) would otherwise
    fail deep inside."""
    text = str(path)
    byte = next((byte for byte in map(escaped_byte, text) if byte is not None), None)
    if byte is not None:
        shown = clipped(os.fsencode(text).decode("utf-8", "backslashreplace"))
        said = f"its name is not UTF-8 (the byte {byte}), and {reader} only UTF-8 paths"
        raise error(f"{shown}: {said}", hint=hint)


def file_stamp(path: Path) -> str:
    """A file's name, size and modification time: what changes when the file is rewritten."""
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"


def cache_key(*parts: str, files: Iterable[Path] = (), length: int = 16) -> str:
    """The key of a cached artefact: a sha256 over `parts` and the stamps of the `files` it was made from."""
    text = "\n".join([*parts, *(file_stamp(file) for file in files)])
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# No room for a write: a full disk, a quota, or a file past what its file system (FAT: 4 GiB) or `ulimit -f` allows.
NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# A failed write that the environment causes (no room, a read-only or foreign folder), not gptcli.
ENVIRONMENT_ERRNOS = NO_ROOM_ERRNOS | {errno.EROFS, errno.EACCES, errno.EPERM}
# A path of the wrong shape (a folder where a file goes, a file where a folder goes): the user's input.
PATH_ERRNOS = frozenset({errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG, errno.ELOOP})
# Of those, a path that names no file at all (a name over 255 bytes, a loop of links): a read fails as a write does.
PATH_ITSELF = frozenset({errno.ENAMETOOLONG, errno.ELOOP})
# A path that is there but takes no file written to it (a /proc or /sys entry, a device, a FIFO with no reader).
NOT_A_FILE_ERRNOS = frozenset({errno.EINVAL, errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP})


def environment_error(exc: OSError) -> GptcliError | None:
    """A one-line error naming the path and the cause of a write the environment refused (or of a path that can
    name no file, read or written), or None.

    A path inside gptcli's own folders (the cache, chats) comes with how to move them (GPTCLI_HOME); a path
    of the wrong shape elsewhere (`-o` a folder, a file where a folder goes) is the user's input (exit 6).
    """
    if exc.errno in NOT_A_FILE_ERRNOS and exc.filename:
        path = os.fsdecode(exc.filename)
        return GptcliError(
            f"cannot write {path}: {exc.strerror or exc}",
            hint="it is no regular file (a /proc or /sys entry, a device?): choose another path",
        )
    if exc.errno not in ENVIRONMENT_ERRNOS | PATH_ERRNOS or (exc.errno in PATH_ERRNOS and not exc.filename):
        return None
    cause = exc.strerror or str(exc)
    if not exc.filename:  # a write to an open file: Python does not say which
        return GptcliError(f"a write failed: {cause}", hint="set GPTCLI_DEBUG=1 to see where")
    path = Path(os.fsdecode(exc.filename))
    if exc.errno in PATH_ITSELF:  # the path cannot name a file at all, to read one or to write it
        hint = "use a shorter path" if exc.errno == errno.ENAMETOOLONG else "check the path's symbolic links"
        return InputError(f"{clipped(str(path), 1000)}: {cause}", hint=hint)
    if exc.errno == errno.ENOTDIR and (blocker := _file_on_the_way(path)):
        cause = f"{blocker} is a file, where a folder should be"
    if path.name.startswith((".tmp-", ".old-")) or path.name.endswith(".tmp"):  # atomicio's temporary names
        path = path.parent
    if exc.errno == errno.EEXIST and path.exists() and not path.is_dir():  # mkdir met a file on the way
        cause = "a file is there, where a folder should be"
    roots = [cache_dir(), data_dir(), *([home] if (home := home_dir()) is not None else [])]
    inside = any(path == root or root in path.parents for root in roots)
    # or a folder above them that making them could not write (GPTCLI_HOME=/ro/new/home, HOME=/nonexistent); not
    # `-o /tmp` (a folder, where a file goes) with the home under /tmp: that path is the user's
    above = exc.errno in ENVIRONMENT_ERRNOS and any(path in root.parents for root in roots)
    if inside or above:
        if exc.errno == errno.ENOENT and inside:  # gptcli made it: another process removed it while this one used it
            gone = ModelError if cache_dir() in path.parents else GptcliError  # a model (exit 5), or a chat's file
            return gone(
                f"{path} was removed while gptcli used it",
                hint="another process removed it (`gptcli models rm`, `chats rm`?): run the command again",
            )
        if exc.errno in NO_ROOM_ERRNOS:
            hint = f"{no_room_fix(exc.errno)}, or set GPTCLI_HOME to a folder on another disk"
        elif exc.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR):  # a thing of the wrong kind in the way
            cause = "it is a folder" if exc.errno == errno.EISDIR and path.is_dir() else cause
            hint = "move it out of the way, or set GPTCLI_HOME to another folder"
        else:
            hint = f"make {home or path} writable, or set GPTCLI_HOME to a writable folder"
        return GptcliError(f"cannot write {path}: {cause}", hint=hint)
    if exc.errno in PATH_ERRNOS:
        if exc.errno == errno.EISDIR and path.is_dir():  # a file's path, where a folder is
            return InputError(
                f"cannot write {path}: it is a folder", hint="give the path of a file (or move that folder away)"
            )
        return InputError(f"cannot write {path}: {cause}", hint="check the path")
    if exc.errno in NO_ROOM_ERRNOS:
        hint = f"{no_room_fix(exc.errno)}, or choose a path on another disk"
    elif exc.errno == errno.EROFS:
        hint = "choose a path on a writable disk"
    else:
        hint = "check its permissions, or choose another path"
    return GptcliError(f"{path}: {cause}", hint=hint)


def no_room_fix(number: int | None) -> str:
    """What makes room for a write that found none (an errno of NO_ROOM_ERRNOS)."""
    return "raise the file-size limit (`ulimit -f`)" if number == errno.EFBIG else "free some space"


def _file_on_the_way(path: Path) -> Path | None:
    """The first parent of `path` that is there but is not a folder (what ENOTDIR means), if any."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None
