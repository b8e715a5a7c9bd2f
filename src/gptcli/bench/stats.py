"""Summary statistics for benchmark samples: mean, sample standard deviation, percentiles."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of no values")
    return math.fsum(values) / len(values)


def sample_sd(values: Sequence[float]) -> float:
    """Standard deviation with Bessel's correction (n - 1), as llama-bench reports; 0 for one value."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def mean_sd_text(value: float, sd: float, reps: int, digits: int = 2) -> str:
    """`value ± sd` as a table cell; one repetition has no spread to show ("± 0.00" would claim one)."""
    return f"{value:.{digits}f}" if reps < 2 else f"{value:.{digits}f} ± {sd:.{digits}f}"


def spread_words(reps: int) -> str:
    """How a table's `±` cells were made, for its notes."""
    return "one repetition (no spread)" if reps < 2 else f"the mean ± sample standard deviation over {reps} repetitions"


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside [0, 100]")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


@dataclass(frozen=True)
class Distribution:
    """vLLM's four numbers for a latency metric."""

    mean: float
    median: float
    p90: float
    p99: float

    def as_dict(self, digits: int = 3) -> dict[str, float]:
        return {k: round(v, digits) for k, v in asdict(self).items()}


def distribution(values: Sequence[float]) -> Distribution:
    return Distribution(mean(values), median(values), percentile(values, 90), percentile(values, 99))
