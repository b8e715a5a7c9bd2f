"""gptcli's own operator in exported graphs: `ai.gptcli` Int4MatMul, the int4 product of int8_native.c (its last
section registers it with ONNX Runtime; the onnx backend loads that library where an export uses it).

A weight on a 4-bit grid (a Q4_1 GGUF's) becomes one Int4MatMul, the grid exactly, with no block sums (int4_op);
an 8-bit one (the head a GGUF keeps as Q8_0) becomes one with `bits` 8 where float16 holds its steps and
minimums exactly (int8_op): the same kernel with a byte a code, ~0.67 ms against MatMulNBits' 0.82-0.99 for the
default model's 49152 x 576 head streamed from memory (benchmarks/README.md), and exact on the grid."""

from __future__ import annotations

from typing import Any

import numpy as np

from gptcli.export.graph import add_tensor

INT4_OP_DOMAIN, INT4_OP = "ai.gptcli", "Int4MatMul"
INT4_OP_GROUP = 32  # inputs a scale and minimum cover (the C kernel's GROUP)

# A weight on a per-block grid: codes [N, blocks, block] (uint8), block minima and steps [N, blocks].
Grid = tuple[np.ndarray, np.ndarray, np.ndarray]


def fits_float16(scales: np.ndarray, lows: np.ndarray) -> bool:
    """Whether gptcli's int4 kernel, which keeps scales and minimums as float16, can hold these: none past its range,
    and not all scales below its normal range (|w| ~ 1e-6: subnormal scales, a step of 6e-8, would cost more than
    the 4-bit rounding does; a real model's largest scale is ~1e-2)."""
    finfo = np.finfo(np.float16)
    largest = max(float(np.abs(scales).max(initial=0)), float(np.abs(lows).max(initial=0)))
    return largest < finfo.max and float(scales.max(initial=0)) >= finfo.tiny


def pack_int4(codes: np.ndarray, scales: np.ndarray, lows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """codes [out, in] in 0..15, scales and lows [out, in/32] -> gptcli's int4 kernel's layout (int8_native.c):
    codes two to a byte, uint8 [ceil(out/16), in/8, 16, 4] (byte 4o + j of chunk c of a block: input 8c + j of
    output o low, 8c + 4 + j high), and float16 [ceil(out/16), in/32, 2, 16] scales then minimums, zero padded."""
    padded = _padded(codes)
    blocks, k = padded.shape[0] // 16, padded.shape[1]
    # [block, output, chunk of 8 inputs, half, 4] -> [block, chunk, output, 4] with the second half's codes high
    split = padded.reshape(blocks, 16, k // 8, 2, 4)
    nibbles = np.ascontiguousarray((split[:, :, :, 0] | (split[:, :, :, 1] << 4)).transpose(0, 2, 1, 3))
    return nibbles, _scales_lows(scales, lows, blocks)


def pack_int8(codes: np.ndarray, scales: np.ndarray, lows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """codes [out, in] in 0..255 -> the 8-bit form: uint8 [ceil(out/16), in/4, 16, 4] (byte 4o + j of chunk c of a
    block: input 4c + j of output o), and the scales and minimums as pack_int4 lays them out."""
    padded = _padded(codes)
    blocks, k = padded.shape[0] // 16, padded.shape[1]
    packed = np.ascontiguousarray(padded.reshape(blocks, 16, k // 4, 4).transpose(0, 2, 1, 3))
    return packed, _scales_lows(scales, lows, blocks)


def _padded(codes: np.ndarray) -> np.ndarray:
    n, k = codes.shape
    padded = np.zeros((-(-n // 16) * 16, k), dtype=np.uint8)
    padded[:n] = codes
    return padded


def _scales_lows(scales: np.ndarray, lows: np.ndarray, blocks: int) -> np.ndarray:
    n, groups = scales.shape
    both = np.zeros((blocks * 16, groups, 2), dtype=np.float16)
    both[:n, :, 0], both[:n, :, 1] = scales, lows
    return np.ascontiguousarray(both.reshape(blocks, 16, groups, 2).transpose(0, 2, 3, 1))


def int4_op(graph: Any, node: Any, grid: Grid) -> Any | None:
    """A weight on a per-block grid as one Int4MatMul: the grid itself, float16 steps and minimums (see pack_int4);
    None where the operator cannot hold it (blocks of another size, steps or minimums float16 does not hold)."""
    codes, low, step = grid
    if codes.shape[2] != INT4_OP_GROUP or not fits_float16(step, low):
        return None
    n = codes.shape[0]
    return _op(graph, node, n, pack_int4(codes.reshape(n, -1), step, low))


def int8_op(graph: Any, node: Any, k: int, codes: np.ndarray, step: np.ndarray, low: np.ndarray) -> Any | None:
    """An 8-bit weight of k inputs, w = low + step * code (codes [N, blocks, 32] in 0..255, steps and minimums
    [N, blocks]), as one Int4MatMul with `bits` 8 where float16 holds its steps and minimums exactly (a GGUF's Q8_0:
    float16 steps, minimums 128 steps down); else None (MatMulNBits keeps float32 steps)."""
    step, low = np.asarray(step, dtype=np.float32), np.asarray(low, dtype=np.float32)
    if k % INT4_OP_GROUP or codes.shape[2] != INT4_OP_GROUP or not fits_float16(step, low):
        return None
    if not (np.array_equal(step.astype(np.float16), step) and np.array_equal(low.astype(np.float16), low)):
        return None
    return _op(graph, node, codes.shape[0], pack_int8(codes.reshape(codes.shape[0], -1), step, low), bits=8)


def _op(graph: Any, node: Any, n: int, packed: tuple[np.ndarray, np.ndarray], **attrs: Any) -> Any:
    from onnx import helper

    name = node.name + "Int4"
    add_tensor(graph.initializer, packed[0], f"{name}.codes")
    add_tensor(graph.initializer, packed[1], f"{name}.scales_lows")
    inputs = [node.input[0], f"{name}.codes", f"{name}.scales_lows"]
    return helper.make_node(INT4_OP, inputs, [node.output[0]], name=name, domain=INT4_OP_DOMAIN, N=n, **attrs)
