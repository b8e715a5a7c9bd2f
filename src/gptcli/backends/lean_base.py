"""The lean engine's common parts: reading safetensors, the KV cache, attention, the batched step.

Each family module (torch_lean.py) defines the embedding, the layers and the head over these.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gptcli.backends.lean_quant import QuantMatrix
from gptcli.backends.lean_tuning import MKL, NUMPY_BLAS, PACK_ROWS, TALL_OUT_IN, numpy_product, one_row_choice
from gptcli.backends.native_attention import NativeAttention, native_attention_for
from gptcli.hardware import set_blas_threads, torch_threads
from gptcli.hf import safetensors_header

Tensors = dict[str, torch.Tensor]

# oneDNN keeps a compiled kernel for every input shape a batched product has seen, in two caches (oneDNN's
# own and ideep's, above it) of 1,024 entries each, ~0.3 MB per entry: a server's steps have as many row
# counts as its prompts have lengths, so its RSS grew by ~100 MB per 1,000 mixed requests for hours
# (the tiny test model: 0.58 -> 0.97 GB over 4,000 requests). 64 each keep the hot shapes (decode steps)
# and bound the rest; a shape compiled again costs a few ms, on prefill steps that take far longer.
# Read by oneDNN when it first compiles, so set before any step; a value the user set wins.
ONEDNN_CACHE_ENTRIES = "64"
for _name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_name, ONEDNN_CACHE_ENTRIES)


@dataclass
class LeanCache:
    """Per-layer key/value buffers [kv_heads, capacity, head_dim] and the positions filled."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0


@dataclass(frozen=True)
class Span:
    """One sequence's rows [begin, end) in a step's concatenated tokens, and the cache they extend."""

    begin: int
    end: int
    cache: LeanCache


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def load_tensors(files: list[Path], device: str, dtype: torch.dtype) -> Tensors:
    """Read safetensors into tensors that own their memory (plain reads, no mmap).

    A memory map would stay mapped for as long as any tensor viewed it, and its touched pages
    count in RSS on top of the re-laid-out copies: reading each tensor into its own buffer keeps
    peak memory near one copy of the weights.
    """
    tensors: Tensors = {}
    for file in files:
        header = safetensors_header(file)
        with file.open("rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            base = 8 + header_len
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                begin, end = meta["data_offsets"]
                tensor = torch.empty(meta["shape"], dtype=SAFETENSORS_DTYPES[meta["dtype"]])
                handle.seek(base + begin)
                if end > begin:
                    handle.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
                if tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                tensors[name] = tensor.to(device) if device != "cpu" else tensor
    return tensors


# A one-row step on numpy's BLAS holds torch to one thread, attention included: once the KV cache a token
# reads passes this share of the weights' bytes, attention on one thread costs more than the faster products
# gain (default model, 2 threads, on numpy's BLAS vs packed weights: 29.0 vs 24.0 tok/s at the start of a
# sequence, 18.5 vs 20.2 at 2,048 positions, where the cache read is 17 % of the weights).
NUMPY_KV_SHARE = 0.1


class LeanModel:
    """Common cache handling and attention; subclasses define the embedding, layers and head."""

    num_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    context_length: int
    vocab_size: int
    params: int

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self._many = False  # this step advances several sequences (set by `step`)
        self._every_row = False  # the lm_head runs on every position, not each sequence's last (set by `score`)
        self._packed: dict[int, torch.Tensor] = {}  # id(weight) → its oneDNN-packed copy
        self._onednn = device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
        self._one_row_kernel: str | None = None  # lean_tuning's choice, decided at the first one-row step
        self._on_numpy = False  # this step is one row whose float32 products run on numpy's BLAS (`step`)
        self.initial_cache = 256  # positions a new cache holds before its first regrowth
        self.windows: list[int | None] = []  # per layer: attend to at most this many last positions (None: all)
        self.attention_scale: float | None = None  # None: head_dim ** -0.5
        self._native: NativeAttention | bool | None = False  # False: not looked for yet (`native_attention`)

    def _mm(
        self, x: torch.Tensor, weight: torch.Tensor | QuantMatrix, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x @ weight (+ bias), weight stored [in, out] (or quantized: lean_quant.py, its own kernels).

        One row (one sequence decoding): MKL or numpy's BLAS on the [in, out] layout, or the packed copy
        below, whichever is fastest on this machine (lean_tuning measures it once); where numpy's BLAS
        won, a one-row product outside a numpy step (`_numpy_step`: deep in the cache) runs packed.
        Several rows (a prefill chunk, or several sequences at once): oneDNN on a packed copy of the
        weight, made the first time a step needs it. MKL's few-row sgemm falls far below the bandwidth
        floor (measured, 1 thread: the 49152-row head at 8 rows took 34 ms in MKL, 10 ms packed), so a
        batched step would cost 3x a single one instead of little more; at 64-512 rows (a prefill) it
        was 1.2-1.6x slower than packed (AMD EPYC, 2 threads). The price: the weights are held twice.
        """
        if isinstance(weight, QuantMatrix):
            return weight.mm(x, bias)
        if self._on_numpy and x.shape[0] == 1:
            y = numpy_product(x, weight)
            return y if bias is None else y.add_(bias)
        if self._onednn and (x.shape[0] > 1 or self._row_kernel() != MKL):
            packed = self._packed.get(id(weight))
            if packed is None:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.t().contiguous(), PACK_ROWS)
                self._packed[id(weight)] = packed
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return x @ weight if bias is None else torch.addmm(bias, x, weight)

    def _row_kernel(self) -> str:
        """The float32 kernel of one-row products: this machine's measured choice (lean_tuning)."""
        if self._one_row_kernel is None:
            choice = one_row_choice(self.params)
            self._one_row_kernel = choice["kernel"]
            if self._one_row_kernel == NUMPY_BLAS:
                set_blas_threads(torch.get_num_threads())  # the count the choice was measured at
                if choice.get(TALL_OUT_IN):
                    self._hold_tall_as_out_in()
        return self._one_row_kernel

    def _hold_tall_as_out_in(self) -> None:
        """Keep each float matrix with more inputs than outputs as [out, in] memory, still seen as [in, out].

        numpy's BLAS then reads it as one dot product per output, which lean_tuning measured faster for such
        shapes on this machine. The products are the same up to summation order; a packed copy moves along.
        """
        for owner, name in self._matrices():
            weight = getattr(owner, name)
            if isinstance(weight, torch.Tensor) and weight.shape[0] > weight.shape[1] and weight.is_contiguous():
                moved = weight.t().contiguous().t()
                packed = self._packed.pop(id(weight), None)
                if packed is not None:
                    self._packed[id(moved)] = packed
                setattr(owner, name, moved)

    def _matrices(self) -> list[tuple[Any, str]]:
        """(object, attribute) of each layer matrix that may change memory order (none unless a family says)."""
        return []

    def _numpy_step(self, rows: int, depth: int) -> bool:
        """Whether a step of `rows` tokens after `depth` cached positions runs its products on numpy's BLAS:
        one row of a float32 model (quantized weights keep their own kernels), on a machine where that
        kernel was measured fastest, while attention reads little beside the weights (NUMPY_KV_SHARE)."""
        if rows != 1 or not self._onednn or not isinstance(self.head, torch.Tensor):
            return False
        kv_bytes = self.kv_bytes_per_position() * depth
        return kv_bytes <= NUMPY_KV_SHARE * self.params * self.dtype.itemsize and self._row_kernel() == NUMPY_BLAS

    def kv_bytes_per_position(self) -> int:
        """Key and value of every layer for one cached position."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.dtype.itemsize

    def new_cache(self) -> LeanCache:
        shape = (self.kv_heads, min(self.initial_cache, self.context_length), self.head_dim)
        return LeanCache(
            [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.num_layers)],
            [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.num_layers)],
        )

    def fork(self, cache: LeanCache, length: int) -> LeanCache:
        """A new cache holding a copy of the first `length` positions of `cache`."""
        copy = self.new_cache()
        self._reserve(copy, length)
        for target, source in ((copy.keys, cache.keys), (copy.values, cache.values)):
            for layer, buffer in enumerate(source):
                target[layer][:, :length] = buffer[:, :length]
        copy.length = length
        return copy

    def _reserve(self, cache: LeanCache, needed: int) -> None:
        capacity = cache.keys[0].shape[1]
        if needed <= capacity:
            return
        new_capacity = min(max(needed, 2 * capacity), max(needed, self.context_length))
        for buffers in (cache.keys, cache.values):
            for i, old in enumerate(buffers):
                grown = torch.zeros((old.shape[0], new_capacity, old.shape[2]), device=self.device, dtype=self.dtype)
                grown[:, : cache.length] = old[:, : cache.length]
                buffers[i] = grown

    @property
    def _groups_one_row(self) -> bool:
        """A one-row step attends per key-head group (`_attend`): grouped query heads in bf16/fp16."""
        return self.heads != self.kv_heads and self.dtype != torch.float32

    def _window(self, layer: int) -> int | None:
        """How many last positions the layer attends to (a sliding layer's window), or None: all."""
        return self.windows[layer] if self.windows else None

    def _first_seen(self, layer: int, start: int) -> int:
        """The first cached position that a query at `start` (or after it) can see: 0, or a sliding layer's window."""
        window = self._window(layer)
        return 0 if window is None else max(0, start + 1 - window)

    def native_attention(self) -> NativeAttention | None:
        """gptcli's own attention (native_attention.py), looked for once (`build` does at load); None: SDPA."""
        if self._native is False:
            scale = self.attention_scale or self.head_dim**-0.5
            self._native = native_attention_for(
                self.device, self.dtype, self.heads, self.kv_heads, self.head_dim, scale
            )
        return self._native or None

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, cache: LeanCache) -> torch.Tensor:
        """q [heads, n, hd], k/v [kv_heads, n, hd] → [n, heads*hd], after writing k/v into the cache.

        A sliding layer's query at position p sees positions (p - window, p], as transformers' mask; the
        cache keeps every position, so only the keys some query of this chunk can see are read. gptcli's own
        attention runs it where it can (one row: the same call as in company, so the same bits).
        """
        n, start, window = q.shape[1], cache.length, self._window(layer)
        if (native := self.native_attention()) is not None:
            return (
                native.decode(q, k, v, [cache], layer, window)
                if n == 1
                else native.prefill(q, k, v, cache, layer, window)
            )
        end = start + n
        cache.keys[layer][:, start:end] = k
        cache.values[layer][:, start:end] = v
        first = self._first_seen(layer, start)
        keys = cache.keys[layer][:, first:end].unsqueeze(0)
        values = cache.values[layer][:, first:end].unsqueeze(0)
        gqa = self.heads != self.kv_heads
        mask = None
        if n > 1:
            rows = torch.arange(start, end, device=self.device)[:, None]
            cols = torch.arange(first, end, device=self.device)[None, :]
            mask = cols <= rows if window is None else (cols <= rows) & (cols > rows - window)
        if n == 1 and self._groups_one_row:
            # One query row in bf16/fp16: a query head group shares its key head, so the group is one
            # attention of `heads / kv_heads` rows. The same numbers as enable_gqa, ~7x faster on CPU
            # (bf16 SDPA with enable_gqa copies the keys per head); fp32 keeps SDPA's own GQA (faster there).
            grouped = q.reshape(1, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
            out = F.scaled_dot_product_attention(grouped, keys, values, scale=self.attention_scale)
            return out.reshape(1, self.heads * self.head_dim)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0), keys, values, attn_mask=mask, enable_gqa=gqa, scale=self.attention_scale
        )
        return out[0].transpose(0, 1).reshape(n, self.heads * self.head_dim)

    def _attend_spans(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, spans: list[Span]
    ) -> torch.Tensor:
        """Attention of every sequence over its own cache: q [heads, N, hd], k/v [kv_heads, N, hd] → [N, heads*hd]."""
        if len(spans) == 1:
            return self._attend(q, k, v, layer, spans[0].cache)
        decoding = all(span.end - span.begin == 1 for span in spans)
        if decoding and (native := self.native_attention()) is not None:
            return native.decode(q, k, v, [span.cache for span in spans], layer, self._window(layer))
        if decoding and not self._groups_one_row:
            return self._attend_decode_rows(q, k, v, layer, [span.cache for span in spans])
        # One SDPA call per sequence: exactly what that sequence would compute alone.
        outs = []
        for span in spans:
            rows = slice(span.begin, span.end)
            outs.append(self._attend(q[:, rows], k[:, rows], v[:, rows], layer, span.cache))
        return torch.cat(outs)

    def _attend_decode_rows(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, caches: list[LeanCache]
    ) -> torch.Tensor:
        """One new token per sequence: q [heads, B, hd], k/v [kv_heads, B, hd] → [B, heads*hd].

        The same SDPA call per sequence as `_attend` makes for it alone, on the same memory (so the same
        numbers), with the views around it taken once for all sequences: `_attend` costs ~15 small ops a
        sequence a layer, which at 8 sequences were a fifth of a float32 step.
        """
        queries = q.transpose(0, 1)[:, None, :, None, :].unbind(0)  # B × [1, heads, 1, hd]
        new_keys, new_values = k.unbind(1), v.unbind(1)  # B × [kv_heads, hd]
        outs = []
        for i, cache in enumerate(caches):
            position, keys, values = cache.length, cache.keys[layer], cache.values[layer]
            keys[:, position] = new_keys[i]
            values[:, position] = new_values[i]
            first = self._first_seen(layer, position)
            outs.append(
                F.scaled_dot_product_attention(
                    queries[i],
                    keys[None, :, first : position + 1],
                    values[None, :, first : position + 1],
                    enable_gqa=self.heads != self.kv_heads,
                    scale=self.attention_scale,
                )
            )
        return torch.cat(outs, 2)[0].transpose(0, 1).reshape(len(caches), self.heads * self.head_dim)

    def forward(self, ids: Sequence[int], cache: LeanCache) -> torch.Tensor:
        """Logits (float32, [vocab]) of the last position; the cache grows by len(ids)."""
        return self.step([(ids, cache)])[0]

    def score(self, ids: Sequence[int], cache: LeanCache) -> torch.Tensor:
        """Logits (float32, [len(ids), vocab]) of every position (scoring a text); the cache grows by len(ids)."""
        self._every_row = True
        try:
            return self.step([(ids, cache)])
        finally:
            self._every_row = False

    def step(self, batch: Sequence[tuple[Sequence[int], LeanCache]]) -> torch.Tensor:
        """Logits (float32, [B, vocab]) of each sequence's last position; cache i grows by len(ids_i).

        Entries may mix prefill chunks and single decode tokens; each must bring its own cache.
        """
        if len({id(cache) for _, cache in batch}) != len(batch):
            raise ValueError("a cache appears twice in one step")
        flat: list[int] = []
        positions: list[int] = []
        spans: list[Span] = []
        for ids, cache in batch:
            if len(ids) == 0:
                raise ValueError("every sequence in a step needs at least one token")
            self._reserve(cache, cache.length + len(ids))
            spans.append(Span(len(flat), len(flat) + len(ids), cache))
            flat.extend(ids)
            positions.extend(range(cache.length, cache.length + len(ids)))
        self._many = len(spans) > 1
        self._on_numpy = self._numpy_step(len(flat), batch[0][1].length)
        # numpy's BLAS brings its own threads: torch's would spin beside them and both pools lose the cores.
        with torch.inference_mode(), torch_threads(1) if self._on_numpy else contextlib.nullcontext():
            logits = self._step(
                torch.tensor(flat, dtype=torch.long, device=self.device),
                torch.tensor(positions, dtype=torch.long, device=self.device),
                spans,
            )
        for span in spans:
            span.cache.length += span.end - span.begin
        return logits

    def _step(self, ids: torch.Tensor, positions: torch.Tensor, spans: list[Span]) -> torch.Tensor:
        """ids and positions [N] (all sequences' tokens, concatenated) → last-row logits [B, vocab]."""
        raise NotImplementedError

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed[ids] if self.embed is not None else self.head[:, ids].t()

    def _last_rows(self, x: torch.Tensor, spans: list[Span]) -> torch.Tensor:
        """Each sequence's last row: the only ones the lm_head needs (every row while scoring)."""
        return x if self._every_row else x[[s.end - 1 for s in spans]]

    def _head_and_embedding(self, tensors: Tensors, embed_key: str, tied: bool) -> None:
        """Keep the lm_head as [hidden, vocab]; a tied embedding is read from its columns."""
        embedding = tensors.pop(embed_key)
        head = tensors.pop("lm_head.weight", None)
        self.vocab_size = embedding.shape[0]
        if head is None or tied:
            self.embed = None
            self.head = embedding.t().contiguous()
        else:
            self.embed = embedding
            self.head = head.t().contiguous()
