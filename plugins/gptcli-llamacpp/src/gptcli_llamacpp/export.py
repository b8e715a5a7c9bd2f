"""Write a Hugging Face Llama folder (safetensors + tokenizer.json) as an F32 GGUF, for llama.cpp.

This is what lets the llamacpp backend run a model that never was a GGUF: a checkpoint from
`gptcli train`, or the tiny test models. Only the Llama architecture is mapped (what SmolLM2 and
our training presets use); anything else is refused with a hint. The mapping follows llama.cpp's
convert_hf_to_gguf.py: HF's q/k projections are stored in the rotate-half order and llama.cpp's
rope pairs neighbouring values, so q and k rows are permuted back.
"""

from __future__ import annotations

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


def cached_gguf_export(folder: Path) -> Path:
    """The cached F32 GGUF export of a Hugging Face folder, keyed by its files' sizes and times."""
    from gptcli.paths import cache_dir, cache_key

    files = [file for file in sorted(folder.iterdir()) if file.suffix in (".json", ".safetensors")]
    dest = cache_dir() / "llamacpp" / f"{folder.name}-{cache_key(str(folder.resolve()), files=files)}.f32.gguf"
    return dest if dest.is_file() else export_llama_gguf(folder, dest)


def export_llama_gguf(folder: Path, dest: Path) -> Path:
    """Write `folder` as an F32 GGUF at `dest` (atomically: a temp file, then a rename)."""
    import gguf
    from safetensors.numpy import load_file

    from gptcli.hf import read_architecture, read_config, weight_files

    # Which architecture, before anything else: a folder of another family need not parse as a Llama.
    named = (read_config(folder).get("architectures") or ["?"])[0]
    if named not in SUPPORTED:
        raise ModelError(
            f"the llamacpp backend can export only {', '.join(SUPPORTED)} folders to GGUF, not {named}",
            hint="convert it with llama.cpp's convert_hf_to_gguf.py and pass the .gguf file",
        )
    arch = read_architecture(folder)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelError(f"{folder} has no tokenizer.json to put in the GGUF")
    if arch.rope_scaling is not None:
        raise ModelError(f"{folder}: rope scaling is not supported by this exporter")
    n_head, n_kv = arch.heads, arch.kv_heads

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(folder.name)
        writer.add_context_length(arch.context)
        writer.add_embedding_length(arch.hidden)
        writer.add_block_count(arch.layers)
        writer.add_feed_forward_length(arch.intermediate)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_dimension_count(arch.head_dim)
        writer.add_rope_freq_base(arch.rope_theta)
        writer.add_layer_norm_rms_eps(arch.norm_eps)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        _add_tokenizer(writer, tokenizer_file, arch.vocab, read_config(folder))

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


def _add_tokenizer(writer, tokenizer_file: Path, vocab_size: int, cfg: dict) -> None:
    """A byte-level BPE tokenizer.json as llama.cpp's "gpt2" vocabulary (tokens, types, merges), and the
    config's bos/eos token ids."""
    import gguf

    from gptcli.textio import read_json_file
    from gptcli.tokenizer import MAX_TOKENIZER_BYTES

    try:
        data = read_json_file(tokenizer_file, MAX_TOKENIZER_BYTES)
    except (OSError, ValueError) as exc:
        raise ModelError(f"corrupt {tokenizer_file}: {exc}", hint="re-download or replace the file") from None
    model = data.get("model", {}) if isinstance(data, dict) else {}
    if model.get("type") != "BPE":
        raise ModelError(f"{tokenizer_file}: only byte-level BPE tokenizers can be exported")
    vocab: dict[str, int] = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    vocab.update(special)
    size = max(vocab_size, max(vocab.values()) + 1)
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
