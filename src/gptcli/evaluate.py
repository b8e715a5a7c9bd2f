"""Perplexity of any backend on a text, with strided windows over the model's context.

Each window prefills its context (the part already scored by the previous window), then scores the
rest: the backend's `score` gives the logits of every position in one pass (a few hundred positions
at a time, to bound the logits' memory); a backend without it is fed the scored tokens one at a time
(`score_positions`). Every scored token adds -log p(next token). Windows overlap by
``window - stride`` tokens, so every scored token sees at least that much context (the usual
Hugging Face recipe, expressed over the Backend protocol so torch, onnx and plugins compare fairly).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from gptcli.backends.base import Backend, check_token_ids, score_positions
from gptcli.engine.limits import DEFAULT_PREFILL_CHUNK
from gptcli.errors import InputError, ModelError, UsageError
from gptcli.textio import CHUNK, Limit, read_text_head, text_pieces

Progress = Callable[[int, int], None]
DEFAULT_WINDOW = 1024
SCORE_LOGITS_BYTES = 64 * 2**20  # the logits one scoring pass may hold (341 positions of a 49k vocabulary)
MAX_MEAN_NLL = math.log(sys.float_info.max)  # 709.8 nats per token: past it, exp(mean) is no float
HEAD_BYTES_PER_TOKEN = 8  # a first guess at the bytes N tokens take (English runs ~4); read 4x more while short
HEAD_SLACK_TOKENS = 16  # tokens read past those wanted, where a cut mid-word may have changed them


class Encoder(Protocol):
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float | None  # None: interrupted before a token was scored
    mean_nll: float | None  # nats per scored token
    scored_tokens: int
    total_tokens: int
    windows: int
    window: int
    stride: int
    seconds: float
    partial: bool = False  # interrupted: over the tokens scored so far, `to_score` were planned
    to_score: int = 0

    def as_dict(self) -> dict[str, float | int | bool | None]:
        return asdict(self)


class PerplexityInterrupted(Exception):
    """Ctrl-C (or SIGTERM) while a text was scored: `result` is the perplexity of the tokens scored so far."""

    def __init__(self, result: PerplexityResult) -> None:
        super().__init__("interrupted")
        self.result = result


def log_probs(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """log softmax(row i)[tokens[i]] for every row of logits [n, vocab], in float64 so long texts keep precision."""
    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    norm = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
    return x[np.arange(len(tokens)), tokens] - norm


def encode_text(tokenizer: Encoder, text: str, max_tokens: int | None = None) -> np.ndarray:
    """Token ids of `text` (int32), a piece at a time, stopping once `max_tokens` are known.

    A text under one piece encodes exactly as a single call would; a longer one may differ at the
    piece boundaries (cut after newlines), which moves the perplexity by a hair, not the memory by GBs.
    """
    parts: list[np.ndarray] = []
    count = 0
    for number, piece in enumerate(text_pieces(text)):
        ids = np.asarray(tokenizer.encode(piece, add_special_tokens=number == 0), dtype=np.int32)
        parts.append(ids)
        count += len(ids)
        if max_tokens is not None and count >= max_tokens:
            break
    joined = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return joined[:max_tokens] if max_tokens is not None else joined


def encode_file_start(tokenizer: Encoder, path: Path, limit: Limit, max_tokens: int) -> np.ndarray:
    """The first `max_tokens` token ids of a text file, reading only as much of it as they take (a file over
    `limit` is fine when its start holds them; the limit bounds what is read, not the file).

    A start cut off may end mid-word, so it is read on until it holds HEAD_SLACK_TOKENS more than wanted: the
    tokens before them are those the whole file gives."""
    size = max(CHUNK, max_tokens * HEAD_BYTES_PER_TOKEN)
    while True:
        text, whole = read_text_head(path, limit, size)
        ids = encode_text(tokenizer, text, max_tokens + HEAD_SLACK_TOKENS)
        if whole or len(ids) == max_tokens + HEAD_SLACK_TOKENS:
            return ids[:max_tokens]
        size *= 4  # past the limit, read_text_head refuses the file


def plan_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first scored position, end) per window; no position is scored twice.

    With stride < window every position 1..n-1 is scored; with stride == window the first token
    of each later window has no context inside it and is skipped.
    """
    plans = []
    scored_until = 1  # position 0 has nothing before it to predict it
    begin = 0
    while scored_until < n_tokens:
        end = min(begin + window, n_tokens)
        if end > scored_until:
            plans.append((begin, max(scored_until, begin + 1), end))
            scored_until = end
        begin += stride
    return plans


def perplexity(
    backend: Backend,
    ids: Sequence[int],
    *,
    window: int | None = None,
    stride: int | None = None,
    progress: Progress | None = None,
) -> PerplexityResult:
    """exp(mean negative log-likelihood) of `ids[1:]` under `backend`."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < 2:
        raise InputError("the text is too short to measure perplexity (needs at least 2 tokens)")
    check_token_ids(ids, backend.info.vocab_size)
    context = backend.info.context_length
    window = min(context, DEFAULT_WINDOW) if window is None else window
    if window < 2 or window > context:
        raise UsageError(f"--window must be in 2..{context} (the model's context)")
    stride = max(1, window // 2) if stride is None else stride
    if not 1 <= stride <= window:
        raise UsageError(f"--stride must be in 1..{window} (the window)")
    plans = plan_windows(len(ids), window, stride)
    total_scored = sum(end - first for _, first, end in plans)
    # Positions a pass: as many as the logits budget holds, and no more than the engine reads of a prompt in a step
    # (attention grows with positions x window: a 400-token vocabulary made passes of 41,943 positions, 17 GB).
    chunk = max(1, min(SCORE_LOGITS_BYTES // (4 * backend.info.vocab_size), DEFAULT_PREFILL_CHUNK))
    started = time.perf_counter()
    nll = 0.0
    done = 0
    shape = {"total_tokens": len(ids), "windows": len(plans), "window": window, "stride": stride}
    try:
        for begin, first, end in plans:
            cache = backend.new_cache()
            # The context before the first scored token's predecessor, read as the engine reads a prompt.
            for at in range(begin, first - 1, DEFAULT_PREFILL_CHUNK):
                _, cache = backend.forward(ids[at : min(at + DEFAULT_PREFILL_CHUNK, first - 1)].tolist(), cache)
            # Position p's logits predict token p + 1: score positions first-1 .. end-2.
            for at in range(first - 1, end - 1, chunk):
                upto = min(at + chunk, end - 1)
                logits, cache = score_positions(backend, ids[at:upto].tolist(), cache)
                nll -= float(log_probs(logits, ids[at + 1 : upto + 1]).sum())
                if math.isnan(nll):  # damaged weights, or an overflow at this precision: no perplexity to print
                    raise ModelError(
                        f"the model gives NaN log-probabilities (tokens {at + 1}..{upto} of the text)",
                        hint="try --dtype float32 (--precision fp32 on onnx); if NaN again, the weights are damaged",
                    )
                done += upto - at
                if progress is not None:
                    progress(done, total_scored)
    except KeyboardInterrupt:  # what was scored so far still has a perplexity
        mean = nll / done if done else None
        partial = PerplexityResult(
            perplexity=_exp(mean) if mean is not None else None,
            mean_nll=mean,
            scored_tokens=done,
            seconds=time.perf_counter() - started,
            partial=True,
            to_score=total_scored,
            **shape,
        )
        raise PerplexityInterrupted(partial) from None
    mean = nll / total_scored
    return PerplexityResult(
        perplexity=_exp(mean),
        mean_nll=mean,
        scored_tokens=total_scored,
        seconds=time.perf_counter() - started,
        to_score=total_scored,
        **shape,
    )


def _exp(mean: float) -> float:
    """The perplexity of a mean NLL; a ModelError where it is past what a float holds (damaged weights)."""
    if mean > MAX_MEAN_NLL:  # math.exp would raise OverflowError
        raise ModelError(
            f"the model's perplexity is too large to compute: mean NLL {mean:.6g} nats per token (a working model "
            "gives a few)",
            hint="the weights are likely damaged; try --dtype float32 (--precision fp32 on onnx) to rule out overflow",
        )
    return math.exp(mean)
