"""`gptcli generate --batch`: the real program on a tiny model, its output file, misuse, Ctrl-C and --resume."""

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, run_cli

SCRIPTED = {"GPTCLI_BACKEND_PATHS": "scripted=tests.scripted:ScriptedBackend", "GPTCLI_TEST_CONTEXT": "4096"}


def test_batch_file_results_match_single_generations(tiny_models, tmp_path):
    model = str(tiny_models["llama"])
    # More prompts than --parallel: later ones start as earlier ones finish (their results once got mixed up).
    prompts = ["Once upon a time", "The capital of France is", "def add(a, b):", "A haiku:"]
    batch = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": f"p{i}", "prompt": p}) for i, p in enumerate(prompts)]
    lines.insert(1, "{oops")
    batch.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["-m", model, "--temperature", "0", "-n", "12", "--parallel", "2"]
    result = run_cli("generate", "--batch", str(batch), "-o", str(out), *args)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b""  # with -o, nothing but the file
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["p0", "2", "p1", "p2", "p3"]
    assert "not valid JSON" in records[1]["error"]["message"]
    assert "4 done, 1 failed" in result.stderr.decode()
    for i, prompt in enumerate(prompts):
        alone = json.loads(run_cli("generate", prompt, *args[:-2], "--json").stdout)
        assert records[[0, 2, 3, 4][i]]["text"] == alone["text"], prompt
        assert records[[0, 2, 3, 4][i]]["finish_reason"] == alone["finish_reason"]


def test_a_batch_whose_every_line_failed_exits_6_with_its_error_results(tiny_models, tmp_path):
    """One line that cannot run fails as `gptcli generate` does with that prompt (exit 6), its result written;
    one line that ran is enough for exit 0."""
    batch, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    batch.write_text('{oops\n{"id": "b", "prompt": "x", "temperature": -1}\n')
    args = ["-m", str(tiny_models["llama"]), "-n", "2", "--batch", str(batch), "-o", str(out)]
    result = run_cli("generate", *args)
    assert result.returncode == 6, result.stderr.decode()
    err = result.stderr.decode()
    assert "0 done, 2 failed" in err
    assert f"error: every line that ran failed (2): each error is its result in {out}" in err
    assert [("error" in json.loads(line)) for line in out.read_text().splitlines()] == [True, True]
    batch.write_text('{oops\n{"id": "c", "prompt": "x"}\n')
    out.unlink()
    assert run_cli("generate", *args).returncode == 0


def test_batch_misuse_is_a_usage_error(tiny_models, tmp_path):
    batch = tmp_path / "in.jsonl"
    batch.write_text('{"prompt": "hi"}\n')
    no_output = run_cli("generate", "--batch", str(batch), "--resume", "-m", str(tiny_models["llama"]))
    assert no_output.returncode == 2 and "--resume needs --output" in no_output.stderr.decode()
    with_prompt = run_cli("generate", "hello", "--batch", str(batch))
    assert with_prompt.returncode == 2 and "--batch takes its prompts from the file" in with_prompt.stderr.decode()
    for flag in (["--raw"], ["--json"], ["--stats"], ["--var", "x=y"]):  # were silently ignored
        ignored = run_cli("generate", "--batch", str(batch), *flag, "-m", str(tiny_models["llama"]))
        err = ignored.stderr.decode()
        assert ignored.returncode == 2 and ("with --batch" in err or "from the file" in err), (flag, err)
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "1", "text": "x"}\n')
    exists = run_cli("generate", "--batch", str(batch), "-o", str(out), "-m", str(tiny_models["llama"]))
    assert exists.returncode == 2 and "already holds results" in exists.stderr.decode()
    # The input as its own output: every line would have counted as done (its "id"), so nothing ran.
    itself = run_cli("generate", "--batch", str(batch), "-o", str(batch), "--resume", "-m", str(tiny_models["llama"]))
    assert itself.returncode == 2 and "is the --batch file itself" in itself.stderr.decode()
    missing = run_cli("generate", "--batch", str(tmp_path / "nope.jsonl"), "-o", str(out), "--resume")
    assert missing.returncode == 6 and "cannot read" in missing.stderr.decode()
    assert "Traceback" not in (no_output.stderr + with_prompt.stderr + exists.stderr).decode()


@pytest.mark.parametrize("parallel", [[], ["--parallel", "1"]])  # 1: r2 is not read yet when Ctrl-C comes
def test_ctrl_c_keeps_finished_results_and_resume_finishes(tiny_models, tmp_path, parallel):
    batch = tmp_path / "in.jsonl"
    batch.write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": "hi", "max_tokens": 3 + 40 * i}) + "\n" for i in range(3))
    )
    out = tmp_path / "out.jsonl"
    env = {**os.environ, **SCRIPTED, "GPTCLI_TEST_SCRIPT": json.dumps([7] * 2000), "GPTCLI_TEST_DELAY": "0.02"}
    args = ["generate", "--batch", str(batch), "-o", str(out), "-m", str(tiny_models["llama"]), "-b", "scripted"]
    args += parallel
    proc = subprocess.Popen([sys.executable, "-m", "gptcli", *args], env=env, cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (out.exists() and out.read_text().count("\n") >= 1):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert "rerun with --resume" in err.decode() and "Traceback" not in err.decode()
    first = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert first[0] == "r0" and "r2" not in first
    again = subprocess.run([sys.executable, "-m", "gptcli", *args, "--resume"], env=env, cwd=REPO, capture_output=True)
    assert again.returncode == 0, again.stderr.decode()
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == ["r0", "r1", "r2"] and len(ids) == 3


def test_a_line_from_a_quiet_pipe_is_written_at_once_and_ctrl_c_ends_the_wait(tiny_models):
    """`(echo line; sleep 20; echo line) | gptcli generate --batch -`: the first result waited for the second
    line. Now it is written as soon as it is done; Ctrl-C while the pipe is quiet writes what finished and
    exits 130 (not an abort at exit: stdin's reader, locked by the thread still waiting in a read)."""
    args = ["generate", "--batch", "-", "-m", str(tiny_models["llama"]), "-b", "scripted"]
    env = {**os.environ, **SCRIPTED, "GPTCLI_TEST_SCRIPT": json.dumps([7] * 50)}
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    proc = subprocess.Popen([sys.executable, "-m", "gptcli", *args], env=env, cwd=REPO, **pipes)  # type: ignore[call-overload]
    proc.stdin.write(json.dumps({"id": "a", "prompt": "hi", "max_tokens": 3}).encode() + b"\n")
    proc.stdin.flush()  # and no other line, nor the end of the input
    readable, _, _ = select.select([proc.stdout], [], [], 60)
    first = proc.stdout.readline() if readable else b""
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    proc.stdin.close()
    assert first and json.loads(first)["id"] == "a", err
    assert proc.returncode == 130 and "1 done" in err and "interrupted" in err, err
    assert "Traceback" not in err and "Fatal" not in err and proc.stdout.read() == b""


def test_an_over_long_line_from_a_pipe_gets_its_error_before_the_line_ends(tiny_models):
    """`tr '\\0' a </dev/zero | gptcli generate --batch -` read on for 31 minutes without a word: the error result
    waited for the line's newline, which its writer never sent."""
    args = ["generate", "--batch", "-", "-m", str(tiny_models["llama"]), "-n", "1"]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    proc = subprocess.Popen([sys.executable, "-m", "gptcli", *args], cwd=REPO, **pipes)  # type: ignore[call-overload]
    try:
        proc.stdin.write(b'{"prompt": "' + b"a" * (5 * 1024 * 1024))  # over the 4 MiB a line, and no newline
        proc.stdin.flush()
        readable, _, _ = select.select([proc.stdout], [], [], 60)
        first = json.loads(proc.stdout.readline()) if readable else {}
        assert first.get("id") == "1" and "over 4 MiB" in first["error"]["message"], first
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_resume_into_a_pipe_is_refused_at_once(tiny_models, tmp_path):
    batch = tmp_path / "in.jsonl"
    batch.write_text(json.dumps({"prompt": "hi"}) + "\n")
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    result = run_cli("generate", "--batch", str(batch), "-o", str(fifo), "--resume", "-m", str(tiny_models["llama"]),
                     timeout=60)  # fmt: skip  # was: blocked forever reading the pipe back
    assert result.returncode == 6 and "must be a regular file, not a pipe" in result.stderr.decode()


def test_batch_from_a_closed_stdin_runs_no_line(tiny_models):
    """`--batch -` with stdin closed (`<&-`) was an internal error ('NoneType' object has no attribute 'buffer')."""
    args = [sys.executable, "-m", "gptcli", "generate", "--batch", "-", "-m", str(tiny_models["llama"])]
    result = subprocess.run(args, env={**os.environ, **SCRIPTED}, cwd=REPO, capture_output=True, timeout=120,
                            stdin=None, preexec_fn=lambda: os.close(0))  # fmt: skip
    assert result.returncode == 6, result.stderr.decode()  # as an empty file: below
    assert result.stdout == b"" and "error: stdin holds no requests" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


def test_an_empty_batch_is_an_input_error_before_the_model_loads(tmp_path):
    """It printed "0 done" and exited 0: a wrong path, or a producer that wrote nothing, passed as success."""
    batch = tmp_path / "in.jsonl"
    for text in ("", "\n  \n\t\n"):
        batch.write_text(text)
        # A model that does not exist: the batch's error comes first, so no model was loaded for nothing.
        result = run_cli("generate", "--batch", str(batch), "-m", str(tmp_path / "no-model"), timeout=60)
        err = result.stderr.decode()
        assert result.returncode == 6 and f"error: {batch} holds no requests" in err, err
        assert '{"prompt": "Hello"}' in err and "Traceback" not in err


def test_a_requests_file_as_the_output_is_never_taken_for_results(tiny_models, tmp_path):
    """A copy of the input (or the input on stdin) as --output: its lines have ids, so --resume counted every
    line as done, ran nothing and exited 0; another requests file got results appended to it."""
    batch = tmp_path / "in.jsonl"
    requests = "".join(json.dumps({"id": f"q{i}", "prompt": "hi"}) + "\n" for i in range(3))
    batch.write_text(requests)
    copy = tmp_path / "copy.jsonl"
    copy.write_text(requests)
    model = ["-m", str(tiny_models["llama"])]
    resumed = run_cli("generate", "--batch", str(batch), "-o", str(copy), "--resume", *model)
    assert resumed.returncode == 6, resumed.stderr.decode()
    assert f"error: {copy} does not hold results" in resumed.stderr.decode()
    from_stdin = run_cli("generate", "--batch", "-", "-o", str(batch), "--resume", *model, input=requests)
    assert from_stdin.returncode == 6 and "does not hold results" in from_stdin.stderr.decode()
    fresh = run_cli("generate", "--batch", str(batch), "-o", str(copy), *model)  # no hint to remove a requests file
    assert fresh.returncode == 2 and fresh.stderr.decode().splitlines() == [
        f"error: {copy} is not empty and does not hold results",
        "hint: give --output a new file",
    ]
    assert batch.read_text() == copy.read_text() == requests


def test_resume_reads_a_results_file_an_editor_saved_with_a_byte_order_mark(tiny_models, tmp_path):
    """Its first line was 'not a result' (exit 6), though the lines after it were read as results."""
    batch = tmp_path / "in.jsonl"
    batch.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "done"}\r\n')
    result = run_cli("generate", "--batch", str(batch), "-o", str(out), "--resume", "-m", str(tiny_models["llama"]))
    assert result.returncode == 0, result.stderr.decode()
    assert "0 done, 0 failed, 1 skipped" in result.stderr.decode()
    out.write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "done"}')  # its newline lost too: kept, not cut off
    result = run_cli("generate", "--batch", str(batch), "-o", str(out), "--resume", "-m", str(tiny_models["llama"]))
    assert "0 done, 0 failed, 1 skipped" in result.stderr.decode()
    assert out.read_bytes() == b'\xef\xbb\xbf{"id": "a", "text": "done"}\n'


def test_stop_strings_are_at_most_16_everywhere_as_in_the_server(tiny_models, tmp_path):
    """Each stop string is looked for after every token: a batch line of 300,000 (3.5 MB, under the 4 MiB line
    limit) ran at 0.5 s a token; `--stop` and a config file took any number too. The server refused them already."""
    many = [f"zq{i:05d}" for i in range(17)]
    lines = tmp_path / "lines.jsonl"
    lines.write_text(
        json.dumps({"id": "many", "prompt": "hi", "max_tokens": 2, "stop": many})
        + "\n"
        + json.dumps({"id": "ok", "prompt": "hi", "max_tokens": 2, "stop": many[:16]})
        + "\n"
    )
    run = run_cli("generate", "--batch", str(lines), "-m", str(tiny_models["llama"]))
    results = {r["id"]: r for r in map(json.loads, run.stdout.decode().splitlines())}
    assert run.returncode == 0 and "at most 16 strings" in results["many"]["error"]["message"]
    assert results["ok"]["usage"]["completion_tokens"] >= 1
    flags = [arg for stop in many for arg in ("--stop", stop)]
    flagged = run_cli("generate", "hi", "-m", str(tiny_models["llama"]), *flags)
    assert flagged.returncode == 3 and "sampling.stop must be at most 16 strings" in flagged.stderr.decode()


def test_a_lock_whose_pid_cannot_be_written_still_holds(tmp_path, monkeypatch):
    """QA: on a full disk the lock's pid write failed first, and a batch's --resume or a train said "a write failed:
    No space left on device (set GPTCLI_DEBUG=1 to see where)" instead of naming its results file or run."""
    import errno

    from gptcli.locks import owner_lock

    def no_room(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def busy(pid: str) -> AssertionError:
        return AssertionError(f"held by {pid!r}")

    lock = tmp_path / ".out.jsonl.gptcli-lock"
    with monkeypatch.context() as patched:
        patched.setattr(os, "write", no_room)
        # held, and a second holder is still refused
        with owner_lock(lock, busy), pytest.raises(AssertionError, match="held by"), owner_lock(lock, busy):
            pass
    assert not lock.exists()


def test_a_results_file_another_run_is_writing_is_refused_naming_its_pid(tiny_models, tmp_path):
    """QA: two runs on one -o started together, or a --resume while the first still ran, passed the "already
    holds results" check (nothing was written yet) and each wrote every result: every id twice in the file. The
    run that writes a results file now holds its lock (as `train` holds a run folder's)."""
    from gptcli.errors import InputError
    from gptcli.jsonl import results_lock_path
    from gptcli.locks import owner_lock

    batch, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    batch.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n')
    args = ["generate", "-m", str(tiny_models["llama"]), "-n", "2", "--batch", str(batch), "-o", str(out)]

    def never(pid: str) -> InputError:
        raise AssertionError("the lock was free")

    with owner_lock(results_lock_path(out), never):  # a run writing it (this process stands for it)
        for extra in ([], ["--resume"]):
            result = run_cli(*args, *extra)
            lines = result.stderr.decode().strip().splitlines()
            assert result.returncode == 6 and lines[0] == (
                f"error: {out} is being written by another gptcli process (pid {os.getpid()})"
            ), result.stderr.decode()
            assert lines[1] == "hint: wait for it to finish (or stop it), then --resume; or write to another file"
    assert not out.exists()
    assert run_cli(*args).returncode == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no lock file left behind
