"""Fixtures for the llamacpp plugin: an isolated gptcli home, a tiny Llama folder, the default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]  # the gptcli checkout this plugin lives in
CORPUS = [
    "Once upon a time there was a tiny model that wanted to write poems about autumn leaves.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "def add(a, b):\n    return a + b\n",
] * 20


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own gptcli home and user config, and no stray GPTCLI_* settings."""
    for key in list(os.environ):
        if key.startswith("GPTCLI_") and key != "GPTCLI_TEST_DEFAULT_HOME":
            monkeypatch.delenv(key, raising=False)
    home = tmp_path / "gptcli-home"
    monkeypatch.setenv("GPTCLI_HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NO_COLOR", "1")
    return home


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer random Llama (sharpened so greedy picks are decisive) with a byte-level BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    eot = tok.token_to_id("<|endoftext|>")
    torch.manual_seed(1)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=tok.get_vocab_size(),
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(folder)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def default_home() -> Path:
    """A gptcli home holding the converted default model (shared with gptcli's own integration tests)."""
    home = Path(os.environ.get("GPTCLI_TEST_DEFAULT_HOME", REPO / ".cache" / "test-home"))
    home.mkdir(parents=True, exist_ok=True)
    return home


@pytest.fixture(scope="session")
def default_model(default_home) -> Path:
    """The default model's converted folder (its tokenizer; the torch reference loads its fp32 weights)."""
    from gptcli.config import DEFAULT_MODEL
    from gptcli.models import resolve_model

    saved = os.environ.get("GPTCLI_HOME")
    os.environ["GPTCLI_HOME"] = str(default_home)
    try:
        return resolve_model(DEFAULT_MODEL).path
    finally:
        if saved is None:
            os.environ.pop("GPTCLI_HOME", None)
        else:
            os.environ["GPTCLI_HOME"] = saved
