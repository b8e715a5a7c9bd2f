"""Which float32 kernel the lean engine uses for one-row products (a single sequence decoding), per machine.

Decoding one sequence is a matrix-vector product per weight. torch sends `x @ w` to MKL; oneDNN on a
packed copy of the weight (what a batched step uses) is another way. Which is faster depends on the
CPU and the thread count: on this project's AMD EPYC (AVX-512) at 2 threads the packed kernel decoded
the default model 10-25 % faster and Gemma 3 270M 27 % faster, while at 1 thread MKL was 20 % faster.
So the first fp32 model big enough to matter times both on decode-shaped products and the answer is
cached per (CPU flags, torch version, threads) by gptcli.tuning: each machine keeps its own choice.
The price of the packed kernel: the float32 weights are held twice (as in batched use).
"""

from __future__ import annotations

import statistics
import time
from importlib.metadata import version
from typing import Any

from gptcli import tuning

TUNING_NAME = "torch-float32-one-row-kernel"
MIN_PARAMS = 20_000_000  # smaller models (the tests' tiny ones) keep MKL: too small to be worth the measuring
# Six decoder layers of the default model ([in, out]: q, k, v, o, gate-up, down): ~85 MB of float32,
# past a typical L3 as a decode step's weights are, with the small matrices where the kernels differ most.
LAYER = ((576, 576), (576, 192), (576, 192), (576, 576), (576, 3072), (1536, 576))
SHAPES = LAYER * 6
PASSES = 7
MKL, ONEDNN = "mkl", "onednn-packed"
PACK_ROWS = 8  # the row count oneDNN packs for: the batched step's, so both uses share one packed copy


def one_row_packed(params: int) -> bool:
    """Whether one-row float32 products should use oneDNN's packed weights here (measured once, then cached)."""
    import torch

    if params < MIN_PARAMS or not torch.backends.mkldnn.is_available():
        return False
    threads = torch.get_num_threads()
    return tuning.tuned(TUNING_NAME, machine_key(threads), lambda: measure(threads))["kernel"] == ONEDNN


def machine_key(threads: int) -> str:
    return tuning.machine_key(version("torch"), str(threads))


def cached_choice(threads: int) -> dict[str, Any] | None:
    """This machine's record at `threads` (None until a model has measured it); imports no torch."""
    return tuning.cached(TUNING_NAME, machine_key(threads))


def measure(threads: int) -> dict[str, Any]:
    """Time a pass over SHAPES with each kernel (medians of PASSES, interleaved) and pick the faster."""
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
        }
        times: dict[str, list[float]] = {name: [] for name in kernels}
        for run in kernels.values():
            run()  # warm-up
        for _ in range(PASSES):
            for name, run in kernels.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    kernel = min(medians, key=lambda name: medians[name])
    flags = " ".join(tuning.kernel_flags()) or "no AVX2"
    return {
        "kernel": kernel,
        "timings_ms": {name: round(value, 3) for name, value in medians.items()},
        "reason": f"faster for one-row float32 products here ({flags}; {threads} threads): {kernel}",
    }
