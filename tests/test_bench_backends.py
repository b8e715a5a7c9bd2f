"""Backends for the bench tests, importable by the bench worker process (via GPTCLI_BACKEND_PATHS).

No tests live here; the module name only keeps it among the files the bench feature owns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from gptcli.backends.base import ModelInfo
from tests.scripted import ScriptedBackend

REGISTRY = (
    "scripted=tests.scripted:ScriptedBackend,"
    "scripted2=tests.test_bench_backends:SecondScripted,"
    "broken=tests.test_bench_backends:UnavailableBackend,"
    "stepping=tests.test_bench_backends:SteppingScripted,"
    "refusing=tests.test_bench_backends:RefusingBackend"
)


class SecondScripted(ScriptedBackend):
    """The scripted backend under another name, to compare two backends."""

    name: ClassVar[str] = "scripted2"


class SteppingScripted(ScriptedBackend):
    """The scripted backend with a native batched `step` and `release`, each call recorded."""

    name: ClassVar[str] = "stepping"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[list[int]] = []  # per step call: how many ids each entry fed
        self.released: list[object] = []

    def step(self, batch):
        self.steps.append([len(ids) for ids, _ in batch])
        rows, caches = [], []
        for ids, cache in batch:
            logits, cache = ScriptedBackend.forward(self, ids, cache)
            rows.append(logits)
            caches.append(cache)
        return np.stack(rows), caches

    def release(self, cache) -> None:
        self.released.append(cache)


class UnavailableBackend(ScriptedBackend):
    name: ClassVar[str] = "broken"

    @classmethod
    def unavailable_reason(cls, device: str = "auto") -> str | None:
        return "needs a quantum accelerator"


class RefusingBackend(ScriptedBackend):
    """Available, but refuses the model when it loads it (as an exporter refuses an activation)."""

    name: ClassVar[str] = "refusing"

    @classmethod
    def load(cls, folder, options):
        from gptcli.errors import ModelError

        raise ModelError("cannot export this model: activation relu6 is not supported")


class FakeClock:
    """A clock that only moves when a backend call says so: timings are exactly what a test injects."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class TimedCache:
    length: int = 0


class TimedBackend:
    """Each forward advances the fake clock by `cost(n_ids, call_index)`; logits favour `token`."""

    name: ClassVar[str] = "timed"

    def __init__(
        self, clock: FakeClock, cost: Callable[[int, int], float], vocab: int = 50, token: int = 7, context: int = 4096
    ) -> None:
        self.clock = clock
        self.cost = cost
        self.token = token
        self.calls: list[tuple[int, int]] = []  # (cache length before, ids fed)
        self.info = ModelInfo("timed", "Timed", context, vocab, 1, 1000, "float32", "cpu")

    def new_cache(self) -> TimedCache:
        return TimedCache()

    def forward(self, ids: Sequence[int], cache: TimedCache) -> tuple[np.ndarray, TimedCache]:
        self.clock.now += self.cost(len(ids), len(self.calls))
        self.calls.append((cache.length, len(ids)))
        logits = np.zeros(self.info.vocab_size, dtype=np.float32)
        logits[self.token] = 50.0
        cache.length += len(ids)
        return logits, cache

    def truncate(self, cache: TimedCache, length: int) -> TimedCache:
        cache.length = min(cache.length, length)
        return cache


class BatchedTimedBackend(TimedBackend):
    """A native batched step that costs `cost(ids in the whole batch, step index)` once per call."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[list[tuple[int, int]]] = []  # per step call: (cache length before, ids fed) per entry

    def step(self, batch):
        self.clock.now += self.cost(sum(len(ids) for ids, _ in batch), len(self.steps))
        self.steps.append([(cache.length, len(ids)) for ids, cache in batch])
        for ids, cache in batch:
            cache.length += len(ids)
        logits = np.zeros((len(batch), self.info.vocab_size), dtype=np.float32)
        return logits, [cache for _, cache in batch]
