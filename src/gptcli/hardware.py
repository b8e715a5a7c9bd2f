"""The machine we run on: is CUDA usable, which device and dtype `auto` means, CPU threads and ISA, peak FLOPS.

One answer for everyone (export, every backend, bench, train): `--device auto` is CUDA exactly when
`cuda_unusable_reason(runtime)` is None for the runtime that will run the model. Nothing here imports
torch or onnxruntime at module import time: `gptcli --help` and tab completion stay instant.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptcli.errors import BackendError

TORCH = "torch"
ONNXRUNTIME = "onnxruntime"
CUDA_PROVIDER = "CUDAExecutionProvider"
# Peak dense bf16 throughput used for MFU on a GPU the table does not know, as nanoGPT does (A100: 312 TFLOPS).
PEAK_FLOPS_CUDA = 312e12

# Dense peak TFLOPS (no sparsity): (16-bit tensor cores, fp32). Matched by substring of the device name.
GPU_PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 67.0),
    "H100 PCIe": (756.0, 51.0),
    "H100": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "L4": (121.0, 30.3),
    "A10": (125.0, 31.2),
    "T4": (65.0, 8.1),
    "V100": (125.0, 15.7),
    "RTX 4090": (165.2, 82.6),
    "RTX 3090": (71.0, 35.6),
}


# ---------------------------------------------------------------- CUDA and devices


@functools.cache
def nvidia_gpu_reason() -> str | None:
    """None when the NVIDIA driver loads and counts at least one GPU, else why not (libcuda, no torch)."""
    import ctypes

    try:
        driver = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return "no NVIDIA driver on this machine (libcuda not found)"
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return "the NVIDIA driver reports no usable GPU"
    return None


def cuda_unusable_reason(runtime: str = TORCH) -> str | None:
    """Why `runtime` ('torch' or 'onnxruntime') cannot run on CUDA here, or None when it can.

    onnxruntime-gpu lists its CUDA provider on any machine, so a listed provider is not enough: the
    NVIDIA driver must load and report a GPU too.
    """
    if runtime == ONNXRUNTIME:
        import onnxruntime as ort

        if CUDA_PROVIDER not in ort.get_available_providers():
            return "onnxruntime has no CUDA provider (pip install onnxruntime-gpu)"
        return nvidia_gpu_reason()
    import torch

    return None if torch.cuda.is_available() else "no GPU is available"


def resolve_device(requested: str, runtime: str = TORCH) -> str:
    """'auto' → 'cuda' when CUDA is usable for `runtime`, else 'cpu'. Explicit 'cuda' without it is an error."""
    if requested == "cpu":
        return "cpu"
    reason = cuda_unusable_reason(runtime)
    if requested == "cuda" and reason:
        raise BackendError(f"CUDA requested but {reason}", hint="use --device cpu or --device auto")
    return "cuda" if reason is None else "cpu"


def resolve_dtype(requested: str, device: str, isa: CpuIsa | None = None) -> Any:
    """The torch dtype for --dtype: 'auto' is bf16 on a GPU that has it (else fp16); on a CPU, see cpu_dtype."""
    import torch

    if requested == "auto" and device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "cpu":
        requested = cpu_dtype(requested, isa).dtype
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": torch.float32}[
        requested
    ]


def cuda_device_name(device: str) -> str:
    """The GPU's name for a torch CUDA device ('' for the CPU)."""
    if not device.startswith("cuda"):
        return ""
    import torch

    return torch.cuda.get_device_name(device)


def quiet_transformers() -> None:
    """No progress bars or deprecation chatter from transformers on our stderr."""
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")


# ---------------------------------------------------------------- CPU threads


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads() -> int:
    """Physical cores we may use (what torch and onnxruntime pick by default), at least 1."""
    physical = _physical_cores_in_use()
    if physical is None:
        try:
            import psutil

            physical = psutil.cpu_count(logical=False)
        except ImportError:
            pass
    return max(1, min(physical or usable_cpus(), usable_cpus()))


def _physical_cores_in_use(cpu_root: Path = Path("/sys/devices/system/cpu")) -> int | None:
    """Distinct cores under the CPUs we may use, from Linux's /sys topology (None where it cannot tell).

    What psutil answers for the whole machine, without its import on every command's start (~8 ms)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topology = cpu_root / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return None
        cores.add((package, core))
    return len(cores) or None


def set_torch_threads(threads: int | None) -> None:
    """torch's intra-op thread count; None or 0 keeps torch's own choice."""
    if threads:
        import torch

        torch.set_num_threads(threads)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """`set_torch_threads` for the duration of a block, then the count from before."""
    import torch

    before = torch.get_num_threads()
    set_torch_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def set_blas_threads(threads: int | None) -> None:
    """The thread count of numpy's BLAS (OpenBLAS in numpy's wheels); None or 0 keeps its own.

    Lasting for the process, as set_torch_threads: the lean engine's one-row products may run there
    (backends/lean_tuning.py). A BLAS threadpoolctl cannot reach keeps its count."""
    if threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads, user_api="blas")


def blas_name() -> str:
    """numpy's BLAS library and version as threadpoolctl sees it ("openblas 0.3.31"), or "numpy's BLAS"."""
    import numpy  # noqa: F401  (its BLAS is loaded with it)
    from threadpoolctl import threadpool_info

    for info in threadpool_info():
        if info.get("user_api") == "blas":
            return f"{info.get('internal_api')} {info.get('version') or ''}".strip()
    return "numpy's BLAS"


# ---------------------------------------------------------------- CPU ISA and peak FLOPS


@dataclass(frozen=True)
class CpuIsa:
    """The SIMD and matrix extensions that decide which kernels (and how many FLOPs per cycle) a CPU has."""

    avx2: bool = False
    fma: bool = False
    avx512f: bool = False
    avx512_vnni: bool = False
    avx512_bf16: bool = False
    amx: bool = False

    @classmethod
    def from_flags(cls, flags: frozenset[str] | set[str]) -> CpuIsa:
        return cls(
            avx2="avx2" in flags,
            fma="fma" in flags,
            avx512f="avx512f" in flags,
            avx512_vnni="avx512_vnni" in flags,
            avx512_bf16="avx512_bf16" in flags,
            amx=bool({"amx_tile", "amx_bf16", "amx_int8"} & flags),
        )


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none), read once a process: an onnx int4 load
    asks ~20 times (tuning keys, kernel paths), and /proc/cpuinfo is ~1.5 KB a core."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_isa() -> CpuIsa:
    return CpuIsa.from_flags(cpu_flags())


# How much slower torch runs bf16 where the CPU has no bf16 instructions (issue #17, AVX2-only, the
# default model: --dtype bfloat16 decoded 2.6 tok/s, float32 18.4).
EMULATED_BF16_SLOWDOWN = 7


@dataclass(frozen=True)
class DtypeChoice:
    """What --dtype runs at on a CPU, why, and a warning when the request will be slow here."""

    dtype: str  # float32 | bfloat16 | float16
    reason: str
    warning: str | None = None


def native_bf16(isa: CpuIsa) -> bool:
    """Whether the CPU computes bf16 products itself (AVX-512 BF16 or AMX) rather than torch emulating them."""
    return isa.avx512_bf16 or isa.amx


def cpu_dtype(requested: str, isa: CpuIsa | None = None) -> DtypeChoice:
    """--dtype on a CPU. 'auto': bf16 where the CPU computes it natively, float32 elsewhere.

    Where bf16 is native it is also the faster one for decoding: half the bytes a step reads, with the
    lean engine's oneDNN-packed bf16 matrices (measured, AVX-512 BF16, 1 thread, default model: 29 ms a
    token vs 41 ms in float32). Where it is emulated it is ~EMULATED_BF16_SLOWDOWN times slower, so
    asking for it there comes with a warning.
    """
    isa = isa or cpu_isa()
    native = native_bf16(isa)
    if requested == "auto":
        if native:
            return DtypeChoice("bfloat16", "the CPU computes bf16 natively (avx512_bf16/amx): half the bytes a step")
        return DtypeChoice("float32", "no native bf16 on this CPU (no avx512_bf16 or amx): float32 is faster")
    if requested == "bfloat16" and not native:
        return DtypeChoice(
            "bfloat16",
            "requested",
            f"warning: this CPU has no bf16 instructions (no avx512_bf16 or amx), so torch emulates bfloat16: "
            f"expect ~{EMULATED_BF16_SLOWDOWN}x slower than float32 here (--dtype auto picks float32)",
        )
    return DtypeChoice(requested, "requested")


def isa_summary(isa: CpuIsa | None = None) -> dict[str, Any]:
    """What `gptcli backends --json` and the bench environment say about the CPU and the choices made from it."""
    isa = isa or cpu_isa()
    choice = cpu_dtype("auto", isa)
    return {
        "cpu_isa": [name for name, present in vars(isa).items() if present],
        "torch_cpu_dtype_auto": choice.dtype,
        "torch_cpu_dtype_reason": choice.reason,
    }


def cpu_flops_per_cycle(isa: CpuIsa | None = None) -> tuple[int, str]:
    """fp32 FLOPs per cycle per core from the SIMD flags (two FMA units assumed)."""
    isa = isa or cpu_isa()
    if isa.avx512f:
        return 64, "AVX-512 FMA"
    if isa.avx2 and isa.fma:
        return 32, "AVX2 FMA"
    return 16, "SSE/NEON"


def cpu_ghz() -> float | None:
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e6
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":", 1)[1]) / 1000
    except (OSError, ValueError):
        pass
    return None


def peak_tflops_for(device: str, device_name: str, threads: int, half: bool) -> tuple[float | None, str]:
    """(peak TFLOPS, where the number comes from) for MFU; None when unknown."""
    if device.startswith("cuda"):
        for key, (tensor, fp32) in GPU_PEAK_TFLOPS.items():
            if key in device_name:
                return (tensor, f"{key} dense 16-bit") if half else (fp32, f"{key} fp32")
        return None, f"unknown GPU '{device_name}': pass --peak-tflops"
    ghz = cpu_ghz()
    if ghz is None:
        return None, "unknown CPU clock: pass --peak-tflops"
    per_cycle, simd = cpu_flops_per_cycle()
    return threads * ghz * per_cycle / 1000, f"est. {threads} cores × {ghz:.2f} GHz × {per_cycle} ({simd})"


def peak_flops(device: str, amp: bool) -> float | None:
    """The peak FLOP/s of one process's device, for MFU: the GPU table, or cores × clock × SIMD on a CPU."""
    import torch

    if device.startswith("cuda"):
        peak, _ = peak_tflops_for(device, cuda_device_name(device), 1, amp)
        return peak * 1e12 if peak else PEAK_FLOPS_CUDA
    peak, _ = peak_tflops_for("cpu", "", torch.get_num_threads(), False)
    return peak * 1e12 if peak else None


def free_memory_bytes(device: str) -> int | None:
    """Memory that new tensors on `device` may still take: on CUDA the device's free memory plus what torch
    holds unused in its cache (torch must be imported already); elsewhere the system's available memory.
    None when unknown. Bench checks its KV caches against it, train its estimate of a step."""
    torch = sys.modules.get("torch")
    if device.startswith("cuda") and torch is not None and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return available_memory_bytes()


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    return _meminfo().get("MemAvailable")


def loadable_memory_bytes() -> int | None:
    """The most a model's load may take before the kernel kills it: MemAvailable plus free swap, within what the
    process's cgroup (a container's limit) has left; None when unknown (not Linux)."""
    info = _meminfo()
    if "MemAvailable" not in info:
        return None
    room = info["MemAvailable"] + info.get("SwapFree", 0)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text(encoding="ascii").strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text(encoding="ascii"))
    except (OSError, ValueError):
        return room
    return min(room, int(limit) - used) if limit.isdigit() else room


def _meminfo() -> dict[str, int]:
    """/proc/meminfo's fields in bytes; empty where there is none."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if value.strip().endswith("kB"):
                    fields[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        return {}
    return fields
