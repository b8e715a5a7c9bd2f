"""gptcli's int4 kernel as an ONNX Runtime operator (ai.gptcli Int4MatMul): int4 CPU exports of weights on a 4-bit grid
(a Q4_1 GGUF's) use it where the kernel runs (AVX-512 VNNI or AVX2, a C compiler) and was timed faster than
MatMulNBits on this machine, and MatMulNBits elsewhere."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from gptcli import tuning
from gptcli.backends import int4_native, int4_op_choice, int8_native
from gptcli.backends.base import LoadOptions
from gptcli.backends.int4_native import onnx_op_library, onnx_op_refusal
from gptcli.backends.onnx_backend import OnnxBackend
from gptcli.export import quantize
from gptcli.export.native_ops import INT4_OP, INT4_OP_DOMAIN
from gptcli.testing import check_batched_step, greedy_ids
from tests.test_int8_native import NARROWER

needs_kernel = pytest.mark.skipif(onnx_op_refusal() is not None, reason=f"no int4 operator here: {onnx_op_refusal()}")


def _grid_weight(k: int, n: int, seed: int = 1, scale: float = 1.0) -> np.ndarray:
    """[k, n] Q4_1-style: per output and block of 32 inputs, min + step * q (q in 0..15), the steps and minima float16
    values times `scale`."""
    rng = np.random.default_rng(seed)
    steps = rng.uniform(0.01, 0.03, (n, k // 32, 1)).astype(np.float16).astype(np.float32) * scale
    minima = rng.uniform(-0.3, -0.05, (n, k // 32, 1)).astype(np.float16).astype(np.float32) * scale
    q = rng.integers(0, 16, (n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15
    return np.ascontiguousarray((minima + steps * q).reshape(n, k).T, dtype=np.float32)


def _one_matmul_model(weight: np.ndarray):
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="layers.0/mlp/down/MatMul")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "m", n])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    return model


def _session(model, threads: int = 1, library=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(library or onnx_op_library()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_a_grid_weight_becomes_one_operator_only_when_asked_and_when_float16_holds_it():
    weight = _grid_weight(64, 40)
    native = quantize(_one_matmul_model(weight), "int4", native_int4=True)
    assert [(n.op_type, n.domain) for n in native.graph.node] == [(INT4_OP, INT4_OP_DOMAIN)]
    assert any(o.domain == INT4_OP_DOMAIN for o in native.opset_import)
    plain = quantize(_one_matmul_model(weight), "int4")
    assert [n.op_type for n in plain.graph.node] == ["Reshape", "ReduceSum", "Concat", "MatMulNBits"]
    # steps past float16's range (the kernel keeps them as float16): the MatMulNBits path, exact all the same
    huge = quantize(_one_matmul_model(_grid_weight(64, 40, scale=2.0**22)), "int4", native_int4=True)
    assert [n.op_type for n in huge.graph.node] == ["Reshape", "ReduceSum", "Concat", "MatMulNBits"]
    # a weight on no grid is rounded as ever, operator or not
    off = weight + np.random.default_rng(3).normal(0, 1e-3, weight.shape).astype(np.float32)
    assert [n.op_type for n in quantize(_one_matmul_model(off), "int4", native_int4=True).graph.node] == ["MatMulNBits"]


@needs_kernel
def test_the_operator_multiplies_by_the_grid_and_a_row_gives_the_same_bits_in_any_batch():
    k, n = 96, 40  # 40 outputs: two full blocks of 16 and a padded one
    weight = _grid_weight(k, n)
    model = quantize(_one_matmul_model(weight), "int4", native_int4=True)
    x = np.random.default_rng(2).standard_normal((3, 5, k)).astype(np.float32)
    got = _session(model).run(None, {"x": x})[0]
    exact = x.astype(np.float64) @ weight.astype(np.float64)
    # 15-bit activations against the exact grid: ~1e-4 of the largest output, where a layout mistake is ~100 %
    assert np.abs(got - exact).max() < 1e-3 * np.abs(exact).max()
    two_threads = _session(model, threads=2).run(None, {"x": x})[0]
    assert np.array_equal(got, two_threads)
    for rows in ((0, 0), (1, 2), (2, 4)):  # each row alone: the bits it had among 15 (the 4-row tiles included)
        alone = _session(model).run(None, {"x": x[rows[0] : rows[0] + 1, rows[1] : rows[1] + 1]})[0]
        assert np.array_equal(alone[0, 0], got[rows])


def _grid_model(source, target):
    """A copy of a tiny model with every layer matrix moved onto a Q4_1 grid and its (tied) embedding onto a Q8_0 one,
    as a Q4_1 GGUF's weights are."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights_file = target / "model.safetensors"
    tensors = load_file(str(weights_file))
    for name, tensor in tensors.items():
        if tensor.dim() == 2 and "embed" in name and tensor.shape[1] % 32 == 0:  # the tied head, as Q8_0
            blocks = tensor.float().reshape(tensor.shape[0], -1, 32)
            step = (blocks.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-4).half().float()
            tensors[name] = (step * torch.round(blocks / step)).reshape(tensor.shape).to(tensor.dtype).contiguous()
            continue
        if tensor.dim() != 2 or "embed" in name or "lm_head" in name or tensor.shape[1] % 32:
            continue
        blocks = tensor.float().reshape(tensor.shape[0], -1, 32)
        low = blocks.amin(-1, keepdim=True).half().float()
        step = ((blocks.amax(-1, keepdim=True) - low) / 15).clamp(min=1e-4).half().float()
        codes = torch.round((blocks - low) / step).clamp(0, 15)
        tensors[name] = (low + step * codes).reshape(tensor.shape).to(tensor.dtype).contiguous()
    save_file(tensors, str(weights_file), metadata={"format": "pt"})
    return target


@needs_kernel
def test_an_int4_export_on_a_grid_uses_the_operator_and_batches_as_it_runs_alone(tiny_models, tmp_path, monkeypatch):
    folder = _grid_model(tiny_models["llama"], tmp_path / "tiny-llama-q4")
    native = OnnxBackend.load(folder, LoadOptions(device="cpu", precision="int4", threads=2))
    quantization = native.meta["quantization"]
    assert quantization["int4_kernel"] == INT4_OP and quantization["int4_op_matmuls"] == 9  # qkv, o, gate-up, down
    assert quantization["int4_op_8bit_matmuls"] == 1  # and the Q8_0 head
    prompt = [5, 9, 14, 3, 7, 11]
    check_batched_step(native, prompt)
    reference = OnnxBackend.load(folder, LoadOptions(device="cpu", precision="fp32"))
    logits, _ = native.forward(prompt, native.new_cache())
    expected, _ = reference.forward(prompt, reference.new_cache())
    # the layers exact, the 8-bit head and embedding rounded: as close to fp32 as the MatMulNBits export is
    assert np.abs(logits - expected).max() < 0.05 * np.abs(expected).max()
    assert greedy_ids(native, prompt, 12) == greedy_ids(reference, prompt, 12)

    monkeypatch.setenv("GPTCLI_NATIVE_KERNELS", "0")  # off: the plain MatMulNBits export, in a folder of its own
    plain = OnnxBackend.load(folder, LoadOptions(device="cpu", precision="int4"))
    assert plain.meta["quantization"]["int4_kernel"] == "MatMulNBits"
    assert plain.meta["quantization"]["grid_kept_matmuls"] == 8
    assert greedy_ids(plain, prompt, 12) == greedy_ids(reference, prompt, 12)


def test_an_export_into_an_output_folder_keeps_matmulnbits_for_any_onnx_runtime(tiny_models, tmp_path):
    from gptcli.export import ensure_export

    folder = _grid_model(tiny_models["llama"], tmp_path / "tiny-llama-q4")
    made = ensure_export(folder, precision="int4", output=tmp_path / "out", native_int4=True)
    assert made.meta["quantization"]["int4_kernel"] == "MatMulNBits"
    assert made.meta["quantization"]["grid_kept_matmuls"] == 8


@needs_kernel
@pytest.mark.parametrize(("switch", "path"), NARROWER)
def test_the_narrower_operators_give_the_bits_of_the_widest_build(monkeypatch, switch, path):
    model = quantize(_one_matmul_model(_grid_weight(96, 40)), "int4", native_int4=True)
    x = np.random.default_rng(4).standard_normal((2, 5, 96)).astype(np.float32)
    widest_library = onnx_op_library()
    widest = _session(model, threads=2).run(None, {"x": x})[0]
    monkeypatch.setenv(int8_native.ISA_SWITCH, switch)
    int8_native._load.cache_clear()
    try:
        library = onnx_op_library()
        assert library is not None and (library != widest_library or "avx512_vnni" not in tuning.kernel_flags())
        assert int4_native.onnx_op_choice()["reason"].startswith(f"gptcli's Int4MatMul ({path})")
        assert np.array_equal(_session(model, threads=2, library=library).run(None, {"x": x})[0], widest)
    finally:
        int8_native._load.cache_clear()


def _record(kernel: str) -> None:
    from gptcli.hardware import default_threads

    record = {"kernel": kernel, "reason": f"chosen by the test: {kernel}"}
    tuning.store(int4_op_choice.TUNING_NAME, int4_op_choice.machine_key(default_threads()), record)


@needs_kernel
def test_this_machines_timing_decides_whether_an_export_uses_the_operator(tiny_models, tmp_path, monkeypatch):
    folder = _grid_model(tiny_models["llama"], tmp_path / "tiny-llama-q4")
    said = int4_native.onnx_op_choice()
    assert said["kernel"] is None and "timed at the first int4 export here" in said["reason"]
    monkeypatch.setattr(int8_native, "MIN_PARAMS", 0)  # as a model big enough to be timed for
    _record(int8_native.TORCH)
    assert int4_native.onnx_op_for("int4", "cpu", folder) is None
    slower = OnnxBackend.load(folder, LoadOptions(device="cpu", precision="int4"))
    assert slower.meta["quantization"]["int4_kernel"] == "MatMulNBits"
    assert int4_native.onnx_op_choice() == {"kernel": "MatMulNBits", "reason": "chosen by the test: torch"}
    _record(int8_native.NATIVE)
    faster = OnnxBackend.load(folder, LoadOptions(device="cpu", precision="int4"))
    assert faster.meta["quantization"]["int4_kernel"] == INT4_OP
    assert int4_native.onnx_op_choice()["kernel"].startswith("gptcli's Int4MatMul")


@needs_kernel
def test_the_real_timing_names_a_form_and_its_reason():
    record = int4_op_choice.measure(onnx_op_library(), 1)
    assert record["kernel"] in (int8_native.NATIVE, int8_native.TORCH)
    assert set(record["timings_ms"]) == {"1 row", f"{int8_native.PREFILL_ROWS} rows"}
    assert all(set(times) == {int8_native.NATIVE, int8_native.TORCH} for times in record["timings_ms"].values())
    assert "int4 onnx products" in record["reason"] and "1 threads" in record["reason"]


def test_the_operator_and_the_plain_int4_exports_are_both_kept_and_each_replaced_by_its_own_kind(
    tiny_models, tmp_path, monkeypatch
):
    """Turning the kernels off (or a new timing) and back on does not export again each time."""
    from gptcli.export import ensure_export, graph

    folder = _grid_model(tiny_models["llama"], tmp_path / "tiny-llama-q4")
    operator = ensure_export(folder, precision="int4", device="cpu", native_int4=True).folder
    plain = ensure_export(folder, precision="int4", device="cpu").folder
    assert operator != plain and operator.is_dir() and plain.is_dir()
    monkeypatch.setattr(graph, "GRAPH_VERSION", graph.GRAPH_VERSION + 1)
    newer = ensure_export(folder, precision="int4", device="cpu").folder
    assert newer.is_dir() and not plain.exists() and operator.is_dir()


def _q8_weight(k: int, n: int, seed: int = 2) -> np.ndarray:
    """[k, n] as a GGUF's Q8_0 holds it: per output and block of 32 inputs, a float16 step times codes in -127..127."""
    rng = np.random.default_rng(seed)
    steps = rng.uniform(1e-3, 3e-3, (n, k // 32, 1)).astype(np.float16).astype(np.float32)
    q = rng.integers(-127, 128, (n, k // 32, 32))
    return np.ascontiguousarray((steps * q).reshape(n, k).T, dtype=np.float32)


def _head_model(weight: np.ndarray):
    model = _one_matmul_model(weight)
    model.graph.node[0].name = "lm_head/MatMul"  # the MatMul an int4 export keeps at 8 bits
    return model


def test_an_8_bit_head_on_a_q8_grid_becomes_the_operator_with_bits_8_only_when_float16_holds_it():
    from gptcli.export.native_ops import int8_op

    q8 = quantize(_head_model(_q8_weight(64, 40)), "int4", native_int4=True)
    (node,) = q8.graph.node
    assert node.op_type == INT4_OP and {a.name: a.i for a in node.attribute} == {"N": 40, "bits": 8}
    assert [n.op_type for n in quantize(_head_model(_q8_weight(64, 40)), "int4").graph.node] == ["MatMulNBits"]
    assert [n.op_type for n in quantize(_head_model(_q8_weight(64, 40)), "int8").graph.node] == ["MatMulNBits"]
    # a float weight: its 8-bit steps are float32 values that float16 would round, so MatMulNBits keeps it
    floats = np.random.default_rng(3).standard_normal((64, 40)).astype(np.float32)
    assert [n.op_type for n in quantize(_head_model(floats), "int4", native_int4=True).graph.node] == ["MatMulNBits"]
    codes, step = np.full((4, 2, 32), 128, np.uint8), np.full((4, 2), 1e-3, np.float16).astype(np.float32)
    assert int8_op(None, None, 48, codes, step, -128 * step) is None  # inputs not a multiple of 32


@needs_kernel
@pytest.mark.parametrize(("switch", "path"), NARROWER)
def test_the_8_bit_operator_multiplies_by_the_grid_and_gives_the_same_bits_alone_in_a_batch_and_narrower(
    monkeypatch, switch, path
):
    k, n = 96, 40
    weight = _q8_weight(k, n)
    model = quantize(_head_model(weight), "int4", native_int4=True)
    x = np.random.default_rng(6).standard_normal((3, 5, k)).astype(np.float32)
    got = _session(model).run(None, {"x": x})[0]
    exact = x.astype(np.float64) @ weight.astype(np.float64)
    assert np.abs(got - exact).max() < 1e-3 * np.abs(exact).max()  # 15-bit activations on the exact grid
    for rows in ((0, 0), (1, 2), (2, 4)):
        alone = _session(model).run(None, {"x": x[rows[0] : rows[0] + 1, rows[1] : rows[1] + 1]})[0]
        assert np.array_equal(alone[0, 0], got[rows])
    assert np.array_equal(_session(model, threads=2).run(None, {"x": x})[0], got)
    monkeypatch.setenv(int8_native.ISA_SWITCH, switch)
    int8_native._load.cache_clear()
    try:
        assert f"Int4MatMul ({path})" in int4_native.onnx_op_choice()["reason"]
        assert np.array_equal(_session(model, library=onnx_op_library()).run(None, {"x": x})[0], got)
    finally:
        int8_native._load.cache_clear()


@needs_kernel
def test_the_memory_floor_looks_for_the_export_this_machines_timing_chose(tiny_models, tmp_path, monkeypatch):
    """It looked for the operator's export wherever the operator could run: after a timing that chose MatMulNBits,
    a model already exported was floored as float32 weights to export again."""
    folder = _grid_model(tiny_models["llama"], tmp_path / "tiny-llama-q4")
    monkeypatch.setattr(int8_native, "MIN_PARAMS", 0)
    _record(int8_native.TORCH)
    OnnxBackend.load(folder, LoadOptions(device="cpu", precision="int4"))  # the MatMulNBits export, now cached
    floor = OnnxBackend.memory_floor(folder, LoadOptions(device="cpu", precision="int4"))
    assert floor is not None and floor.held_as == "int4"
