"""Which MatMulNBits accuracy level (compute type) decodes fastest on this CPU, measured once per machine.

ONNX Runtime's CPU kernels for block-quantized weights differ per ISA: on AVX-512 VNNI the int8
compute type (accuracy level 4) is 15x faster than float32 compute for the default model's int4 graph
(benchmarks/README.md), while on a CPU without VNNI its integer path may lose. So an int8/int4 export
for the CPU times each candidate on a decode-shaped product (1 row and 8 rows against a weight larger
than a typical last-level cache, `bits` wide, the model's hidden size as K) and writes the fastest into
every MatMulNBits. The result is cached per (CPU flags, ONNX Runtime version, threads) by
gptcli.tuning, and `gptcli backends --json` shows it.

Both candidates compute the same weight-only product; level 4 also rounds the activations to int8
per block, which is part of what `--precision int4|int8` means (greedy tokens matched at every level).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gptcli import tuning
from gptcli.export.quantize import QUANT_ACCURACY_LEVEL
from gptcli.export.quantize import QUANT_BLOCK as BLOCK
from gptcli.hardware import default_threads

CANDIDATES = {4: "int8", 1: "fp32"}  # accuracy level: compute type (the usual winner first: it sets the limit)
WEIGHT_BYTES = 16 << 20  # the measured weight: past L2, as a decode step's matrices are (~0.5 s in all)
ROWS = (1, 8)  # one sequence decoding, and eight in one batched step
REPEATS = 3
# A candidate slower than this many times the best so far is not timed further (nor at 8 rows).
DROP_FACTOR = 2.0
TUNING_NAME = "onnx-matmulnbits-accuracy-level"

# (bits, level, k, rows, give up after s) -> seconds a product; a first run past the limit is the answer.
Timer = Callable[[int, int, int, int, float], float]


@dataclass(frozen=True)
class NbitsChoice:
    """The accuracy level chosen for each bit width, and the timings it was chosen from (ms)."""

    levels: dict[int, int]
    timings_ms: dict[str, float] = field(default_factory=dict)
    machine: str = ""
    reason: str = ""

    def level(self, bits: int) -> int:
        return self.levels.get(bits, QUANT_ACCURACY_LEVEL)  # what quantize writes before a choice

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["levels"] = {str(bits): level for bits, level in self.levels.items()}
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> NbitsChoice:
        levels = {int(bits): int(level) for bits, level in record["levels"].items()}
        return cls(levels, dict(record.get("timings_ms", {})), record.get("machine", ""), record.get("reason", ""))


def machine_key(threads: int | None = None) -> str:
    """What the choice depends on: the kernel flags, ONNX Runtime's version (its kernels) and the threads."""
    import onnxruntime

    return tuning.machine_key(onnxruntime.__version__, str(threads or default_threads()))


def cached_choice(threads: int | None = None) -> NbitsChoice | None:
    """This machine's measured choice, when an export has measured it (None otherwise)."""
    record = tuning.cached(TUNING_NAME, machine_key(threads))
    try:
        return NbitsChoice.from_dict(record) if record is not None else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def choose_levels(
    bit_widths: tuple[int, ...], k: int, timer: Timer | None = None, on_measure: Callable[[], None] | None = None
) -> NbitsChoice:
    """The fastest accuracy level for each bit width, from this machine's cache or measured now (and cached);
    `on_measure` is told first when it is measured (the export says so: it takes a few seconds)."""
    threads = default_threads()
    cached = cached_choice(threads)
    if cached is not None and all(bits in cached.levels for bits in bit_widths):
        return cached
    if on_measure is not None:
        on_measure()
    measured = measure_levels(bit_widths, k, threads, timer or ort_timer(threads))
    tuning.store(TUNING_NAME, machine_key(threads), measured.as_dict())
    return measured


def measure_levels(bit_widths: tuple[int, ...], k: int, threads: int, timer: Timer) -> NbitsChoice:
    levels: dict[int, int] = {}
    timings: dict[str, float] = {}
    for bits in bit_widths:
        totals: dict[int, float] = {}
        for rows in ROWS:
            for level in list(CANDIDATES) if rows == ROWS[0] else list(totals):
                limit = DROP_FACTOR * min(totals.values()) if rows == ROWS[0] and totals else float("inf")
                seconds = timer(bits, level, k, rows, limit)
                timings[f"int{bits} level {level} ({CANDIDATES[level]}) x{rows}"] = round(seconds * 1e3, 3)
                totals[level] = totals.get(level, 0.0) + seconds
            if rows == ROWS[0]:
                best = min(totals.values())
                totals = {level: t for level, t in totals.items() if t <= DROP_FACTOR * best}
        levels[bits] = min(totals, key=lambda level: totals[level])
    names = ", ".join(f"int{bits}: level {level} ({CANDIDATES[level]} compute)" for bits, level in levels.items())
    flags = " ".join(tuning.kernel_flags()) or "no AVX2"
    reason = f"fastest of levels {sorted(CANDIDATES)} measured here ({flags}; {threads} threads): {names}"
    return NbitsChoice(levels, timings, machine_key(threads), reason)


def ort_timer(threads: int) -> Timer:
    """Times one MatMulNBits product in a one-node ONNX Runtime session (median of REPEATS runs)."""

    def run(bits: int, level: int, k: int, rows: int, limit: float) -> float:
        session = _session(bits, level, k, threads)
        x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
        start = time.perf_counter()
        session.run(None, {"x": x})  # warm-up
        if (first := time.perf_counter() - start) > limit:
            return first
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            session.run(None, {"x": x})
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    return run


def _session(bits: int, level: int, k: int, threads: int) -> Any:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from gptcli.export.graph import MS_OPSET, OPSET

    blocks = -(-k // BLOCK)
    n = max(1, WEIGHT_BYTES // (blocks * BLOCK * bits // 8))
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (n, blocks, BLOCK * bits // 8), dtype=np.uint8)
    scales = np.full(n * blocks, 1e-3, dtype=np.float32)
    zero_points = np.full(n * (-(-blocks * bits // 8)), 0x88 if bits == 4 else 0x80, dtype=np.uint8)
    node = helper.make_node(
        "MatMulNBits", ["x", "w", "scales", "zero_points"], ["y"], domain="com.microsoft",
        K=k, N=n, bits=bits, block_size=BLOCK, accuracy_level=level,
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "matmulnbits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
        [
            numpy_helper.from_array(codes, "w"),
            numpy_helper.from_array(scales, "scales"),
            numpy_helper.from_array(zero_points, "zero_points"),
        ],
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", MS_OPSET)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10  # as the decoder graph: what every ONNX Runtime we support reads
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
