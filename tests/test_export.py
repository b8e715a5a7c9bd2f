"""Export: the I/O contract, the fused graph, the sidecar, the cache, atomicity and clear errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gptcli import export as ex
from gptcli.errors import InputError, ModelError, UsageError
from gptcli.hf import Architecture
from tests.conftest import run_cli


def _graph(path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_io_names_follow_hugging_face_with_dynamic_dims(tiny_models, family):
    result = ex.ensure_export(tiny_models[family])
    graph = _graph(result.model_path).graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    assert inputs[:4] == ["input_ids", "attention_mask", "position_ids", "logits_to_keep"]
    assert inputs[4:] == [f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert outputs == ["logits"] + [f"present.{i}.{k}" for i in range(2) for k in ("key", "value")]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch_size", "sequence_length"]
    past = [d.dim_param or d.dim_value for d in graph.input[4].type.tensor_type.shape.dim]
    assert past[0] == "batch_size" and past[2] == "past_sequence_length"
    logits = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert logits[1] == "logits_length"  # the last logits_to_keep positions
    assert result.meta["io"]["inputs"] == inputs and result.meta["io"]["outputs"] == outputs


def test_every_file_of_an_export_has_the_mode_a_new_file_gets(tiny_models):
    """onnx wrote model.onnx.data 0600 beside 0644 files: another user of a shared cache could not read it."""
    from gptcli.atomicio import default_mode

    folder = ex.ensure_export(tiny_models["llama"]).model_path.parent
    modes = {path.name: path.stat().st_mode & 0o777 for path in folder.iterdir() if path.is_file()}
    assert "model.onnx.data" in modes and set(modes.values()) == {default_mode()}, modes


@pytest.mark.parametrize(
    ("family", "fused"),
    [
        ("llama", {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "QuickGelu"}),
        ("gpt2", {"GroupQueryAttention", "SkipLayerNormalization", "FastGelu"}),
    ],
)
def test_attention_and_norms_are_fused(tiny_models, family, fused):
    graph = _graph(ex.ensure_export(tiny_models[family]).model_path).graph
    ops = [node.op_type for node in graph.node]
    assert fused <= set(ops)
    assert ops.count("GroupQueryAttention") == 2  # one per layer
    assert "Softmax" not in ops and "Transpose" not in ops
    assert len(ops) < 15 + 12 * 2  # ~10 nodes per layer, not the ~75 of a traced export


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_graph_has_block_quantized_matmuls_lm_head_included(tiny_models, precision):
    graph = _graph(ex.ensure_export(tiny_models["llama"], precision=precision).model_path).graph
    ops = {node.name: node for node in graph.node}
    assert all(n.op_type == "MatMulNBits" for name, n in ops.items() if "MatMul" in name), "every MatMul is quantized"
    lm_head = next(n for name, n in ops.items() if name.startswith("lm_head"))
    assert lm_head.op_type == "MatMulNBits"
    bits = {a.name: a.i for a in lm_head.attribute}["bits"]
    assert bits == 8
    qkv_bits = {a.name: a.i for a in next(n for n in graph.node if "qkv" in n.name).attribute}["bits"]
    assert qkv_bits == (8 if precision == "int8" else 4)


@pytest.mark.parametrize("bits", [4, 8])
def test_block_quantization_round_trips_within_half_a_step(bits):
    rng = np.random.default_rng(0)
    wt = rng.standard_normal((6, 80)).astype(np.float32) + 0.3  # 2.5 blocks: padded to 3
    wt[0, :32] = 0.25  # a constant block is exact
    codes, scales, zeros = ex.quantize_blocks(wt, bits, 32)
    assert codes.shape == (6, 3, 32) and codes.max() < 2**bits
    back = ((codes.astype(np.float32) - zeros[..., None]) * scales[..., None]).reshape(6, 96)[:, :80]
    step = np.repeat(scales, 32, axis=1)[:, :80]
    assert np.all(np.abs(back - wt) <= step / 2 + 1e-6)
    assert np.allclose(back[0, :32], 0.25)


def test_an_8bit_grid_is_stored_exactly_and_anything_else_is_rounded():
    # Q8_0-style blocks: d * q with q in -127..127, some blocks all positive or all negative.
    rng = np.random.default_rng(3)
    d = rng.uniform(0.001, 0.01, (5, 3, 1)).astype(np.float32)
    q = rng.integers(-127, 128, (5, 3, 32))
    q[0, 0] = rng.integers(3, 128, 32)
    q[1, 1] = -rng.integers(3, 128, 32)
    wt = (d * q).reshape(5, 96).astype(np.float32)
    codes, scales, zeros = ex.eight_bit_blocks(wt)
    back = ((codes.astype(np.float32) - zeros[..., None]) * scales[..., None]).reshape(5, 96)
    np.testing.assert_allclose(back, wt, rtol=1e-5, atol=1e-7)
    noisy = wt + rng.normal(0, 1e-4, wt.shape).astype(np.float32)
    for got, want in zip(ex.eight_bit_blocks(noisy), ex.quantize_blocks(noisy, 8, 32), strict=True):
        np.testing.assert_array_equal(got, want)


def test_grid_of_gives_the_same_grid_whatever_its_slices(monkeypatch):
    import importlib

    quantize = importlib.import_module("gptcli.export.quantize")
    # 8-bit blocks, a third of them using only codes 0, 4 and 9 (their step is a quarter of the smallest gap,
    # found only past the coarse divisors 1..3): a slice holding only those must not turn the matrix down.
    rng = np.random.default_rng(5)
    q = rng.integers(0, 256, (24, 4, 32))
    q[8:16] = rng.choice([0, 4, 9], (8, 4, 32))
    q[8:16, :, :3] = [0, 4, 9]
    wt = (rng.uniform(0.001, 0.01, (24, 4, 1)) * (q - 127)).reshape(24, 128).astype(np.float32)
    whole = ex.grid_of(wt, 255, 32)
    assert whole is not None
    monkeypatch.setattr(quantize, "GRID_ROWS", 12)  # rows 9-11 and 12-14 make slices of coarse blocks only
    sliced = ex.grid_of(wt, 255, 32)
    assert sliced is not None
    for got, want in zip(sliced, whole, strict=True):
        np.testing.assert_array_equal(got, want)
    assert ex.grid_of(wt + rng.normal(0, 1e-4, wt.shape).astype(np.float32), 255, 32) is None


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_quantized_cpu_export_gathers_the_embedding_from_8bit_blocks(tiny_models, precision):
    import onnxruntime as ort

    quantized = ex.ensure_export(tiny_models["llama"], precision=precision)
    graph = _graph(quantized.model_path).graph
    embed = next(node for node in graph.node if node.name.startswith("embed"))
    assert embed.op_type == "GatherBlockQuantized"
    assert "model.embed_tokens.weight" not in {t.name for t in graph.initializer}
    assert quantized.meta["quantization"]["embedding_8_bit_gathers"] == ["embed"]
    # The gathered rows are the float table's to within half an 8-bit step: the first layer's input
    # differs that little, so the logits stay near the fp32 export's (a wrong row or scale would not).
    feed = {
        "input_ids": np.array([[5, 6, 7]], dtype=np.int64),
        "attention_mask": np.ones((1, 3), dtype=np.int64),
        "position_ids": np.array([[0, 1, 2]], dtype=np.int64),
        "logits_to_keep": np.array([1], dtype=np.int64),
    }
    logits = {}
    for name, export in (("fp32", ex.ensure_export(tiny_models["llama"])), (precision, quantized)):
        model = export.meta["model"]
        past = np.zeros((1, model["num_kv_heads"], 0, model["head_dim"]), np.float32)
        inputs = {
            **feed,
            **{f"past_key_values.{i}.{k}": past for i in range(model["num_layers"]) for k in ("key", "value")},
        }
        session = ort.InferenceSession(str(export.model_path), providers=["CPUExecutionProvider"])
        logits[name] = session.run(["logits"], inputs)[0]
    spread = np.abs(logits["fp32"]).max()
    assert np.abs(logits[precision] - logits["fp32"]).max() < (0.05 if precision == "int8" else 0.3) * spread


def _one_matmul_model(weight):
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="layers.0/mlp/gate_up/MatMul")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "m", k])],  # [batch, sequence, k], as exported
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "m", n])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10  # as the export writes it: what every supported onnxruntime reads
    return model


def _run(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_matmul_matches_its_dequantized_weight_in_onnx_runtime(precision):
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((80, 40)).astype(np.float32)  # 2.5 blocks: padded, an odd count of zero points
    x = rng.standard_normal((1, 2, 80)).astype(np.float32)
    codes, scales, zeros = ex.quantize_blocks(np.ascontiguousarray(weight.T), 8 if precision == "int8" else 4, 32)
    dequantized = ((codes.astype(np.float32) - zeros[..., None]) * scales[..., None]).reshape(40, 96)[:, :80].T
    got = _run(ex.quantize(_one_matmul_model(weight), precision), x)
    # accuracy level 4 rounds x to int8 per block: ~1 % here, where a packing mistake is ~100 %
    assert np.abs(got - x @ dequantized).max() < 0.03 * np.abs(x @ dequantized).max()


def test_int4_keeps_a_weight_already_on_a_4bit_grid():
    # Q4_1-style blocks (min + step * q, q in 0..15) whose minima are not multiples of the step:
    # an integer zero point cannot hold them; the block-sum residual rows do.
    rng = np.random.default_rng(1)
    k, n = 64, 48
    steps = rng.uniform(0.01, 0.03, (n, 2, 1)).astype(np.float32)
    minima = rng.uniform(-0.3, -0.05, (n, 2, 1)).astype(np.float32)
    q = rng.integers(0, 16, (n, 2, 32))
    q[..., 0], q[..., 1] = 0, 15
    weight = np.ascontiguousarray((minima + steps * q).reshape(n, k).T, dtype=np.float32)
    assert ex.on_grid(weight.T.copy(), 15, 32)
    assert not ex.on_grid(weight.T + rng.normal(0, 1e-3, (n, k)).astype(np.float32), 15, 32)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    exact = x @ weight
    kept = ex.quantize(_one_matmul_model(weight), "int4")
    ops = [node.op_type for node in kept.graph.node]
    assert ops == ["Reshape", "ReduceSum", "Concat", "MatMulNBits"]  # block sums, appended, then the weight
    kept_error = np.abs(_run(kept, x) - exact).max()
    # the same weight nudged off its grid is rounded the ordinary way
    rounded = ex.quantize(
        _one_matmul_model(weight + 1e-4 * rng.standard_normal(weight.shape).astype(np.float32)), "int4"
    )
    assert [node.op_type for node in rounded.graph.node] == ["MatMulNBits"]
    rounded_error = np.abs(_run(rounded, x) - exact).max()
    # what is left is accuracy level 4's int8 rounding of x, far below a second 4-bit rounding
    assert kept_error < rounded_error / 5


def test_dynamic_batch_runs_two_rows(tiny_models):
    import onnxruntime as ort

    result = ex.ensure_export(tiny_models["llama"])
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    model = result.meta["model"]
    feed = {
        "input_ids": np.array([[5, 6, 7], [5, 6, 7]], dtype=np.int64),
        "attention_mask": np.ones((2, 3), dtype=np.int64),
        "position_ids": np.array([[0, 1, 2]] * 2, dtype=np.int64),
        "logits_to_keep": np.array([1], dtype=np.int64),
    }
    for i in range(model["num_layers"]):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((2, model["num_kv_heads"], 0, model["head_dim"]), np.float32)
    logits, *presents = session.run(None, feed)
    assert logits.shape == (2, 1, model["vocab_size"])
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-5)
    assert presents[0].shape == (2, model["num_kv_heads"], 3, model["head_dim"])
    every, *_ = session.run(None, {**feed, "logits_to_keep": np.array([3], dtype=np.int64)})
    assert every.shape == (2, 3, model["vocab_size"])
    np.testing.assert_allclose(every[:, -1:], logits, atol=1e-5)


def test_sidecar_records_source_hash_versions_and_model(tiny_models):
    result = ex.ensure_export(tiny_models["gpt2"], precision="int4")
    meta = json.loads((result.folder / ex.SIDECAR_FILE).read_text())
    assert meta["source"]["sha256"] == ex.content_hash(tiny_models["gpt2"])
    assert meta["precision"] == "int4" and meta["device"] == "cpu" and meta["opset"] == ex.OPSET
    assert meta["onnxruntime_version"] and meta["gptcli_version"]
    assert meta["model"]["architecture"] == "GPT2LMHeadModel" and meta["model"]["num_layers"] == 2
    assert meta["quantization"]["bits"] == 4 and meta["quantization"]["block_size"] == 32
    assert meta["files"]["model.onnx"] == (result.folder / "model.onnx").stat().st_size


def test_cache_is_reused_and_keyed_by_precision_and_source(tiny_models, monkeypatch, tmp_path):
    import shutil

    first = ex.ensure_export(tiny_models["llama"])
    calls = []
    real_build = ex.build_export
    monkeypatch.setattr(ex, "build_export", lambda *a, **k: calls.append(1) or real_build(*a, **k))
    assert ex.ensure_export(tiny_models["llama"]).folder == first.folder
    assert calls == []
    assert ex.ensure_export(tiny_models["llama"], precision="int8").folder != first.folder
    assert len(calls) == 1
    changed = tmp_path / "changed"
    shutil.copytree(tiny_models["llama"], changed)
    (changed / "model.safetensors").touch()  # a changed source gets a new export
    assert ex.cached_export_dir(changed, "fp32", "cpu").name != first.folder.name
    twin = tmp_path / "elsewhere" / tiny_models["llama"].name
    shutil.copytree(tiny_models["llama"], twin)  # same name, sizes and mtimes (copy2), another place
    assert ex.cached_export_dir(twin, "fp32", "cpu") != first.folder  # its damage could not reach the first's export


def test_two_processes_exporting_at_once_keep_the_first_cached_export(tiny_models, monkeypatch, isolated_home):
    """The later of two concurrent exports swapped the earlier one's folder out (rename, rename, delete) while
    the first process was opening it: it now keeps the export it finds and discards its own copy."""
    import shutil

    dest = ex.cached_export_dir(tiny_models["llama"], "fp32", "cpu")
    real_build = ex.build_export

    def with_a_concurrent_export(folder, out, **kwargs):
        meta = real_build(folder, out, **kwargs)
        shutil.copytree(out, dest)  # the other process published first
        (dest / "theirs").touch()
        return meta

    with monkeypatch.context() as patched:  # not monkeypatch.undo(): that would undo the isolated home too
        patched.setattr(ex, "build_export", with_a_concurrent_export)
        export = ex.ensure_export(tiny_models["llama"])
    assert export.folder == dest and (dest / "theirs").exists()
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # no temporary folder left
    assert ex.read_export(dest).meta["cache_key"] == export.meta["cache_key"]
    ex.ensure_export(tiny_models["llama"], force=True)  # --force still replaces it
    assert not (dest / "theirs").exists() and dest.is_relative_to(isolated_home)


def test_interrupted_export_leaves_nothing_behind(tiny_models, monkeypatch, isolated_home):
    def interrupted(folder, out, **_):
        (out / "model.onnx").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "build_export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ex.ensure_export(tiny_models["gpt2"])
    assert list((isolated_home / "cache" / "onnx").iterdir()) == []


def test_a_full_disk_during_an_export_names_the_export(tiny_models, monkeypatch, isolated_home, capsys):
    import errno

    from gptcli.cli.app import run

    def full(folder, out, **_):
        raise OSError(errno.ENOSPC, "No space left on device")  # as onnx's writer raises it: no file name

    monkeypatch.setattr(ex, "build_export", full)
    assert run(["export", str(tiny_models["gpt2"])]) == 1
    dest = ex.cached_export_dir(tiny_models["gpt2"], "fp32", "cpu")
    assert capsys.readouterr().err.splitlines()[-2:] == [
        f"error: cannot write {dest}: No space left on device",
        "hint: free some space, or set GPTCLI_HOME to a folder on another disk",
    ]
    assert list(dest.parent.iterdir()) == []


def test_a_full_disk_while_the_tokenizer_is_copied_names_the_export_not_the_model(
    tiny_models, monkeypatch, tmp_path, capsys
):
    """shutil.copy2's OSError names its source first: a full disk said 'error: <the model>/tokenizer.json: No space
    left on device', as if the user's model folder were the problem."""
    import errno

    from gptcli.cli.app import run

    def full(src, dst, **_):
        raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))

    monkeypatch.setattr(ex.shutil, "copy2", full)
    out = tmp_path / "out"
    assert run(["export", str(tiny_models["gpt2"]), "--output", str(out)]) == 1
    assert capsys.readouterr().err.splitlines()[-2:] == [
        f"error: {out}: No space left on device",
        "hint: free some space, or choose a path on another disk",
    ]
    assert not out.exists()


def test_an_export_killed_with_9_leaves_no_folder_for_good(tiny_models, isolated_home):
    """kill -9 skips every `finally`: the next export of the same folder removes what the dead one left."""
    import subprocess
    import sys

    dest = ex.cached_export_dir(tiny_models["gpt2"], "fp32", "cpu")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    left = [dest.parent / f".tmp-{dest.name}-{dead_pid}-1", dest.parent / f".old-{dest.name}-{dead_pid}-2"]
    alive = dest.parent / f".tmp-{dest.name}-{os.getppid()}-3"  # a writer still running: kept
    other = dest.parent / f".tmp-{dest.name}-x-{dead_pid}-4"  # another folder's name: kept
    for folder in [*left, alive, other]:
        folder.mkdir(parents=True)
        (folder / "model.onnx.data").write_bytes(b"half")
    ex.ensure_export(tiny_models["gpt2"])
    assert sorted(p.name for p in dest.parent.iterdir()) == sorted([dest.name, alive.name, other.name])


def test_unsupported_architecture_names_what_is_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    arch = Architecture.from_config(json.loads((tmp_path / "config.json").read_text()))
    assert arch.family == "other"  # not an error in itself: such a model runs through transformers
    with pytest.raises(ModelError, match="supported architectures are GPT2LMHeadModel, Gemma3ForCausalLM, Llama"):
        ex.check_exportable(arch)


@pytest.mark.parametrize(("heads", "size"), [(4, 12), (6, 8)])
def test_heads_onnx_attention_cannot_run_are_refused_also_from_the_cache(tmp_path, monkeypatch, heads, size):
    """Heads of 12 (or 8) dimensions exported fine and every run then failed inside ORT's GroupQueryAttention
    ('internal error: RuntimeError ... head_size must be a multiple of 8', exit 1; 16 with the rotary embedding
    inside, as every family but GPT-2 has it): now a ModelError naming the size, at export and for an export
    cached before the rule."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gptcli.backends.base import LoadOptions
    from gptcli.backends.onnx_backend import OnnxBackend
    from gptcli.hf import architecture

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32,
    )  # fmt: skip
    folder = tmp_path / f"head-{size}"
    LlamaForCausalLM(config).save_pretrained(folder)
    with pytest.raises(ModelError, match=rf"{size} dimensions .* multiple of 16") as info:
        ex.ensure_export(folder)
    assert info.value.exit_code == 5 and "--backend torch" in (info.value.hint or "")
    with monkeypatch.context() as older:  # as an older gptcli exported it
        older.setitem(architecture.ONNX_HEAD_DIM_MULTIPLE, "rotary", 4)
        ex.ensure_export(folder)
    with pytest.raises(ModelError, match="multiple of 16"):
        OnnxBackend.load(folder, LoadOptions(device="cpu"))


def test_a_config_that_disagrees_with_the_weights_fails_before_any_weight_is_read(tiny_models, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] * 2}))
    monkeypatch.setattr(ex, "load_weights", lambda _: pytest.fail("weights were read"))
    with pytest.raises(ModelError, match=r"intermediate_size disagrees with .*model\.safetensors") as info:
        ex.ensure_export(folder)
    assert info.value.exit_code == 5


def test_bad_choices_and_foreign_output_folder(tiny_models, tmp_path):
    with pytest.raises(UsageError):
        ex.ensure_export(tiny_models["gpt2"], precision="int3")
    with pytest.raises(UsageError, match="CUDA"):
        ex.ensure_export(tiny_models["gpt2"], precision="fp16", device="cpu")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a gptcli ONNX export"):  # exit 6: an output of the wrong kind
        ex.ensure_export(tiny_models["gpt2"], output=mine)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_fp16_cuda_export_builds_a_half_graph(tiny_models, tmp_path):
    from onnx import TensorProto

    result = ex.ensure_export(tiny_models["llama"], precision="fp16", device="cuda", output=tmp_path / "fp16")
    graph = _graph(result.model_path).graph
    assert graph.input[4].name == "past_key_values.0.key"
    assert graph.input[4].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT  # logits stay float32


def test_cli_export_prints_the_folder_and_progress_on_stderr(tiny_models, tmp_path):
    out = tmp_path / "gpt2-onnx"
    result = run_cli("export", str(tiny_models["gpt2"]), "--precision", "int4", "--device", "cpu", "--output", str(out))
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == str(out)
    assert "exporting tiny-gpt2 to ONNX (int4, cpu)" in result.stderr.decode()
    assert (out / ex.SIDECAR_FILE).is_file()
    again = run_cli("export", str(tiny_models["gpt2"]), "--precision", "int4", "--device", "cpu", "--output", str(out))
    assert again.returncode == 0 and "exporting" not in again.stderr.decode()
    bad = run_cli("export", str(tiny_models["gpt2"]), "--precision", "int3")
    assert bad.returncode == 3 and "must be one of fp32, fp16, int8, int4, got 'int3'" in bad.stderr.decode()


def test_a_new_version_replaces_the_stale_cached_export(tiny_models, monkeypatch):
    old = ex.ensure_export(tiny_models["gpt2"]).folder
    monkeypatch.setattr(ex.graph, "GRAPH_VERSION", ex.graph.GRAPH_VERSION + 1)
    new = ex.ensure_export(tiny_models["gpt2"]).folder
    assert new != old and new.is_dir() and not old.exists()


def test_cli_export_force_rebuilds_a_corrupt_cached_export(tiny_models, capsys):
    from pathlib import Path

    from gptcli.cli.app import run

    args = ["export", str(tiny_models["gpt2"]), "--device", "cpu"]
    assert run(args) == 0
    folder = Path(capsys.readouterr().out.strip())
    graph = folder / "model.onnx"
    good = graph.read_bytes()
    graph.write_bytes(good[: len(good) // 2])  # as a disk error might leave it
    assert run(args) == 5  # without --force the cached export is checked, not rebuilt
    err = capsys.readouterr().err
    assert "error: corrupt or incomplete ONNX export" in err
    # the hint was "delete the folder and export again (`gptcli export`)": that command met this error again
    again = f"gptcli export {tiny_models['gpt2']} --precision fp32 --device cpu --force"
    assert f"hint: `{again}` exports it again" in err, err
    assert run([*args, "--force"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(folder) and "exporting tiny-gpt2 to ONNX (fp32, cpu)" in err
    assert graph.read_bytes() == good
    assert ex.read_export(folder).meta["files"]["model.onnx"] == len(good)


def test_an_output_under_a_file_says_a_file_is_in_the_way(tiny_models, tmp_path, capsys):
    from gptcli.cli.app import run

    (tmp_path / "ok.txt").write_text("mine")
    assert run(["export", str(tiny_models["gpt2"]), "--output", str(tmp_path / "ok.txt" / "sub")]) == 6
    assert capsys.readouterr().err.splitlines()[-2:] == [
        f"error: cannot write {tmp_path / 'ok.txt'}: a file is there, where a folder should be",  # was "File exists"
        "hint: check the path",
    ]
    assert (tmp_path / "ok.txt").read_text() == "mine"


def test_an_output_whose_name_is_not_utf8_is_refused_before_any_work(tiny_models, tmp_path, capsys):
    # onnx's writer takes only UTF-8 paths: 'internal error: TypeError: _open_external_data(): incompatible
    # function arguments' once the graph was built (fuzz_cli.py, seed 9094).
    from gptcli.cli.app import run

    out = tmp_path / os.fsdecode(b"caf\xc3\xa9-\xff\xfe")  # an é, then bytes that are not UTF-8
    assert run(["export", str(tiny_models["gpt2"]), "--precision", "fp32", "--output", str(out)]) == 6
    assert capsys.readouterr().err.splitlines()[-2:] == [
        f"error: {tmp_path}/café-\\xff\\xfe: its name is not UTF-8 (the byte \\xff), and ONNX takes only UTF-8 paths",
        "hint: choose a folder whose name is UTF-8",
    ]
    assert list(tmp_path.iterdir()) == []


def test_a_model_cache_whose_name_is_not_utf8_is_a_config_error(tiny_models, tmp_path):
    # It failed only once a library wrote there: the default model's conversion ended in 'cannot write to stdout:
    # the text holds the byte \\xff' (exit 1), an ONNX export in onnx's internal TypeError.
    home = tmp_path / os.fsdecode(b"home-\xff")
    args = ("generate", "hi", "-m", str(tiny_models["gpt2"]), "--backend", "onnx")
    result = run_cli(*args, env={"GPTCLI_HOME": str(home)})
    assert result.returncode == 3 and result.stderr.decode().splitlines() == [
        f"error: {tmp_path}/home-\\xff/cache: its name is not UTF-8 (the byte \\xff), and the model libraries"
        " (safetensors, tokenizers, ONNX) take only UTF-8 paths",
        "hint: set GPTCLI_HOME (or XDG_CACHE_HOME) to a folder whose name is UTF-8",
    ]
    assert not home.exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_in_a_folder_that_takes_no_folders_names_the_output(tiny_models, capsys):
    from gptcli.cli.app import run

    assert run(["export", str(tiny_models["gpt2"]), "--output", "/proc/onnx-out"]) == 6
    assert capsys.readouterr().err.splitlines()[-2:] == [  # was "cannot write /proc": the temporary folder's
        "error: cannot write /proc/onnx-out: cannot create a folder in /proc (No such file or directory)",
        "hint: check the path",
    ]


def test_an_output_that_links_to_a_folder_is_exported_into_that_folder(tiny_models, tmp_path, capsys):
    from gptcli.cli.app import run

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    for _ in range(2):  # into the empty folder, then over the export there
        assert run(["export", str(tiny_models["gpt2"]), "--output", str(tmp_path / "link"), "--force"]) == 0
        # the link was moved aside as a hidden .old-link-<pid>-<ns> (and never removed), the export made beside it
        assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
        assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / ex.SIDECAR_FILE).is_file()
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "link")] * 2


def test_exporting_an_export_says_what_it_is(tiny_models, tmp_path, capsys):
    from gptcli.cli.app import run

    assert run(["export", str(tiny_models["gpt2"]), "--output", str(tmp_path / "onnx")]) == 0
    capsys.readouterr()
    assert run(["export", str(tmp_path / "onnx"), "--output", str(tmp_path / "again")]) == 5
    # it was "error: .../onnx: weight 'transformer.wte.weight' is missing for a GPT2LMHeadModel"
    assert capsys.readouterr().err.splitlines()[-2:] == [
        f"error: {tmp_path / 'onnx'} is already an ONNX export",
        "hint: run it with --backend onnx, or export the model it was made from (`gptcli models info` names it)",
    ]
    assert not (tmp_path / "again").exists()


def test_models_info_on_an_export_folder_reports_its_parameters_and_precision(tiny_models, tmp_path):
    """An export has no safetensors: `models info` said `params 0 (0.0 M)` and `dtype ?`."""
    import json

    from gptcli.models import LocalModel, describe

    out = tmp_path / "llama-onnx"
    ex.ensure_export(tiny_models["llama"], precision="int8", device="cpu", output=out)
    result = run_cli("models", "info", str(out), "--json")
    assert result.returncode == 0, result.stderr.decode()
    facts = json.loads(result.stdout)
    expected = describe(LocalModel(path=tiny_models["llama"], name="tiny-llama", source=str(tiny_models["llama"])))
    assert facts["params"] == expected["params"] > 0
    assert facts["dtype"] == "onnx int8 (cpu)"
    assert facts["source"] == f"ONNX export of tiny-llama ({tiny_models['llama']})"


def test_the_graph_builder_writes_the_model_onnx_helper_would_byte_for_byte():
    """GraphBuilder writes initializers into its model in place (no copies); the bytes are make_model's."""
    from onnx import TensorProto, helper, numpy_helper

    arrays = {
        "w": np.arange(12, dtype=np.float64).reshape(3, 4).T,  # not contiguous, and cast to the graph's float
        "ids": np.array([[1, 2]], dtype=np.int64),
        "scalar": np.array(7, dtype=np.int64),
        "codes": np.arange(6, dtype=np.uint8).reshape(2, 3),
    }
    g = ex.GraphBuilder(TensorProto.FLOAT)
    g.weight("w", arrays["w"])
    for name in ("ids", "scalar", "codes"):
        g.const(name, arrays[name])
    y = g.op("MatMul", ["x", "w"], "mm")
    g.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]))
    g.outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 3]))
    opsets = [helper.make_opsetid("", ex.OPSET)]
    ours = g.finish("g", opsets, producer_name="gptcli", ir_version=10)

    tensors = [numpy_helper.from_array(np.ascontiguousarray(arrays["w"], dtype=np.float32), "w")]
    tensors += [numpy_helper.from_array(arrays[name], name) for name in ("ids", "scalar", "codes")]
    graph = helper.make_graph(g.nodes, "g", g.inputs, g.outputs, tensors)
    theirs = helper.make_model(graph, opset_imports=opsets, producer_name="gptcli")
    theirs.ir_version = 10
    assert ours.SerializeToString() == theirs.SerializeToString()
