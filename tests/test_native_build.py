"""A C source built with the system's compiler into the cache (backends/native_build.py): what a machine
can do to a build (no compiler, one that fails, hangs, writes garbage or non-UTF-8; a cache that cannot be
written; a library damaged after it was built; a build killed halfway) never takes the process down."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from gptcli.backends import native_build
from gptcli.backends.native_build import BuildError, built_library

CC = native_build.compiler()
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler here")
FLAGS = ("-O2", "-shared", "-fPIC")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "answer.c"
    path.write_text("int gptcli_answer(void) { return 42; }\n")
    return path


def _script(tmp_path: Path, name: str, body: str) -> tuple[str, ...]:
    script = tmp_path / name
    script.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    script.chmod(0o755)
    return (str(script),)


@needs_cc
def test_built_once_with_its_digest_then_read_back(tmp_path, source):
    folder = tmp_path / "kernels"
    assert built_library(source, CC, FLAGS, folder, "answer", "gptcli_answer").gptcli_answer() == 42
    (library,) = folder.glob("answer-*.so")
    assert native_build.intact(library) and native_build.digest_file(library).is_file()
    stamp = library.stat().st_mtime_ns
    assert built_library(source, CC, FLAGS, folder, "answer", "gptcli_answer").gptcli_answer() == 42
    assert library.stat().st_mtime_ns == stamp
    assert not list(folder.glob(".building-*"))


@needs_cc
def test_a_truncated_library_is_built_again_instead_of_crashing_dlopen(tmp_path, source):
    folder = tmp_path / "kernels"
    built_library(source, CC, FLAGS, folder, "answer", "gptcli_answer")
    (library,) = folder.glob("answer-*.so")
    library.write_bytes(library.read_bytes()[: library.stat().st_size // 2])  # a full disk's leftover
    # In a fresh process: dlopen of a truncated ELF dies of SIGBUS, which no test could catch in this one.
    code = f"""
import sys; sys.path.insert(0, {str(REPO / "src")!r})
from pathlib import Path
from gptcli.backends.native_build import built_library
library = built_library(Path({str(source)!r}), {CC!r}, {FLAGS!r}, Path({str(folder)!r}), "answer", "gptcli_answer")
print(library.gptcli_answer())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "42"), done.stderr
    assert native_build.intact(library)


@needs_cc
def test_a_cache_that_cannot_be_written_builds_in_a_temporary_folder_and_removes_it(tmp_path, source, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    blocked = tmp_path / "kernels"
    blocked.write_text("a file where the folder goes")
    assert built_library(source, CC, FLAGS, blocked, "answer", "gptcli_answer").gptcli_answer() == 42
    assert list(scratch.iterdir()) == []  # loaded, then deleted: nothing left behind


@pytest.mark.parametrize(
    ("name", "body", "complaint"),
    [  # a failure whose complaint is not UTF-8; a "success" whose file is not a library
        ("bad-cc", "printf 'bad-cc: caf\\351 error\\n' >&2\nexit 1\n", "bad-cc failed: bad-cc: caf\ufffd error"),
        ("garbage-cc", 'while [ "$1" != "-o" ]; do shift; done\necho garbage > "$2"\n', "built does not load"),
        ("silent-cc", 'while [ "$1" != "-o" ]; do shift; done\nrm -f "$2"\n', "silent-cc wrote no library"),
    ],
)
def test_a_compiler_that_fails_or_writes_garbage_says_why_and_leaves_nothing(tmp_path, source, name, body, complaint):
    folder = tmp_path / "kernels"
    with pytest.raises(BuildError, match=complaint):
        built_library(source, _script(tmp_path, name, body), FLAGS, folder, "answer", "gptcli_answer")
    assert list(folder.iterdir()) == []


def test_a_compiler_that_hangs_is_stopped_with_its_children(tmp_path, source, monkeypatch):
    monkeypatch.setattr(native_build, "BUILD_TIMEOUT_S", 1)
    pid_file = tmp_path / "child.pid"
    cc = _script(tmp_path, "slow-cc", f"sleep 60 &\necho $! > {pid_file}\nwait\n")
    start = time.monotonic()
    with pytest.raises(BuildError, match="slow-cc took over 1 s"):
        built_library(source, cc, FLAGS, tmp_path / "kernels", "answer", "gptcli_answer")
    assert time.monotonic() - start < 10
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child}/status").read_text()
        except OSError:
            break  # gone
        if "\nState:\tZ" in state:
            break  # killed, not yet reaped by whoever adopted it
        time.sleep(0.05)
    else:
        pytest.fail(f"the compiler's child {child} still runs")


def test_a_compiler_that_is_not_a_program_is_a_build_error(tmp_path, source):
    with pytest.raises(BuildError, match="does not run"):
        built_library(source, (str(tmp_path),), FLAGS, tmp_path / "kernels", "answer", "gptcli_answer")


@needs_cc
def test_a_stale_partial_build_is_removed_and_a_fresh_one_kept(tmp_path, source):
    folder = tmp_path / "kernels"
    folder.mkdir()
    stale, fresh = folder / ".building-old.so", folder / ".building-now.so"
    stale.write_bytes(b"left by a killed build")
    fresh.write_bytes(b"another process building now")
    old = time.time() - 2 * native_build.STALE_PARTIAL_S
    os.utime(stale, (old, old))
    built_library(source, CC, FLAGS, folder, "answer", "gptcli_answer")
    assert not stale.exists() and fresh.exists()


def test_cc_is_split_as_a_shell_would_and_a_missing_one_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    _script(tmp_path, "cc", "exit 0\n")
    monkeypatch.setenv("CC", "env FOO=1 gcc")
    assert native_build.compiler()[1:] == ("FOO=1", "gcc")
    for unusable in ("/no/such/compiler", 'gcc "an unclosed quote'):
        monkeypatch.setenv("CC", unusable)
        assert native_build.compiler() == (str(tmp_path / "cc"),)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert native_build.compiler() is None


@needs_cc
def test_a_library_without_the_symbol_asked_for_is_not_kept(tmp_path, source):
    other = tmp_path / "other.c"
    other.write_text("int unrelated(void) { return 1; }\n")
    cc = _script(
        tmp_path, "wrong-cc", f'while [ "$1" != "-o" ]; do shift; done\n{" ".join(CC)} -shared -fPIC -o "$2" {other}\n'
    )
    folder = tmp_path / "kernels"
    with pytest.raises(BuildError, match="has no gptcli_answer in it"):
        built_library(source, cc, FLAGS, folder, "answer", "gptcli_answer")
    assert list(folder.iterdir()) == []


def test_the_compiler_key_stamps_every_program_it_names(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    wrapped = tmp_path / "wrapped-cc"
    wrapped.write_text("#!/bin/sh\n")
    wrapped.chmod(0o755)
    before = native_build.compiler_key(("/usr/bin/env", "FOO=1", "wrapped-cc", "-O0"))
    os.utime(wrapped, (1, 1))  # the wrapped compiler upgraded
    assert native_build.compiler_key(("/usr/bin/env", "FOO=1", "wrapped-cc", "-O0")) != before
