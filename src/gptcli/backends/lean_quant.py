"""Weight-only int8 and int4 matrices for the lean engine (`--precision int8|int4` on torch, CPU).

Each [in, out] matrix of a LeanModel is replaced by a QuantMatrix that `LeanModel._mm` multiplies
with a CPU kernel for weight-only quantized products:
- int8: one symmetric scale per output row (127 levels each side), multiplied by gptcli's own kernel
  (int8_native.py: built here, activations rounded to 14-16 bits per row, exact integer sums) where it
  is this machine's choice, else by `torch._weight_int8pack_mm(x, w [out, in] int8, scales [out])`;
- int4: asymmetric groups of GROUP_SIZE inputs (min/max, 16 levels: w ≈ q·scale + min), multiplied by
  gptcli's own kernel (int4_native.py, AVX-512 VNNI or AVX2) where it is this machine's choice, else by
  `torch._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros [in/group, out, 2])`. Block 32, as
  the onnx export's MatMulNBits: a model whose weights came from a 32-block 4-bit GGUF keeps its grid.
The activations go into torch's kernels as bfloat16 and come back in the model's dtype: with float32
activations torch 2.13's kernels take a scalar path 5-10x slower than the float32 product they
replace (measured on AVX-512, 1 thread: the 49152-row head took 31 ms int8/f32 vs 4.1 ms int8/bf16
and 5.9 ms for the float32 product), while the bf16 path is vectorised.

Under int4 the lm_head stays at 8 bits (HEAD_BITS). A tied embedding is read from the int8 head's rows
(`Int8Rows`: the same codes and scales), so the float matrix is not kept at all. Norms, rope,
attention and the KV cache stay in the model's dtype. A matrix whose shape the int4 kernel cannot take
(in % GROUP_SIZE, out % 16) is quantized to int8 instead, and one torch's int8 kernel cannot take
(in % 16) stays as it is (whichever int8 kernel runs: a model holds the same weights on every machine).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # imported when a model is quantized: a float32 or bf16 start-up does not pay for it
    from gptcli.backends.int4_native import NativeInt4, PackedInt4
    from gptcli.backends.int8_native import NativeInt8, PackedInt8

PRECISIONS = ("fp32", "int8", "int4")  # what --precision means on the torch backend ("fp32": --dtype decides)
GROUP_SIZE = 32
# The lm_head stays at 8 bits under int4, as in the onnx export: every logit goes through it, and on the
# default model a 4-bit head cost +5.4 % perplexity (300 held-out tokens: fp32 29.93, int4 31.55 with a
# 4-bit head, 30.07 with an 8-bit one) for ~2.5 ms a token at 1 thread.
HEAD_BITS = 8
ACTIVATION_DTYPE = torch.bfloat16


class QuantMatrix:
    """A weight stored [in, out] in the float model, kept here quantized as [out, in]; `mm` is x @ W (+ bias)."""

    bits: int
    in_features: int
    out_features: int

    def mm(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def _finish(self, y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = y.to(x.dtype)
        return y if bias is None else y + bias


class Int8Matrix(QuantMatrix):
    """Symmetric int8 with one scale per output row; `native`: gptcli's kernel (its layout), else torch's."""

    bits = 8

    def __init__(self, weight: torch.Tensor, native: NativeInt8 | None = None) -> None:
        rows = weight.t().float()  # [out, in]
        self.out_features, self.in_features = rows.shape
        scales = rows.abs().amax(1).clamp(min=1e-12) / 127
        codes = torch.round(rows / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scales = scales  # float32, for dequantising rows
        self.native = native
        if native is None:
            self.codes = codes
            self._scales = scales.to(ACTIVATION_DTYPE)
        else:
            self.packed: PackedInt8 = native.pack(codes, scales)

    def mm(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.native is not None:
            return self._finish(self.native.mm(x, self.packed), x, bias)
        y = torch._weight_int8pack_mm(x.to(ACTIVATION_DTYPE), self.codes, self._scales)
        return self._finish(y, x, bias)

    def code_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The int8 codes of output rows `ids`, [len(ids), in]."""
        return self.codes[ids] if self.native is None else self.packed.rows(ids)

    def dequantized(self) -> torch.Tensor:
        """The [in, out] float32 matrix this one stands for (tests, and the reference of the error)."""
        codes = self.code_rows(torch.arange(self.out_features))
        return (codes.float() * self.scales[:, None]).t()

    @property
    def nbytes(self) -> int:
        if self.native is not None:
            return self.packed.nbytes
        return self.codes.numel() + 2 * self._scales.numel()


class Int4Matrix(QuantMatrix):
    """Asymmetric int4 in groups of `group` inputs: w ≈ q·scale + min, q in 0..15; `native`: gptcli's kernel (its
    layout, float16 scales and minimums; groups of 32 only), else torch's (bf16 scales and zeros)."""

    bits = 4

    def __init__(self, weight: torch.Tensor, group: int = GROUP_SIZE, native: NativeInt4 | None = None) -> None:
        rows = weight.t().float()  # [out, in]
        self.out_features, self.in_features = rows.shape
        self.group = group
        blocks = rows.reshape(self.out_features, self.in_features // group, group)
        low, high = blocks.amin(-1), blocks.amax(-1)
        scales = ((high - low) / 15).clamp(min=1e-12)
        codes = torch.round((blocks - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
        self.scales, self.lows = scales, low  # [out, in/group], float32
        codes = codes.reshape(self.out_features, self.in_features)
        from gptcli.export.native_ops import fits_float16  # (an int8 model does not import the export package)

        # gptcli's kernel keeps the scales and minimums as float16: a matrix they do not fit stays with torch's
        self.native = native if group == 32 and fits_float16(scales.numpy(), low.numpy()) else None
        if self.native is not None:
            self.native_packed: PackedInt4 = self.native.pack(codes, scales, low)
            return
        self.packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        # The kernel computes (q - 8)·scale + zero, so zero = min + 8·scale; layout [in/group, out, 2].
        self.scales_zeros = (
            torch.stack([scales, low + 8 * scales], -1).transpose(0, 1).contiguous().to(ACTIVATION_DTYPE)
        )

    def mm(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.native is not None:
            return self._finish(self.native.mm(x, self.native_packed), x, bias)
        y = torch._weight_int4pack_mm_for_cpu(x.to(ACTIVATION_DTYPE), self.packed, self.group, self.scales_zeros)
        return self._finish(y, x, bias)

    @property
    def nbytes(self) -> int:
        if self.native is not None:
            return self.native_packed.nbytes
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2


class Int8Rows:
    """An embedding table kept as an Int8Matrix's rows (one scale each): `table[ids]` gives float rows in `dtype`."""

    def __init__(self, matrix: Int8Matrix, dtype: torch.dtype) -> None:
        self.matrix, self.dtype = matrix, dtype

    @classmethod
    def of(cls, table: torch.Tensor) -> Int8Rows:
        """From a float [rows, dim] table (torch's layout: lookups only, no products)."""
        return cls(Int8Matrix(table.t()), table.dtype)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.matrix.code_rows(ids.reshape(-1)).float() * self.matrix.scales[ids.reshape(-1), None]
        return rows.reshape(*ids.shape, -1).to(self.dtype)


def fits(weight: torch.Tensor, bits: int, group: int = GROUP_SIZE) -> bool:
    """Whether the kernel for `bits` takes this [in, out] matrix."""
    if weight.dim() != 2 or weight.device.type != "cpu" or not weight.is_floating_point():
        return False
    k, n = weight.shape
    if bits == 4:
        return k % group == 0 and n % 16 == 0
    return k % 16 == 0  # torch 2.13's int8 kernel reads past the row otherwise (a segfault at in=40)


def grid_sample(weight: torch.Tensor, rows: int = 8) -> Any:
    """The output rows of an [in, out] matrix that finer_grid judges, [rows2, in] float32 numpy: its first and last
    `rows`. A fused matrix is several GGUF tensors (qkv: q, k, v; gate_up: gate, up), and a Q4_K_M file keeps v at
    Q6_K where q is Q4_K: the first rows alone are q's, and would round v to 4 bits too (the onnx export judges
    the whole fused matrix)."""
    outputs = weight.t()
    sample = outputs if outputs.shape[0] <= 2 * rows else torch.cat([outputs[:rows], outputs[-rows:]])
    return sample.float().numpy()


def quantize_matrix(
    weight: torch.Tensor,
    bits: int,
    group: int = GROUP_SIZE,
    native: NativeInt8 | None = None,
    native4: NativeInt4 | None = None,
) -> QuantMatrix | torch.Tensor:
    """An [in, out] matrix at `bits` (4 falls back to 8 where the int4 kernel cannot take its shape, and where
    the weight sits on a finer grid than 4 bits: a Q4_K_M GGUF's 5- to 8-bit tensors stay at 8, as in the onnx
    export); int8 ones multiplied by `native` when given, int4 ones by `native4`."""
    if bits == 4 and fits(weight, 4, group):
        from gptcli.export.quantize import finer_grid  # (an int8 model does not import the export package)

        if not finer_grid(sample := grid_sample(weight), len(sample)):
            return Int4Matrix(weight, group, native4)
    if fits(weight, 8):
        return Int8Matrix(weight, native)
    return weight


def bits_of(precision: str) -> int | None:
    """8 or 4 for a quantized precision, None for fp32 (the model's --dtype)."""
    if precision not in PRECISIONS:
        raise ValueError(f"the torch backend runs precisions {', '.join(PRECISIONS)}, not {precision!r}")
    return {"int8": 8, "int4": 4}.get(precision)


def quantize_model(model: Any, precision: str, group: int = GROUP_SIZE) -> int:
    """Replace a LeanModel's matrices (every layer's and the head) in place; returns the weights' bytes after.

    Works on LeanDecoder (DecoderLayer fields) and LeanGPT2 (layer tuples); a tied embedding moves to
    Int8Rows so the float head is freed.
    """
    bits = bits_of(precision)
    if bits is None:
        return 0
    if model.device.type != "cpu":
        raise ValueError("quantized weights run on the CPU only (--device cpu)")
    from gptcli.backends.int4_native import native4_for
    from gptcli.backends.int8_native import native_for

    native = native_for(model.params)
    native4 = native4_for(model.params) if bits == 4 else None
    replace_layer_matrices(model, lambda weight: quantize_matrix(weight, bits, group, native, native4))
    tied_table = model.head.t() if model.embed is None else None
    model.head = quantize_matrix(model.head, HEAD_BITS if bits == 4 else bits, group, native)
    if tied_table is not None:  # tied: the lookups read int8 rows of the embedding the head is made of
        head = model.head
        model.embed = Int8Rows(head, tied_table.dtype) if isinstance(head, Int8Matrix) else Int8Rows.of(tied_table)
    return weight_bytes(model)


def replace_layer_matrices(model: Any, convert: Callable[[torch.Tensor], Any]) -> None:
    """Every layer's matrices (not the head) through `convert`: LeanDecoder's DecoderLayer fields, LeanGPT2's tuples."""
    for i, layer in enumerate(model.layers):
        if isinstance(layer, tuple):  # GPT-2: (ln1, qkv, qkv_b, out, out_b, ln2, fc, fc_b, proj, proj_b)
            model.layers[i] = tuple(convert(part) if j in (1, 3, 6, 8) else part for j, part in enumerate(layer))
        else:
            for name in ("qkv", "out", "gate_up", "down"):
                setattr(layer, name, convert(getattr(layer, name)))


class PackedMatrix(QuantMatrix):
    """A bf16 matrix in oneDNN's packed layout: for one row too, ~2x faster than `x @ W` in bf16 (which
    takes a slow path: measured, 1 thread, the 49152-row head 10.6 ms, packed 2.7 ms, float32 5.2 ms)."""

    bits = 16

    def __init__(self, weight: torch.Tensor) -> None:
        self.in_features, self.out_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.t().contiguous(), 1)

    def mm(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")

    @property
    def nbytes(self) -> int:
        return self.in_features * self.out_features * 2


def onednn_bf16() -> bool:
    """Whether oneDNN packs bf16 weights here (it refuses without avx512bw/vl/dq or avx_ne_convert)."""
    if not torch.backends.mkldnn.is_available():
        return False
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(supported()) if supported is not None else False
    except RuntimeError:
        return False


def pack_bf16(model: Any) -> bool:
    """Repack a bf16 CPU model's matrices for oneDNN (PackedMatrix); False where that does not apply."""
    if model.device.type != "cpu" or model.dtype != torch.bfloat16 or not onednn_bf16():
        return False
    replace_layer_matrices(model, PackedMatrix)
    if model.embed is None:  # tied: the lookups need the rows, which the packed layout hides
        model.embed = model.head.t().contiguous()
    model.head = PackedMatrix(model.head)
    return True


def weight_bytes(model: Any) -> int:
    """Bytes of every matrix and vector the model holds (quantized ones at their packed size)."""
    seen: set[int] = set()

    def size(value: Any) -> int:
        if value is None or id(value) in seen:
            return 0
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, Int8Rows):  # a tied embedding's rows are the head's: counted once
            return size(value.matrix)
        if isinstance(value, QuantMatrix):
            return value.nbytes
        if isinstance(value, (tuple, list)):
            return sum(size(v) for v in value)
        if hasattr(value, "__dataclass_fields__"):
            return sum(size(getattr(value, f)) for f in value.__dataclass_fields__ if f != "rope")
        return 0

    return size(model.layers) + size(model.embed) + size(model.head) + size(getattr(model, "wpe", None))
