"""A lean forward pass for the decoder-only families, read straight from safetensors.

Why: on CPU, batch-1 decoding is bound by how fast the weights stream through matrix-vector
products, and transformers' module stack adds per-layer Python and mask/cache bookkeeping on top
(and ~2 s of imports to every start). Here each layer is a handful of tensor ops over weights
re-laid out once at load time:
- Q/K/V and gate/up projections fused into one matrix each (fewer, larger products);
- every matrix stored as [in, out] so `x @ W` streams it row-major (for the 49152-row tied lm_head,
  torch's x @ W.T path reads memory at about half that speed here);
- the KV cache is a preallocated buffer per layer, grown by doubling, written in place;
- a step runs several sequences at once (`LeanModel.step`, lean_base.py): their tokens are concatenated
  into one [sum(n_i), hidden] matrix, so every dense layer reads its weights once per step (decoding is
  memory bound: eight sequences cost little more than one), while attention runs per sequence over its
  own cache. `forward` is a step of one sequence, through the same code.
`LeanDecoder` runs every llama-like family (Llama, Qwen2/2.5, Qwen3, Mistral, Gemma 3 text, Phi-3) from
the switches hf.Architecture reads once; `LeanGPT2` runs GPT-2. Logits and greedy tokens match
transformers (tests/test_torch_backend.py, tests/test_families.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gptcli.backends.lean_base import LeanCache, LeanModel, Span, Tensors, load_tensors
from gptcli.backends.lean_rope import RopeTable, rope_table
from gptcli.hf import SLIDING, Architecture, file_tensors

__all__ = ["INITIAL_CACHE", "LeanCache", "LeanDecoder", "LeanGPT2", "LeanModel", "architecture_of", "build", "supports"]

INITIAL_CACHE = 256  # positions a new cache holds before its first regrowth (read when a model is built)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu_new": lambda t: F.gelu(t, approximate="tanh"),
}


def architecture_of(config: Architecture | Mapping[str, Any], source: Path | str = "config.json") -> Architecture:
    """An Architecture, from a config.json dict where a caller still passes one."""
    return config if isinstance(config, Architecture) else Architecture.from_config(config, source=source)


def refusal(config: Architecture | Mapping[str, Any]) -> str | None:
    """Why the lean engine cannot run this model exactly (transformers' engine runs it instead), or None."""
    return architecture_of(config).fast_path_refusal("lean")


def supports(config: Architecture | Mapping[str, Any]) -> bool:
    """Whether a model's architecture is one the lean path covers exactly."""
    return refusal(config) is None


def _taker(tensors: Tensors, prefix: str) -> Callable[[str], torch.Tensor]:
    def take(name: str) -> torch.Tensor:
        return tensors.pop(prefix + name)

    return take


@dataclass
class DecoderLayer:
    """One llama-like block's weights, every matrix as [in, out]; None where the family has no such part."""

    attn_norm: torch.Tensor
    qkv: torch.Tensor  # [hidden, (heads + 2 * kv_heads) * head_dim]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # over each head, before rope (Qwen3, Gemma 3)
    k_norm: torch.Tensor | None
    out: torch.Tensor
    out_bias: torch.Tensor | None
    post_attn_norm: torch.Tensor | None  # Gemma's sandwich norms
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor  # [hidden, 2 * intermediate]
    down: torch.Tensor
    post_mlp_norm: torch.Tensor | None
    rope: RopeTable


class LeanDecoder(LeanModel):
    """The llama-like families: pre-norm rope attention and a gated MLP, with per-family switches."""

    def __init__(self, arch: Architecture, tensors: Tensors, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(device, dtype)
        self.params = sum(t.numel() for t in tensors.values())
        self.heads, self.kv_heads, self.head_dim = arch.heads, arch.kv_heads, arch.head_dim
        self.num_layers = arch.layers
        self.context_length = arch.context
        self.eps, self.norm_offset = arch.norm_eps, arch.norm_offset
        self.activation = ACTIVATIONS[arch.activation]
        self.attention_scale = arch.attention_scale
        # Gemma scales the embedding by sqrt(hidden) rounded to the weights' dtype, as transformers does.
        self.embedding_scale = (
            torch.tensor(arch.embedding_scale).to(device=device, dtype=dtype) if arch.embedding_scale != 1.0 else None
        )
        sliding = [kind == SLIDING for kind in arch.layer_types] or [False] * arch.layers
        self.windows = [arch.sliding_window if slides else None for slides in sliding]
        full_rope = rope_table(arch.rope_theta, arch.rope_scaling, arch.head_dim, arch.context, device)
        local_rope = (
            rope_table(arch.rope_local_theta, None, arch.head_dim, arch.context, device)
            if arch.rope_local_theta is not None
            else full_rope
        )
        self.layers = [
            self._layer(arch, tensors, f"model.layers.{i}.", rope)
            for i, rope in enumerate(local_rope if slides else full_rope for slides in sliding)
        ]
        self.norm = self._norm_weight(tensors.pop("model.norm.weight"))
        self._head_and_embedding(tensors, "model.embed_tokens.weight", arch.tied)
        unused = [name for name in tensors if not name.endswith("rotary_emb.inv_freq")]
        if unused:  # a weight this engine would ignore: refuse rather than compute something else
            raise ValueError(f"weights the lean engine does not use: {', '.join(sorted(unused)[:3])}")

    def _layer(self, arch: Architecture, tensors: Tensors, prefix: str, rope: RopeTable) -> DecoderLayer:
        take = _taker(tensors, prefix)

        def optional(name: str) -> torch.Tensor | None:
            return tensors.pop(prefix + name, None)

        if arch.fused_qkv:
            qkv, qkv_bias = take("self_attn.qkv_proj.weight"), optional("self_attn.qkv_proj.bias")
        else:
            qkv = torch.cat([take(f"self_attn.{p}_proj.weight") for p in "qkv"])
            q_bias = optional("self_attn.q_proj.bias")
            kv_biases = [] if q_bias is None else [take(f"self_attn.{p}_proj.bias") for p in "kv"]
            qkv_bias = None if q_bias is None else torch.cat([q_bias, *kv_biases])
        if arch.fused_gate_up:
            gate_up = take("mlp.gate_up_proj.weight")
        else:
            gate_up = torch.cat([take("mlp.gate_proj.weight"), take("mlp.up_proj.weight")])
        norm = self._norm_weight
        # Without sandwich norms, "post_attention_layernorm" is the norm before the MLP (Llama's name for it).
        post_attn = norm(take("post_attention_layernorm.weight"))
        mlp_norm = norm(take("pre_feedforward_layernorm.weight")) if arch.sandwich_norms else post_attn
        return DecoderLayer(
            attn_norm=norm(take("input_layernorm.weight")),
            qkv=qkv.t().contiguous(),
            qkv_bias=qkv_bias,
            q_norm=norm(take("self_attn.q_norm.weight")) if arch.qk_norm else None,
            k_norm=norm(take("self_attn.k_norm.weight")) if arch.qk_norm else None,
            out=take("self_attn.o_proj.weight").t().contiguous(),
            out_bias=optional("self_attn.o_proj.bias"),
            post_attn_norm=post_attn if arch.sandwich_norms else None,
            mlp_norm=mlp_norm,
            gate_up=gate_up.t().contiguous(),
            down=take("mlp.down_proj.weight").t().contiguous(),
            post_mlp_norm=norm(take("post_feedforward_layernorm.weight")) if arch.sandwich_norms else None,
            rope=rope,
        )

    def _matrices(self) -> list[tuple[Any, str]]:
        return [(layer, name) for layer in self.layers for name in ("qkv", "out", "gate_up", "down")]

    def _norm_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Gemma's (1 + w), kept in float32 as transformers computes it; others' w as stored."""
        return self.norm_offset + weight.float() if self.norm_offset else weight

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * weight).to(x.dtype) if self.norm_offset else weight * x32.to(x.dtype)

    def _step(self, ids: torch.Tensor, positions: torch.Tensor, spans: list[Span]) -> torch.Tensor:
        n = ids.shape[0]
        x = self._embed(ids)
        if self.embedding_scale is not None:
            x = x * self.embedding_scale
        seq_ends = [span.cache.length + span.end - span.begin for span in spans for _ in range(span.begin, span.end)]
        tables = {id(layer.rope): layer.rope for layer in self.layers}
        cos_sin = {key: table.cos_sin(positions, seq_ends, self.dtype) for key, table in tables.items()}
        half, hd = self.head_dim // 2, self.head_dim
        q_end, k_end = self.heads * hd, (self.heads + self.kv_heads) * hd

        def rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            return t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin

        for i, layer in enumerate(self.layers):
            y = self._mm(self._rms(x, layer.attn_norm), layer.qkv, layer.qkv_bias)
            q = y[:, :q_end].view(n, self.heads, hd)
            k = y[:, q_end:k_end].view(n, self.kv_heads, hd)
            if layer.q_norm is not None and layer.k_norm is not None:
                q, k = self._rms(q, layer.q_norm), self._rms(k, layer.k_norm)
            cos, sin = cos_sin[id(layer.rope)]
            q, k = rope(q.transpose(0, 1), cos, sin), rope(k.transpose(0, 1), cos, sin)
            v = y[:, k_end:].view(n, self.kv_heads, hd).transpose(0, 1)
            attended = self._mm(self._attend_spans(q, k, v, i, spans), layer.out, layer.out_bias)
            if layer.post_attn_norm is not None:
                attended = self._rms(attended, layer.post_attn_norm)
            x = x + attended
            gate, up = self._mm(self._rms(x, layer.mlp_norm), layer.gate_up).chunk(2, -1)
            mlp = self._mm(self.activation(gate) * up, layer.down)
            if layer.post_mlp_norm is not None:
                mlp = self._rms(mlp, layer.post_mlp_norm)
            x = x + mlp
        return self._mm(self._rms(self._last_rows(x, spans), self.norm), self.head).float()


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
            y = self._mm(self._ln(x, ln1), w_qkv, b_qkv)
            q, k, v = (y[:, j * d : (j + 1) * d].view(n, self.heads, self.head_dim).transpose(0, 1) for j in range(3))
            x = x + self._mm(self._attend_spans(q, k, v, i, spans), w_o, b_o)
            hidden = F.gelu(self._mm(self._ln(x, ln2), w_fc, b_fc), approximate="tanh")
            x = x + self._mm(hidden, w_proj, b_proj)
        return self._mm(self._ln(self._last_rows(x, spans), self.ln_f), self.head).float()


def build(config: Architecture | Mapping[str, Any], files: list[Path], device: str, dtype: torch.dtype) -> LeanModel:
    """Load safetensors files and build the lean model for a supported architecture.

    The architecture is checked against the files' headers first, so a config that disagrees with
    the weights is a ModelError before any tensor is allocated.
    """
    arch = architecture_of(config, files[0].parent / "config.json" if files else "config.json")
    arch.check_tensors({tensor.name: tensor for tensor in file_tensors(files)})
    tensors = load_tensors(files, device, dtype)
    cls = LeanGPT2 if arch.family == "gpt2" else LeanDecoder
    model = cls(arch, tensors, torch.device(device), dtype)
    model.initial_cache = INITIAL_CACHE
    model.native_attention()  # built here, not in the first request (and a bad GPTCLI_NATIVE_KERNELS fails the load)
    return model
