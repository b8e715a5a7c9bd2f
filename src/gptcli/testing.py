"""A contract kit for backend authors: `check_backend_contract` runs everything a backend must do.

    from gptcli.testing import check_backend_contract
    check_backend_contract(MyBackend, model_folder, reference=TorchBackend)

It loads the backend, checks the shape and dtype of logits, that a prefill equals the same tokens
fed one at a time, that the cache can be truncated and reused, and (with a reference backend) that
greedy decoding picks the same tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptcli.backends.base import Backend, LoadOptions, ModelInfo


def greedy_ids(backend: Backend, prompt: list[int], steps: int) -> list[int]:
    cache = backend.new_cache()
    logits, cache = backend.forward(prompt, cache)
    out: list[int] = []
    for _ in range(steps):
        token = int(np.argmax(logits))
        out.append(token)
        logits, cache = backend.forward([token], cache)
    return out


def check_backend_contract(
    backend_cls: type[Backend],
    folder: Path,
    *,
    reference: type[Backend] | None = None,
    options: LoadOptions | None = None,
    prompt: list[int] | None = None,
    steps: int = 16,
    atol: float = 1e-4,
) -> Backend:
    """Assert the Backend protocol on a (tiny) model folder; returns the loaded backend."""
    options = options or LoadOptions(device="cpu", dtype="float32")
    assert isinstance(backend_cls.name, str) and backend_cls.name, "backend needs a name"
    assert backend_cls.unavailable_reason("cpu") is None, "backend says it cannot run on this CPU"
    backend = backend_cls.load(folder, options)
    info = backend.info
    assert isinstance(info, ModelInfo)
    assert info.context_length > 8 and info.vocab_size > 0

    prompt = prompt or [i % info.vocab_size for i in range(3, 11)]
    cache = backend.new_cache()
    assert cache.length == 0
    logits, cache = backend.forward(prompt, cache)
    assert isinstance(logits, np.ndarray) and logits.dtype == np.float32, "logits must be float32 numpy"
    assert logits.shape == (info.vocab_size,), f"logits shape {logits.shape}, want ({info.vocab_size},)"
    assert np.isfinite(logits).all()
    assert cache.length == len(prompt)

    # A prefill and token-by-token feeding agree (the cache really carries the prefix).
    stepwise = backend.new_cache()
    for token in prompt:
        step_logits, stepwise = backend.forward([token], stepwise)
    np.testing.assert_allclose(step_logits, logits, atol=atol, rtol=0)

    # Prefill on top of a past equals one prefill of everything.
    split = backend.new_cache()
    _, split = backend.forward(prompt[:3], split)
    split_logits, split = backend.forward(prompt[3:], split)
    np.testing.assert_allclose(split_logits, logits, atol=atol, rtol=0)

    # Truncate then re-feed: the shared prefix is reused.
    longer, cache2 = backend.forward([5, 6], cache)
    cache2 = backend.truncate(cache2, len(prompt) - 1)
    assert cache2.length == len(prompt) - 1
    again, cache2 = backend.forward(prompt[-1:], cache2)
    np.testing.assert_allclose(again, logits, atol=atol, rtol=0)
    assert longer.shape == logits.shape

    if reference is not None:
        ref = reference.load(folder, options)
        ref_logits, _ = ref.forward(prompt, ref.new_cache())
        np.testing.assert_allclose(logits, ref_logits, atol=atol, rtol=0)
        assert greedy_ids(backend, prompt, steps) == greedy_ids(ref, prompt, steps), "greedy tokens differ"
    return backend
