"""Training batches: random blocks of tokens, reproducible per (seed, stream, step)."""

from __future__ import annotations

from typing import Any

import numpy as np


class Batches:
    """Random blocks from the training tokens, one independent stream per micro-batch of a step.

    A step uses `grad_accum × world` streams; stream j samples only from shard j of the training
    tokens. Rank r runs streams r·accum … r·accum+accum-1, so a 2-process run and a 1-process run
    with twice the accumulation see exactly the same batches. Each (step, stream) draws from a
    generator seeded from (seed, stream, step): no sampler state to save, and a resumed run (on any
    number of processes) continues with exactly the batches it would have seen.
    """

    def __init__(self, tokens: np.ndarray, streams: int, block: int, batch: int, seed: int, device: str) -> None:
        import torch

        self.tokens, self.block, self.batch, self.device, self.seed = tokens, block, batch, device, seed
        size = len(tokens) // streams
        self.shards = [(j * size, size) for j in range(streams)]
        self.generator = torch.Generator()

    def get(self, stream: int, step: int) -> tuple[Any, Any]:
        start, size = self.shards[stream]
        mixed = (self.seed * 0x9E3779B1 + stream * 0x85EBCA77 + step * 0xC2B2AE3D) % (2**63)
        self.generator.manual_seed(mixed)
        return blocks(self.tokens, start, size, self.block, self.batch, self.generator, self.device)


def blocks(tokens: np.ndarray, start: int, size: int, block: int, batch: int, gen: Any, device: str) -> tuple:
    import torch

    ix = (torch.randint(size - block - 1, (batch,), generator=gen) + start).tolist()
    chunk = np.stack([tokens[i : i + block + 1] for i in ix]).astype(np.int64)
    data = torch.from_numpy(chunk)
    x, y = data[:, :-1], data[:, 1:]
    if device != "cpu":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y
