"""A C source shipped in the package, built with the system's C compiler into the cache and loaded with ctypes.

What a user's machine can do to a build, and what happens:
- no compiler (`$CC`, split as a shell would, else `cc`, else `gcc`): a reason, no build;
- a compiler that fails, hangs (BUILD_TIMEOUT_S, then its whole process group is killed), writes
  something that does not load, or whose output is not UTF-8: a BuildError naming its first complaint,
  and the caller records it (`failure_key`) so later runs do not pay for it again;
- a cache that cannot be written: built in a temporary folder, loaded, and the folder removed at once;
- a library in the cache that was damaged (truncated by a full disk, overwritten): its bytes no longer
  match the sha256 written beside it when it was built, so it is built again. (A truncated ELF file
  would crash the process in dlopen, with SIGBUS, before any Python error could be raised.)
- a process killed mid-build: its `.building-*` file is removed by the next build once it is stale.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from gptcli.atomicio import write_atomic
from gptcli.paths import cache_key, file_stamp

BUILD_TIMEOUT_S = 60  # the int8 kernel builds in ~0.3 s
STALE_PARTIAL_S = 2 * BUILD_TIMEOUT_S
COMPLAINT_BYTES = 4096  # of a compiler's stderr, kept (the rest goes to a file that is deleted)


class BuildError(Exception):
    """The compiler could not build the source, or what it built does not load (the message says which)."""


class BuildTimeout(BuildError):
    """The compiler hung: it would hang again with other flags, so nothing else is tried."""


def compiler() -> tuple[str, ...] | None:
    """The C compiler's command: $CC (split as a shell would: `ccache gcc`), else cc, else gcc; None: none."""
    try:
        named = shlex.split(os.environ.get("CC", ""))
    except ValueError:  # an unclosed quote: not a command, so cc or gcc as if unset
        named = []
    program = shutil.which(named[0]) if named else None
    if program:
        return (program, *named[1:])
    found = shutil.which("cc") or shutil.which("gcc")
    return (found,) if found else None


def compiler_key(cc: tuple[str, ...]) -> str:
    """The compiler as a cache key's part: its command and the stamps of the programs it names (`ccache gcc`:
    both), so an upgrade changes it."""
    stamps = []
    for word in cc:
        program = shutil.which(word) if not word.startswith("-") and "=" not in word else None
        with contextlib.suppress(OSError):
            stamps.append(file_stamp(Path(program)) if program else "")
    return " ".join(cc) + "|" + ",".join(stamps)


def library_key(source: Path, cc: tuple[str, ...], flags: tuple[str, ...]) -> str:
    """What decides a built file: the source's text, the flags and the compiler."""
    return cache_key(source.read_text(encoding="utf-8"), *flags, compiler_key(cc))


def build(source: Path, cc: tuple[str, ...], flags: tuple[str, ...], target: Path) -> None:
    """Compile `source` with `flags` into `target`, then write its sha256 beside it. The compiler writes a
    temporary name that is renamed once complete, so a reader never sees half a file. OSError: the folder
    cannot be written; BuildError: the compiler failed or hung."""
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(folder)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".building-", suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        name = Path(cc[0]).name
        _compile([*cc, *flags, "-o", str(partial), str(source)], name)
        try:
            built = partial.read_bytes()
        except FileNotFoundError:
            built = b""
        if not built:
            raise BuildError(f"{name} wrote no library")
        digest = hashlib.sha256(built).hexdigest()
        os.replace(partial, target)
        write_atomic(digest_file(target), digest + "\n")
    finally:
        with contextlib.suppress(OSError):
            partial.unlink()


def _compile(command: list[str], name: str) -> None:
    with tempfile.TemporaryFile() as errors:
        try:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True)
        except OSError as exc:  # not a program after all (a folder, no execute permission)
            raise BuildError(f"{name} does not run: {exc.strerror or exc}") from None
        try:
            code = process.wait(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            raise BuildTimeout(f"{name} took over {BUILD_TIMEOUT_S} s") from None
        except BaseException:  # Ctrl-C: the compiler runs in its own session, so it is stopped here
            _kill_group(process)
            raise
        if code != 0:
            errors.seek(0)
            text = errors.read(COMPLAINT_BYTES).decode("utf-8", errors="replace")
            first = next((line.strip() for line in text.splitlines() if line.strip()), f"exit status {code}")
            raise BuildError(f"{name} failed: {first[:200]}")


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _remove_stale_partials(folder: Path) -> None:
    """`.building-*` files a killed process left (its compiler may have finished writing them after)."""
    now = time.time()
    for partial in folder.glob(".building-*"):
        with contextlib.suppress(OSError):
            if now - partial.stat().st_mtime > STALE_PARTIAL_S:
                partial.unlink()


def digest_file(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def intact(target: Path) -> bool:
    """Whether `target` holds exactly the bytes that were built (its sha256 file agrees)."""
    try:
        want = digest_file(target).read_text(encoding="utf-8").strip()
        return hashlib.sha256(target.read_bytes()).hexdigest() == want
    except (OSError, UnicodeDecodeError):
        return False


def load(target: Path, symbol: str) -> ctypes.CDLL:
    """dlopen a built library that exports `symbol`; BuildError when it is not one (what the compiler wrote
    does not load, or is some other library)."""
    try:
        library = ctypes.CDLL(str(target))
    except OSError as exc:
        raise BuildError(f"what the compiler built does not load: {exc}") from None
    if not hasattr(library, symbol):
        raise BuildError(f"what the compiler built has no {symbol} in it")
    return library


def built_library(
    source: Path, cc: tuple[str, ...], flags: tuple[str, ...], folder: Path, stem: str, symbol: str
) -> ctypes.CDLL:
    """The library for (source, compiler, flags), which must export `symbol`: from `folder` when intact
    there, else built now (in a temporary folder, removed once loaded, when `folder` cannot be written)."""
    target = folder / f"{stem}-{library_key(source, cc, flags)}.so"
    if intact(target):
        with contextlib.suppress(BuildError):
            return load(target, symbol)
    _discard(target)
    try:
        build(source, cc, flags, target)
    except OSError:  # a read-only or full cache, or a file where its folder goes
        scratch = Path(tempfile.mkdtemp(prefix="gptcli-kernels-"))
        try:
            elsewhere = scratch / target.name
            build(source, cc, flags, elsewhere)
            return load(elsewhere, symbol)  # the mapping outlives the file
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    try:
        return load(target, symbol)
    except BuildError:  # not kept: the failure is the caller's to record
        _discard(target)
        raise


def _discard(target: Path) -> None:
    """A built file and its digest, gone (either may be missing)."""
    for path in (target, digest_file(target)):
        with contextlib.suppress(OSError):
            path.unlink()
