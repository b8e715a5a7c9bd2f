"""gptcli's own int8 matrix product for the torch backend's `--precision int8` (CPU), built here on first use.

torch 2.13's `_weight_int8pack_mm` is compute-bound on a CPU: it converts every weight to bf16 and reads
int8 weights at ~25 GB/s on 2 AVX-512 cores, ~8 GB/s on 2 AVX2 ones (benchmarks/README.md), so an int8
decode step was 2.0-2.2x a float32 one, not the 4x fewer bytes. `int8_native.c` rounds each row of
activations to 14-16 bits with its own scale and sums the products with the int8 codes as exact integers
(AVX-512 VNNI `vpdpbusd`, or AVX2 `vpmaddubsw`): no weight is converted, a row's result does not depend
on the rows beside it (batching never changes answers), and the activations keep more bits than the bf16
that torch's kernel takes.

The C file is built with the system's C compiler (`$CC`, else `cc`, else `gcc`; `-O3 -fopenmp` and the
CPU's AVX-512/AVX2 flags by name, ISA_BUILDS) into the cache (`kernels/int8-<key>.so`, the key: the source,
the flags and the compiler), then loaded with ctypes; its OpenMP regions run on the libgomp that torch has
already loaded (the same soname), so the two never fight over the cores. The first model to need it times
both kernels on decode-shaped products; which one runs, and why, is a tuning record (`gptcli backends
--json`). torch's kernel runs where there is no compiler, the build fails, the CPU has neither path, the
native one is slower, or `GPTCLI_NATIVE_KERNELS=0`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

from gptcli import tuning
from gptcli.coercion import env_switch
from gptcli.errors import ConfigError
from gptcli.hardware import cpu_flags
from gptcli.paths import cache_dir, cache_key

SOURCE = Path(__file__).with_name("int8_native.c")
OFF_SWITCH = "GPTCLI_NATIVE_KERNELS"  # 0/false/no/off: torch's kernel, no build, no measuring
TUNING_NAME = "torch-int8-kernel"
NATIVE, TORCH = "gptcli-native", "torch"
ISA_NAMES = {2: "AVX-512 VNNI", 1: "AVX2"}
BUILD_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
# The instructions a build may use, named rather than -march=native: a file built on one CPU never holds an
# instruction another CPU sharing the cache (an NFS home) lacks, and a CPU's name for them is the cache key.
ISA_BUILDS = (
    (
        ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx2", "fma"),
        ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma"),
    ),
    (("avx2", "fma"), ("-mavx2", "-mfma")),
)
BUILD_TIMEOUT_S = 120
# Twelve decoder layers of the default model ([out, in]: qkv, o, gate-up, down): 42 MB of int8, past a
# typical L3 as a decode step's weights are. One row: a sequence decoding, the case the choice is for.
SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536)) * 12
PASSES = 7
MIN_PARAMS = 20_000_000  # smaller models take the native kernel unmeasured: too small for the choice to matter


class MatrixArgs(ctypes.Structure):
    """int8_native.c's `struct gptcli_int8_matrix`: what a product needs of a packed matrix, made once."""

    _fields_ = [
        ("packed", ctypes.c_void_p),
        ("wscale", ctypes.c_void_p),
        ("wsum", ctypes.c_void_p),
        ("N", ctypes.c_int64),
        ("K", ctypes.c_int64),
    ]


@dataclass(frozen=True)
class PackedInt8:
    """An int8 [out, in] matrix in the kernel's layout, with its scales and code sums padded to 16 rows."""

    codes: Any  # int8 [ceil(out/16), in4/4, 16, 4], in4 = in rounded up to 4
    scales: Any  # float32 [ceil(out/16) * 16]
    sums: Any  # int32, the codes' sum per output row
    out_features: int
    in_features: int
    args: MatrixArgs  # pointers into the tensors above, which this object keeps alive

    def rows(self, ids: Any) -> Any:
        """The int8 codes of output rows `ids` as [len(ids), in] (a tied embedding's lookups)."""
        picked = self.codes[ids // 16, :, ids % 16, :]  # [len, in4/4, 4]
        return picked.reshape(len(ids), -1)[:, : self.in_features]

    @property
    def work_per_row(self) -> int:
        """Bytes of scratch a row of input needs: its codes' two halves and its scale."""
        return 2 * (-(-self.in_features // 4) * 4) + 4

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.scales.numel() + 4 * self.sums.numel()


class NativeInt8:
    """The loaded library: pack a matrix once, then `mm` (x @ W^T, float32) as often as needed."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.isa = int(library.gptcli_int8_isa())
        self._mm = library.gptcli_int8_mm if self.isa else None
        if self._mm is not None:
            self._mm.restype = None
            self._mm.argtypes = [
                ctypes.c_void_p,
                ctypes.POINTER(MatrixArgs),
                ctypes.c_void_p,
                ctypes.c_int64,
                ctypes.c_void_p,
                ctypes.c_int,
            ]
        self._scratch = threading.local()  # a growing work buffer per calling thread

    @property
    def name(self) -> str:
        return f"{NATIVE} ({ISA_NAMES.get(self.isa, 'no path')})"

    @staticmethod
    def pack(codes: Any, scales: Any) -> PackedInt8:
        """codes int8 [out, in], scales float32 [out] -> the kernel's layout (zero padded)."""
        import torch

        n, k = codes.shape
        blocks, k4 = -(-n // 16), -(-k // 4) * 4
        padded = torch.zeros(blocks * 16, k4, dtype=torch.int8)
        padded[:n, :k] = codes
        packed = padded.reshape(blocks, 16, k4 // 4, 4).permute(0, 2, 1, 3).contiguous()
        row_scales = torch.zeros(blocks * 16, dtype=torch.float32)
        row_scales[:n] = scales
        sums = padded.sum(1, dtype=torch.int32)
        args = MatrixArgs(packed.data_ptr(), row_scales.data_ptr(), sums.data_ptr(), n, k)
        return PackedInt8(packed, row_scales, sums, n, k, args)

    def mm(self, x: Any, matrix: PackedInt8) -> Any:
        """x [..., in] (any float dtype) @ W^T -> float32 [..., out]."""
        import torch

        k, n = matrix.in_features, matrix.out_features
        rows = x if x.dim() == 2 else x.reshape(-1, k)  # (a reshape costs ~0.8 us: 0.1 ms a decode step)
        if rows.dtype != torch.float32 or not rows.is_contiguous():
            rows = rows.to(torch.float32).contiguous()
        m = rows.shape[0]
        y = torch.empty(m, n, dtype=torch.float32)
        work = self._work(m * matrix.work_per_row)
        self._mm(rows.data_ptr(), ctypes.byref(matrix.args), y.data_ptr(), m, work.data_ptr(), torch.get_num_threads())
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)

    def _work(self, size: int) -> Any:
        work = getattr(self._scratch, "buffer", None)
        if work is None or work.numel() < size:
            import torch

            work = self._scratch.buffer = torch.empty(max(size, 1 << 16), dtype=torch.uint8)
        return work


class BuildError(Exception):
    """The compiler refused the source (its first line of complaint is the message)."""


def compiler() -> str | None:
    """The C compiler to build with: $CC, else cc, else gcc (None: none found)."""
    named = os.environ.get("CC")
    if named:
        return shutil.which(named)
    return shutil.which("cc") or shutil.which("gcc")


def isa_flags() -> tuple[str, ...] | None:
    """The compiler flags for the widest path this CPU runs (ISA_BUILDS), or None: neither."""
    have = cpu_flags()
    return next((flags for needs, flags in ISA_BUILDS if set(needs) <= have), None)


def library_key(cc: str, flags: tuple[str, ...]) -> str:
    """What decides the built file: the source, the flags and the compiler (path and stamp)."""
    return cache_key(SOURCE.read_text(encoding="utf-8"), *flags, cc, files=[Path(cc)])


def build(cc: str, target: Path, flags: tuple[str, ...]) -> None:
    """Compile SOURCE with `flags` into `target` (a temporary name first, then renamed: a reader never sees
    half a file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".building-", suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        try:
            done = subprocess.run(
                [cc, *flags, "-o", str(partial), str(SOURCE)],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BuildError(f"{Path(cc).name} took over {BUILD_TIMEOUT_S} s") from None
        if done.returncode != 0:
            first = next((line for line in done.stderr.splitlines() if line.strip()), f"exit {done.returncode}")
            raise BuildError(f"{Path(cc).name} failed: {first.strip()[:200]}")
        os.replace(partial, target)
    finally:
        with contextlib.suppress(OSError):
            partial.unlink()


def unavailable_reason() -> str | None:
    """Why the native kernel cannot run here, found without building it (None: it can be built and tried)."""
    if not env_switch(OFF_SWITCH):
        return f"turned off by {OFF_SWITCH}={os.environ[OFF_SWITCH].strip()}"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"no native int8 kernel for {platform.machine()} CPUs"
    if isa_flags() is None:
        return "the CPU has no AVX2"
    if compiler() is None:
        return "no C compiler found (cc, gcc or $CC) to build it"
    return None


def native_kernel() -> NativeInt8 | str:
    """The library (built once per machine, compiler and cache), or why it cannot be had here."""
    reason = unavailable_reason()
    cc, flags = compiler(), isa_flags()
    if reason is not None or cc is None or flags is None:
        return reason or "no C compiler or no AVX2"
    return _load(cc, (*BUILD_FLAGS, *flags), cache_dir() / "kernels")


@cache
def _load(cc: str, flags: tuple[str, ...], folder: Path) -> NativeInt8 | str:
    target = folder / f"int8-{library_key(cc, flags)}.so"
    try:
        try:
            native = NativeInt8(ctypes.CDLL(str(_built(cc, flags, target))))
        except OSError:  # a damaged file (built again), or a cache that cannot be written (built elsewhere)
            with contextlib.suppress(OSError):
                target.unlink()
            try:
                build(cc, target, flags)
            except OSError:
                target = Path(tempfile.mkdtemp(prefix="gptcli-kernels-")) / target.name
                build(cc, target, flags)
            native = NativeInt8(ctypes.CDLL(str(target)))
    except (BuildError, OSError) as exc:
        return f"could not build it: {exc}"
    if native.isa == 0:
        return "the compiler built it without AVX2 or AVX-512 VNNI"
    return native


def _built(cc: str, flags: tuple[str, ...], target: Path) -> Path:
    if not target.is_file():
        build(cc, target, flags)
    return target


def native_for(params: int) -> NativeInt8 | None:
    """The int8 kernel for a model of `params` weights: the native one where it is this machine's choice
    (a model under MIN_PARAMS, the tests' tiny ones, takes it unmeasured), else None (torch's)."""
    native = native_kernel()
    if isinstance(native, str):
        return None
    if params < MIN_PARAMS:
        return native
    return native if choice(native)["kernel"] == NATIVE else None


def choice(native: NativeInt8) -> dict[str, Any]:
    """This machine's record: "kernel" (NATIVE or TORCH), "reason", "timings_ms" (measured once, cached)."""
    import torch

    threads = torch.get_num_threads()
    record = tuning.tuned(TUNING_NAME, machine_key(threads), lambda: measure(native, threads))
    return record if record.get("kernel") in (NATIVE, TORCH) else {"kernel": TORCH, "reason": "a damaged record"}


def machine_key(threads: int) -> str:
    cc = compiler() or "no compiler"
    return tuning.machine_key(version("torch"), SOURCE.read_text(encoding="utf-8"), cc, str(threads))


def cached_choice(threads: int) -> dict[str, Any] | None:
    """This machine's record at `threads` (None until an int8 model has measured it); imports no torch."""
    return tuning.cached(TUNING_NAME, machine_key(threads))


def reported_choice(threads: int) -> dict[str, Any]:
    """What `gptcli backends --json` and bench's environment say: the record, or why there is none (no build)."""
    try:
        reason = unavailable_reason()
    except ConfigError as exc:  # a bad GPTCLI_NATIVE_KERNELS: said here, an error when a model loads
        return {"kernel": None, "reason": str(exc)}
    if reason is not None:
        return {"kernel": TORCH, "reason": f"torch's _weight_int8pack_mm: {reason}"}
    return cached_choice(threads) or {
        "kernel": None,
        "reason": f"measured when a model of {MIN_PARAMS // 1_000_000}M+ parameters is first loaded at int8 here",
    }


def measure(native: NativeInt8, threads: int) -> dict[str, Any]:
    """Time one-row products over SHAPES with both kernels (medians of PASSES after a warm-up) and pick the faster."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        codes = [torch.randint(-127, 128, shape, dtype=torch.int8, generator=generator) for shape in SHAPES]
        scales = [torch.rand(shape[0], generator=generator) / 100 for shape in SHAPES]
        packed = [native.pack(c, s) for c, s in zip(codes, scales, strict=True)]
        bf16_scales = [s.to(torch.bfloat16) for s in scales]
        inputs = [torch.randn(1, shape[1], generator=generator) for shape in SHAPES]
        kernels = {
            NATIVE: lambda: [native.mm(x, p) for x, p in zip(inputs, packed, strict=True)],
            TORCH: lambda: [
                torch._weight_int8pack_mm(x.to(torch.bfloat16), c, s).float()
                for x, c, s in zip(inputs, codes, bf16_scales, strict=True)
            ],
        }
        times: dict[str, list[float]] = {name: [] for name in kernels}
        for _ in range(PASSES + 1):
            for name, run in kernels.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    medians = {name: round(statistics.median(values[1:]) * 1e3, 3) for name, values in times.items()}
    kernel = min(medians, key=lambda name: medians[name])
    label = native.name if kernel == NATIVE else "torch's _weight_int8pack_mm"
    flags = " ".join(tuning.kernel_flags())
    return {
        "kernel": kernel,
        "timings_ms": medians,
        "reason": f"fastest for one-row int8 products here ({flags}; {threads} threads): {label}",
    }
