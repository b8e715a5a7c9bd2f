"""Pure token-selection functions over one row of float32 logits.

Order (the llama.cpp/transformers order): logit bias → repetition penalty → frequency and presence
penalties → temperature (0 = greedy) → top-k → top-p → min-p → draw from the explicit RNG.
`token_logprobs` reports what the model itself gave a token (the raw logits, before any of these), as
OpenAI's and vLLM's `logprobs` do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gptcli.config import SamplingConfig


class SeededDraws:
    """Uniform draws in [0, 1) from `np.random.default_rng(seed)`, the generator made at the first draw: a greedy
    reply draws none, and numpy.random's import is ~10 ms of a start-up."""

    def __init__(self, seed: int | None) -> None:
        if seed is not None and seed < 0:  # numpy's own refusal, said now rather than at the first draw
            raise ValueError("expected non-negative integer")
        self.seed = seed
        self.generator: np.random.Generator | None = None

    def random(self) -> float:
        if self.generator is None:
            self.generator = np.random.default_rng(self.seed)
        return float(self.generator.random())


def make_rng(seed: int | None) -> SeededDraws:
    return SeededDraws(seed)


def apply_logit_bias(logits: np.ndarray, bias: Sequence[tuple[int, float]]) -> np.ndarray:
    """OpenAI's logit_bias: add each listed token's bias to its logit (-100 all but bans it, +100 all but forces it)."""
    if not bias:
        return logits
    ids = np.fromiter((token for token, _ in bias), dtype=np.int64, count=len(bias))
    values = np.fromiter((value for _, value in bias), dtype=np.float64, count=len(bias))
    inside = ids < logits.shape[-1]
    out = logits.copy()
    np.add.at(out, ids[inside], values[inside].astype(out.dtype))
    return out


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability under the model, and the `top` most likely tokens (id, log-probability)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


# A temperature this small is greedy (vLLM's rule): dividing logits by less could overflow them.
GREEDY_BELOW = 1e-5


def token_logprobs(logits: np.ndarray, token_id: int, top: int = 0) -> TokenLogprob:
    """Log-softmax of one row of raw logits (float64): the token's value and the `top` best, most likely first."""
    row = logits.astype(np.float64)
    peak = row.max()
    log_total = peak + np.log(np.exp(row - peak).sum())
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        count = min(top, row.shape[-1])
        ids = np.argpartition(-row, count - 1)[:count]
        ids = ids[np.argsort(-row[ids], kind="stable")]
        best = tuple((int(i), float(row[i] - log_total)) for i in ids)
    return TokenLogprob(float(row[token_id] - log_total), best)


def next_token_logprobs(rows: np.ndarray, targets: Sequence[int], top: int = 0) -> list[TokenLogprob]:
    """token_logprobs for each row of logits [n, vocab] and the token that followed it (a prompt's own tokens)."""
    return [token_logprobs(row, int(target), top) for row, target in zip(rows, targets, strict=True)]


def apply_repetition_penalty(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """CTRL-style penalty: divide positive logits of seen tokens, multiply negative ones."""
    if penalty == 1.0 or len(history) == 0:
        return logits
    seen = np.unique(np.asarray(history, dtype=np.int64))
    seen = seen[seen < logits.shape[-1]]
    out = logits.copy()
    values = out[seen]
    # A tiny penalty may push a logit to inf (or be 0 in the logits' float32): sample() takes that.
    with np.errstate(over="ignore", divide="ignore"):
        out[seen] = np.where(values > 0, values / penalty, values * penalty)
    return out


def apply_frequency_presence(
    logits: np.ndarray, generated: Sequence[int], frequency: float, presence: float
) -> np.ndarray:
    """OpenAI's penalties over the reply so far (not the prompt, as vLLM counts them): each token's logit
    goes down by frequency x its count, and by presence once it has appeared (negative values favour repeats)."""
    if (frequency == 0.0 and presence == 0.0) or len(generated) == 0:
        return logits
    ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
    inside = ids < logits.shape[-1]
    ids, counts = ids[inside], counts[inside]
    out = logits.copy()
    out[ids] -= (frequency * counts + presence).astype(out.dtype)
    return out


def filter_probs(probs: np.ndarray, top_k: int, top_p: float, min_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The candidate ids (most likely first) and their renormalised probabilities after the filters."""
    if min_p > 0.0:
        candidates = np.flatnonzero(probs >= min_p * probs.max())
    elif 0 < top_k < probs.shape[-1]:
        candidates = np.argpartition(-probs, top_k - 1)[:top_k]
    else:
        candidates = np.arange(probs.shape[-1])
    order = candidates[np.argsort(-probs[candidates], kind="stable")]
    if 0 < top_k < order.shape[-1]:
        order = order[:top_k]
    kept = probs[order]
    if top_p < 1.0:
        # Keep each token whose preceding mass is still under top_p: the smallest prefix reaching it.
        mass_before = np.cumsum(kept) - kept
        cut = max(1, int(np.count_nonzero(mass_before < top_p * probs.sum() - 1e-9)))
        order, kept = order[:cut], kept[:cut]
    return order, kept / kept.sum()


def sample(
    logits: np.ndarray,
    params: SamplingConfig,
    rng: SeededDraws,
    history: Sequence[int] = (),
    generated: Sequence[int] = (),
) -> int:
    """Pick the next token id from last-position logits. `history` is the prompt and the reply so far (the
    repetition penalty's span), `generated` the reply alone (the frequency and presence penalties')."""
    logits = apply_logit_bias(logits, params.logit_bias)
    logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    logits = apply_frequency_presence(logits, generated, params.frequency_penalty, params.presence_penalty)
    if params.temperature < GREEDY_BELOW:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    # A tiny repetition penalty can push a logit to inf: it is then the (only) likeliest token, not a NaN.
    scaled = np.nan_to_num(scaled, nan=-np.inf, posinf=np.finfo(np.float64).max)
    with np.errstate(over="ignore"):  # -1e308 less that max is -inf: probability 0, as it should be, not a warning
        scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    ids, kept = filter_probs(probs, params.top_k, params.top_p, params.min_p)
    choice = int(np.searchsorted(np.cumsum(kept), rng.random() * kept.sum(), side="right"))
    return int(ids[min(choice, len(ids) - 1)])
