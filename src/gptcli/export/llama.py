"""The Llama graph body: rotary inside GroupQueryAttention, packed QKV and gate-up, SkipSimplifiedLayerNorm."""

from __future__ import annotations

import numpy as np

from gptcli.export.graph import GraphBuilder, gqa, last_position
from gptcli.hf import Architecture


def rope_caches(g: GraphBuilder, arch: Architecture) -> None:
    # Computed exactly as transformers does (float32 inverse frequencies, float32 outer product).
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    freqs = np.outer(np.arange(arch.context, dtype=np.float32), inv_freq.astype(np.float32)).astype(np.float32)
    g.weight("cos_cache", np.cos(freqs))
    g.weight("sin_cache", np.sin(freqs))


def llama_body(g: GraphBuilder, arch: Architecture, w: dict[str, np.ndarray], seqlens_k: str, total_len: str) -> str:
    rope_caches(g, arch)
    x = g.op("Gather", [g.weight("model.embed_tokens.weight", w["model.embed_tokens.weight"]), "input_ids"], "embed")
    eps = arch.norm_eps
    normed = g.op(
        "SimplifiedLayerNormalization",
        [x, g.weight("ln.0", w["model.layers.0.input_layernorm.weight"])],
        "layers.0/input_norm",
        axis=-1,
        epsilon=eps,
    )
    residual = x
    for i in range(arch.layers):
        p = f"model.layers.{i}"
        name = f"layers.{i}"
        qkv_w = np.concatenate([w[f"{p}.self_attn.{k}_proj.weight"] for k in "qkv"], axis=0).T
        qkv = g.op("MatMul", [normed, g.weight(f"{name}.qkv.weight", qkv_w)], f"{name}/attn/qkv/MatMul")
        attn = gqa(g, name, i, qkv, arch, seqlens_k, total_len, rotary=True)
        attn = g.op(
            "MatMul", [attn, g.weight(f"{name}.o.weight", w[f"{p}.self_attn.o_proj.weight"].T)], f"{name}/attn/o/MatMul"
        )
        normed, _, _, residual = g.op(
            "SkipSimplifiedLayerNormalization",
            [attn, residual, g.weight(f"{name}.post_ln", w[f"{p}.post_attention_layernorm.weight"])],
            f"{name}/post_attn_norm",
            outputs=[f"{name}/post_norm", "", "", f"{name}/residual1"],
            epsilon=eps,
        )
        gate_up_w = np.concatenate([w[f"{p}.mlp.gate_proj.weight"], w[f"{p}.mlp.up_proj.weight"]], axis=0).T
        gate_up = g.op("MatMul", [normed, g.weight(f"{name}.gate_up.weight", gate_up_w)], f"{name}/mlp/gate_up/MatMul")
        gate, up = split2(g, gate_up, arch.intermediate, f"{name}/mlp/split")
        act = g.op("QuickGelu", [gate], f"{name}/mlp/silu", alpha=1.0)  # x * sigmoid(1.0 * x) = SiLU
        mlp = g.op("Mul", [act, up], f"{name}/mlp/mul")
        mlp = g.op(
            "MatMul",
            [mlp, g.weight(f"{name}.down.weight", w[f"{p}.mlp.down_proj.weight"].T)],
            f"{name}/mlp/down/MatMul",
        )
        next_norm = w[f"model.layers.{i + 1}.input_layernorm.weight"] if i + 1 < arch.layers else w["model.norm.weight"]
        normed, _, _, residual = g.op(
            "SkipSimplifiedLayerNormalization",
            [mlp, residual, g.weight(f"{name}.next_ln", next_norm)],
            f"{name}/next_norm",
            outputs=[f"{name}/next_normed", "", "", f"{name}/residual2"],
            epsilon=eps,
        )
    return last_position(g, normed)


def split2(g: GraphBuilder, x: str, size: int, name: str) -> tuple[str, str]:
    split = g.const(f"{name}/sizes", np.array([size, size], dtype=np.int64))
    first, second = g.op("Split", [x, split], name, outputs=2, axis=-1)
    return first, second
