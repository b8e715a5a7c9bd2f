"""More bad inputs, hostile files and broken environments across the commands (issue 15's "twenty more").

Each runs the real program in a subprocess and checks the exact first error line (or warning), the exit
code, and that no traceback leaks. Most fail before a model is loaded, so they are quick.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.test_hardening import _without_file_permission_bypass, first_error

SCRIPTED = {"GPTCLI_BACKEND_PATHS": "scripted=tests.scripted:ScriptedBackend", "GPTCLI_TEST_CONTEXT": "4096"}


@pytest.fixture(scope="module")
def tok(tiny_models):
    from gptcli.tokenizer import Tokenizer

    return Tokenizer(tiny_models["llama"])


def scripted(tok, text: str) -> dict[str, str]:
    """Environment that makes the scripted backend answer `text`."""
    ids = [*tok.encode(text, add_special_tokens=False), min(tok.eos_ids)]
    return {**SCRIPTED, "GPTCLI_TEST_SCRIPT": json.dumps(ids)}


def shell(script: str, *args: str) -> subprocess.CompletedProcess:
    """`script` run by bash with "$@" = python -m gptcli ARGS (for closed descriptors and deleted folders)."""
    command = ["bash", "-c", script, "bash", sys.executable, "-m", "gptcli", *args]
    return subprocess.run(command, capture_output=True, cwd=REPO, timeout=120)


def lines_of(result: subprocess.CompletedProcess) -> list[str]:
    err = result.stderr.decode()
    assert "Traceback" not in err, err
    return err.splitlines()


# ------------------------------------------------------------------ hostile or broken files


@pytest.mark.slow  # transformers is imported for its tokenizer fallback
def test_a_tokenizer_error_that_spans_lines_is_one_line(tiny_models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], folder)
    (folder / "tokenizer.json").unlink()
    result = run_cli("generate", "-m", str(folder), "hi")
    assert result.returncode == 5
    error, hint = lines_of(result)  # the library's message had several lines; ours is one, then the hint
    assert error.startswith(f"error: {folder}: no usable tokenizer (") and error.endswith(")")
    assert hint == "hint: add a tokenizer.json"


def test_a_config_json_that_is_not_an_object(tiny_models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], folder)
    (folder / "config.json").write_text("[1, 2]")
    result = run_cli("generate", "-m", str(folder), "hi")
    assert first_error(result) == f"error: corrupt {folder}/config.json: not a JSON object"
    assert result.returncode == 5


def test_a_safetensors_header_longer_than_the_file(tiny_models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], folder)
    with (folder / "model.safetensors").open("r+b") as handle:
        handle.write(struct.pack("<Q", 2**62))
    result = run_cli("generate", "-m", str(folder), "hi")
    assert first_error(result) == (
        f"error: corrupt safetensors file {folder}/model.safetensors: header length past the end of the file"
    )
    assert result.returncode == 5


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.mkdir(), "cannot read config file {p}: Is a directory\nhint: give a YAML file, not a folder"),
        (
            lambda p: p.write_bytes(b"\xff\xfemodel: x\n"),
            "cannot read config file {p}: not UTF-8 text (byte 0)\nhint: convert it, e.g. iconv -t UTF-8",
        ),
        (lambda p: p.write_text("- a\n- b\n"), "{p}: the top level must be a mapping of settings"),
    ],
    ids=["folder", "not-utf8", "a-list"],
)
def test_a_config_file_that_is_not_a_settings_file(tmp_path, make, message):
    path = tmp_path / "cfg.yaml"
    make(path)
    result = run_cli("config", "show", "--config", str(path))
    assert result.stderr.decode().startswith("error: " + message.format(p=path))  # a hint: there was none
    assert result.returncode == 3


def test_an_unreadable_user_config(tmp_path):
    user = tmp_path / "xdg-config" / "gptcli" / "config.yaml"
    user.parent.mkdir(parents=True)
    user.write_text("model: x\n")
    user.chmod(0)
    command = [*_without_file_permission_bypass(), sys.executable, "-m", "gptcli", "config", "show"]
    result = subprocess.run(command, capture_output=True, cwd=REPO, timeout=60)
    assert first_error(result) == f"error: cannot read config file {user}: Permission denied"
    assert result.returncode == 3


def test_a_saved_chat_whose_messages_are_not_a_list(isolated_home):
    chats = isolated_home / "data" / "chats"
    chats.mkdir(parents=True)
    (chats / "20260101-000000-abcd.json").write_text('{"messages": "nope"}')
    result = run_cli("chats", "show", "20260101")
    assert first_error(result) == f"error: {chats}/20260101-000000-abcd.json is not a saved gptcli conversation"
    assert result.returncode == 6


def test_chats_list_says_which_files_it_skipped(isolated_home):
    chats = isolated_home / "data" / "chats"
    chats.mkdir(parents=True)
    (chats / "20260101-000000-abcd.json").write_text("{bad")
    result = run_cli("chats", "list")
    assert result.returncode == 0
    assert lines_of(result)[0] == (
        f"warning: skipped cannot read {chats}/20260101-000000-abcd.json: "
        "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    )


def _run_folder(path: Path, metrics: str) -> Path:
    path.mkdir(parents=True)
    (path / "run.json").write_text('{"step": 3}')
    (path / "train_config.yaml").write_text("model: {n_layer: 1}\n")
    (path / "metrics.jsonl").write_text(metrics)
    return path


def test_runs_show_skips_a_metrics_line_cut_short_by_kill_9(tmp_path):
    run = _run_folder(tmp_path / "run", '{"step": 1, "loss": 2.5}\n{"step": 2, "lo')
    result = run_cli("runs", "show", str(run), "--json")
    assert result.returncode == 0, result.stderr.decode()
    shown = json.loads(result.stdout)
    assert shown["train_loss"] == 2.5 and shown["config"] == {"model": {"n_layer": 1}}


def test_runs_list_goes_past_a_damaged_run(tmp_path):
    good = _run_folder(tmp_path / "runs" / "good", '{"step": 1, "loss": 2.5}\n')
    bad = _run_folder(tmp_path / "runs" / "bad", "")
    (bad / "run.json").write_text("{bad")
    result = run_cli("runs", "list", str(tmp_path / "runs"), "--json")
    assert result.returncode == 0
    assert [row["run"] for row in json.loads(result.stdout)] == [str(good)]
    assert lines_of(result)[0].startswith(f"warning: skipped {bad}/run.json: cannot read it: ")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing", "{p} does not exist"),
        ("a-file", "{p} is not a folder"),
        ("empty", "{p} is not a training run (no run.json and train_config.yaml)"),
    ],
)
def test_runs_show_on_something_that_is_not_a_run(tmp_path, name, message):
    path = tmp_path / name
    if name == "a-file":
        path.write_text("x")
    elif name == "empty":
        path.mkdir()
    result = run_cli("runs", "show", str(path))
    assert first_error(result) == "error: " + message.format(p=path)
    assert result.returncode == 6


# ------------------------------------------------------------------ bad arguments


def test_bytes_that_are_not_utf8_in_the_prompt_and_in_system(tiny_models):
    model = str(tiny_models["llama"])
    bad = os.fsdecode(b"caf\xe9")
    result = run_cli("generate", "-m", model, bad)
    assert first_error(result) == "error: the prompt argument is not valid UTF-8 (at character 4)"
    assert result.returncode == 6
    result = run_cli("generate", "-m", model, "--system", bad, "hi")
    assert first_error(result) == "error: --system: system is not valid UTF-8 text"
    assert result.returncode == 3


@pytest.mark.parametrize("url", ["localhost:8080", "http://", "https:///v1"])
def test_a_url_that_is_not_http(url):
    result = run_cli("generate", "--url", url, "hi")
    assert first_error(result) == f"error: --url {url}: not an http:// or https:// URL with a host"
    assert result.returncode == 2


@pytest.mark.parametrize(
    "args",
    [["serve", "--port", "70000"], ["generate", "--batch", "x.jsonl", "-P", "0"], ["summarize", "-P", "0", "x.txt"]],
    ids=["port", "batch-parallel", "summarize-parallel"],
)
def test_numbers_out_of_range_are_usage_errors(args):
    result = run_cli(*args)
    assert result.returncode == 2
    first, hint = lines_of(result)
    assert first.startswith(f"error: Invalid value for '{args[-2] if args[0] == 'serve' else '--parallel'}'")
    assert hint == f"hint: see `gptcli {args[0]} -h`"


@pytest.mark.parametrize("argv", [[], ["models"], ["eval"]], ids=["gptcli", "models", "eval"])
def test_a_command_group_alone_prints_its_help(argv):
    """Its usage block is help, not an error: it stays Click's, whole (not one `error:` line)."""
    result = run_cli(*argv)
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert lines[0] == f"Usage: {' '.join(['gptcli', *argv])} [OPTIONS] COMMAND [ARGS]..."
    assert "Commands:" in lines and not any(line.startswith("error:") for line in lines)


def test_a_bad_kv_budget_and_an_unknown_training_key(tiny_models, tmp_path):
    (tmp_path / "in.txt").write_text("some text to train on\n" * 20)
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    batch = ["generate", "-m", str(tiny_models["llama"]), "--batch", str(tmp_path / "in.jsonl")]
    result = run_cli(*batch, "--kv-budget", "lots")
    assert first_error(result) == "error: --kv-budget 'lots' is neither a number of tokens nor a size"
    assert result.returncode == 3
    result = run_cli("train", "--data", str(tmp_path / "in.txt"), "--set", "optim.lrr=1", "--dry-run")
    assert first_error(result) == "error: --set: optim -> lrr: unknown key (did you mean 'lr'?)"
    assert result.returncode == 3


def test_a_training_seed_out_of_range(tmp_path):
    from gptcli.errors import ConfigError
    from gptcli.train.config import load_config

    (tmp_path / "in.txt").write_text("some text to train on\n" * 20)
    result = run_cli("train", "--data", str(tmp_path / "in.txt"), "--seed", "-1", "--dry-run")
    assert first_error(result) == "error: train.seed (--seed) must be in [0, 2**63), not -1"
    assert result.returncode == 3
    with pytest.raises(
        ConfigError, match=r"^train.seed \(--seed\) must be in \[0, 2\*\*63\), not 9223372036854775808$"
    ):
        load_config(flags={"train.seed": 2**63})
    with pytest.raises(ConfigError, match=r"not -3$"):
        load_config(sets=["train.seed=-3"])
    assert load_config(flags={"train.seed": 2**63 - 1}).train.seed == 2**63 - 1


# ------------------------------------------------------------------ outputs that cannot be written


def test_outputs_that_are_files_or_folders_where_the_other_is_needed(tiny_models, tmp_path):
    model = str(tiny_models["llama"])
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    result = run_cli("generate", "-m", model, "--batch", str(tmp_path / "in.jsonl"), "-o", str(tmp_path))
    assert first_error(result) == f"error: {tmp_path} is a folder"
    assert result.returncode == 6
    result = run_cli("export", model, "--output", str(a_file))
    assert first_error(result) == f"error: --output {a_file} is a file, not a folder"
    assert result.returncode == 6
    result = run_cli("train", "--data", str(a_file), "--out", str(a_file))
    assert first_error(result) == f"error: --out {a_file} is a file, not a folder"
    assert result.returncode == 6


def test_save_to_a_path_that_cannot_be_written_leaves_the_chat_going(tiny_models, tok, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    target = blocker / "chat.md"
    env = scripted(tok, "Still here.")
    result = run_cli("chat", "-m", str(tiny_models["llama"]), "-b", "scripted", input=f"/save {target}\nhi\n", env=env)
    assert result.returncode == 0
    assert lines_of(result)[0].startswith(f"error: cannot save to {target}: ")
    assert result.stdout.decode() == "Still here.\n"


def test_a_stdout_encoding_without_the_reply_s_characters(tiny_models, tok):
    env = {**scripted(tok, "Olé"), "PYTHONIOENCODING": "ascii"}
    result = run_cli("generate", "-m", str(tiny_models["llama"]), "-b", "scripted", "hi", env=env)
    assert first_error(result) == "error: cannot write to stdout: its encoding (ascii) cannot hold U+00E9"
    assert result.returncode == 1


def test_serve_on_a_port_that_is_taken(tiny_models):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "-m", str(tiny_models["llama"]), "--port", str(port), timeout=120)
    assert first_error(result) == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert result.returncode == 1


# ------------------------------------------------------------------ broken environments


def test_chat_with_stdin_closed_ends_quietly(tiny_models, tok):
    env = {**os.environ, **scripted(tok, "Hi")}
    command = ["bash", "-c", 'exec "$@" <&-', "bash", sys.executable, "-m", "gptcli"]
    command += ["chat", "-m", str(tiny_models["llama"]), "-b", "scripted"]
    result = subprocess.run(command, capture_output=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 0
    assert lines_of(result) == [] and result.stdout == b""


def test_a_working_folder_that_was_deleted(tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()
    result = shell(f'cd {gone} && rmdir {gone} && exec "$@"', "config", "show")
    assert first_error(result) == "error: the current folder no longer exists"
    assert result.returncode == 1


# ------------------------------------------------------------------ the third sweep (session 14)


def test_write_atomic_follows_a_link_and_writes_through_a_fifo(tmp_path):
    import threading

    from gptcli.atomicio import write_atomic

    target = tmp_path / "target.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_atomic(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    write_atomic(fifo, "through")
    reader.join(timeout=10)
    assert got == [b"through"] and fifo.is_fifo()
    with pytest.raises(IsADirectoryError) as caught:
        write_atomic(tmp_path, "x")
    assert caught.value.filename == str(tmp_path)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(NotADirectoryError) as caught:
        write_atomic(tmp_path / "a-file" / "sub.yaml", "x")
    assert caught.value.filename == str(tmp_path / "a-file" / "sub.yaml")


def test_a_write_refused_outside_gptcli_folders_names_the_fix(tmp_path):
    import errno

    from gptcli.paths import environment_error

    target = tmp_path / "out.md"  # the hint was missing: "error: .../out.md: Permission denied", and nothing more
    for code, hint in (
        (errno.EACCES, "check its permissions, or choose another path"),
        (errno.EROFS, "choose a path on a writable disk"),
        (errno.ENOSPC, "free some space, or choose a path on another disk"),
    ):
        error = environment_error(OSError(code, os.strerror(code), str(target)))
        assert error is not None and error.message == f"{target}: {os.strerror(code)}" and error.hint == hint
        assert error.exit_code == 1


@pytest.mark.skipif(not Path("/proc/version").is_file(), reason="no /proc here")
def test_a_results_file_under_proc_is_named_not_an_internal_error(tmp_path):
    """`generate --batch -o /proc/version` said "internal error: OSError: [Errno 22] Invalid argument" (exit 1)."""
    from gptcli.jsonl import open_results
    from gptcli.paths import environment_error

    with pytest.raises(OSError) as raised:
        open_results(Path("/proc/version"), resume=False)
    error = environment_error(raised.value)
    assert error is not None and error.exit_code == 1
    assert "/proc/version: " in error.message and "choose another path" in (error.hint or "")  # (EACCES unprivileged)


def test_a_thing_of_the_wrong_kind_in_gptcli_folders_is_named_with_the_fix(isolated_home):
    """A file named like the chats folder said "File exists" with a hint to make GPTCLI_HOME writable."""
    import errno

    from gptcli.paths import data_dir, environment_error

    chats = data_dir() / "chats"
    chats.parent.mkdir(parents=True)
    chats.write_text("not a folder")
    error = environment_error(FileExistsError(errno.EEXIST, "File exists", str(chats)))
    assert error is not None and error.message == f"cannot write {chats}: a file is there, where a folder should be"
    assert error.hint == "move it out of the way, or set GPTCLI_HOME to another folder" and error.exit_code == 1
    chats.unlink()
    (chats / "20240101-000000-dir0.json").mkdir(parents=True)  # a chat's file name taken by a folder
    error = environment_error(
        IsADirectoryError(errno.EISDIR, "Is a directory", str(chats / "20240101-000000-dir0.json"))
    )
    assert error is not None and error.message.endswith("dir0.json: it is a folder")
    assert error.hint == "move it out of the way, or set GPTCLI_HOME to another folder"


def test_a_file_of_gptcli_removed_while_it_was_read_is_not_a_folder_to_make_writable(isolated_home):
    """QA: `gptcli models rm` while another process loaded or exported that model said "cannot write
    .../config.json: No such file or directory" with a hint to make GPTCLI_HOME writable (exit 1): it was a read."""
    import errno

    from gptcli.paths import cache_dir, data_dir, environment_error

    config = cache_dir() / "models" / "smollm2-135m-instruct" / "config.json"
    error = environment_error(FileNotFoundError(errno.ENOENT, "No such file or directory", str(config)))
    assert error is not None and error.message == f"{config} was removed while gptcli used it"
    assert error.exit_code == 5 and "another process removed it" in error.hint
    chat = data_dir() / "chats" / "20240101-000000-gone.json"
    error = environment_error(FileNotFoundError(errno.ENOENT, "No such file or directory", str(chat)))
    assert error is not None and error.exit_code == 1 and error.message.endswith("was removed while gptcli used it")


def test_a_folder_above_gptcli_home_that_cannot_be_made_names_gptcli_home(tmp_path, monkeypatch):
    """QA: GPTCLI_HOME=/ro/nope/home (or HOME=/nonexistent) said "error: /ro/nope: Read-only file system / hint:
    choose a path on a writable disk": a path the user never chose, and no word of GPTCLI_HOME."""
    import errno

    from gptcli.paths import environment_error

    home = tmp_path / "ro" / "nope" / "home"
    monkeypatch.setenv("GPTCLI_HOME", str(home))
    error = environment_error(OSError(errno.EROFS, "Read-only file system", str(home.parent)))
    assert error is not None and error.message == f"cannot write {home.parent}: Read-only file system"
    assert error.hint == f"make {home} writable, or set GPTCLI_HOME to a writable folder"
    monkeypatch.delenv("GPTCLI_HOME")
    monkeypatch.setenv("HOME", "/nonexistent")
    for variable in ("XDG_CACHE_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(variable, raising=False)
    error = environment_error(PermissionError(errno.EACCES, "Permission denied", "/nonexistent"))
    assert error is not None and error.message == "cannot write /nonexistent: Permission denied"
    assert error.hint == "make /nonexistent writable, or set GPTCLI_HOME to a writable folder"
    monkeypatch.setenv("GPTCLI_HOME", str(home))  # a folder above it given where a file goes is the user's input
    error = environment_error(IsADirectoryError(errno.EISDIR, "Is a directory", str(tmp_path)))
    assert error is not None and error.hint == "give the path of a file (or move that folder away)"


def test_config_init_into_a_path_of_the_wrong_shape(tmp_path):
    (tmp_path / "a-file").write_text("x")
    result = run_cli("config", "init", str(tmp_path / "a-file" / "config.yaml"))
    blocker = tmp_path / "a-file"
    said = f"error: cannot write {blocker / 'config.yaml'}: {blocker} is a file, where a folder should be"
    assert first_error(result) == said
    assert result.returncode == 6


def test_a_batch_from_a_pipe_a_device_and_a_binary_file(tiny_models, tok, tmp_path):
    lines = '{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "there"}\n'
    args = ("generate", "-m", str(tiny_models["llama"]), "-b", "scripted", "-n", "2", "--batch")
    # A pipe (what <(cat file) gives): read once, so the progress total must not read it first.
    piped = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m gptcli \"$@\" <(printf %s '{lines}')", "_", *args],
        capture_output=True,
        env={**os.environ, **scripted(tok, "ok")},
        cwd=REPO,
        timeout=120,
    )
    assert piped.returncode == 0, piped.stderr.decode()
    assert [json.loads(line)["id"] for line in piped.stdout.decode().splitlines()] == ["a", "b"]
    for source in ("/dev/zero", str(tmp_path / "blob.bin")):
        (tmp_path / "blob.bin").write_bytes(b"PK\x03\x04\x00\x00" + bytes(range(256)) * 4)
        result = run_cli(*args, source, env=scripted(tok, "ok"), timeout=60)
        assert first_error(result) == "error: line 1 holds a NUL byte: this is binary data, not JSON Lines"
        assert result.returncode == 6


def test_resume_refuses_a_file_that_does_not_hold_results(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    notes = tmp_path / "notes.txt"
    notes.write_text("l1\nimportant last line")
    result = run_cli("generate", "--batch", str(tmp_path / "in.jsonl"), "-o", str(notes), "--resume")
    assert first_error(result) == f"error: {notes} does not hold results (its first line is not a result)"
    assert result.returncode == 6 and notes.read_text() == "l1\nimportant last line"


def test_text_that_is_not_text_is_an_input_error_and_a_batch_lines_own(tiny_models, tok, tmp_path):
    model = str(tiny_models["llama"])
    batch = tmp_path / "in.jsonl"
    batch.write_text('{"id": "a", "prompt": "\\ud800 x"}\n{"id": "b", "prompt": "fine"}\n')
    result = run_cli(
        "generate", "-m", model, "-b", "scripted", "-n", "2", "--batch", str(batch), env=scripted(tok, "ok")
    )
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert result.returncode == 0, result.stderr.decode()
    assert "U+D800, a lone surrogate" in records[0]["error"]["message"] and records[1]["text"]
    assert [record["id"] for record in records] == ["a", "b"]  # QA: it was "1", the line's number
    batch.write_text('{"id": "x", "prompt": "\\ud800 x"}\n{"id": "1", "prompt": "fine"}\n')  # "1" is no duplicate
    result = run_cli(
        "generate", "-m", model, "-b", "scripted", "-n", "2", "--batch", str(batch), env=scripted(tok, "ok")
    )
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [record["id"] for record in records] == ["x", "1"] and records[1]["text"], result.stderr.decode()
    # An id or a tool's name (which an error message quotes) that holds one ended the run: no result could hold it.
    batch.write_text(
        '{"id": "a\\udc00", "prompt": "x"}\n'
        '{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": '
        '{"name": "f\\ud800"}}, {"type": "function", "function": {"name": "f\\ud800"}}]}\n'
        '{"id": "b", "prompt": "fine"}\n'
    )
    result = run_cli(
        "generate", "-m", model, "-b", "scripted", "-n", "2", "--batch", str(batch), env=scripted(tok, "ok")
    )
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert result.returncode == 0, result.stderr.decode()
    assert records[0]["error"]["message"] == "`id` holds U+DC00, a lone surrogate that is not text"
    assert records[1]["error"]["message"] == "`tools.1.function.name` holds U+D800, a lone surrogate that is not text"
    assert [record["id"] for record in records] == ["1", "2", "b"] and records[2]["text"]
    result = subprocess.run(
        [sys.executable, "-m", "gptcli", "generate", "-m", model, "--to", os.fsdecode(b"\xff"), "hi"],
        capture_output=True,
        env={**os.environ, **scripted(tok, "ok"), "GPTCLI_BACKEND": "scripted"},
        cwd=REPO,
        timeout=120,
    )
    assert first_error(result) == "error: the text holds U+DCFF, a lone surrogate that is not text"
    assert result.returncode == 6


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://[::1", "error: --url http://[::1: not a valid URL (Invalid IPv6 URL)"),
        ("http://127.0.0.1:abc/v1", "error: --url http://127.0.0.1:abc/v1: not a valid URL"),
        ("http://a\nb/v1", "error: --url 'http://a\\nb/v1': a URL has no spaces or control characters"),
        ("http://u:secret@127.0.0.1:9/v1", "error: --url: credentials in the URL would show in every message"),
    ],
)
def test_urls_that_cannot_be_used_are_usage_errors(url, message):
    result = run_cli("generate", "--url", url, "hi")
    assert first_error(result).startswith(message) and "secret" not in result.stderr.decode()
    assert result.returncode == 2


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("extra", [["--json"], []], ids=["json", "text"])
def test_sigterm_keeps_what_was_made_as_ctrl_c_does_and_exits_143(tiny_models, tok, extra, stop):
    """SIGHUP (a closed terminal, a dropped ssh session) killed every command but train as kill -9 does: the
    `--json` object, summarize's partials, a batch's held results were lost. It now stops them as SIGTERM does."""
    import time

    text = "the leaves fall and the wind carries them over the hill " * 4
    env = {**os.environ, **scripted(tok, text), "GPTCLI_TEST_DELAY": "0.05"}
    args = ["generate", "-m", str(tiny_models["llama"]), "-b", "scripted", "-n", "200", "hi", *extra]
    process = subprocess.Popen(
        [sys.executable, "-m", "gptcli", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    time.sleep(4)  # loaded, and some tokens in
    process.send_signal(getattr(signal, stop))
    out, err = process.communicate(timeout=60)
    assert process.returncode == 143, err.decode()
    assert b"Traceback" not in err and err.decode().rstrip().endswith("interrupted")
    printed = json.loads(out)["text"] if extra else out.decode()
    assert printed.strip() and text.startswith(printed.strip()) and len(printed) < len(text)
    if extra:
        assert json.loads(out)["finish_reason"] == "interrupted"


def test_a_command_started_with_nohup_outlives_the_terminal_as_asked(tiny_models, tok):
    """SIGHUP stops a command as SIGTERM does, but one started with it ignored (`nohup gptcli ... &`: to go on
    after logout) keeps it ignored, as nohup asks."""
    import time

    text = "the leaves fall and the wind carries them over the hill " * 4
    env = {**os.environ, **scripted(tok, text), "GPTCLI_TEST_DELAY": "0.05"}
    args = ["generate", "-m", str(tiny_models["llama"]), "-b", "scripted", "-n", "200", "hi", "--json"]
    process = subprocess.Popen(
        [sys.executable, "-m", "gptcli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # what nohup does before it runs gptcli
    )
    time.sleep(4)  # loaded, and some tokens in (as in the test above, whose SIGTERM cuts the text short)
    process.send_signal(signal.SIGHUP)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err.decode()
    assert json.loads(out)["text"] == text and json.loads(out)["finish_reason"] == "stop"


def test_options_and_environment_that_were_ignored_or_crashed(tmp_path):
    result = run_cli("generate", "hi", "--kv-budget", "lots")
    assert first_error(result) == "error: --output, --resume and --kv-budget go with --batch"
    assert result.returncode == 2
    result = run_cli("serve", "--grace", "nan")
    assert first_error(result) == "error: --grace must be a number of seconds, not nan" and result.returncode == 2
    result = run_cli("generate", "hi", "-b", "x", env={"GPTCLI_BACKEND_PATHS": "x=os:path"})
    message = "error: backend 'x' (GPTCLI_BACKEND_PATHS): os:path is not a backend class (no load, unavailable_reason)"
    assert first_error(result) == message and result.returncode == 4
    hint = "hint: check GPTCLI_BACKEND_PATHS (name=module:Class, its module importable)"
    assert hint in result.stderr.decode()  # QA: "reinstall or remove the plugin", of nothing installed
    (tmp_path / "a-file").write_text("")
    home = tmp_path / "a-file" / "home"
    result = run_cli("generate", "hi", "-n", "2", env={"GPTCLI_HOME": str(home)})
    assert first_error(result).startswith(f"error: cannot write {home}") and result.returncode == 1
    assert "hint: move it out of the way, or set GPTCLI_HOME to another folder" in result.stderr.decode()  # a-file


def test_batch_and_summarize_check_their_paths_and_budget_before_loading(tiny_models, tok, tmp_path):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    missing = str(tmp_path / "no-such-model")  # never reached: the checks come first
    out = tmp_path / "a-file" / "o.jsonl"
    result = run_cli("generate", "-m", missing, "--batch", str(tmp_path / "in.jsonl"), "-o", str(out))
    assert (
        first_error(result) == f"error: cannot write {out}: {out.parent} is a file, where a folder should be"
        and result.returncode == 6
    )
    result = run_cli("summarize", "-m", missing, "--kv-budget", "lots", str(tmp_path / "in.jsonl"))
    assert first_error(result) == "error: --kv-budget 'lots' is neither a number of tokens nor a size"
    if Path("/dev/full").exists():  # a full disk under the results: the file is named
        args = ("generate", "-m", str(tiny_models["llama"]), "-b", "scripted", "-n", "2")
        result = run_cli(*args, "--batch", str(tmp_path / "in.jsonl"), "-o", "/dev/full", env=scripted(tok, "ok"))
        assert first_error(result) == "error: /dev/full: No space left on device" and result.returncode == 1
        hint = "hint: free some space, then continue with --resume -o /dev/full: the results written so far are kept"
        assert hint in result.stderr.decode().splitlines()


def test_a_second_sigterm_is_not_raised_while_the_first_is_handled():
    """QA: two kills 2-100 ms apart lost `generate --json`'s object (the second cut the first one's printing), or
    showed 'Exception ignored in atexit callback ... Terminated' (it landed in the interpreter's shutdown)."""
    from gptcli.cli import app
    from gptcli.errors import Terminated

    Terminated.seen = False
    try:
        with pytest.raises(Terminated):
            app._on_sigterm(signal.SIGTERM, None)
        try:
            app._on_sigterm(signal.SIGTERM, None)
        except Terminated:
            pytest.fail("the second SIGTERM raised again")  # (a KeyboardInterrupt would end pytest itself)
    finally:
        Terminated.seen = False


def test_a_stop_while_the_interpreter_shuts_down_does_not_kill_the_process():
    """QA: a second SIGTERM 50-400 ms after the first (the output already written) killed the process by the
    signal (returncode -15 to a supervisor, not 143): the interpreter's shutdown puts Python handlers back to the
    default, the no-op one included. SIG_IGN it leaves alone. Here the stop comes as late as it can: from a
    module global's finalizer."""
    code = (
        "import os, signal, sys, time\n"
        "from gptcli.errors import ignore_stops\n"
        "class Late:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGHUP); time.sleep(0.2)\n"
        "late = Late()\n"
        "ignore_stops({})\n"
        "sys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for keyword, code_seen in (("for_good=True", 3), ("", -signal.SIGTERM)):  # the second: the mechanism, shown
        result = subprocess.run([sys.executable, "-c", code.format(keyword)], env=env, capture_output=True)
        assert result.returncode == code_seen, result.stderr.decode()
        assert b"Traceback" not in result.stderr


def test_ctrl_c_while_gptcli_is_imported_exits_130_without_a_traceback():
    """QA: Ctrl-C in the first few hundred ms (typer and gptcli being imported) printed a KeyboardInterrupt
    traceback."""
    code = (
        "import sys\n"
        "class Interrupting:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'gptcli.cli.app':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupting())\n"
        "from gptcli.__main__ import main\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code, "--version"], cwd=REPO, capture_output=True, timeout=60)
    assert result.returncode == 130 and b"Traceback" not in result.stderr, result.stderr.decode()


def test_a_file_size_limit_is_no_room_named_with_its_fix_not_an_internal_error(tiny_models, tok, tmp_path):
    """QA: `ulimit -f` (or FAT's 4 GiB) under a batch's results was "internal error: OSError: [Errno 27] File too
    large", where a full disk names the file and how to go on (--resume)."""
    import resource

    lines = "".join(json.dumps({"id": str(i), "prompt": "hi"}) + "\n" for i in range(40))
    (tmp_path / "in.jsonl").write_text(lines)
    out = tmp_path / "out.jsonl"
    args = ["-m", str(tiny_models["llama"]), "-b", "scripted", "-n", "2", "--batch", str(tmp_path / "in.jsonl")]
    result = subprocess.run(
        [sys.executable, "-m", "gptcli", "generate", *args, "-o", str(out)],
        env={**os.environ, **scripted(tok, "ok")},
        capture_output=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024)),
        timeout=120,
    )
    assert first_error(result) == f"error: {out}: File too large" and result.returncode == 1
    hint = f"hint: raise the file-size limit (`ulimit -f`), then continue with --resume -o {out}"
    assert hint in result.stderr.decode()
    assert 0 < len(out.read_bytes()) <= 1024
