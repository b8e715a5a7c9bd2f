"""The real program in a subprocess: exit codes, exact error lines, stdout holding only the product."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, run_cli

SCRIPTED = {"GPTCLI_BACKEND_PATHS": "scripted=tests.scripted:ScriptedBackend"}


def scripted_env(tokenizer_ids, **extra):
    return {**SCRIPTED, "GPTCLI_TEST_SCRIPT": json.dumps(tokenizer_ids), **extra}


@pytest.fixture(scope="module")
def llama_tok(tiny_models):
    from gptcli.tokenizer import Tokenizer

    return Tokenizer(tiny_models["llama"])


def say(tok, text):
    return [*tok.encode(text, add_special_tokens=False), min(tok.eos_ids)]


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.decode().startswith("gptcli 0.1.0")


def test_import_hygiene_cli_does_not_import_torch():
    code = (
        "import sys, gptcli.cli.app; print([m for m in ('torch', 'onnxruntime', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_generate_streams_only_text_to_stdout(tiny_models, llama_tok):
    env = scripted_env(say(llama_tok, "Paris is the capital."))
    result = run_cli("generate", "hi", "-m", str(tiny_models["llama"]), "-b", "scripted", "--stats", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == "Paris is the capital.\n"
    assert "decode" in result.stderr.decode() and "\x1b[" not in result.stderr.decode()


def test_json_output(tiny_models, llama_tok):
    env = scripted_env(say(llama_tok, "Rome"))
    result = run_cli(
        "generate", "hi", "-m", str(tiny_models["llama"]), "-b", "scripted", "--json", "--seed", "7", env=env
    )
    data = json.loads(result.stdout)
    assert data["text"] == "Rome"
    assert data["finish_reason"] == "stop"
    assert data["seed"] == 7
    assert data["backend"] == "scripted"
    assert data["usage"]["completion_tokens"] == len(say(llama_tok, "Rome")) - 1
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]
    assert set(data["timings"]) == {"ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "total_s"}


def test_stop_flag_and_max_tokens(tiny_models, llama_tok):
    env = scripted_env(say(llama_tok, "one two END three"))
    result = run_cli("generate", "x", "-m", str(tiny_models["llama"]), "-b", "scripted", "--stop", "END", env=env)
    assert result.stdout.decode() == "one two \n"


def test_stdin_then_argument_through_chat_template(tiny_models):
    # The real torch backend on the tiny Llama: the prompt reaches the template as stdin + argument.
    result = run_cli(
        "generate",
        "Rewrite this:",
        "-m",
        str(tiny_models["llama"]),
        "--json",
        "-n",
        "3",
        "--temperature",
        "0",
        input="notes from stdin\n",
    )
    data = json.loads(result.stdout)
    assert result.returncode == 0, result.stderr
    assert data["templated"] is True
    from gptcli.prompts import encode_prompt
    from gptcli.tokenizer import Tokenizer

    expected = encode_prompt(Tokenizer(tiny_models["llama"]), "notes from stdin\n\nRewrite this:")
    assert data["usage"]["prompt_tokens"] == len(expected.ids)


def test_raw_completion_on_base_model(tiny_models):
    result = run_cli(
        "generate", "ROMEO:", "--raw", "-m", str(tiny_models["gpt2"]), "-n", "5", "--json", "--temperature", "0"
    )
    data = json.loads(result.stdout)
    assert result.returncode == 0
    assert data["templated"] is False and data["usage"]["completion_tokens"] == 5


def test_prompt_from_file(tiny_models, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("ROMEO:")
    result = run_cli("generate", "-f", str(prompt), "-m", str(tiny_models["gpt2"]), "-n", "2", "--json")
    assert json.loads(result.stdout)["usage"]["prompt_tokens"] > 0


def test_closed_pipe_ends_quietly(tiny_models, llama_tok):
    env = {**os.environ, **scripted_env(say(llama_tok, "word " * 40))}
    cmd = f"{sys.executable} -m gptcli generate hi -m {tiny_models['llama']} -b scripted -n 40 | head -c 5"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, env=env, cwd=REPO)
    assert result.stdout == b"word "
    assert b"Traceback" not in result.stderr and b"Error" not in result.stderr


def test_ctrl_c_flushes_output_and_exits_130(tiny_models, llama_tok):
    script = say(llama_tok, "word " * 500)
    env = {**os.environ, **scripted_env(script, GPTCLI_TEST_DELAY="0.01", GPTCLI_TEST_CONTEXT="100000")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gptcli",
            "generate",
            "hi",
            "-b",
            "scripted",
            "-m",
            str(tiny_models["llama"]),
            "-n",
            "100000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=REPO,
    )
    # Wait for the first streamed bytes, then interrupt.
    first = proc.stdout.read(1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    produced = (first + rest).decode()
    assert produced.startswith("word word") and produced.endswith("\n")
    assert len(produced) < len("word " * 500)
    assert b"Traceback" not in err
    assert b"interrupted" in err


def test_ctrl_c_under_json_prints_the_partial_reply_and_exits_130(tiny_models, llama_tok):
    """--json streams nothing, so before this an interrupted run printed nothing at all."""
    script = say(llama_tok, "word " * 500)
    env = {**os.environ, **scripted_env(script, GPTCLI_TEST_DELAY="0.01", GPTCLI_TEST_CONTEXT="100000")}
    args = ["-v", "generate", "hi", "-b", "scripted", "-m", str(tiny_models["llama"]), "-n", "100000", "--json"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptcli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=REPO,
    )
    while b"loaded" not in proc.stderr.readline():  # -v says when the model is loaded: decoding starts
        assert proc.poll() is None
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    reply = json.loads(out)
    assert reply["finish_reason"] == "interrupted" and reply["text"].startswith("word word")
    assert (
        0 < reply["usage"]["completion_tokens"] < 500 and 0 < reply["timings"]["ttft_s"] < reply["timings"]["total_s"]
    )
    assert b"Traceback" not in err and b"interrupted" in err


def test_ctrl_c_while_the_model_loads_still_gives_json_its_interrupted_object(tiny_models, monkeypatch, capsys):
    """README: with --json, Ctrl-C prints the object with "finish_reason": "interrupted"; during the model's load
    (a first run converts it: tens of seconds) stdout was empty, as summarize's was."""
    import io

    from gptcli.cli import local_run
    from gptcli.cli.app import run

    def interrupted(settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(local_run, "load_runtime", interrupted)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code = run(["generate", "hi", "-m", str(tiny_models["llama"]), "--json", "--seed", "7"])
    out, err = capsys.readouterr()
    assert code == 130, err
    reply = json.loads(out)
    assert reply["text"] == "" and reply["finish_reason"] == "interrupted" and reply["seed"] == 7
    assert reply["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert reply["timings"]["ttft_s"] is None  # no token came: not the time to the interrupt
    assert [reply[key] for key in ("model", "backend", "device", "dtype", "templated")] == [None] * 5
    assert "interrupted" in err


ERRORS = [
    # (args, stdin, exit code, stderr first line)
    (["generate", "-f", "missing.txt"], "", 6, "error: file not found: missing.txt"),
    (["generate", "-f", "."], "", 6, "error: . is a directory, not a file"),
    (["generate"], "", 6, "error: the prompt is empty"),
    (
        ["generate", "hi", "--temperature", "-1"],
        "",
        3,
        "error: --temperature: sampling.temperature must be >= 0, got -1.0",
    ),
    (["generate", "hi", "--top-p", "0"], "", 3, "error: --top-p: sampling.top_p must be in (0, 1], got 0.0"),
    (["generate", "hi", "--top-p", "1.5"], "", 3, "error: --top-p: sampling.top_p must be in (0, 1], got 1.5"),
    (["generate", "hi", "--max-tokens", "0"], "", 3, "error: --max-tokens: sampling.max_tokens must be >= 1, got 0"),
    (
        ["chat", "--presence-penalty", "2.5"],
        "hi\n",
        3,
        "error: --presence-penalty: sampling.presence_penalty must be in [-2, 2], got 2.5",
    ),
    (["generate", "hi", "-m", "nosuchmodel"], "", 5, "error: unknown model 'nosuchmodel'"),
    (["generate", "hi", "-b", "nosuch"], "", 4, "error: unknown backend 'nosuch'"),
    (
        ["generate", "hi", "--device", "cuda"],
        "",
        4,
        "error: backend 'torch' cannot run here: CUDA requested but no GPU is available",
    ),
    (["generate", "hi", "-m", "someone/some-model"], "", 5, "error: cannot fetch 'someone/some-model' from the hub"),
    (["generate", "--nope"], "", 2, None),
]


@pytest.mark.parametrize(("args", "stdin", "code", "first_line"), ERRORS)
def test_error_exit_codes_and_messages(args, stdin, code, first_line):
    if "--device" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    result = run_cli(*args, input=stdin)
    err = result.stderr.decode()
    assert result.returncode == code, err
    assert result.stdout == b""
    assert "Traceback" not in err
    if first_line:
        lines = err.splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith("error: "))
        assert lines[at].startswith(first_line)
        assert lines[at + 1].startswith("hint: ")
        assert len(lines) == at + 2  # nothing after the hint


def test_binary_and_invalid_utf8_files(tmp_path):
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"abc\x00def")
    latin = tmp_path / "l.txt"
    latin.write_bytes("café".encode("latin-1"))
    r1 = run_cli("generate", "-f", str(binary))
    r2 = run_cli("generate", "-f", str(latin))
    r3 = run_cli("generate", input=b"\xc3( bad")
    assert (r1.returncode, r2.returncode, r3.returncode) == (6, 6, 6)
    assert "looks like a binary file" in r1.stderr.decode()
    assert "is not valid UTF-8" in r2.stderr.decode()
    assert "standard input is not valid UTF-8" in r3.stderr.decode()


def test_a_byte_order_mark_is_not_part_of_the_text(tmp_path):
    """Windows editors start UTF-8 files with a BOM; it was kept, and cost a token of every prompt."""
    from gptcli.textio import PROMPT, read_text_file, read_text_stream

    marked = tmp_path / "notes.txt"
    marked.write_bytes("\ufeffhello".encode())
    assert read_text_file(marked) == "hello"
    assert read_text_stream(io.BytesIO("\ufeffhello".encode()), "standard input", PROMPT) == "hello"
    inside = "a\ufeffb"  # only a leading mark goes
    assert read_text_stream(io.BytesIO(inside.encode()), "standard input", PROMPT) == inside


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_utf16_text_with_its_byte_order_mark_is_read_as_text(tmp_path, codec):
    """Notepad's "Unicode" and Windows PowerShell's `>` write UTF-16 with a mark: it was 'a binary file'."""
    from gptcli.errors import InputError
    from gptcli.textio import PROMPT, decode_text, read_text_file, read_text_head, read_text_stream

    text = "Résumé 🙂\r\nline two"  # an accent, a character beyond the BMP (a surrogate pair), CRLF
    data = "\ufeff".encode(codec) + text.encode(codec)
    saved = tmp_path / "notes.txt"
    saved.write_bytes(data)
    assert read_text_file(saved) == text
    assert read_text_stream(io.BytesIO(data), "standard input", PROMPT) == text
    for size in range(2, len(data)):  # the head of the file, ending on a whole character wherever it is cut
        head, whole = read_text_head(saved, PROMPT, size)
        assert not whole and text.startswith(head), size
    with pytest.raises(InputError, match="is UTF-16 text, read line by line only as UTF-8"):
        decode_text(data, "standard input", line=True)
    with pytest.raises(InputError, match="is not valid UTF-16"):  # a lone surrogate
        read_text_stream(
            io.BytesIO("\ufeff".encode(codec) + b"\xd8\x00"[:: 1 if codec.endswith("be") else -1]), "x", PROMPT
        )
    utf32 = tmp_path / "wide.txt"  # UTF-32LE starts with UTF-16LE's mark, then NULs
    utf32.write_bytes("\ufeffhello".encode("utf-32-le"))
    with pytest.raises(InputError, match="looks like a binary file"):
        read_text_file(utf32)


def test_a_utf16_prompt_file_gives_the_utf8_files_answer(tiny_models, tmp_path):
    utf8, utf16 = tmp_path / "a.txt", tmp_path / "b.txt"
    utf8.write_text("ROMEO: café", encoding="utf-8")
    utf16.write_text("ROMEO: café", encoding="utf-16")  # Python writes the mark, in the machine's order
    model = ("-m", str(tiny_models["llama"]), "-n", "4", "--raw", "--temperature", "0", "--json")
    first, second = (run_cli("generate", "-f", str(path), *model) for path in (utf8, utf16))
    assert first.returncode == second.returncode == 0, second.stderr.decode()
    (text, tokens), again = (
        (a["text"], a["usage"]["prompt_tokens"]) for a in map(json.loads, (first.stdout, second.stdout))
    )
    assert again == (text, tokens) and tokens > 3  # the same prompt, not a mark or mojibake in it


def test_prompt_longer_than_context(tiny_models):
    long_prompt = "ROMEO: " * 200
    result = run_cli("generate", long_prompt, "--raw", "-m", str(tiny_models["gpt2"]), "-n", "2")
    assert result.returncode == 6
    assert "error: the prompt is" in result.stderr.decode() and "context holds 96" in result.stderr.decode()
    ok = run_cli(
        "generate",
        long_prompt,
        "--raw",
        "-m",
        str(tiny_models["gpt2"]),
        "-n",
        "2",
        "--on-overflow",
        "truncate",
        "--json",
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["usage"]["prompt_tokens"] <= 96 - 2
    assert "warning: the prompt was" in ok.stderr.decode()


@pytest.mark.parametrize("raw", [True, False])
def test_a_long_prompt_is_counted_a_piece_at_a_time_never_encoded_whole(tiny_models, monkeypatch, raw):
    """A 13 MB prompt was encoded in one call (2.7 GB RSS) only to be refused or cut to the context."""
    from gptcli import prompts, textio
    from gptcli.errors import InputError
    from gptcli.tokenizer import Tokenizer

    tok = Tokenizer(tiny_models["llama"])
    monkeypatch.setattr(prompts, "PIECE_CHARS", 500, raising=False)
    monkeypatch.setattr(prompts, "text_pieces", lambda text: textio.text_pieces(text, 500), raising=False)
    text = "\n".join(f"line {i} of a long letter" for i in range(2000))  # ~50,000 characters
    whole = len(prompts.encode_prompt(tok, text, raw=raw).ids)
    longest: list[int] = []
    encode = type(tok).encode
    monkeypatch.setattr(type(tok), "encode", lambda self, t, **kw: longest.append(len(t)) or encode(self, t, **kw))
    fit = dict(context_length=128, max_tokens=8, raw=raw)
    with pytest.raises(InputError, match=f"the prompt is {whole} tokens but the model's context holds 128"):
        prompts.fit_prompt(tok, text, on_overflow="error", **fit)
    assert max(longest) <= 500
    cut = prompts.fit_prompt(tok, text, on_overflow="truncate", **fit)
    assert len(cut.ids) <= 128 - 8 and cut.warning.startswith(f"the prompt was {whole} tokens")
    assert max(longest) < 2000 and "line 1998 of a long letter\nline 1999 of a long letter" in tok.decode(cut.ids)


def test_not_a_model_folder_and_corrupt_weights(tiny_models, tmp_path):
    import shutil

    r1 = run_cli("generate", "hi", "-m", str(tmp_path))
    assert r1.returncode == 5 and "is not a model folder" in r1.stderr.decode()
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["gpt2"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    r2 = run_cli("generate", "hi", "-m", str(broken))
    assert r2.returncode == 5 and "corrupt safetensors file" in r2.stderr.decode()


def test_invalid_config_file_and_unknown_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling: [unclosed\n")
    r1 = run_cli("generate", "hi", "--config", str(bad))
    assert r1.returncode == 3 and "invalid YAML" in r1.stderr.decode()
    typo = tmp_path / "typo.yaml"
    typo.write_text("sampling:\n  temprature: 0.2\n")
    r2 = run_cli("config", "show", "--config", str(typo))
    assert r2.returncode == 3
    assert r2.stderr.decode().splitlines()[0] == (
        f"error: {typo}: sampling -> temprature: unknown key (did you mean 'temperature'?)"
    )


def test_config_show_reports_sources(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sampling:\n  top_p: 0.5\n")
    result = run_cli("config", "show", "--json", "--config", str(cfg), env={"GPTCLI_MAX_TOKENS": "9"})
    data = json.loads(result.stdout)
    assert data["sampling.top_p"] == {"value": 0.5, "source": str(cfg)}
    assert data["sampling.max_tokens"] == {"value": 9, "source": "$GPTCLI_MAX_TOKENS"}
    assert data["model"]["source"] == "default"


def test_config_show_says_a_config_read_from_a_pipe_was_found():
    """`--config <(…)` or /dev/stdin: read once, its settings applied, the file listed as found (was 'not found')."""
    result = run_cli("config", "show", "--config", "/dev/stdin", input="sampling:\n  top_p: 0.5\n")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "  --config  /dev/stdin (found)" in out.splitlines()
    assert re.search(r"sampling\.top_p +0\.5 +/dev/stdin", out)


def test_tables_print_user_text_literally(tmp_path):
    env = {"GPTCLI_SYSTEM": "Answer in [/] style", "GPTCLI_MODEL": "[bold]x"}
    result = run_cli("config", "show", env=env)  # was: MarkupError, and "[bold]x" shown as "x"
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "Answer in [/] style" in out and "[bold]x" in out


def test_user_config_file_is_read(tmp_path):
    user = tmp_path / "xdg-config" / "gptcli" / "config.yaml"
    user.parent.mkdir(parents=True)
    user.write_text("backend: scripted\n")
    data = json.loads(run_cli("config", "show", "--json").stdout)
    assert data["backend"] == {"value": "scripted", "source": str(user)}


def test_backends_lists_status():
    data = json.loads(run_cli("backends", "--json", env=SCRIPTED).stdout)
    rows = {row["name"]: row for row in data}
    assert rows["torch"]["status"] == "ok" and rows["torch"]["origin"] == "built-in"
    assert rows["scripted"]["status"] == "ok"


def test_broken_plugin_is_a_row_not_a_crash():
    env = {"GPTCLI_BACKEND_PATHS": "broken=tests.does_not_exist:Nope"}
    result = run_cli("backends", "--json", env=env)
    assert result.returncode == 0
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert "failed to load" in rows["broken"]["status"]
    assert run_cli("config", "show", env=env).returncode == 0


def test_models_info_and_list_on_local_folder(tiny_models):
    info = json.loads(run_cli("models", "info", str(tiny_models["llama"]), "--json").stdout)
    assert info["layers"] == 2 and info["architecture"] == "LlamaForCausalLM"
    listing = json.loads(run_cli("models", "list", "--json").stdout)
    assert listing[0]["name"] == "smollm2-135m-instruct"


def test_models_info_on_a_checkpoint_counts_the_model_not_its_optimizer_state(tiny_models, tmp_path):
    """QA: a training checkpoint's size counted its training_state.pt (1.6 GB for a 540 MB model)."""
    folder = tmp_path / "step-0000010"
    shutil.copytree(tiny_models["llama"], folder)
    model_bytes = sum(p.stat().st_size for p in folder.iterdir())
    (folder / "training_state.pt").write_bytes(b"\0" * 3 * model_bytes)
    info = json.loads(run_cli("models", "info", str(folder), "--json").stdout)
    assert info["size_bytes"] == model_bytes


def test_models_info_shows_a_folder_name_as_text_not_as_control_sequences(tiny_models, tmp_path):
    # The path (a folder's name) and the card's words were printed raw: ESC in a name reached the terminal.
    folder = tmp_path / "m\x1b]0;pwned\x07"
    shutil.copytree(tiny_models["llama"], folder)
    result = run_cli("models", "info", str(folder))
    out = result.stdout.decode()
    assert result.returncode == 0 and "\x1b" not in out and "\x07" not in out
    assert "m\\x1b]0;pwned\\x07" in out


def test_resuming_a_chat_reuses_its_model_system_and_set_values(tiny_models, llama_tok, capsys, monkeypatch):
    # In-process, on a pipe: /show goes to stderr.
    from pathlib import Path

    from gptcli.cli.app import run

    for key, value in scripted_env(say(llama_tok, "Hi!"), GPTCLI_TEST_CONTEXT="4096").items():
        monkeypatch.setenv(key, value)
    model = Path(tiny_models["llama"]).resolve()

    def chat(typed: str, *args: str) -> str:
        monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
        code = run(["chat", "-b", "scripted", *args])
        err = capsys.readouterr().err
        assert code == 0, err
        return err

    def shown(err: str, key: str) -> str:
        return re.search(rf"^{key} +(.*)$", err, re.M).group(1)

    chat("/set temperature 0.5\n/set max_tokens 7\nHi\n", "-m", str(model), "--system", "Be terse.")
    resumed = chat("/show\n", "--continue")  # no -m: the conversation's model, not the default one
    assert [shown(resumed, k) for k in ("model", "system", "temperature", "max_tokens")] == [
        f"{model} (scripted/cpu)",
        "Be terse.",
        "0.5",
        "7",
    ]
    # Flags given now win over what was saved; the rest is kept.
    changed = chat("/show\n", "--continue", "--temperature", "0.2", "--system", "Be kind.")
    assert [shown(changed, k) for k in ("model", "system", "temperature", "max_tokens")] == [
        f"{model} (scripted/cpu)",
        "Be kind.",
        "0.2",
        "7",
    ]


def test_a_looping_reply_stops_with_reason_repetition_unless_turned_off(tiny_models, llama_tok):
    loop = llama_tok.encode(" I am glad you are happy.", add_special_tokens=False) * 40
    env = scripted_env(loop, GPTCLI_TEST_CONTEXT="4096")
    args = ["generate", "hi", "-m", str(tiny_models["llama"]), "-b", "scripted", "--json", "-n", "120"]
    cut = json.loads(run_cli(*args, env=env).stdout)
    assert cut["finish_reason"] == "repetition" and cut["usage"]["completion_tokens"] < 120
    kept = run_cli(*args, "--no-repetition-stop", env=env)
    assert json.loads(kept.stdout)["finish_reason"] == "length"
    assert json.loads(run_cli(*args, env={**env, "GPTCLI_REPETITION_STOP": "0"}).stdout)["finish_reason"] == "length"


def test_running_into_the_context_limit_is_said_on_stderr(tiny_models, llama_tok):
    words = llama_tok.encode(" one two three four five six seven eight nine ten", add_special_tokens=False) * 20
    env = scripted_env(words, GPTCLI_TEST_CONTEXT="24", GPTCLI_REPETITION_STOP="0")
    result = run_cli("generate", "hi", "-m", str(tiny_models["llama"]), "-b", "scripted", "--raw", "-n", "100", env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert "stopped at the model's context limit (24 tokens, prompt included)" in result.stderr.decode()
    assert result.stdout.strip()


# ------------------------------------------------------------------ --help at 80 columns


def _commands():
    """(argv, click command) for the root, every group and every command."""
    import typer

    from gptcli.cli.app import app

    found = []

    def walk(command, path):
        found.append((path, command))
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


def _docstring(command) -> str:
    import inspect

    return inspect.cleandoc((command.callback.__doc__ if command.callback else None) or command.help or "")


def _example_lines(doc: str) -> list[str]:
    lines = []
    for paragraph in doc.split("\n\n"):
        head, *rest = paragraph.split("\n")
        if head.startswith(("Example:", "Examples:")):
            lines += [head.split(":", 1)[1].strip()] if not rest else [line.strip() for line in rest]
    return [line for line in lines if line]


@pytest.mark.parametrize(("argv", "command"), _commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_help_at_80_columns_keeps_words_and_examples_whole(argv, command, capsys, monkeypatch):
    from gptcli.cli.app import run

    monkeypatch.setenv("COLUMNS", "80")
    assert run([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert "<bool>" not in out and "<parse>" not in out  # QA: `-r, --resume <parse>` (its parser's name)
    assert max(len(line) for line in out.splitlines()) <= 80, out
    shown = {line.strip() for line in out.splitlines()}
    doc = _docstring(command)
    examples = _example_lines(doc)
    assert argv == [] or getattr(command, "commands", None) or examples, f"{argv}: no example in the help"
    for example in examples:
        assert example in shown, f"example broken or missing in `gptcli {' '.join(argv)} --help`: {example}"
    words = set(out.split())
    texts = [doc] + [p.help or "" for p in command.params]
    texts += [_docstring(sub).split("\n\n")[0] for sub in getattr(command, "commands", {}).values()]
    for text in texts:
        cut = [word for word in text.split() if word not in words]
        assert cut == [], f"`gptcli {' '.join(argv)} --help` breaks or drops: {cut}"


def test_help_of_a_flag_shows_no_placeholder_in_a_subprocess():
    result = run_cli("chat", "--help", env={"COLUMNS": "80"})
    assert result.returncode == 0
    out = result.stdout.decode()
    assert "  --plain  " in out and "--repetition-stop / --no-repetition-stop" in out and "<bool>" not in out


# ------------------------------------------------------------------ -q / -v


def test_quiet_leaves_only_errors_and_asked_for_output(tiny_models, llama_tok):
    model = str(tiny_models["llama"])
    env = scripted_env(say(llama_tok, "Hi") + say(llama_tok, "Hi"))
    normal = run_cli("generate", "-m", model, "-b", "scripted", "--raw", "--system", "x", "hello", env=env)
    assert normal.stderr.decode() == "warning: --system is ignored with --raw\n"
    quiet = run_cli("-q", "generate", "-m", model, "-b", "scripted", "--raw", "--system", "x", "hello", env=env)
    assert quiet.returncode == 0 and quiet.stdout.decode() == "Hi\n"
    assert quiet.stderr.decode() == ""
    stats = run_cli("--quiet", "generate", "-m", model, "-b", "scripted", "--stats", "hello", env=env)
    assert stats.stderr.decode().startswith("prompt ")  # --stats was asked for: it stays
    failed = run_cli("-q", "generate", "-m", model, "-b", "nope", "hello")
    assert failed.returncode == 4 and failed.stderr.decode().startswith("error: unknown backend 'nope'")


def test_quiet_hides_an_exports_steps_and_a_bench_workers_progress(tiny_models, isolated_home):
    """QA: `-q` left the first ONNX export's lines (exporting ..., building the llama graph ..., exported in 6.6 s)
    and every line of bench's worker process (loading torch (2 threads), pp8: repetition 1/1, ...)."""
    model = str(tiny_models["llama"])
    quiet = run_cli("-q", "generate", "-m", model, "-b", "onnx", "--precision", "fp32", "hi", "-n", "2")
    assert quiet.returncode == 0 and quiet.stderr.decode() == "", quiet.stderr.decode()
    bench = run_cli("-q", "bench", "-m", model, "-b", "torch", "-p", "8", "-n", "0", "-r", "1", "--threads", "1")
    assert bench.returncode == 0 and bench.stderr.decode() == "", bench.stderr.decode()
    assert "pp8" in bench.stdout.decode()


def test_a_rust_librarys_panic_is_one_line_not_a_traceback(monkeypatch, capsys):
    """QA: under a low process limit (`prlimit --nproc=5`) tokenizers panicked ("The global thread pool has not been
    initialized ... ThreadPoolBuildError"): pyo3's PanicException is no Exception, and 215 lines of traceback came."""
    from gptcli.cli import app

    class PanicException(BaseException):  # pyo3_runtime's, as tokenizers raises it
        pass

    def panics(*args, **kwargs):
        raise PanicException("The global thread pool has not been initialized.: ThreadPoolBuildError { kind: IO }")

    monkeypatch.setattr("gptcli.cli.config_cmd.resolve_settings", panics)
    assert app.run(["config", "show"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "error: a library could not start its threads (The global thread pool has not been initialized.:"
        " ThreadPoolBuildError { kind: IO })",
        "hint: a process limit (`ulimit -u`) is too low for gptcli's threads: raise it",
    ]


def test_verbose_says_what_was_loaded_and_the_timings(tiny_models, llama_tok):
    model = tiny_models["llama"]
    env = scripted_env(say(llama_tok, "Hi"))
    result = run_cli("-v", "generate", "-m", str(model), "-b", "scripted", "hello", env=env)
    assert result.returncode == 0 and result.stdout.decode() == "Hi\n"
    lines = result.stderr.decode().splitlines()
    assert re.fullmatch(
        rf"loaded tiny-llama \({re.escape(str(model))}\): Scripted, 0 parameters, 0 layers, context 64, vocab 400"
        r" · scripted/cpu/float32 · \d+\.\d\d s",
        lines[0],
    ), lines
    assert lines[1].startswith("prompt ") and "finish stop · scripted/cpu" in lines[1]
    assert len(lines) == 2


def test_quiet_and_verbose_together_are_a_usage_error():
    result = run_cli("-q", "-v", "config", "show")
    assert result.returncode == 2
    assert result.stderr.decode() == "error: --quiet and --verbose cannot be used together\n"


def test_short_options_that_name_a_shared_setting_mean_it_everywhere():
    """-t is --temperature wherever it exists (it was --threads in bench); the same for -m, -b, -c, -s, -n."""
    from collections import defaultdict

    meanings = defaultdict(set)
    for argv, command in _commands():
        for param in command.params:
            longs = tuple(o for o in param.opts if o.startswith("--"))
            for short in (o for o in param.opts if len(o) == 2):
                meanings[short].add((longs, argv[0] if argv else ""))
    assert {longs for longs, _ in meanings["-t"]} == {("--temperature",)}
    for short, long in [("-m", "--model"), ("-b", "--backend"), ("-c", "--config"), ("-s", "--system")]:
        assert {longs for longs, _ in meanings[short]} == {(long,)}, short
    assert {longs for longs, cmd in meanings["-n"] if cmd != "bench"} == {("--max-tokens",)}
    assert not any("--threads" in longs for ms in meanings.values() for longs, _ in ms)


# ------------------------------------------------------------------ a run converts only the command it names


def test_a_run_that_names_its_command_builds_only_that_command(monkeypatch):
    import typer

    from gptcli.cli.app import COMMANDS, build_app, invoked_command

    monkeypatch.delenv("_GPTCLI_COMPLETE", raising=False)
    assert invoked_command(["generate", "hi"]) == "generate"
    assert invoked_command(["-q", "--verbose", "eval", "perplexity"]) == "eval"
    for argv in ([], ["--help"], ["-V"], ["-q"], ["generat", "hi"], ["hi", "generate"]):
        assert invoked_command(argv) is None, argv  # help, version, typos: the whole CLI
    monkeypatch.setenv("_GPTCLI_COMPLETE", "complete_bash")
    assert invoked_command(["generate"]) is None  # completion lists every command
    full, one = typer.main.get_command(build_app()), typer.main.get_command(build_app("eval"))
    assert set(full.commands) == set(COMMANDS) and list(one.commands) == ["eval"]
    assert [p.name for p in one.params] == [p.name for p in full.params]  # the same root options
    assert list(one.commands["eval"].commands) == list(full.commands["eval"].commands)


def test_the_one_command_cli_answers_as_the_whole_one():
    for argv, usage in (
        (["-q", "generate", "--help"], "Usage: gptcli generate [OPTIONS] [prompt]"),
        (["eval", "--help"], "Usage: gptcli eval [OPTIONS] COMMAND"),
        (["--help"], "Usage: gptcli [OPTIONS] COMMAND"),
    ):
        result = run_cli(*argv)
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout.decode().startswith(usage), result.stdout.decode()[:200]
    typo = run_cli("generat", "hi")
    assert typo.returncode == 2 and "Did you mean 'generate'?" in typo.stderr.decode()


# ------------------------------------------------------------------ names other tools use, by habit


@pytest.mark.parametrize(
    ("argv", "message", "hint"),
    [
        (["run", "smollm2"], "No such command 'run'.", 'use gptcli generate "PROMPT" for one reply'),
        (["list"], "No such command 'list'.", "use gptcli models list"),
        (["help"], "No such command 'help'.", "use gptcli --help, or gptcli COMMAND --help"),
        (["pull", "gemma3-270m"], "No such command 'pull'.", "use gptcli models pull NAME"),
        (["generate", "hi", "--temp", "0.5"], "No such option: --temp", "use --temperature"),
        (["chat", "--n-predict", "5"], "No such option: --n-predict", "use --max-tokens"),
        (["generate", "hi", "--n_predict", "5"], "No such option: --n_predict", "use --max-tokens"),
        (["generate", "-p", "hi"], "No such option: -p", 'the prompt is the argument: gptcli generate "PROMPT"'),
        (["generate", "Write", "a", "haiku"], "Got unexpected extra argument(s) (a haiku)", "quote a prompt"),
        (["chat", "hello there"], "Got unexpected extra argument(s) (hello there)", "chat takes no prompt: type it"),
        (["generate", "hi", "-q"], "No such option: -q", "-q goes before the command: gptcli -q generate ..."),
        (["models", "list", "--verbose"], "No such option: --verbose", "--verbose goes before the command: gptcli"),
        # -m elsewhere; Click said "Possible options: --help"
        (["export", "--model", "x"], "No such option: --model", "the model is the argument here: gptcli export MODEL"),
        (
            ["models", "info", "-m", "x"],
            "No such option: -m",
            "the model is the argument here: gptcli models info MODEL",
        ),
        (
            ["generate", "hi", "--ctx-size", "512"],
            "No such option: --ctx-size",
            "gptcli always uses the model's whole context",
        ),
    ],
)
def test_a_name_from_ollama_or_llama_cpp_gets_gptclis_name(argv, message, hint, capsys):
    """Not Click's nearest spelling ("Did you mean 'runs'?", "Possible options: --stop, --system")."""
    from gptcli.cli.app import run

    assert run(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"error: {message}" and lines[1].startswith(f"hint: {hint}") and len(lines) == 2


def test_an_unknown_name_no_tool_uses_keeps_clicks_suggestion(capsys):
    from gptcli.cli.app import run

    assert run(["generat", "hi"]) == 2
    assert (
        capsys.readouterr().err == "error: No such command 'generat'. Did you mean 'generate'?\nhint: see `gptcli -h`\n"
    )
    assert run(["chat", "-p", "x"]) == 2  # -p is a prompt only for generate
    assert capsys.readouterr().err == "error: No such option: -p\nhint: see `gptcli chat -h`\n"


def test_an_option_without_its_value_points_at_its_commands_help(capsys):
    """Click raises this one without a context: the hint said `gptcli -h`, whose help has no --model."""
    from gptcli.cli.app import run

    for argv, command in (
        (["generate", "--model"], "gptcli generate"),
        (["-q", "models", "info", "--config"], "gptcli models info"),
        (["chat", "-n"], "gptcli chat"),
    ):
        assert run(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: Option '") and err.endswith(f"hint: see `{command} -h`\n"), err


def test_a_file_of_dash_is_stdin_as_for_cat(tmp_path):
    """`generate -f -` and `summarize -` said 'file not found: -' (`--batch -` already read stdin)."""
    empty = run_cli("generate", "-f", "-", input=b"")
    assert empty.returncode == 6 and empty.stderr.decode().startswith("error: the prompt is empty"), empty.stderr
    nothing = run_cli("summarize", "-", input=b"\n")
    assert nothing.returncode == 6
    assert nothing.stderr.decode().startswith("error: nothing to summarise: standard input holds only whitespace")
    binary = run_cli("summarize", "-", input=b"\x00\x01")  # read, as stdin is, by the checked reader
    assert binary.returncode == 6 and "standard input looks like a binary file" in binary.stderr.decode()


def test_parallel_and_kv_budget_help_give_their_defaults():
    """The README gives both defaults (8; half the free memory); --help gave neither."""
    for command in ("generate", "summarize"):
        text = " ".join(run_cli(command, "--help").stdout.decode().split())
        assert "Sequences decoded together in one step (default: 8)." in text, command
        assert "or a size (512MiB); default: half the free memory." in text, command


@pytest.mark.parametrize(
    ("argv", "fix"),
    [
        (["generate", "-f", "", "-m", "nosuchmodel"], "give a file"),
        (["generate", "--batch", "", "-m", "nosuchmodel"], "give a file"),
        (["generate", "hi", "--json-schema", "", "-m", "nosuchmodel"], "give a file"),
        (["summarize", "", "-m", "nosuchmodel"], "give a file"),
        (["config", "show", "-c", ""], "give a file"),
        (["config", "init", ""], "give a file"),
        (["chats", "export", "x", "-o", ""], "give a file"),
        (["eval", "perplexity", "", "-m", "nosuchmodel"], "give a file"),
        (["bench", "--mode", "latency", "--prompts", "", "-m", "nosuchmodel"], "give a file"),
        (["export", "nosuchmodel", "-o", ""], "to mean this folder, give '.'"),
        (["runs", "list", ""], "to mean this folder, give '.'"),
        (["runs", "show", ""], "to mean this folder, give '.'"),
    ],
)
def test_an_empty_path_is_a_usage_error_not_the_current_folder(argv, fix, tmp_path, monkeypatch, capsys):
    """`generate -f "$F"` with F unset said '. is a folder' (Path("") is "."): a path no one gave."""
    from gptcli.cli.app import run

    monkeypatch.chdir(tmp_path)
    assert run(argv) == 2
    assert f"an empty path ({fix})" in capsys.readouterr().err.splitlines()[0]
    assert list(tmp_path.iterdir()) == []  # nothing written here


@pytest.mark.parametrize(
    "argv", [["chats", "show", ""], ["chats", "export", " "], ["chats", "rm", "x", ""], ["chat", "--resume", ""]]
)
def test_an_empty_conversation_id_is_a_usage_error(argv, capsys):
    """`chat --resume "$ID"` with ID unset was exit 6, "no saved conversation ''": an input no one gave."""
    from gptcli.cli.app import run

    assert run(argv) == 2
    assert "an empty conversation id (give an id or a unique start of one" in capsys.readouterr().err.splitlines()[0]


def test_runs_list_without_a_folder_lists_the_default_one(tmp_path, monkeypatch, capsys):
    """`gptcli runs list` (its folder defaults to ./runs, a Path the empty-path parser also sees) ended with
    'internal error: AttributeError: 'PosixPath' object has no attribute 'strip''."""
    from gptcli.cli.app import run

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert run(["runs", "list", "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"
