"""atomicio: a folder published over a file, and what a killed writer left beside its destination."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gptcli.atomicio import disk_full, publish_dir, remove_abandoned, temp_dir_beside, write_atomic


def _dead_pid() -> int:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(ended.stdout)


def test_a_folder_published_where_a_file_stood_leaves_no_old_file_behind(tmp_path):
    """The file was moved aside as .old-<name>-<pid>-<ns> and then 'removed' with rmtree, which fails on a file."""
    dest = tmp_path / "model"
    dest.write_text("a file where the folder goes")
    tmp = temp_dir_beside(dest)
    (tmp / "config.json").write_text("{}")
    publish_dir(tmp, dest)
    assert (dest / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("replace", [False, True])
def test_a_folder_another_process_published_between_the_check_and_the_rename(tmp_path, monkeypatch, replace):
    """Two first runs converting the default model at once: the later rename met a full folder (ENOTEMPTY)."""
    dest = tmp_path / "model"
    ours, theirs = temp_dir_beside(dest), temp_dir_beside(dest)
    (ours / "config.json").write_text("ours")
    (theirs / "config.json").write_text("theirs")
    real_replace = os.replace

    def racing(src, dst):
        if Path(src) == ours and theirs.exists():
            real_replace(theirs, dest)  # the other process wins the race, once
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", racing)
    publish_dir(ours, dest, replace=replace)
    assert (dest / "config.json").read_text() == ("ours" if replace else "theirs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_an_old_file_a_killed_writer_left_is_removed_and_nothing_else(tmp_path):
    dest = tmp_path / "model"
    dead = _dead_pid()
    left = tmp_path / f".old-model-{dead}-1"  # publish_dir moved a file aside, then was killed with -9
    left.write_text("the file that stood at dest")
    kept = [
        tmp_path / f".old-model-{os.getppid()}-2",  # its writer still runs
        tmp_path / f".old-model-x-{dead}-3",  # another name's
        tmp_path / f".tmp-model-{dead}-4",  # temp_dir_beside makes folders: a file of this name is not ours
    ]
    for path in kept:
        path.write_text("kept")
    link = tmp_path / f".old-model-{dead}-5"
    link.symlink_to(tmp_path / "elsewhere")  # publish_dir never moves a link aside
    remove_abandoned(dest)
    assert not left.exists()
    assert all(path.is_file() for path in kept) and link.is_symlink()


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device", "/x/.tmp-model-1-2/model.safetensors"),
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
        "OSError: [Errno 28] No space left on device: 'a.whl' -> 'b/a.whl'",
    ],
)
def test_disk_full_names_the_path_being_made(failure, tmp_path):
    error = disk_full(failure, tmp_path / "model")
    assert isinstance(error, OSError)
    assert (error.errno, error.strerror, error.filename) == (
        errno.ENOSPC,
        os.strerror(errno.ENOSPC),
        str(tmp_path / "model"),
    )


def test_disk_full_is_none_for_anything_else(tmp_path):
    assert disk_full(RuntimeError("shape mismatch in layer 28"), tmp_path) is None
    assert disk_full("ERROR: No matching distribution found for tiny==1.0", tmp_path) is None
    assert disk_full("[Errno 28] No space left ... then: [Errno 111] Connection refused", tmp_path) is None
    assert disk_full(PermissionError(errno.EACCES, "Permission denied", "/models/a/tokenizer.json"), tmp_path) is None


def test_a_replaced_file_keeps_its_mode(tmp_path):
    """`bench --output` (an append) and `config init --force` made a private (0600) file 0644: readable by all."""
    private = tmp_path / "runs.jsonl"
    private.write_text('{"a": 1}\n')
    private.chmod(0o600)
    write_atomic(private, '{"b": 2}\n', keep_old=True)
    assert private.read_text() == '{"a": 1}\n{"b": 2}\n'
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    write_atomic(private, "x", mode=0o640)  # a mode asked for still wins (chat files: 0600)
    assert stat.S_IMODE(private.stat().st_mode) == 0o640


def test_a_read_only_file_is_refused_not_replaced(tmp_path):
    """A file made read-only (chmod a-w) was replaced all the same (a rename needs only the folder writable):
    `chats export ID -o notes.md` over a protected notes.md destroyed it, where open() says Permission denied."""
    from tests.test_hardening import _without_file_permission_bypass

    kept = tmp_path / "notes.md"
    kept.write_text("mine\n")
    kept.chmod(0o444)
    code = "import sys, pathlib, gptcli.atomicio as a; a.write_atomic(pathlib.Path(sys.argv[1]), 'new')"
    command = [*_without_file_permission_bypass(), sys.executable, "-c", code, str(kept)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == f"PermissionError: [Errno 13] Permission denied: '{kept}'"
    assert kept.read_text() == "mine\n" and [p.name for p in tmp_path.iterdir()] == ["notes.md"]


# A writer held between its write and its rename (os.replace blocks until stdin closes): where kill -9 leaves it.
_HELD_WRITER = """
import os, sys, pathlib, gptcli.atomicio as a
def held(src, dst):
    print(src, flush=True)
    sys.stdin.read()
os.replace = held
a.write_atomic(pathlib.Path(sys.argv[1]), "never published")
"""


def _held_writer(path):
    """A child process holding its temporary file of `path`; returns it and the temporary file's path."""
    writer = subprocess.Popen(
        [sys.executable, "-c", _HELD_WRITER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    return writer, path.parent / os.path.basename(writer.stdout.readline().strip())


def _killed(writer):
    writer.kill()  # SIGKILL: no finally, no cleanup
    writer.wait(timeout=60)
    writer.stdin.close()
    writer.stdout.close()


def test_a_temporary_file_a_killed_writer_left_is_removed_by_the_next_write(tmp_path):
    """kill -9 between the write and the rename left `.NAME.<random>.tmp` for good (chats, config, tuning cache)."""
    target = tmp_path / "chat.json"
    writer, left = _held_writer(target)
    assert left.is_file() and left.name.startswith(f".chat.json.{writer.pid}-")
    _killed(writer)
    write_atomic(tmp_path / "other.json", "{}")  # any write to the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json"]


def test_a_temporary_file_being_written_is_kept(tmp_path):
    """Another gptcli saving the same conversation: its temporary file is never taken from under it."""
    target = tmp_path / "chat.json"
    writer, held = _held_writer(target)
    try:
        write_atomic(target, "mine")
        assert held.is_file() and target.read_text() == "mine"
    finally:
        _killed(writer)
    user_file = tmp_path / f".chat.json.{writer.pid}-notes.tmp"  # a name of the same shape, not ours: kept
    user_file.write_text("kept")
    write_atomic(target, "again")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["chat.json", user_file.name])


def test_chats_list_removes_what_a_killed_save_left(tmp_path):
    from gptcli.chat.conversation import ConversationStore

    store = ConversationStore(tmp_path)
    writer, left = _held_writer(store.path("20260101-000000-abcd"))
    _killed(writer)
    assert left.is_file() and store.list() == []
    assert list(tmp_path.iterdir()) == []


def test_dev_stdout_on_a_pipe_is_written_through():
    """`-o /dev/stdout | less` failed: its real path is "/proc/<pid>/fd/pipe:[N]", taken for a new file to make
    beside it ("cannot create a file in /proc/<pid>/fd")."""
    code = "from pathlib import Path; from gptcli.atomicio import write_atomic; write_atomic(Path('/dev/stdout'), 'hi')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "hi", done.stderr


def test_an_exclusive_write_never_replaces_a_file_however_late_it_came(tmp_path, monkeypatch):
    """QA: `chats export -o F` (and `config init F`) checked that F was not there, then replaced whatever was:
    two exports at once both said "wrote F", one replacing the other. An exclusive write claims the name itself."""
    import gptcli.atomicio as atomicio

    path = tmp_path / "exp.md"
    write_atomic(path, "first", exclusive=True)
    assert path.read_text() == "first"
    with pytest.raises(FileExistsError) as raised:
        write_atomic(path, "second", exclusive=True)
    assert raised.value.filename == str(path) and path.read_text() == "first"
    late = tmp_path / "late.md"
    real = atomicio.tempfile.mkstemp

    def another_writer_first(*args, **kwargs):  # the other process's file appears while this one writes its own
        late.write_text("theirs")
        return real(*args, **kwargs)

    monkeypatch.setattr(atomicio.tempfile, "mkstemp", another_writer_first)
    with pytest.raises(FileExistsError):
        write_atomic(late, "mine", exclusive=True)
    assert late.read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.md", "late.md"]  # no temporary file left
    write_atomic(late, "mine")  # not exclusive: replaced, as before
    assert late.read_text() == "mine"
