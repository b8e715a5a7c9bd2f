"""Weight-only block quantization of the exported graph: every MatMul with a constant weight becomes a
MatMulNBits (block 32, asymmetric; accuracy level 4 until apply_accuracy_levels writes the per-CPU
choice); 4-bit weights already on a grid keep their grid, and in an int4 export weights on a finer
grid (a GGUF's 5- to 8-bit tensors) stay at 8 bits. Where the onnx backend has gptcli's own int4 kernel
(`native_int4`), a weight on a 4-bit grid becomes one ai.gptcli Int4MatMul node instead, and so does an 8-bit one
whose steps float16 holds (a GGUF's Q8_0 head; see export.native_ops)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from gptcli.export.graph import add_tensor
from gptcli.export.native_ops import INT4_OP_DOMAIN, Grid, int4_op, int8_op

QUANT_BLOCK = 32
QUANT_ACCURACY_LEVEL = 4

# MatMuls kept at 8 bits in an int4 export: the lm_head, which GGUF sources keep at 8 bits (Q8_0)
# and which a 4-bit rounding costs most on (every logit goes through it).
INT4_KEEP_8BIT = ("lm_head/MatMul",)
# The token embedding's Gather in each family's graph (llama.py, gpt2.py): 8-bit in a quantized CPU export.
EMBEDDING_GATHERS = ("embed", "wte")
# A weight whose blocks already sit on a 16-level grid (a 4-bit GGUF source such as Q4_1) within
# this fraction of a step is stored exactly rather than rounded twice (see _grid_int4).
GRID_TOLERANCE = 1e-3
# An int4 export keeps at 8 bits a weight that sits on a finer grid (up to 256 levels in blocks of
# FINE_GRID_BLOCK: GGUF's Q5_0, Q6_K, Q8_0): a "Q4_K_M" file keeps those tensors at 5 to 8 bits, and
# rounding them to 4 costs Gemma 3 270M +37 % perplexity.
FINE_GRID_BLOCK = 16
GRID_ROWS = 16384  # blocks per slice in grid_of: its float64 temporaries stay a few MB


def quantize(model: Any, precision: str, *, native_int4: bool = False) -> Any:
    """Weight-only block quantization: every MatMul with a constant weight becomes a MatMulNBits.

    int8: 8 bits everywhere, the (untied) lm_head included. int4: 4 bits, the MatMuls named in
    INT4_KEEP_8BIT at 8, and so is a weight already on a grid finer than 4 bits (a GGUF's 5-, 6- or
    8-bit tensors: see fine_grid_kept). Blocks are asymmetric (scale + integer zero point, block
    32, accuracy level 4 until apply_accuracy_levels). A 4-bit weight already on a per-block
    16-level grid keeps its grid (see _grid_int4): on the default model (Q4_1) re-rounding costs
    +36 % perplexity, keeping the grid -0.1 %. The embedding Gather stays float. `native_int4`: such a
    weight becomes an Int4MatMul (gptcli's kernel: the grid exactly, with no block sums) where its scales
    and minimums fit float16.
    """
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    nodes: list[Any] = []
    augmented: dict[str, str] = {}
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2:
            nodes.append(node)
            continue
        array = numpy_helper.to_array(weight)
        graph.initializer.remove(weight)
        del initializers[weight.name]
        bits = 8 if precision == "int8" or node.name.endswith(INT4_KEEP_8BIT) else 4
        wt = np.ascontiguousarray(array.T, dtype=np.float32)
        grid = grid_of(wt, 15, QUANT_BLOCK) if bits == 4 else None
        if bits == 4 and grid is None and grid_of(wt, 255, FINE_GRID_BLOCK) is not None:
            bits = 8
        if grid is not None:
            nodes += grid_matmul(graph, node, grid, array.dtype, augmented, native_int4=native_int4)
        else:
            codes, scales, zeros = eight_bit_blocks(wt) if bits == 8 else quantize_blocks(wt, 4, QUANT_BLOCK)
            k = wt.shape[1]
            # the head a GGUF keeps as Q8_0: on gptcli's operator too, where float16 holds its steps
            op = int8_op(graph, node, k, codes, scales, -scales * zeros) if bits == 8 and native_int4 else None
            if op is None:
                name, scales = node.name + "NBits", scales.astype(array.dtype)
                op = nbits_node(graph, name, node.input[0], node.output[0], k, bits, codes, scales, zeros)
            nodes.append(op)
    del graph.node[:]
    graph.node.extend(nodes)
    if any(node.domain == INT4_OP_DOMAIN for node in nodes):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid(INT4_OP_DOMAIN, 1))
    return model


def quantize_embedding(model: Any) -> list[str]:
    """The token embedding's Gather as a GatherBlockQuantized over 8-bit blocks (see eight_bit_blocks).

    A float table is most of a quantized export's bytes otherwise (the default model: 113 of 223 MB),
    all read when the session is created. Returns the names of the Gathers replaced.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    readers = Counter(name for node in graph.node for name in node.input)
    replaced = []
    for index, node in enumerate(graph.node):
        table = initializers.get(node.input[0]) if node.op_type == "Gather" else None
        if node.name not in EMBEDDING_GATHERS or table is None or readers[table.name] != 1:
            continue
        array = numpy_helper.to_array(table)
        if array.ndim != 2 or array.shape[1] % QUANT_BLOCK:
            continue
        codes, scales, zeros = eight_bit_blocks(array.astype(np.float32))
        graph.initializer.remove(table)
        name = node.name + "Quantized"
        add_tensor(graph.initializer, codes.reshape(array.shape), f"{name}.q8")
        add_tensor(graph.initializer, scales.astype(array.dtype), f"{name}.scales")
        add_tensor(graph.initializer, zeros, f"{name}.zero_points")
        gather = helper.make_node(
            "GatherBlockQuantized", [f"{name}.q8", node.input[1], f"{name}.scales", f"{name}.zero_points"],
            list(node.output), name=name, domain="com.microsoft",
            bits=8, block_size=QUANT_BLOCK, gather_axis=0, quantize_axis=1,
        )  # fmt: skip
        replaced.append(node.name)
        graph.node[index].CopyFrom(gather)  # `node` is this entry: its name changes too
    return replaced


def eight_bit_blocks(wt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`wt` [N, K] in 8-bit blocks of QUANT_BLOCK: codes [N, blocks, block], scales and zero points [N, blocks].

    A weight already on a per-block grid with an integer zero (a GGUF's Q8_0, or any 4-bit type with
    it) is stored exactly, w = (code - zero) · step, the zero chosen so every code fits a byte; any
    other weight is rounded by quantize_blocks.
    """
    grid = grid_of(wt, 255, QUANT_BLOCK)
    if grid is not None:
        codes, low, step = grid
        zero = -low / step
        whole = np.round(zero)
        # A zero past ±510 leaves some code - zero outside any byte's reach: no shift can fit it.
        if np.abs(zero - whole).max() < GRID_TOLERANCE and np.abs(whole).max() <= 510:
            signed = codes.astype(np.int16)  # code - zero in [-510, 765]; int16 keeps the temporaries small
            signed -= whole.astype(np.int16)[..., None]
            lowest, highest = -signed.min(axis=2), 255 - signed.max(axis=2)
            shift = np.clip(128, lowest, highest)
            if ((shift >= lowest) & (shift <= highest) & (shift >= 0) & (shift <= 255)).all():
                signed += shift[..., None]
                return signed.astype(np.uint8), step, shift.astype(np.uint8)
    return quantize_blocks(wt, 8, QUANT_BLOCK)


def apply_accuracy_levels(model: Any, levels: dict[int, int]) -> None:
    """Set each MatMulNBits' accuracy level (compute type) by its bit width (see nbits_choice)."""
    from onnx import helper

    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        bits = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "bits")
        if bits in levels:
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = levels[bits]


def fine_grid_kept(model: Any) -> list[str]:
    """The MatMuls an int4 export kept at 8 bits because their weight was on a finer grid."""
    from onnx import helper

    return [
        node.name.removesuffix("NBits")
        for node in model.graph.node
        if node.op_type == "MatMulNBits"
        and not node.name.endswith(tuple(name + "NBits" for name in INT4_KEEP_8BIT))
        and next(helper.get_attribute_value(a) for a in node.attribute if a.name == "bits") == 8
    ]


def nbits_node(graph: Any, name: str, x: str, y: str, k: int, bits: int, codes: Any, scales: Any, zeros: Any) -> Any:
    """A MatMulNBits over x [.., k] from unpacked codes [N, blocks, 32] (k zero-padded to whole
    blocks), scales and zero points [N, blocks]."""
    from onnx import helper

    n, _, block = codes.shape
    add_tensor(graph.initializer, pack_codes(codes, bits), f"{name}.q{bits}")
    add_tensor(graph.initializer, np.ascontiguousarray(scales).reshape(-1), f"{name}.scales")
    add_tensor(graph.initializer, pack_codes(zeros, bits).reshape(-1), f"{name}.zero_points")
    return helper.make_node(
        "MatMulNBits",
        [x, f"{name}.q{bits}", f"{name}.scales", f"{name}.zero_points"],
        [y],
        name=name,
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=QUANT_ACCURACY_LEVEL,
    )


def grid_matmul(graph: Any, node: Any, grid: Grid, dtype: Any, augmented: dict[str, str], *, native_int4: bool) -> list:
    """The nodes for a MatMul whose weight is on a 4-bit grid: one Int4MatMul (`native_int4`, where float16 holds
    the grid), else a MatMulNBits and the block sums of its input (`augmented`: those already made, by input)."""
    op = int4_op(graph, node, grid) if native_int4 else None
    return [op] if op is not None else _grid_int4(graph, node, grid, dtype, augmented)


def _grid_int4(graph: Any, node: Any, grid: Grid, dtype: Any, augmented: dict[str, str]) -> list[Any]:
    """A weight on a per-block grid, w = step·code + low (Q4_1), as one MatMulNBits with no rounding.

    MatMulNBits' zero point is an integer, so step·(code - zero) leaves a per-block residual
    low + zero·step in [-step/2, step/2]. That residual multiplies the block's sum of x, so x gets
    its block sums appended (Reshape to [batch, sequence, blocks, 32], ReduceSum, Concat, shared by
    the MatMuls reading the same x) and the weight gets the residuals as extra 4-bit columns: what is
    left is the residuals' own rounding, about 1/25 of a plain second rounding. Three small nodes per
    input instead of a MatMul and an Add per weight: int4 decode 145 vs 124 tok/s. ReduceSum rather
    than a MatMulNBits over a 0/1 indicator: exact sums instead of int8-rounded ones, and a decode step
    3-11 % faster on AVX-512 (benchmarks/README.md). Activations are [batch, sequence, k], as in every
    graph the exporter writes.
    """
    from onnx import numpy_helper

    codes, low, step = grid
    _, blocks, block = codes.shape
    k = blocks * block
    zeros = np.clip(np.round(-low / step), 0, 15).astype(np.uint8)
    r_codes, r_scales, r_zeros = quantize_blocks(low + zeros * step, 4, block)  # [n, blocks], padded to whole blocks
    source = node.input[0]
    nodes = []
    if source not in augmented:
        shape = numpy_helper.from_array(np.array([0, 0, blocks, block], dtype=np.int64), f"{source}/blocks_shape")
        axis = numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{source}/block_axis")
        graph.initializer.extend([shape, axis])
        augmented[source] = f"{source}/with_block_sums"
        in_blocks, sums = f"{source}/blocks", f"{source}/block_sums"
        nodes += [
            _node("Reshape", [source, shape.name], in_blocks, f"{source}/Blocks"),
            _node("ReduceSum", [in_blocks, axis.name], sums, f"{source}/BlockSums", keepdims=0),
            _node("Concat", [source, sums], augmented[source], f"{source}/AppendBlockSums", axis=-1),
        ]
    codes = np.concatenate([codes, r_codes], axis=1)
    scales = np.concatenate([step, r_scales], axis=1).astype(dtype)
    zeros = np.concatenate([zeros, r_zeros], axis=1)
    nodes.append(
        nbits_node(graph, node.name + "NBits", augmented[source], node.output[0], k + blocks, 4, codes, scales, zeros)
    )
    return nodes


def _node(op_type: str, inputs: list[str], output: str, name: str, **attrs: Any) -> Any:
    from onnx import helper

    return helper.make_node(op_type, inputs, [output], name=name, **attrs)


def grid_of(wt: np.ndarray, steps: int, block: int) -> Grid | None:
    """`wt` [N, K] as low + step·code per block with integer codes in [0, steps], or None when it is not
    on such a grid (within GRID_TOLERANCE of a step): a weight dequantized from a GGUF block type is.

    The step is each block's smallest gap between distinct values, or that gap divided by a small
    integer when the codes in between are unused (up to 1/3, or 1/64 on a grid of more than 64 levels),
    so a block need not use its lowest and highest codes. A few rows are tried first: a float weight is
    turned down after them.
    """
    n, k = wt.shape
    if k % block or (n > 8 and grid_of(wt[:8], steps, block) is None):
        return None
    flat = wt.reshape(-1, block)  # blocks as rows
    codes = np.empty(flat.shape, dtype=np.uint8)
    low = np.empty(len(flat), dtype=np.float32)
    step = np.empty(len(flat), dtype=np.float32)
    # A slice of blocks at a time: the same answer per block, and the float64 temporaries stay small
    # (whole-matrix ones for a 262k-row embedding cost more in page faults than in arithmetic).
    coarse_misses = 0  # blocks that fit no step of up to 1/3 of their smallest gap
    for first in range(0, len(flat), GRID_ROWS):
        part = slice(first, first + GRID_ROWS)
        found, misses = _blocks_on_grid(flat[part], steps)
        if found is None:
            return None
        codes[part], low[part], step[part] = found
        coarse_misses += misses
    if coarse_misses > len(flat) / 2:
        return None  # most blocks fit no coarse step: not a grid at all
    shape = (n, k // block)
    return codes.reshape(n, k // block, block), low.reshape(shape), step.reshape(shape)


def _blocks_on_grid(blocks: np.ndarray, steps: int) -> tuple[Grid | None, int]:
    """grid_of for blocks [B, block]: (codes [B, block], lows and steps [B]) or None unless every block
    fits, and how many blocks fit no step of up to 1/3 of their smallest gap."""
    ordered = np.sort(blocks, axis=1).astype(np.float64)  # sorting float32 gives the same order
    x = blocks.astype(np.float64)
    low = ordered[:, 0]
    spread = ordered[:, -1] - low
    gaps = np.diff(ordered, axis=1)
    gaps = np.where(gaps > spread[:, None] * 1e-6, gaps, np.inf)  # equal values are one code
    smallest = gaps.min(axis=1)
    smallest = np.where(np.isfinite(smallest), smallest, 1.0)  # a block of one value: any step
    step = np.zeros_like(low)
    todo = np.arange(len(low))  # the blocks without a step yet: each pass tries only those
    for divisor in range(1, 4 if steps < 64 else 65):
        levels = np.round(spread[todo] / (smallest[todo] / divisor))
        trial = np.where(levels > 0, spread[todo] / np.maximum(levels, 1), 1.0)  # from the span: float32-exact enough
        position = (x[todo] - low[todo, None]) / trial[:, None]
        fits = (np.abs(position - np.round(position)).max(axis=1) < GRID_TOLERANCE) & (
            np.round(spread[todo] / trial) <= steps
        )
        step[todo[fits]] = trial[fits]
        todo = todo[~fits]
        if divisor <= 3:
            coarse_misses = len(todo)
        if not len(todo):
            break
    else:
        return None, coarse_misses
    codes = np.round((x - low[:, None]) / step[:, None])
    return (np.clip(codes, 0, steps).astype(np.uint8), low.astype(np.float32), step.astype(np.float32)), coarse_misses


def finer_grid(wt: np.ndarray, rows: int = 8) -> bool:
    """Whether `wt` [N, K] sits on a grid finer than 4 bits (a GGUF's Q5_0, Q6_K or Q8_0 tensor), which an int4
    model keeps at 8 bits, judged by its first `rows` (a GGUF block type is the whole tensor's). The export judges
    whole matrices (quantize), as it finds their grids anyway; the torch backend, at every load, a sample of each
    end of a matrix (lean_quant.grid_sample: a fused qkv's q and v may be of different block types)."""
    sample = wt[:rows]
    return grid_of(sample, 15, QUANT_BLOCK) is None and grid_of(sample, 255, FINE_GRID_BLOCK) is not None


def on_grid(wt: np.ndarray, steps: int, block: int) -> bool:
    """Whether every block of `wt` [N, K] is min + d·q with integer q in [0, steps] (a 4-bit GGUF source)."""
    return grid_of(wt, steps, block) is not None


def quantize_blocks(wt: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric block quantization of `wt` [N, K] along K: w ≈ (code - zero) · scale.

    Each block of `block` values gets a float scale and an integer zero point; its range always
    includes 0, and a block of equal values is exact. K is zero-padded to whole blocks. Returns the
    unpacked codes [N, blocks, block], scales and zero points [N, blocks].
    """
    n, k = wt.shape
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block), dtype=np.float32)
    padded[:, :k] = wt
    x = padded.reshape(n, blocks, block)
    top = (1 << bits) - 1
    low, high = np.minimum(x.min(axis=2), 0.0), np.maximum(x.max(axis=2), 0.0)
    scale = (high - low) / top
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zero = np.clip(np.round(-low / scale), 0, top)
    codes = np.clip(np.round(x / scale[..., None]) + zero[..., None], 0, top).astype(np.uint8)
    return codes, scale, zero.astype(np.uint8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' packing along the last axis: 8 bits as is, 4 bits two per byte (low nibble first)."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), dtype=np.uint8)], axis=-1)
    return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4), dtype=np.uint8)
