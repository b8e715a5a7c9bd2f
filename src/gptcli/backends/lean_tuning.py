"""Which float32 kernel the lean engine uses for one-row products (a single sequence decoding), per machine.

Decoding one sequence is a matrix-vector product per weight. torch sends `x @ w` to MKL; oneDNN on a
packed copy of the weight (what a batched step uses) is another way; numpy's BLAS (OpenBLAS in numpy's
wheels) on the same [in, out] memory is a third. Which is fastest depends on the CPU and the thread
count: on this project's AMD EPYC (AVX-512) at 2 threads the packed kernel decoded the default model
10-25 % faster than MKL and Gemma 3 270M 27 % faster (MKL is the slowest of the three there), and
OpenBLAS's sgemv streamed the same weights faster again (benchmarks/README.md), while at 1 thread MKL
was 20 % faster than oneDNN. So the first fp32 model big enough to matter times all three on
decode-shaped products and the answer is cached per (CPU flags, torch and numpy versions, threads)
by gptcli.tuning: each machine keeps its own choice. The price of the packed kernel: the float32
weights are held twice (as in batched use). numpy's BLAS runs its own threads: while it does a step's
products torch keeps one thread (LeanModel.step), or the two pools would fight over the cores.

Where numpy's BLAS wins, the measurement also times a tall matrix (more inputs than outputs: an MLP's
down projection) in both memory orders: read as [out, in] it is one dot product per output, and on an
AVX2-only AMD EPYC those products took 0.72-0.82x the time and a decode step ~0.95x (`TALL_OUT_IN`;
benchmarks/README.md).
"""

from __future__ import annotations

import time
from importlib.metadata import version
from typing import Any

from gptcli import tuning
from gptcli.hardware import blas_name, set_blas_threads, torch_threads

TUNING_NAME = "torch-float32-one-row-kernel-2"  # -2: the record also says how tall matrices are read
MIN_PARAMS = 20_000_000  # smaller models (the tests' tiny ones) keep MKL: too small to be worth the measuring
# Six decoder layers of the default model ([in, out]: q, k, v, o, gate-up, down): ~85 MB of float32,
# past a typical L3 as a decode step's weights are, with the small matrices where the kernels differ most.
LAYER = ((576, 576), (576, 192), (576, 192), (576, 576), (576, 3072), (1536, 576))
SHAPES = LAYER * 6
PASSES = 7
MKL, ONEDNN, NUMPY_BLAS = "mkl", "onednn-packed", "numpy-blas"
PACK_ROWS = 8  # the row count oneDNN packs for: the batched step's, so both uses share one packed copy
TALL = (1536, 576)  # [in, out] of the default model's down projection, timed in both memory orders
TALL_COPIES = 16  # ~57 MB in each order: past a typical L3, as a step's weights are
TALL_OUT_IN = "numpy_tall_out_in"  # the record's key: hold tall matrices as [out, in] memory for numpy's BLAS


def one_row_kernel(params: int) -> str:
    """The float32 kernel for one-row products here: MKL, ONEDNN or NUMPY_BLAS (measured once, then cached)."""
    return one_row_choice(params)["kernel"]


def one_row_choice(params: int) -> dict[str, Any]:
    """This machine's record: "kernel" (as one_row_kernel) and, for NUMPY_BLAS, TALL_OUT_IN."""
    import torch

    if params < MIN_PARAMS or not torch.backends.mkldnn.is_available():
        return {"kernel": MKL}
    threads = torch.get_num_threads()
    record = tuning.tuned(TUNING_NAME, machine_key(threads), lambda: measure(threads))
    return record if record.get("kernel") in (MKL, ONEDNN, NUMPY_BLAS) else {"kernel": MKL}


def numpy_product(x: Any, weight: Any) -> Any:
    """x @ weight on numpy's BLAS, as a torch tensor (float32 CPU tensors; the same memory, no copies)."""
    import torch

    return torch.from_numpy(x.numpy() @ weight.numpy())


def machine_key(threads: int) -> str:
    return tuning.machine_key(version("torch"), version("numpy"), str(threads))


def cached_choice(threads: int) -> dict[str, Any] | None:
    """This machine's record at `threads` (None until a model has measured it); imports no torch."""
    return tuning.cached(TUNING_NAME, machine_key(threads))


def measure(threads: int) -> dict[str, Any]:
    """Time a pass over SHAPES with each kernel (medians of PASSES) and pick the fastest.

    numpy's BLAS is timed as LeanModel.step runs it: its pool at `threads`, torch's at one."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        weights = [torch.randn(k, n, generator=generator) for k, n in SHAPES]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), PACK_ROWS) for w in weights]
        inputs = [torch.randn(1, k, generator=generator) for k, _ in SHAPES]
        kernels = {
            MKL: lambda: [x @ w for x, w in zip(inputs, weights, strict=True)],
            ONEDNN: lambda: [
                torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                for x, p in zip(inputs, packed, strict=True)
            ],
            NUMPY_BLAS: lambda: [numpy_product(x, w) for x, w in zip(inputs, weights, strict=True)],
        }
        set_blas_threads(threads)
        times: dict[str, list[float]] = {name: [] for name in kernels}
        # Kernel by kernel, not interleaved: each thread pool spins a while after its work (OpenBLAS's
        # for ~0.1 s) and would slow the next kernel down; the first pass of each warms up.
        for name, run in kernels.items():
            with torch_threads(1 if name == NUMPY_BLAS else threads):
                for _ in range(PASSES + 1):
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
    medians = {name: tuning.median_ms(values) for name, values in times.items()}
    kernel = min(medians, key=lambda name: medians[name])
    flags = " ".join(tuning.kernel_flags()) or "no AVX2"
    chosen = f"{kernel} ({blas_name()})" if kernel == NUMPY_BLAS else kernel
    record: dict[str, Any] = {
        "kernel": kernel,
        "timings_ms": medians,
        "reason": f"fastest for one-row float32 products here ({flags}; {threads} threads): {chosen}",
    }
    if kernel == NUMPY_BLAS:
        tall = measure_tall(threads)
        record[TALL_OUT_IN] = tall["[out, in]"] < tall["[in, out]"]
        record["tall_timings_ms"] = tall
        if record[TALL_OUT_IN]:
            record["reason"] += "; matrices with more inputs than outputs held as [out, in]"
    return record


def measure_tall(threads: int) -> dict[str, float]:
    """numpy's BLAS on TALL_COPIES tall matrices stored [in, out] and as [out, in] memory (ms, medians)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    layouts = {"[in, out]": [torch.randn(*TALL, generator=generator) for _ in range(TALL_COPIES)]}
    layouts["[out, in]"] = [w.t().contiguous().t() for w in layouts["[in, out]"]]  # the same [in, out] view
    x = torch.randn(1, TALL[0], generator=generator)
    times: dict[str, list[float]] = {name: [] for name in layouts}
    set_blas_threads(threads)
    with torch.inference_mode(), torch_threads(1):
        for _ in range(PASSES + 1):
            for name, weights in layouts.items():  # alternating: both pools here are numpy's one
                start = time.perf_counter()
                for w in weights:
                    numpy_product(x, w)
                times[name].append(time.perf_counter() - start)
    return {name: tuning.median_ms(values) for name, values in times.items()}
