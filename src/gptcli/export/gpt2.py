"""The GPT-2 graph body: learned positions, biased Conv1D projections, SkipLayerNormalization, FastGelu."""

from __future__ import annotations

import numpy as np

from gptcli.export.graph import GraphBuilder, gqa, last_position
from gptcli.hf import Architecture


def gpt2_body(g: GraphBuilder, arch: Architecture, w: dict[str, np.ndarray], seqlens_k: str, total_len: str) -> str:
    eps = arch.norm_eps
    tokens = g.op("Gather", [g.weight("transformer.wte.weight", w["transformer.wte.weight"]), "input_ids"], "wte")
    positions = g.op("Gather", [g.weight("transformer.wpe.weight", w["transformer.wpe.weight"]), "position_ids"], "wpe")
    normed, _, _, residual = g.op(
        "SkipLayerNormalization",
        [
            tokens,
            positions,
            g.weight("h.0.ln_1.w", w["transformer.h.0.ln_1.weight"]),
            g.weight("h.0.ln_1.b", w["transformer.h.0.ln_1.bias"]),
        ],
        "h.0/ln_1",
        outputs=["h.0/ln_1/out", "", "", "embed/sum"],
        epsilon=eps,
    )
    for i in range(arch.layers):
        p = f"transformer.h.{i}"
        name = f"h.{i}"
        qkv = g.op("MatMul", [normed, g.weight(f"{name}.c_attn.w", w[f"{p}.attn.c_attn.weight"])], f"{name}/qkv/MatMul")
        qkv = g.op("Add", [qkv, g.weight(f"{name}.c_attn.b", w[f"{p}.attn.c_attn.bias"])], f"{name}/qkv/Add")
        attn = gqa(g, name, i, qkv, arch, seqlens_k, total_len, rope=None)
        attn = g.op("MatMul", [attn, g.weight(f"{name}.c_proj.w", w[f"{p}.attn.c_proj.weight"])], f"{name}/o/MatMul")
        normed, _, _, residual = g.op(
            "SkipLayerNormalization",
            [
                attn,
                residual,
                g.weight(f"{name}.ln_2.w", w[f"{p}.ln_2.weight"]),
                g.weight(f"{name}.ln_2.b", w[f"{p}.ln_2.bias"]),
                g.weight(f"{name}.c_proj.b", w[f"{p}.attn.c_proj.bias"]),
            ],
            f"{name}/ln_2",
            outputs=[f"{name}/ln_2/out", "", "", f"{name}/residual1"],
            epsilon=eps,
        )
        fc = g.op("MatMul", [normed, g.weight(f"{name}.c_fc.w", w[f"{p}.mlp.c_fc.weight"])], f"{name}/fc/MatMul")
        act = g.op("FastGelu", [fc, g.weight(f"{name}.c_fc.b", w[f"{p}.mlp.c_fc.bias"])], f"{name}/mlp/FastGelu")
        mlp = g.op("MatMul", [act, g.weight(f"{name}.mlp_proj.w", w[f"{p}.mlp.c_proj.weight"])], f"{name}/proj/MatMul")
        if i + 1 < arch.layers:
            gamma, beta = w[f"transformer.h.{i + 1}.ln_1.weight"], w[f"transformer.h.{i + 1}.ln_1.bias"]
        else:
            gamma, beta = w["transformer.ln_f.weight"], w["transformer.ln_f.bias"]
        normed, _, _, residual = g.op(
            "SkipLayerNormalization",
            [
                mlp,
                residual,
                g.weight(f"{name}.next_ln.w", gamma),
                g.weight(f"{name}.next_ln.b", beta),
                g.weight(f"{name}.mlp_proj.b", w[f"{p}.mlp.c_proj.bias"]),
            ],
            f"{name}/next_ln",
            outputs=[f"{name}/next_ln/out", "", "", f"{name}/residual2"],
            epsilon=eps,
        )
    return last_position(g, normed)
