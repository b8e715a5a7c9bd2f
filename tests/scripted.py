"""A scripted backend: logits from a queue, to test the decoding loop and the CLI without a model."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from gptcli.backends.base import LoadOptions, ModelInfo


@dataclass
class ScriptedCache:
    length: int = 0


class ScriptedBackend:
    """Each forward call returns logits that make the next scripted token the clear favourite."""

    name: ClassVar[str] = "scripted"

    def __init__(self, script: Sequence[int], vocab_size: int, context_length: int = 64) -> None:
        self.script = list(script)
        self.vocab_size = vocab_size
        self.calls: list[list[int]] = []
        self.info = ModelInfo("scripted", "Scripted", context_length, vocab_size, 0, 0, "float32", "cpu")

    @classmethod
    def unavailable_reason(cls, device: str = "auto") -> str | None:
        return None

    @classmethod
    def load(cls, folder: Path, options: LoadOptions) -> ScriptedBackend:
        script = json.loads(os.environ["GPTCLI_TEST_SCRIPT"])
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        return cls(script, vocab, int(os.environ.get("GPTCLI_TEST_CONTEXT", "64")))

    def new_cache(self) -> ScriptedCache:
        return ScriptedCache()

    def forward(self, ids: Sequence[int], cache: ScriptedCache) -> tuple[np.ndarray, ScriptedCache]:
        time.sleep(float(os.environ.get("GPTCLI_TEST_DELAY", "0")))
        self.calls.append(list(ids))
        position = len(self.calls) - 1
        logits = np.zeros(self.vocab_size, dtype=np.float32)
        if position < len(self.script):
            logits[self.script[position]] = 50.0
        cache.length += len(ids)
        return logits, cache

    def truncate(self, cache: ScriptedCache, length: int) -> ScriptedCache:
        cache.length = min(cache.length, length)
        return cache
