"""The engine's backend step, with prompts read position by position where their logprobs are asked for.

A sequence that asks for its prompt's own logprobs (echo with logprobs) has its prefill chunks read
beside the batched step: the backend's `score_positions` gives the logits of every position, in slices
of SCORE_ROWS positions, since the logits of a whole chunk are rows x vocab floats. The other rows go
through one `batched_step` as always.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gptcli.backends.base import Backend, Cache, batched_step, score_positions
from gptcli.sampling import TokenLogprob, next_token_logprobs

# Prompt positions scored per backend call: 64 MiB of logits at 64 rows of a 262,144-token vocabulary.
SCORE_ROWS = 64


def score_chunk(
    backend: Backend, prompt: Sequence[int], start: int, ids: Sequence[int], cache: Cache, top: int
) -> tuple[np.ndarray, Cache, list[TokenLogprob]]:
    """Read `ids` (the prompt's tokens from position `start`) into the cache. Returns the last position's
    logits, the cache, and the logprob of each prompt token these positions predict."""
    following = prompt[start + 1 : start + len(ids) + 1]  # the token each position predicts
    scores: list[TokenLogprob] = []
    last = np.empty(0)
    for at in range(0, len(ids), SCORE_ROWS):
        rows, cache = score_positions(backend, ids[at : at + SCORE_ROWS], cache)
        targets = following[at : at + SCORE_ROWS]
        scores += next_token_logprobs(rows[: len(targets)], targets, top)
        last = rows[-1]
    return last, cache, scores


def step_scoring_prompts(
    backend: Backend,
    inputs: list[tuple[list[int], object]],
    scoring: dict[int, tuple[Sequence[int], int, int]],
) -> tuple[list[np.ndarray], list[object], dict[int, list[TokenLogprob]]]:
    """One step over the rows `inputs` (ids, cache): each row's last logits and cache, and for each row in
    `scoring` (row: its prompt, the chunk's first position, alternatives wanted) its prompt tokens' logprobs."""
    logits: list[np.ndarray] = [np.empty(0)] * len(inputs)
    caches: list[object] = [None] * len(inputs)
    rest = [row for row in range(len(inputs)) if row not in scoring]
    if rest:
        rows, outs = batched_step(backend, [inputs[row] for row in rest])
        for row, row_logits, cache in zip(rest, rows, outs, strict=True):
            logits[row], caches[row] = row_logits, cache
    scores: dict[int, list[TokenLogprob]] = {}
    for row, (prompt, start, top) in scoring.items():
        ids, cache = inputs[row]
        logits[row], caches[row], scores[row] = score_chunk(backend, prompt, start, ids, cache, top)
    return logits, caches, scores
