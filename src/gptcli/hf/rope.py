"""Rope scaling parameters as transformers reads them: the scalars both rope tables share.

The lean engine (`backends/lean_rope.py`, torch) and the ONNX exporter (`export/rope.py`, numpy) each
build their float32 tables in their own array library; what a rope type's config means is read here once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def rope_type(scaling: Mapping[str, Any] | None) -> str:
    """The rope type of a `rope_scaling` / `rope_parameters` mapping ("default" when there is none)."""
    return "default" if not scaling else str(scaling.get("rope_type", scaling.get("type", "default")))


@dataclass(frozen=True)
class Yarn:
    """YaRN: inverse frequencies interpolated by `factor` below dimension `low`, extrapolated above `high`
    (a linear ramp between), and cos/sin scaled by `attention_factor`."""

    factor: float
    attention_factor: float
    low: float
    high: float


def yarn(theta: float, scaling: Mapping[str, Any], dim: int, context: int, original: int) -> Yarn:
    """The YaRN scalars of a config, as transformers computes them (`original`: the pretraining context)."""
    factor = scaling.get("factor") or context / original
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    return Yarn(factor, float(attention_factor), low, high)
