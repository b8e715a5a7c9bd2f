"""Inputs without bounds: every reader of user text has a size limit (or streams) and fails fast, in little memory.

Each case runs the real program in a subprocess and checks the exact first error line, the exit code, that
no traceback is printed and, for the size limits, that the peak memory stays under 1 GB.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, run_cli

GB_IN_KIB = 1024 * 1024
MISSING_MODEL = "/nonexistent/model-folder"  # the input error must come before any model is looked for
SCRIPTED = {"GPTCLI_BACKEND_PATHS": "scripted=tests.scripted:ScriptedBackend", "GPTCLI_TEST_SCRIPT": "[]"}

# Runs gptcli as its only child, so RUSAGE_CHILDREN is the peak memory of that one run. The child may map
# at most 4 GiB, so that a reader without bounds fails here instead of taking the machine's memory.
MEASURED = """
import resource, subprocess, sys
def bounded():
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
code = subprocess.call([sys.executable, "-m", "gptcli", *sys.argv[2:]], preexec_fn=bounded)
with open(sys.argv[1], "w") as out:
    out.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def run_measured(tmp_path: Path, *args: str, stdin: Path | None = None, timeout: float = 90):
    """(returncode, stderr lines, peak RSS in KiB); the whole process group is killed on a timeout."""
    rss_file = tmp_path / "maxrss"
    with open(stdin or os.devnull, "rb") as source:
        child = subprocess.Popen(
            [sys.executable, "-c", MEASURED, str(rss_file), *args],
            stdin=source,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            start_new_session=True,
        )
        try:
            _, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            pytest.fail(f"gptcli {' '.join(args)} ran past {timeout} s (it should fail fast)")
    return child.returncode, err.decode(errors="replace").splitlines(), int(rss_file.read_text())


def check_fails(tmp_path: Path, args: list[str], code: int, first_line: str, stdin: Path | None = None) -> list[str]:
    returncode, lines, peak_kib = run_measured(tmp_path, *args, stdin=stdin)
    text = "\n".join(lines)
    assert "Traceback" not in text, text
    assert lines and lines[0] == first_line, text
    assert returncode == code, text
    assert peak_kib < GB_IN_KIB, f"peak memory {peak_kib / 1024:.0f} MiB"
    return lines


def big_text_file(path: Path, mib: int) -> Path:
    line = ("All work and no play makes Jack a dull boy. " * 20 + "\n").encode()
    with path.open("wb") as out:
        block = line * ((1 << 20) // len(line) + 1)
        for _ in range(mib + 1):
            out.write(block)
    return path


# Old code: read /dev/zero until killed (a timeout here), /dev/urandom past 18 GB.
@pytest.mark.parametrize(
    ("args", "device"),
    [
        (["generate", "-m", MISSING_MODEL, "-f", "/dev/zero"], "/dev/zero"),
        (["eval", "perplexity", "/dev/urandom", "-m", MISSING_MODEL], "/dev/urandom"),
    ],
)
def test_special_files_fail_fast(tmp_path, args, device):
    check_fails(tmp_path, args, 6, f"error: {device} looks like a binary file (it has NUL bytes)")


# Old code: read all 20 MiB, then failed on the model (exit 5).
def test_a_prompt_on_stdin_over_the_limit(tmp_path):
    stdin = big_text_file(tmp_path / "prompt.txt", 20)
    lines = check_fails(
        tmp_path,
        ["generate", "-m", MISSING_MODEL],
        6,
        "error: standard input: over the 16 MiB limit for a prompt",
        stdin=stdin,
    )
    assert lines[1] == "hint: split it, or use `gptcli summarize` for a long document"


# Old code: read all of it, then failed on the model (exit 5).
def test_a_document_to_summarize_over_the_limit(tmp_path):
    document = big_text_file(tmp_path / "book.txt", 65)
    lines = check_fails(
        tmp_path,
        ["summarize", str(document), "-m", MISSING_MODEL],
        6,
        f"error: {document}: over the 64 MiB limit for a document to summarize",
    )
    assert lines[1] == "hint: split it and summarize the parts"


def saved_chat(home: Path, message_bytes: int) -> Path:
    folder = home / "data" / "chats"
    folder.mkdir(parents=True)
    path = folder / "20260101-000000-abcd.json"
    messages = [{"role": "user", "content": "a" * message_bytes}, {"role": "assistant", "content": "ok"}]
    path.write_text(json.dumps({"format": 1, "id": path.stem, "messages": messages}))
    return path


# Old code: parsed the whole file, then failed on the model (exit 5).
def test_resuming_a_chat_file_with_a_50_mb_message(tmp_path, isolated_home):
    path = saved_chat(isolated_home, 50_000_000)
    check_fails(
        tmp_path,
        ["chat", "--resume", path.stem, "-m", MISSING_MODEL],
        6,
        f"error: {path}: over the 16 MiB limit for a chat file",
    )


# Old code: no per-message cap (exit 5 on the model).
def test_resuming_a_chat_with_one_message_over_the_limit(tmp_path, isolated_home):
    path = saved_chat(isolated_home, 2 * 1024 * 1024)
    check_fails(
        tmp_path,
        ["chat", "--resume", path.stem, "-m", MISSING_MODEL],
        6,
        f"error: {path}: message 1: over the 1 MiB limit for one chat message",
    )


# Old code: /load took the 50 MB message in (and hung for minutes on it), no error.
def test_loading_a_chat_file_with_a_50_mb_message_in_a_piped_chat(tiny_models, tmp_path, isolated_home):
    path = saved_chat(isolated_home, 50_000_000)
    big = tmp_path / "big.json"
    path.rename(big)
    result = run_cli(
        "chat", "-m", str(tiny_models["llama"]), "-b", "scripted", input=f"/load {big}\n", env=SCRIPTED, timeout=60
    )
    err = result.stderr.decode()
    assert f"error: {big}: over the 16 MiB limit for a chat file" in err.splitlines(), err
    assert result.returncode == 0 and "Traceback" not in err  # the chat goes on after a bad command


# Old code: `{input!r}` and the spec were accepted (exit 5 on the model, after building a 200 MB prompt);
# `{input.x}` and `{input[0]}` failed with another message ("never uses {input}").
@pytest.mark.parametrize("placeholder", ["{input:>200000000}", "{input!r}", "{input.x}", "{input[0]}"])
def test_template_placeholders_are_names_only(tmp_path, placeholder):
    folder = Path(os.environ["XDG_CONFIG_HOME"]) / "gptcli" / "templates"
    folder.mkdir(parents=True)
    template = folder / "spec.yaml"
    template.write_text(json.dumps({"user": f"Say: {placeholder}"}))
    result = run_cli("generate", "--template", "spec", "hello", "-m", MISSING_MODEL)
    lines = result.stderr.decode().splitlines()
    assert lines[0] == f"error: {template}: invalid placeholder {placeholder}: placeholders are plain names"
    assert result.returncode == 3 and "Traceback" not in result.stderr.decode()


# "Billion laughs": each anchor holds nine aliases of the one before, 9**9 strings once written out.
BOMB = (
    "["
    + ", ".join(
        f"&{name} [{', '.join([f'*{prev}' if prev else 'lol'] * 9)}]"
        for name, prev in zip("abcdefghi", ["", *"abcdefgh"], strict=True)
    )
    + "]"
)


# Old code: safe_load shares the aliased lists, then the settings loader walked them out (out of memory).
def test_a_config_with_a_yaml_alias_bomb(tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(f"sampling:\n  stop: {BOMB}\n")
    check_fails(
        tmp_path,
        ["generate", "hello", "-m", MISSING_MODEL, "--config", str(config)],
        3,
        f"error: {config}: its YAML aliases expand to over 1,000,000 values",
    )


# Old code: parsed 2 MiB of comments into nothing, then failed on the model (exit 5).
def test_a_config_file_over_the_limit(tmp_path):
    config = tmp_path / "huge.yaml"
    config.write_text("# a comment line that goes on and on\n" * 60_000)
    check_fails(
        tmp_path,
        ["generate", "hello", "-m", MISSING_MODEL, "--config", str(config)],
        6,
        f"error: {config}: over the 1 MiB limit for a config or template file",
    )


def test_a_recursive_yaml_alias_is_a_config_error(tmp_path):
    from gptcli.errors import ConfigError
    from gptcli.textio import read_yaml

    config = tmp_path / "loop.yaml"
    config.write_text("sampling:\n  stop: &a [*a]\n")
    with pytest.raises(ConfigError, match="a YAML alias refers to a value that contains it"):
        read_yaml(config)
    config.write_text("base: &b {temperature: 0.5}\nsampling: *b\n")  # an ordinary alias still works
    assert read_yaml(config)["sampling"] == {"temperature": 0.5}


# Old code: read every corpus file whole, with no limit.
def test_a_corpus_file_over_the_limit_and_a_jsonl_line_over_it(tmp_path, monkeypatch):
    from gptcli.errors import InputError
    from gptcli.textio import Limit
    from gptcli.train import data

    monkeypatch.setattr(data, "CORPUS_FILE", Limit(2048, "one training corpus file", "split it"))
    (tmp_path / "a.txt").write_text("x" * 2049)
    with pytest.raises(InputError, match=r"a.txt: over the 2 KiB limit for one training corpus file"):
        list(data.read_documents(tmp_path / "a.txt"))
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "y" * 2049}) + "\n")
    docs = data.read_documents(tmp_path / "b.jsonl")
    assert next(docs) == "short"
    with pytest.raises(InputError, match=r"b.jsonl:2: over the"):
        next(docs)


# Old code: one tokenizer call per document, whatever its size (GBs of encodings for a big file).
def test_long_documents_are_tokenized_in_pieces_with_the_same_tokens(monkeypatch):
    from gptcli.train import data

    lines = [f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(400)]
    documents = ["\n".join(lines), "a short one"]
    tok = data.bpe_tokenizer(documents, 300)
    whole = data._encode(tok, documents, "bpe", 0)
    monkeypatch.setattr(data, "ENCODE_PIECE_CHARS", 500)
    spy = LongestPiece(tok)
    pieced = data._encode(spy, documents, "bpe", 0)
    assert spy.longest <= 500
    assert np.array_equal(whole, pieced)  # cut after newlines, these lines tokenize the same


class LongestPiece:
    """A tokenizer that remembers the longest text it was asked to encode in one call."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.longest = 0

    def encode_batch(self, texts, **kwargs):
        self.longest = max(self.longest, *(len(t) for t in texts))
        return self.tok.encode_batch(texts, **kwargs)

    def encode(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.tok.encode(text, **kwargs)


def test_sizes_are_written_one_way():
    from gptcli.textio import human_bytes

    sizes = [0, 800, 1024, 1536, 2**20 - 1, 32 * 2**20, int(1.6 * 2**30), 5000 * 2**30]
    assert [human_bytes(n) for n in sizes] == [
        "0 B",
        "800 B",
        "1 KiB",
        "1.5 KiB",
        "1 MiB",
        "32 MiB",
        "1.6 GiB",
        "5000 GiB",
    ]
    assert human_bytes(256.57 * 2**20, digits=2) == "256.57 MiB"
