"""gptcli's own int4 matrix product for the torch backend's `--precision int4` (CPU: AVX-512 VNNI or AVX2).

The second kernel in `int8_native.c` (see its int4 section), in the library int8_native builds: each row of
activations rounded to 15 bits with its own scale, each group of 32 products summed as an exact integer by
`vpdpbusd` (AVX2: `vpmaddubsw`, the same integers, so the same bits), then scaled by the group's float16 scale and
offset by its minimum. No weight is converted to a float (torch's `_weight_int4pack_mm_for_cpu` turns every one into
bf16), and a row gives the same bits in any batch.
As for int8, the first model of MIN_PARAMS+ weights times it against torch's kernel; which runs, and why, is a
tuning record (`gptcli backends --json`). torch's kernel runs where int8_native's cannot be had, where it is
slower, or with `GPTCLI_NATIVE_KERNELS=0`.

The same library registers the product with ONNX Runtime as the `ai.gptcli` Int4MatMul operator: the onnx backend's
int4 exports use it for weights on a 4-bit grid wherever this kernel can run (onnx_op_library, operators_of).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptcli import tuning
from gptcli.backends import int8_native
from gptcli.backends.int8_native import NATIVE, TORCH, NativeInt8
from gptcli.backends.native_product import NativeProduct, bind_product
from gptcli.errors import ModelError
from gptcli.hardware import default_threads

if TYPE_CHECKING:
    from gptcli.export.sidecar import Export

TUNING_NAME = "torch-int4-kernel"
TORCHS = "torch's _weight_int4pack_mm_for_cpu"
GROUP = 32  # inputs a scale and minimum cover (the C kernel's GROUP)
SHAPES = int8_native.SHAPES  # the int8 choice's twelve layers of the default model: 21 MB at 4 bits, past an L3


class Int4Args(ctypes.Structure):
    """int8_native.c's `struct gptcli_int4_matrix`."""

    _fields_ = [
        ("packed", ctypes.c_void_p),
        ("scales_lows", ctypes.c_void_p),
        ("N", ctypes.c_int64),
        ("K", ctypes.c_int64),
    ]


@dataclass(frozen=True)
class PackedInt4:
    """An int4 [out, in] matrix in the kernel's layout: codes two to a byte, float16 scales and minimums."""

    codes: Any  # uint8 [ceil(out/16), in/8, 16, 4]
    scales_lows: Any  # float16 [ceil(out/16), in/32, 2, 16]
    out_features: int
    in_features: int
    args: Int4Args  # pointers into the tensors above, which this object keeps alive

    @property
    def work_per_row(self) -> int:
        """Scratch bytes a row of input needs: its code bytes (two halves), its scale and its group sums."""
        return 2 * self.in_features + 8 + 4 * (self.in_features // GROUP)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 2 * self.scales_lows.numel()


class NativeInt4(NativeProduct):
    """The int4 product of a loaded int8_native library: `pack` once, then `mm` (x @ W^T, float32)."""

    def __init__(self, native: NativeInt8) -> None:
        super().__init__(bind_product(native.library.gptcli_int4_mm, Int4Args))
        self.name = native.name

    @staticmethod
    def pack(codes: Any, scales: Any, lows: Any) -> PackedInt4:
        """codes [out, in] in 0..15, scales and lows float32 [out, in/32] -> the kernel's layout (zero padded)."""
        import torch

        from gptcli.export.native_ops import pack_int4

        n, k = codes.shape
        packed, scales_lows = pack_int4(codes.to(torch.uint8).numpy(), scales.float().numpy(), lows.float().numpy())
        nibbles, both = torch.from_numpy(packed), torch.from_numpy(scales_lows)
        args = Int4Args(nibbles.data_ptr(), both.data_ptr(), n, k)
        return PackedInt4(nibbles, both, n, k, args)


def native_int4(native: NativeInt8 | None) -> NativeInt4 | None:
    """The int4 product of a loaded library where it has one (an AVX-512 VNNI or AVX2 build), else None."""
    if native is None or not int(native.library.gptcli_int4_isa()):
        return None
    return NativeInt4(native)


def native4_for(params: int) -> NativeInt4 | None:
    """The int4 kernel for a model of `params` weights, chosen as int8_native.native_for chooses the int8 one."""

    def loaded() -> NativeInt4 | None:
        native = int8_native.native_kernel()
        return native_int4(native if isinstance(native, NativeInt8) else None)

    return int8_native.chosen(params, cached_choice, loaded, choice)


def choice(native: NativeInt4) -> dict[str, Any]:
    """This machine's record: "kernel" (NATIVE or TORCH), "reason", "timings_ms" (measured once, cached)."""
    import torch

    threads = torch.get_num_threads()
    key = int8_native.machine_key(threads)
    return tuning.tuned(TUNING_NAME, key, lambda: measure(native, threads), int8_native.valid_choice)


def cached_choice(threads: int) -> dict[str, Any] | None:
    return tuning.cached(TUNING_NAME, int8_native.machine_key(threads), int8_native.valid_choice)


def reported_choice(threads: int) -> dict[str, Any]:
    """What `gptcli backends --json` and bench's environment say of the int4 kernel."""
    return int8_native.report(TORCHS, "int4", lambda: cached_choice(threads))


ORT_FOR_OP = (1, 17)  # the operator runs on the session's threads through KernelContext_ParallelFor (1.17 on)


def onnx_op_refusal() -> str | None:
    """Why the onnx backend's int4 exports cannot use gptcli's kernel here, found without building it (None: they
    can, as the Int4MatMul operator that int8_native.c registers with ONNX Runtime)."""
    reason = int8_native.unavailable_reason()
    if reason is not None:
        return reason
    from gptcli.export.cache import ort_version

    try:
        have = tuple(int(part) for part in ort_version().split(".")[:2])
    except ValueError:
        have = (0, 0)
    if have < ORT_FOR_OP:
        return f"gptcli's int4 operator needs ONNX Runtime {'.'.join(map(str, ORT_FOR_OP))} or later"
    return None


def onnx_op_choice() -> dict[str, Any]:
    """What `gptcli backends --json` and bench's environment say of the onnx backend's int4 kernel: MatMulNBits where
    the operator cannot run here, else this machine's timing of the two (int4_op_choice), or when it is timed."""
    refusal = onnx_op_refusal()
    if refusal is not None:
        return {"kernel": "MatMulNBits", "reason": refusal}
    from gptcli.backends.int4_op_choice import cached_choice

    operator = f"gptcli's Int4MatMul ({int8_native.widest_path()})"
    record = cached_choice(default_threads())
    if record is None:
        return {"kernel": None, "reason": f"{operator} or MatMulNBits: timed at the first int4 export here"}
    return {"kernel": operator if record["kernel"] == NATIVE else "MatMulNBits", "reason": record["reason"]}


def onnx_op_library() -> Path | None:
    """The built library that holds the Int4MatMul operator (built here on first use), or None: int4 exports then
    keep ONNX Runtime's MatMulNBits. Not a library built in a temporary folder: ONNX Runtime loads it by its path."""
    if onnx_op_refusal() is not None:
        return None
    native = int8_native.native_kernel()
    if not isinstance(native, NativeInt8) or native_int4(native) is None:
        return None
    path = Path(native.library._name)
    return path if path.is_file() else None


def onnx_op_for(precision: str, device: str, folder: Path, notify: Callable[[str], None] | None = None) -> Path | None:
    """The operator's library for an export of `precision` on `device` of the model in `folder`: only an int4 CPU
    one can use it (nothing is built for any other), where it runs here and was timed faster than MatMulNBits
    (int4_op_choice; `notify` hears when that is timed). A model under MIN_PARAMS (the tests' tiny ones) takes it
    unmeasured, as the torch kernels do."""
    library = onnx_op_library() if precision == "int4" and device == "cpu" else None
    if library is None or _untimed(folder):
        return library
    from gptcli.backends.int4_op_choice import uses_operator

    def timing() -> None:
        if notify is not None:
            notify("timing gptcli's int4 operator against MatMulNBits on this CPU (once, a few seconds)")

    return library if uses_operator(library, default_threads(), timing) else None


def onnx_op_expected(precision: str, device: str, folder: Path) -> bool:
    """Whether onnx_op_for would give the operator, as far as is known without building or timing anything (the
    memory floor asks before a load): where it can run, unless this machine's timing chose MatMulNBits."""
    if precision != "int4" or device != "cpu" or onnx_op_refusal() is not None:
        return False
    if _untimed(folder):
        return True
    from gptcli.backends.int4_op_choice import cached_choice

    record = cached_choice(default_threads())
    return record is None or record["kernel"] == NATIVE


def _untimed(folder: Path) -> bool:
    """A model under MIN_PARAMS: it takes the operator unmeasured."""
    from gptcli.hf import param_count

    params = param_count(folder)
    return params is not None and params < int8_native.MIN_PARAMS


def operators_of(export: Export, library: Path | None = None) -> Path | None:
    """The library of the custom operators `export` uses (None: it uses ONNX Runtime's own only), `library` where
    the caller already has it; a ModelError where it uses gptcli's int4 operator and that cannot run here (an
    export folder made on another machine)."""
    from gptcli.export.native_ops import INT4_OP

    if (export.meta.get("quantization") or {}).get("int4_kernel") != INT4_OP:
        return None
    library = library or onnx_op_library()
    if library is None:
        raise ModelError(
            f"{export.folder} uses gptcli's int4 kernel, which cannot run here: "
            f"{onnx_op_refusal() or 'it could not be built'}",
            hint="export the model again on this machine (`gptcli export --precision int4 --force`)",
        )
    return library


def measure(native: NativeInt4, threads: int) -> dict[str, Any]:
    """Both kernels over int8_native's SHAPES at one row and at PREFILL_ROWS; the int8 choice's rule picks."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        codes = [torch.randint(0, 16, shape, dtype=torch.int32, generator=generator) for shape in SHAPES]
        scales = [torch.rand(s[0], s[1] // GROUP, generator=generator) / 100 for s in SHAPES]
        packed = [native.pack(c, s, -8 * s) for c, s in zip(codes, scales, strict=True)]
        theirs = [torch._convert_weight_to_int4pack_for_cpu(c, 1) for c in codes]
        zeros = [torch.stack([s, 0 * s], -1).transpose(0, 1).contiguous().to(torch.bfloat16) for s in scales]

        def kernels(inputs: list[Any]) -> dict[str, Callable[[], object]]:
            return {
                NATIVE: lambda: [native.mm(x, p) for x, p in zip(inputs, packed, strict=True)],
                TORCH: lambda: [
                    torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), w, GROUP, z).float()
                    for x, w, z in zip(inputs, theirs, zeros, strict=True)
                ],
            }

        medians = int8_native.time_kernels(kernels, generator)
    weight_bytes = sum(n * k for n, k in SHAPES) * 5 // 8  # 4-bit codes, a float16 scale and minimum per 32
    return int8_native.verdict(medians, "int4", native.name, TORCHS, threads, weight_bytes)
