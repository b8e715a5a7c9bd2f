"""A contract kit for backend authors: `check_backend_contract` runs everything a backend must do.

    from gptcli.testing import check_backend_contract
    check_backend_contract(MyBackend, model_folder, reference=TorchBackend)

It loads the backend and checks, in order: the name and `unavailable_reason`, `ModelInfo`, an empty
cache, a prefill (float32 logits of shape [vocab], finite), decode steps that grow the cache by one,
that a prefill equals the same tokens fed one at a time and split in two, that a truncated cache is
reused, that a batched step (`batched_step`: the backend's native `step` or the looping default) over
mixed prefills and decode tokens equals each sequence run alone, that scoring (`score_positions`: the
backend's native `score` or the looping default) gives every position's logits as token-by-token
feeding does, and (with a reference backend) that the logits match and greedy decoding picks the same tokens.

Exact backends (torch vs onnx on an fp32 model) use the defaults. A backend that runs a quantised copy
of the reference's weights (llama.cpp on Q4_1 vs torch on the dequantised fp32 model) loosens two
knobs: `compare_reference_logits=False` skips the raw logit comparison, and `greedy_margin` accepts a different
greedy pick when the reference scores it within that many logits of its own best token (a near-tie
that quantisation may flip). Greedy parity is checked teacher-forced, along the reference's path, so
one flipped near-tie does not derail every later step. `expected_greedy` checks the greedy tokens
against a known answer (e.g. the engine's own greedy output).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptcli.backends.base import (
    Backend,
    Cache,
    LoadOptions,
    ModelInfo,
    batched_step,
    fork_of,
    release_cache,
    score_positions,
)


def greedy_ids(backend: Backend, prompt: list[int], steps: int) -> list[int]:
    """Free-running greedy decoding: the argmax of each step fed back in."""
    cache = backend.new_cache()
    logits, cache = backend.forward(prompt, cache)
    out: list[int] = []
    for _ in range(steps):
        token = int(np.argmax(logits))
        out.append(token)
        logits, cache = backend.forward([token], cache)
    return out


def step_logits(backend: Backend, prompt: list[int], continuation: list[int]) -> list[np.ndarray]:
    """Logits after the prompt and after each token of `continuation` (teacher forcing)."""
    logits, cache = backend.forward(prompt, backend.new_cache())
    out = [logits]
    for token in continuation[:-1]:
        logits, cache = backend.forward([token], cache)
        out.append(logits)
    return out


def check_greedy_parity(
    backend: Backend, reference: Backend, prompt: list[int], steps: int, *, margin: float = 0.0
) -> list[int]:
    """Along the reference's greedy path, the backend's argmax must be the reference's, or within
    `margin` logits of it in the reference's own scores. Returns the reference's greedy tokens."""
    path = greedy_ids(reference, prompt, steps)
    ours = step_logits(backend, prompt, path)
    theirs = step_logits(reference, prompt, path)
    for step, (mine, ref, wanted) in enumerate(zip(ours, theirs, path, strict=True)):
        pick = int(np.argmax(mine))
        if pick == wanted:
            continue
        gap = float(ref[wanted] - ref[pick])
        assert gap <= margin, (
            f"greedy step {step}: backend picks token {pick}, reference picks {wanted}; the reference scores "
            f"them {gap:.4f} logits apart (allowed: {margin})"
        )
    return path


def _cache_holding(backend: Backend, history: list[int]) -> Cache:
    cache = backend.new_cache()
    if history:
        _, cache = backend.forward(history, cache)
    return cache


def check_batched_step(backend: Backend, prompt: list[int], *, atol: float = 1e-4) -> None:
    """One batched step over mixed sequences equals each run alone, and so does the next (all-decode) step.

    The batch mixes fresh prompts of different lengths, single decode tokens on caches that already
    hold different lengths, and a prefill chunk on top of a past.
    """
    plans = [  # (what the cache holds before the step, the ids the step feeds)
        ([], list(prompt)),
        ([], list(prompt[:2])),
        (list(prompt), [prompt[0]]),
        (list(prompt[:3]), [prompt[3]]),
        (list(prompt[1:]), list(prompt[:2])),
    ]
    logits, caches = batched_step(backend, [(ids, _cache_holding(backend, past)) for past, ids in plans])
    vocab = backend.info.vocab_size
    assert isinstance(logits, np.ndarray) and logits.dtype == np.float32, "batched logits must be float32 numpy"
    assert logits.shape == (len(plans), vocab), f"batched logits shape {logits.shape}, want ({len(plans)}, {vocab})"
    assert len(caches) == len(plans), f"a step over {len(plans)} sequences returned {len(caches)} caches"
    alone = [backend.forward(ids, _cache_holding(backend, past)) for past, ids in plans]
    for i, ((past, ids), cache, (row, _)) in enumerate(zip(plans, caches, alone, strict=True)):
        np.testing.assert_allclose(
            logits[i], row, atol=atol, rtol=0, err_msg=f"batched step, sequence {i}: vs the same tokens alone"
        )
        want = len(past) + len(ids)
        assert cache.length == want, f"batched step, sequence {i}: the cache holds {cache.length}, want {want}"

    # The grown caches carry on: an all-decode step matches each cache continued alone.
    tokens = [int(np.argmax(row)) for row, _ in alone]
    logits, caches = batched_step(backend, [([t], c) for t, c in zip(tokens, caches, strict=True)])
    for i, (token, (_, cache)) in enumerate(zip(tokens, alone, strict=True)):
        row, _ = backend.forward([token], cache)
        np.testing.assert_allclose(
            logits[i], row, atol=atol, rtol=0, err_msg=f"batched decode step, sequence {i}: vs alone"
        )
        want = len(plans[i][0]) + len(plans[i][1]) + 1
        assert caches[i].length == want, f"batched decode step, sequence {i}: the cache holds {caches[i].length}"


def check_scoring(backend: Backend, prompt: list[int], *, atol: float = 1e-4) -> None:
    """Every position's logits from one scoring pass (on top of a past) equal token-by-token feeding."""
    past, scored = prompt[:2], prompt[2:]
    logits, cache = score_positions(backend, scored, _cache_holding(backend, past))
    vocab = backend.info.vocab_size
    assert isinstance(logits, np.ndarray) and logits.dtype == np.float32, "scored logits must be float32 numpy"
    assert logits.shape == (len(scored), vocab), f"scored logits shape {logits.shape}, want ({len(scored)}, {vocab})"
    assert cache.length == len(prompt), f"scoring left the cache at {cache.length} positions, want {len(prompt)}"
    stepwise = _cache_holding(backend, past)
    for j, token in enumerate(scored):
        row, stepwise = backend.forward([token], stepwise)
        np.testing.assert_allclose(logits[j], row, atol=atol, rtol=0, err_msg=f"scored position {j} vs fed alone")


def check_fork(backend: Backend, prompt: list[int], *, atol: float = 1e-4) -> None:
    """A fork holds a copy of the source's first positions: it continues as the source would have from
    there, and the source (left as it was) continues as before. Backends without `fork` skip this."""
    fork = fork_of(backend)
    if fork is None:
        return
    logits, source = backend.forward(prompt, backend.new_cache())
    split = len(prompt) // 2
    forked = fork(source, split)
    assert forked.length == split and source.length == len(prompt), "fork must copy, not move, the positions"
    again, forked = backend.forward(prompt[split:], forked)
    np.testing.assert_allclose(again, logits, atol=atol, rtol=0, err_msg="a fork continued differently")
    after, _ = backend.forward([prompt[0]], source)
    whole, _ = backend.forward([*prompt, prompt[0]], backend.new_cache())
    np.testing.assert_allclose(after, whole, atol=atol, rtol=0, err_msg="forking changed the source")
    release_cache(backend, forked)


def check_backend_contract(
    backend_cls: type[Backend],
    folder: Path,
    *,
    reference: type[Backend] | None = None,
    options: LoadOptions | None = None,
    prompt: list[int] | None = None,
    steps: int = 16,
    atol: float = 1e-4,
    reference_folder: Path | None = None,
    reference_atol: float | None = None,
    compare_reference_logits: bool = True,
    greedy_margin: float = 0.0,
    expected_greedy: list[int] | None = None,
) -> Backend:
    """Assert the Backend protocol on a model folder; returns the loaded backend.

    atol: how close the backend must be to itself (prefill vs stepwise, split, truncated re-use).
    reference_folder: what the reference loads (default: `folder`).
    reference_atol: how close to the reference's logits (default: atol).
    compare_reference_logits: False skips that comparison (a quantised backend), keeping greedy parity.
    greedy_margin: see the module docstring (0: the same greedy tokens, exactly).
    expected_greedy: the greedy continuation the backend must produce (`steps` tokens).
    """
    options = options or LoadOptions(device="cpu", dtype="float32")
    assert isinstance(backend_cls.name, str) and backend_cls.name, "backend needs a name"
    assert backend_cls.unavailable_reason("cpu") is None, "backend says it cannot run on this CPU"
    backend = backend_cls.load(folder, options)
    info = backend.info
    assert isinstance(info, ModelInfo)
    assert info.context_length > 8 and info.vocab_size > 0

    prompt = prompt or [i % info.vocab_size for i in range(3, 11)]
    assert len(prompt) >= 4, "the contract needs a prompt of at least 4 tokens"
    cache = backend.new_cache()
    assert cache.length == 0, "a new cache must be empty"
    logits, cache = backend.forward(prompt, cache)
    assert isinstance(logits, np.ndarray) and logits.dtype == np.float32, "logits must be float32 numpy"
    assert logits.shape == (info.vocab_size,), f"logits shape {logits.shape}, want ({info.vocab_size},)"
    assert np.isfinite(logits).all(), "logits must be finite"
    assert cache.length == len(prompt), f"cache holds {cache.length} positions after a {len(prompt)}-token prefill"

    # Decode steps: each one token, each grows the cache by one, each gives finite logits.
    decoded = backend.new_cache()
    step, decoded = backend.forward(prompt, decoded)
    for n in range(1, 4):
        step, decoded = backend.forward([int(np.argmax(step))], decoded)
        assert step.shape == (info.vocab_size,) and step.dtype == np.float32 and np.isfinite(step).all()
        assert decoded.length == len(prompt) + n, "a decode step must grow the cache by one"

    # A prefill and token-by-token feeding agree (the cache really carries the prefix).
    stepwise = backend.new_cache()
    for token in prompt:
        step_out, stepwise = backend.forward([token], stepwise)
    np.testing.assert_allclose(step_out, logits, atol=atol, rtol=0, err_msg="prefill vs token-by-token")

    # Prefill on top of a past equals one prefill of everything.
    split = backend.new_cache()
    _, split = backend.forward(prompt[:3], split)
    split_logits, split = backend.forward(prompt[3:], split)
    np.testing.assert_allclose(split_logits, logits, atol=atol, rtol=0, err_msg="split prefill vs one prefill")

    # Truncate then re-feed: the shared prefix is reused.
    longer, cache2 = backend.forward([5, 6], cache)
    assert longer.shape == logits.shape
    cache2 = backend.truncate(cache2, len(prompt) - 1)
    assert cache2.length == len(prompt) - 1, "truncate must leave exactly `length` positions"
    again, cache2 = backend.forward(prompt[-1:], cache2)
    np.testing.assert_allclose(again, logits, atol=atol, rtol=0, err_msg="truncated cache re-used")

    check_batched_step(backend, prompt, atol=atol)
    check_scoring(backend, prompt, atol=atol)
    check_fork(backend, prompt, atol=atol)

    if expected_greedy is not None:
        got = greedy_ids(backend, prompt, len(expected_greedy))
        assert got == list(expected_greedy), f"greedy tokens {got}, expected {list(expected_greedy)}"

    if reference is not None:
        ref = reference.load(reference_folder or folder, options)
        assert ref.info.vocab_size == info.vocab_size, "backend and reference disagree on the vocabulary"
        if compare_reference_logits:
            ref_logits, _ = ref.forward(prompt, ref.new_cache())
            limit = atol if reference_atol is None else reference_atol
            np.testing.assert_allclose(logits, ref_logits, atol=limit, rtol=0, err_msg="logits vs the reference")
        check_greedy_parity(backend, ref, prompt, steps, margin=greedy_margin)
    return backend
