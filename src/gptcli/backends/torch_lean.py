"""A lean forward pass for the Llama and GPT-2 families, read straight from safetensors.

Why: on CPU, batch-1 decoding is bound by how fast the weights stream through matrix-vector
products, and transformers' module stack adds per-layer Python and mask/cache bookkeeping on top
(and ~2 s of imports to every start). Here each layer is a handful of tensor ops over weights
re-laid out once at load time:
- Q/K/V and gate/up projections fused into one matrix each (fewer, larger products);
- every matrix stored as [in, out] so `x @ W` streams it row-major (for the 49152-row tied lm_head,
  torch's x @ W.T path reads memory at about half that speed here);
- the KV cache is a preallocated buffer per layer, grown by doubling, written in place;
- a step runs several sequences at once (`LeanModel.step`): their tokens are concatenated into one
  [sum(n_i), hidden] matrix, so every dense layer reads its weights once per step (decoding is memory
  bound: eight sequences cost little more than one), while attention runs per sequence over its own
  cache. `forward` is a step of one sequence, through the same code.
Logits and greedy tokens match transformers (tests/test_torch_backend.py checks both).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gptcli.hf import Architecture, file_tensors, safetensors_header

INITIAL_CACHE = 256
Tensors = dict[str, torch.Tensor]


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


def architecture_of(config: Architecture | Mapping[str, Any], source: Path | str = "config.json") -> Architecture:
    """An Architecture, from a config.json dict where a caller still passes one."""
    return config if isinstance(config, Architecture) else Architecture.from_config(config, source=source)


def supports(config: Architecture | Mapping[str, Any]) -> bool:
    """Whether a model's architecture is one the lean path covers exactly."""
    return architecture_of(config).fast_path_refusal() is None


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

    def new_cache(self) -> LeanCache:
        shape = (self.kv_heads, min(INITIAL_CACHE, self.context_length), self.head_dim)
        return LeanCache(
            [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.num_layers)],
            [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.num_layers)],
        )

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

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, cache: LeanCache) -> torch.Tensor:
        """q [heads, n, hd], k/v [kv_heads, n, hd] → [n, heads*hd], after writing k/v into the cache."""
        n, start = q.shape[1], cache.length
        end = start + n
        cache.keys[layer][:, start:end] = k
        cache.values[layer][:, start:end] = v
        keys = cache.keys[layer][:, :end].unsqueeze(0)
        values = cache.values[layer][:, :end].unsqueeze(0)
        gqa = self.heads != self.kv_heads
        if n == 1:
            out = F.scaled_dot_product_attention(q.unsqueeze(0), keys, values, enable_gqa=gqa)
        else:
            mask = torch.ones(n, end, dtype=torch.bool, device=self.device).tril(start)
            out = F.scaled_dot_product_attention(q.unsqueeze(0), keys, values, attn_mask=mask, enable_gqa=gqa)
        return out[0].transpose(0, 1).reshape(n, self.heads * self.head_dim)

    def _attend_spans(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, spans: list[Span]
    ) -> torch.Tensor:
        """Attention of every sequence over its own cache: q [heads, N, hd], k/v [kv_heads, N, hd] → [N, heads*hd]."""
        if len(spans) == 1:
            return self._attend(q, k, v, layer, spans[0].cache)
        # One SDPA call per sequence: exactly what that sequence would compute alone.
        outs = []
        for span in spans:
            rows = slice(span.begin, span.end)
            outs.append(self._attend(q[:, rows], k[:, rows], v[:, rows], layer, span.cache))
        return torch.cat(outs)

    def forward(self, ids: Sequence[int], cache: LeanCache) -> torch.Tensor:
        """Logits (float32, [vocab]) of the last position; the cache grows by len(ids)."""
        return self.step([(ids, cache)])[0]

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
        with torch.inference_mode():
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

    @staticmethod
    def _last_rows(x: torch.Tensor, spans: list[Span]) -> torch.Tensor:
        """Each sequence's last row: the only ones the lm_head needs."""
        return x[[s.end - 1 for s in spans]]

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


def _taker(tensors: Tensors, prefix: str) -> Callable[[str], torch.Tensor]:
    def take(name: str) -> torch.Tensor:
        return tensors.pop(prefix + name)

    return take


class LeanLlama(LeanModel):
    def __init__(self, arch: Architecture, tensors: Tensors, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(device, dtype)
        self.params = sum(t.numel() for t in tensors.values())
        self.heads = arch.heads
        self.kv_heads = arch.kv_heads
        self.head_dim = arch.head_dim
        self.num_layers = arch.layers
        self.context_length = arch.context
        self.eps = arch.norm_eps
        theta = arch.rope_theta
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        self.inv_freq = 1.0 / (theta**exponents)
        self.layers = []
        for i in range(self.num_layers):
            take = _taker(tensors, f"model.layers.{i}.")
            qkv = torch.cat([take(f"self_attn.{p}_proj.weight") for p in "qkv"], 0)
            bias_names = [f"model.layers.{i}.self_attn.{p}_proj.bias" for p in "qkv"]
            qkv_bias = torch.cat([tensors.pop(n) for n in bias_names]) if bias_names[0] in tensors else None
            gate_up = torch.cat([take("mlp.gate_proj.weight"), take("mlp.up_proj.weight")], 0)
            self.layers.append(
                (
                    take("input_layernorm.weight"),
                    qkv.t().contiguous(),
                    qkv_bias,
                    take("self_attn.o_proj.weight").t().contiguous(),
                    take("post_attention_layernorm.weight"),
                    gate_up.t().contiguous(),
                    take("mlp.down_proj.weight").t().contiguous(),
                )
            )
        self.norm = tensors.pop("model.norm.weight")
        self._head_and_embedding(tensors, "model.embed_tokens.weight", arch.tied)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x32.to(x.dtype)

    def _step(self, ids: torch.Tensor, positions: torch.Tensor, spans: list[Span]) -> torch.Tensor:
        n = ids.shape[0]
        x = self._embed(ids)
        freqs = torch.outer(positions.float(), self.inv_freq)  # each row at its own sequence's position
        angles = torch.cat((freqs, freqs), -1)
        cos, sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
        half, hd = self.head_dim // 2, self.head_dim
        q_end, k_end = self.heads * hd, (self.heads + self.kv_heads) * hd

        def rope(t: torch.Tensor) -> torch.Tensor:
            return t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin

        for i, (norm_in, qkv, qkv_bias, out_proj, norm_post, gate_up, down) in enumerate(self.layers):
            y = self._rms(x, norm_in) @ qkv
            if qkv_bias is not None:
                y = y + qkv_bias
            q = rope(y[:, :q_end].view(n, self.heads, hd).transpose(0, 1))
            k = rope(y[:, q_end:k_end].view(n, self.kv_heads, hd).transpose(0, 1))
            v = y[:, k_end:].view(n, self.kv_heads, hd).transpose(0, 1)
            x = x + self._attend_spans(q, k, v, i, spans) @ out_proj
            gate, up = (self._rms(x, norm_post) @ gate_up).chunk(2, -1)
            x = x + (F.silu(gate) * up) @ down
        return (self._rms(self._last_rows(x, spans), self.norm) @ self.head).float()


class LeanGPT2(LeanModel):
    def __init__(self, arch: Architecture, tensors: Tensors, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(device, dtype)
        # Original OpenAI checkpoints name weights without the "transformer." prefix.
        tensors = {
            (k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v
            for k, v in tensors.items()
            if not k.endswith((".attn.bias", ".attn.masked_bias"))
        }
        self.params = sum(t.numel() for t in tensors.values())
        self.heads = self.kv_heads = arch.heads
        self.head_dim = arch.head_dim
        self.num_layers = arch.layers
        self.context_length = arch.context
        self.eps = arch.norm_eps
        self.wpe = tensors.pop("transformer.wpe.weight")
        self.layers = []
        for i in range(self.num_layers):
            take = _taker(tensors, f"transformer.h.{i}.")
            # GPT-2's Conv1D already stores weights as [in, out].
            self.layers.append(
                (
                    (take("ln_1.weight"), take("ln_1.bias")),
                    take("attn.c_attn.weight"),
                    take("attn.c_attn.bias"),
                    take("attn.c_proj.weight"),
                    take("attn.c_proj.bias"),
                    (take("ln_2.weight"), take("ln_2.bias")),
                    take("mlp.c_fc.weight"),
                    take("mlp.c_fc.bias"),
                    take("mlp.c_proj.weight"),
                    take("mlp.c_proj.bias"),
                )
            )
        self.ln_f = (tensors.pop("transformer.ln_f.weight"), tensors.pop("transformer.ln_f.bias"))
        self._head_and_embedding(tensors, "transformer.wte.weight", arch.tied)

    def _ln(self, x: torch.Tensor, ln: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), ln[0], ln[1], self.eps)

    def _step(self, ids: torch.Tensor, positions: torch.Tensor, spans: list[Span]) -> torch.Tensor:
        n = ids.shape[0]
        x = self._embed(ids) + self.wpe[positions]
        d = self.heads * self.head_dim
        for i, (ln1, w_qkv, b_qkv, w_o, b_o, ln2, w_fc, b_fc, w_proj, b_proj) in enumerate(self.layers):
            y = torch.addmm(b_qkv, self._ln(x, ln1), w_qkv)
            q, k, v = (y[:, j * d : (j + 1) * d].view(n, self.heads, self.head_dim).transpose(0, 1) for j in range(3))
            x = x + torch.addmm(b_o, self._attend_spans(q, k, v, i, spans), w_o)
            hidden = F.gelu(torch.addmm(b_fc, self._ln(x, ln2), w_fc), approximate="tanh")
            x = x + torch.addmm(b_proj, hidden, w_proj)
        return (self._ln(self._last_rows(x, spans), self.ln_f) @ self.head).float()


def build(config: Architecture | Mapping[str, Any], files: list[Path], device: str, dtype: torch.dtype) -> LeanModel:
    """Load safetensors files and build the lean model for a supported architecture.

    The architecture is checked against the files' headers first, so a config that disagrees with
    the weights is a ModelError before any tensor is allocated.
    """
    arch = architecture_of(config, files[0].parent / "config.json" if files else "config.json")
    arch.check_tensors({tensor.name: tensor for tensor in file_tensors(files)})
    tensors = load_tensors(files, device, dtype)
    cls = LeanLlama if arch.family == "llama" else LeanGPT2
    return cls(arch, tensors, torch.device(device), dtype)
