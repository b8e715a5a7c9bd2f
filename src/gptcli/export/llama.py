"""The graph body of every llama-like family: Llama, Qwen2/2.5, Qwen3, Mistral, Gemma 3 text and Phi-3.

One pre-norm block with per-family switches read once by hf.Architecture: packed QKV (Phi-3 ships it
packed) with optional biases (Qwen2), q/k RMSNorm per head before rope (Qwen3, Gemma 3), rotary inside
GroupQueryAttention with one cos/sin table per kind of layer (Gemma 3's sliding layers have their own
base), a sliding window per layer (GroupQueryAttention's local_window_size), Gemma's scaled embedding,
(1 + w) norms and extra norms after attention and after the MLP, and a gated MLP (SiLU or GELU-tanh).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gptcli.export.graph import GraphBuilder, gqa, last_position
from gptcli.export.rope import rope_frequencies
from gptcli.hf import SLIDING, Architecture

# Activation of the gated MLP → (contrib op, attributes): QuickGelu(alpha=1) is x·sigmoid(x) = SiLU;
# FastGelu is the tanh approximation of GELU (transformers' gelu_pytorch_tanh and gelu_new).
ACTIVATIONS = {
    "silu": ("QuickGelu", {"alpha": 1.0}),
    "gelu_pytorch_tanh": ("FastGelu", {}),
    "gelu_new": ("FastGelu", {}),
}


def rope_caches(g: GraphBuilder, arch: Architecture, name: str, theta: float, scaling: Any) -> tuple[str, str]:
    """cos and sin tables [context, head_dim / 2] (float32 outer product, as transformers), times the factor."""
    inv_freq, factor = rope_frequencies(theta, scaling, arch.head_dim, arch.context)
    freqs = np.outer(np.arange(arch.context, dtype=np.float32), inv_freq).astype(np.float32)
    cos, sin = np.cos(freqs), np.sin(freqs)
    if factor != 1.0:
        cos, sin = cos * np.float32(factor), sin * np.float32(factor)
    return g.weight(f"{name}cos_cache", cos), g.weight(f"{name}sin_cache", sin)


def _norm_weight(arch: Architecture, weight: np.ndarray) -> np.ndarray:
    """Gemma's RMSNorm scales by (1 + w): folded into the weight (in float32) once, here."""
    return weight.astype(np.float32) + np.float32(arch.norm_offset) if arch.norm_offset else weight


def _linear(g: GraphBuilder, x: str, w: dict[str, np.ndarray], key: str, name: str, weight: np.ndarray) -> str:
    """x @ weight.T (+ the bias `key`.bias when the checkpoint has one)."""
    out = g.op("MatMul", [x, g.weight(f"{name}.weight", weight.T)], f"{name}/MatMul")
    if f"{key}.bias" in w:
        out = g.op("Add", [out, g.weight(f"{name}.bias", w[f"{key}.bias"])], f"{name}/Add")
    return out


def _head_norm(g: GraphBuilder, arch: Architecture, x: str, weight: np.ndarray, name: str) -> str:
    """RMSNorm over each head of x [B, S, heads·head_dim] (Qwen3's and Gemma 3's q/k norms)."""
    per_head = g.op("Reshape", [x, g.const(f"{name}/heads", np.array([0, 0, -1, arch.head_dim], np.int64))], name)
    normed = g.op(
        "SimplifiedLayerNormalization",
        [per_head, g.weight(f"{name}.weight", _norm_weight(arch, weight))],
        f"{name}/norm",
        axis=-1,
        epsilon=arch.norm_eps,
    )
    return g.op("Reshape", [normed, g.const(f"{name}/flat", np.array([0, 0, -1], np.int64))], f"{name}/flat")


def _attention(g: GraphBuilder, arch: Architecture, w: dict[str, np.ndarray], i: int, x: str, ctx: dict) -> str:
    p, name = f"model.layers.{i}.self_attn", f"layers.{i}"
    q_size, kv_size = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    if arch.fused_qkv:
        qkv_w = w[f"{p}.qkv_proj.weight"]
        bias = w.get(f"{p}.qkv_proj.bias")
    else:
        qkv_w = np.concatenate([w[f"{p}.{k}_proj.weight"] for k in "qkv"], axis=0)
        biases = [w.get(f"{p}.{k}_proj.bias") for k in "qkv"]
        bias = None if any(b is None for b in biases) else np.concatenate(biases)  # type: ignore[arg-type]
    qkv = g.op("MatMul", [x, g.weight(f"{name}.qkv.weight", qkv_w.T)], f"{name}/attn/qkv/MatMul")
    if bias is not None:
        qkv = g.op("Add", [qkv, g.weight(f"{name}.qkv.bias", bias)], f"{name}/attn/qkv/Add")
    qkv_inputs: str | list[str] = qkv
    if arch.qk_norm:
        sizes = g.const(f"{name}/attn/qkv/sizes", np.array([q_size, kv_size, kv_size], np.int64))
        q, k, v = g.op("Split", [qkv, sizes], f"{name}/attn/qkv/Split", outputs=3, axis=-1)
        q = _head_norm(g, arch, q, w[f"{p}.q_norm.weight"], f"{name}/attn/q_norm")
        k = _head_norm(g, arch, k, w[f"{p}.k_norm.weight"], f"{name}/attn/k_norm")
        qkv_inputs = [q, k, v]
    sliding = bool(arch.layer_types) and arch.layer_types[i] == SLIDING
    attn = gqa(
        g, name, i, qkv_inputs, arch, ctx["seqlens_k"], ctx["total_len"],
        rope=ctx["local_rope" if sliding else "rope"],
        window=arch.sliding_window if sliding else None,
    )  # fmt: skip
    return _linear(g, attn, w, f"{p}.o_proj", f"{name}/attn/o", w[f"{p}.o_proj.weight"])


def _mlp(g: GraphBuilder, arch: Architecture, w: dict[str, np.ndarray], i: int, x: str) -> str:
    p, name = f"model.layers.{i}.mlp", f"layers.{i}/mlp"
    if arch.fused_gate_up:
        gate_up_w = w[f"{p}.gate_up_proj.weight"]
    else:
        gate_up_w = np.concatenate([w[f"{p}.gate_proj.weight"], w[f"{p}.up_proj.weight"]], axis=0)
    gate_up = g.op("MatMul", [x, g.weight(f"layers.{i}.gate_up.weight", gate_up_w.T)], f"{name}/gate_up/MatMul")
    gate, up = split2(g, gate_up, arch.intermediate, f"{name}/split")
    op, attrs = ACTIVATIONS[arch.activation]
    act = g.op(op, [gate], f"{name}/act", **attrs)
    mlp = g.op("Mul", [act, up], f"{name}/mul")
    down = g.weight(f"layers.{i}.down.weight", w[f"{p}.down_proj.weight"].T)
    return g.op("MatMul", [mlp, down], f"{name}/down/MatMul")


def llama_body(g: GraphBuilder, arch: Architecture, w: dict[str, np.ndarray], seqlens_k: str, total_len: str) -> str:
    """The decoder layers from input_ids to the final norm of the last position."""
    ctx: dict[str, Any] = {"seqlens_k": seqlens_k, "total_len": total_len}
    ctx["rope"] = rope_caches(g, arch, "", arch.rope_theta, arch.rope_scaling)
    if arch.rope_local_theta is not None and SLIDING in arch.layer_types:  # Gemma 3: plain rope, own base
        ctx["local_rope"] = rope_caches(g, arch, "local_", arch.rope_local_theta, None)
    else:
        ctx["local_rope"] = ctx["rope"]
    embed = w["model.embed_tokens.weight"]
    if arch.embedding_scale != 1.0:  # Gemma: embedding · sqrt(hidden), folded into the table (float32 product)
        embed = embed.astype(np.float32) * np.float32(arch.embedding_scale)
    x = g.op("Gather", [g.weight("model.embed_tokens.weight", embed), "input_ids"], "embed")
    eps = arch.norm_eps

    def norm(key: str, name: str) -> str:
        return g.weight(name, _norm_weight(arch, w[key]))

    def rms_norm(x: str, key: str, weight_name: str, node: str) -> str:
        return g.op("SimplifiedLayerNormalization", [x, norm(key, weight_name)], node, axis=-1, epsilon=eps)

    normed = rms_norm(x, "model.layers.0.input_layernorm.weight", "ln.0", "layers.0/input_norm")
    residual = x
    for i in range(arch.layers):
        p, name = f"model.layers.{i}", f"layers.{i}"
        attn = _attention(g, arch, w, i, normed, ctx)
        if arch.sandwich_norms:  # Gemma: norm the attention output, then the pre-MLP norm with the residual add
            attn = rms_norm(
                attn, f"{p}.post_attention_layernorm.weight", f"{name}.post_attn_ln", f"{name}/post_attn_norm"
            )
            pre_mlp = norm(f"{p}.pre_feedforward_layernorm.weight", f"{name}.pre_mlp_ln")
        else:
            pre_mlp = norm(f"{p}.post_attention_layernorm.weight", f"{name}.post_ln")
        normed, _, _, residual = g.op(
            "SkipSimplifiedLayerNormalization",
            [attn, residual, pre_mlp],
            f"{name}/pre_mlp_norm",
            outputs=[f"{name}/pre_mlp_normed", "", "", f"{name}/residual1"],
            epsilon=eps,
        )
        mlp = _mlp(g, arch, w, i, normed)
        if arch.sandwich_norms:
            mlp = rms_norm(
                mlp, f"{p}.post_feedforward_layernorm.weight", f"{name}.post_mlp_ln", f"{name}/post_mlp_norm"
            )
        next_key = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < arch.layers else "model.norm.weight"
        normed, _, _, residual = g.op(
            "SkipSimplifiedLayerNormalization",
            [mlp, residual, norm(next_key, f"{name}.next_ln")],
            f"{name}/next_norm",
            outputs=[f"{name}/next_normed", "", "", f"{name}/residual2"],
            epsilon=eps,
        )
    return last_position(g, normed)


def split2(g: GraphBuilder, x: str, size: int, name: str) -> tuple[str, str]:
    split = g.const(f"{name}/sizes", np.array([size, size], dtype=np.int64))
    first, second = g.op("Split", [x, split], name, outputs=2, axis=-1)
    return first, second
