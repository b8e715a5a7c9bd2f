"""The lean engine's float32 kernel for one-row products: measured once per machine, cached, used, reported."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gptcli import tuning
from gptcli.backends import lean_tuning
from gptcli.backends.base import LoadOptions
from gptcli.backends.torch_backend import TorchBackend

BIG = lean_tuning.MIN_PARAMS


def test_a_small_model_keeps_mkl_without_measuring(monkeypatch):
    monkeypatch.setattr(lean_tuning, "measure", lambda threads: pytest.fail("measured for a tiny model"))
    assert lean_tuning.one_row_kernel(BIG - 1) == lean_tuning.MKL


def test_the_choice_is_measured_once_per_thread_count_and_cached(monkeypatch):
    import torch

    calls: list[int] = []

    def fake(threads):
        calls.append(threads)
        return {"kernel": lean_tuning.ONEDNN, "timings_ms": {}, "reason": "fake"}

    monkeypatch.setattr(lean_tuning, "measure", fake)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert lean_tuning.one_row_kernel(BIG) == lean_tuning.one_row_kernel(BIG) == lean_tuning.ONEDNN
        assert calls == [1]
        torch.set_num_threads(2)
        lean_tuning.one_row_kernel(BIG)
        assert calls == [1, 2]  # another thread count is another choice
    finally:
        torch.set_num_threads(before)
    stored = json.loads(tuning.tuning_file().read_text())[lean_tuning.TUNING_NAME]
    assert [record["kernel"] for record in stored.values()] == [lean_tuning.ONEDNN] * 2


def test_every_kernel_is_timed_on_this_cpu():
    record = lean_tuning.measure(1)
    kernels = {lean_tuning.MKL, lean_tuning.ONEDNN, lean_tuning.NUMPY_BLAS}
    assert record["kernel"] in kernels
    assert set(record["timings_ms"]) == kernels
    assert all(ms > 0 for ms in record["timings_ms"].values())


def test_tall_matrices_are_timed_in_both_memory_orders():
    times = lean_tuning.measure_tall(1)
    assert set(times) == {"[in, out]", "[out, in]"} and all(ms > 0 for ms in times.values())


def greedy(backend, steps: int = 12) -> tuple[list[int], np.ndarray]:
    logits, cache = backend.forward([3, 9, 4, 17], backend.new_cache())
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits)))
        logits, cache = backend.forward([tokens[-1]], cache)
    return tokens, logits


def float32_lean(tiny_models, monkeypatch, kernel: str, threads: int = 2, family: str = "llama") -> TorchBackend:
    """A tiny float32 model on the lean engine with its one-row kernel set to `kernel` (skips without oneDNN)."""
    monkeypatch.setenv("GPTCLI_TORCH_IMPL", "lean")
    backend = TorchBackend.load(tiny_models[family], LoadOptions(device="cpu", dtype="float32", threads=threads))
    if not backend.engine.lean._onednn:
        pytest.skip("torch has no oneDNN here")
    backend.engine.lean._one_row_kernel = kernel
    return backend


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("kernel", [lean_tuning.ONEDNN, lean_tuning.NUMPY_BLAS])
def test_each_one_row_kernel_gives_the_same_greedy_text(tiny_models, family, kernel, monkeypatch):
    import torch

    from gptcli.backends import lean_base

    plain = float32_lean(tiny_models, monkeypatch, lean_tuning.MKL, family=family)
    other = float32_lean(tiny_models, monkeypatch, kernel, family=family)
    expected_tokens, expected_logits = greedy(plain)
    numpy_threads: list[int] = []  # torch's thread count during each product on numpy's BLAS
    product = lean_base.numpy_product
    monkeypatch.setattr(
        lean_base, "numpy_product", lambda x, w: (numpy_threads.append(torch.get_num_threads()), product(x, w))[1]
    )
    tokens, logits = greedy(other)
    assert tokens == expected_tokens
    np.testing.assert_allclose(logits, expected_logits, atol=1e-4, rtol=0)
    assert torch.get_num_threads() == 2  # given back after every one-row step
    if kernel == lean_tuning.ONEDNN:
        assert not numpy_threads
    else:  # every one-row product of the 12 decode steps, with torch's own pool down to one thread
        assert len(numpy_threads) >= 12 * plain.info.num_layers and set(numpy_threads) == {1}


def test_tall_matrices_held_as_out_in_give_the_same_text_and_keep_their_packed_copies(tiny_models, monkeypatch):
    """Where numpy's BLAS won and read tall matrices faster as [out, in], the model re-lays them at its first
    one-row step: the same greedy text, the same shapes, and the packed copies a prefill made are kept."""
    from gptcli.backends import lean_base

    plain = float32_lean(tiny_models, monkeypatch, lean_tuning.MKL)
    expected_tokens, expected_logits = greedy(plain)
    backend = float32_lean(tiny_models, monkeypatch, lean_tuning.MKL)
    lean = backend.engine.lean
    lean._one_row_kernel = None  # decided at the first one-row step, from this record
    choice = {"kernel": lean_tuning.NUMPY_BLAS, lean_tuning.TALL_OUT_IN: True}
    monkeypatch.setattr(lean_base, "one_row_choice", lambda params: choice)
    tall = [
        (layer, name)
        for layer, name in lean._matrices()
        if getattr(layer, name).shape[0] > getattr(layer, name).shape[1]
    ]
    assert tall, "the tiny model has a down projection with more inputs than outputs"
    shapes = [getattr(layer, name).shape for layer, name in tall]
    tokens, logits = greedy(backend)  # the prompt is a prefill (packed copies), then one-row steps
    assert tokens == expected_tokens
    np.testing.assert_allclose(logits, expected_logits, atol=1e-4, rtol=0)
    for (layer, name), shape in zip(tall, shapes, strict=True):
        weight = getattr(layer, name)
        assert weight.shape == shape and weight.t().is_contiguous() and not weight.is_contiguous()
    # every packed copy belongs to a matrix the model holds now (moved along with it, not left behind)
    current = {id(getattr(layer, name)) for layer, name in lean._matrices()} | {id(lean.head)}
    assert set(lean._packed) <= current and len(lean._packed) >= 4 * lean.num_layers
    assert lean.layers[0].qkv.is_contiguous()  # wider than tall: untouched


def test_a_prefill_runs_on_the_packed_weights(tiny_models, monkeypatch):
    """Several rows of one sequence: oneDNN on packed weights, as a batched step (MKL's sgemm was 1.2-1.6x
    slower at 64-512 rows on this project's machine), whatever kernel one-row products use."""
    backend = float32_lean(tiny_models, monkeypatch, lean_tuning.MKL, threads=1)
    lean = backend.engine.lean
    backend.forward([3, 9, 4, 17], backend.new_cache())
    assert len(lean._packed) == 4 * lean.num_layers  # qkv, out, gate_up and down of every layer (the head: one row)


def test_quantized_weights_keep_their_own_kernels_where_numpy_blas_won(tiny_models, monkeypatch):
    from gptcli.backends import lean_base

    monkeypatch.setenv("GPTCLI_TORCH_IMPL", "lean")
    backend = TorchBackend.load(tiny_models["llama"], LoadOptions(device="cpu", precision="int8", threads=2))
    backend.engine.lean._one_row_kernel = lean_tuning.NUMPY_BLAS
    monkeypatch.setattr(lean_base, "numpy_product", lambda x, w: pytest.fail("a quantized model used numpy's BLAS"))
    greedy(backend, 3)
    assert not backend.engine.lean._numpy_step(1, 0)  # nor does it take torch's threads away from those kernels


def test_backends_json_and_bench_environment_say_which_kernel_this_machine_uses(capsys):
    from gptcli.bench.environment import environment
    from gptcli.cli.app import run
    from gptcli.hardware import default_threads

    record = {"kernel": lean_tuning.ONEDNN, "timings_ms": {"mkl": 2.0, "onednn-packed": 1.0}, "reason": "faster"}
    tuning.store(lean_tuning.TUNING_NAME, lean_tuning.machine_key(default_threads()), record)
    assert run(["backends", "--json"]) == 0
    torch_row = next(row for row in json.loads(capsys.readouterr().out) if row["name"] == "torch")
    assert torch_row["auto"]["float32_one_row_kernel"] == lean_tuning.ONEDNN
    assert environment()["torch_float32_one_row_kernel"] == lean_tuning.ONEDNN


def test_numpy_blas_steps_stop_where_attention_reads_a_tenth_of_the_weights(tiny_models, monkeypatch):
    from gptcli.backends.lean_base import NUMPY_KV_SHARE

    backend = float32_lean(tiny_models, monkeypatch, lean_tuning.NUMPY_BLAS)
    lean = backend.engine.lean
    limit = int(NUMPY_KV_SHARE * lean.params * 4 / backend.engine.kv_bytes_per_token())
    assert lean._numpy_step(1, 0) and lean._numpy_step(1, limit)
    assert not lean._numpy_step(1, limit + 1)  # attention on torch's full pool from here on
    assert not lean._numpy_step(2, 0)  # a prefill chunk or a batched step: oneDNN/MKL with torch's threads


def test_a_cache_that_cannot_be_written_keeps_the_choice_for_this_run(monkeypatch):
    """A full disk under GPTCLI_HOME ended `generate --dtype float32` (the default model) with 'cannot write
    .../tuning.json: No space left on device' once the kernels were timed."""
    import errno

    def full(path, data, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(tuning, "write_atomic", full)
    monkeypatch.setattr(lean_tuning, "measure", lambda threads: {"kernel": lean_tuning.ONEDNN, "reason": "fake"})
    assert lean_tuning.one_row_kernel(BIG) == lean_tuning.ONEDNN
    assert not tuning.tuning_file().exists()
