"""The fused decoder graph: its inputs and outputs (the I/O contract), the shared attention bookkeeping,
then the family's body (llama.py for every llama-like family, gpt2.py) and the lm_head."""

from __future__ import annotations

from typing import Any

import numpy as np

from gptcli import __version__
from gptcli.export.gpt2 import gpt2_body
from gptcli.export.graph import LOGITS_TO_KEEP, MS_OPSET, OPSET, GraphBuilder, compute_dtype, lm_head
from gptcli.export.llama import llama_body
from gptcli.hf import LLAMA_LIKE, Architecture


def build_graph(arch: Architecture, weights: dict[str, np.ndarray], *, precision: str, device: str = "cpu") -> Any:
    """The fused decoder graph as an onnx ModelProto (weights still inline)."""
    from onnx import TensorProto, helper

    half = compute_dtype(precision, device) == "float16"
    float_type = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    g = GraphBuilder(float_type)
    kv_shape = ["batch_size", arch.kv_heads, "past_sequence_length", arch.head_dim]
    present_shape = ["batch_size", arch.kv_heads, "present_sequence_length", arch.head_dim]
    g.inputs += [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]),  # 1 when decoding
    ]
    for i in range(arch.layers):
        for kind in ("key", "value"):
            g.inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", float_type, kv_shape))
            g.outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", float_type, present_shape))
    logits_shape = ["batch_size", "logits_length", arch.vocab]
    g.outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, logits_shape))

    # Attention bookkeeping shared by all layers: GQA wants lengths, not a mask.
    g.const("one_i64", np.array([1], dtype=np.int64))
    mask_sum = g.op("ReduceSum", ["attention_mask", "one_i64"], "mask/sum", keepdims=0)
    last_index = g.op("Sub", [mask_sum, "one_i64"], "mask/minus1")
    seqlens_k = g.op("Cast", [last_index], "mask/seqlens_k", to=TensorProto.INT32)
    mask_shape = g.op("Shape", ["attention_mask"], "mask/shape")
    total_len = g.op("Gather", [mask_shape, g.const("idx1", np.array(1, dtype=np.int64))], "mask/total", axis=0)
    total_len = g.op("Cast", [total_len], "mask/total_i32", to=TensorProto.INT32)

    if arch.family in LLAMA_LIKE:
        hidden = llama_body(g, arch, weights, seqlens_k, total_len)
        embed = weights["model.embed_tokens.weight"]  # unscaled: Gemma scales only the input embedding
        head = embed if arch.tied or "lm_head.weight" not in weights else weights["lm_head.weight"]
    else:
        hidden = gpt2_body(g, arch, weights, seqlens_k, total_len)
        head = weights["transformer.wte.weight"]
    logits = lm_head(g, hidden, head)
    if float_type != TensorProto.FLOAT:
        logits = g.op("Cast", [logits], "logits/cast", to=TensorProto.FLOAT)
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits/identity"))

    return g.finish(
        "gptcli-decoder",
        [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", MS_OPSET)],
        producer_name="gptcli",
        producer_version=__version__,
        ir_version=10,
    )
