"""Rotary position tables for the lean engine, computed exactly as transformers computes them.

Each rope type (`rope_parameters.rope_type`) changes only the inverse frequencies and a factor on
cos/sin; the formulas below follow transformers' modeling_rope_utils operation for operation, so the
float32 tables are the same bits. "longrope" keeps two sets: a sequence uses the long one once it runs
past the pretraining context, decided per sequence (transformers decides per forward call, which for
one sequence is the same). "dynamic" is refused upstream (hf.Architecture.fast_path_refusal): its
frequencies depend on the longest sequence the module has seen, so batching would change answers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gptcli.hf.rope import rope_type, yarn


@dataclass(frozen=True)
class RopeTable:
    """The inverse frequencies [head_dim / 2] of one kind of layer, and the factor on cos and sin."""

    inv_freq: torch.Tensor
    attention_factor: float = 1.0
    long_inv_freq: torch.Tensor | None = None  # longrope: for a sequence longer than `original_context`
    original_context: int = 0

    def cos_sin(self, positions: torch.Tensor, seq_ends: Sequence[int], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos, sin [N, head_dim] for each row's position; `seq_ends[i]` is row i's sequence length after the step."""
        if self.long_inv_freq is None:
            freqs = torch.outer(positions.float(), self.inv_freq)
        else:
            long_rows = torch.tensor([end > self.original_context for end in seq_ends], device=positions.device)
            inv_freq = torch.where(long_rows[:, None], self.long_inv_freq, self.inv_freq)
            freqs = positions.float()[:, None] * inv_freq
        angles = torch.cat((freqs, freqs), -1)
        return (angles.cos() * self.attention_factor).to(dtype), (angles.sin() * self.attention_factor).to(dtype)


def _exponents(dim: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim


def rope_table(
    theta: float, scaling: Mapping[str, Any] | None, head_dim: int, context: int, device: torch.device
) -> RopeTable:
    """The table of a rope type that hf.Architecture.fast_path_refusal("lean") lets through."""
    kind = rope_type(scaling)
    plain = 1.0 / (theta ** _exponents(head_dim, device))
    if scaling is None or kind == "default":
        return RopeTable(plain)
    original = int(scaling.get("original_max_position_embeddings") or context)
    if kind == "linear":
        return RopeTable(plain / scaling["factor"])
    if kind == "llama3":
        return RopeTable(_llama3(plain, scaling, original))
    if kind == "yarn":
        return _yarn(theta, scaling, head_dim, context, original, device)
    if kind == "longrope":
        factor = scaling.get("factor") or context / original
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        base = theta ** _exponents(head_dim, device)

        def scaled(factors: Sequence[float]) -> torch.Tensor:
            return 1.0 / (torch.tensor(factors, dtype=torch.float32, device=device) * base)

        return RopeTable(scaled(scaling["short_factor"]), attention_factor, scaled(scaling["long_factor"]), original)
    raise ValueError(f"rope type '{kind}' is not implemented")


def _llama3(inv_freq: torch.Tensor, scaling: Mapping[str, Any], original: int) -> torch.Tensor:
    """Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth blend in between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(
    theta: float, scaling: Mapping[str, Any], dim: int, context: int, original: int, device: torch.device
) -> RopeTable:
    """YaRN: interpolate the low frequencies, extrapolate the high ones, scale cos/sin by an mscale."""
    y = yarn(theta, scaling, dim, context, original)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - y.low) / (y.high - y.low), 0, 1).to(device)
    pos_freqs = theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (y.factor * pos_freqs)
    keep = 1 - ramp
    return RopeTable(interpolation * (1 - keep) + extrapolation * keep, y.attention_factor)
