"""Batching never changes answers: the default model, 8 prompts of mixed lengths, torch and onnx, fp32, greedy."""

import os

import pytest

from gptcli.config import SamplingConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "List three colors.",
    "Explain in two sentences why the sky is blue, for a child who is five years old and very curious.",
    "hi",
    "Translate to French: the cat sleeps on the warm windowsill while the rain falls outside.",
    "2+2=",
    "Name a planet.",
]
GREEDY = SamplingConfig(temperature=0, max_tokens=24)


@pytest.mark.parametrize("backend_name", ["torch", "onnx"])
def test_eight_mixed_prompts_batched_give_each_its_tokens_alone(default_model, default_model_home, backend_name):
    from gptcli.backends.base import LoadOptions, get_backend_class
    from gptcli.decoding import Finished
    from gptcli.engine import Engine, EngineLimits, generate, run_all
    from gptcli.prompts import encode_prompt
    from gptcli.tokenizer import Tokenizer

    os.environ["GPTCLI_HOME"] = str(default_model_home)
    backend = get_backend_class(backend_name).load(
        default_model.path, LoadOptions(device="cpu", dtype="float32", precision="fp32")
    )
    tok = Tokenizer(default_model.path)
    prompts = [encode_prompt(tok, p).ids for p in PROMPTS]
    alone = [list(generate(backend, tok, ids, GREEDY))[-1] for ids in prompts]
    engine = Engine(backend, tok, EngineLimits(max_running=8, prefill_chunk=16))
    together = {}
    for index, event in run_all(engine, [(ids, GREEDY) for ids in prompts]):
        if isinstance(event, Finished):
            together[index] = event
    for i, prompt in enumerate(PROMPTS):
        assert together[i].token_ids == alone[i].token_ids, prompt
        assert together[i].text == alone[i].text
