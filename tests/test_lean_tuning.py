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
    assert lean_tuning.one_row_packed(BIG - 1) is False


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
        assert lean_tuning.one_row_packed(BIG) and lean_tuning.one_row_packed(BIG)
        assert calls == [1]
        torch.set_num_threads(2)
        lean_tuning.one_row_packed(BIG)
        assert calls == [1, 2]  # another thread count is another choice
    finally:
        torch.set_num_threads(before)
    stored = json.loads(tuning.tuning_file().read_text())[lean_tuning.TUNING_NAME]
    assert [record["kernel"] for record in stored.values()] == [lean_tuning.ONEDNN] * 2


def test_both_kernels_are_timed_on_this_cpu():
    record = lean_tuning.measure(1)
    assert record["kernel"] in {lean_tuning.MKL, lean_tuning.ONEDNN}
    assert set(record["timings_ms"]) == {lean_tuning.MKL, lean_tuning.ONEDNN}
    assert all(ms > 0 for ms in record["timings_ms"].values())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_row_products_on_the_packed_weights_give_the_same_greedy_text(tiny_models, family, monkeypatch):
    monkeypatch.setenv("GPTCLI_TORCH_IMPL", "lean")
    options = LoadOptions(device="cpu", dtype="float32", threads=1)
    plain = TorchBackend.load(tiny_models[family], options)
    packed = TorchBackend.load(tiny_models[family], options)
    if not packed.engine.lean._onednn:
        pytest.skip("torch has no oneDNN here")
    plain.engine.lean._one_row_packed, packed.engine.lean._one_row_packed = False, True
    prompt = [3, 9, 4, 17]
    for backend in (plain, packed):
        logits, cache = backend.forward(prompt, backend.new_cache())
        tokens = []
        for _ in range(12):
            tokens.append(int(np.argmax(logits)))
            logits, cache = backend.forward([tokens[-1]], cache)
        backend.tokens, backend.last = tokens, logits  # type: ignore[attr-defined]
    assert packed.tokens == plain.tokens  # type: ignore[attr-defined]
    np.testing.assert_allclose(packed.last, plain.last, atol=1e-4, rtol=0)  # type: ignore[attr-defined]
    assert packed.engine.lean._packed and not plain.engine.lean._packed  # the packed run really used packed weights


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
