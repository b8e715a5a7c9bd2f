"""atomicio: a folder published over a file, and what a killed writer left beside its destination."""

from __future__ import annotations

import os
import subprocess
import sys

from gptcli.atomicio import publish_dir, remove_abandoned, temp_dir_beside


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
