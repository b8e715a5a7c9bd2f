"""Batched steps: the lean engine's native step and the looping default give each sequence's answers alone."""

import numpy as np
import pytest

from gptcli.backends.base import LoadOptions, batched_step
from gptcli.backends.torch_backend import TorchBackend
from gptcli.testing import check_backend_contract, check_batched_step, greedy_ids

CPU32 = LoadOptions(device="cpu", dtype="float32")
PROMPTS = [[3 + (7 * i + j) % 50 for j in range(length)] for i, length in enumerate([1, 2, 5, 9, 3, 14, 7, 4])]


def _load(folder, impl, monkeypatch):
    monkeypatch.setenv("GPTCLI_TORCH_IMPL", impl)
    backend = TorchBackend.load(folder, CPU32)
    assert backend.implementation == impl
    return backend


@pytest.mark.parametrize("impl", ["lean", "hf"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_batch_of_mixed_prompts_matches_each_alone(tiny_models, family, impl, monkeypatch):
    backend = _load(tiny_models[family], impl, monkeypatch)
    logits, caches = batched_step(backend, [(p, backend.new_cache()) for p in PROMPTS])
    assert logits.shape == (len(PROMPTS), backend.info.vocab_size) and logits.dtype == np.float32
    assert [c.length for c in caches] == [len(p) for p in PROMPTS]
    for row, prompt in zip(logits, PROMPTS, strict=True):
        alone, _ = backend.forward(prompt, backend.new_cache())
        np.testing.assert_allclose(row, alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("impl", ["lean", "hf"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_decoding_together_equals_each_alone(tiny_models, family, impl, monkeypatch):
    """All eight sequences (different lengths) prefill in one step, then decode step by step together."""
    from gptcli.backends import torch_lean

    monkeypatch.setattr(torch_lean, "INITIAL_CACHE", 8)  # caches regrow at different steps
    backend = _load(tiny_models[family], impl, monkeypatch)
    steps = 24
    logits, caches = batched_step(backend, [(p, backend.new_cache()) for p in PROMPTS])
    together: list[list[int]] = [[] for _ in PROMPTS]
    for _ in range(steps):
        tokens = [int(t) for t in np.argmax(logits, axis=-1)]
        for out, token in zip(together, tokens, strict=True):
            out.append(token)
        logits, caches = batched_step(backend, [([t], c) for t, c in zip(tokens, caches, strict=True)])
    assert [c.length for c in caches] == [len(p) + steps for p in PROMPTS]
    alone = [greedy_ids(backend, p, steps) for p in PROMPTS]
    assert together == alone
    assert len({tuple(t) for t in together}) > 1  # the sequences really differ


def test_lean_step_is_native_and_hf_loops(tiny_models, monkeypatch):
    """The lean engine sends the batch through its layers once; the transformers engine runs one forward each."""
    lean = _load(tiny_models["llama"], "lean", monkeypatch)
    calls = []
    original = lean.engine.lean._step
    monkeypatch.setattr(lean.engine.lean, "_step", lambda *a: calls.append(a[0].shape[0]) or original(*a))
    batched_step(lean, [(p, lean.new_cache()) for p in PROMPTS])
    assert calls == [sum(len(p) for p in PROMPTS)]

    hf = _load(tiny_models["llama"], "hf", monkeypatch)
    forwards = []
    original_hf = hf.engine.forward
    monkeypatch.setattr(
        hf.engine, "forward", lambda ids, kv, start: forwards.append(len(ids)) or original_hf(ids, kv, start)
    )
    batched_step(hf, [(p, hf.new_cache()) for p in PROMPTS])
    assert forwards == [len(p) for p in PROMPTS]


def test_lean_step_refuses_a_cache_twice_and_empty_ids(tiny_models, monkeypatch):
    backend = _load(tiny_models["gpt2"], "lean", monkeypatch)
    cache = backend.new_cache()
    with pytest.raises(ValueError, match="twice"):
        backend.step([([1], cache), ([2], cache)])
    with pytest.raises(ValueError, match="at least one token"):
        backend.step([([1], cache), ([], backend.new_cache())])


@pytest.mark.parametrize("impl", ["lean", "hf"])
def test_kv_bytes_per_token(tiny_models, impl, monkeypatch):
    # tiny llama: 2 layers, 2 kv heads, head_dim 64 / 4 heads = 16, float32
    assert _load(tiny_models["llama"], impl, monkeypatch).info.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    # tiny gpt2: 2 layers, 2 heads, head_dim 32
    assert _load(tiny_models["gpt2"], impl, monkeypatch).info.kv_bytes_per_token == 2 * 2 * 2 * 32 * 4


class _SwappedRows(TorchBackend):
    """A broken native step: the rows of the first two sequences come back swapped."""

    name = "swapped-rows"

    def step(self, batch):
        logits, caches = super().step(batch)
        if len(logits) > 1:
            logits[[0, 1]] = logits[[1, 0]]
        return logits, caches


class _StaleCaches(TorchBackend):
    """A broken native step: logits right, but the caches report the length they had before the step."""

    name = "stale-caches"

    def step(self, batch):
        before = [cache.length for _, cache in batch]
        logits, caches = super().step(batch)
        if len(batch) > 1:
            for cache, length in zip(caches, before, strict=True):
                cache.length = length
        return logits, caches


@pytest.mark.parametrize(("broken", "message"), [(_SwappedRows, "sequence 0"), (_StaleCaches, "the cache holds")])
def test_contract_kit_catches_a_broken_batched_step(tiny_models, broken, message, monkeypatch):
    monkeypatch.setenv("GPTCLI_TORCH_IMPL", "lean")
    with pytest.raises(AssertionError, match=message):
        check_backend_contract(broken, tiny_models["llama"])
    backend = TorchBackend.load(tiny_models["llama"], CPU32)
    check_batched_step(backend, [3, 4, 5, 6, 7, 8, 9, 10])  # the same check passes on the real step
