import numpy as np
import pytest

from gptcli.backends.base import LoadOptions
from gptcli.backends.torch_backend import TorchBackend
from gptcli.config import SamplingConfig
from gptcli.decoding import Finished, generate
from gptcli.testing import check_backend_contract
from gptcli.tokenizer import Tokenizer

CPU32 = LoadOptions(device="cpu", dtype="float32")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_torch_backend_passes_the_contract(tiny_models, family):
    check_backend_contract(TorchBackend, tiny_models[family])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_ids_match_transformers_generate(tiny_models, family):
    import torch
    from transformers import AutoModelForCausalLM

    folder = tiny_models[family]
    tokenizer = Tokenizer(folder)
    prompt = tokenizer.encode("Once upon a time", add_special_tokens=True)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    max_new = 40
    expected = reference.generate(
        torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt) :].tolist()

    backend = TorchBackend.load(folder, CPU32)
    tokenizer.eos_ids = frozenset()  # the reference ignores EOS too
    events = list(generate(backend, tokenizer, prompt, SamplingConfig(temperature=0, max_tokens=max_new)))
    final = events[-1]
    assert isinstance(final, Finished)
    assert list(final.token_ids) == expected
    assert len(set(expected)) > 3  # not a degenerate repeat of one token


def test_threads_option_is_applied(tiny_models):
    import torch

    before = torch.get_num_threads()
    try:
        TorchBackend.load(tiny_models["gpt2"], LoadOptions(device="cpu", threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_bfloat16_runs_and_reports_dtype(tiny_models):
    backend = TorchBackend.load(tiny_models["llama"], LoadOptions(device="cpu", dtype="bfloat16"))
    assert backend.info.dtype == "bfloat16"
    logits, _ = backend.forward([1, 2, 3], backend.new_cache())
    assert logits.dtype == np.float32


def test_cuda_without_gpu_is_a_backend_error(tiny_models):
    import torch

    from gptcli.errors import BackendError

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert TorchBackend.unavailable_reason("cuda") == "CUDA requested but no GPU is available"
    with pytest.raises(BackendError):
        TorchBackend.load(tiny_models["llama"], LoadOptions(device="cuda"))


@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_cuda_greedy_matches_cpu(tiny_models):
    folder = tiny_models["llama"]
    cpu = TorchBackend.load(folder, CPU32)
    gpu = TorchBackend.load(folder, LoadOptions(device="cuda", dtype="float32"))
    a, _ = cpu.forward([1, 2, 3, 4], cpu.new_cache())
    b, _ = gpu.forward([1, 2, 3, 4], gpu.new_cache())
    np.testing.assert_allclose(a, b, atol=1e-3)
