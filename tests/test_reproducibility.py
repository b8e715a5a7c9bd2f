"""Runs that can be repeated: the drawn seed, and what a truncated prompt keeps (in-process: fast)."""

from __future__ import annotations

import io
import json
import re
import sys

import pytest

from gptcli.cli.app import run
from tests.scripted import ScriptedBackend

SAMPLED = ["--raw", "-n", "24", "--temperature", "5", "--top-p", "1", "--top-k", "0"]


@pytest.fixture(autouse=True)
def no_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # generate reads a piped stdin


def generate(capsys, model, *args: str) -> tuple[str, str]:
    code = run(["generate", "Once upon a time", "-m", str(model), *SAMPLED, *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def test_the_drawn_seed_repeats_the_run(tiny_models, capsys):
    model = tiny_models["gpt2"]
    first = json.loads(generate(capsys, model, "--json")[0])
    seed = first["seed"]
    assert isinstance(seed, int)
    again = json.loads(generate(capsys, model, "--json", "--seed", str(seed))[0])
    assert (again["text"], again["seed"]) == (first["text"], seed)
    # The text does depend on the seed (else the check above would prove nothing).
    other = json.loads(generate(capsys, model, "--json", "--seed", str(seed + 1))[0])
    assert other["text"] != first["text"]

    # --stats reports the drawn seed too.
    text, err = generate(capsys, model, "--stats")
    drawn = int(re.search(r"· seed (\d+)", err).group(1))
    assert generate(capsys, model, "--seed", str(drawn))[0] == text


@pytest.mark.parametrize("raw", [True, False])
def test_on_overflow_truncate_keeps_the_end_of_the_prompt(tiny_models, capsys, monkeypatch, raw):
    from gptcli.tokenizer import Tokenizer

    tok = Tokenizer(tiny_models["llama"])
    loaded: list[ScriptedBackend] = []
    real_load = ScriptedBackend.load.__func__
    monkeypatch.setattr(
        ScriptedBackend, "load", classmethod(lambda cls, *a: loaded.append(real_load(cls, *a)) or loaded[-1])
    )
    monkeypatch.setenv("GPTCLI_BACKEND_PATHS", "scripted=tests.scripted:ScriptedBackend")
    monkeypatch.setenv("GPTCLI_TEST_SCRIPT", json.dumps([min(tok.eos_ids)]))
    monkeypatch.setenv("GPTCLI_TEST_CONTEXT", "64")
    text = "BEGIN " + " ".join(f"w{i}" for i in range(200)) + " and the question comes LAST"
    argv = ["generate", text, "-m", str(tiny_models["llama"]), "-b", "scripted", "--on-overflow", "truncate", "-n", "4"]
    assert run([*argv, "--raw"] if raw else argv) == 0, capsys.readouterr().err
    assert "warning: the prompt was" in capsys.readouterr().err
    [backend] = loaded
    prompt = tok.decode(backend.calls[0], skip_special_tokens=False)  # the one prefill
    assert len(backend.calls[0]) <= 64 - 4
    assert "BEGIN" not in prompt and "w0 " not in prompt
    content = prompt if raw else prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    assert content.endswith("and the question comes LAST")
    assert text.endswith(content)  # the end, contiguous: nothing dropped from the middle
