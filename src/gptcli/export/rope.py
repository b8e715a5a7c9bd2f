"""Rope tables for the ONNX graph, computed as transformers computes them (float32, operation for operation).

GroupQueryAttention rotates with cos/sin tables it is given, so a rope type that only changes the inverse
frequencies and a factor on cos/sin can be baked in: default, linear, llama3 and yarn. "longrope" (a
second table once a sequence passes the pretraining length) and "dynamic" (frequencies that follow the
longest sequence seen) cannot, and hf.Architecture.fast_path_refusal("onnx") refuses them by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from gptcli.hf.rope import rope_type, yarn

F32 = np.float32


def _plain(theta: float, dim: int) -> np.ndarray:
    return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(F32) / dim))).astype(F32)


def rope_frequencies(
    theta: float, scaling: Mapping[str, Any] | None, dim: int, context: int
) -> tuple[np.ndarray, float]:
    """(inverse frequencies [dim / 2] float32, the factor on cos and sin) of a rope type the graph bakes."""
    kind = rope_type(scaling)
    plain = _plain(theta, dim)
    if scaling is None or kind == "default":
        return plain, 1.0
    original = int(scaling.get("original_max_position_embeddings") or context)
    if kind == "linear":
        return (plain / F32(scaling["factor"])).astype(F32), 1.0
    if kind == "llama3":
        return _llama3(plain, scaling, original), 1.0
    if kind == "yarn":
        return _yarn(theta, scaling, dim, context, original)
    raise ValueError(f"rope type '{kind}' is not implemented in the ONNX graph")


def _llama3(inv_freq: np.ndarray, scaling: Mapping[str, Any], original: int) -> np.ndarray:
    """Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth blend in between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    wavelen = (2 * math.pi / inv_freq).astype(F32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / F32(factor), inv_freq).astype(F32)
    smooth = ((original / wavelen - F32(low)) / F32(high - low)).astype(F32)
    smoothed = ((1 - smooth) * scaled / F32(factor) + smooth * scaled).astype(F32)
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(F32)


def _yarn(theta: float, scaling: Mapping[str, Any], dim: int, context: int, original: int) -> tuple[np.ndarray, float]:
    """YaRN: interpolate the low frequencies, extrapolate the high ones, scale cos/sin by an mscale."""
    y = yarn(theta, scaling, dim, context, original)
    ramp = np.clip((np.arange(dim // 2, dtype=F32) - F32(y.low)) / F32(y.high - y.low), 0, 1).astype(F32)
    pos_freqs = (theta ** (np.arange(0, dim, 2).astype(F32) / dim)).astype(F32)
    extrapolation, interpolation = (1.0 / pos_freqs).astype(F32), (1.0 / (F32(y.factor) * pos_freqs)).astype(F32)
    keep = (1 - ramp).astype(F32)
    return (interpolation * (1 - keep) + extrapolation * keep).astype(F32), y.attention_factor
