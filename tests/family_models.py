"""Tiny random models of the families the lean engine runs, built from transformers' own config classes.

Shared by tests/test_families.py and benchmarks/bench_families.py. Every family is 2 layers of 4 heads
(2 KV heads) of 16 dims; a sliding window of 8 positions, shorter than the test prompts, wherever the
family has one; biases and norm weights randomised (transformers initialises them to 0 or 1, which would
hide a missing bias or a wrong (1 + w)).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VOCAB = 300
WINDOW = 8
SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
# family → (config class, model class, the family's own settings)
FAMILY_MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # Qwen2.5: q/k/v biases; a sliding window on the layers from max_window_layers on (here the second)
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    ),
    # Qwen3: q/k norms (and, here, attention biases on q/k/v/o too)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"attention_bias": True}),
    # Mistral: every layer slides
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}),
    # Gemma 3: sliding and global layers with their own rope (the global one linearly scaled, as 4B+ ship)
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
            "query_pre_attn_scalar": 24,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            },
        },
    ),
    # Phi-3: fused qkv_proj and gate_up_proj
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}
# Seeds whose greedy continuation of the tests' prompt is more than one token repeated (default 0).
SEEDS = {"qwen3": 3, "gemma3": 1}
# Rope scaling variants the families ship, on the family that ships them: (family, rope_parameters).
ROPE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "linear": ("llama", {"rope_type": "linear", "factor": 4.0}),
    "llama3": (
        "llama",
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "yarn": ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "longrope": (
        "phi3",
        {
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [1.0 + 0.5 * i for i in range(8)],
            "original_max_position_embeddings": 16,
        },
    ),
    "dynamic": ("llama", {"rope_type": "dynamic", "factor": 2.0}),
}


def _randomise(model: Any) -> None:
    """Sharpen the matrices (decisive greedy picks) and give biases and norm weights random values.

    Gemma's embedding is left alone: it is scaled by sqrt(hidden) already, and sharper it would drown the
    residual stream, so the tied head would only ever repeat the last token.
    """
    import torch

    gemma = model.config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if gemma and "embed_tokens" in name:
                continue
            if p.dim() > 1:
                p.mul_(8.0)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            else:  # a norm weight: around 1 for w, around 0 for Gemma's (1 + w)
                p.add_(torch.randn_like(p) * 0.3)


def build_model(folder: Path, family: str, *, seed: int | None = None, **overrides: Any) -> Path:
    """Save a tiny random model of `family` (its settings updated by `overrides`) into `folder`."""
    import torch
    import transformers

    if family == "llama":
        config_name, model_name, settings = "LlamaConfig", "LlamaForCausalLM", {}
    else:
        config_name, model_name, settings = FAMILY_MODELS[family]
    config = getattr(transformers, config_name)(**{**SIZES, **settings, **overrides})
    torch.manual_seed(SEEDS.get(family, 0) if seed is None else seed)
    model = getattr(transformers, model_name)(config).eval()
    _randomise(model)
    model.save_pretrained(folder)
    return folder


def build_rope_variant(folder: Path, variant: str) -> Path:
    family, rope = ROPE_VARIANTS[variant]
    overrides: dict[str, Any] = {"rope_parameters": {"rope_theta": 10000.0, **rope}}
    if family == "phi3":  # Phi-3 keeps the pretraining length outside the rope settings
        overrides["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    return build_model(folder, family, seed=7, **overrides)
