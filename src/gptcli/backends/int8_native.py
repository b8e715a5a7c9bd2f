"""gptcli's own int8 matrix product for the torch backend's `--precision int8` (CPU), built here on first use.

torch 2.13's `_weight_int8pack_mm` is compute-bound on a CPU: it converts every weight to bf16 and reads
int8 weights at ~25 GB/s on 2 AVX-512 cores, ~8 GB/s on 2 AVX2 ones (benchmarks/README.md), so an int8
decode step was 2.0-2.2x a float32 one, not the 4x fewer bytes. `int8_native.c` rounds each row of
activations to 14-16 bits with its own scale and sums the products with the int8 codes as exact integers
(AVX-512 VNNI `vpdpbusd`, AVX2 `vpmaddubsw`, or AVX-VNNI's 256-bit `vpdpbusd`): no weight is converted, a
row's result does not depend on the rows beside it (batching never changes answers), and the activations keep
more bits than the bf16 that torch's kernel takes.

The C file is built by native_build (the system's C compiler, `-O3 -fopenmp` and the CPU's AVX-512 or
AVX2 flags by name, ISA_BUILDS) into the cache, then loaded with ctypes; its OpenMP regions run on the
libgomp that torch has already loaded (the same soname), so the two never fight over the cores. The first
model to need it times both kernels on decode-shaped products; which one runs, and why, is a tuning
record (`gptcli backends --json`), and so is a build that failed (not tried again until the source, the
compiler or the CPU changes). torch's kernel runs where there is no compiler, the build fails, the CPU
has neither path, the native one is slower, or `GPTCLI_NATIVE_KERNELS=0`.
"""

from __future__ import annotations

import ctypes
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

from gptcli import tuning
from gptcli.backends.native_build import BuildError, BuildTimeout, built_library, compiler, compiler_key
from gptcli.backends.native_product import NativeProduct, bind_product
from gptcli.coercion import env_switch
from gptcli.errors import ConfigError
from gptcli.hardware import cpu_flags
from gptcli.paths import kernels_dir

SOURCE = Path(__file__).with_name("int8_native.c")
OFF_SWITCH = "GPTCLI_NATIVE_KERNELS"  # 0/false/no/off: torch's kernel, no build, no measuring
TUNING_NAME = "torch-int8-kernel"
BUILD_FAILED = "torch-int8-kernel-build-failed"  # a failed build, recorded so later runs do not pay for it again
NATIVE, TORCH = "gptcli-native", "torch"
ISA_NAMES = {2: "AVX-512 VNNI", 3: "AVX-VNNI", 1: "AVX2"}  # gptcli_int8_isa() -> the path's name
BUILD_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
# The instructions a build may use, named rather than -march=native: a file built on one CPU never holds an
# instruction another CPU sharing the cache (an NFS home) lacks, and a CPU's name for them is the cache key.
# Widest first: (the CPU flags it needs, the compiler's flags, its name in GPTCLI_NATIVE_ISA).
ISA_BUILDS = (
    (
        ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx2", "fma"),
        ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma"),
        "avx512",
    ),
    # The AVX2 path with its dot products in AVX-VNNI's one instruction (the same bits): Intel's AVX2-only CPUs
    # since Alder Lake have it.
    (("avx2", "fma", "f16c", "avx_vnni"), ("-mavx2", "-mfma", "-mf16c", "-mavxvnni"), "avxvnni"),
    (("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c"), "avx2"),  # F16C: the int4 path's float16 scales
)
# avx2 (or avxvnni): only that path, on a wider CPU too (avx2: what an AVX2-only CPU without AVX-VNNI runs)
ISA_SWITCH = "GPTCLI_NATIVE_ISA"
# Twelve decoder layers of the default model ([out, in]: qkv, o, gate-up, down): 42 MB of int8, past a
# typical L3 as a decode step's weights are. One row: a sequence decoding, the case the choice is for.
SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536)) * 12
PASSES = 7
PREFILL_ROWS = 64  # a prompt's chunk, or a batch: timed too, so a faster decode cannot cost the prefill
PREFILL_SLACK = 1.1
MIN_GBPS = 1.0  # a one-row pass slower than this is a disturbed measurement, not a kernel (verdict)
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
        """Bytes of scratch a row of input needs: its codes' two halves and its scale (a double)."""
        return 2 * (-(-self.in_features // 4) * 4) + 8

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.scales.numel() + 4 * self.sums.numel()


class NativeInt8(NativeProduct):
    """The loaded library: pack a matrix once, then `mm` (x @ W^T, float32) as often as needed."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.library = library  # int4_native's product is in it too
        self.isa = int(library.gptcli_int8_isa())  # (native_build.built_library checked it is there)
        super().__init__(bind_product(library.gptcli_int8_mm, MatrixArgs) if self.isa else None)

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


@cache
def source_text() -> str:
    """The kernel's C source, read once: it is part of every cache key here."""
    return SOURCE.read_text(encoding="utf-8")


def isa_builds() -> list[tuple[str, ...]]:
    """The compiler flags of each path this CPU runs (ISA_BUILDS), widest first; the one that GPTCLI_NATIVE_ISA
    names alone where it names one (a ConfigError for a name that is no path, or a path this CPU lacks)."""
    have = cpu_flags()
    builds = {name: flags for needs, flags, name in ISA_BUILDS if set(needs) <= have}
    wanted = os.environ.get(ISA_SWITCH, "").strip().lower()
    if wanted in ("", "auto"):
        return list(builds.values())
    names = [name for *_, name in ISA_BUILDS if name != "avx512"]
    if wanted not in names:
        raise ConfigError(
            f"{ISA_SWITCH}={wanted!r} names no kernel path", hint=f"set {ISA_SWITCH} to {', '.join(names)} or auto"
        )
    if wanted not in builds:
        raise ConfigError(f"{ISA_SWITCH}={wanted}: this CPU cannot run that path", hint=f"set {ISA_SWITCH} to auto")
    return [builds[wanted]]


def widest_path() -> str:
    """The path the library built here has: "AVX-512 VNNI", "AVX-VNNI" or "AVX2" ("no path" on a CPU with none).
    The tuning records keep it in their keys, so each GPTCLI_NATIVE_ISA path has records of its own."""
    builds = isa_builds()
    if not builds:
        return "no path"
    widest = ("-mavx512vnni" in builds[0] and 2) or ("-mavxvnni" in builds[0] and 3) or 1
    return ISA_NAMES[widest]


def unavailable_reason() -> str | None:
    """Why the native kernel cannot run here, found without building it (None: it can be built and tried)."""
    if not env_switch(OFF_SWITCH):
        return f"turned off by {OFF_SWITCH}={os.environ[OFF_SWITCH].strip()}"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"no native int8 kernel for {platform.machine()} CPUs"
    if not isa_builds():
        return "the CPU has no AVX2"
    if compiler() is None:
        return "no C compiler found ($CC, cc or gcc) to build it"
    failures = [recorded_failure(flags) for flags in isa_builds()]
    return failures[0] if all(failures) else None


def failure_key(flags: tuple[str, ...]) -> str:
    """A build failure is recorded per ISA's flags, and holds until the source, the compiler or the CPU changes."""
    cc = compiler()
    return tuning.machine_key(source_text(), compiler_key(cc) if cc else "no compiler", *flags)


def recorded_failure(flags: tuple[str, ...]) -> str | None:
    """Why the build with `flags` failed here before (None: it did not, or was never tried)."""
    record = tuning.cached(BUILD_FAILED, failure_key(flags))
    if record is None:
        return None
    reason = record.get("reason")
    return reason if isinstance(reason, str) and reason else "could not build it here"


def native_kernel() -> NativeInt8 | str:
    """The library (built once per machine, compiler and cache), or why it cannot be had here."""
    reason = unavailable_reason()
    cc = compiler()
    if reason is not None or cc is None:
        return reason or "no C compiler"
    return _load(cc, kernels_dir())


@cache
def _load(cc: tuple[str, ...], folder: Path) -> NativeInt8 | str:
    complaints = []
    builds = isa_builds()  # widest first: a compiler too old for the AVX-512 flags may still build the AVX2 path
    for at, flags in enumerate(builds):
        failed = recorded_failure(flags)
        if failed is not None:
            complaints.append(failed)
            continue
        try:
            native = NativeInt8(built_library(SOURCE, cc, (*BUILD_FLAGS, *flags), folder, "int8", "gptcli_int8_isa"))
        except BuildTimeout as exc:  # a hung compiler would hang again: no second wait, now or later
            complaints.append(f"could not build it: {exc}")
            for rest in builds[at:]:
                tuning.store(BUILD_FAILED, failure_key(rest), {"reason": complaints[-1]})
            break
        except BuildError as exc:
            complaints.append(f"could not build it: {exc}")
            tuning.store(BUILD_FAILED, failure_key(flags), {"reason": complaints[-1]})
            continue
        except OSError as exc:  # nowhere to build (a full disk, no temporary folder): not recorded, tried again
            return f"could not build it: {exc}"
        if native.isa:
            return native
        complaints.append("could not build it: the compiler built it without AVX2 or AVX-512 VNNI")
        tuning.store(BUILD_FAILED, failure_key(flags), {"reason": complaints[-1]})
    return complaints[0] if complaints else "could not build it: no path for this CPU"


def native_for(params: int) -> NativeInt8 | None:
    """The int8 kernel for a model of `params` weights: the native one where it is this machine's choice
    (a model under MIN_PARAMS, the tests' tiny ones, takes it unmeasured), else None (torch's). Where the
    recorded choice is torch's, nothing is built."""

    def loaded() -> NativeInt8 | None:
        native = native_kernel()
        return None if isinstance(native, str) else native

    return chosen(params, cached_choice, loaded, choice)


def chosen(
    params: int,
    recorded: Callable[[int], dict[str, Any] | None],
    loaded: Callable[[], Any],
    choose: Callable[[Any], dict[str, Any]],
) -> Any:
    """A native kernel for a model of `params` weights, or None for torch's: none where it cannot run or the
    `recorded(threads)` choice is torch's (nothing is built), the `loaded()` one unmeasured for a model under
    MIN_PARAMS, else as `choose(native)` (measured once, cached) says."""
    if unavailable_reason() is not None:
        return None
    import torch

    if params >= MIN_PARAMS and (record := recorded(torch.get_num_threads())) and record["kernel"] == TORCH:
        return None
    native = loaded()
    if native is None or params < MIN_PARAMS:
        return native
    return native if choose(native)["kernel"] == NATIVE else None


def choice(native: NativeInt8) -> dict[str, Any]:
    """This machine's record: "kernel" (NATIVE or TORCH), "reason", "timings_ms" (measured once, cached; a
    damaged record is measured again)."""
    import torch

    threads = torch.get_num_threads()
    return tuning.tuned(TUNING_NAME, machine_key(threads), lambda: measure(native, threads), valid_choice)


def machine_key(threads: int) -> str:
    cc = compiler()
    parts = (version("torch"), source_text(), compiler_key(cc) if cc else "no compiler", widest_path())
    return tuning.machine_key(*parts, str(threads))


def cached_choice(threads: int) -> dict[str, Any] | None:
    """This machine's record at `threads` (None until an int8 model has measured it, or a damaged one);
    imports no torch."""
    return tuning.cached(TUNING_NAME, machine_key(threads), valid_choice)


def valid_choice(record: dict[str, Any]) -> bool:
    """A kernel choice's record as stored: anything else is damaged, and measured again."""
    return record.get("kernel") in (NATIVE, TORCH) and isinstance(record.get("reason"), str)


def reported_choice(threads: int) -> dict[str, Any]:
    """What `gptcli backends --json` and bench's environment say: the record, or why there is none (no build)."""
    return report("torch's _weight_int8pack_mm", "int8", lambda: cached_choice(threads))


def report(
    torchs: str, what: str, recorded: Callable[[], dict[str, Any] | None], fallback: str = TORCH
) -> dict[str, Any]:
    """A kernel choice as `backends --json` says it: torch's (`fallback`) where no native kernel can run here
    (unavailable_reason), the `recorded()` choice, or when it will be measured."""
    try:
        reason = unavailable_reason()
    except ConfigError as exc:  # a bad GPTCLI_NATIVE_KERNELS: said here, an error when a model loads
        return {"kernel": None, "reason": str(exc)}
    if reason is not None:
        return {"kernel": fallback, "reason": f"{torchs}: {reason}"}
    return recorded() or {
        "kernel": None,
        "reason": f"measured when a model of {MIN_PARAMS // 1_000_000}M+ parameters is first loaded at {what} here",
    }


def measure(native: NativeInt8, threads: int) -> dict[str, Any]:
    """Time both kernels over SHAPES at one row (a sequence decoding) and at PREFILL_ROWS (a prompt, or a
    batch), medians of PASSES after a warm-up. The native kernel is chosen where it is the faster at one row
    and not slower by more than PREFILL_SLACK at many: on AVX2 its many-row path does more work a weight
    than its one-row path does, and a faster decode must not cost the prefill."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        codes = [torch.randint(-127, 128, shape, dtype=torch.int8, generator=generator) for shape in SHAPES]
        scales = [torch.rand(shape[0], generator=generator) / 100 for shape in SHAPES]
        packed = [native.pack(c, s) for c, s in zip(codes, scales, strict=True)]
        bf16_scales = [s.to(torch.bfloat16) for s in scales]

        def kernels(inputs: list[Any]) -> dict[str, Callable[[], object]]:
            return {
                NATIVE: lambda: [native.mm(x, p) for x, p in zip(inputs, packed, strict=True)],
                TORCH: lambda: [
                    torch._weight_int8pack_mm(x.to(torch.bfloat16), c, s).float()
                    for x, c, s in zip(inputs, codes, bf16_scales, strict=True)
                ],
            }

        medians = time_kernels(kernels, generator)
    weight_bytes = sum(n * k for n, k in SHAPES)
    return verdict(medians, "int8", native.name, "torch's _weight_int8pack_mm", threads, weight_bytes)


def time_kernels(
    kernels: Callable[[list[Any]], dict[str, Callable[[], object]]], generator: Any
) -> dict[str, dict[str, float]]:
    """Each kernel's median ms over SHAPES' products, at one row (PASSES) and at PREFILL_ROWS (3), after a warm-up;
    `kernels(inputs)` gives the runs over one input a shape."""
    import torch

    medians: dict[str, dict[str, float]] = {}
    for rows, passes in ((1, PASSES), (PREFILL_ROWS, 3)):
        runs = kernels([torch.randn(rows, shape[1], generator=generator) for shape in SHAPES])
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(passes + 1):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        medians[f"{rows} row" + ("s" if rows > 1 else "")] = {
            name: tuning.median_ms(values) for name, values in times.items()
        }
    return medians


def verdict(
    medians: dict[str, dict[str, float]], what: str, native: str, torchs: str, threads: int, weight_bytes: int
) -> dict[str, Any]:
    """The tuning record of a kernel choice from time_kernels' medians (prefer_native's rule). Where even the faster
    kernel read the weights at under MIN_GBPS at one row, the machine was too busy to time them (another process on
    a core stalls every OpenMP region: both kernels took ~370 ms for what takes 1): the record is provisional, used
    for this run and measured again at the next load."""
    native_wins = prefer_native(medians["1 row"], medians[f"{PREFILL_ROWS} rows"])
    flags = " ".join(tuning.kernel_flags())
    record = {
        "kernel": NATIVE if native_wins else TORCH,
        "timings_ms": medians,
        "reason": f"fastest for {what} products here ({flags}; {threads} threads): {native if native_wins else torchs}",
    }
    if min(medians["1 row"].values()) > weight_bytes / (MIN_GBPS * 1e6):
        record["provisional"] = True
        record["reason"] += " (timed on a machine too busy to tell: timed again at the next load)"
    return record


def prefer_native(one_row: dict[str, float], many_rows: dict[str, float]) -> bool:
    """The native kernel: faster at one row, and within PREFILL_SLACK of torch's at many."""
    return one_row[NATIVE] < one_row[TORCH] and many_rows[NATIVE] <= many_rows[TORCH] * PREFILL_SLACK
