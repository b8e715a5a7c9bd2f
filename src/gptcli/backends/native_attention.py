"""The lean engine's attention on a CPU by int8_native.c's own functions, over each sequence's own cache:
`gptcli_decode_attention` for the decode rows of a step (one new position per sequence, alone or many) and
`gptcli_prefill_attention` for a prompt's chunk.

torch's SDPA spent most of a decode call outside the reading: on this machine a bf16 call over 2,000 cached
positions read ~12 GB/s (its per-block GEMMs of a 3-row query), and a step made one call per sequence and layer.
A chunk's attention ran at ~70-140 GFLOP/s. The native functions write the new key and value rows into the
cache, then attend: decode rows every (sequence, key head) pair in one call a layer, a chunk each query head's
blocks of 8 positions; each pair or block alone and in a fixed order, so a sequence gets the same bits alone,
in a batch and on any thread count. They take float32 and bfloat16 caches, from the library the int8 kernel
lives in (built once per machine, see int8_native.py); anything else, or that library being unavailable
(`GPTCLI_NATIVE_KERNELS=0`, no compiler, no AVX2), keeps SDPA.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from gptcli.backends import int8_native

if TYPE_CHECKING:
    import torch

CACHE_TYPES = ("torch.float32", "torch.bfloat16")  # (torch is imported with a model, not with this module)
SDPA = "sdpa"


class Cache(Protocol):
    keys: list[torch.Tensor]  # per layer [kv_heads, capacity, head_dim], contiguous
    values: list[torch.Tensor]
    length: int


def _bind(function: Any, pointers: int, sizes: int) -> Any:
    """A function of `pointers` addresses, `sizes` int64s, then (scale, bf16, out, threads); it returns 1 where a
    thread could not allocate its scores."""
    function.restype = ctypes.c_int
    pointer = ctypes.c_void_p
    function.argtypes = [pointer] * pointers + [ctypes.c_int64] * sizes + [ctypes.c_float, ctypes.c_int, pointer]
    function.argtypes += [ctypes.c_int]
    return function


class NativeAttention:
    """int8_native.c's attention functions, bound for one model's shapes. Neither advances a cache's length
    (the step does that, once every layer has run)."""

    def __init__(self, library: ctypes.CDLL, heads: int, kv_heads: int, head_dim: int, scale: float) -> None:
        import torch

        self._torch = torch
        self._decode = _bind(library.gptcli_decode_attention, 7, 5)
        self._prefill = _bind(library.gptcli_prefill_attention, 5, 7)
        self.heads, self.kv_heads, self.head_dim, self.scale = heads, kv_heads, head_dim, scale

    def _operands(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> tuple:
        torch = self._torch
        out = torch.empty(q.shape[1], self.heads * self.head_dim, dtype=torch.float32)
        return q.to(torch.float32).contiguous(), k.to(dtype).contiguous(), v.to(dtype).contiguous(), out

    def _finish(self, failed: int, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if failed:
            raise MemoryError("no memory for the attention's scores")
        return out if dtype == self._torch.float32 else out.to(dtype)

    def decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, caches: Sequence[Cache], layer: int, window: int | None
    ) -> torch.Tensor:
        """q [heads, B, hd], k/v [kv_heads, B, hd]: each sequence's new row, written at its cache's length
        → [B, heads * hd] in the cache's type."""
        count, dtype = len(caches), caches[0].keys[layer].dtype
        queries, new_keys, new_values, out = self._operands(q, k, v, dtype)
        keys = np.fromiter((c.keys[layer].data_ptr() for c in caches), np.int64, count)
        values = np.fromiter((c.values[layer].data_ptr() for c in caches), np.int64, count)
        capacity = np.fromiter((c.keys[layer].shape[1] for c in caches), np.int64, count)
        length = np.fromiter((c.length + 1 for c in caches), np.int64, count)
        addresses = (keys.ctypes.data, values.ctypes.data, capacity.ctypes.data, length.ctypes.data)
        failed = self._decode(
            queries.data_ptr(),
            new_keys.data_ptr(),
            new_values.data_ptr(),
            *addresses,
            *(count, self.heads, self.kv_heads, self.head_dim, window or 0),
            *(self.scale, int(dtype == self._torch.bfloat16), out.data_ptr(), self._torch.get_num_threads()),
        )
        return self._finish(failed, out, dtype)

    def prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: Cache, layer: int, window: int | None
    ) -> torch.Tensor:
        """q [heads, n, hd], k/v [kv_heads, n, hd]: one sequence's chunk, written from its cache's length; each
        position sees itself and the ones before it (within `window`) → [n, heads * hd] in the cache's type."""
        keys, values = cache.keys[layer], cache.values[layer]
        dtype, count = keys.dtype, q.shape[1]
        queries, new_keys, new_values, out = self._operands(q, k, v, dtype)
        failed = self._prefill(
            queries.data_ptr(),
            new_keys.data_ptr(),
            new_values.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            *(keys.shape[1], cache.length, count, self.heads, self.kv_heads, self.head_dim, window or 0),
            *(self.scale, int(dtype == self._torch.bfloat16), out.data_ptr(), self._torch.get_num_threads()),
        )
        return self._finish(failed, out, dtype)


def native_attention_for(
    device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, scale: float
) -> NativeAttention | None:
    """The native attention for a model's cache, or None where SDPA stays (see the module's docstring)."""
    if device.type != "cpu" or str(dtype) not in CACHE_TYPES or heads % kv_heads:
        return None
    native: Any = int8_native.native_kernel()
    if isinstance(native, str):
        return None
    return NativeAttention(native.library, heads, kv_heads, head_dim, scale)


def reported() -> dict[str, Any]:
    """What `gptcli backends --json` and bench's environment say: which attention the lean engine runs, and why."""

    def native() -> dict[str, Any]:
        paths = "decode rows (every sequence of a layer in one call) and prompt chunks"
        return {
            "kernel": int8_native.NATIVE,
            "reason": f"{int8_native.widest_path()}: {paths}, float32 and bfloat16 caches on a CPU (SDPA for the rest)",
        }

    return int8_native.report("torch's SDPA", "attention", native, fallback=SDPA)
