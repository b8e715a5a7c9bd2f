"""A tiny random-weight llama GGUF (float32 tensors, the fixtures' BPE vocabulary): a conversion in seconds."""

from __future__ import annotations

import json
from pathlib import Path

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2


def write_tiny_gguf(path: Path) -> Path:
    """Write a 2-layer llama in GGUF form, as llama.cpp names its tensors; transformers reads it back."""
    import gguf
    import numpy as np

    from tests.conftest import _train_tokenizer

    tok = _train_tokenizer()
    vocab = json.loads(tok.to_str())["model"]
    tokens = [token for token, _ in sorted(vocab["vocab"].items(), key=lambda item: item[1])]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in vocab["merges"]]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    special = gguf.TokenType.CONTROL
    writer.add_token_types([special if t.startswith("<|") else gguf.TokenType.NORMAL for t in tokens])
    writer.add_bos_token_id(tok.token_to_id("<|endoftext|>"))
    writer.add_eos_token_id(tok.token_to_id("<|im_end|>"))
    rng = np.random.default_rng(0)
    kv = KV_HEADS * HIDDEN // HEADS
    shapes = {"token_embd.weight": (len(tokens), HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (HIDDEN,),
            f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.attn_k.weight": (kv, HIDDEN),
            f"blk.{i}.attn_v.weight": (kv, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        }
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def patched_gguf(source: Path, dest: Path, key: str, value: float) -> Path:
    """A copy of `source` with one numeric header value rewritten in place (as a damaged or hand-edited file has it)."""
    import shutil

    import gguf
    import numpy as np

    shutil.copyfile(source, dest)
    reader = gguf.GGUFReader(str(dest), "r+")
    field = reader.fields[key]
    part = field.parts[field.data[0]]
    part[0] = np.array(value).astype(part.dtype)
    reader.data.flush()
    del reader
    return dest


def poisoned_gguf(source: Path, dest: Path, tensor: str, value: float) -> Path:
    """A copy of `source` with every weight of one float32 tensor set to `value` (NaN: a damaged file)."""
    import shutil

    import gguf

    shutil.copyfile(source, dest)
    reader = gguf.GGUFReader(str(dest), "r+")
    next(t for t in reader.tensors if t.name == tensor).data[...] = value
    reader.data.flush()
    del reader
    return dest
