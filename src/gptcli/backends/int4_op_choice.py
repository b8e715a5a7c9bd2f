"""Whether the onnx backend's int4 exports write a weight on a 4-bit grid as gptcli's Int4MatMul operator or as ONNX
Runtime's MatMulNBits (with the grid's block sums), timed once per machine.

The operator decoded the default model at 308-317 tok/s against 250-262 on an AVX-512 Zen 5 (benchmarks/README.md),
but MLAS's kernels differ per CPU and per ONNX Runtime version, and the operator's AVX2 path does twice the integer
work of its AVX-512 one. So the first int4 export here times both forms of the default model's layer shapes
(int8_native.SHAPES) and of its 8-bit head in ONNX Runtime sessions on the backend's threads, at one row (a sequence
decoding) and at PREFILL_ROWS (a prompt's chunk, or a batch: the head then at HEAD_ROWS, the last position of each
sequence); int8_native.prefer_native's rule decides, as for the torch kernels. The
record is cached per (CPU flags, ONNX Runtime version, the kernel's source and path, threads) and `gptcli backends
--json` shows it. Both forms compute the same grid; only the activations' rounding differs (15 bits a row against
MatMulNBits' 8 bits a block at accuracy level 4).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gptcli import tuning
from gptcli.backends import int8_native
from gptcli.backends.int8_native import NATIVE, PASSES, PREFILL_ROWS, SHAPES, TORCH

TUNING_NAME = "onnx-int4-operator"
HEAD = (49152, 576)  # [out, in] of the default model's tied head, 8-bit as a GGUF's Q8_0 keeps it
HEAD_ROWS = 8  # the head's rows when the layers take PREFILL_ROWS: it reads only each sequence's last position
OPERATOR, NBITS = "gptcli's Int4MatMul", "ONNX Runtime's MatMulNBits"


def machine_key(threads: int) -> str:
    import onnxruntime

    parts = (onnxruntime.__version__, int8_native.source_text(), int8_native.widest_path())
    return tuning.machine_key(*parts, str(threads))


def cached_choice(threads: int) -> dict[str, Any] | None:
    """This machine's record (None until an int4 export measured it)."""
    return tuning.cached(TUNING_NAME, machine_key(threads), int8_native.valid_choice)


def uses_operator(library: Path, threads: int, on_measure: Callable[[], None] | None = None) -> bool:
    """Whether int4 exports here use the operator in `library`: this machine's record, or measured now (`on_measure`
    is told first: it takes a few seconds) and cached."""
    key = machine_key(threads)

    def measured() -> dict[str, Any]:
        if on_measure is not None:
            on_measure()
        return measure(library, threads)

    return tuning.tuned(TUNING_NAME, key, measured, int8_native.valid_choice)["kernel"] == NATIVE


def measure(library: Path, threads: int) -> dict[str, Any]:
    """Median ms of a pass over SHAPES in each form, at one row (PASSES) and at PREFILL_ROWS (3), after a warm-up."""
    from gptcli.export.nbits_choice import choose_levels
    from gptcli.export.quantize import apply_accuracy_levels

    rng = np.random.default_rng(0)
    grids = [_grid(rng, n, k) for n, k in SHAPES]
    ours, theirs = _model(grids, native_int4=True), _model(grids, native_int4=False)
    apply_accuracy_levels(theirs, choose_levels((4,), SHAPES[0][1]).levels)
    with tempfile.TemporaryDirectory(prefix="gptcli-int4-op-") as folder:
        sessions = {
            NATIVE: _session(ours, Path(folder), threads, library),
            TORCH: _session(theirs, Path(folder), threads),
        }
        inputs = {
            rows: {f"x{k}": rng.standard_normal((1, rows, k), dtype=np.float32) for k in {k for _, k in SHAPES}}
            | {"x_head": rng.standard_normal((1, min(rows, HEAD_ROWS), HEAD[1]), dtype=np.float32)}
            for rows in (1, PREFILL_ROWS)
        }
        medians: dict[str, dict[str, float]] = {"1 row": {}, f"{PREFILL_ROWS} rows": {}}
        # Session by session, not interleaved: each one's pool spins a while after its work, which would slow the
        # other down (the operator's one-row pass took 1.27 ms interleaved, 0.56-0.68 alone, and MatMulNBits won).
        for name, session in sessions.items():
            for rows, passes in ((1, PASSES), (PREFILL_ROWS, 3)):
                times = []
                for _ in range(passes + 1):
                    start = time.perf_counter()
                    session.run(None, inputs[rows])
                    times.append(time.perf_counter() - start)
                medians[f"{rows} row" + ("s" if rows > 1 else "")][name] = tuning.median_ms(times)
    weight_bytes = sum(n * k for n, k in SHAPES) * 5 // 8 + HEAD[0] * HEAD[1]
    return int8_native.verdict(medians, "int4 onnx", OPERATOR, NBITS, threads, weight_bytes)


def _grid(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A weight [n, k] on a Q4_1 grid as export.quantize.grid_of finds it: codes, float16-exact minimums and steps."""
    steps = (rng.random((n, k // 32), dtype=np.float32) / 100 + 1e-3).astype(np.float16).astype(np.float32)
    lows = (-8 * steps).astype(np.float16).astype(np.float32)
    return rng.integers(0, 16, (n, k // 32, 32), dtype=np.uint8), lows, steps


def _model(grids: list[tuple[np.ndarray, np.ndarray, np.ndarray]], *, native_int4: bool) -> Any:
    """One graph: each weight's MatMul from the input of its width ([1, rows, k], as the decoder's activations)."""
    from onnx import TensorProto, helper

    from gptcli.export.graph import MS_OPSET, OPSET
    from gptcli.export.native_ops import INT4_OP_DOMAIN
    from gptcli.export.quantize import grid_matmul

    graph = helper.make_graph([], "int4-op-choice", [], [])
    augmented: dict[str, str] = {}
    for index, grid in enumerate(grids):
        n, k = grid[0].shape[0], grid[0].shape[1] * 32
        node = helper.make_node("MatMul", [f"x{k}", f"w{index}"], [f"y{index}"], name=f"layer{index}/MatMul")
        graph.node.extend(grid_matmul(graph, node, grid, np.float32, augmented, native_int4=native_int4))
        graph.output.append(helper.make_tensor_value_info(f"y{index}", TensorProto.FLOAT, [1, "rows", n]))
    graph.node.append(_head(graph, native_int4=native_int4))
    graph.output.append(helper.make_tensor_value_info("head", TensorProto.FLOAT, [1, "head_rows", HEAD[0]]))
    for k in sorted({grid[0].shape[1] * 32 for grid in grids}):
        graph.input.append(helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, "rows", k]))
    graph.input.append(helper.make_tensor_value_info("x_head", TensorProto.FLOAT, [1, "head_rows", HEAD[1]]))
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", MS_OPSET)]
    if native_int4:
        opsets.append(helper.make_opsetid(INT4_OP_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10  # as the decoder graph
    return model


def _head(graph: Any, *, native_int4: bool) -> Any:
    """The head on a Q8_0 grid (float16 steps, codes 128 -/+ 127), as the export writes it in either form."""
    from onnx import helper

    from gptcli.export.native_ops import int8_op
    from gptcli.export.quantize import nbits_node

    n, k = HEAD
    rng = np.random.default_rng(1)
    codes = rng.integers(1, 256, (n, k // 32, 32), dtype=np.uint8)
    step = (rng.random((n, k // 32), dtype=np.float32) / 1000 + 1e-4).astype(np.float16).astype(np.float32)
    node = helper.make_node("MatMul", ["x_head", "head_w"], ["head"], name="lm_head/MatMul")
    op = int8_op(graph, node, k, codes, step, -128 * step) if native_int4 else None
    if op is not None:
        return op
    zeros = np.full(step.shape, 128, dtype=np.uint8)
    return nbits_node(graph, "lm_head/MatMulNBits", "x_head", "head", k, 8, codes, step, zeros)


def _session(model: Any, folder: Path, threads: int, library: Path | None = None) -> Any:
    import onnxruntime as ort

    path = folder / f"{'op' if library else 'nbits'}.onnx"
    path.write_bytes(model.SerializeToString())
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if library is not None:
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
