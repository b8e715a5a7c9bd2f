"""Timing loops: llama-bench micro tests on `backend.forward` (or, with --npl, llama-batched-bench's
parallel sequences on `batched_step`), and vLLM-style request latency.

Micro tests feed synthetic token ids straight to the backend, so tokenization and sampling are not
timed. Latency runs real prompts through the real tokenizer, sampler and decoding loop.
"""

from __future__ import annotations

import itertools
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gptcli.backends.base import Backend, batched_step, release_cache
from gptcli.bench.spec import MicroTest
from gptcli.bench.stats import distribution
from gptcli.config import SamplingConfig
from gptcli.engine.limits import DEFAULT_PREFILL_CHUNK as PREFILL_CHUNK
from gptcli.textio import read_text_file
from gptcli.tokenizer import Tokenizer

Clock = Callable[[], float]
Notify = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def time_micro(
    backend: Backend,
    test: MicroTest,
    reps: int,
    *,
    clock: Clock = time.perf_counter,
    seed: int = 0,
    warmup: bool = True,
    notify: Notify = _quiet,
) -> list[float]:
    """Seconds per repetition of `test`; only the test's own forward calls are inside the clock.

    A prompt is read PREFILL_CHUNK tokens a call, as the engine (and llama-bench's default ubatch) reads one.
    Depth is prefilled once (untimed) and the cache truncated back to it before each repetition.
    A pure tgN runs after an untimed 1-token prompt. The warm-up (not recorded) runs the prefill and
    a few decode steps, as llama-bench does.
    """
    if test.npl is not None:
        return time_batched(backend, test, reps, clock=clock, seed=seed, warmup=warmup, notify=notify)
    rng = np.random.default_rng(seed)
    vocab = backend.info.vocab_size

    def ids(n: int) -> list[int]:
        return rng.integers(0, vocab, size=n).tolist()

    def prefill(prompt: list[int], cache: Any) -> Any:
        for at in range(0, len(prompt), PREFILL_CHUNK):
            _, cache = backend.forward(prompt[at : at + PREFILL_CHUNK], cache)
        return cache

    depth_cache = None
    if test.depth:
        depth_cache = prefill(ids(test.depth), backend.new_cache())

    def fresh_cache() -> Any:
        if depth_cache is None:
            return backend.new_cache()
        return backend.truncate(depth_cache, test.depth)

    def once(n_gen: int) -> float:
        cache = fresh_cache()
        if test.n_prompt == 0:
            _, cache = backend.forward(ids(1), cache)
        prompt, steps = ids(test.n_prompt), ids(n_gen)
        start = clock()
        cache = prefill(prompt, cache)
        for token in steps:
            _, cache = backend.forward([token], cache)
        return clock() - start

    if warmup:
        once(min(test.n_gen, 4))
    samples = []
    for rep in range(reps):
        notify(f"{test.name}: repetition {rep + 1}/{reps}")
        samples.append(once(test.n_gen))
    return samples


def time_batched(
    backend: Backend,
    test: MicroTest,
    reps: int,
    *,
    clock: Clock = time.perf_counter,
    seed: int = 0,
    warmup: bool = True,
    notify: Notify = _quiet,
) -> list[float]:
    """llama-batched-bench: seconds per repetition for `test.npl` sequences, each with its own cache.

    The prefill is ONE `batched_step` of npl entries of n_prompt tokens (per PREFILL_CHUNK); each decode step is ONE
    `batched_step` of npl single tokens. Depth is prefilled once per sequence (untimed) and cut back
    before each repetition; a pure tgN runs after an untimed 1-token prompt per sequence. Caches are
    released once a repetition (or, with depth, the whole test) is done with them.
    """
    rng = np.random.default_rng(seed)
    vocab, npl = backend.info.vocab_size, test.sequences

    def ids(n: int) -> list[list[int]]:
        return rng.integers(0, vocab, size=(npl, n)).tolist()

    def prefill(prompts: list[list[int]], caches: list[Any]) -> list[Any]:
        for at in range(0, len(prompts[0]), PREFILL_CHUNK):
            _, caches = batched_step(
                backend, [(p[at : at + PREFILL_CHUNK], c) for p, c in zip(prompts, caches, strict=True)]
            )
        return caches

    depth_caches: list[Any] | None = None
    if test.depth:
        depth_caches = prefill(ids(test.depth), [backend.new_cache() for _ in range(npl)])

    def fresh_caches() -> list[Any]:
        if depth_caches is None:
            return [backend.new_cache() for _ in range(npl)]
        return [backend.truncate(cache, test.depth) for cache in depth_caches]

    def once(n_gen: int) -> float:
        caches = fresh_caches()
        if test.n_prompt == 0:
            _, caches = batched_step(backend, list(zip(ids(1), caches, strict=True)))
        prompts, steps = ids(test.n_prompt), ids(n_gen)
        start = clock()
        caches = prefill(prompts, caches)
        for step in range(n_gen):
            _, caches = batched_step(backend, [([row[step]], cache) for row, cache in zip(steps, caches, strict=True)])
        elapsed = clock() - start
        if depth_caches is None:
            for cache in caches:
                release_cache(backend, cache)
        else:
            depth_caches[:] = caches  # a backend may hand back new cache objects: keep the latest
        return elapsed

    try:
        if warmup:
            once(min(test.n_gen, 4))
        samples = []
        for rep in range(reps):
            notify(f"{test.name}: repetition {rep + 1}/{reps}")
            samples.append(once(test.n_gen))
        return samples
    finally:
        for cache in depth_caches or []:
            release_cache(backend, cache)


@dataclass
class LatencySamples:
    """Per-request numbers in seconds; ITL pooled over every gap between consecutive tokens."""

    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    interrupted: bool = False  # Ctrl-C (or SIGTERM) ended the run: these are the requests that finished before it

    def add(self, start: float, times: list[float], end: float, prompt_tokens: int, reason: str) -> None:
        """One finished request: its start, each token's time, its end."""
        e2e = end - start
        ttft = (times[0] - start) if times else e2e
        self.ttft.append(ttft)
        self.e2e.append(e2e)
        if len(times) > 1:
            self.tpot.append((e2e - ttft) / (len(times) - 1))
        self.itl += [b - a for a, b in itertools.pairwise(times)]
        self.prompt_tokens.append(prompt_tokens)
        self.output_tokens.append(len(times))
        self.finish_reasons.append(reason)

    def summary(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        for name in ("ttft", "tpot", "itl", "e2e"):
            values = [v * 1000 for v in getattr(self, name)]
            metrics[f"{name}_ms"] = distribution(values).as_dict() if values else None
        total_time = sum(self.e2e)
        return {
            "requests": len(self.e2e),
            "prompt_tokens": sum(self.prompt_tokens),
            "output_tokens": sum(self.output_tokens),
            "output_tokens_per_s": round(sum(self.output_tokens) / total_time, 3) if total_time > 0 else 0.0,
            **metrics,
            "samples": {
                "ttft_ms": [round(v * 1000, 3) for v in self.ttft],
                "tpot_ms": [round(v * 1000, 3) for v in self.tpot],
                "itl_ms": [round(v * 1000, 3) for v in self.itl],
                "e2e_ms": [round(v * 1000, 3) for v in self.e2e],
                "output_tokens": list(self.output_tokens),
                "finish_reasons": list(self.finish_reasons),
            },
        }


def time_requests(
    backend: Backend,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    reps: int,
    *,
    clock: Clock = time.perf_counter,
    warmup: bool = True,
    notify: Notify = _quiet,
) -> LatencySamples:
    """Each prompt, `reps` times, one request after another (batch 1), timed from the raw text:
    chat template + tokenizer + prefill + sampling + detokenizer, i.e. what a user waits for. Ctrl-C ends the
    run: the requests that finished are returned (`interrupted` set), the one it cut is not counted."""
    from gptcli.decoding import Finished, Token
    from gptcli.engine import generate
    from gptcli.prompts import fit_prompt

    warned: set[str] = set()

    def request(text: str) -> tuple[float, list[float], float, int, str]:
        start = clock()
        prompt = fit_prompt(
            tokenizer,
            text,
            context_length=backend.info.context_length,
            max_tokens=sampling.max_tokens,
            on_overflow="truncate",
        )
        if prompt.warning is not None and text not in warned:  # what is timed is its end: said once a prompt
            warned.add(text)
            notify(f"warning: latency: {prompt.warning} (prompt {prompts.index(text) + 1})")
        times: list[float] = []
        reason = "length"
        for event in generate(backend, tokenizer, prompt.ids, sampling, clock=clock):
            if isinstance(event, Token) and event.id is not None:
                times.append(event.t)
            elif isinstance(event, Finished):
                reason = event.reason
        end = clock()
        return start, times, end, len(prompt.ids), reason

    samples = LatencySamples()
    try:
        if warmup and request(prompts[0])[-1] == "interrupted":
            samples.interrupted = True
            return samples
        total = reps * len(prompts)
        for done, text in enumerate(itertools.chain.from_iterable(itertools.repeat(prompts, reps)), 1):
            notify(f"latency: request {done}/{total}")
            start, times, end, n_prompt, reason = request(text)
            if reason == "interrupted":  # the decoding loop ends a Ctrl-C'd request so: the run ends with it
                samples.interrupted = True
                break
            samples.add(start, times, end, n_prompt, reason)
    except KeyboardInterrupt:  # between two requests, outside the decoding loop
        samples.interrupted = True
    return samples


def peak_memory() -> dict[str, float | None]:
    """This process's peak resident set (MiB), and the peak CUDA memory torch allocated, if any."""
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = usage / 2**20 if sys.platform == "darwin" else usage / 1024  # bytes on macOS, KiB on Linux
    gpu = None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gpu = torch.cuda.max_memory_allocated() / 2**20
    return {"peak_rss_mib": round(rss_mib, 1), "gpu_peak_mib": round(gpu, 1) if gpu is not None else None}


DEFAULT_PROMPTS = (
    "Write a haiku about autumn.",
    "Explain in two sentences why the sky is blue.",
    "List three uses for a paperclip.",
    "What is the capital of France, and what is it known for?",
)


def read_prompts(path: Path | None) -> list[str]:
    """Latency prompts: one per non-empty line of `path`, or the built-in ones."""
    from gptcli.errors import InputError

    if path is None:
        return list(DEFAULT_PROMPTS)
    lines = [line.strip() for line in read_text_file(path).splitlines() if line.strip()]
    if not lines:
        raise InputError(f"{path} holds no prompts", hint="one prompt per line")
    return lines
