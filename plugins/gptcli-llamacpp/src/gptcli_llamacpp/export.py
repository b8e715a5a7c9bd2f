"""Write a Hugging Face Llama folder (safetensors + tokenizer.json) as an F32 GGUF, for llama.cpp.

This is what lets the llamacpp backend run a model that never was a GGUF: a checkpoint from
`gptcli train`, or the tiny test models. Only the Llama architecture is mapped (what SmolLM2 and
our training presets use); anything else is refused with a hint. The mapping follows llama.cpp's
convert_hf_to_gguf.py: HF's q/k projections are stored in the rotate-half order and llama.cpp's
rope pairs neighbouring values, so q and k rows are permuted back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from gptcli.errors import ModelError

SUPPORTED = ("LlamaForCausalLM",)
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order → llama.cpp's interleaved pairs (convert_hf_to_gguf's LlamaModel.permute)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _gguf_name(hf_name: str) -> str | None:
    name = hf_name.removeprefix("model.")
    if name == "embed_tokens.weight":
        return "token_embd.weight"
    if name == "norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    if parts[0] == "layers":
        key = ".".join(parts[2:-1])
        if key in LAYER_TENSORS:
            return f"blk.{parts[1]}.{LAYER_TENSORS[key]}.{parts[-1]}"
    return None


def export_llama_gguf(folder: Path, dest: Path) -> Path:
    """Write `folder` as an F32 GGUF at `dest` (atomically: a temp file, then a rename)."""
    import gguf
    from safetensors.numpy import load_file

    from gptcli.models import read_config, weight_files

    cfg = read_config(folder)
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise ModelError(
            f"the llamacpp backend can export only {', '.join(SUPPORTED)} folders to GGUF, not {arch}",
            hint="convert it with llama.cpp's convert_hf_to_gguf.py and pass the .gguf file",
        )
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelError(f"{folder} has no tokenizer.json to put in the GGUF")
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    rope = cfg.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if (rope.get("rope_type") or "default") != "default" or cfg.get("rope_scaling"):
        raise ModelError(f"{folder}: rope scaling is not supported by this exporter")

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(folder.name)
        writer.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
        writer.add_embedding_length(hidden)
        writer.add_block_count(cfg["num_hidden_layers"])
        writer.add_feed_forward_length(cfg["intermediate_size"])
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(rope_theta))
        writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        _add_tokenizer(writer, tokenizer_file, cfg)

        tensors: dict[str, np.ndarray] = {}
        for file in weight_files(folder):
            tensors.update(load_file(file))
        for hf_name in sorted(tensors):
            name = _gguf_name(hf_name)
            if name is None:
                continue
            data = tensors[hf_name].astype(np.float32)
            if name.endswith("attn_q.weight"):
                data = _permute(data, n_head)
            elif name.endswith("attn_k.weight"):
                data = _permute(data, n_kv)
            writer.add_tensor(name, np.ascontiguousarray(data))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dest)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return dest


def _add_tokenizer(writer, tokenizer_file: Path, cfg: dict) -> None:
    """A byte-level BPE tokenizer.json as llama.cpp's "gpt2" vocabulary (tokens, types, merges)."""
    import gguf

    data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ModelError(f"{tokenizer_file}: only byte-level BPE tokenizers can be exported")
    vocab: dict[str, int] = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    vocab.update(special)
    size = max(cfg.get("vocab_size", 0), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, index in vocab.items():
        tokens[index] = text
        types[index] = gguf.TokenType.CONTROL if text in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
        value = cfg.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            add(value)
