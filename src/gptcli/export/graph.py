"""A thin builder over onnx.helper and the pieces every family shares (attention, last position, lm_head).

They serve one I/O contract (assembled in decoder.py), with the Hugging Face names: ``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value`` → ``logits``, ``present.{i}.key|value``,
caches in BNSH layout ``[batch, kv_heads, length, head_dim]``. When a past buffer and its present output are the same
tensor (IO binding), attention writes the new keys in place: the backend relies on that.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from gptcli.hf import Architecture

OPSET = 21
MS_OPSET = 1
GRAPH_VERSION = 11  # bump when the graph layout changes: old cached exports are then rebuilt


class GraphBuilder:
    """A thin collector of nodes, initializers and I/O over onnx.helper."""

    def __init__(self, float_type: int) -> None:
        from onnx import ModelProto

        self.model = ModelProto()  # the initializers are written into its graph as they come (add_tensor)
        self.nodes: list[Any] = []
        self.initializers = self.model.graph.initializer
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self.float_type = float_type
        self._np_float = np.float16 if float_type == 10 else np.float32  # 10 = TensorProto.FLOAT16
        self._counter = 0

    def weight(self, name: str, array: np.ndarray) -> str:
        add_tensor(self.initializers, np.asarray(array, dtype=self._np_float), name)
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        add_tensor(self.initializers, np.asarray(array), name)
        return name

    def finish(self, name: str, opsets: list[Any], **fields: Any) -> Any:
        """The ModelProto of the nodes, I/O and initializers collected (what onnx.helper's make_graph and
        make_model give, without copying the initializers twice more: the default model's fp32 export took
        6.3 s with them, 3.7 s without)."""
        model = self.model
        model.graph.name = name
        model.graph.node.extend(self.nodes)
        model.graph.input.extend(self.inputs)
        model.graph.output.extend(self.outputs)
        model.opset_import.extend(opsets)
        for key, value in fields.items():
            setattr(model, key, value)
        return model

    def op(self, op_type: str, inputs: list[str], name: str, *, outputs: int | list[str] = 1, **attrs: Any) -> Any:
        from onnx import helper

        domain = "com.microsoft" if op_type in _CONTRIB_OPS else ""
        names = outputs if isinstance(outputs, list) else [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, domain=domain, **attrs))
        return names[0] if len(names) == 1 else names


def add_tensor(container: Any, array: np.ndarray, name: str) -> None:
    """`array` as a new tensor at the end of `container` (a graph's initializer field), written in place: what
    numpy_helper.from_array makes, without the copy that appending a finished tensor costs."""
    from onnx import helper, numpy_helper

    if sys.byteorder != "little" or array.dtype.kind not in "biuf":  # from_array swaps to ONNX's byte order
        container.append(numpy_helper.from_array(array, name))
        return
    tensor = container.add()
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.dims.extend(array.shape)
    tensor.raw_data = array.tobytes()  # C order whatever the strides: one copy


_CONTRIB_OPS = {
    "GroupQueryAttention",
    "SkipSimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "FastGelu",
    "QuickGelu",
}


def compute_dtype(precision: str, device: str) -> str:
    """Activations and KV cache: float16 on CUDA (its GroupQueryAttention is half-only), else float32."""
    return "float16" if precision == "fp16" or device == "cuda" else "float32"


LOGITS_TO_KEEP = "logits_to_keep"  # an input: how many trailing positions get logits (1 when decoding)


def last_position(g: GraphBuilder, hidden: str) -> str:
    """hidden[:, -k:, :] with k = the `logits_to_keep` input, so only those positions reach the lm_head.

    Decoding passes 1, the last position; scoring a text (perplexity) asks for every position.
    """
    starts = g.op("Neg", [LOGITS_TO_KEEP], "last/starts")
    ends = g.const("last/ends", np.array([np.iinfo(np.int64).max], dtype=np.int64))
    return g.op("Slice", [hidden, starts, ends, "one_i64"], "last/slice")


def lm_head(g: GraphBuilder, hidden: str, head: np.ndarray) -> str:
    """hidden [B, k, H] → logits [B, k, V] through a [H, V] initializer (a copy when tied).

    A plain MatMul is what the block quantizer picks up, and on fp32 it decodes ~15 % faster here
    than Gemm(transB=1) over the shared embedding (34 vs 30 tok/s), at the cost of one more copy on disk.
    """
    return g.op("MatMul", [hidden, g.weight("lm_head.weight_t", head.T)], "lm_head/MatMul")


def gqa(
    g: GraphBuilder,
    prefix: str,
    layer: int,
    qkv: str | list[str],
    arch: Architecture,
    seqlens_k: str,
    total_len: str,
    *,
    rope: tuple[str, str] | None,
    window: int | None = None,
) -> str:
    """One GroupQueryAttention over packed QKV (or separate q, k, v), rotary inside when `rope` names the
    cos/sin tables, and a sliding window of `window` positions (the query's own included) when given."""
    qkv_inputs = [qkv, "", ""] if isinstance(qkv, str) else list(qkv)
    inputs = [*qkv_inputs, f"past_key_values.{layer}.key", f"past_key_values.{layer}.value", seqlens_k, total_len]
    if rope is not None:
        inputs += [*rope, "position_ids"]
    scale = arch.attention_scale if arch.attention_scale is not None else 1.0 / np.sqrt(arch.head_dim)
    return g.op(
        "GroupQueryAttention",
        inputs,
        f"{prefix}/attn/GroupQueryAttention",
        outputs=[f"{prefix}/attn/out", f"present.{layer}.key", f"present.{layer}.value"],
        num_heads=arch.heads,
        kv_num_heads=arch.kv_heads,
        do_rotary=int(rope is not None),
        rotary_interleaved=0,
        scale=float(scale),
        # the query's own position included, as transformers' `sliding_window` (checked against it in tests)
        local_window_size=-1 if window is None else window,
    )[0]
